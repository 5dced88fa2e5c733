"""Video-text pairs from webdataset tar shards, decoded with PyAV.

On disk, each sample is files sharing a key inside ``.tar`` shards::

    000000123.mp4    (or another of ``VIDEO_EXTENSIONS``: .webm, .mkv, .mov...)   the clip
    000000123.txt    the caption (or a .json with a "caption"/"text" field)

Frames (:mod:`flamingo_vlm.processing.video`, the sampler evaluation uses too): with ``fps`` set, one
frame every 1/fps seconds from the start (the paper: 1 FPS), at most ``num_frames``; with ``fps=None``,
the centres of ``num_frames`` equal segments of the clip. The clip is one medium [T, C, H, W] behind one
``<image>`` token: ``<BOS><image>caption<|endofchunk|><EOS>``. A clip that does not decode or has no
frames is counted as ``bad_video`` and skipped.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..processing.images import ImageTransform
from ..processing.video import VIDEO_EXTENSIONS, VideoDecodeError, load_video
from .pairs import record_caption
from .samples import Sample, SkipSample
from .sources import TarSource
from .text import TokenLayout


def decode_video(data: bytes, num_frames: int, fps: float | None = None) -> list[Image.Image]:
    """Encoded video bytes -> at most ``num_frames`` RGB frames, by the one frame sampler
    (:func:`flamingo_vlm.processing.video.load_video`); SkipSample("bad_video") if it does not decode."""
    try:
        return list(load_video(data, num_frames, fps).frames)
    except VideoDecodeError as e:
        raise SkipSample("bad_video", str(e)) from e


class VideoFormat:
    """Decodes one video record into a :class:`Sample` with one medium of T <= num_frames frames."""

    def __init__(self, layout: TokenLayout, transform: ImageTransform, *, max_tokens: int = 32, num_frames: int = 8, fps: float | None = None) -> None:
        self.layout, self.transform = layout, transform
        self.max_tokens, self.num_frames, self.fps = max_tokens, num_frames, fps
        self.source = TarSource()
        self.source_extensions = self.source.extensions

    def decode(self, record: dict, rng: np.random.Generator) -> Sample:
        caption = record_caption(record)
        data = next((record[ext] for ext in VIDEO_EXTENSIONS if ext in record), None)
        if data is None:
            raise SkipSample("bad_record", f"no video member ({'/'.join(VIDEO_EXTENSIONS)})")
        frames = decode_video(data, self.num_frames, self.fps)
        pixels = torch.stack([self.transform(f) for f in frames])  # [T, C, H, W]
        return Sample(self.layout.pair(caption, self.max_tokens), [pixels], key=f"{record['__url__']}#{record['__key__']}")
