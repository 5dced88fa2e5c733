"""Build the toy world and its backbones once, into a cache directory, and reuse them after.

The full preset's backbones (world seed 0) also ship with the package (``toyworld/pretrained/``): pretraining
them is most of a fresh demo's time. They are used only when they are exactly what this code would train:
same settings, same training data (the world's LM corpus and image-text pairs, hashed) and the same
``backbones.py``; otherwise, or with ``rebuild=True`` (``flamingo demo --rebuild``), they are trained here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from . import backbones as _backbones
from .backbones import BackboneSizes, pretrain_clip, pretrain_lm
from .generate import WORLD_VERSION, WorldSizes, generate_world

DEFAULT_CACHE = Path(os.environ.get("FLAMINGO_VLM_CACHE", Path.home() / ".cache" / "flamingo-vlm"))
SHIPPED = Path(__file__).parent / "pretrained"  # {lm, clip}: the full preset's backbones, world seed 0


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


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def backbone_sources(world: Path) -> dict[str, str]:
    """Hashes of what the backbones are trained from: the LM corpus, the image-text pairs and the training code."""
    return {
        "lm_corpus": _sha256([world / "text" / "lm_corpus.txt"]),
        "pairs": _sha256(sorted((world / "pairs").glob("shard-*.tar"))),
        "code": _sha256([Path(_backbones.__file__)]),
    }


def _shipped(name: str, settings: dict, world: Path) -> Path | None:
    """The shipped backbone ``name`` if it is what this code would train on ``world`` with ``settings``."""
    info = build_info(SHIPPED / name)
    if info.get("settings") != settings or info.get("sources") != backbone_sources(world):
        return None
    return SHIPPED / name


def ensure_toyworld(
    cache_dir: str | Path | None = None,
    *,
    preset: str = "full",
    world_seed: int = 0,
    progress: bool = True,
    rebuild: bool = False,
) -> dict[str, Path]:
    """Paths of the toy world, the toy LM (with its tokenizer) and the toy CLIP, building what is missing.

    preset: "full", "quick" (smaller world, shorter pretraining) or "tiny" (tests). Returns
    {"world", "lm", "clip"}; built once per (version, preset, world seed) under ``cache_dir``
    (default ``$FLAMINGO_VLM_CACHE`` or ``~/.cache/flamingo-vlm``). The full preset's backbones come from the
    package when they match (module docstring); rebuild: train them here (and the world anew) all the same.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown toy world preset {preset!r}: expected one of {PRESETS}")
    cache = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE
    root = cache / f"toyworld-v{WORLD_VERSION}-{preset}-seed{world_seed}"
    world, lm, clip = root / "world", root / "backbones" / "lm", root / "backbones" / "clip"
    world_sizes = getattr(WorldSizes, preset)() if preset != "full" else WorldSizes()
    sizes = getattr(BackboneSizes, preset)() if preset != "full" else BackboneSizes()
    if rebuild:
        shutil.rmtree(root, ignore_errors=True)
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
    if preset == "full" and world_seed == 0 and not rebuild and not _complete(lm, lm_settings):
        shipped_lm, shipped_clip = _shipped("lm", lm_settings, world), _shipped("clip", clip_settings, world)
        if shipped_lm is not None and shipped_clip is not None:
            return {"world": world, "lm": shipped_lm, "clip": shipped_clip}
        print("toy world: the shipped backbones are not what this code trains (settings, data or backbones.py "
              "changed); pretraining them here")
    if not _complete(lm, lm_settings):
        def build_lm(tmp):
            start = time.time()
            info = pretrain_lm(world, tmp, sizes, seed=world_seed, progress=progress)
            return {**info, "seconds": time.time() - start, "settings": lm_settings, "sources": backbone_sources(world)}
        _build_atomically(lm, build_lm)
    if not _complete(clip, clip_settings):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(lm)

        def build_clip(tmp):
            start = time.time()
            info = pretrain_clip(world, tmp, tokenizer, sizes, seed=world_seed, progress=progress)
            return {**info, "seconds": time.time() - start, "settings": clip_settings, "sources": backbone_sources(world)}
        _build_atomically(clip, build_clip)
    return {"world": world, "lm": lm, "clip": clip}


def ship_backbones(cache_dir: str | Path | None = None) -> Path:
    """Copy the full preset's backbones from the cache (after ``flamingo demo --rebuild``) into the package."""
    paths = ensure_toyworld(cache_dir, preset="full")
    for name in ("lm", "clip"):
        if paths[name].parent != Path(paths["world"]).parent / "backbones":
            raise RuntimeError("the cache holds no backbones trained here: run `flamingo demo --rebuild` first")
        tmp = SHIPPED / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(paths[name], tmp)
        shutil.rmtree(SHIPPED / name, ignore_errors=True)
        os.replace(tmp, SHIPPED / name)
    return SHIPPED


if __name__ == "__main__":  # python -m flamingo_vlm.toyworld.cache: ship the backbones a --rebuild trained
    print(f"shipped the backbones into {ship_backbones()}")
