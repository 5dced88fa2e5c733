"""Image-text pairs from webdataset tar shards (LAION / img2dataset layout).

On disk, each sample is files sharing a key inside ``.tar`` shards::

    000000123.jpg    (or .jpeg / .png / .webp)   the image
    000000123.txt    the caption (UTF-8)         -- or --
    000000123.json   {"caption": "..."} (also "text"); other keys are ignored

When both ``.txt`` and ``.json`` exist the ``.txt`` is the caption (img2dataset writes both; toy-world
shards put scene metadata in the json). Text: ``<BOS><image>caption<|endofchunk|><EOS>``, cut to
``max_tokens``. A sample without an image or caption is counted as ``bad_record``, one whose image does
not decode as ``corrupt_image``; neither stops the run.
"""

from __future__ import annotations

import json

import numpy as np

from ..processing.images import ImageTransform
from .images import IMAGE_EXTENSIONS, decode_image, open_image
from .samples import Sample, SkipSample
from .sources import TarSource
from .text import TokenLayout

CAPTION_JSON_KEYS = ("caption", "text", "txt")


def record_caption(record: dict) -> str:
    """The caption of a webdataset record (``.txt``, else a caption field of ``.json``)."""
    if "txt" in record:
        caption = record["txt"].decode("utf-8", errors="replace")
    elif "json" in record:
        try:
            meta = json.loads(record["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise SkipSample("bad_record", f"unparsable json: {e}") from e
        caption = next((meta[k] for k in CAPTION_JSON_KEYS if isinstance(meta, dict) and isinstance(meta.get(k), str)), None)
        if caption is None:
            raise SkipSample("bad_record", "json has no caption/text field")
    else:
        raise SkipSample("bad_record", "no .txt or .json caption")
    if not caption.strip():
        raise SkipSample("bad_record", "empty caption")
    return caption


def record_image_bytes(record: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in record:
            return record[ext]
    raise SkipSample("bad_record", f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")


class PairsFormat:
    """Decodes one pairs record into a :class:`Sample` (``<image>caption<EOC>`` + EOS)."""

    source_extensions = TarSource.extensions

    def __init__(self, layout: TokenLayout, transform: ImageTransform, *, max_tokens: int = 32) -> None:
        self.layout, self.transform, self.max_tokens = layout, transform, max_tokens
        self.source = TarSource()

    def decode(self, record: dict, rng: np.random.Generator) -> Sample:
        caption = record_caption(record)
        image = decode_image(open_image(record_image_bytes(record)))
        pixels = self.transform(image)[None]  # [1, C, H, W]: an image is a video of one frame
        return Sample(self.layout.pair(caption, self.max_tokens), [pixels], key=f"{record['__url__']}#{record['__key__']}")
