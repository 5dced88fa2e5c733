"""IDEFICS checkpoints (transformers' ``IdeficsForVisionText2Text``) -> flamingo_vlm models, and back.

IDEFICS (HuggingFaceM4/idefics-9b, -80b and their -instruct versions) is the open reproduction of Flamingo.
Its parts, and what they become here:

    model.vision_model                 IdeficsVisionTransformer, a copy of CLIP's: a transformers CLIPVisionModel
                                       (same weight names); IDEFICS uses its last hidden state, CLS token included
                                       and without post_layernorm (``vision_keep_cls=True``, ``vision_post_norm=False``)
    model.perceiver_resampler          our PerceiverResampler: q|k|v projections, ReLU feed-forwards
                                       (``resampler_ff_activation="relu"``), optional per-head LayerNorms on queries
                                       and keys (``resampler_qk_norm``), no time embeddings (``max_num_frames=1``,
                                       zero). ``use_resampler=False``: the visual tokens are all the vision features.
    model.gated_cross_attn_layers.k    the gated xattn block before decoder layer ``k * cross_layer_interval``
                                       (``cross_attn_position="first"``): RMSNorm pre-norms (``xattn_norm``), the
                                       LM's head count and a gated MLP as wide as the LM's (``xattn_ff_type="gated"``,
                                       ``xattn_ff_dim``, ``ff_activation`` = its ``hidden_act``), no norm on the
                                       media, optional RMSNorms on queries/keys (``xattn_qk_norm``), tanh gates of
                                       one value or one per channel (``xattn_gate`` from ``alpha_type``)
    model.layers, model.norm,          a transformers LlamaForCausalLM (IDEFICS's decoder is Llama's)
    lm_head, model.embed_tokens
    *.additional_embedding,            the new-token rows (ids ``vocab_size ..``): IDEFICS's decoupled
    lm_head.additional_fc              embedding/linear are our ExtendedEmbedding/ExtendedLMHead
    image_attention_mask (processor)   each token sees the last ``<image>`` at or before it, none before the first
                                       image, and none after an EOS until the next image (the EOS itself still
                                       sees it): ``media_attention="last"``, ``reset_media_after_eos=True``
    prompts (processor)                ``<fake_token_around_image>`` around each run of images:
                                       ``media_wrapper_token``; no end-of-chunk token: ``<end_of_utterance>``
                                       (instruct models) or the EOS is ``end_of_chunk_token``
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import FlamingoConfig
from ..modeling.flamingo import FlamingoModel
from ..modeling.lm import ExtendedEmbedding
from ..modeling.vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocessing,
    _preprocessor_config_file,
    load_vision_encoder,
)
from ..processing import FlamingoProcessor, ImageTransform

IDEFICS_MEDIA_TOKEN = "<image>"
IDEFICS_IMAGE_WRAPPER_TOKEN = "<fake_token_around_image>"
IDEFICS_END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
XATTN_ACTIVATIONS = ("silu", "gelu", "relu")  # IDEFICS hidden_act values our gated feed-forward computes


@dataclass
class IdeficsConversionReport:
    """What converting an IDEFICS model noted beyond the weights themselves."""

    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return list(self.notes)


# ---- reading -----------------------------------------------------------------------------------
def load_idefics_model(source: Any, dtype: torch.dtype | str | None = None) -> nn.Module:
    """An ``IdeficsForVisionText2Text``: ``source`` itself, or ``from_pretrained(source)`` (local path or hub id)."""
    from transformers import IdeficsForVisionText2Text

    if isinstance(source, IdeficsForVisionText2Text):
        return source.eval()
    if isinstance(source, nn.Module):
        raise ValueError(f"expected an IdeficsForVisionText2Text, got {type(source).__name__}")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return IdeficsForVisionText2Text.from_pretrained(source, **kwargs).eval()


def unsupported_options(config) -> list[str]:
    """The IDEFICS config's options the converter cannot express, each named with its value (empty: all fine)."""
    problems = []
    if config.alpha_type not in ("float", "vector"):
        problems.append(f"alpha_type={config.alpha_type!r} (expected 'float' or 'vector')")
    if config.num_hidden_layers % config.cross_layer_interval:
        problems.append(
            f"cross_layer_interval={config.cross_layer_interval} does not divide num_hidden_layers={config.num_hidden_layers} "
            "(IDEFICS itself indexes past its cross-attention layers then)"
        )
    if config.hidden_act not in XATTN_ACTIVATIONS:
        problems.append(f"hidden_act={config.hidden_act!r} (the cross-attention MLP supports {XATTN_ACTIVATIONS})")
    vision = config.vision_config
    for name in ("image_size", "patch_size"):
        if not isinstance(getattr(vision, name), int):
            problems.append(f"vision_config.{name}={getattr(vision, name)!r} (square images only: an int)")
    if config.hidden_size % config.num_attention_heads:
        problems.append(f"hidden_size={config.hidden_size} is not a multiple of num_attention_heads={config.num_attention_heads}")
    return problems


