"""Vision features computed once per distinct frame, for runs that see their images many times.

A frozen vision encoder gives a frame the same features every time it sees it, and the training pipeline
applies no random augmentation to a frame's pixels, so a run of several epochs (the toy demo's four; a
fine-tuning run's dozens over a task's training split) need only encode each distinct frame once. With
``TrainConfig.cache_vision_features`` the training loop looks every frame up here first, by a digest of its
pixels: a hit returns what the encoder returned for the same pixels (so it is exact, up to the order of
floating-point sums inside the batch the frame was first encoded in), and only the misses of a step go
through the encoder, as one batch.
"""

from __future__ import annotations

import hashlib

import torch


class VisionFeatureCache:
    """Frame digest -> vision features [S, d] (on the CPU), up to ``max_bytes`` of features.

    Once full, new frames are encoded every time they come (nothing is evicted: an epoch-long run has no
    frame more likely to come back than another).
    """

    def __init__(self, model, max_bytes: int) -> None:
        self.model = model
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._features: dict[bytes, torch.Tensor] = {}

    @staticmethod
    def key(frame: torch.Tensor) -> bytes:
        """A frame's digest: its pixels' bytes, shape and dtype."""
        frame = frame.detach().cpu().contiguous()
        digest = hashlib.blake2b(frame.numpy().tobytes(), digest_size=16)
        digest.update(repr((tuple(frame.shape), str(frame.dtype))).encode())
        return digest.digest()

    def __call__(self, pixel_values: torch.Tensor, frame_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """pixel_values [M, T, C, H, W] (+ frame_mask [M, T]) -> vision features [M, T, S, d] on ``device``,
        zeros for padding frames (as :meth:`FlamingoModel.encode_vision` gives them)."""
        m, t = pixel_values.shape[:2]
        frames = pixel_values.flatten(0, 1)
        keep = torch.ones(m * t, dtype=torch.bool) if frame_mask is None else frame_mask.reshape(-1).bool().cpu()
        index = keep.nonzero().flatten().tolist()
        if not index:
            raise ValueError("a batch with media has no frame to encode (every frame masked)")
        keys = [self.key(frames[i]) for i in index]
        first: dict[bytes, int] = {}  # each distinct frame's first position: encoded once
        for i, k in zip(index, keys):
            first.setdefault(k, i)
        missing = [k for k in first if k not in self._features]
        new: dict[bytes, torch.Tensor] = {}
        if missing:
            batch = torch.stack([frames[first[k]] for k in missing])[:, None].to(device)
            with torch.no_grad():
                encoded = self.model.encode_vision(batch)[:, 0]
            for k, f in zip(missing, encoded):
                new[k] = f
                size = f.numel() * f.element_size()
                if self.bytes + size <= self.max_bytes:
                    self._features[k] = f.detach().to("cpu", copy=True)  # its own storage: what `bytes` counts
                    self.bytes += size
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        rows = torch.stack([new[k] if k in new else self._features[k].to(device) for k in keys])
        out = rows.new_zeros(m * t, *rows.shape[1:])
        out[torch.tensor(index, device=device)] = rows
        return out.view(m, t, *out.shape[1:])
