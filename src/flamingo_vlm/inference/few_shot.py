"""One call for few-shot prompting: examples + a query -> the decoded answer.

    answer = few_shot(model, processor, [(cat, "Output: a cat."), (dog, "Output: a dog.")], bird)   # "a bird."

Each example is ``(media, text)``: ``media`` one image / path / :class:`~flamingo_vlm.Video`, or a list of
them; ``text`` its answer in the prompt's format, ended with ``<|endofchunk|>`` (added if missing). The
query is ``media`` (then its text is ``prompt``) or ``(media, text)``. The prompt is the paper's
interleaving: ``<image>text<|endofchunk|>`` per example, then ``<image>`` + the query's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .generation import generate_texts


def _media(media: Any) -> list:
    return list(media) if isinstance(media, (list, tuple)) else [media]


def few_shot_prompt(examples: Sequence[tuple[Any, str]], query: Any, *, prompt: str = "Output:",
                    end_of_chunk: str = "<|endofchunk|>") -> list:
    """The interleaved prompt (a list of media and text) of :func:`few_shot`."""
    items: list = []
    for i, example in enumerate(examples):
        if not isinstance(example, (tuple, list)) or len(example) != 2 or not isinstance(example[1], str):
            raise ValueError(f"examples[{i}] must be a (media, text) pair, got {type(example).__name__}")
        media, text = example
        items += _media(media) + [text if text.endswith(end_of_chunk) else text + end_of_chunk]
    if isinstance(query, tuple) and len(query) == 2 and isinstance(query[1], str):
        media, text = query
    else:
        media, text = query, prompt
    return items + _media(media) + [text]


def few_shot(model, processor, examples: Sequence[tuple[Any, str]], query: Any, *, prompt: str = "Output:",
             max_new_tokens: int = 20, num_beams: int = 3, **generate_kwargs: Any) -> str:
    """The model's answer to ``query`` after ``examples``: decoded, cut at ``<|endofchunk|>``, without the
    space that follows the prompt's text (``"a red circle."``, not ``" a red circle."``).

    ``generate_kwargs`` go to ``FlamingoModel.generate`` (e.g. ``do_sample=True, temperature=0.7``).
    """
    items = few_shot_prompt(examples, query, prompt=prompt, end_of_chunk=processor.end_of_chunk_token)
    text = generate_texts(model, processor, [items], max_new_tokens=max_new_tokens, num_beams=num_beams, **generate_kwargs)[0]
    return text.strip()


__all__ = ["few_shot", "few_shot_prompt"]