def _notes(config) -> list[str]:
    notes = []
    if config.dropout:
        notes.append(f"dropout={config.dropout}: IDEFICS applies it in training only; the converted bridge has none")
    if not config.freeze_text_layers:
        notes.append("freeze_text_layers=False: IDEFICS's config trains its LM layers; flamingo_vlm keeps the LM frozen")
    return notes


# ---- the backbones ---------------------------------------------------------------------------------
def idefics_lm(idefics: nn.Module) -> nn.Module:
    """IDEFICS's text decoder as a transformers ``LlamaForCausalLM`` (its own vocabulary; the additional rows are the
    bridge's new-token rows), weights copied."""
    from transformers import LlamaConfig

    c = idefics.config
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads, head_dim=c.hidden_size // c.num_attention_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )
    src = idefics.state_dict()
    state = {"model.embed_tokens.weight": src["model.embed_tokens.weight"], "model.norm.weight": src["model.norm.weight"],
             "lm_head.weight": src["lm_head.weight"]}
    for key, value in src.items():
        if key.startswith("model.layers."):
            state[key] = value
    return _llama_from_state(config, state)


def _llama_from_state(config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A LlamaForCausalLM holding ``state`` (its tensors, in their dtype), built without a random initialisation."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        lm = LlamaForCausalLM(config)
    lm.load_state_dict(state, strict=True, assign=True)
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config)  # non-persistent buffers: build them for real
    if config.tie_word_embeddings:
        lm.tie_weights()  # assign=True loaded the two names as two parameters: one again
    return lm.eval()


