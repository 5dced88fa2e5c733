"""Prompt strings -> token ids, with a policy for the LM's special tokens typed in the text.

A prompt string is user text joined with the processor's markers (``<image>`` for each medium,
``<|endofchunk|>`` ending a chunk): the markers are the prompt's syntax and always become their tokens.
Any other special or added token of the tokenizer (BOS ``<s>``, EOS ``</s>``, the pad token, chat or
reserved tokens...) written literally in the text is, by ``special_tokens_in_text``:

- ``"allow"``: tokenised as that token, as a plain tokenizer call does (the library's default);
- ``"escape"``: tokenised as the plain text it is, so no such id can come from text (``flamingo serve``'s
  default: a typed ``</s>`` would otherwise end a document and, with the EOS reset of the media index,
  hide every earlier image from the tokens after it);
- ``"refuse"``: a ``ValueError`` naming the token and where it is.

Escaping tokenises the whole string with a copy of the backend in which the special tokens are not split
out (the ``split_special_tokens`` route of ``tokenizers``) and the two markers are plain added tokens, so the
text is cut at the markers exactly as an ordinary call cuts it: a prompt without typed special tokens gets
the same ids under every policy (tested), boundary handling of SentencePiece-style pre-tokenizers included.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any, Sequence

SPECIAL_TOKENS_IN_TEXT = ("allow", "escape", "refuse")


class PromptTokenizer:
    """``tokenizer(texts, **kwargs)`` under a :data:`SPECIAL_TOKENS_IN_TEXT` policy; the same return value
    (a ``BatchEncoding``). ``markers``: token strings that are prompt syntax (always their token).

    A tokenizer without a ``tokenizers`` backend (a Python "slow" one, e.g. remote code) is escaped piece by
    piece: the text is cut at the markers, each piece tokenised with ``split_special_tokens=True`` (the slow
    tokenizer tokenises the pieces between added tokens separately too), the template added around it.
    """

    def __init__(self, tokenizer, markers: Sequence[str], special_tokens_in_text: str = "allow") -> None:
        if special_tokens_in_text not in SPECIAL_TOKENS_IN_TEXT:
            raise ValueError(f"special_tokens_in_text must be one of {SPECIAL_TOKENS_IN_TEXT}, got {special_tokens_in_text!r}")
        self.tokenizer = tokenizer
        self.policy = special_tokens_in_text
        self.markers = tuple(markers)
        self.marker_ids = dict(zip(self.markers, tokenizer.convert_tokens_to_ids(list(self.markers))))
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        special = dict(zip(tokenizer.all_special_ids, tokenizer.all_special_tokens))
        # id -> token string of every special/added token that text must not produce (the markers may)
        self.protected: dict[int, str] = {i: t for i, t in {**added, **special}.items() if i not in self.marker_ids.values()}
        self._marker_split = re.compile("(" + "|".join(re.escape(m) for m in self.markers) + ")")
        self._fast = getattr(tokenizer, "backend_tokenizer", None) is not None
        self._escaping = _escaping_copy(tokenizer, self.markers) if self.policy == "escape" and self._fast else None

    def __call__(self, texts: str | list[str], **kwargs: Any):
        if self.policy == "allow":
            return self.tokenizer(texts, **kwargs)
        if self.policy == "refuse":
            self.check(texts)
            return self.tokenizer(texts, split_special_tokens=False, **kwargs)
        if not self._fast:
            return self._escape_by_pieces(texts, **kwargs)
        enc = self._escaping(texts, split_special_tokens=True, return_offsets_mapping=True, **kwargs)
        offsets = enc.pop("offset_mapping")
        # Safety net: a vocabulary whose merges rebuild a special token from its characters would still
        # produce its id; never let that through silently.
        found = self._typed(texts, enc["input_ids"], offsets)
        if found:
            raise ValueError(f"escaping special tokens failed: the tokenizer's vocabulary turns text into {found[0][2]!r} anyway")
        return enc

    def check(self, texts: str | list[str]) -> None:
        """Raise ``ValueError`` if a text holds one of the tokenizer's special/added tokens (other than the markers)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if self._fast:
            enc = self.tokenizer(batch, split_special_tokens=False, return_offsets_mapping=True, add_special_tokens=False)
            found = self._typed(batch, enc["input_ids"], enc["offset_mapping"])
        else:
            found = [hit for row, text in enumerate(batch) for hit in self._typed_in_pieces(row, text)]
        if found:
            row, start, token = found[0]
            where = f"text {row}" if not isinstance(texts, str) else "the text"
            raise ValueError(
                f"{where} holds {token!r} at character {start}: it is the tokenizer's {self._role(token)} token, not text. "
                f"Remove it, or tokenise it as plain text with special_tokens_in_text='escape'"
            )

    def _typed(self, texts, input_ids, offsets) -> list[tuple[int, int, str]]:
        """(row, character, token) of each protected token that comes from text, not from the tokenizer's
        template (BOS/EOS added around the text span no characters)."""
        if isinstance(texts, str):
            input_ids, offsets = [input_ids], [offsets]
        found = []
        for row, (ids, spans) in enumerate(zip(input_ids, offsets)):
            for i, (start, end) in zip(_as_list(ids), _as_list(spans)):
                if i in self.protected and end > start:
                    found.append((row, int(start), self.protected[i]))
        return found

    # ---- tokenizers without a `tokenizers` backend ------------------------------------------------
    def _pieces(self, text: str):
        """(character offset, piece, marker id or None) of ``text`` cut at the markers."""
        at = 0
        for piece in self._marker_split.split(text):
            if piece:
                yield at, piece, self.marker_ids.get(piece)
            at += len(piece)

    def _typed_in_pieces(self, row: int, text: str) -> list[tuple[int, int, str]]:
        found = []
        for at, piece, marker in self._pieces(text):
            if marker is None:
                for i in self.tokenizer(piece, add_special_tokens=False, split_special_tokens=False)["input_ids"]:
                    if i in self.protected:
                        found.append((row, at + piece.find(self.protected[i]), self.protected[i]))
        return found

    def _escape_by_pieces(self, texts, *, add_special_tokens: bool = True, padding=False, padding_side=None, return_tensors=None, **kwargs):
        if kwargs:
            raise TypeError(f"escaping special tokens with a {type(self.tokenizer).__name__} does not take {sorted(kwargs)}")
        rows = []
        for text in [texts] if isinstance(texts, str) else texts:
            ids = []
            for _, piece, marker in self._pieces(text):
                if marker is not None:
                    ids.append(marker)
                    continue
                piece_ids = self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                if self.protected.keys() & set(piece_ids):
                    raise ValueError(f"escaping special tokens failed: the tokenizer turns {piece!r} into a special token anyway")
                ids += piece_ids
            rows.append(self.tokenizer.build_inputs_with_special_tokens(ids) if add_special_tokens else ids)
        enc = {"input_ids": rows, "attention_mask": [[1] * len(ids) for ids in rows]}
        if isinstance(texts, str):
            enc = {key: value[0] for key, value in enc.items()}
        return self.tokenizer.pad(enc, padding=padding, padding_side=padding_side, return_tensors=return_tensors)

    def _role(self, token: str) -> str:
        """'eos', 'bos/eos/unk' (GPT-2's one token plays several), 'pad'... or 'added'."""
        roles = [
            name.removesuffix("_token").removesuffix("_tokens").replace("_", " ")
            for name, value in self.tokenizer.special_tokens_map.items()
            if value == token or (isinstance(value, list) and token in value)
        ]
        return "/".join(roles) or "added"


def _as_list(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _escaping_copy(tokenizer, markers: Sequence[str]):
    """A copy of ``tokenizer`` whose backend, called with ``split_special_tokens=True``, splits out only the
    markers: they become non-special added tokens (``encode_special_tokens`` skips special ones only), every
    other added token special (so it is skipped too)."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    for token in state.get("added_tokens", []):
        token["special"] = token["content"] not in markers
    escaping = copy.deepcopy(tokenizer)
    escaping._tokenizer = Tokenizer.from_str(json.dumps(state))
    return escaping


__all__ = ["SPECIAL_TOKENS_IN_TEXT", "PromptTokenizer"]
