"""Vision adapters: a frozen encoder that turns images [N, C, H, W] into features [N, S, d], and the
facts about its input (size, mean, std) that preprocessing needs (:class:`ImagePreprocessing`).

Registry: ``clip`` and ``siglip`` (Hugging Face transformers), ``open_clip`` and ``timm`` (optional
extras: ``pip install flamingo-vlm[open_clip]`` / ``[timm]``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .sources import check_backbone_source, load_vision_tower

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocessing:
    """What an encoder expects of its input: square images of ``image_size`` px, scaled to [0, 1] and
    normalised per channel with ``image_mean`` / ``image_std``. Plain data: the transform that applies it
    is :class:`flamingo_vlm.processing.ImageTransform` (``ImageTransform.for_encoder(encoder)``)."""

    image_size: int = 224
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_preprocessor_config(cls, path: str | os.PathLike, default_size: int, default_mean, default_std) -> "ImagePreprocessing":
        """Read size/mean/std from a Hugging Face ``preprocessor_config.json`` when the directory has one."""
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            return cls(int(default_size), tuple(default_mean), tuple(default_std))
        data = json.loads(file.read_text())
        size = data.get("crop_size") or data.get("size") or default_size
        if isinstance(size, dict):
            size = size.get("height") or size.get("shortest_edge") or default_size
        return cls(int(size), tuple(data.get("image_mean", default_mean)), tuple(data.get("image_std", default_std)))


class VisionEncoder(nn.Module):
    """Frozen image encoder: pixel_values [N, C, H, W] -> features [N, S, hidden_size].

    ``preprocessing`` says what the pixels must be (size, mean, std); processing builds the transform.
    """

    hidden_size: int
    preprocessing: ImagePreprocessing
    name_or_path: str | None = None
    vision_type: str = ""

    def set_post_norm(self, post_norm: bool) -> None:
        """Whether the features get the encoder's final LayerNorm (CLIP ``post_layernorm``, open_clip ``ln_post``).

        Encoders disagree: transformers' CLIP leaves it off the patch tokens, open_clip applies it to them
        since 2.23.0 (before, only to the pooled token), and OpenFlamingo's released models were trained
        without it. Adapters that cannot choose raise.
        """
        raise ValueError(f"the {self.vision_type or type(self).__name__} vision adapter cannot set post_norm={post_norm}")


class HFVisionEncoder(VisionEncoder):
    """A transformers ``CLIPVisionModel`` / ``SiglipVisionModel``; patch tokens of one hidden layer.

    CLIP's CLS token is dropped (the paper flattens the feature map; OpenFlamingo uses patch tokens too).
    """

    def __init__(self, model: nn.Module, preprocessing: ImagePreprocessing, *, feature_layer: int = -1, vision_type: str = "clip", name_or_path: str | None = None):
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.feature_layer = feature_layer
        self.hidden_size = model.config.hidden_size
        self.vision_type = vision_type
        self.name_or_path = name_or_path
        self.drop_cls = vision_type == "clip"
        self.post_norm: nn.Module | None = None

    def set_post_norm(self, post_norm: bool) -> None:
        native = self.vision_type == "siglip" and self.feature_layer == -1  # SigLIP's last_hidden_state is normed
        if native and not post_norm:
            super().set_post_norm(post_norm)
        self.post_norm = getattr(self.model, "vision_model", self.model).post_layernorm if post_norm and not native else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        want_hidden = self.feature_layer != -1
        out = self.model(pixel_values=pixel_values, output_hidden_states=want_hidden)
        features = out.hidden_states[self.feature_layer] if want_hidden else out.last_hidden_state
        features = features[:, 1:] if self.drop_cls else features
        return features if self.post_norm is None else self.post_norm(features)


class OpenClipVisionEncoder(VisionEncoder):
    """The visual tower of an open_clip model: its patch tokens (``output_tokens=True``)."""

    def __init__(self, visual: nn.Module, preprocessing: ImagePreprocessing, name_or_path: str | None = None):
        super().__init__()
        self.visual = visual
        self.visual.output_tokens = True
        self.preprocessing = preprocessing
        self.hidden_size = visual.transformer.width if hasattr(visual, "transformer") else visual.output_dim
        self.vision_type = "open_clip"
        self.name_or_path = name_or_path
        self.extra_ln_post = False

    def set_post_norm(self, post_norm: bool) -> None:
        visual = self.visual
        if not hasattr(visual, "ln_post") or getattr(visual, "attn_pool", None) is not None:
            super().set_post_norm(post_norm)
        if hasattr(visual, "final_ln_after_pool"):  # open_clip >= 2.23.0: ln_post on all tokens unless this is set
            visual.final_ln_after_pool = not post_norm
            self.extra_ln_post = False
        else:  # older open_clip: ln_post on the pooled token only
            self.extra_ln_post = post_norm

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(pixel_values)
        return self.visual.ln_post(tokens) if self.extra_ln_post else tokens


class TimmVisionEncoder(VisionEncoder):
    """A timm model's ``forward_features`` output, prefix (class/register) tokens dropped."""

    def __init__(self, model: nn.Module, preprocessing: ImagePreprocessing, name_or_path: str | None = None):
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.hidden_size = model.num_features
        self.num_prefix_tokens = getattr(model, "num_prefix_tokens", 0)
        self.vision_type = "timm"
        self.name_or_path = name_or_path

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(pixel_values)
        if features.ndim == 4:  # convolutional feature map [N, d, h, w]
            return features.flatten(2).transpose(1, 2)
        return features[:, self.num_prefix_tokens :]