def idefics_vision(idefics: nn.Module) -> nn.Module:
    """IDEFICS's vision transformer as a transformers ``CLIPVisionModel`` (the same module, weight for weight)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    v = idefics.config.vision_config
    config = CLIPVisionConfig(
        hidden_size=v.embed_dim, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, num_channels=v.num_channels, image_size=v.image_size,
        patch_size=v.patch_size, hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps,
    )
    src = idefics.model.vision_model.state_dict()
    model = CLIPVisionModel(config).to(next(idefics.model.vision_model.parameters()).dtype).eval()
    missing, unexpected = getattr(model, "vision_model", model).load_state_dict(src, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer, not a weight
    if missing or unexpected:
        raise ValueError(f"IDEFICS vision transformer -> CLIP mapping incomplete: missing {missing}, unexpected {unexpected}")
    return model


# ---- key mapping (shared by load and export) -----------------------------------------------------
def bridge_key_map(config: FlamingoConfig, num_blocks: int, tied: bool = False) -> dict[str, tuple[str, ...]]:
    """flamingo_state_dict key -> the IDEFICS state-dict keys it is made of (two: concatenated along dim 0).
    tied: the LM ties its embeddings (``tie_word_embeddings``)."""
    mapping: dict[str, tuple[str, ...]] = {}
    if config.use_resampler:
        p = "model.perceiver_resampler."
        mapping["resampler.latents"] = (p + "latents",)
        for kind in ("weight", "bias"):
            mapping[f"resampler.norm.{kind}"] = (f"{p}layer_norm.{kind}",)
        for i in range(config.resampler_depth):
            a, f = f"{p}blocks.{i}.0.", f"{p}blocks.{i}.1."
            ours_a, ours_f = f"resampler.layers.{i}.0.", f"resampler.layers.{i}.1."
            for kind in ("weight", "bias"):
                mapping[ours_a + f"norm_media.{kind}"] = (a + f"context_layer_norm.{kind}",)
                mapping[ours_a + f"norm_latents.{kind}"] = (a + f"latents_layer_norm.{kind}",)
                mapping[ours_f + f"0.{kind}"] = (f + f"ln.{kind}",)
                if config.resampler_qk_norm:
                    mapping[ours_a + f"q_norm.{kind}"] = (a + f"q_layer_norm.{kind}",)
                    mapping[ours_a + f"k_norm.{kind}"] = (a + f"k_layer_norm.{kind}",)
            mapping[ours_a + "to_q.weight"] = (a + "q_proj.weight",)
            mapping[ours_a + "to_kv.weight"] = (a + "k_proj.weight", a + "v_proj.weight")
            mapping[ours_a + "to_out.weight"] = (a + "output_proj.weight",)
            mapping[ours_f + "1.weight"] = (f + "fc.weight",)
            mapping[ours_f + "3.weight"] = (f + "c_proj.weight",)
    for k in range(num_blocks):
        x, ours = f"model.gated_cross_attn_layers.{k}.", f"xattn.{k}."
        mapping[ours + "attn_gate"] = (x + "alpha_cross_attn",)
        mapping[ours + "ff_gate"] = (x + "alpha_dense",)
        mapping[ours + "attn.norm.weight"] = (x + "input_layernorm.weight",)
        mapping[ours + "attn.to_q.weight"] = (x + "cross_attn.q_proj.weight",)
        mapping[ours + "attn.to_kv.weight"] = (x + "cross_attn.k_proj.weight", x + "cross_attn.v_proj.weight")
        mapping[ours + "attn.to_out.weight"] = (x + "cross_attn.o_proj.weight",)
        if config.xattn_qk_norm:
            mapping[ours + "attn.q_norm.weight"] = (x + "cross_attn.q_layer_norm.weight",)
            mapping[ours + "attn.k_norm.weight"] = (x + "cross_attn.k_layer_norm.weight",)
        mapping[ours + "ff.norm.weight"] = (x + "post_attention_layernorm.weight",)
        for name in ("gate", "up", "down"):
            mapping[ours + f"ff.{name}.weight"] = (x + f"mlp.{name}_proj.weight",)
    if config.new_token_ids:
        mapping["new_token_embeddings.weight"] = ("model.embed_tokens.additional_embedding.weight",)
        if not tied:  # tied: IDEFICS's additional_fc is its additional_embedding, as our head's new rows are
            mapping["new_token_lm_head.weight"] = ("lm_head.additional_fc.weight",)
    return mapping


def _ties_embeddings(model: FlamingoModel) -> bool:
    """Whether the LM's head shares its input embedding (then the new tokens' output rows are their input rows)."""
    return "new_token_lm_head.weight" not in model.flamingo_state_dict()


# ---- tokenizer -------------------------------------------------------------------------------------
def _token_ids(tokenizer, c) -> dict[str, Any]:
    """The special tokens of the converted model, checked against IDEFICS's vocabulary (``vocab_size`` rows plus
    ``additional_vocab_size`` decoupled rows)."""
    vocab = tokenizer.get_vocab()
    rows = c.vocab_size + c.additional_vocab_size
    if IDEFICS_MEDIA_TOKEN not in vocab:
        raise ValueError(f"the tokenizer has no {IDEFICS_MEDIA_TOKEN!r} token: is it IDEFICS's tokenizer?")
    media_id = vocab[IDEFICS_MEDIA_TOKEN]
    if media_id >= rows:
        raise ValueError(
            f"the tokenizer's {IDEFICS_MEDIA_TOKEN} id {media_id} is past the model's {rows} embedding rows "
            f"(vocab_size={c.vocab_size} + additional_vocab_size={c.additional_vocab_size}): wrong tokenizer"
        )
    # IDEFICS has no end-of-chunk token: the instruct models end a turn with <end_of_utterance>, the base ones with EOS
    end = IDEFICS_END_OF_UTTERANCE_TOKEN if vocab.get(IDEFICS_END_OF_UTTERANCE_TOKEN, rows) < rows else tokenizer.eos_token
    if end is None:
        raise ValueError("the tokenizer has neither <end_of_utterance> (within the model's rows) nor an EOS token")
    pad = tokenizer.pad_token if tokenizer.pad_token is not None else tokenizer.unk_token  # IDEFICS pads with <unk>
    if pad is None:
        raise ValueError("the tokenizer has no pad (or unk) token to pad batches with")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = pad
    wrapper = IDEFICS_IMAGE_WRAPPER_TOKEN if IDEFICS_IMAGE_WRAPPER_TOKEN in vocab else None
    return dict(
        media_token=IDEFICS_MEDIA_TOKEN, end_of_chunk_token=end, pad_token=pad, media_wrapper_token=wrapper,
        new_token_ids=list(range(c.vocab_size, rows)), media_token_id=media_id,
        end_of_chunk_token_id=tokenizer.convert_tokens_to_ids(end), pad_token_id=tokenizer.convert_tokens_to_ids(pad),
        eos_token_id=tokenizer.eos_token_id,
    )


def _load_tokenizer(tokenizer: Any, source: Any):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = tokenizer if tokenizer is not None else source if isinstance(source, (str, os.PathLike)) else None
    if path is None:
        raise ValueError("the IDEFICS model was passed as an object: pass tokenizer= (its tokenizer or a path to it)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def idefics_image_preprocessing(source: Any, image_size: int) -> ImagePreprocessing:
    """What IDEFICS's image processor computes: the whole image squashed to ``image_size`` x ``image_size``
    (bicubic, no crop; torchvision-backed, as transformers 5 loads ``IdeficsImageProcessor``), normalised with
    the mean/std of ``source``'s preprocessor_config.json (a local directory or hub id), else its defaults."""
    file = _preprocessor_config_file(source) if isinstance(source, (str, os.PathLike)) else None
    data = json.loads(Path(file).read_text()) if file else {}
    mean, std = data.get("image_mean", OPENAI_CLIP_MEAN), data.get("image_std", OPENAI_CLIP_STD)
    return ImagePreprocessing(
        image_size=image_size, image_mean=tuple(mean), image_std=tuple(std), resize="squash", resample="bicubic",
        crop_offset="floor", resize_backend="pil" if str(data.get("image_processor_type", "")).endswith("Pil") else "torch",
    )


