"""Shared by the serving tests: a tiny model's app with small limits, and images as base64."""

from __future__ import annotations

import base64
import io

from helpers import build, open_gates

from flamingo_vlm.serving import Limits

# Small limits so each one is easy to cross in a test; the test images (40x36) stay under them.
TEST_LIMITS = Limits(max_body_bytes=60_000, max_image_pixels=100 * 100, max_media=4, max_video_frames=4, max_prompt_tokens=400,
                     max_new_tokens=16, max_num_beams=4, max_candidates=5)


def tiny_model():
    model, processor = build("llama")
    open_gates(model, 0.7)  # the images really change the answers
    return model, processor


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def b64(img) -> str:
    return base64.b64encode(png_bytes(img)).decode("ascii")


def data_url(img) -> str:
    return "data:image/png;base64," + b64(img)
