"""The one frame sampler: training (webdataset clips as bytes) and evaluation (video files) pick the same frames."""

from __future__ import annotations

import io

import numpy as np
import pytest

from flamingo_vlm.data.samples import SkipSample
from flamingo_vlm.data.video import VIDEO_EXTENSIONS as DATA_VIDEO_EXTENSIONS
from flamingo_vlm.data.video import decode_video
from flamingo_vlm.evaluation.tasks.files import VIDEO_SUFFIXES as EVAL_VIDEO_SUFFIXES
from flamingo_vlm.inference.media import load_video as eval_load_video
from flamingo_vlm.processing import Video
from flamingo_vlm.processing.video import VIDEO_EXTENSIONS, VIDEO_SUFFIXES, VideoDecodeError, frame_indices, is_video_path, load_video

# Far apart in RGB, so that codec noise never turns one into another.
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (240, 240, 240), (230, 230, 20), (230, 20, 230), (20, 230, 230), (30, 30, 30)]


def write_clip(num_frames: int, fps: int = 4, codec: str = "mpeg4", container: str = "mp4") -> bytes:
    """A clip whose frame k is the solid colour COLOURS[k], encoded with PyAV."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), COLOURS[k], dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def colours(frames) -> list[int]:
    """The index of the nearest of COLOURS for each frame."""
    means = [np.asarray(f, dtype=np.float32).reshape(-1, 3).mean(0) for f in frames]
    return [int(np.argmin([np.abs(m - np.array(c)).sum() for c in COLOURS])) for m in means]


def test_frame_indices_are_segment_centres():
    assert frame_indices(8, 4) == [1, 3, 5, 7]
    assert frame_indices(10, 3) == [1, 5, 8]
    assert frame_indices(8, 1) == [4]
    assert frame_indices(3, 8) == [0, 1, 2]  # never more frames than the clip has, never one twice
    assert frame_indices(0, 4) == []


def test_training_reader_and_evaluation_loader_pick_the_same_frames(tmp_path):
    clip = write_clip(8)
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip)
    for num_frames, expected in ((4, [1, 3, 5, 7]), (3, [1, 4, 6]), (8, list(range(8))), (20, list(range(8)))):
        train = decode_video(clip, num_frames)
        evaluation = eval_load_video(path, num_frames)
        assert isinstance(evaluation, Video)
        assert colours(train) == colours(evaluation.frames) == expected, num_frames
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(train, evaluation.frames))
        assert all(f.mode == "RGB" and f.size == (32, 32) for f in train)


def test_fps_mode_takes_one_frame_every_1_over_fps_seconds_from_the_start():
    clip = write_clip(8, fps=4)  # 2 s
    assert colours(load_video(clip, 8, fps=2).frames) == [0, 2, 4, 6]
    assert colours(load_video(clip, 3, fps=2).frames) == [0, 2, 4]  # at most num_frames
    assert colours(load_video(clip, 8, fps=1).frames) == [0, 4]  # the paper's 1 FPS: fewer frames on a short clip
    assert colours(decode_video(clip, 8, fps=1)) == [0, 4]  # training's reader is the same sampler


def test_a_clip_without_a_frame_count_is_counted_not_decoded_twice():
    import av

    webm = write_clip(8, codec="libvpx", container="webm")
    with av.open(io.BytesIO(webm)) as container:
        assert container.streams.video[0].frames == 0  # the header does not say: the packets are counted
    assert colours(load_video(webm, 4).frames) == [1, 3, 5, 7]
    assert colours(load_video(webm, 8).frames) == list(range(8))


def test_broken_videos_raise_one_error_type():
    with pytest.raises(VideoDecodeError, match="cannot decode video bytes"):
        load_video(b"\x00\x00\x00\x18ftypmp42 broken")
    with pytest.raises(VideoDecodeError, match="cannot decode video .*missing.mp4"):
        load_video("missing.mp4")
    with pytest.raises(SkipSample, match="bad_video"):  # training counts it and goes on
        decode_video(b"not a video", 4)
    with pytest.raises(ValueError, match="num_frames"):
        load_video(write_clip(2), 0)
    assert issubclass(VideoDecodeError, ValueError)


def test_one_set_of_video_suffixes():
    assert DATA_VIDEO_EXTENSIONS is VIDEO_EXTENSIONS and EVAL_VIDEO_SUFFIXES is VIDEO_SUFFIXES
    assert VIDEO_SUFFIXES == {f".{ext}" for ext in VIDEO_EXTENSIONS}
    assert is_video_path("a/b.MP4") and is_video_path("clip.webm") and is_video_path("x.gif")
    assert not is_video_path("a.png") and not is_video_path(b"a.mp4") and not is_video_path("mp4")