def _preprocessor_config(pre: ImagePreprocessing) -> dict[str, Any]:
    """A preprocessor_config.json that :meth:`ImagePreprocessing.from_preprocessor_config` reads back as ``pre``
    (squash resize, no crop)."""
    return {
        "image_processor_type": "IdeficsImageProcessor" + ("Pil" if pre.resize_backend == "pil" else ""),
        "size": {"height": pre.image_size, "width": pre.image_size}, "do_center_crop": False, "do_resize": True,
        "resample": 3 if pre.resample == "bicubic" else 2, "image_mean": list(pre.image_mean), "image_std": list(pre.image_std),
    }


# ---- load ----------------------------------------------------------------------------------------
def flamingo_config_for(idefics_config, tokens: dict[str, Any], **fields: Any) -> FlamingoConfig:
    """The FlamingoConfig that computes what an IdeficsConfig describes (``tokens``: see :func:`_token_ids`)."""
    c, p = idefics_config, idefics_config.perceiver_config
    return FlamingoConfig(
        vision_type="clip", vision_keep_cls=True, vision_post_norm=False, vision_feature_layer=-1,
        decoder_layers_attr="model.layers",
        use_resampler=bool(c.use_resampler), resampler_depth=p.resampler_depth, resampler_num_latents=p.resampler_n_latents,
        resampler_heads=p.resampler_n_heads, resampler_dim_head=p.resampler_head_dim, resampler_ff_mult=4,
        resampler_ff_activation="relu", resampler_qk_norm=bool(p.qk_layer_norms_perceiver), max_num_frames=1,
        cross_attn_every_n_layers=c.cross_layer_interval, cross_attn_position="first",
        xattn_heads=c.num_attention_heads, xattn_dim_head=c.hidden_size // c.num_attention_heads,
        xattn_norm="rms_norm", xattn_norm_eps=c.rms_norm_eps, xattn_norm_media=False, xattn_qk_norm=bool(c.qk_layer_norms),
        xattn_ff_type="gated", xattn_ff_dim=c.intermediate_size, ff_activation=c.hidden_act,
        xattn_gate="vector" if c.alpha_type == "vector" else "scalar",
        media_attention="last", reset_media_after_eos=True,
        **tokens, **fields,
    )


