"""Base64 / data-URL images -> PIL images, with the pixel count checked before any pixel is decoded.

A decompression bomb is a small file (a few KB of PNG) whose header claims a huge image (50000 x 50000):
``Image.open`` reads only the header, so its size is checked against the limit before ``load()``
allocates the pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

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


def decode_image(data: str, where: str, *, max_pixels: int) -> Image.Image:
    """An RGB PIL image from base64 / a data URL; 400 if it cannot be decoded, 413 if over ``max_pixels``."""
    raw = decode_base64(data, where)
    try:
        with warnings.catch_warnings():
            # PIL's own guard (Image.MAX_IMAGE_PIXELS) is global, warns from 89M pixels and refuses from 179M
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise too_large(f"{where}: the image is over the limit of {max_pixels:,} pixels ({e})") from e
    except UnidentifiedImageError as e:
        raise bad_request(f"{where}: cannot decode the image: the bytes are not a {'/'.join(FORMATS)} file") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise bad_request(f"{where}: cannot decode the image: {e}") from e
    width, height = image.size
    if width < 1 or height < 1:
        raise bad_request(f"{where}: the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise too_large(f"{where}: the image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours ran above
            image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise bad_request(f"{where}: cannot decode the image: {e}") from e
