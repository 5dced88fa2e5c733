"""Which visual tokens each text token may attend to (the paper's phi, section 2.3), and the attention
that follows that routing.

Media are numbered globally across the batch: the ``M`` media of a batch are stored flat as
``[M, n, ...]`` (no padding images), row ``b`` owning ``media_offsets[b] .. media_offsets[b] + count_b - 1``
in the order of its ``<image>`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def media_index(
    input_ids: torch.Tensor, media_token_id: int, eos_token_id: int | None = None, eos_sees_media: bool = False,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the local index of the last ``<image>`` at or before it, and of the first image it may see.

    input_ids [B, L] -> (last [B, L], first [B, L]), ``last == -1`` where no image is visible. ``first`` is 0,
    or, when ``eos_token_id`` is given (documents separated by EOS), the number of images before the token's
    document: a document starts after each EOS, and the EOS itself closes the previous one and sees no image
    (with ``eos_sees_media``, it still sees its document's image: IDEFICS's rule). ``segments`` [B, L]
    (packed samples, non-decreasing along a row: transformers' ``find_packed_sequence_indices``): a token
    sees no image of an earlier segment.
    """
    is_media = (input_ids == media_token_id).long()
    count = is_media.cumsum(dim=1)  # images at or before each position
    first = torch.zeros_like(count)
    if eos_token_id is not None:
        at_eos = torch.where(input_ids == eos_token_id, count, torch.zeros_like(count))
        first = at_eos.cummax(dim=1).values  # count is non-decreasing, so this is its value at the last EOS
        if eos_sees_media:  # the last EOS strictly before each token
            first = torch.cat([torch.zeros_like(first[:, :1]), first[:, :-1]], dim=1)
    if segments is not None:
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        before = torch.where(starts, count - is_media, torch.zeros_like(count))  # images before each segment's start
        first = torch.maximum(first, before.cummax(dim=1).values)
    last = torch.where(count > first, count - 1, torch.full_like(count, -1))
    return last, first


