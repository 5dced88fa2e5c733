"""Tiny training data in the on-disk formats the readers take, written by the tests themselves."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import webdataset as wds
from PIL import Image

from flamingo_vlm.toyworld.generate import mp4_bytes  # noqa: F401  (re-exported for the data tests)

COLOURS = [(220, 20, 30), (10, 200, 40), (20, 30, 210), (250, 250, 250), (240, 200, 10), (120, 20, 160), (0, 180, 180), (90, 90, 90)]


def colour_image(i: int, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, COLOURS[i % len(COLOURS)])


def image_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


CAPTIONS = ["a red circle", "two cats sit on the mat", "a blue square", "the dog runs in the park",
            "a small yellow triangle", "a large purple star", "the quick brown fox", "a green background"]


def pair_shards(root: Path, num_shards: int = 2, per_shard: int = 8, prefix: str = "pairs") -> list[str]:
    """Pairs shards: {key}.png + {key}.txt; sample i of shard s has colour/caption (s*per_shard+i) % 8."""
    paths = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            n = s * per_shard + i
            samples.append({"__key__": f"{prefix}{n:05d}", "png": image_bytes(colour_image(n)), "txt": CAPTIONS[n % len(CAPTIONS)]})
        paths.append(write_tar(root / f"{prefix}-{s:05d}.tar", samples))
    return paths


def mmc4_doc(n: int, num_images: int = 3, sim: float = 0.3) -> dict:
    texts = [f"page {n} title"] + [CAPTIONS[(n + k) % len(CAPTIONS)] for k in range(num_images)]
    infos = [{"image_name": f"d{n}-{k}.png", "matched_text_index": k + 1, "matched_sim": sim,
              "image_base64": base64.b64encode(image_bytes(colour_image(n + k))).decode()} for k in range(num_images)]
    return {"text_list": texts, "image_info": infos}


def mmc4_shards(root: Path, num_shards: int = 2, per_shard: int = 6, prefix: str = "docs") -> list[str]:
    paths = []
    for s in range(num_shards):
        samples = [{"__key__": f"{prefix}{s * per_shard + i:05d}", "json": json.dumps(mmc4_doc(s * per_shard + i))} for i in range(per_shard)]
        paths.append(write_tar(root / f"{prefix}-{s:05d}.tar", samples))
    return paths


def video_shards(root: Path, num_shards: int = 1, per_shard: int = 4, frames: int = 8) -> list[str]:
    paths = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            n = s * per_shard + i
            clip = [colour_image(n + f) for f in range(frames)]
            samples.append({"__key__": f"video{n:05d}", "mp4": mp4_bytes(clip), "txt": CAPTIONS[n % len(CAPTIONS)]})
        paths.append(write_tar(root / f"videos-{s:05d}.tar", samples))
    return paths


def mixture_datasets(root: Path, *, lanes: int | None = None, **overrides) -> list[dict]:
    """Two datasets (documents + pairs) as DatasetConfig dicts, shards written under ``root`` once."""
    docs = sorted(str(p) for p in (root / "docs").glob("*.tar")) or mmc4_shards(root / "docs")
    pairs = sorted(str(p) for p in (root / "pairs").glob("*.tar")) or pair_shards(root / "pairs")
    extra = {"lanes": lanes} if lanes else {}
    return [
        {"name": "docs", "format": "mmc4", "paths": docs, "batch_size": 4, "max_tokens": 64, "loss_weight": 1.0, **extra, **overrides},
        {"name": "pairs", "format": "pairs", "paths": pairs, "batch_size": 4, "loss_weight": 0.2, **extra, **overrides},
    ]


import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning
    threads slow them down many times over: run these tests on one thread, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def instruct_shards(root: Path, num_shards: int = 2, per_shard: int = 8) -> list[str]:
    """Instruction JSONL files (flamingo_vlm.data.instruct): a colour image, a question, its answer."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    names = ["red", "green", "blue", "white"]
    paths = []
    for s in range(num_shards):
        lines = []
        for i in range(per_shard):
            n = s * per_shard + i
            colour_image(n).save(root / f"img{n}.png")
            items = [{"image": f"img{n}.png"}, "Question: which colour? Answer:"]
            lines.append(json.dumps({"items": items, "answer": f" {names[n % 4]} number {n % 3}", "id": n}))
        path = root / f"train-{s}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths
