"""Loss targets and batching, vectorised over the whole batch (no per-token Python loops)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from ..modeling.loss import IGNORE_INDEX
from ..processing import stack_media
from .samples import Sample


def make_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, media_token_id: int) -> torch.Tensor:
    """Targets [B, L] for ``input_ids`` [B, L]: ``-100`` on padding, on ``<image>`` and on every token
    before a row's first ``<image>`` (text that sees no image, e.g. a page's title: the paper trains the
    bridge, not the LM); ``<|endofchunk|>`` and EOS stay targets so the model learns where chunks end.

    Padding is read from ``attention_mask`` (not the pad id), so a tokenizer whose pad token is its EOS
    keeps its real EOS as a target.
    """
    is_media = input_ids == media_token_id
    before_first_media = is_media.long().cumsum(dim=1) == 0
    ignore = is_media | before_first_media | (attention_mask == 0)
    return input_ids.masked_fill(ignore, IGNORE_INDEX)


def collate(samples: Sequence[Sample], *, pad_token_id: int, media_token_id: int) -> dict:
    """Samples -> a training batch (right padding, as training wants).

    Returns input_ids / attention_mask / labels [B, L], pixel_values [M, T, C, H, W] (the batch's M media
    in row order), frame_mask [M, T] or None, num_targets (tokens that get a loss, after the causal shift),
    num_tokens (non-padding tokens) and keys (for error reports).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    ids = pad_sequence([s.input_ids for s in samples], batch_first=True, padding_value=pad_token_id)
    lengths = torch.tensor([len(s.input_ids) for s in samples])
    attention_mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    labels = make_labels(ids, attention_mask, media_token_id)
    media = stack_media([m for s in samples for m in s.media])
    return {
        "input_ids": ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": media["pixel_values"],
        "frame_mask": media.get("frame_mask"),
        "num_targets": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "num_tokens": int(lengths.sum()),
        "keys": [s.key for s in samples],
    }
