"""FlamingoConfig: every architectural choice of the bridge, saved next to its weights."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from .yaml_config import unknown_keys_error

CONFIG_NAME = "flamingo_config.json"

MEDIA_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"

Activation = Literal["squared_relu", "gelu", "silu", "relu"]
ACTIVATIONS = ("squared_relu", "gelu", "silu", "relu")


# Keys that configs saved by earlier versions hold and this one derives from the backbones instead
# (``FlamingoModel.lm_hidden_size``, ``vision_encoder.hidden_size``): dropped when such a config is loaded.
_LEGACY_KEYS = frozenset({"lm_hidden_size", "vision_hidden_size"})


@dataclass(frozen=True)
class FlamingoConfig:
    """Configuration of a Flamingo model: the backbones it names and the bridge it trains.

    Frozen: it describes the architecture, and a model's config is the one it was built from. Builders
    work out the backbone-dependent fields (token ids, backbone paths) first and construct it once, or
    derive a new one with ``dataclasses.replace`` before building the model.

    Defaults follow the paper (arXiv 2204.14198, appendix A.1.1 and Table 4) where it is specific.
    """

    # Backbones: a local path or hub name that ``from_pretrained`` of the backbone accepts.
    lm_name_or_path: str | None = None
    vision_name_or_path: str | None = None
    # "clip" | "siglip" | "open_clip" | "timm" (see flamingo_vlm.modeling.vision).
    vision_type: str = "clip"
    # Which hidden state of the vision encoder to use (-1: last) and whether to drop its CLS token.
    vision_feature_layer: int = -1
    # Apply the encoder's final LayerNorm (CLIP post_layernorm, open_clip ln_post) to the patch tokens:
    # None keeps the adapter's native output (see flamingo_vlm.modeling.vision.VisionEncoder.set_post_norm).
    vision_post_norm: bool | None = None
    # Keep the encoder's CLS token among the features (IDEFICS: every token of the last hidden state); CLIP only.
    vision_keep_cls: bool = False
    # Dotted path to the LM's ModuleList of decoder layers; found structurally when None.
    decoder_layers_attr: str | None = None

    # Perceiver Resampler (appendix A.1.1): 6 layers, 64 latents. False: no resampler, the visual tokens of a
    # medium are all its vision features [T * S, d] (IDEFICS's use_resampler=False).
    use_resampler: bool = True
    resampler_depth: int = 6
    resampler_num_latents: int = 64
    resampler_heads: int = 8
    resampler_dim_head: int = 64
    resampler_ff_mult: int = 4
    # Feed-forward activation of the resampler; None: ff_activation (IDEFICS's perceiver: "relu").
    resampler_ff_activation: Activation | None = None
    # LayerNorm on each head's queries and keys in the resampler's attention (IDEFICS qk_layer_norms_perceiver).
    resampler_qk_norm: bool = False
    # Number of learned time embeddings (frames seen in training); longer videos interpolate them.
    max_num_frames: int = 8
    # Learned spatial position embeddings, one per vision feature of a frame (0: none, as in the paper);
    # a square count is taken as a row-major grid and starts from 2-D sine-cosine codes.
    resampler_spatial_positions: int = 0

    # GATED XATTN-DENSE (section 2.2).
    cross_attn_every_n_layers: int = 1
    # Which layer of each group of n gets the block before it: "last" (layers n-1, 2n-1, ...: OpenFlamingo)
    # or "first" (layers 0, n, 2n, ...: IDEFICS's cross_layer_interval).
    cross_attn_position: Literal["last", "first"] = "last"
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    xattn_ff_mult: int = 4
    # LayerNorm on the visual key/value inputs of each cross-attention (paper v1); off for OpenFlamingo.
    xattn_norm_media: bool = True
    # "squared_relu" (paper), "gelu" (OpenFlamingo), "silu" (IDEFICS's gated feed-forward) or "relu".
    ff_activation: Activation = "squared_relu"
    # The normalisation before the cross-attention and the feed-forward: "layer_norm" (paper) or "rms_norm"
    # (IDEFICS), with this epsilon; also used for the query/key norms.
    xattn_norm: Literal["layer_norm", "rms_norm"] = "layer_norm"
    xattn_norm_eps: float = 1e-5
    # Normalise each head's queries and media keys in the cross-attention (IDEFICS qk_layer_norms).
    xattn_qk_norm: bool = False
    # "mlp": Linear -> act -> Linear (paper); "gated": down(act(gate(x)) * up(x)) (IDEFICS, as its LM's MLP).
    xattn_ff_type: Literal["mlp", "gated"] = "mlp"
    # Inner width of the xattn feed-forward; None: xattn_ff_mult * LM hidden size.
    xattn_ff_dim: int | None = None
    # Each tanh gate is one scalar (paper) or one value per hidden channel (IDEFICS alpha_type="vector").
    xattn_gate: Literal["scalar", "vector"] = "scalar"
    # Gates are tanh(alpha); "zeros" makes the model equal to the LM at initialisation.
    gate_init: Literal["zeros", "normal"] = "zeros"
    gate_init_std: float = 0.02

    # Masking (section 2.3): "last" = each token sees only the immediately preceding image (phi);
    # "all" = every previous image (the paper's ablation).
    media_attention: Literal["last", "all"] = "last"
    # Packed sequences: tokens after an EOS see no image of the previous document.
    reset_media_at_eos: bool = False
    # As reset_media_at_eos, but the EOS token itself still sees its document's image; the tokens after it
    # see none until the next image (IDEFICS's image_attention_mask rule).
    reset_media_after_eos: bool = False

    # Special tokens added to the LM's tokenizer; the builder sets their ids from the tokenizer.
    media_token: str = MEDIA_TOKEN
    end_of_chunk_token: str = END_OF_CHUNK_TOKEN
    pad_token: str = PAD_TOKEN
    # A token the processor writes around each run of media (IDEFICS: "<fake_token_around_image>"); None: none.
    media_wrapper_token: str | None = None
    # A tuple, so that the frozen config cannot change through it either (a list is accepted and converted).
    new_token_ids: tuple[int, ...] = ()
    # Logits end at the last new token, i.e. the tokenizer's length (OpenFlamingo resizes the LM's embeddings
    # to its tokenizer, dropping unused padding rows such as MPT's); False keeps every LM-head column.
    truncate_vocab: bool = False
    # The LM's own embedding / LM-head rows differ from its checkpoint's (an OpenFlamingo checkpoint may have
    # trained them): they are saved with the bridge and loaded over the LM's. They stay frozen.
    save_lm_embeddings: bool = False
    media_token_id: int | None = None
    end_of_chunk_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    # The dtype the LM named by lm_name_or_path is loaded in (None: transformers' default, the checkpoint's own).
    # ``flamingo convert openflamingo --dtype`` records its choice here, so the model reloads as converted.
    lm_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # Fine-tuning (paper section 3.2; flamingo_vlm.modeling.finetune): backbone weights trained and saved with
    # the bridge. The vision encoder's last n blocks (-1: all of it), the LM's last n decoder layers, and LoRA
    # adapters (peft) of this rank on the LM's decoder layers (target modules: () = peft's default for the LM).
    train_vision_blocks: int = 0
    train_lm_layers: int = 0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ()
    # The vision encoder's input size (None: its own); position embeddings interpolated (CLIP/SigLIP).
    vision_image_size: int | None = None

    def __post_init__(self) -> None:
        # a frozen dataclass sets its own fields only through object.__setattr__
        object.__setattr__(self, "new_token_ids", tuple(int(i) for i in self.new_token_ids))
        object.__setattr__(self, "lora_target_modules", tuple(str(m) for m in self.lora_target_modules))
        if self.media_attention not in ("last", "all"):
            raise ValueError(f"media_attention must be 'last' or 'all', got {self.media_attention!r}")
        for name in ("ff_activation", "resampler_ff_activation"):
            value = getattr(self, name)
            if value not in ACTIVATIONS and not (value is None and name == "resampler_ff_activation"):
                raise ValueError(f"{name} must be 'squared_relu', 'gelu', 'silu' or 'relu', got {value!r}")
        choices = dict(
            cross_attn_position=("last", "first"), xattn_norm=("layer_norm", "rms_norm"), xattn_ff_type=("mlp", "gated"),
            xattn_gate=("scalar", "vector"),
        )
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.xattn_ff_dim is not None and self.xattn_ff_dim < 1:
            raise ValueError(f"xattn_ff_dim must be >= 1 (or None), got {self.xattn_ff_dim}")
        if self.reset_media_at_eos and self.reset_media_after_eos:
            raise ValueError("set one of reset_media_at_eos (the EOS sees no image) and reset_media_after_eos (it does)")
        if self.gate_init not in ("zeros", "normal"):
            raise ValueError(f"gate_init must be 'zeros' or 'normal', got {self.gate_init!r}")
        if self.cross_attn_every_n_layers < 1:
            raise ValueError("cross_attn_every_n_layers must be >= 1")
        if self.resampler_spatial_positions < 0:
            raise ValueError(f"resampler_spatial_positions must be >= 0, got {self.resampler_spatial_positions}")
        for name in ("resampler_depth", "resampler_num_latents", "resampler_heads", "xattn_heads", "max_num_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_vision_blocks < -1 or self.train_lm_layers < 0:
            raise ValueError(
                f"train_vision_blocks must be -1 (all), 0 (none) or n (the last n blocks) and train_lm_layers >= 0, got "
                f"{self.train_vision_blocks} and {self.train_lm_layers}"
            )
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoRA needs rank >= 0, alpha > 0, 0 <= dropout < 1; got {self.lora_rank}, {self.lora_alpha}, {self.lora_dropout}")
        if self.vision_image_size is not None and self.vision_image_size < 1:
            raise ValueError(f"vision_image_size must be >= 1 (or None), got {self.vision_image_size}")
        if self.lm_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"lm_dtype must be 'float32', 'bfloat16', 'float16' or None, got {self.lm_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FlamingoConfig":
        """A config from :meth:`to_dict`'s output (or a saved JSON's); keys it does not have are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - _LEGACY_KEYS)
        if unknown:
            raise unknown_keys_error(cls, unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FlamingoConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s}: is it a flamingo_vlm save_pretrained directory?")
        with open(path) as f:
            return cls.from_dict(json.load(f))
