"""Open-ended answers: batched beam search over left-padded prompts, stopping at ``<|endofchunk|>``."""

from __future__ import annotations

import torch

from .media import MediaEncoder
from .prompts import encode_prompts


@torch.no_grad()
def generate_texts(
    model,
    processor,
    prompts: list[list],
    *,
    media: MediaEncoder | None = None,
    num_frames: int = 8,
    max_new_tokens: int = 20,
    num_beams: int = 3,
    **generate_kwargs,
) -> list[str]:
    """One decoded continuation per prompt, cut at the first ``<|endofchunk|>`` / EOS.

    Each medium's visual tokens come from ``media`` (encoded once); their keys/values are computed once for
    the batch and shared by every step and beam.
    """
    if generate_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("evaluation decodes one answer per prompt: num_return_sequences must be 1")
    media = media or MediaEncoder(model, processor)
    batch = encode_prompts(processor, prompts, media, num_frames=num_frames)
    generate_kwargs.setdefault("do_sample", False)
    out = model.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, visual_tokens=batch.visual_tokens, media_kv=batch.media_kv,
        max_new_tokens=max_new_tokens, num_beams=num_beams, **generate_kwargs,
    )
    new = out[:, batch.input_ids.shape[1] :]
    stops = [model.config.end_of_chunk_token_id] + ([model.config.eos_token_id] if model.config.eos_token_id is not None else [])
    is_stop = torch.isin(new, torch.tensor(stops, device=new.device))
    ends = torch.where(is_stop.any(1), is_stop.int().argmax(1), torch.full_like(is_stop[:, 0], new.shape[1], dtype=torch.long))
    return [processor.decode(row[:end], skip_special_tokens=True) for row, end in zip(new.tolist(), ends.tolist())]