def load_idefics_weights(model: FlamingoModel, idefics: nn.Module) -> None:
    """Copy an IDEFICS model's bridge (perceiver, gated cross-attention layers, additional token rows) into ``model``."""
    src = idefics.state_dict()
    ours = model.flamingo_state_dict()
    mapping = bridge_key_map(model.config, len(model.xattn_blocks), _ties_embeddings(model))
    missing = sorted({k for keys in mapping.values() for k in keys if k not in src})
    unmapped = sorted(set(ours) - set(mapping) - {"resampler.time_embeddings"})
    if missing or unmapped:
        raise ValueError(f"IDEFICS -> flamingo_vlm mapping incomplete: IDEFICS keys missing {missing[:10]}, ours unmapped {unmapped[:10]}")
    state = {}
    for key, parts in mapping.items():
        value = torch.cat([src[k] for k in parts], dim=0) if len(parts) > 1 else src[parts[0]]
        state[key] = value.reshape(ours[key].shape)  # the gates: IDEFICS's [1, 1, d] is our [d]
    if "resampler.time_embeddings" in ours:
        state["resampler.time_embeddings"] = torch.zeros_like(ours["resampler.time_embeddings"])  # IDEFICS has none
    model.load_flamingo_state_dict(state)
    model._set_trainable()


def load_idefics(
    source: Any,
    tokenizer: Any = None,
    *,
    dtype: torch.dtype | str | None = None,
) -> tuple[FlamingoModel, FlamingoProcessor, IdeficsConversionReport]:
    """A flamingo_vlm model (and processor) computing what an ``IdeficsForVisionText2Text`` computes.

    source: the IDEFICS model, or a local path or hub id of one (``HuggingFaceM4/idefics-9b``); tokenizer: its
    tokenizer (object or path; default: ``source``'s; given no pad token, it pads with its unk token as IDEFICS
    does); dtype: of the loaded checkpoint (``"auto"``: its own). The LM becomes a ``LlamaForCausalLM`` and the vision
    tower a ``CLIPVisionModel``, both in memory: :func:`save_idefics_conversion` writes all of it to a directory.
    Raises, naming them, for IDEFICS options it cannot express (see :func:`unsupported_options`).
    """
    idefics = load_idefics_model(source, dtype)
    c = idefics.config
    problems = unsupported_options(c)
    if problems:
        raise ValueError("this IDEFICS model uses options the converter does not support:\n  " + "\n  ".join(problems))
    tokenizer = _load_tokenizer(tokenizer, source)
    tokens = _token_ids(tokenizer, c)
    lm, vision = idefics_lm(idefics), idefics_vision(idefics)
    encoder = load_vision_encoder(vision, "clip", post_norm=False, keep_cls=True)
    encoder.preprocessing = idefics_image_preprocessing(source, int(c.vision_config.image_size))
    config = flamingo_config_for(c, tokens)
    model = FlamingoModel(config, lm, encoder)  # the bridge in fp32, as trained weights are kept here
    load_idefics_weights(model, idefics)
    processor = FlamingoProcessor(
        tokenizer, ImageTransform.for_encoder(encoder), media_token=IDEFICS_MEDIA_TOKEN, end_of_chunk_token=config.end_of_chunk_token,
        media_wrapper_token=config.media_wrapper_token,
    )
    return model, processor, IdeficsConversionReport(_notes(c))


def save_idefics_conversion(model: FlamingoModel, processor: FlamingoProcessor, out: str | os.PathLike) -> None:
    """Write a converted model as a self-contained directory: the Llama LM under ``lm/``, the CLIP vision tower (and
    its preprocessor_config.json) under ``vision/``, the bridge, config and processor at the top. ``model.config``
    is updated to name those backbone directories."""
    import dataclasses

    out = Path(out)
    lm_dir, vision_dir = out / "lm", out / "vision"
    _save_plain_lm(model.lm, lm_dir)
    processor.tokenizer.save_pretrained(lm_dir)
    vision = model.vision_encoder.model
    vision.save_pretrained(vision_dir)
    (vision_dir / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(model.vision_encoder.preprocessing), indent=2))
    model.config = dataclasses.replace(model.config, lm_name_or_path=str(lm_dir.resolve()), vision_name_or_path=str(vision_dir.resolve()))
    model.save_pretrained(out)
    processor.save_pretrained(out)


