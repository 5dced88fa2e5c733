"""Loading the frozen backbones a Flamingo model is built around (objects, local paths or hub names)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import FlamingoConfig
from .vision import VisionEncoder, load_vision_encoder


def load_lm(lm: Any, **kwargs: Any) -> nn.Module:
    """A causal LM: ``lm`` itself if it is a module, else ``AutoModelForCausalLM.from_pretrained(lm, **kwargs)``."""
    if isinstance(lm, nn.Module):
        return lm
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(lm, **kwargs)


def load_backbones(
    config: FlamingoConfig,
    *,
    lm: Any = None,
    vision: Any = None,
    lm_kwargs: dict[str, Any] | None = None,
    vision_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, VisionEncoder]:
    """The LM and vision encoder named by ``config`` (or the given objects/paths instead)."""
    lm = lm if lm is not None else config.lm_name_or_path
    vision = vision if vision is not None else config.vision_name_or_path
    if lm is None or vision is None:
        raise ValueError("the config names no LM / vision encoder path: pass lm= and vision=")
    lm_model = load_lm(lm, **(lm_kwargs or {}))
    encoder = load_vision_encoder(
        vision, config.vision_type, feature_layer=config.vision_feature_layer, post_norm=config.vision_post_norm, **(vision_kwargs or {})
    )
    return lm_model, encoder
