"""An open_clip ViT's weights as a transformers ``CLIPVisionModel``, without open_clip.

OpenFlamingo's vision encoder is open_clip's ViT-L-14 (OpenAI weights). The tower maps 1:1 onto
transformers' CLIP vision model, so a checkpoint of it can be used where open_clip cannot be installed:

    conv1 -> embeddings.patch_embedding        class_embedding, positional_embedding -> embeddings.*
    ln_pre -> pre_layrnorm                     ln_post -> post_layernorm
    transformer.resblocks.{i}: ln_1/ln_2 -> layer_norm1/2, attn.in_proj (q|k|v stacked) -> self_attn.q/k/v_proj,
    attn.out_proj -> self_attn.out_proj, mlp.c_fc/c_proj -> mlp.fc1/fc2

Neither the head count nor the activation is in the weights: OpenAI's models use 64-wide heads and
QuickGELU, open_clip's own (e.g. ViT-L-14 laion2b) 64-wide heads and GELU.
"""

from __future__ import annotations

import math
import os
import re

import torch

_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_BLOCK_NAMES = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_NAMES = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias",
}
# Parts of the tower that do not shape the patch tokens (the pooled projection) or of the whole CLIP model.
_IGNORED = ("proj",)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (loaded with ``weights_only=True``, so no code runs)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model_state_dict"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _visual_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's keys, from a bare tower, a whole CLIP model (visual.*) or an OpenFlamingo model (vision_encoder.*)."""
    for prefix in ("visual.", "vision_encoder.", "module.visual."):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            return part
    return dict(state)


def open_clip_to_clip_vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ViT tower state dict -> CLIP vision transformer state dict (``embeddings.*``, ``encoder.*``, ...,
    the keys of transformers' ``CLIPVisionModel``, under ``vision_model.`` before transformers 5); unknown keys raise."""
    visual = _visual_part(state)
    out, unknown = {}, []
    for key, value in visual.items():
        block = _BLOCK.fullmatch(key)
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = value
        elif block and block.group(2) in _BLOCK_NAMES:
            out[f"encoder.layers.{block.group(1)}.{_BLOCK_NAMES[block.group(2)]}"] = value
        elif block and block.group(2) in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if block.group(2).endswith("weight") else "bias"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"encoder.layers.{block.group(1)}.self_attn.{name}.{kind}"] = part.clone()
        elif key not in _IGNORED:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"not a plain open_clip ViT (conv1, class/positional embedding, ln_pre, resblocks, ln_post): "
            f"unsupported keys {sorted(unknown)[:10]}{' ...' if len(unknown) > 10 else ''}"
        )
    missing = [k for k in ("conv1.weight", "positional_embedding", "ln_pre.weight", "ln_post.weight") if k not in visual]
    if missing:
        raise ValueError(f"the open_clip vision state dict lacks {missing}: is it a ViT tower?")
    return out


def clip_vision_from_open_clip(
    state: dict[str, torch.Tensor] | str | os.PathLike,
    *,
    head_width: int = 64,
    quick_gelu: bool = True,
    layer_norm_eps: float = 1e-5,
):
    """A ``CLIPVisionModel`` holding an open_clip ViT's weights (a state dict or a file of one).

    head_width: channels per attention head (64 in every open_clip/OpenAI ViT config); quick_gelu: the
    OpenAI models' activation (OpenFlamingo's ViT-L-14 'openai'); False for GELU.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if not isinstance(state, dict):
        state = read_state_dict(state)
    mapped = open_clip_to_clip_vision_state(state)
    patch = mapped["embeddings.patch_embedding.weight"]
    width, patch_size = patch.shape[0], patch.shape[-1]
    grid = math.isqrt(mapped["embeddings.position_embedding.weight"].shape[0] - 1)
    layers = 1 + max((int(k.split(".")[2]) for k in mapped if k.startswith("encoder.layers.")), default=-1)
    if width % head_width:
        raise ValueError(f"the ViT's width {width} is not a multiple of head_width={head_width}")
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=mapped["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=width // head_width,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="quick_gelu" if quick_gelu else "gelu",
        layer_norm_eps=layer_norm_eps,
    )
    model = CLIPVisionModel(config).eval()
    missing, unexpected = getattr(model, "vision_model", model).load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer, not a weight
    if missing or unexpected:
        raise ValueError(f"open_clip -> CLIP mapping incomplete: missing {missing}, unexpected {unexpected}")
    return model
