"""Images -> RGB PIL images -> pixel tensors: the one image decoder, and the transform an encoder expects.

Training data, the processor and the server all decode through :func:`open_image` / :func:`decode_image`,
so an image that one of them accepts decodes to the same pixels in the others. Each caller turns
:class:`ImageDecodeError` into its own failure: a counted skip (data), a ``ValueError`` for the user
(processor), a 400 or 413 (serving).

A decompression bomb is a small file (a few KB of PNG) whose header claims a huge image (50000 x 50000):
``Image.open`` reads only the header, so with ``max_pixels`` the size is checked before ``load()``
allocates the pixels.
"""

from __future__ import annotations

import io
import json
import os
import platform
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..modeling.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocessing, VisionEncoder

IMAGE_TRANSFORM_NAME = "image_transform.json"


class ImageDecodeError(ValueError):
    """The bytes are not an image (of the accepted formats), are truncated, or have no pixels."""


class ImageTooLarge(ImageDecodeError):
    """The image's header claims more pixels than allowed (``max_pixels``, or PIL's own bomb guard)."""


def open_image(data: bytes | bytearray, *, max_pixels: int | None = None, formats: Sequence[str] | None = None) -> Image.Image:
    """Parse an image's header (no pixel is decoded yet) and check its size.

    max_pixels: refuse (:class:`ImageTooLarge`) images whose width x height is over it; None leaves
    only PIL's global guard (``Image.MAX_IMAGE_PIXELS``: warns from 89M pixels, refuses from 179M).
    formats: PIL format names to accept (e.g. ("PNG", "JPEG")); None accepts every format PIL reads.
    """
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # our own limit is checked below; PIL's warning would only be noise
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as e:
        limit = f"the limit of {max_pixels:,} pixels" if max_pixels is not None else "PIL's pixel limit"
        raise ImageTooLarge(f"the image is over {limit} ({e})") from e
    except UnidentifiedImageError as e:
        what = f"a {'/'.join(formats)} file" if formats else "an image file PIL can read"
        raise ImageDecodeError(f"cannot decode the image: the bytes are not {what}") from e
    except (OSError, SyntaxError, ValueError, TypeError) as e:
        raise ImageDecodeError(f"cannot decode the image: {e}") from e
    _check_size(image, max_pixels)
    return image


def decode_image(image: bytes | bytearray | Image.Image, *, max_pixels: int | None = None, formats: Sequence[str] | None = None) -> Image.Image:
    """Decode the pixels of image bytes (or of an image :func:`open_image` opened) as an RGB PIL image.

    Greyscale, palette, RGBA, CMYK... become RGB (an alpha channel is dropped, as ``Image.convert`` does).
    Raises :class:`ImageDecodeError` (truncated or corrupt data) or :class:`ImageTooLarge`.
    """
    if isinstance(image, (bytes, bytearray)):
        image = open_image(image, max_pixels=max_pixels, formats=formats)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"decode_image takes bytes or a PIL image, got a {type(image).__name__}")
    else:
        _check_size(image, max_pixels)
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # A palette image with a transparent colour warns that it "should be converted to RGBA": the
            # alpha is dropped anyway, so the warning says nothing about the RGB result.
            warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
            image.load()
            return image if image.mode == "RGB" else _to_rgb(image)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"the image is over PIL's pixel limit ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot decode the image: {e}") from e


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded mode -> RGB. PIL's ``convert("RGB")`` clips 16-bit and 32-bit integer greyscale to white
    and floats to black; they are scaled to 8 bits first: integers by their bit depth (16-bit when a value
    is above 255), floats as [0, 1] (or clipped to [0, 255] when a value is above 1)."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.size == 0 or np.nanmax(values) <= 1.0 else 255.0
        else:
            top = 65535.0 if image.mode.startswith("I;16") or (values.size and values.max() > 255) else 255.0
        grey = np.clip(np.nan_to_num(values) * (255.0 / top), 0, 255).round().astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    return image.convert("RGB")


def _check_size(image: Image.Image, max_pixels: int | None) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"the image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}")


