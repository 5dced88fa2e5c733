"""The one label rule: which tokens the Flamingo objective trains on.

Used by training batches (:func:`flamingo_vlm.data.labels.collate`) and by
``FlamingoProcessor(..., return_labels=True)``, so a batch built by hand trains the loss ``flamingo train``
trains.
"""

from __future__ import annotations

import torch

from ..modeling.loss import IGNORE_INDEX


def make_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, media_token_id: int, target_start: torch.Tensor | None = None
) -> torch.Tensor:
    """Targets [B, L] for ``input_ids`` [B, L]: ``-100`` on padding, on ``<image>`` and on every token
    before a row's first ``<image>`` (text that sees no image, e.g. a page's title: the paper trains the
    bridge, not the LM); ``<|endofchunk|>`` and EOS stay targets so the model learns where chunks end.

    Padding is read from ``attention_mask`` [B, L] (not the pad id), so a tokenizer whose pad token is its
    EOS keeps its real EOS as a target; left or right padding give the same targets.

    target_start [B] (answer-only training, supervised task data): the index, among a row's non-padding
    tokens, of its first target; every token before it (the prompt, in-context shots and their answers
    included) is ``-100`` too, whatever the rule above says. ``0`` leaves a row to the rule alone.

    A row without ``<image>`` has no target. The loss averages over the batch's targets, so such a row
    adds nothing; a batch with none at all has loss 0 (see :func:`flamingo_vlm.modeling.loss.causal_lm_loss`).
    """
    is_media = input_ids == media_token_id
    before_first_media = is_media.long().cumsum(dim=1) == 0
    ignore = is_media | before_first_media | (attention_mask == 0)
    if target_start is not None:
        position = attention_mask.long().cumsum(dim=1) - 1  # index among the row's real tokens (left padding too)
        ignore |= position < target_start.to(position.device)[:, None]
    return input_ids.masked_fill(ignore, IGNORE_INDEX)
