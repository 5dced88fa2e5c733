"""The model side of the server: one batch of prompts -> answers or candidate log-likelihoods.

Both paths are the inference layer's, as in evaluation: ``generate_texts`` (left-padded batched generation, stopping at
``<|endofchunk|>``) and ``candidate_log_likelihoods`` (candidates scored from the prompt's KV cache). Each
batch gets a fresh :class:`MediaEncoder`, so every medium of every request runs through the vision encoder
and resampler exactly once; a batch of prompts gives what each prompt gives alone (tested).
"""

from __future__ import annotations

import threading
from typing import Any, Hashable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..inference import MediaEncoder, candidate_log_likelihoods, generate_texts


def generation_key(kwargs: dict[str, Any], seed: int | None, request_id: int) -> Hashable:
    """Requests with equal keys share one ``generate`` call: same parameters. A seeded sampling request
    runs alone (its own key), so its sample does not depend on what it was batched with."""
    return ("generate", tuple(sorted(kwargs.items())), seed, request_id if seed is not None else None)


SCORE_KEY = ("score",)


class _StopWhenSet(StoppingCriteria):
    """Ends every sequence at the next step once ``event`` is set (the server is shutting down)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ModelRunner:
    """``run_batch(key, payloads)`` for the :class:`~flamingo_vlm.serving.batching.Batcher`.

    generate payloads: prompt items (str / Video) -> answer text.
    score payloads: (prompt items, candidate texts) -> (summed log-prob [C], token count [C]).
    """

    def __init__(self, model, processor) -> None:
        self.model = model.eval()
        self.processor = processor
        self.stopping = threading.Event()

    def cancel(self) -> None:
        """Cut a running generation short at its next step (the server's shutdown grace period is over)."""
        self.stopping.set()

    def reset(self) -> None:
        self.stopping.clear()

    def __call__(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        media = MediaEncoder(self.model, self.processor)
        if key == SCORE_KEY:
            prompts, candidates = [items for items, _ in payloads], [c for _, c in payloads]
            return candidate_log_likelihoods(self.model, self.processor, prompts, candidates, media=media)
        _, params, seed, _ = key
        if seed is not None:
            torch.manual_seed(seed)
        stop = StoppingCriteriaList([_StopWhenSet(self.stopping)])
        return generate_texts(self.model, self.processor, payloads, media=media, stopping_criteria=stop, **dict(params))
