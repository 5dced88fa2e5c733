"""Packed training batches: the samples of a step, of one dataset or several, laid end to end in rows of at most
``length`` tokens, so that a batch of short and long samples is not mostly padding and the datasets of a step
share one forward.

A packed row is ``[sample a][sample b]...[padding]``: position ids restart at 0 for each sample (and for the
padding), which is how transformers' LMs tell packed samples apart (``find_packed_sequence_indices``: each
attends only within its own), and how :class:`~flamingo_vlm.modeling.FlamingoModel` keeps each token's
cross-attention to the images of its own sample. Each sample's targets are those of the one label rule
(:func:`flamingo_vlm.processing.labels.make_labels`), its first token never a target.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..modeling.loss import IGNORE_INDEX
from ..processing import stack_media
from ..processing.labels import make_labels
from .samples import Sample


def pack_rows(lengths: Sequence[int], length: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, each row's lengths summing to at most ``length``.

    Ties keep the samples' order, so a step's rows are a function of its samples alone.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > length:
            raise ValueError(f"a sample of {n} tokens does not fit a packed row of {length} (pack_length)")
        for r, space in enumerate(free):
            if space >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(length - n)
    return rows


def collate_packed(groups: Sequence[Sequence[Sample]], *, length: int, pad_token_id: int, media_token_id: int,
                   rows_per_batch: int | None = None) -> list[dict]:
    """Samples of ``len(groups)`` datasets (``groups[d]``: dataset d's) -> packed batches of ``rows_per_batch``
    rows (micro-batches; default: one batch of every row).

    Each batch has input_ids / labels / position_ids / dataset [R, W] (W: its longest row, at most ``length``;
    ``dataset`` is each token's dataset index, -1 on padding), attention_mask None (the position ids say where
    samples start), pixel_values [M, T, C, H, W] (the batch's media in row order) and frame_mask [M, T] or None,
    num_targets / num_tokens (lists, per dataset: targets after the causal shift, non-padding tokens) and keys.
    """
    samples = [(d, s) for d, group in enumerate(groups) for s in group]
    if not samples:
        raise ValueError("cannot collate an empty batch")
    try:
        rows = pack_rows([len(s.input_ids) for _, s in samples], length)
    except ValueError as e:
        long = [s.key for _, s in samples if len(s.input_ids) > length]
        raise ValueError(f"{e}: {long[:4]}") from None
    size = rows_per_batch or len(rows)
    return [_collate_rows([[samples[i] for i in row] for row in rows[k : k + size]], len(groups), pad_token_id, media_token_id)
            for k in range(0, len(rows), size)]


def _collate_rows(rows: list[list[tuple[int, Sample]]], num_datasets: int, pad_token_id: int, media_token_id: int) -> dict:
    width = max(sum(len(s.input_ids) for _, s in row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    positions = torch.zeros_like(ids)
    dataset = torch.full_like(ids, -1)
    media: list[torch.Tensor] = []
    keys: list[str] = []
    for r, row in enumerate(rows):
        at = 0
        for d, s in row:
            n = len(s.input_ids)
            x = s.input_ids.long()
            start = None if s.target_start is None else torch.tensor([s.target_start])
            y = make_labels(x[None], torch.ones(1, n, dtype=torch.long), media_token_id, start)[0]
            y[0] = IGNORE_INDEX  # predicted from the previous sample's last token otherwise
            ids[r, at : at + n], labels[r, at : at + n] = x, y
            positions[r, at : at + n] = torch.arange(n)
            dataset[r, at : at + n] = d
            media.extend(s.media)
            keys.append(s.key)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the padding: one more sample, with no target
    stacked = stack_media(media)
    targets = labels != IGNORE_INDEX
    return {
        "input_ids": ids,
        "attention_mask": None,
        "position_ids": positions,
        "labels": labels,
        "dataset": dataset,
        "pixel_values": stacked["pixel_values"],
        "frame_mask": stacked.get("frame_mask"),
        "num_targets": [int((targets & (dataset == d)).sum()) for d in range(num_datasets)],
        "num_tokens": [int((dataset == d).sum()) for d in range(num_datasets)],
        "keys": keys,
    }


__all__ = ["collate_packed", "pack_rows"]
