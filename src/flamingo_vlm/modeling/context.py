"""The per-call media context handed to every wrapped decoder layer (never stored on the layers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masking import MediaRouting, build_routing


@dataclass(frozen=True)
class MediaContext:
    """Everything the gated cross-attention blocks need for one LM forward call.

    visual_tokens: [M, n, d_visual], the M media of the batch in row order (no padding media).
    routing: which medium each token of this call attends to.
    media_kv: optional per-block (keys, values) [M, H, n, D], computed once per generation.
    """

    visual_tokens: torch.Tensor
    routing: MediaRouting | None
    media_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None

    def kv(self, block_index: int, block) -> tuple[torch.Tensor, torch.Tensor]:
        if self.media_kv is not None:
            return self.media_kv[block_index]
        return block.media_kv(self.visual_tokens)


@dataclass(frozen=True)
class GenerationMediaContext(MediaContext):
    """A MediaContext for HF generation: the routing is rebuilt each step from the full sequence so far.

    media_offsets / media_counts are per prompt [B]; generation may expand rows (beams, several
    return sequences) by repeat_interleave, which :meth:`for_step` undoes.
    """

    media_offsets: torch.Tensor | None = None
    media_counts: torch.Tensor | None = None
    media_token_id: int = -1
    eos_token_id: int | None = None
    mode: str = "last"

    def for_step(self, input_ids: torch.Tensor, num_new: int) -> MediaContext:
        """input_ids [rows, L] is the whole sequence so far; the LM is about to run its last num_new tokens."""
        rows, prompts = input_ids.shape[0], self.media_offsets.shape[0]
        if rows % prompts:
            raise ValueError(f"generation has {rows} rows for {prompts} prompts")
        expand = rows // prompts
        routing = build_routing(
            input_ids,
            media_token_id=self.media_token_id,
            media_offsets=self.media_offsets.repeat_interleave(expand),
            media_counts=self.media_counts.repeat_interleave(expand),
            mode=self.mode,
            eos_token_id=self.eos_token_id,
            last_positions=num_new,
        )
        return MediaContext(self.visual_tokens, routing, self.media_kv)
