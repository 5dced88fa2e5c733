"""Media of prompts (images, video files, tensors), each distinct medium encoded once per run.

A few-shot evaluation shows the same support images in many prompts. :class:`MediaEncoder` runs the
frozen vision encoder and the resampler once per distinct medium (batched, LRU-cached), and each
cross-attention block's key/value projection of those visual tokens once per medium too (LRU-cached
within a byte budget), and hands the model ``visual_tokens`` and ``media_kv``; it also gives pooled
vision-encoder embeddings for RICES.

One encoder must live as long as the run (the evaluation runner holds one for all its tasks, shots and
seeds): an encoder made per call, as ``generate_texts`` does when given none, starts empty.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from ..modeling import MediaKV
from ..processing.video import is_video_path, load_video


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class _LRU:
    """Least-recently-used map holding at most ``capacity`` entries and, when given, ``max_bytes`` of tensors."""

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        self.data: OrderedDict = OrderedDict()

    def get(self, key):
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key][0]
        return None

    def put(self, key, value) -> None:
        size = _nbytes(value) if self.max_bytes is not None else 0
        if key in self.data:
            self.bytes -= self.data.pop(key)[1]
        self.data[key] = (value, size)
        self.bytes += size
        while self.data and (len(self.data) > self.capacity or (self.max_bytes is not None and self.bytes > self.max_bytes)):
            self.bytes -= self.data.popitem(last=False)[1][1]

    def __len__(self) -> int:
        return len(self.data)


class MediaEncoder:
    """Pixels, visual tokens, media keys/values and RICES embeddings of prompt media, each computed once per
    distinct medium.

    A medium is a path (image or video file), a PIL image, a :class:`Video` or a tensor. Paths are keyed by
    path; objects by identity, with the object kept alive in the cache entry so its id cannot be reused.

    cache_size: visual tokens / embeddings kept (entries); 0 keeps nothing between calls (every call
    encodes its media afresh, once per distinct medium in the call: the baseline that benchmarks compare
    with). kv_cache_bytes: budget of the per-medium keys/values of every xattn block (at the of-equal
    sizes 2 MiB a medium); 0 computes them per call from the visual tokens.
    """

    def __init__(self, model, processor, *, batch_size: int = 32, cache_size: int = 4096, kv_cache_bytes: int = 1 << 30) -> None:
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self._pixels = _LRU(min(cache_size, 256))  # decoded + transformed; large, so few
        self._tokens = _LRU(cache_size)  # [n, d] visual tokens after the resampler
        self._embeddings = _LRU(cache_size * 4)  # [d] pooled, L2-normalised vision features
        self._kv = _LRU(cache_size, kv_cache_bytes)  # per xattn block ([H, n, D] keys, [H, n, D] values)

    @staticmethod
    def _key(item: Any, num_frames: int):
        if isinstance(item, (str, Path)):
            return ("path", str(item), num_frames if is_video_path(item) else 0)
        return ("object", id(item))

    def _lookup(self, cache: _LRU, item: Any, num_frames: int):
        entry = cache.get(self._key(item, num_frames))
        if entry is None or (not isinstance(item, (str, Path)) and entry[0] is not item):
            return None
        return entry[1]

    def _store(self, cache: _LRU, item: Any, num_frames: int, value) -> None:
        cache.put(self._key(item, num_frames), (None if isinstance(item, (str, Path)) else item, value))

    def pixels(self, item: Any, num_frames: int = 8) -> torch.Tensor:
        """One medium -> preprocessed frames [T, C, H, W] (an image is one frame)."""
        cached = self._lookup(self._pixels, item, num_frames)
        if cached is not None:
            return cached
        source = load_video(item, num_frames) if is_video_path(item) else item
        x = self.processor.media_tensor(source)
        self._store(self._pixels, item, num_frames, x)
        return x

    def _distinct(self, items: list, num_frames: int) -> dict:
        """key -> first item with that key, in first-seen order."""
        out: dict = {}
        for item in items:
            out.setdefault(self._key(item, num_frames), item)
        return out

    def _cached(self, items: list, num_frames: int, cache: _LRU) -> tuple[dict, list]:
        """(key -> cached value, [(key, item)] of the distinct media not in ``cache``), in first-seen order."""
        found, missing = {}, []
        for key, item in self._distinct(items, num_frames).items():
            value = self._lookup(cache, item, num_frames)
            if value is None:
                missing.append((key, item))
            else:
                found[key] = value
        return found, missing

    def _encode(self, items: list, num_frames: int, cache: _LRU, encode: Callable, side_cache: _LRU | None = None) -> list:
        """Per item, ``encode(pixel_values [m, T, C, H, W]) -> [m, ...]`` of it: from the cache, or computed
        (batched, grouped by shape) for each distinct uncached medium once.

        side_cache: ``encode`` returns a pair ([m, ...] for ``cache``, [m, ...] for ``side_cache``), both
        stored, the first returned: two products of one vision pass.
        """
        found, missing = self._cached(items, num_frames, cache)
        device = self.model.device
        for start in range(0, len(missing), self.batch_size):  # streamed: only one batch of pixels alive
            groups: dict[tuple, list] = {}
            for key, item in missing[start : start + self.batch_size]:
                x = self.pixels(item, num_frames)
                groups.setdefault(tuple(x.shape), []).append((key, item, x))
            for group in groups.values():  # one shape per group: no frame padding, no frame_mask
                pixel_values = torch.stack([x for _, _, x in group]).to(device)
                with torch.no_grad():
                    out = encode(pixel_values)
                if side_cache is not None:
                    out, side = out
                    for (_, item, _), value in zip(group, side):
                        self._store(side_cache, item, num_frames, value)
                for (key, item, _), value in zip(group, out):
                    found[key] = value
                    self._store(cache, item, num_frames, value)
        return [found[self._key(item, num_frames)] for item in items]

    def visual_tokens(self, items: list, num_frames: int = 8) -> torch.Tensor | None:
        """Media in prompt order -> visual tokens [M, n, d] (None when there are none)."""
        if not items:
            return None
        return torch.stack(self._encode(items, num_frames, self._tokens, self.model.encode_media))

    def media_kv(self, items: list, num_frames: int = 8, visual_tokens: torch.Tensor | None = None) -> MediaKV | None:
        """Media in prompt order -> each xattn block's (keys, values) [M, H, n, D] of their visual tokens
        (``FlamingoModel.media_kv``), projected once per distinct medium while the byte budget holds them.

        visual_tokens [M, n, d]: those of ``items`` when the caller has them already (no second lookup).
        """
        if not items:
            return None
        if self._kv.max_bytes == 0 or self._kv.capacity == 0:
            tokens = visual_tokens if visual_tokens is not None else self.visual_tokens(items, num_frames)
            with torch.no_grad():
                return self.model.media_kv(tokens)
        found, missing = self._cached(items, num_frames, self._kv)
        if missing:
            if visual_tokens is not None:
                row = {}
                for i, item in enumerate(items):
                    row.setdefault(self._key(item, num_frames), i)
                tokens = visual_tokens[[row[key] for key, _ in missing]]
            else:
                tokens = self.visual_tokens([item for _, item in missing], num_frames)
            with torch.no_grad():
                kv = self.model.media_kv(tokens)  # per block ([m, H, n, D], [m, H, n, D])
            for i, (key, item) in enumerate(missing):
                # cloned: a slice would keep the whole batch's storage alive past its byte accounting
                value = tuple((k[i].clone(), v[i].clone()) for k, v in kv)
                found[key] = value
                self._store(self._kv, item, num_frames, value)
        per_item = [found[self._key(item, num_frames)] for item in items]
        return tuple(
            (torch.stack([p[b][0] for p in per_item]), torch.stack([p[b][1] for p in per_item])) for b in range(len(per_item[0]))
        )

    def embeddings(self, items: list, num_frames: int = 8, *, keep_visual_tokens: bool = False) -> torch.Tensor:
        """Media -> [M, d]: the frozen vision encoder's features averaged over positions and frames, L2-normalised.

        The similarity RICES retrieves by (the paper uses the frozen encoder's image embedding).
        keep_visual_tokens: also cache the media's visual tokens from the same vision pass, for media about to
        be shown in a prompt (a RICES query's own image), so the encoder does not run on them twice.
        """
        if not items:
            return torch.zeros(0, 0)

        def pooled(features: torch.Tensor) -> torch.Tensor:  # [m, T, S, d] -> [m, d]
            return F.normalize(features.float().mean(dim=(1, 2)), dim=-1).cpu()

        if not keep_visual_tokens:
            return torch.stack(self._encode(items, num_frames, self._embeddings, lambda x: pooled(self.model.encode_vision(x))))

        def pooled_and_tokens(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.model.encode_vision(pixel_values)  # [m, T, S, d]
            resampler = self.model.resampler  # encode_media's second half, on the features already computed
            return pooled(features), resampler(features.to(resampler.latents.dtype), None)

        return torch.stack(self._encode(items, num_frames, self._embeddings, pooled_and_tokens, side_cache=self._tokens))

    def prefetch(self, items: Iterable, num_frames: int = 8) -> None:
        """Encode many media ahead of use (batched): visual tokens, and keys/values within the budget."""
        items = list(items)
        for start in range(0, len(items), self.batch_size):  # a batch's tokens and keys/values alive at a time
            chunk = items[start : start + self.batch_size]
            self.media_kv(chunk, num_frames, self.visual_tokens(chunk, num_frames))
