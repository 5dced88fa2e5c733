"""The per-call media context handed to every wrapped decoder layer (never stored on the layers).

:meth:`FlamingoModel.media_context <flamingo_vlm.modeling.flamingo.FlamingoModel.media_context>` is the one
way to build it: forward, generation, the prompt cache of beam search, candidate scoring and the benchmark
all go through it, so a row gets the same media routing whatever path (or batch) it runs in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .masking import MediaRouting

MediaKV = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass(frozen=True)
class MediaContext:
    """Everything the gated cross-attention blocks need for one LM forward call.

    visual_tokens: [M, n, d_visual], the M media of the batch in row order (no padding media), or None
    when the call sees no media: every block then still runs its feed-forward, and its cross-attention
    adds exactly 0 (the paper's ``y + tanh(alpha_dense) * ffw(y)`` applies to every token).
    routing: which medium each token of this call attends to (None exactly when visual_tokens is None).
    media_kv: optional per-block (keys, values) [M, H, n, D], computed once and reused across calls.
    """

    visual_tokens: torch.Tensor | None
    routing: MediaRouting | None
    media_kv: MediaKV | None = None

    def __post_init__(self) -> None:
        if (self.visual_tokens is None) != (self.routing is None):
            raise ValueError("a MediaContext has both visual_tokens and routing, or neither (no media)")

    @property
    def has_media(self) -> bool:
        return self.visual_tokens is not None

    def kv(self, block_index: int, block) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``block_index``'s media (keys, values) [M, H, n, D]."""
        if self.media_kv is not None:
            return self.media_kv[block_index]
        return block.media_kv(self.visual_tokens)


NO_MEDIA = MediaContext(visual_tokens=None, routing=None)


@dataclass(frozen=True)
class StepMedia:
    """The media of one ``generate`` call, turned into each decoding step's :class:`MediaContext`.

    Not a MediaContext itself (the decoder layers refuse it): the routing of a step depends on the whole
    sequence so far, so ``context(input_ids, num_new)`` rebuilds it (phi over every token, sliced to the
    tokens the LM is about to run). Stateless, so beams, sampling and cache reordering need no bookkeeping.

    build: ``FlamingoModel.media_context``, bound to the generation's visual tokens and cached keys/values.
    prompt_offsets [B]: index of each prompt's first medium. ``generate`` may expand the B prompts to
    ``B * k`` rows (beams, several return sequences) by repeat_interleave, which :meth:`context` follows.
    """

    build: Callable[..., MediaContext]
    prompt_offsets: torch.Tensor

    def context(self, input_ids: torch.Tensor, num_new: int) -> MediaContext:
        """input_ids [rows, L]: the whole sequence so far; the LM is about to run its last ``num_new`` tokens."""
        rows, prompts = input_ids.shape[0], self.prompt_offsets.shape[0]
        if rows % prompts:
            raise ValueError(f"generation has {rows} rows for {prompts} prompts")
        offsets = self.prompt_offsets.repeat_interleave(rows // prompts)
        return self.build(input_ids, media_offsets=offsets, last_positions=num_new)
