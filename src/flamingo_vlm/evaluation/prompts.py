"""Few-shot prompts: shots then the query as interleaved items, and a batch of them as model inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import END_OF_CHUNK_TOKEN
from .media import MediaEncoder
from .task import Example, Task


def build_prompt(task: Task, query: Example, shots: list[Example], *, text_only_shots: bool = False) -> list:
    """Interleaved items: each shot with its answer, then the query without (paper, appendix B).

    text_only_shots: drop the shots' media (the paper's "0-shot" prompts of two text-only examples).
    """
    items: list = []
    for shot in shots:
        part = task.format_example(shot, with_answer=True)
        items += [x for x in part if isinstance(x, str)] if text_only_shots else part
    return items + task.format_example(query, with_answer=False)


@dataclass
class PromptBatch:
    """input_ids / attention_mask [B, L] (left-padded); visual_tokens [M, n, d] of the batch's media in row
    order (None without media); media_counts [B]; tails: each prompt's text after its last medium."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    visual_tokens: torch.Tensor | None
    media_counts: torch.Tensor
    tails: list[str]


def encode_prompts(processor, prompts: list[list], media: MediaEncoder, *, num_frames: int = 8, padding_side: str = "left") -> PromptBatch:
    """Tokenise interleaved prompts as :class:`~flamingo_vlm.FlamingoProcessor` does (each medium becomes one
    media token) and take each medium's visual tokens from ``media``, encoded once however many prompts
    show it."""
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
        strings.append("".join(parts))
        tails.append(tail)
    enc = processor.tokenizer(strings, padding=True, padding_side=padding_side, return_tensors="pt")
    counts = (enc["input_ids"] == processor.media_token_id).sum(dim=1)
    expected = [sum(not isinstance(x, str) for x in items) for items in prompts]
    if counts.tolist() != expected:
        raise ValueError(f"prompts hold {counts.tolist()} media tokens but {expected} media: a prompt's text contains {processor.media_token!r}")
    device = media.model.device
    return PromptBatch(
        input_ids=enc["input_ids"].to(device),
        attention_mask=enc["attention_mask"].to(device),
        visual_tokens=media.visual_tokens(all_media, num_frames),
        media_counts=counts.to(device),
        tails=tails,
    )
