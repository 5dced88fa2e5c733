"""A batch of interleaved prompts as model inputs, each distinct medium encoded once, its keys/values once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import END_OF_CHUNK_TOKEN
from ..modeling import MediaKV
from .media import MediaEncoder


@dataclass
class PromptBatch:
    """input_ids / attention_mask [B, L] (left-padded); visual_tokens [M, n, d] of the batch's media in row
    order (None without media) and each xattn block's keys/values of them, ``media_kv`` ([M, H, n, D] pairs),
    computed once for every call on this batch; media_counts [B]; tails: each prompt's text after its last
    medium."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    visual_tokens: torch.Tensor | None
    media_kv: MediaKV | None
    media_counts: torch.Tensor
    tails: list[str]

    @property
    def media_offsets(self) -> torch.Tensor:
        """[B] index in visual_tokens of each prompt's first medium."""
        return self.media_counts.cumsum(0) - self.media_counts


def encode_prompts(processor, prompts: list[list], media: MediaEncoder, *, num_frames: int = 8, padding_side: str = "left") -> PromptBatch:
    """Tokenise interleaved prompts as :class:`~flamingo_vlm.FlamingoProcessor` does (each medium becomes one
    media token) and take each medium's visual tokens and xattn keys/values from ``media``, computed once
    however many prompts (in this batch or, with the same ``media``, any later one) show it."""
    strings, all_media, tails = [], [], []
    for items in prompts:
        parts, tail = [], ""
        for item in items:
            if isinstance(item, str):
                if processor.end_of_chunk_token != END_OF_CHUNK_TOKEN:  # tasks write the default token
                    item = item.replace(END_OF_CHUNK_TOKEN, processor.end_of_chunk_token)
                parts.append(item)
                tail += item
            else:
                parts.append(processor.media_token)
                all_media.append(item)
                tail = ""
        strings.append(processor.format_text("".join(parts)))
        tails.append(tail)
    enc = processor.tokenize(strings, padding=True, padding_side=padding_side, return_tensors="pt")
    counts = (enc["input_ids"] == processor.media_token_id).sum(dim=1)
    expected = [sum(not isinstance(x, str) for x in items) for items in prompts]
    if counts.tolist() != expected:
        raise ValueError(f"prompts hold {counts.tolist()} media tokens but {expected} media: a prompt's text contains {processor.media_token!r}")
    model = media.model
    visual_tokens = media.visual_tokens(all_media, num_frames)
    media_kv = media.media_kv(all_media, num_frames, visual_tokens)  # per medium, cached across batches
    return PromptBatch(
        input_ids=enc["input_ids"].to(model.device),
        attention_mask=enc["attention_mask"].to(model.device),
        visual_tokens=visual_tokens,
        media_kv=media_kv,
        media_counts=counts.to(model.device),
        tails=tails,
    )
