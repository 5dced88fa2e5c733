"""Perceiver Resampler (Flamingo, appendix A.1.1): a variable number of vision features -> a fixed
number of visual tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import FeedForward


def spatial_position_init(positions: int, dim: int) -> torch.Tensor:
    """[positions, dim] initial spatial embeddings: 2-D sine-cosine codes of a square grid of features in
    row-major order (random codes for other layouts), centred over the positions, at unit scale like the
    latents (smaller, they are lost in the features under the LayerNorm).

    Wavelengths run from twice the grid's side down to 2 features, so "left of", "above" and "in the
    middle" are linear in the code from the first step; with random codes the bridge has to discover the
    layout, which a small bridge does not do reliably.
    """
    side = math.isqrt(positions)
    if side * side != positions or dim % 4 or side < 2:
        return torch.randn(positions, dim)
    n = dim // 4
    freqs = (math.pi / side) * side ** (torch.arange(n, dtype=torch.float64) / max(n - 1, 1))  # pi/side .. pi
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")
    codes = torch.cat([f(c.reshape(-1, 1) * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)], dim=1)
    codes = codes - codes.mean(dim=0)
    return (codes / codes.std()).float()


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media features, latents) (keys/values), as in the paper's pseudo-code.

    ``qk_norm``: a LayerNorm over each head's queries and keys (IDEFICS's qk_layer_norms_perceiver).
    """

    def __init__(self, *, dim: int, heads: int, dim_head: int, qk_norm: bool = False) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim_head) if qk_norm else None
        self.k_norm = nn.LayerNorm(dim_head) if qk_norm else None

    def forward(
        self, features: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """features [M, S, d], latents [M, n, d], key_mask [M, S + n] (True = attend) -> [M, n, d]."""
        features = self.norm_media(features)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "m s (h d) -> m h s d", h=self.heads) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(rearrange(out, "m h n d -> m n (h d)"))


class PerceiverResampler(nn.Module):
    """[M, T, S, d] frame features (+ optional frame mask [M, T]) -> [M, num_latents, d] visual tokens.

    M media (images are videos of one frame), T frames, S features per frame. A learned time embedding
    is added per frame; videos longer than ``max_num_frames`` use linearly interpolated embeddings
    (the paper trains on 8 frames and evaluates on 30). The paper adds no spatial position encodings (they
    gave no gain with its large encoder); ``spatial_positions=S`` adds a learned embedding per feature
    position, for encoders whose features carry little of where they are (small ones, like the toy world's).
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int = 6,
        num_latents: int = 64,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        max_num_frames: int = 8,
        activation: str = "squared_relu",
        spatial_positions: int = 0,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.time_embeddings = nn.Parameter(torch.randn(max_num_frames, dim) * 0.02)
        self.spatial_embeddings = nn.Parameter(spatial_position_init(spatial_positions, dim)) if spatial_positions else None
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim=dim, heads=heads, dim_head=dim_head, qk_norm=qk_norm),
                    FeedForward(dim, mult=ff_mult, activation=activation),
                ]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    @property
    def num_latents(self) -> int:
        return self.latents.shape[0]

    def time_embedding(self, num_frames: int) -> torch.Tensor:
        """[num_frames, d]: the learned embeddings, linearly interpolated past the trained length."""
        emb = self.time_embeddings
        if num_frames <= emb.shape[0]:
            return emb[:num_frames]
        resized = F.interpolate(emb.T[None], size=num_frames, mode="linear", align_corners=True)
        return resized[0].T

    def frame_time_embeddings(self, num_frames: int, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[M, T, d] per-frame embeddings for frame_mask [M, T] ([1, T, d] without a mask).

        Each medium's real frames get the embeddings of its own length (its k-th real frame gets
        ``time_embedding(n)[k]``), so padding frames never shift or rescale them, even past max_num_frames.
        """
        if frame_mask is None:
            return self.time_embedding(num_frames)[None]
        mask = frame_mask.bool()
        counts = mask.sum(dim=1).clamp(min=1)  # real frames per medium [M]
        rank = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # index of each frame among its medium's real frames
        emb = self.time_embeddings.new_zeros(*mask.shape, self.time_embeddings.shape[1])
        for n in counts.unique().tolist():
            rows = counts == n
            emb[rows] = self.time_embedding(n)[rank[rows].clamp(max=n - 1)]
        return emb

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """features [M, T, S, d] (+ frame_mask [M, T], True = real frame) -> [M, num_latents, d]."""
        if features.ndim != 4:
            raise ValueError(f"resampler expects features [media, frames, positions, dim], got shape {tuple(features.shape)}")
        m, t, s, _ = features.shape
        if frame_mask is not None and frame_mask.shape != (m, t):
            raise ValueError(f"frame_mask must have shape {(m, t)}, got {tuple(frame_mask.shape)}")
        if frame_mask is not None:
            mask = frame_mask.bool()
            counts = mask.sum(dim=1)
            if bool((mask == (torch.arange(t, device=mask.device) < counts[:, None])).all()):
                # real frames first (stack_media's layout): resample the media of n frames as [*, n, S, d], so that
                # padding frames cost nothing (a batch of images and 8-frame videos costs what the two cost apart)
                groups = [(counts == n).nonzero().squeeze(1) for n in counts.unique().tolist()]
                outs = [self._resample(features[rows, : int(counts[rows[0]])], None) for rows in groups]
                return torch.cat(outs)[torch.argsort(torch.cat(groups))]
        return self._resample(features, frame_mask)

    def _resample(self, features: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        m, t, s, _ = features.shape
        x = features + self.frame_time_embeddings(t, frame_mask).to(features.dtype)[:, :, None, :]
        if self.spatial_embeddings is not None:
            if s != self.spatial_embeddings.shape[0]:
                raise ValueError(
                    f"the resampler has {self.spatial_embeddings.shape[0]} spatial position embeddings but the vision "
                    f"encoder gives {s} features per frame: set resampler_spatial_positions={s} (or 0)"
                )
            x = x + self.spatial_embeddings.to(features.dtype)
        x = rearrange(x, "m t s d -> m (t s) d")
        key_mask = None
        if frame_mask is not None:
            media_mask = frame_mask.bool().repeat_interleave(s, dim=1)  # [M, T*S]
            key_mask = torch.cat([media_mask, media_mask.new_ones(m, self.num_latents)], dim=1)
        latents = self.latents.to(x.dtype).expand(m, -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents, key_mask)
            latents = latents + ff(latents)
        return self.norm(latents)


class FeatureTokens(nn.Module):
    """No resampling: [M, T, S, d] frame features (+ frame mask [M, T]) -> [M, T * S, d] visual tokens, every
    vision feature a visual token (IDEFICS's ``use_resampler=False``). Nothing to train."""

    layers = ()  # no resampler layers (for code that walks them)

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        if features.ndim != 4:
            raise ValueError(f"expects features [media, frames, positions, dim], got shape {tuple(features.shape)}")
        if frame_mask is not None and not bool(frame_mask.all()):
            raise ValueError(
                "without a resampler (use_resampler=False) every feature of every frame is a visual token: media with "
                "padding frames (a frame_mask with False entries) cannot be batched; pass videos of one length"
            )
        return rearrange(features, "m t s d -> m (t s) d")
