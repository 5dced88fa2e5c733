"""Reading annotation files and locating the media they name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ...processing.video import VIDEO_SUFFIXES


def require_file(path: str | Path | None, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what} is required")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def require_dir(path: str | Path | None, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what} is required")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} is not a directory: {p}")
    return p


def memo(obj: Any, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per object and key (tasks read their annotation files on first use)."""
    store = obj.__dict__.setdefault("_memo", {})
    if key not in store:
        store[key] = compute()
    return store[key]


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def records(data: Any, *keys: str) -> list[dict]:
    """The list of rows of an annotation file: the file itself, or its first of ``keys`` that holds a list."""
    if isinstance(data, list):
        return data
    for key in keys:
        if isinstance(data, dict) and isinstance(data.get(key), list):
            return data[key]
    raise ValueError(f"expected a list of rows or a dict with one of {keys}, got {type(data).__name__}")


class VideoFinder:
    """Row of a video annotation file -> its video file.

    ``name_format`` (e.g. ``"vid{video_id}.avi"``) is formatted with the row; without it, the row's
    ``video`` / ``video_name`` / ``videoID`` / ``video_id`` names the file, with or without its extension.
    """

    NAME_KEYS = ("video", "video_name", "videoID", "video_id")

    def __init__(self, video_dir: str | Path, name_format: str | None = None) -> None:
        self.video_dir = require_dir(video_dir, "video_dir")
        self.name_format = name_format
        self._by_stem: dict[str, str] | None = None

    def __call__(self, row: dict) -> Path:
        if self.name_format is not None:
            return self.video_dir / self.name_format.format(**row)
        key = next((k for k in self.NAME_KEYS if k in row), None)
        if key is None:
            raise ValueError(f"a video row needs one of {self.NAME_KEYS} (or give video_name_format), got keys {sorted(row)}")
        name = str(row[key])
        if Path(name).suffix.lower() in VIDEO_SUFFIXES:
            return self.video_dir / name
        if self._by_stem is None:  # one directory listing, not one stat per candidate extension
            self._by_stem = {p.stem: p.name for p in self.video_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES}
        if name not in self._by_stem:
            raise FileNotFoundError(f"no video file for {key}={name!r} in {self.video_dir} (give video_name_format?)")
        return self.video_dir / self._by_stem[name]
