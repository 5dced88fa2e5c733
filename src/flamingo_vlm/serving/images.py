"""Base64 / data-URL images -> PIL images, with the pixel count checked before any pixel is decoded
(a decompression bomb is refused from its header: see :mod:`flamingo_vlm.processing.images`)."""

from __future__ import annotations

import base64
import binascii

from PIL import Image

from ..processing import images
from .errors import bad_request, too_large

# Common web formats only: no exotic decoders reachable from the network.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")


def decode_base64(data: str, where: str) -> bytes:
    """Raw bytes of a base64 string or a ``data:<mime>;base64,<payload>`` URL."""
    if not isinstance(data, str):
        raise bad_request(f"{where}: expected a base64 string or a data URL, got {type(data).__name__}")
    payload = data
    if data.startswith("data:"):
        header, sep, payload = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad_request(f"{where}: a data URL must be base64-encoded ('data:image/png;base64,...')")
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{where}: not valid base64 ({e})") from e
    if not raw:
        raise bad_request(f"{where}: the image is empty")
    return raw


def open_image(data: str, where: str, *, max_pixels: int) -> Image.Image:
    """A PIL image from base64 / a data URL with only its header read (no pixel decoded yet); 400 if it is
    not an image, 413 if over ``max_pixels``. Its ``size`` says what decoding it will cost."""
    raw = decode_base64(data, where)
    try:
        return images.open_image(raw, max_pixels=max_pixels, formats=FORMATS)
    except images.ImageTooLarge as e:
        raise too_large(f"{where}: {e}") from e
    except images.ImageDecodeError as e:
        raise bad_request(f"{where}: {e}") from e


def decode_opened(image: Image.Image, where: str) -> Image.Image:
    """The RGB pixels of an image :func:`open_image` opened (the one image decoder:
    :func:`flamingo_vlm.processing.images.decode_image`); its errors become HTTP errors."""
    try:
        return images.decode_image(image)
    except images.ImageTooLarge as e:
        raise too_large(f"{where}: {e}") from e
    except images.ImageDecodeError as e:
        raise bad_request(f"{where}: {e}") from e