def _load_hf(name_or_path, vision_type: str, feature_layer: int, **kwargs) -> VisionEncoder:
    import transformers

    if vision_type == "clip":
        model_cls, mean, std = transformers.CLIPVisionModel, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    else:
        model_cls, mean, std = transformers.SiglipVisionModel, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if isinstance(name_or_path, nn.Module):
        model, path = name_or_path, getattr(name_or_path, "name_or_path", None)
        model = getattr(model, "vision_model", model) if not isinstance(model, model_cls) else model
    else:
        model, path = load_vision_tower(model_cls, name_or_path, **kwargs), str(name_or_path)
    config = model.config
    if hasattr(config, "vision_config"):
        config = config.vision_config
    if path:
        preprocessing = ImagePreprocessing.from_preprocessor_config(path, config.image_size, mean, std)
    else:
        preprocessing = ImagePreprocessing(int(config.image_size), mean, std)
    return HFVisionEncoder(model, preprocessing, feature_layer=feature_layer, vision_type=vision_type, name_or_path=path)


def _load_open_clip(name_or_path, vision_type: str, feature_layer: int, pretrained: str | None = None, **kwargs) -> VisionEncoder:
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("the open_clip vision encoder needs `pip install flamingo-vlm[open_clip]`") from e
    model, _, preprocess = open_clip.create_model_and_transforms(name_or_path, pretrained=pretrained, **kwargs)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD
    return OpenClipVisionEncoder(model.visual, ImagePreprocessing(int(size), tuple(mean), tuple(std)), name_or_path=str(name_or_path))


def _load_timm(name_or_path, vision_type: str, feature_layer: int, pretrained: bool = True, **kwargs) -> VisionEncoder:
    try:
        import timm
    except ImportError as e:
        raise ImportError("the timm vision encoder needs `pip install flamingo-vlm[timm]`") from e
    model = timm.create_model(name_or_path, pretrained=pretrained, num_classes=0, **kwargs)
    cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    # The pretrained config keeps its input size when the model is built for another one (img_size=...):
    # a fixed-size patch embedding knows the size the model really takes.
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        size = img_size[-1] if isinstance(img_size, (tuple, list)) else img_size
    preprocessing = ImagePreprocessing(int(size), tuple(cfg["mean"]), tuple(cfg["std"]))
    return TimmVisionEncoder(model, preprocessing, name_or_path=str(name_or_path))


VISION_LOADERS: dict[str, Callable[..., VisionEncoder]] = {
    "clip": _load_hf,
    "siglip": _load_hf,
    "open_clip": _load_open_clip,
    "timm": _load_timm,
}


def guess_vision_type(name_or_path) -> str:
    """'clip' or 'siglip' from a transformers model object or a directory's config.json."""
    model_type = None
    if isinstance(name_or_path, nn.Module):
        model_type = getattr(getattr(name_or_path, "config", None), "model_type", None)
    elif (Path(str(name_or_path)) / "config.json").is_file():
        model_type = json.loads((Path(str(name_or_path)) / "config.json").read_text()).get("model_type")
    if model_type and "siglip" in model_type:
        return "siglip"
    if model_type and "clip" in model_type:
        return "clip"
    raise ValueError(
        f"cannot tell the vision encoder type of {name_or_path!r} (model_type={model_type!r}); "
        f"pass vision_type= one of {sorted(VISION_LOADERS)}"
    )


def load_vision_encoder(
    name_or_path, vision_type: str | None = None, *, feature_layer: int = -1, post_norm: bool | None = None, **kwargs
) -> VisionEncoder:
    """Build a frozen VisionEncoder from a model object, a local path or a hub name.

    ``post_norm``: see :meth:`VisionEncoder.set_post_norm` (None: the adapter's native features).
    """
    if isinstance(name_or_path, VisionEncoder):
        encoder = name_or_path
    else:
        if vision_type in (None, "clip", "siglip"):  # a path or hub name (open_clip / timm take model names)
            check_backbone_source(name_or_path, "vision")
        vision_type = vision_type or guess_vision_type(name_or_path)
        if vision_type not in VISION_LOADERS:
            raise ValueError(f"unknown vision_type {vision_type!r}: expected one of {sorted(VISION_LOADERS)}")
        encoder = VISION_LOADERS[vision_type](name_or_path, vision_type, feature_layer, **kwargs)
    if post_norm is not None:
        encoder.set_post_norm(post_norm)
    encoder.requires_grad_(False)
    encoder.eval()
    return encoder