@dataclass(frozen=True)
class LastMediaRouting:
    """Each token attends to the visual tokens of one medium only (phi), at a cost flat in the number of media.

    Tokens are grouped into runs that see one medium, laid out as ``R`` rows of at most ``P`` tokens each
    (a long run is split into several rows that share the medium), so attention is one SDPA call on
    ``[R, H, P, D]`` queries against ``[R, H, n, D]`` keys, with ``R * P <= 2 * tokens + runs``: no dense
    mask over every image.
    """

    shape: tuple[int, int]  # (B, L) of the tokens being routed
    token_index: torch.Tensor  # [T] flat positions (in B*L) of tokens that see a medium
    row: torch.Tensor  # [T] their row in the grouped layout
    col: torch.Tensor  # [T] their column in the grouped layout
    row_media: torch.Tensor  # [R] the medium (global index) of each grouped row
    row_length: int  # P

    @classmethod
    def build(cls, media: torch.Tensor) -> "LastMediaRouting":
        """media [B, L]: global medium index per token, -1 for none.

        Groups are runs of consecutive tokens of one row that see one medium. Runs, not media: rows may
        share media (beams of one prompt), and a run is contiguous whatever the order of the media.
        """
        flat = media.reshape(-1)
        token_index = (flat >= 0).nonzero().squeeze(1)
        g = flat[token_index]
        row_of = token_index // media.shape[1]
        starts = torch.ones_like(g, dtype=torch.bool)
        starts[1:] = (g[1:] != g[:-1]) | (row_of[1:] != row_of[:-1])
        group = starts.long().cumsum(0) - 1  # [T] run id of each routed token
        group_media = g[starts]  # [G]
        counts = torch.bincount(group, minlength=len(group_media))
        row_length = max(1, math.ceil(len(g) / max(len(group_media), 1)))
        rank = torch.arange(len(g), device=flat.device) - (counts.cumsum(0) - counts)[group]
        pieces = (counts + row_length - 1) // row_length
        row = (pieces.cumsum(0) - pieces)[group] + rank // row_length
        row_media = torch.repeat_interleave(group_media, pieces)
        return cls(tuple(media.shape), token_index, row, rank % row_length, row_media, row_length)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, L, H, D], k/v [M, H, n, D] -> [B, L, H, D]; zero for tokens that see no medium."""
        b, l, h, d = q.shape
        out = q.new_zeros(b * l, h, d)
        if self.token_index.numel() == 0:
            return out.view(b, l, h, d)
        rows = q.new_zeros(len(self.row_media), self.row_length, h, d)
        rows[self.row, self.col] = q.reshape(b * l, h, d)[self.token_index]
        attended = F.scaled_dot_product_attention(
            rows.transpose(1, 2), k[self.row_media], v[self.row_media]
        ).transpose(1, 2)  # [R, P, H, D]
        out[self.token_index] = attended[self.row, self.col]
        return out.view(b, l, h, d)


@dataclass(frozen=True)
class AllMediaRouting:
    """Each token attends to every earlier medium of its document (the paper's ablation, Table 3).

    Dense over the row's media, as the ablation is by nature: cost grows with the number of images.
    """

    row_media: torch.Tensor  # [B, N] global media of each row, clamped to 0 where absent
    allowed: torch.Tensor  # [B, L, N] token l may see the row's n-th medium
    sees_any: torch.Tensor  # [B, L]

    @classmethod
    def build(cls, last: torch.Tensor, first: torch.Tensor, media_offsets: torch.Tensor, counts: torch.Tensor) -> "AllMediaRouting":
        """last/first [B, L] local indices from :func:`media_index`; media_offsets/counts [B]."""
        n = max(int(counts.max()) if counts.numel() else 0, 1)
        j = torch.arange(n, device=last.device)
        row_media = (media_offsets[:, None] + j).clamp(min=0)
        row_media = torch.where(j < counts[:, None], row_media, torch.zeros_like(row_media))
        allowed = (j >= first[..., None]) & (j <= last[..., None])
        return cls(row_media, allowed, allowed.any(dim=-1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, L, H, D], k/v [M, H, n, D] -> [B, L, H, D]; zero for tokens that see no medium."""
        b, l, h, d = q.shape
        if k.shape[0] == 0:
            return q.new_zeros(b, l, h, d)
        n_tok = k.shape[2]
        keys = k[self.row_media].permute(0, 2, 1, 3, 4).reshape(b, h, -1, d)  # [B, H, N*n, D]
        values = v[self.row_media].permute(0, 2, 1, 3, 4).reshape(b, h, -1, d)
        mask = self.allowed.repeat_interleave(n_tok, dim=-1)
        mask = mask | ~self.sees_any[..., None]  # avoid all-masked rows (NaN); zeroed below
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask[:, None])
        out = out.transpose(1, 2)
        return torch.where(self.sees_any[..., None, None], out, torch.zeros_like(out))


MediaRouting = LastMediaRouting | AllMediaRouting


def build_routing(
    input_ids: torch.Tensor,
    *,
    media_token_id: int,
    media_offsets: torch.Tensor,
    media_counts: torch.Tensor,
    mode: str = "last",
    eos_token_id: int | None = None,
    last_positions: int | None = None,
    eos_sees_media: bool = False,
    segments: torch.Tensor | None = None,
) -> MediaRouting:
    """Routing for ``input_ids`` [B, L]; with ``last_positions=k``, for its last k tokens only (decoding);
    ``segments`` [B, L]: packed samples (:func:`media_index`)."""
    last, first = media_index(input_ids, media_token_id, eos_token_id, eos_sees_media, segments)
    if last_positions is not None:
        last, first = last[:, -last_positions:], first[:, -last_positions:]
    if mode == "last":
        global_index = torch.where(last >= 0, last + media_offsets[:, None], last)
        return LastMediaRouting.build(global_index)
    if mode == "all":
        return AllMediaRouting.build(last, first, media_offsets, media_counts)
    raise ValueError(f"unknown media attention mode {mode!r}: expected 'last' or 'all'")
