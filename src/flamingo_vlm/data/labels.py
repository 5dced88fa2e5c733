"""Training batches: samples padded and stacked, with the targets of the one label rule
(:func:`flamingo_vlm.processing.labels.make_labels`), vectorised over the whole batch."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from ..modeling.loss import IGNORE_INDEX
from ..processing import stack_media
from ..processing.labels import make_labels
from .samples import Sample


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
    starts = None
    if any(s.target_start is not None for s in samples):  # supervised samples: the loss on their answers only
        starts = torch.tensor([s.target_start or 0 for s in samples])
    labels = make_labels(ids, attention_mask, media_token_id, starts)
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
