"""Loading the frozen backbones a Flamingo model is built around (objects, local paths or hub names)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import torch
from torch import nn

from ..config import FlamingoConfig
from .sources import load_pretrained
from .vision import VisionEncoder, load_vision_encoder

LM_SIGNATURE_NAME = "lm_signature.json"
_SAMPLES = 16


def load_lm(lm: Any, **kwargs: Any) -> nn.Module:
    """A causal LM: ``lm`` itself if it is a module, else ``AutoModelForCausalLM.from_pretrained(lm, **kwargs)``."""
    if isinstance(lm, nn.Module):
        return lm
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, lm, "lm", **kwargs)


def load_backbones(
    config: FlamingoConfig,
    *,
    lm: Any = None,
    vision: Any = None,
    lm_kwargs: dict[str, Any] | None = None,
    vision_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, VisionEncoder]:
    """The LM and vision encoder named by ``config`` (or the given objects/paths instead); a named LM is loaded in
    ``config.lm_dtype`` unless ``lm_kwargs`` say otherwise."""
    lm = lm if lm is not None else config.lm_name_or_path
    vision = vision if vision is not None else config.vision_name_or_path
    if lm is None or vision is None:
        raise ValueError("the config names no LM / vision encoder path: pass lm= and vision=")
    lm_kwargs = dict(lm_kwargs or {})
    if config.lm_dtype is not None and not isinstance(lm, nn.Module):
        lm_kwargs.setdefault("dtype", getattr(torch, config.lm_dtype))  # the dtype it was built / converted in
    lm_model = load_lm(lm, **lm_kwargs)
    encoder = load_vision_encoder(
        vision, config.vision_type, feature_layer=config.vision_feature_layer, post_norm=config.vision_post_norm,
        keep_cls=config.vision_keep_cls, **(vision_kwargs or {}),
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


def lm_signature(lm: nn.Module, layers: nn.ModuleList) -> dict[str, Any]:
    """What identifies the LM a bridge was trained on: its type, vocabulary rows, width, depth, and a few
    weights of its first decoder layer (frozen whatever else is trained or converted).

    ``layers``: the LM's decoder layers (found by :func:`~flamingo_vlm.modeling.lm.find_decoder_layers`).
    The sample is a handful of strided values, compared with a tolerance, so a checkpoint loaded in
    another dtype (bf16 vs fp32) matches itself and a different LM of the same shapes does not.
    """
    text = lm.config.get_text_config()
    embed = lm.get_input_embeddings()
    rows = getattr(embed, "base", embed).weight.shape[0]  # the LM's own rows, before any new token's
    weight = next(p for p in layers[0].parameters() if p.ndim == 2)
    if hasattr(weight, "full_tensor"):  # a DTensor shard under FSDP (every rank calls this)
        weight = weight.full_tensor()
    flat = weight.detach().float().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES)
    return {
        "model_type": text.model_type,
        "vocab_rows": int(rows),
        "hidden_size": int(text.hidden_size),
        "num_layers": len(layers),
        "weight_sample": [float(x) for x in flat[::step][:_SAMPLES].cpu()],
    }


def signature_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the LM a bridge was saved with and the one given now (empty: the same LM)."""
    problems = [
        f"{key}: saved with {saved[key]!r}, now {current.get(key)!r}"
        for key in ("model_type", "vocab_rows", "hidden_size", "num_layers")
        if key in saved and saved[key] != current.get(key)
    ]
    old, new = saved.get("weight_sample"), current.get("weight_sample")
    if not problems and old and new and (
        len(old) != len(new) or not all(math.isclose(a, b, rel_tol=2e-2, abs_tol=1e-3) for a, b in zip(old, new))
    ):
        problems.append("weights: the first decoder layer's weights differ (another checkpoint of the same shapes)")
    return problems


def write_lm_signature(signature: dict[str, Any], directory: str | os.PathLike) -> None:
    with open(os.path.join(directory, LM_SIGNATURE_NAME), "w") as f:
        json.dump(signature, f, indent=2)


def check_lm_signature(lm: nn.Module, layers: nn.ModuleList, directory: str | os.PathLike) -> None:
    """Refuse an LM other than the one the bridge in ``directory`` was saved with (no record: no check)."""
    path = os.path.join(directory, LM_SIGNATURE_NAME)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f)
    with torch.no_grad():
        problems = signature_differences(saved, lm_signature(lm, layers))
    if problems:
        raise ValueError(
            f"the LM given is not the one this bridge was trained on ({directory!s}):\n  " + "\n  ".join(problems)
            + "\nPass check_lm=False (load_flamingo / FlamingoModel.from_pretrained) if you mean it, e.g. a fine-tuned "
            "LM of the same shapes."
        )
