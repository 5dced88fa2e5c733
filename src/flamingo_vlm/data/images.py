"""Image bytes -> checked PIL images -> pixel tensors, with failures turned into counted skips."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from PIL import Image

from ..processing import images
from .samples import SkipSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ImageFilter:
    """The paper's M3W image filter (section 2.4): drop images under ``min_size`` px on their short
    side or with an aspect ratio over ``max_aspect_ratio``. 0 disables a check."""

    min_size: int = 0
    max_aspect_ratio: float = 0.0

    def passes(self, width: int, height: int) -> bool:
        if self.min_size and min(width, height) < self.min_size:
            return False
        if self.max_aspect_ratio and max(width, height) > self.max_aspect_ratio * max(min(width, height), 1):
            return False
        return True


def open_image(data: bytes) -> Image.Image:
    """Parse an image's header (no pixel decoding yet) with the one image decoder
    (:mod:`flamingo_vlm.processing.images`); SkipSample("corrupt_image") if it is not an image."""
    try:
        return images.open_image(data)
    except images.ImageDecodeError as e:
        raise SkipSample("corrupt_image", str(e)) from e


def decode_image(image: Image.Image) -> Image.Image:
    """Decode the pixels of an opened image as RGB; SkipSample("corrupt_image") on truncated data."""
    try:
        return images.decode_image(image)
    except images.ImageDecodeError as e:
        raise SkipSample("corrupt_image", str(e)) from e


def b64_bytes(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError, TypeError) as e:
        raise SkipSample("corrupt_image", f"bad base64: {e}") from e


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise SkipSample("missing_file", path) from e
    except OSError as e:
        raise SkipSample("missing_file", f"{path}: {e}") from e
