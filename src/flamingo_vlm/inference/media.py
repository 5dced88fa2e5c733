"""Media of prompts (images, video files, tensors), each distinct medium encoded once.

A few-shot evaluation shows the same support images in many prompts. :class:`MediaEncoder` runs the
frozen vision encoder and the resampler once per distinct medium (batched, LRU-cached) and hands the
model ``visual_tokens``; it also gives pooled vision-encoder embeddings for RICES.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from ..processing.video import is_video_path, load_video


class _LRU:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: OrderedDict = OrderedDict()

    def get(self, key):
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        return None

    def put(self, key, value) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.capacity:
            self.data.popitem(last=False)


class MediaEncoder:
    """Pixels, visual tokens and RICES embeddings of prompt media, each computed once per distinct medium.

    A medium is a path (image or video file), a PIL image, a :class:`Video` or a tensor. Paths are keyed by
    path; objects by identity, with the object kept alive in the cache entry so its id cannot be reused.
    """

    def __init__(self, model, processor, *, batch_size: int = 32, cache_size: int = 4096) -> None:
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self._pixels = _LRU(min(cache_size, 256))  # decoded + transformed; large, so few
        self._tokens = _LRU(cache_size)  # [n, d] visual tokens after the resampler
        self._embeddings = _LRU(cache_size * 4)  # [d] pooled, L2-normalised vision features

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

    def _encode_missing(self, items: list, num_frames: int, cache: _LRU, encode) -> None:
        """Run ``encode(pixel_values [m, T, C, H, W]) -> [m, ...]`` on the uncached items, grouped by shape."""
        missing, seen = [], set()
        for item in items:
            key = self._key(item, num_frames)
            if key not in seen and self._lookup(cache, item, num_frames) is None:
                seen.add(key)
                missing.append(item)
        device = self.model.device
        for start in range(0, len(missing), self.batch_size):  # streamed: only one batch of pixels alive
            groups: dict[tuple, list] = {}
            for item in missing[start : start + self.batch_size]:
                x = self.pixels(item, num_frames)
                groups.setdefault(tuple(x.shape), []).append((item, x))
            for group in groups.values():  # one shape per group: no frame padding, no frame_mask
                pixel_values = torch.stack([x for _, x in group]).to(device)
                with torch.no_grad():
                    out = encode(pixel_values)
                for (item, _), value in zip(group, out):
                    self._store(cache, item, num_frames, value)

    def visual_tokens(self, items: list, num_frames: int = 8) -> torch.Tensor | None:
        """Media in prompt order -> visual tokens [M, n, d] (None when there are none)."""
        if not items:
            return None
        self._encode_missing(items, num_frames, self._tokens, self.model.encode_media)
        return torch.stack([self._lookup(self._tokens, item, num_frames) for item in items])

    def embeddings(self, items: list, num_frames: int = 8) -> torch.Tensor:
        """Media -> [M, d]: the frozen vision encoder's features averaged over positions and frames, L2-normalised.

        The similarity RICES retrieves by (the paper uses the frozen encoder's image embedding).
        """
        if not items:
            return torch.zeros(0, 0)

        def pooled(pixel_values: torch.Tensor) -> torch.Tensor:
            features = self.model.encode_vision(pixel_values)  # [m, T, S, d]
            return F.normalize(features.float().mean(dim=(1, 2)), dim=-1).cpu()

        self._encode_missing(items, num_frames, self._embeddings, pooled)
        return torch.stack([self._lookup(self._embeddings, item, num_frames) for item in items])

    def prefetch(self, items: Iterable, num_frames: int = 8) -> None:
        """Encode many media ahead of use (one batched pass)."""
        self.visual_tokens(list(items), num_frames)
