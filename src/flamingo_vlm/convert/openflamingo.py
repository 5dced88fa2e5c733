"""OpenFlamingo checkpoints -> flamingo_vlm models, and back.

An OpenFlamingo ``checkpoint.pt`` holds (``filter_state_dict_to_trainable`` in its training code):

    perceiver.*                                             PerceiverResampler (6 layers, 64 latents, 8x64 heads)
    lang_encoder.<layers>.<i>.gated_cross_attn_layer.*      gated xattn before decoder layer i, (i + 1) % n == 0
    lang_encoder.<input embeddings>.weight                  the whole matrix [len(tokenizer), d], trained
    lang_encoder.<output embeddings>.weight                 only when its name contains "embed" (GPT-NeoX's
                                                            embed_out, transformers 5's lm_head), or tied (MPT)

What its architecture fixes, and how our config says it:
- no LayerNorm on the media keys/values (``xattn_norm_media=False``), GELU feed-forwards (``ff_activation``);
- each token sees the last ``<image>`` at or before it (the ``<image>`` token sees its own image), tokens
  before the first image see none: our ``media_attention="last"``;
- no time embeddings (``max_num_frames=1`` with a zero embedding: exactly nothing added, for any frame count);
- tokens added in the order ``<|endofchunk|>``, ``<image>``, then ``<PAD>`` if the tokenizer has no pad token,
  and the LM's embeddings resized to the tokenizer's length (``truncate_vocab=True``);
- the whole input-embedding matrix is trained (gradients masked to the new rows, except under FSDP): old
  rows that differ from the LM's are loaded over it and saved with the bridge (``save_lm_embeddings``);
- vision features are open_clip's patch tokens. open_clip >= 2.23.0 applies ``ln_post`` to them, earlier
  versions did not; the released models were trained before that change (``vision_post_norm=False``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..config import FlamingoConfig
from ..modeling.backbones import load_lm
from ..modeling.flamingo import FlamingoModel, xattn_layer_indices
from ..modeling.lm import ExtendedEmbedding, ExtendedLMHead, find_decoder_layers
from ..modeling.vision import VisionEncoder, load_vision_encoder
from ..processing import FlamingoProcessor, ImageTransform
from .clip_vision import read_state_dict

OF_MEDIA_TOKEN, OF_END_OF_CHUNK_TOKEN, OF_PAD_TOKEN = "<image>", "<|endofchunk|>", "<PAD>"
# What OpenFlamingo's factory builds (Flamingo(...) passes no size arguments to these modules).
OF_ARCHITECTURE = dict(
    resampler_depth=6, resampler_num_latents=64, resampler_heads=8, resampler_dim_head=64, resampler_ff_mult=4,
    xattn_heads=8, xattn_dim_head=64, xattn_ff_mult=4,
)
OF_DIM_HEAD = 64
# Path segments added by DDP, FSDP, activation checkpointing and torch.compile.
_WRAPPERS = {"module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}
_XATTN_KEY = re.compile(r"lang_encoder\.(.+)\.(\d+)\.gated_cross_attn_layer\.(.+)")


@dataclass
class ConversionReport:
    """What loading an OpenFlamingo checkpoint found beyond the bridge itself."""

    changed_embedding_rows: int = 0  # old input-embedding rows that differ from the LM's (loaded over it)
    changed_lm_head_rows: int = 0
    lm_head_new_rows_from_checkpoint: bool = False  # else: the mean of the LM head's rows (see docs)
    ignored_keys: list[str] = field(default_factory=list)  # frozen backbone weights in the checkpoint

    def lines(self) -> list[str]:
        out = []
        if self.changed_embedding_rows or self.changed_lm_head_rows:
            out.append(
                f"{self.changed_embedding_rows} input-embedding and {self.changed_lm_head_rows} LM-head rows of the LM's own "
                "vocabulary differ from the LM's: loaded from the checkpoint and saved with the bridge (save_lm_embeddings)"
            )
        if not self.lm_head_new_rows_from_checkpoint:
            out.append(
                "the checkpoint has no LM-head rows for the new tokens (OpenFlamingo does not save an untied LM head): "
                "they start at the mean of the LM head's rows, as transformers' resize_token_embeddings puts them"
            )
        if self.ignored_keys:
            out.append(f"{len(self.ignored_keys)} frozen backbone tensors in the checkpoint were shape-checked and not loaded")
        return out


# ---- reading -----------------------------------------------------------------------------------
def read_openflamingo_checkpoint(checkpoint: str | os.PathLike | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenFlamingo's state dict from a ``checkpoint.pt`` (bare, or a training checkpoint's model_state_dict),
    loaded with ``weights_only=True``; DDP/FSDP/checkpointing prefixes removed, aliased copies dropped."""
    state = read_state_dict(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
    clean: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        name = ".".join(part for part in key.split(".") if part not in _WRAPPERS)
        # OpenFlamingo's model holds every decoder layer and xattn block twice (old_decoder_blocks and
        # gated_cross_attn_layers alias the ones inside the FlamingoLayers); its checkpoints keep the latter
        if name.startswith(("lang_encoder.old_decoder_blocks.", "lang_encoder.gated_cross_attn_layers.")):
            continue
        clean[name] = value
    return clean


@dataclass
class CheckpointLayout:
    """The architecture an OpenFlamingo state dict implies."""

    layers_path: str
    xattn_layers: list[int]
    lm_hidden_size: int
    vision_width: int
    embedding_key: str
    embedding_rows: int
    config: dict[str, Any]


def inspect_checkpoint(state: dict[str, torch.Tensor]) -> CheckpointLayout:
    """Read the perceiver's and xattn blocks' sizes, where the xattn blocks sit, and the embedding matrix."""
    if "perceiver.media_time_embs" in state:
        raise ValueError("the checkpoint has perceiver.media_time_embs (per-position media embeddings), which this library does not implement")
    if "perceiver.latents" not in state:
        raise ValueError(f"not an OpenFlamingo checkpoint: no perceiver.latents among its {len(state)} keys (first: {sorted(state)[:5]})")
    xattn = {}
    for key in state:
        m = _XATTN_KEY.fullmatch(key)
        if m:
            xattn.setdefault(m.group(1), set()).add(int(m.group(2)))
    if len(xattn) != 1:
        raise ValueError(f"expected gated_cross_attn_layer keys under one decoder-layer list, found {sorted(xattn) or 'none'}")
    (layers_path, indices), = xattn.items()
    layers = sorted(indices)
    embedding_keys = [k for k in state if k.startswith("lang_encoder.") and re.search(r"(embed|wte)[^.]*\.weight$", k) and state[k].ndim == 2]
    inputs = [k for k in embedding_keys if not re.search(r"(embed_out|lm_head)", k)]
    if len(inputs) != 1:
        raise ValueError(f"cannot tell the input-embedding matrix among {embedding_keys or 'no embedding keys'}")

    latents = state["perceiver.latents"]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("perceiver.layers."))
    vision_width = latents.shape[1]
    first = f"lang_encoder.{layers_path}.{layers[0]}.gated_cross_attn_layer."
    lm_hidden = state[first + "attn.norm.weight"].shape[0]
    p_inner, x_inner = state["perceiver.layers.0.0.to_q.weight"].shape[0], state[first + "attn.to_q.weight"].shape[0]
    frames = state["perceiver.frame_embs"].shape[0] if "perceiver.frame_embs" in state else 1
    config = dict(
        resampler_depth=depth, resampler_num_latents=latents.shape[0],
        resampler_heads=max(p_inner // OF_DIM_HEAD, 1), resampler_dim_head=min(OF_DIM_HEAD, p_inner),
        resampler_ff_mult=state["perceiver.layers.0.1.1.weight"].shape[0] // vision_width,
        xattn_heads=max(x_inner // OF_DIM_HEAD, 1), xattn_dim_head=min(OF_DIM_HEAD, x_inner),
        xattn_ff_mult=state[first + "ff.1.weight"].shape[0] // lm_hidden,
        cross_attn_every_n_layers=layers[0] + 1, max_num_frames=frames,
    )
    return CheckpointLayout(layers_path, layers, lm_hidden, vision_width, inputs[0], state[inputs[0]].shape[0], config)


# ---- key mapping (shared by load and export) -----------------------------------------------------
def _module_name(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def _lm_key(lm: nn.Module, module: nn.Module) -> str:
    return f"lang_encoder.{_module_name(lm, module)}.weight"


def bridge_key_map(model: FlamingoModel) -> dict[str, str]:
    """OpenFlamingo key -> :meth:`FlamingoModel.flamingo_state_dict` key, for the perceiver and xattn blocks."""
    ours = model.flamingo_state_dict()
    mapping = {}
    for name in ours:
        if name.startswith("resampler."):
            rest = name[len("resampler."):]
            if rest == "time_embeddings":
                rest = "frame_embs"
            mapping[f"perceiver.{rest}"] = name
    path, layers = find_decoder_layers(model.lm, model.decoder_layers_attr)
    block_layers = [i for i, layer in enumerate(layers) if getattr(layer, "gated_xattn", None) is not None]
    for k, i in enumerate(block_layers):
        prefix = f"xattn.{k}."
        for name in ours:
            if name.startswith(prefix):
                mapping[f"lang_encoder.{path}.{i}.gated_cross_attn_layer.{name[len(prefix):]}"] = name
    return mapping


def _lm_param_keys(lm: nn.Module) -> dict[str, torch.Size]:
    """OpenFlamingo names of the frozen LM's parameters (FlamingoLayer's decoder_layer naming is ours too)."""
    keys = {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        if ".gated_xattn." in name or name.endswith(("new.weight", "new_weight")):
            continue
        keys["lang_encoder." + name.replace(".base.", ".")] = p.shape
    return keys


def _lm_key_renamings(lm: nn.Module) -> list:
    """transformers' own renamings from a checkpoint's LM keys to this version's module names (its
    ``conversion_mapping``: e.g. GPT-NeoX's ``embed_out`` is ``lm_head`` since transformers 5). OpenFlamingo's
    checkpoints name the LM's modules as transformers < 4.47 did."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    try:
        transforms = get_model_conversion_mapping(lm, add_legacy=False)  # not the LayerNorm gamma/beta renames
    except TypeError:  # a transformers 5 without add_legacy
        transforms = get_model_conversion_mapping(lm)
    return [t for t in transforms if type(t) is WeightRenaming]


def _rename_lm_keys(state: dict[str, torch.Tensor], lm: nn.Module, *, to_openflamingo: bool = False) -> dict[str, torch.Tensor]:
    """``state`` with its ``lang_encoder.*`` keys renamed from OpenFlamingo's (older transformers') names to
    this LM's, or back (``to_openflamingo``)."""
    renamings = _lm_key_renamings(lm)
    if to_openflamingo:
        renamings = [t.reverse_transform() for t in reversed(renamings)]
    if not renamings:
        return state
    out = {}
    for key, value in state.items():
        if key.startswith("lang_encoder."):
            name = key[len("lang_encoder."):]
            for renaming in renamings:
                name = renaming.rename_source_key(name)[0]
            key = "lang_encoder." + name
        out[key] = value
    return out


# ---- OpenFlamingo's tokenizer convention ---------------------------------------------------------
def add_openflamingo_tokens(tokenizer) -> list[int]:
    """Add the special tokens as OpenFlamingo's factory does (``<|endofchunk|>``, ``<image>``, then ``<PAD>``
    if the tokenizer has no pad token), so ids match its checkpoints; return the new ids."""
    before = len(tokenizer)
    wanted = [t for t in (OF_END_OF_CHUNK_TOKEN, OF_MEDIA_TOKEN) if t not in tokenizer.get_vocab()]
    if wanted:
        tokenizer.add_special_tokens({"extra_special_tokens": wanted}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": OF_PAD_TOKEN})
    return list(range(before, len(tokenizer)))


def _load_tokenizer(tokenizer: Any, lm: Any, lm_kwargs: dict[str, Any]):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    source = tokenizer if tokenizer is not None else lm if isinstance(lm, (str, os.PathLike)) else getattr(lm, "name_or_path", None)
    if not source:
        raise ValueError("the LM was passed as an object without a name_or_path: pass tokenizer=")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, trust_remote_code=bool(lm_kwargs.get("trust_remote_code", False)))


# transformers 5's generic fast tokenizer class, which transformers < 4.47 (OpenFlamingo's) does not know; both
# load the same tokenizer.json as PreTrainedTokenizerFast.
_TOKENIZER_CLASSES_FOR_OPENFLAMINGO = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_tokenizer_loadable_by_openflamingo(directory: str | os.PathLike) -> None:
    """Rewrite a saved tokenizer's ``tokenizer_class`` in ``directory`` to one OpenFlamingo's transformers (< 4.47)
    can load, where transformers 5 wrote a class only it has; both versions then load the same tokenizer."""
    import json

    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        config = json.load(f)
    old = config.get("tokenizer_class")
    if old in _TOKENIZER_CLASSES_FOR_OPENFLAMINGO:
        config["tokenizer_class"] = _TOKENIZER_CLASSES_FOR_OPENFLAMINGO[old]
        with open(path, "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


# ---- load ----------------------------------------------------------------------------------------
def _split_rows(matrix: torch.Tensor, first_new: int, name: str, expected_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    if matrix.shape[0] != expected_rows:
        raise ValueError(
            f"the checkpoint's {name} has {matrix.shape[0]} rows but the tokenizer has {expected_rows} tokens with "
            f"OpenFlamingo's special tokens: wrong --lm / tokenizer for this checkpoint (vocabulary mismatch)"
        )
    return matrix[:first_new], matrix[first_new:]


def _differing_rows(checkpoint_rows: torch.Tensor, lm_weight: torch.Tensor) -> int:
    """How many of the LM's rows [0, len(checkpoint_rows)) the checkpoint changes (compared in the LM's dtype)."""
    ours = lm_weight[: checkpoint_rows.shape[0]]
    return int((checkpoint_rows.to(ours.dtype).to(ours.device) != ours).any(dim=1).sum())


def _check_same_lm(checkpoint_rows: torch.Tensor, lm_weight: torch.Tensor) -> None:
    """Trained old rows move a little (masked gradients, weight decay); another LM's rows differ wholesale."""
    ours = lm_weight[: checkpoint_rows.shape[0]].float()
    relative = float((checkpoint_rows.float().to(ours.device) - ours).norm() / ours.norm().clamp(min=1e-12))
    if relative > 0.5:
        raise ValueError(
            f"the checkpoint's input-embedding rows are not this LM's (relative difference {relative:.2f}): wrong --lm "
            "(same sizes, other weights)"
        )


def _check_layout(layout: CheckpointLayout, lm: nn.Module, encoder: VisionEncoder, layers_path: str, num_layers: int, every_n: int) -> None:
    lm_hidden = lm.config.get_text_config().hidden_size
    problems = []
    if layout.lm_hidden_size != lm_hidden:
        problems.append(f"its cross-attention layers take LM hidden size {layout.lm_hidden_size}, the LM has {lm_hidden} (wrong --lm)")
    if layout.vision_width != encoder.hidden_size:
        problems.append(
            f"its perceiver takes vision features of width {layout.vision_width}, the vision encoder gives {encoder.hidden_size} (wrong --vision)"
        )
    if layout.layers_path != layers_path:
        problems.append(f"its cross-attention layers sit in the LM's {layout.layers_path!r}, this LM's decoder layers are {layers_path!r} (wrong --lm)")
    expected = xattn_layer_indices(num_layers, every_n)
    if layout.xattn_layers != expected:
        problems.append(
            f"it has cross-attention before decoder layers {layout.xattn_layers} (every {every_n}), but the LM has {num_layers} "
            f"decoder layers, which would give {expected} (wrong --lm)"
        )
    if problems:
        raise ValueError("the OpenFlamingo checkpoint does not fit these backbones:\n  " + "\n  ".join(problems))


def _bridge_state(model: FlamingoModel, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our flamingo_state_dict entries for the perceiver/xattn keys of ``state``; raises listing missing,
    unexpected and mismatched keys (under OpenFlamingo's names); returns also the ignored backbone keys."""
    mapping = bridge_key_map(model)
    ours = model.flamingo_state_dict()
    lm_keys = _lm_param_keys(model.lm)
    embedding_keys = {_lm_key(model.lm, model.lm.get_input_embeddings()), _lm_key(model.lm, model.lm.get_output_embeddings())}
    out, missing, mismatched, unexpected, ignored = {}, [], [], [], []
    for of_key, our_key in mapping.items():
        if of_key not in state:
            if of_key == "perceiver.frame_embs":  # OpenFlamingo's factory builds none: zero adds nothing
                out[our_key] = torch.zeros_like(ours[our_key])
            else:
                missing.append(of_key)
        elif state[of_key].shape != ours[our_key].shape:
            mismatched.append(f"{of_key}: checkpoint {tuple(state[of_key].shape)} vs model {tuple(ours[our_key].shape)}")
        else:
            out[our_key] = state[of_key]
    for key, value in state.items():
        if key in mapping or key in embedding_keys:  # embeddings: see _load_embeddings
            continue
        if key in lm_keys:  # embeddings (handled by the caller) or frozen LM weights
            if value.shape != lm_keys[key]:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs LM {tuple(lm_keys[key])}")
            ignored.append(key)
        elif key.startswith("vision_encoder."):
            ignored.append(key)
        else:
            unexpected.append(key)
    if missing or unexpected or mismatched:
        raise ValueError(
            "the OpenFlamingo checkpoint does not fit this model (different backbones or architecture?)\n"
            f"  missing keys: {missing[:10]}{' ...' if len(missing) > 10 else ''}\n"
            f"  unexpected keys: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}\n"
            f"  shape mismatches: {mismatched[:10]}{' ...' if len(mismatched) > 10 else ''}"
        )
    return out, ignored


def _changed_lm_rows(lm: nn.Module, state: dict[str, torch.Tensor], first_new: int) -> tuple[int, int]:
    """How many input-embedding and LM-head rows of the LM's own vocabulary (ids below ``first_new``) the
    checkpoint changes. Works on the LM before and after the model wraps its embeddings, so that a builder
    can decide ``save_lm_embeddings`` before it builds the model."""
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    embed_key = _lm_key(lm, embed)
    changed_embed = _differing_rows(state[embed_key][:first_new], embed.weight) if embed_key in state else 0
    changed_head = 0
    if head is not None:
        head_key = _lm_key(lm, head)
        tied = head.weight is embed.weight  # the wrappers' .weight is their base's, so this holds before and after
        if head_key in state and not tied:
            changed_head = _differing_rows(state[head_key][:first_new], head.weight)
    return changed_embed, changed_head


def _load_embeddings(model: FlamingoModel, state: dict[str, torch.Tensor], report: ConversionReport) -> dict[str, torch.Tensor]:
    """New-token rows from the checkpoint's embedding matrices; changed old rows are written into the LM."""
    lm, config = model.lm, model.config
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if not isinstance(embed, ExtendedEmbedding) or not isinstance(head, ExtendedLMHead):
        raise ValueError("the tokenizer already had OpenFlamingo's special tokens: pass the LM's original tokenizer")
    # OpenFlamingo resizes the LM to the tokenizer: a padded vocabulary (MPT, GPT-NeoX) loses its rows past it
    first_new, rows = embed.first_new_id, embed.first_new_id + embed.new.num_embeddings
    out = {}
    old, new = _split_rows(state[_lm_key(lm, embed)], first_new, "input embedding", rows)
    out["new_token_embeddings.weight"] = new
    _check_same_lm(old, embed.base.weight)
    head_key = _lm_key(lm, head)
    tied = head.tied_to is not None
    if head_key in state:
        old_h, new_h = _split_rows(state[head_key], first_new, "LM head", rows)
        if tied:
            if not torch.equal(state[head_key], state[_lm_key(lm, embed)]):
                raise ValueError(f"the LM ties its embeddings but the checkpoint's {head_key} differs from its input embedding")
        else:
            out["new_token_lm_head.weight"] = new_h
    report.changed_embedding_rows, report.changed_lm_head_rows = _changed_lm_rows(lm, state, first_new)
    report.lm_head_new_rows_from_checkpoint = tied or head_key in state
    if report.changed_embedding_rows or report.changed_lm_head_rows:
        if not config.save_lm_embeddings:  # else the changed rows would be lost at save_pretrained
            raise ValueError(
                f"the checkpoint changes {report.changed_embedding_rows} input-embedding and {report.changed_lm_head_rows} LM-head "
                "rows of the LM's own vocabulary: build the model with save_lm_embeddings=True (load_openflamingo does)"
            )
        with torch.no_grad():
            embed.base.weight[:first_new].copy_(old)
            if head_key in state and not tied:
                head.base.weight[:first_new].copy_(old_h)
    return out


def load_openflamingo_weights(model: FlamingoModel, checkpoint: str | os.PathLike | dict[str, torch.Tensor]) -> ConversionReport:
    """Load an OpenFlamingo checkpoint into a model built for it (see :func:`load_openflamingo`)."""
    state = _rename_lm_keys(read_openflamingo_checkpoint(checkpoint), model.lm)
    report = ConversionReport()
    bridge, report.ignored_keys = _bridge_state(model, state)
    bridge.update(_load_embeddings(model, state, report))
    for key, value in model.flamingo_state_dict().items():
        bridge.setdefault(key, value.detach())  # LM-head new rows the checkpoint lacks; lm_* rows written above
    model.load_flamingo_state_dict(bridge)
    model._set_trainable()
    return report


def _dtype_name(dtype: Any) -> str | None:
    """``torch.bfloat16`` / ``"bfloat16"`` -> ``"bfloat16"`` (recorded in the config); None or "auto" -> None."""
    if dtype is None or dtype == "auto":
        return None
    return str(dtype).removeprefix("torch.")


def load_openflamingo(
    checkpoint: str | os.PathLike | dict[str, torch.Tensor],
    lm: Any,
    vision: Any,
    tokenizer: Any = None,
    *,
    vision_type: str | None = None,
    vision_post_norm: bool = False,
    lm_kwargs: dict[str, Any] | None = None,
    vision_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> tuple[FlamingoModel, FlamingoProcessor, ConversionReport]:
    """A flamingo_vlm model (and processor) computing what an OpenFlamingo checkpoint computes.

    lm: the checkpoint's LM (object, path or hub name; e.g. ``anas-awadalla/mpt-7b``); vision: its CLIP
    ViT as a transformers CLIP model/path (``openai/clip-vit-large-patch14`` for ViT-L-14 'openai'), an
    open_clip name (``vision_type="open_clip"``, ``vision_kwargs={"pretrained": "openai"}``) or a
    :class:`VisionEncoder`. vision_post_norm: see the module docstring (False: as the released models
    were trained). ``config_overrides``: FlamingoConfig fields (e.g. heads, if not 64-wide).
    """
    lm_kwargs, vision_kwargs = dict(lm_kwargs or {}), dict(vision_kwargs or {})
    state = read_openflamingo_checkpoint(checkpoint)
    layout = inspect_checkpoint(state)
    lm_path = lm if isinstance(lm, (str, os.PathLike)) else getattr(lm, "name_or_path", None) or None
    lm_model = load_lm(lm, **lm_kwargs)
    tokenizer = _load_tokenizer(tokenizer, lm, lm_kwargs)
    encoder = load_vision_encoder(vision, vision_type, post_norm=vision_post_norm, **vision_kwargs)

    chosen = {**layout.config, **config_overrides}
    try:
        layers_path, layers = find_decoder_layers(lm_model, chosen.get("decoder_layers_attr") or layout.layers_path)
    except ValueError as e:
        raise ValueError(f"the checkpoint's cross-attention layers sit in {layout.layers_path!r} of its LM: {e} (wrong --lm?)") from e
    _check_layout(layout, lm_model, encoder, layers_path, len(layers), chosen.get("cross_attn_every_n_layers", 1))

    new_token_ids = add_openflamingo_tokens(tokenizer)
    if layout.embedding_rows != len(tokenizer):
        raise ValueError(
            f"the checkpoint's input embedding ({layout.embedding_key}) has {layout.embedding_rows} rows but the tokenizer has "
            f"{len(tokenizer)} tokens with OpenFlamingo's special tokens: wrong --lm / tokenizer (vocabulary mismatch)"
        )
    config = FlamingoConfig(**{
        **dict(
            vision_post_norm=vision_post_norm, xattn_norm_media=False, ff_activation="gelu", media_attention="last",
            media_token=OF_MEDIA_TOKEN, end_of_chunk_token=OF_END_OF_CHUNK_TOKEN, pad_token=OF_PAD_TOKEN, truncate_vocab=True,
        ),
        **chosen,
        # what the backbones and the checkpoint decide
        **dict(
            lm_name_or_path=str(lm_path) if lm_path else None, vision_name_or_path=encoder.name_or_path, vision_type=encoder.vision_type,
            decoder_layers_attr=layers_path, new_token_ids=new_token_ids,
            media_token_id=tokenizer.convert_tokens_to_ids(OF_MEDIA_TOKEN),
            end_of_chunk_token_id=tokenizer.convert_tokens_to_ids(OF_END_OF_CHUNK_TOKEN),
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            save_lm_embeddings=any(_changed_lm_rows(lm_model, _rename_lm_keys(state, lm_model), new_token_ids[0])),
            lm_dtype=_dtype_name(lm_kwargs.get("dtype")),
        ),
    })
    model = FlamingoModel(config, lm_model, encoder)
    report = load_openflamingo_weights(model, state)
    # OpenFlamingo preprocesses with open_clip's eval transform (torchvision on PIL images: long side truncated,
    # crop offset rounded), whichever library loads the tower here.
    transform = replace(ImageTransform.for_encoder(encoder), crop_offset="round", resize_backend="pil")
    processor = FlamingoProcessor(tokenizer, transform, media_token=OF_MEDIA_TOKEN, end_of_chunk_token=OF_END_OF_CHUNK_TOKEN)
    return model, processor, report


# ---- export --------------------------------------------------------------------------------------
def _export_problems(model: FlamingoModel, check_architecture: bool, frame_embs: bool) -> list[str]:
    c, problems = model.config, []
    if c.xattn_norm_media:
        problems.append("xattn_norm_media=True: OpenFlamingo's cross-attention has no LayerNorm on the media")
    if c.ff_activation != "gelu":
        problems.append(f"ff_activation={c.ff_activation!r}: OpenFlamingo's feed-forwards use GELU")
    if c.media_attention != "last" or c.reset_media_at_eos:
        problems.append("OpenFlamingo routes each token to the last image before it, with no reset at EOS")
    if getattr(model.resampler, "spatial_embeddings", None) is not None:
        problems.append("the resampler has spatial position embeddings, which OpenFlamingo's lacks")
    if not frame_embs and bool(model.resampler.time_embeddings.detach().ne(0).any()):
        problems.append(
            "the resampler has (nonzero) time embeddings, which OpenFlamingo's factory does not build: its strict=False "
            "loading would drop them silently. Export with frame_embs=True (--frame-embs) to write them as "
            "perceiver.frame_embs, for a PerceiverResampler built with max_num_frames"
        )
    if check_architecture:
        wrong = {k: getattr(c, k) for k, v in OF_ARCHITECTURE.items() if getattr(c, k) != v}
        if wrong:
            problems.append(f"OpenFlamingo's factory builds {OF_ARCHITECTURE}; this model differs: {wrong}")
    return problems


def _full_matrix(base_weight: torch.Tensor, new_rows: torch.Tensor, first_new: int) -> torch.Tensor:
    """OpenFlamingo's resized matrix: the LM's rows below the new ids, then the new rows ([len(tokenizer), d])."""
    return torch.cat([base_weight[:first_new].float(), new_rows.float()], dim=0)


def export_openflamingo(model: FlamingoModel, *, frame_embs: bool = False, check_architecture: bool = True) -> dict[str, torch.Tensor]:
    """The model's trained weights in OpenFlamingo's checkpoint layout (fp32, on the CPU).

    Holds what OpenFlamingo's own checkpoints hold (perceiver, xattn blocks, the whole input-embedding
    matrix) plus the LM head when it is untied, so OpenFlamingo's ``load_state_dict(..., strict=False)``
    also gets the new tokens' output rows. Raises, listing why, if OpenFlamingo cannot compute this model.
    """
    problems = _export_problems(model, check_architecture, frame_embs)
    if problems:
        raise ValueError("this model cannot be expressed as an OpenFlamingo checkpoint:\n  " + "\n  ".join(problems))
    ours = model.flamingo_state_dict()
    out = {of_key: ours[our_key].detach().float().cpu().clone() for of_key, our_key in bridge_key_map(model).items()}
    if not frame_embs:
        out.pop("perceiver.frame_embs", None)
    lm = model.lm
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if isinstance(embed, ExtendedEmbedding):
        out[_lm_key(lm, embed)] = _full_matrix(embed.base.weight, embed.new.weight, embed.first_new_id).detach().cpu()
        if isinstance(head, ExtendedLMHead) and head.tied_to is None:
            out[_lm_key(lm, head)] = _full_matrix(head.base.weight, head.new_weight, head.first_new_id).detach().cpu()
    else:
        out[_lm_key(lm, embed)] = embed.weight.detach().float().cpu().clone()
    return _rename_lm_keys(out, lm, to_openflamingo=True)
