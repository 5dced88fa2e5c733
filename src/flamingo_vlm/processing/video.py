"""Video files -> frames: the one frame sampler, shared by training data and evaluation.

Two ways to pick at most ``num_frames`` frames of a clip of N frames:

- evenly (``fps=None``): the frame at the centre of each of ``min(num_frames, N)`` equal segments
  (:func:`frame_indices`), so a clip is summarised by frames from its whole length and never shows the
  same frame twice;
- at a rate (``fps``): one frame every 1/fps seconds from the start (the paper trains at 1 FPS), at most
  ``num_frames`` of them, fewer when the clip is short.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .processor import Video

if TYPE_CHECKING:
    import av

# Container formats PyAV decodes (animated GIFs are short videos), as webdataset member names.
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi", "m4v", "mpg", "mpeg", "gif")
VIDEO_SUFFIXES = frozenset(f".{ext}" for ext in VIDEO_EXTENSIONS)  # the same set, as file name suffixes
# Frame times are rounded to the stream's time base: a frame this close before a target still counts.
_TIME_TOLERANCE_S = 1e-3


class VideoDecodeError(ValueError):
    """The data is not a video PyAV can decode, has no video stream, or has no frames."""


def is_video_path(item: Any) -> bool:
    """Whether ``item`` is a path (str or Path) whose suffix names a video file."""
    return isinstance(item, (str, Path)) and Path(item).suffix.lower() in VIDEO_SUFFIXES


def frame_indices(total: int, num_frames: int) -> list[int]:
    """Up to ``num_frames`` indices spread evenly over ``total`` frames: the centre of each equal segment."""
    k = min(num_frames, total)
    return [int((i + 0.5) * total / k) for i in range(k)]


def rgb_images(frames: list[av.VideoFrame]) -> list[Image.Image]:
    """Decoded frames -> RGB PIL images, the same pixels as ``frame.to_image()``.

    One swscale context serves all the frames: PyAV's per-frame conversions build a new one each time,
    which costs more than decoding a small frame (64 px: 0.33 ms a frame through ``to_ndarray``, 0.10 through
    ``to_image``, 0.03-0.05 with the context reused; measured with PyAV 18).
    """
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    return [Image.fromarray(reformatter.reformat(f, format="rgb24").to_ndarray()) for f in frames]


def load_video(source: str | os.PathLike | bytes, num_frames: int = 8, fps: float | None = None) -> Video:
    """A video file (path) or its bytes -> :class:`Video` of at most ``num_frames`` RGB PIL frames.

    ``fps=None`` picks frames evenly over the clip, ``fps`` one frame every 1/fps seconds (module doc).
    Raises :class:`VideoDecodeError` when it cannot decode the video or finds no frame.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    import av  # here, not at the top: PyAV takes ~75 ms to import and most users of the package never decode video

    is_bytes = isinstance(source, (bytes, bytearray))
    name = "video bytes" if is_bytes else f"video {source!s}"

    def open_container():
        return av.open(io.BytesIO(source) if is_bytes else str(source))

    try:
        images = _at_rate(open_container, num_frames, fps) if fps else _evenly(open_container, num_frames)
    except (av.FFmpegError, OSError, ValueError, EOFError, IndexError) as e:
        raise VideoDecodeError(f"cannot decode {name}: {e}") from e
    if not images:
        raise VideoDecodeError(f"cannot decode {name}: no frames decoded")
    return Video(images)


def _video_stream(container):
    if not container.streams.video:
        raise VideoDecodeError("no video stream")
    return container.streams.video[0]


def _evenly(open_container, num_frames: int) -> list[Image.Image]:
    """The frames at :func:`frame_indices`, decoding no further than the last one.

    The frame count comes from the header, else from counting packets (no decoding). A pass that finds
    fewer frames than that count (a header that lies) is redone with the count it found.
    """
    with open_container() as container:
        stream = _video_stream(container)
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    while total > 0:
        wanted = frame_indices(total, num_frames)
        picked, count = [], 0
        with open_container() as container:
            stream = _video_stream(container)
            for frame in container.decode(stream):
                if count in wanted:
                    picked.append(frame)
                count += 1
                if count > wanted[-1]:
                    return rgb_images(picked)  # converted while the container is open
        total = count
    return []


def _at_rate(open_container, num_frames: int, fps: float) -> list[Image.Image]:
    """The first frame at or after each time start + k / fps (k < num_frames) that the clip reaches."""
    picked: list[av.VideoFrame] = []
    with open_container() as container:
        stream = _video_stream(container)
        base = float(stream.time_base) if stream.time_base else 0.0
        start = stream.start_time * base if stream.start_time is not None and base else 0.0
        targets = [start + k / fps for k in range(num_frames)]
        for frame in container.decode(stream):
            t = frame.time if frame.time is not None else start + len(picked) / fps
            while len(picked) < len(targets) and t >= targets[len(picked)] - _TIME_TOLERANCE_S:
                picked.append(frame)
            if len(picked) == len(targets):
                break
        return rgb_images(picked)
