"""Text layout of the paper (section 2.3, A.1.3) and tokenisation.

    pairs / videos:       <BOS><image>caption<EOC><EOS>
    interleaved:          <BOS>text<EOC><image>text<EOC><image>text<EOC><EOS>

``<EOC>`` (``<|endofchunk|>``) ends every text chunk: the one before each image and the last one.
``<BOS>`` is whatever the tokenizer puts in front of a text (nothing for GPT-2-style tokenizers).
"""

from __future__ import annotations

import torch


class TokenLayout:
    """The tokenizer plus the special ids that the sequence formats need."""

    def __init__(self, tokenizer, media_token: str, end_of_chunk_token: str) -> None:
        self.tokenizer = tokenizer
        self.media_token = media_token
        self.end_of_chunk_token = end_of_chunk_token
        self.media_token_id = tokenizer.convert_tokens_to_ids(media_token)
        self.end_of_chunk_token_id = tokenizer.convert_tokens_to_ids(end_of_chunk_token)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        # What the tokenizer adds in front of a text by itself (its BOS), found once by comparison.
        probe = "a"
        with_special = tokenizer(probe)["input_ids"]
        without = tokenizer(probe, add_special_tokens=False)["input_ids"]
        start = _find(with_special, without)
        self.prefix_ids: list[int] = list(with_special[:start]) if start > 0 else []
        self.suffix_ids: list[int] = [self.eos_token_id] if self.eos_token_id is not None else []

    @classmethod
    def from_processor(cls, processor) -> "TokenLayout":
        return cls(processor.tokenizer, processor.media_token, processor.end_of_chunk_token)

    def clean(self, text: str) -> str:
        """Raw text with the special token strings removed (web text may contain them literally)."""
        for token in (self.media_token, self.end_of_chunk_token):
            if token in text:
                text = text.replace(token, "")
        return text.strip()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def pair(self, caption: str, max_tokens: int) -> torch.Tensor:
        """``<BOS><image>caption<EOC><EOS>`` as ids [<= max_tokens] (the end is cut if it is longer)."""
        ids = self.prefix_ids + self.encode(f"{self.media_token}{self.clean(caption)}{self.end_of_chunk_token}") + self.suffix_ids
        return torch.tensor(ids[:max_tokens], dtype=torch.long)


def _find(haystack: list[int], needle: list[int]) -> int:
    """Index where ``needle`` occurs in ``haystack`` (0 if absent: assume no prefix)."""
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if haystack[i : i + n] == needle:
            return i
    return 0