def load_image(image: Any) -> Image.Image:
    """An RGB PIL image from a PIL image, a path, raw bytes or an H x W x C uint8 array.

    Raises :class:`ImageDecodeError` (a ``ValueError``) naming the source when it cannot be decoded.
    """
    if isinstance(image, Image.Image):
        return decode_image(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.dtype != np.uint8:
            raise ValueError(f"an image array must be H x W x C uint8, got shape {image.shape} dtype {image.dtype}")
        return decode_image(Image.fromarray(image if image.shape[-1] != 1 else image[..., 0]))
    if isinstance(image, (bytes, bytearray)):
        name, read = "image bytes", lambda: image
    elif isinstance(image, (str, os.PathLike)):
        name, read = f"image file {image!s}", lambda: _read_file(image)
    else:
        raise ValueError(f"cannot read an image from a {type(image).__name__}")
    try:
        return decode_image(read())
    except (ImageDecodeError, OSError) as e:  # OSError: a file that cannot be read
        raise ImageDecodeError(f"failed to decode {name}: {e}") from e


def _read_file(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass
class ImageTransform:
    """PIL image (or path, bytes, H x W x C uint8 array) -> float tensor [3, size, size]: the pixels an
    encoder was trained with (:class:`~flamingo_vlm.modeling.vision.ImagePreprocessing` says how; the fields
    here are its fields, ``size`` its ``image_size``).

    Resize (the shortest edge, or both sides with ``resize="squash"``, to ``resize_size``), centre crop to
    ``size``, scale to [0, 1], normalise per channel. Each step does the arithmetic of the reference the
    encoder family uses: torchvision's ``Resize`` / ``CenterCrop`` / ``ToTensor`` / ``Normalize`` on PIL
    images (open_clip, timm, OpenAI CLIP), or transformers' image processors (crop offset floored; resize on
    uint8 tensors for their torchvision backend). Tested against each reference.
    """

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resize: str = "shortest_edge"
    resize_size: int | None = None
    resample: str = "bicubic"
    crop_offset: str = "round"
    resize_backend: str = "pil"

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        self.preprocessing  # validates the fields

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing(
            image_size=self.size, image_mean=self.mean, image_std=self.std, resize=self.resize, resize_size=self.resize_size,
            resample=self.resample, crop_offset=self.crop_offset, resize_backend=self.resize_backend,
        )

    @classmethod
    def from_preprocessing(cls, p: ImagePreprocessing) -> "ImageTransform":
        return cls(
            size=p.image_size, mean=tuple(p.image_mean), std=tuple(p.image_std), resize=p.resize, resize_size=p.resize_size,
            resample=p.resample, crop_offset=p.crop_offset, resize_backend=p.resize_backend,
        )

    @classmethod
    def for_encoder(cls, encoder: VisionEncoder) -> "ImageTransform":
        """The transform ``encoder`` was trained with (its :class:`~flamingo_vlm.modeling.vision.ImagePreprocessing`)."""
        return cls.from_preprocessing(encoder.preprocessing)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize: torchvision's ``Resize(int)`` and transformers' ``shortest_edge``
        both keep the short side exact and truncate the long one, ``int(target * long / short)``."""
        target = self.resize_size or self.size
        if self.resize == "squash":
            return target, target
        if width <= height:
            return target, int(target * height / width)
        return int(target * width / height), target

    def __call__(self, image: Any) -> torch.Tensor:
        image = load_image(image)
        w, h = self.resized_size(*image.size)
        if self.resize_backend == "pil":
            if (w, h) != image.size:  # as torchvision: an image already at the size is not resampled
                image = image.resize((w, h), _PIL_FILTERS[self.resample])
            x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # [3, H, W] uint8
        else:
            x = _resize_uint8(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1), (h, w), self.resample)
        x = self._center_crop(x)
        x = x.to(torch.float32).div(255)  # torchvision's ToTensor; transformers rescales by the same 1/255
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std

    def _center_crop(self, x: torch.Tensor) -> torch.Tensor:
        """[3, H, W] -> [3, size, size]. torchvision rounds the offset (``int(round((H - size) / 2.0))``, Python's
        round half to even), transformers floors it."""
        h, w = x.shape[-2:]
        if h < self.size or w < self.size:
            raise ValueError(f"the resized image ({w}x{h}) is smaller than the crop ({self.size}): resize_size must be >= size")
        if self.crop_offset == "round":
            top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        else:
            top, left = (h - self.size) // 2, (w - self.size) // 2
        return x[:, top : top + self.size, left : left + self.size]

    def save(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, IMAGE_TRANSFORM_NAME), "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ImageTransform":
        """Read ``image_transform.json``; a file written before the resize fields existed gets their defaults
        (torchvision's arithmetic)."""
        with open(os.path.join(directory, IMAGE_TRANSFORM_NAME)) as f:
            data = json.load(f)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{IMAGE_TRANSFORM_NAME} in {directory!s} has unknown fields {unknown}: written by a newer flamingo-vlm?")
        return cls(**data)


_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _resize_uint8(x: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """[3, H, W] uint8 -> [3, h, w] uint8 as torchvision's tensor ``resize`` (antialias on) computes it, the
    resize of transformers 5's torchvision-backed image processors: torch's native uint8 kernel where
    torchvision uses it (bicubic always on CPU; bilinear on AVX2/AVX512/ARM CPUs), else float, rounded."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    native = x.device.type == "cpu" and (
        resample == "bicubic"
        or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        or platform.machine() in ("aarch64", "arm64")
    )
    y = x[None] if native else x[None].to(torch.float32)
    y = torch.nn.functional.interpolate(y, size=list(size), mode=resample, align_corners=False, antialias=True)
    if not native:
        y = y.clamp_(0, 255).round_().to(torch.uint8)
    return y[0]
