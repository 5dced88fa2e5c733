"""Interleaved image-text documents: MMC4 (webdataset repack or the original jsonl) and OBELICS (parquet).

Both become one list of items (text chunks and images, in reading order) and then one token sequence in
the paper's layout (section 2.3, appendix A.1.3)::

    <BOS>page title<EOC><image>text about image 1<EOC><image>text about image 2<EOC><EOS>

Training sees a random window of ``max_tokens`` tokens that holds at least one image, and at most the
first ``max_images`` images in it (the sequence is cut before the next one), as the paper's M3W
(256 tokens, 5 images). Images under ``min_image_size`` px or more elongated than ``max_aspect_ratio``
are dropped (paper), as are MMC4 images whose ``matched_sim`` is below ``min_similarity``.

``p_next`` (paper, appendix A.1.3): with this probability per document, each text chunk is paired with
the image *after* it instead of the one before. The model's routing is always "last preceding image",
so this is done in the data: the image moves in front of the chunk that preceded it
(``<image_2>text_1<EOC>``); text after the document's last image then has no image and is left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..processing.images import ImageTransform
from .image_files import UrlIndex, find_in_dirs, is_url, shard_image_dirs
from .images import ImageFilter, b64_bytes, decode_image, open_image, read_file
from .samples import Sample, SkipSample
from .sources import JsonlSource, ParquetSource, TarSource
from .text import TokenLayout


@dataclass
class DocImage:
    """An image of a document: opened (header parsed), pixels decoded only if it is trained on."""

    image: Image.Image
    name: str = ""


DocItem = str | DocImage


class InterleavedBuilder:
    """Document items -> a :class:`Sample` in the paper's layout, windowed and capped (see module doc)."""

    def __init__(self, layout: TokenLayout, transform: ImageTransform, *, max_tokens: int = 256, max_images: int = 5, p_next: float = 0.0) -> None:
        if max_tokens < len(layout.prefix_ids) + 3:
            raise ValueError(f"max_tokens={max_tokens} is too small for an interleaved sequence")
        self.layout, self.transform = layout, transform
        self.max_tokens, self.max_images, self.p_next = max_tokens, max_images, p_next

    def arrange(self, items: list[DocItem], use_next: bool) -> tuple[str, list[DocImage], int]:
        """Items -> (text with ``<image>`` / ``<EOC>`` tokens, the images in order, images left out)."""
        merged: list[DocItem] = []
        for item in items:  # adjacent texts join into one chunk; empty texts vanish
            if isinstance(item, str):
                text = self.layout.clean(item)
                if not text:
                    continue
                if merged and isinstance(merged[-1], str):
                    merged[-1] = f"{merged[-1]} {text}"
                    continue
                merged.append(text)
            else:
                merged.append(item)
        media, eoc = self.layout.media_token, self.layout.end_of_chunk_token
        parts: list[str] = []
        images: list[DocImage] = []
        if not use_next:  # each chunk belongs to the image before it; an image needs text after it
            for i, item in enumerate(merged):
                if isinstance(item, str):
                    parts.append(item + eoc)
                elif i + 1 < len(merged) and isinstance(merged[i + 1], str):
                    parts.append(media)
                    images.append(item)
        else:  # each chunk belongs to the image after it: that image goes in front of the chunk
            for i, item in enumerate(merged):
                if isinstance(item, DocImage) and i > 0 and isinstance(merged[i - 1], str):
                    parts.append(media + merged[i - 1] + eoc)
                    images.append(item)
        dropped = sum(isinstance(x, DocImage) for x in merged) - len(images)
        return "".join(parts), images, dropped

    def window(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        """(start, stop) of a random window of ``ids`` [n] holding at least one image with a token after it,
        cut before its (max_images + 1)-th image and after its last text token."""
        width = self.max_tokens - len(self.layout.prefix_ids)
        is_media = ids == self.layout.media_token_id
        n = len(ids)
        start = 0
        if n > width:
            seen = np.concatenate([[0], np.cumsum(is_media)])  # seen[i]: images in ids[:i]
            starts = np.arange(n - width + 1)
            valid = starts[seen[starts + width - 1] > seen[starts]]  # an image, not in the last position
            start = int(valid[rng.integers(len(valid))]) if len(valid) else 0
        stop = min(n, start + width)
        positions = np.flatnonzero(is_media[start:stop]) + start
        if len(positions) > self.max_images:
            stop = int(positions[self.max_images])
        if stop > start and is_media[stop - 1]:  # an image with no text after it is useless
            stop -= 1
        return start, stop

    def build(self, items: list[DocItem], rng: np.random.Generator, key: str = "") -> Sample:
        dropped: dict[str, int] = {}
        use_next = self.p_next > 0 and rng.random() < self.p_next
        items = list(items)
        while True:
            text, images, unused = self.arrange(items, use_next)
            if not images:
                error = SkipSample("no_images", key)
                error.dropped = dropped  # broken images dropped on the way still count
                raise error
            ids = np.asarray(self.layout.encode(text) + self.layout.suffix_ids, dtype=np.int64)
            if int((ids == self.layout.media_token_id).sum()) != len(images):
                raise SkipSample("bad_record", f"{key}: the text tokenises to a different number of images")
            start, stop = self.window(ids, rng)
            first = int((ids[:start] == self.layout.media_token_id).sum())
            count = int((ids[start:stop] == self.layout.media_token_id).sum())
            pixels, broken = [], None
            for im in images[first : first + count]:  # only the images trained on are decoded
                try:
                    pixels.append(self.transform(decode_image(im.image))[None])
                except SkipSample:
                    broken = im
                    break
            if broken is not None:  # drop the broken image and lay the document out again
                items = [x for x in items if x is not broken]
                dropped["corrupt_image"] = dropped.get("corrupt_image", 0) + 1
                continue
            if unused:
                dropped["filtered_image"] = dropped.get("filtered_image", 0) + unused
            input_ids = np.concatenate([np.asarray(self.layout.prefix_ids, dtype=np.int64), ids[start:stop]])
            return Sample(torch.from_numpy(input_ids), pixels, key=key, dropped=dropped)


class _DocumentFormat:
    """Shared: open the images of a document, filter them, count what was dropped, build the sample."""

    def __init__(self, layout: TokenLayout, transform: ImageTransform, *, max_tokens: int, max_images: int, p_next: float,
                 image_filter: ImageFilter, image_dir: str | None) -> None:
        self.builder = InterleavedBuilder(layout, transform, max_tokens=max_tokens, max_images=max_images, p_next=p_next)
        self.image_filter, self.image_dir = image_filter, image_dir

    def _open(self, load: Callable[[], bytes], name: str, dropped: dict[str, int]) -> DocImage | None:
        try:
            image = open_image(load())
        except SkipSample as e:
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
            return None
        if not self.image_filter.passes(*image.size):
            dropped["filtered_image"] = dropped.get("filtered_image", 0) + 1
            return None
        return DocImage(image, name)

    def _finish(self, items: list[DocItem], dropped: dict[str, int], rng: np.random.Generator, key: str) -> Sample:
        try:
            sample = self.builder.build(items, rng, key)
        except SkipSample as e:
            for reason, n in dropped.items():  # the lane still counts the images dropped on the way
                e.dropped[reason] = e.dropped.get(reason, 0) + n
            raise
        for reason, n in dropped.items():
            sample.dropped[reason] = sample.dropped.get(reason, 0) + n
        return sample


class MMC4Format(_DocumentFormat):
    """MMC4 documents (Zhu et al., 2023), in either form:

    - the webdataset repack: tar shards of ``{key}.json`` records;
    - the original release: ``.jsonl`` files (or ``.jsonl.gz``, or ``.zip`` holding one), one document
      a line, images as the download script leaves them: shard ``docs_no_face_shard_{i}_v3.jsonl.zip``'s
      in ``docs_no_face_shard_{i}_v3_images/`` (beside the shard or under ``image_dir``), or all in
      ``image_dir`` (see :mod:`flamingo_vlm.data.image_files`).

    A document::

        {"text_list": ["sentence 0", "sentence 1", ...],
         "image_info": [{"image_name": "a.jpg", "matched_text_index": 1, "matched_sim": 0.31,
                         "image_base64": "..."  (repack; else the image file image_name)}, ...]}

    Each image goes in front of its matched sentence. When several images match one sentence, the most
    similar one that opens is kept: they are tried in order of similarity, so a failed download of the
    best one falls back to the next. Images below ``min_similarity`` or failing the size/aspect filter
    are dropped; a document left without images is skipped (``no_images``).
    """

    def __init__(self, layout, transform, *, min_similarity: float = 0.24, jsonl: bool = False, **kwargs: Any) -> None:
        super().__init__(layout, transform, **kwargs)
        self.min_similarity = min_similarity
        self.source = JsonlSource() if jsonl else TarSource()
        self.source_extensions = self.source.extensions
        self._dirs: dict[str, list[str]] = {}  # shard -> its image folders (looked up once per shard)

    def _image_dirs(self, shard: str) -> list[str]:
        if shard not in self._dirs:
            self._dirs[shard] = shard_image_dirs(shard, self.image_dir)
        return self._dirs[shard]

    def decode(self, record: dict, rng: np.random.Generator) -> Sample:
        key = f"{record['__url__']}#{record['__key__']}"
        raw = record.get("line", record.get("json"))
        if raw is None:
            raise SkipSample("bad_record", f"{key}: no .json member")
        try:
            doc = json.loads(raw)
            texts, infos = doc["text_list"], doc.get("image_info") or []
            if not isinstance(texts, list) or not isinstance(infos, list):
                raise TypeError("text_list and image_info must be lists")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise SkipSample("bad_record", f"{key}: {e}") from e
        dropped: dict[str, int] = {}
        candidates: dict[int, list[tuple[float, int, dict]]] = {}  # sentence -> (similarity, order, image info)
        for order, info in enumerate(infos):
            index = info.get("matched_text_index") if isinstance(info, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(texts):
                dropped["bad_record"] = dropped.get("bad_record", 0) + 1
                continue
            sim = float(info.get("matched_sim", 1.0) or 0.0)
            if sim < self.min_similarity:
                dropped["filtered_image"] = dropped.get("filtered_image", 0) + 1
                continue
            candidates.setdefault(index, []).append((-sim, order, info))
        images: dict[int, DocImage] = {}
        for index, found in sorted(candidates.items()):
            found.sort(key=lambda c: (c[0], c[1]))  # most similar first; ties in document order
            for tried, (_, _, info) in enumerate(found):
                opened = self._open(self._load(info, record["__url__"]), str(info.get("image_name", "")), dropped)
                if opened is not None:
                    images[index] = opened
                    untried = len(found) - tried - 1  # less similar images of this sentence: not used
                    if untried:
                        dropped["filtered_image"] = dropped.get("filtered_image", 0) + untried
                    break
        items: list[DocItem] = []
        for index, text in enumerate(texts):
            if index in images:
                items.append(images[index])
            if isinstance(text, str):
                items.append(text)
        return self._finish(items, dropped, rng, key)

    def _load(self, info: dict, shard: str) -> Callable[[], bytes]:
        if info.get("image_base64"):
            return lambda: b64_bytes(info["image_base64"])
        name = str(info.get("image_name", ""))
        return lambda: read_file(find_in_dirs(name, self._image_dirs(shard)))


class ObelicsFormat(_DocumentFormat):
    """OBELICS documents (Laurençon et al., 2023): parquet rows with aligned lists ``images`` and
    ``texts``, exactly one of them non-null at each position (the document in reading order).

    An image entry is embedded bytes (``binary``, or a ``{"bytes": ..., "path": ...}`` struct as the
    Hugging Face ``Image`` feature stores it) or a string: a local path, a path under ``image_dir``, or
    (as OBELICS ships) a URL, found through the img2dataset output in ``image_dir`` by the whole URL
    (:class:`~flamingo_vlm.data.image_files.UrlIndex`). Missing files are skipped and counted.
    """

    def __init__(self, layout, transform, *, image_column: str = "images", text_column: str = "texts", **kwargs: Any) -> None:
        super().__init__(layout, transform, **kwargs)
        self.image_column, self.text_column = image_column, text_column
        self.source = ParquetSource([image_column, text_column])
        self.source_extensions = self.source.extensions
        self.urls = UrlIndex(self.image_dir) if self.image_dir else None

    def _loader(self, entry: Any) -> tuple[Callable[[], bytes], str]:
        if isinstance(entry, (bytes, bytearray)):
            return (lambda: bytes(entry)), ""
        if isinstance(entry, dict):
            if entry.get("bytes"):
                return (lambda: bytes(entry["bytes"])), str(entry.get("path") or "")
            entry = entry.get("path")
        if isinstance(entry, str) and entry:
            if is_url(entry):
                if self.urls is None:
                    raise SkipSample("missing_file", f"{entry}: images named by URL need image_dir (an img2dataset output folder)")
                return (lambda: read_file(self.urls.find(entry))), entry
            return (lambda: read_file(find_in_dirs(entry, [self.image_dir] if self.image_dir else []))), entry
        raise SkipSample("bad_record", f"unreadable image entry {type(entry).__name__}")

    def decode(self, record: dict, rng: np.random.Generator) -> Sample:
        key = f"{record['__url__']}#{record['__key__']}"
        row = record["row"]
        images, texts = row.get(self.image_column), row.get(self.text_column)
        if not isinstance(images, list) or not isinstance(texts, list) or len(images) != len(texts):
            raise SkipSample("bad_record", f"{key}: `{self.image_column}` and `{self.text_column}` must be lists of one length")
        dropped: dict[str, int] = {}
        items: list[DocItem] = []
        for image, text in zip(images, texts):
            if (image is None) == (text is None):
                raise SkipSample("bad_record", f"{key}: each position needs exactly one of image / text")
            if text is not None:
                items.append(str(text))
                continue
            try:
                load, name = self._loader(image)
            except SkipSample as e:
                dropped[e.reason] = dropped.get(e.reason, 0) + 1
                continue
            opened = self._open(load, name, dropped)
            if opened is not None:
                items.append(opened)
        return self._finish(items, dropped, rng, key)
