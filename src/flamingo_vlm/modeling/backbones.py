"""Loading the frozen backbones a Flamingo model is built around (objects, local paths or hub names)."""

from __future__ import annotations

import dataclasses
import os
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


def local_path(name_or_path: str | None) -> str | None:
    """An existing local path made absolute, so a saved config loads from any working directory; a hub
    name (or None) as it is."""
    if name_or_path is not None and os.path.exists(name_or_path):
        return os.path.abspath(name_or_path)
    return name_or_path


def paths_for_saving(config: FlamingoConfig, directory: str | os.PathLike) -> FlamingoConfig:
    """The config as saved in ``directory``: a backbone inside it is named relative to it, so the directory
    can be moved or copied whole; any other path stays absolute."""
    root = os.path.abspath(directory)

    def relative(path: str | None) -> str | None:
        path = local_path(path)
        if path is not None and os.path.isabs(path) and os.path.commonpath([path, root]) == root:
            return os.path.relpath(path, root)
        return path

    return dataclasses.replace(
        config, lm_name_or_path=relative(config.lm_name_or_path), vision_name_or_path=relative(config.vision_name_or_path)
    )


def paths_after_loading(config: FlamingoConfig, directory: str | os.PathLike) -> FlamingoConfig:
    """The config read from ``directory`` with backbone paths saved relative to it made absolute."""

    def resolve(path: str | None) -> str | None:
        if path is not None and not os.path.isabs(path) and os.path.exists(os.path.join(directory, path)):
            return os.path.abspath(os.path.join(directory, path))
        return path

    return dataclasses.replace(
        config, lm_name_or_path=resolve(config.lm_name_or_path), vision_name_or_path=resolve(config.vision_name_or_path)
    )