def plain_lm_state(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The wrapped LM's own weights under its plain names (the new-token rows and the xattn blocks are the bridge's)."""
    state = {}
    for name, tensor in lm.state_dict().items():
        if ".gated_xattn." in name or name.endswith(("new.weight", "new_weight")):
            continue
        state[name.replace(".decoder_layer.", ".").replace(".base.", ".")] = tensor
    return state


def _save_plain_lm(lm: nn.Module, directory: Path) -> None:
    """Save the wrapped LM as the plain LlamaForCausalLM it was built from."""
    config = lm.config.__class__.from_dict(lm.config.to_dict())
    embed = lm.get_input_embeddings()
    config.vocab_size = (embed.base if isinstance(embed, ExtendedEmbedding) else embed).weight.shape[0]
    _llama_from_state(config, plain_lm_state(lm)).save_pretrained(directory)


def convert_idefics(
    source: Any, out: str | os.PathLike, tokenizer: Any = None, *, dtype: torch.dtype | str | None = None
) -> tuple[FlamingoModel, FlamingoProcessor, IdeficsConversionReport]:
    """:func:`load_idefics` then :func:`save_idefics_conversion`: a directory ``load_flamingo`` reads, and
    ``flamingo eval`` / ``flamingo serve`` run, as any other."""
    model, processor, report = load_idefics(source, tokenizer, dtype=dtype)
    save_idefics_conversion(model, processor, out)
    return model, processor, report


# ---- export --------------------------------------------------------------------------------------
def export_problems(model: FlamingoModel) -> list[str]:
    """Why IdeficsForVisionText2Text cannot compute this model, one reason per option (empty: it can)."""
    c, problems = model.config, []
    lm_config = model.lm.config.get_text_config()
    if lm_config.model_type != "llama":
        return [f"the LM is a {lm_config.model_type!r} model: IDEFICS's decoder is Llama's"]
    heads, hidden = lm_config.num_attention_heads, lm_config.hidden_size
    if getattr(lm_config, "num_key_value_heads", heads) != heads:
        problems.append(f"the LM has {lm_config.num_key_value_heads} key/value heads for {heads} heads: IDEFICS has no grouped-query attention")
    if getattr(lm_config, "attention_bias", False) or getattr(lm_config, "mlp_bias", False):
        problems.append("the LM has attention or MLP biases, which IDEFICS's decoder lacks")
    if getattr(lm_config, "head_dim", hidden // heads) != hidden // heads:
        problems.append(f"the LM's head_dim={lm_config.head_dim} is not hidden_size / heads = {hidden // heads}")
    if c.vision_type != "clip" or not c.vision_keep_cls or c.vision_post_norm or c.vision_feature_layer != -1:
        problems.append(
            "IDEFICS's vision features are a CLIP ViT's last hidden state with the CLS token and no post-norm: needs "
            f"vision_type='clip', vision_keep_cls=True, vision_post_norm False, vision_feature_layer=-1 (have {c.vision_type!r}, "
            f"{c.vision_keep_cls}, {c.vision_post_norm}, {c.vision_feature_layer})"
        )
    wanted = dict(
        xattn_norm="rms_norm", xattn_norm_eps=lm_config.rms_norm_eps, xattn_norm_media=False, xattn_ff_type="gated",
        xattn_ff_dim=lm_config.intermediate_size, ff_activation=lm_config.hidden_act, xattn_heads=heads,
        xattn_dim_head=hidden // heads, cross_attn_position="first", media_attention="last", reset_media_after_eos=True,
        reset_media_at_eos=False,
    )
    for name, value in wanted.items():
        if getattr(c, name) != value:
            problems.append(f"{name}={getattr(c, name)!r}: IDEFICS's is {value!r}")
    num_layers = lm_config.num_hidden_layers
    if num_layers % c.cross_attn_every_n_layers:
        problems.append(f"cross_attn_every_n_layers={c.cross_attn_every_n_layers} does not divide the LM's {num_layers} layers")
    if c.use_resampler:
        if (c.resampler_ff_activation or c.ff_activation) != "relu" or c.resampler_ff_mult != 4:
            problems.append("IDEFICS's perceiver feed-forwards are ReLU, 4x wide: needs resampler_ff_activation='relu', resampler_ff_mult=4")
        if c.resampler_spatial_positions:
            problems.append("resampler_spatial_positions: IDEFICS's perceiver has no spatial position embeddings")
        if bool(model.resampler.time_embeddings.detach().ne(0).any()):
            problems.append("the resampler's time embeddings are nonzero: IDEFICS's perceiver has none")
    embed = model.lm.get_input_embeddings()
    base_rows = (embed.base if isinstance(embed, ExtendedEmbedding) else embed).weight.shape[0]
    if c.new_token_ids and c.new_token_ids[0] != base_rows:
        problems.append(
            f"the new tokens start at id {c.new_token_ids[0]}, not after the LM's {base_rows} rows: IDEFICS's additional "
            "vocabulary follows its own"
        )
    return problems


def idefics_config_for(model: FlamingoModel):
    """The IdeficsConfig of a model :func:`export_problems` finds nothing against."""
    from transformers import IdeficsConfig

    c, lm = model.config, model.lm.config.get_text_config()
    vision = model.vision_encoder.model.config
    embed = model.lm.get_input_embeddings()
    return IdeficsConfig(
        vocab_size=(embed.base if isinstance(embed, ExtendedEmbedding) else embed).weight.shape[0],
        additional_vocab_size=len(c.new_token_ids), hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_hidden_layers, num_attention_heads=lm.num_attention_heads, dropout=0.0,
        hidden_act=lm.hidden_act, rms_norm_eps=lm.rms_norm_eps, max_position_embeddings=lm.max_position_embeddings,
        rope_parameters=dict(lm.rope_parameters), tie_word_embeddings=bool(lm.tie_word_embeddings),
        pad_token_id=c.pad_token_id, bos_token_id=lm.bos_token_id, eos_token_id=c.eos_token_id,
        cross_layer_interval=c.cross_attn_every_n_layers, qk_layer_norms=c.xattn_qk_norm, use_resampler=c.use_resampler,
        alpha_type="vector" if c.xattn_gate == "vector" else "float",
        vision_config=dict(
            embed_dim=vision.hidden_size, image_size=vision.image_size, intermediate_size=vision.intermediate_size,
            patch_size=vision.patch_size, num_hidden_layers=vision.num_hidden_layers,
            num_attention_heads=vision.num_attention_heads, num_channels=vision.num_channels, hidden_act=vision.hidden_act,
            layer_norm_eps=vision.layer_norm_eps,
        ),
        perceiver_config=dict(
            use_resampler=c.use_resampler, resampler_n_latents=c.resampler_num_latents, resampler_depth=c.resampler_depth,
            resampler_n_heads=c.resampler_heads, resampler_head_dim=c.resampler_dim_head,
            qk_layer_norms_perceiver=c.resampler_qk_norm,
        ),
    )


def export_idefics(model: FlamingoModel) -> nn.Module:
    """An ``IdeficsForVisionText2Text`` computing what ``model`` computes (fp32); raises, naming every option
    IDEFICS cannot express (:func:`export_problems`)."""
    from transformers import IdeficsForVisionText2Text

    problems = export_problems(model)
    if problems:
        raise ValueError("this model cannot be expressed as an IdeficsForVisionText2Text:\n  " + "\n  ".join(problems))
    idefics = IdeficsForVisionText2Text(idefics_config_for(model)).eval()
    target = idefics.state_dict()
    state = {k: v.detach().float() for k, v in plain_lm_state(model.lm).items()}
    vision = model.vision_encoder.model
    state.update({f"model.vision_model.{k}": v.float() for k, v in getattr(vision, "vision_model", vision).state_dict().items()})
    ours = model.flamingo_state_dict()
    for our_key, parts in bridge_key_map(model.config, len(model.xattn_blocks), _ties_embeddings(model)).items():
        values = ours[our_key].detach().float().chunk(len(parts), dim=0)
        for key, value in zip(parts, values):
            state[key] = value.reshape(target[key].shape)
    if _ties_embeddings(model) and model.config.new_token_ids:  # one tensor under both of IDEFICS's names
        state["lm_head.additional_fc.weight"] = state["model.embed_tokens.additional_embedding.weight"]
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"flamingo_vlm -> IDEFICS mapping incomplete: missing {missing[:10]}, unexpected {unexpected[:10]}")
    idefics.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    return idefics


def idefics_processor(model: FlamingoModel, processor: FlamingoProcessor):
    """transformers' ``IdeficsProcessor`` for an exported model: its tokenizer, and an ``IdeficsImageProcessor``
    of the vision encoder's size, mean and std."""
    from transformers import IdeficsImageProcessor, IdeficsProcessor

    pre = model.vision_encoder.preprocessing
    image_processor = IdeficsImageProcessor(image_size=pre.image_size, image_mean=list(pre.image_mean), image_std=list(pre.image_std))
    return IdeficsProcessor(image_processor, processor.tokenizer)
