"""Where a document's image file is, in the layouts the datasets are published and downloaded in.

- **MMC4** (the original jsonl release): ``allenai/mmc4``'s ``download_images.py`` puts the images of
  shard ``docs_no_face_shard_{i}_v3.jsonl(.zip)`` in their own folder ``docs_no_face_shard_{i}_v3_images/``
  (by default beside the shard, or under any folder: ``image_dir``), each named by its ``image_name``.
  :func:`shard_image_dirs` gives a shard's folders; a flat ``image_dir`` holding every image also works.
- **OBELICS** names images by URL only. Fetched with img2dataset (``output_format: files``), as its card
  suggests, each image is ``{shard}/{key}.jpg`` with the URL in ``{shard}/{key}.json`` and in the shard's
  ``{shard}.parquet``. :class:`UrlIndex` maps each *whole* URL to its file from that output, so two URLs
  with the same last path segment (``.../1/image.jpg``, ``.../2/image.jpg``) never share a file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from urllib.parse import urlsplit

from .samples import SkipSample

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_SUFFIXES = (".zip", ".gz", ".jsonl", ".json")


def is_url(name: str) -> bool:
    return bool(urlsplit(name).scheme) and "://" in name


def shard_image_dirs(shard: str, image_dir: str | None) -> list[str]:
    """The existing folders that may hold ``shard``'s images, most specific first: ``<stem>_images`` under
    ``image_dir`` and beside the shard (``stem``: the shard's name without .zip / .gz / .jsonl, and the
    download script's default, which keeps ``.jsonl`` for a zip), then ``image_dir`` itself."""
    name = os.path.basename(shard)
    stems = []
    stem = name
    while stem.endswith(SHARD_SUFFIXES):
        stem = os.path.splitext(stem)[0]
        stems.append(stem)
    roots = [r for r in (image_dir, os.path.dirname(shard)) if r]
    candidates = [os.path.join(root, f"{s}_images") for s in reversed(stems) for root in roots]
    if image_dir:
        candidates.append(image_dir)
    seen: list[str] = []
    for c in candidates:
        if c not in seen and os.path.isdir(c):
            seen.append(c)
    return seen


def find_in_dirs(name: str, dirs: list[str]) -> str:
    """``name`` (a file name, or a path relative to one of ``dirs``, or absolute) -> the existing file;
    SkipSample("missing_file") if none of ``dirs`` has it."""
    if os.path.isabs(name):
        if os.path.isfile(name):
            return name
    else:
        for d in dirs:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    raise SkipSample("missing_file", f"{name} (looked in {dirs or 'no image folder'})")


class UrlIndex:
    """URL -> image file of an img2dataset output folder (``output_format: files``), built on first use.

    Read from the per-shard ``{shard}.parquet`` files img2dataset writes (columns ``url``, ``key``,
    ``status``), or, without them, from the ``{key}.json`` written beside every image. Only successful
    downloads are indexed. One URL is one file: a lookup is by the whole URL, never by its last segment.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._map: dict[str, tuple[str, str]] | None = None  # url -> (folder, key)
        self._lock = threading.Lock()

    def _build(self) -> dict[str, tuple[str, str]]:
        index: dict[str, tuple[str, str]] = {}
        entries = sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
        parquets = [e for e in entries if e.endswith(".parquet") and os.path.isdir(os.path.join(self.root, e[: -len(".parquet")]))]
        if parquets:
            import pyarrow.parquet as pq

            for name in parquets:
                folder = os.path.join(self.root, name[: -len(".parquet")])
                table = pq.read_table(os.path.join(self.root, name), columns=["url", "key", "status"]).to_pydict()
                for url, key, status in zip(table["url"], table["key"], table["status"]):
                    if status == "success" and url and key:
                        index.setdefault(url, (folder, key))
        else:
            for folder, _, files in os.walk(self.root):
                for f in sorted(files):
                    if not f.endswith(".json") or f.endswith("_stats.json"):
                        continue
                    try:
                        with open(os.path.join(folder, f), encoding="utf-8") as fh:
                            meta = json.load(fh)
                    except (OSError, ValueError):
                        continue
                    if isinstance(meta, dict) and meta.get("url") and meta.get("status", "success") == "success":
                        index.setdefault(meta["url"], (folder, str(meta.get("key") or f[: -len(".json")])))
        if not index:
            logger.warning("image_dir %s holds no img2dataset output (no {shard}.parquet or {key}.json with a url): "
                           "images named by URL will not be found", self.root)
        return index

    def __len__(self) -> int:
        return len(self._lookup_map())

    def _lookup_map(self) -> dict[str, tuple[str, str]]:
        if self._map is None:
            with self._lock:
                if self._map is None:
                    self._map = self._build()
        return self._map

    def find(self, url: str) -> str:
        """The file of ``url``; SkipSample("missing_file") if img2dataset did not fetch it."""
        hit = self._lookup_map().get(url)
        if hit is not None:
            folder, key = hit
            for ext in IMAGE_EXTENSIONS:
                path = os.path.join(folder, f"{key}.{ext}")
                if os.path.isfile(path):
                    return path
        raise SkipSample("missing_file", f"{url} (not in the img2dataset output in {self.root})")

    def __getstate__(self) -> dict:  # DataLoader workers get the index built so far, not the lock
        return {"root": self.root, "_map": self._map}

    def __setstate__(self, state: dict) -> None:
        self.root, self._map = state["root"], state["_map"]
        self._lock = threading.Lock()
