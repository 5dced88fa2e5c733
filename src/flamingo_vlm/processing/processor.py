"""Interleaved text and media -> model inputs.

    processor(["An image of", img, "two cats.<|endofchunk|>", img2, "Output:"])
    processor([[...], [...]])                                # a batch of such lists
    processor(text="<image>Output:", images=[img])          # OpenFlamingo-style placeholders

Each image becomes one ``<image>`` token; a :class:`Video` (frames) is one medium too. Returns
``input_ids`` / ``attention_mask`` [B, L] and ``pixel_values`` [M, T, C, H, W]: the batch's M media in
row order, no padding media, plus ``frame_mask`` [M, T] when media have different frame counts.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoTokenizer, BatchFeature

from ..config import END_OF_CHUNK_TOKEN, MEDIA_TOKEN, PAD_TOKEN
from ..modeling.loss import IGNORE_INDEX
from .images import ImageTransform
from .labels import make_labels
from .text import PromptTokenizer

PROCESSOR_CONFIG_NAME = "flamingo_processor.json"


@dataclass
class Video:
    """A video as a sequence of frames (PIL images, paths, arrays) or a preprocessed tensor [T, C, H, W]."""

    frames: Sequence[Any] | torch.Tensor


def add_special_tokens(tokenizer, *, media_token: str = MEDIA_TOKEN, end_of_chunk_token: str = END_OF_CHUNK_TOKEN, pad_token: str = PAD_TOKEN) -> list[int]:
    """Add ``<image>``, ``<|endofchunk|>`` (and a pad token if the tokenizer has none); return the new ids.

    Idempotent: tokens the tokenizer already has are not added again (and are not "new").
    """
    vocab_before = len(tokenizer)
    wanted = [t for t in (media_token, end_of_chunk_token) if t not in tokenizer.get_vocab()]
    special: dict[str, Any] = {"extra_special_tokens": wanted} if wanted else {}
    if tokenizer.pad_token is None:
        special["pad_token"] = pad_token
    if special:
        tokenizer.add_special_tokens(special, replace_extra_special_tokens=False)
    return list(range(vocab_before, len(tokenizer)))


class FlamingoProcessor:
    """Tokenizer + image transform for interleaved prompts.

    special_tokens_in_text: what becomes of the tokenizer's special tokens (BOS, EOS, pad, any added token
    other than ``<image>`` / ``<|endofchunk|>``, which are the prompt's syntax) written literally in text:
    "allow" (the default) tokenises them as those tokens, "escape" as plain text (``flamingo serve`` does),
    "refuse" raises a ``ValueError`` naming the token (:mod:`flamingo_vlm.processing.text`).
    """

    def __init__(
        self,
        tokenizer,
        image_transform: ImageTransform,
        *,
        media_token: str = MEDIA_TOKEN,
        end_of_chunk_token: str = END_OF_CHUNK_TOKEN,
        special_tokens_in_text: str = "allow",
        media_wrapper_token: str | None = None,
    ) -> None:
        """media_wrapper_token: a token written around each run of media (IDEFICS's ``<fake_token_around_image>``:
        ``W<image>W`` for one image, ``W<image>W<image>W`` for two in a row); see :meth:`format_text`."""
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.media_token = media_token
        self.end_of_chunk_token = end_of_chunk_token
        self.media_wrapper_token = media_wrapper_token
        vocab = tokenizer.get_vocab()
        for token in (media_token, end_of_chunk_token) + ((media_wrapper_token,) if media_wrapper_token else ()):
            if token not in vocab:
                raise ValueError(f"the tokenizer has no {token!r} token: call flamingo_vlm.add_special_tokens(tokenizer) first")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: call flamingo_vlm.add_special_tokens(tokenizer) first")
        self.media_token_id = tokenizer.convert_tokens_to_ids(media_token)
        self.end_of_chunk_token_id = tokenizer.convert_tokens_to_ids(end_of_chunk_token)
        self.special_tokens_in_text = special_tokens_in_text

    @property
    def special_tokens_in_text(self) -> str:
        """One of "allow", "escape", "refuse" (see the class docstring); may be set on a loaded processor."""
        return self._prompt_tokenizer.policy

    @special_tokens_in_text.setter
    def special_tokens_in_text(self, policy: str) -> None:
        markers = (self.media_token, self.end_of_chunk_token) + ((self.media_wrapper_token,) if self.media_wrapper_token else ())
        self._prompt_tokenizer = PromptTokenizer(self.tokenizer, markers, policy)

    def tokenize(self, texts: str | list[str], **kwargs: Any):
        """Prompt strings (text joined with media/end-of-chunk markers) -> the tokenizer's ``BatchEncoding``,
        special tokens typed in the text treated by :attr:`special_tokens_in_text`. ``kwargs`` go to the
        tokenizer call (``padding``, ``padding_side``, ``return_tensors``, ``add_special_tokens``...).
        Every prompt the library tokenises (processor, generation, scoring) goes through here."""
        return self._prompt_tokenizer(texts, **kwargs)

    # ---- inputs -> tensors -------------------------------------------------------------------
    def __call__(
        self,
        inputs: Sequence[Any] | None = None,
        *,
        text: str | Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        padding_side: str = "left",
        return_labels: bool = False,
    ) -> BatchFeature:
        """Interleaved lists (``inputs``) or placeholder text (``text`` + ``images``) -> a BatchFeature.

        padding_side: "left" for generation (the prompt ends where decoding starts), "right" for training.
        return_labels: add ``labels`` [B, L] by the rule ``flamingo train`` uses (:meth:`make_labels`): only
        text after a row's first ``<image>`` is a target.
        """
        if (inputs is None) == (text is None):
            raise ValueError("pass either interleaved `inputs` or `text` (with `images`), not both or neither")
        if inputs is not None:
            samples = self._interleaved(inputs)
        else:
            samples = self._placeholders(text, images)
        if not samples or not any(s for s, _ in samples):
            raise ValueError("nothing to process: the inputs hold no text and no media")
        strings = [self.format_text(s) for s, _ in samples]
        media = [m for _, row in samples for m in row]
        enc = self.tokenize(strings, padding=True, padding_side=padding_side, return_tensors="pt")
        counts = (enc["input_ids"] == self.media_token_id).sum(dim=1).tolist()
        for i, ((_, row), n) in enumerate(zip(samples, counts)):
            if n != len(row):
                raise ValueError(
                    f"sample {i}: the text holds {n} {self.media_token} token(s) but {len(row)} media were given; "
                    f"write images as list items (or as {self.media_token} placeholders with images=...), not both"
                )
        data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        data.update(stack_media(media))
        if return_labels:
            data["labels"] = self.make_labels(data["input_ids"], data["attention_mask"])
            empty = (data["labels"][:, 1:] == IGNORE_INDEX).all(dim=1).nonzero().flatten().tolist()
            if empty:
                warnings.warn(
                    f"row(s) {empty} have no loss target: only text after a row's first {self.media_token} is trained "
                    f"(the rule of `flamingo train`)", stacklevel=2,
                )
        return BatchFeature(data, tensor_type=None)

    def format_text(self, text: str) -> str:
        """The text as the model reads it: without a media wrapper token, ``text`` itself; with one (W), each run
        of media tokens, with or without wrappers already around them, becomes ``W`` + ``<image>W`` per medium."""
        if self.media_wrapper_token is None:
            return text
        media, wrapper = re.escape(self.media_token), re.escape(self.media_wrapper_token)
        run = re.compile(f"(?:{wrapper})*{media}(?:(?:{wrapper})*{media})*(?:{wrapper})*")
        return run.sub(lambda m: self.media_wrapper_token + (self.media_token + self.media_wrapper_token) * m.group().count(self.media_token), text)

    def _interleaved(self, inputs: Sequence[Any]) -> list[tuple[str, list[torch.Tensor]]]:
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, (list, tuple)):
            raise ValueError("interleaved inputs must be a list of items (str, image, Video) or a list of such lists")
        batch = inputs if inputs and all(isinstance(x, (list, tuple)) for x in inputs) else [inputs]
        samples = []
        for row in batch:
            parts, media = [], []
            for item in row:
                if isinstance(item, str):
                    parts.append(item)
                else:
                    media.append(self.media_tensor(item))
                    parts.append(self.media_token)
            samples.append(("".join(parts), media))
        return samples

    def _placeholders(self, text, images) -> list[tuple[str, list[torch.Tensor]]]:
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = [[] for _ in texts]
        elif isinstance(text, str):
            if not isinstance(images, (list, tuple)):
                raise ValueError(f"images must be a list of the text's images, got a {type(images).__name__}")
            images = [images]
        if len(images) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(images)} image lists")
        for i, row in enumerate(images):
            if not isinstance(row, (list, tuple)):
                raise ValueError(
                    f"with a list of texts, images must hold one list of images per text; images[{i}] is a {type(row).__name__}"
                )
        return [(t, [self.media_tensor(m) for m in row]) for t, row in zip(texts, images)]

    def media_tensor(self, item: Any) -> torch.Tensor:
        """One medium -> [T, C, H, W] (an image is a video of one frame)."""
        if isinstance(item, Video):
            if isinstance(item.frames, torch.Tensor):
                return self._check_pixels(item.frames, 4, "video")
            if len(item.frames) == 0:
                raise ValueError("a Video needs at least one frame")
            return torch.stack([self.image_transform(f) for f in item.frames])
        if isinstance(item, torch.Tensor):
            return self._check_pixels(item, 3, "image")[None]
        if isinstance(item, (list, tuple)):
            raise ValueError("a list inside an interleaved sample is ambiguous: wrap video frames in flamingo_vlm.Video(frames)")
        return self.image_transform(item)[None]

    @staticmethod
    def _check_pixels(x: torch.Tensor, ndim: int, what: str) -> torch.Tensor:
        if x.ndim != ndim or x.shape[-3] != 3:
            shape = "[C, H, W]" if ndim == 3 else "[T, C, H, W]"
            raise ValueError(f"a preprocessed {what} tensor must be {shape} with C=3, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"a preprocessed {what} tensor must be float (normalised pixels), got {x.dtype}")
        return x

    def make_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Targets [B, L] for the LM loss by the training rule (:func:`flamingo_vlm.processing.labels.make_labels`):
        -100 on padding, ``<image>`` and the text before a row's first ``<image>``.

        Without ``attention_mask`` [B, L], padding is where ``input_ids`` is the pad id.
        """
        if attention_mask is None:
            attention_mask = (input_ids != self.tokenizer.pad_token_id).long()
        return make_labels(input_ids, attention_mask, self.media_token_id)

    # ---- outputs -> text ---------------------------------------------------------------------
    def batch_decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    # ---- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_transform.save(directory)
        with open(os.path.join(directory, PROCESSOR_CONFIG_NAME), "w") as f:
            tokens = {"media_token": self.media_token, "end_of_chunk_token": self.end_of_chunk_token, "special_tokens_in_text": self.special_tokens_in_text}
            if self.media_wrapper_token is not None:
                tokens["media_wrapper_token"] = self.media_wrapper_token
            json.dump(tokens, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "FlamingoProcessor":
        path = Path(directory) / PROCESSOR_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {PROCESSOR_CONFIG_NAME} in {directory!s}: save the processor with save_pretrained")
        tokens = json.loads(path.read_text())
        return cls(AutoTokenizer.from_pretrained(directory), ImageTransform.load(directory), **tokens)


def stack_media(media: list[torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """List of [T_i, C, H, W] -> pixel_values [M, T, C, H, W] (+ frame_mask [M, T] if the T_i differ)."""
    if not media:
        return {"pixel_values": None}
    sizes = {tuple(m.shape[1:]) for m in media}
    if len(sizes) != 1:
        raise ValueError(f"all media in a batch must share one [C, H, W] size, got {sorted(sizes)}")
    frames = [m.shape[0] for m in media]
    t = max(frames)
    if all(f == t for f in frames):
        return {"pixel_values": torch.stack(media)}
    pixel_values = media[0].new_zeros(len(media), t, *media[0].shape[1:])
    frame_mask = torch.zeros(len(media), t, dtype=torch.bool)
    for i, m in enumerate(media):
        pixel_values[i, : m.shape[0]] = m
        frame_mask[i, : m.shape[0]] = True
    return {"pixel_values": pixel_values, "frame_mask": frame_mask}


__all__ = ["PROCESSOR_CONFIG_NAME", "FlamingoProcessor", "Video", "add_special_tokens", "stack_media"]
