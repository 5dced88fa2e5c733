"""Vision adapters: a frozen encoder that turns images [N, C, H, W] into features [N, S, d], and the
facts about its input (size, mean, std) that preprocessing needs (:class:`ImagePreprocessing`).

Registry: ``clip`` and ``siglip`` (Hugging Face transformers), ``open_clip`` and ``timm`` (optional
extras: ``pip install flamingo-vlm[open_clip]`` / ``[timm]``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .sources import check_backbone_source, load_vision_tower

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


RESIZE_MODES = ("shortest_edge", "squash")
RESAMPLE_FILTERS = ("bicubic", "bilinear")
CROP_OFFSETS = ("round", "floor")
RESIZE_BACKENDS = ("pil", "torch")
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling codes in HF preprocessor configs


@dataclass(frozen=True)
class ImagePreprocessing:
    """The pixels an encoder was trained with: plain data, applied by
    :class:`flamingo_vlm.processing.ImageTransform` (``ImageTransform.for_encoder(encoder)``).

    Encoder families disagree on the arithmetic, and a pixel off moves the features, so each is recorded:

    - ``resize``: "shortest_edge" (the shorter side to ``resize_size``, the longer one ``int(resize_size *
      long / short)``, as torchvision's ``Resize(int)`` and transformers' ``shortest_edge`` compute it) or
      "squash" (to ``resize_size`` x ``resize_size``, aspect ratio not kept: SigLIP); then a centre crop
      of ``image_size`` when the resized image is larger;
    - ``resize_size``: the size before the crop (None: ``image_size``; timm: ``floor(image_size / crop_pct)``);
    - ``resample``: "bicubic" or "bilinear";
    - ``crop_offset``: "round" (torchvision's ``CenterCrop``: open_clip, OpenAI CLIP, timm) or "floor"
      (transformers' image processors);
    - ``resize_backend``: "pil" (PIL's ``Image.resize``: torchvision on PIL images, open_clip, timm,
      transformers' ``*ImageProcessorPil``) or "torch" (torchvision's antialiased resize of uint8 tensors:
      transformers 5's default, torchvision-backed image processors). They differ by a level or two on a few
      pixels;
    - ``image_mean`` / ``image_std``: per-channel normalisation of pixels scaled to [0, 1].
    """

    image_size: int = 224
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resize: str = "shortest_edge"
    resize_size: int | None = None
    resample: str = "bicubic"
    crop_offset: str = "round"
    resize_backend: str = "pil"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("resize", RESIZE_MODES), ("resample", RESAMPLE_FILTERS), ("crop_offset", CROP_OFFSETS), ("resize_backend", RESIZE_BACKENDS)
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"image preprocessing: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.image_size < 1 or (self.resize_size is not None and self.resize_size < self.image_size):
            raise ValueError(
                f"image preprocessing: resize_size ({self.resize_size}) must be at least image_size ({self.image_size}) >= 1"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(x > 0 for x in self.image_std):
            raise ValueError(f"image preprocessing: mean and std must have 3 values, std positive; got {self.image_mean}, {self.image_std}")

    @classmethod
    def from_preprocessor_config(cls, path: str | os.PathLike | None, vision_type: str, image_size: int) -> "ImagePreprocessing":
        """What transformers' image processor of a checkpoint (a directory or hub name) computes, from its
        ``preprocessor_config.json`` when it has one, else from the processor class's defaults (CLIP: shortest
        edge + centre crop, SigLIP: squash; both bicubic, torchvision-backed as transformers 5 loads them)."""
        if vision_type == "siglip":
            data = {"size": {"height": image_size, "width": image_size}, "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)}
        else:
            data = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size},
                    "do_center_crop": True, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
        file = _preprocessor_config_file(path)
        if file is not None:
            data = {**data, **json.loads(Path(file).read_text())}
        where = str(file) if file is not None else f"the {vision_type} image processor's defaults"
        size = data.get("size") or {}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if "shortest_edge" in size and not size.get("longest_edge"):
            resize, resize_size = "shortest_edge", int(size["shortest_edge"])
        elif size.get("height") and size.get("width") and size["height"] == size["width"]:
            resize, resize_size = "squash", int(size["height"])
        else:
            raise ValueError(f"{where}: unsupported resize {size!r} (supported: shortest_edge, or a square height x width)")
        crop = data.get("crop_size") if data.get("do_center_crop", False) else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if crop and crop.get("height") != crop.get("width"):
            raise ValueError(f"{where}: non-square crop_size {crop!r} is not supported")
        resample = data.get("resample", 3)
        if resample not in _PIL_RESAMPLE:
            raise ValueError(f"{where}: resample={resample!r} is not supported (2: bilinear, 3: bicubic)")
        if not data.get("do_resize", True) or not data.get("do_rescale", True) or not data.get("do_normalize", True):
            raise ValueError(f"{where}: do_resize, do_rescale and do_normalize must be on (an encoder takes resized, normalised pixels)")
        # The saved config does not say which backend ran (a *Pil class saves its name without the suffix):
        # AutoImageProcessor takes the torchvision one wherever torchvision is installed.
        processor_type = str(data.get("image_processor_type", ""))
        return cls(
            image_size=int(crop["height"]) if crop else resize_size,
            image_mean=tuple(data["image_mean"]), image_std=tuple(data["image_std"]),
            resize=resize, resize_size=resize_size, resample=_PIL_RESAMPLE[resample], crop_offset="floor",
            resize_backend="pil" if processor_type.endswith("Pil") else "torch",
        )


def _preprocessor_config_file(path: str | os.PathLike | None) -> str | None:
    """The checkpoint's ``preprocessor_config.json`` (local, or from the hub cache / hub), None without one."""
    if path is None:
        return None
    if os.path.isdir(path):
        file = Path(path) / "preprocessor_config.json"
        return str(file) if file.is_file() else None
    from transformers.utils import cached_file

    try:
        return cached_file(
            str(path), "preprocessor_config.json",
            _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        return None


class VisionEncoder(nn.Module):
    """Frozen image encoder: pixel_values [N, C, H, W] -> features [N, S, hidden_size].

    ``preprocessing`` says what the pixels must be (size, mean, std); processing builds the transform.
    """

    hidden_size: int
    preprocessing: ImagePreprocessing
    name_or_path: str | None = None
    vision_type: str = ""

    def set_keep_cls(self, keep_cls: bool) -> None:
        """Whether the features keep the encoder's CLS token (IDEFICS uses every token of the last hidden state).
        Adapters whose features never hold it accept only False."""
        if keep_cls:
            raise ValueError(f"the {self.vision_type or type(self).__name__} vision adapter cannot keep a CLS token (vision_keep_cls=True)")

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
        self.interpolate_pos_encoding = False  # another input size than the encoder's (modeling.finetune.set_image_size)

    def set_post_norm(self, post_norm: bool) -> None:
        native = self.vision_type == "siglip" and self.feature_layer == -1  # SigLIP's last_hidden_state is normed
        if native and not post_norm:
            super().set_post_norm(post_norm)
        self.post_norm = getattr(self.model, "vision_model", self.model).post_layernorm if post_norm and not native else None

    def set_keep_cls(self, keep_cls: bool) -> None:
        if keep_cls and self.vision_type != "clip":
            super().set_keep_cls(keep_cls)  # SigLIP has no CLS token
        self.drop_cls = self.vision_type == "clip" and not keep_cls

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        want_hidden = self.feature_layer != -1
        extra = {"interpolate_pos_encoding": True} if self.interpolate_pos_encoding else {}
        out = self.model(pixel_values=pixel_values, output_hidden_states=want_hidden, **extra)
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

    model_cls = transformers.CLIPVisionModel if vision_type == "clip" else transformers.SiglipVisionModel
    _refuse_naflex(_model_type(name_or_path), name_or_path)
    if isinstance(name_or_path, nn.Module):
        model, path = name_or_path, getattr(name_or_path, "name_or_path", None)
        model = getattr(model, "vision_model", model) if not isinstance(model, model_cls) else model
    else:
        model, path = load_vision_tower(model_cls, name_or_path, **kwargs), str(name_or_path)
    config = model.config
    if hasattr(config, "vision_config"):
        config = config.vision_config
    preprocessing = ImagePreprocessing.from_preprocessor_config(path, vision_type, int(config.image_size))
    return HFVisionEncoder(model, preprocessing, feature_layer=feature_layer, vision_type=vision_type, name_or_path=path)


def _load_open_clip(name_or_path, vision_type: str, feature_layer: int, pretrained: str | None = None, **kwargs) -> VisionEncoder:
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("the open_clip vision encoder needs `pip install flamingo-vlm[open_clip]`") from e
    model = open_clip.create_model(name_or_path, pretrained=pretrained, **kwargs)
    return OpenClipVisionEncoder(model.visual, open_clip_preprocessing(model.visual), name_or_path=str(name_or_path))


def open_clip_preprocessing(visual: nn.Module) -> ImagePreprocessing:
    """open_clip's eval transform (``open_clip.image_transform``) from the visual tower's ``preprocess_cfg``:
    torchvision ``Resize`` + ``CenterCrop`` ("shortest") or ``Resize((s, s))`` ("squash") on PIL images."""
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", visual.image_size)
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"open_clip: non-square image size {tuple(size)} is not supported")
        size = size[0]
    mode = cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"open_clip: resize_mode {mode!r} is not supported (supported: 'shortest', 'squash')")
    return ImagePreprocessing(
        image_size=int(size),
        image_mean=tuple(cfg.get("mean") or getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN),
        image_std=tuple(cfg.get("std") or getattr(visual, "image_std", None) or OPENAI_CLIP_STD),
        resize="shortest_edge" if mode == "shortest" else "squash",
        resample=cfg.get("interpolation", "bicubic"), crop_offset="round", resize_backend="pil",
    )


def _load_timm(name_or_path, vision_type: str, feature_layer: int, pretrained: bool = True, **kwargs) -> VisionEncoder:
    try:
        import timm
    except ImportError as e:
        raise ImportError("the timm vision encoder needs `pip install flamingo-vlm[timm]`") from e
    model = timm.create_model(name_or_path, pretrained=pretrained, num_classes=0, **kwargs)
    return TimmVisionEncoder(model, timm_preprocessing(model), name_or_path=str(name_or_path))


def timm_preprocessing(model: nn.Module) -> ImagePreprocessing:
    """timm's eval transform (``timm.data.create_transform(**resolve_data_config({}, model=model))``): the
    shortest edge (crop_mode "center") or both sides ("squash") to ``floor(size / crop_pct)``, then a
    torchvision centre crop, on PIL images."""
    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    # The pretrained config keeps its input size when the model is built for another one (img_size=...):
    # a fixed-size patch embedding knows the size the model really takes.
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        size = img_size[-1] if isinstance(img_size, (tuple, list)) else img_size
    mode = cfg.get("crop_mode", "center")
    if mode not in ("center", "squash"):
        raise ValueError(f"timm: crop_mode {mode!r} is not supported (supported: 'center', 'squash')")
    crop_pct = cfg.get("crop_pct", 1.0)
    return ImagePreprocessing(
        image_size=int(size), image_mean=tuple(cfg["mean"]), image_std=tuple(cfg["std"]),
        resize="shortest_edge" if mode == "center" else "squash", resize_size=math.floor(size / crop_pct),
        resample=cfg.get("interpolation", "bicubic"), crop_offset="round", resize_backend="pil",
    )


VISION_LOADERS: dict[str, Callable[..., VisionEncoder]] = {
    "clip": _load_hf,
    "siglip": _load_hf,
    "open_clip": _load_open_clip,
    "timm": _load_timm,
}


def _model_type(name_or_path) -> str | None:
    """The transformers ``model_type`` of a model object or a local checkpoint directory (None otherwise)."""
    if isinstance(name_or_path, nn.Module):
        return getattr(getattr(name_or_path, "config", None), "model_type", None)
    if (Path(str(name_or_path)) / "config.json").is_file():
        return json.loads((Path(str(name_or_path)) / "config.json").read_text()).get("model_type")
    return None


def _refuse_naflex(model_type: str | None, name_or_path) -> None:
    """SigLIP 2's NaFlex models (``Siglip2VisionModel``) take each image at its own aspect ratio, as a
    variable-length patch sequence with ``pixel_attention_mask`` / ``spatial_shapes``: a batch of fixed-size
    [N, C, H, W] images cannot give them the pixels they were trained with. The fixed-resolution SigLIP 2
    checkpoints (``google/siglip2-*-patch16-224`` ... ``-512``) are ``SiglipVisionModel``s and work."""
    if model_type and model_type.startswith("siglip2"):
        name = getattr(name_or_path, "name_or_path", None) or type(name_or_path).__name__ if isinstance(name_or_path, nn.Module) else name_or_path
        raise ValueError(
            f"{name!s} is a SigLIP 2 NaFlex model (model_type={model_type!r}), which takes variable-resolution patch "
            f"sequences (pixel_attention_mask, spatial_shapes), not fixed-size images: not supported. Use a fixed-resolution "
            f"SigLIP 2 checkpoint (e.g. google/siglip2-so400m-patch14-384, a SiglipVisionModel) with vision_type='siglip'"
        )


def guess_vision_type(name_or_path) -> str:
    """'clip' or 'siglip' from a transformers model object or a directory's config.json."""
    model_type = _model_type(name_or_path)
    _refuse_naflex(model_type, name_or_path)
    if model_type and "siglip" in model_type:
        return "siglip"
    if model_type and "clip" in model_type:
        return "clip"
    raise ValueError(
        f"cannot tell the vision encoder type of {name_or_path!r} (model_type={model_type!r}); "
        f"pass vision_type= one of {sorted(VISION_LOADERS)}"
    )


def load_vision_encoder(
    name_or_path,
    vision_type: str | None = None,
    *,
    feature_layer: int = -1,
    post_norm: bool | None = None,
    keep_cls: bool = False,
    **kwargs,
) -> VisionEncoder:
    """Build a frozen VisionEncoder from a model object, a local path or a hub name.

    ``post_norm``: see :meth:`VisionEncoder.set_post_norm` (None: the adapter's native features);
    ``keep_cls``: see :meth:`VisionEncoder.set_keep_cls`.
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
    if keep_cls:
        encoder.set_keep_cls(True)
    encoder.requires_grad_(False)
    encoder.eval()
    return encoder
