"""Build the toy world and its backbones once, into a cache directory, and reuse them after."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .backbones import BackboneSizes, pretrain_clip, pretrain_lm
from .generate import WORLD_VERSION, WorldSizes, generate_world

DEFAULT_CACHE = Path(os.environ.get("FLAMINGO_VLM_CACHE", Path.home() / ".cache" / "flamingo-vlm"))


def _complete(path: Path, settings: dict | None = None) -> bool:
    """Whether ``path`` was built to the end (and, given ``settings``, built with exactly those)."""
    return (path / "DONE").is_file() and (settings is None or build_info(path).get("settings") == settings)


def build_info(path: str | Path) -> dict:
    """What a finished build recorded in its DONE file (e.g. the toy LM's loss and binding accuracy); {} if unbuilt."""
    path = Path(path)
    return json.loads((path / "DONE").read_text()) if _complete(path) else {}


def _build_atomically(final: Path, build) -> dict:
    """Run ``build(tmp_dir)`` in a temporary directory, then rename it into place (a killed build leaves nothing)."""
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info = build(tmp) or {}
    (tmp / "DONE").write_text(json.dumps(info, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return info


PRESETS = ("full", "quick", "tiny")


def ensure_toyworld(
    cache_dir: str | Path | None = None,
    *,
    preset: str = "full",
    world_seed: int = 0,
    progress: bool = True,
) -> dict[str, Path]:
    """Paths of the toy world, the toy LM (with its tokenizer) and the toy CLIP, building what is missing.

    preset: "full", "quick" (smaller world, shorter pretraining) or "tiny" (tests). Returns
    {"world", "lm", "clip"}; built once per (version, preset, world seed) under ``cache_dir``
    (default ``$FLAMINGO_VLM_CACHE`` or ``~/.cache/flamingo-vlm``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown toy world preset {preset!r}: expected one of {PRESETS}")
    cache = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE
    root = cache / f"toyworld-v{WORLD_VERSION}-{preset}-seed{world_seed}"
    world, lm, clip = root / "world", root / "backbones" / "lm", root / "backbones" / "clip"
    world_sizes = getattr(WorldSizes, preset)() if preset != "full" else WorldSizes()
    sizes = getattr(BackboneSizes, preset)() if preset != "full" else BackboneSizes()
    if not _complete(world):
        def build_world(tmp):
            generate_world(tmp, seed=world_seed, sizes=world_sizes, progress=progress)
            return {"sizes": asdict(world_sizes)}
        _build_atomically(world, build_world)
    # A backbone is rebuilt when the settings it was trained with change (the other one is kept): a cache
    # from an older release never serves a backbone the current code would not have trained.
    all_settings = asdict(sizes)
    lm_settings = {k: v for k, v in all_settings.items() if k.startswith("lm_") or k == "vocab_size"}
    clip_settings = {"lm": lm_settings, **{k: v for k, v in all_settings.items() if k.startswith("clip_")}}
    if not _complete(lm, lm_settings):
        def build_lm(tmp):
            start = time.time()
            info = pretrain_lm(world, tmp, sizes, seed=world_seed, progress=progress)
            return {**info, "seconds": time.time() - start, "settings": lm_settings}
        _build_atomically(lm, build_lm)
    if not _complete(clip, clip_settings):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(lm)

        def build_clip(tmp):
            start = time.time()
            info = pretrain_clip(world, tmp, tokenizer, sizes, seed=world_seed, progress=progress)
            return {**info, "seconds": time.time() - start, "settings": clip_settings}
        _build_atomically(clip, build_clip)
    return {"world": world, "lm": lm, "clip": clip}
