"""Supervised (instruction-style) data: interleaved prompt items and the answer, the loss on the answer only.

On disk: ``.jsonl`` files (or ``.jsonl.gz``), one record a line::

    {"items": ["Question: what is it? ", {"image": "img/0001.jpg"}, "Answer:"], "answer": " a red circle"}

- ``items``: the prompt in order; a string is text, ``{"image": PATH}`` an image (a path relative to the
  dataset's ``image_dir``, else to the jsonl file's folder; or absolute), ``{"image_base64": "..."}`` an
  image inline. In-context shots are part of the prompt: their answers are written into the items.
- ``answer``: the text the model learns to write after the prompt (with its leading space, as the prompt
  template wants it); ``<|endofchunk|>`` is appended and is a target too, so the model learns to stop.
- any other key (``id``, ``task``, ...) is kept only for error reports.

Tokens: ``processor.tokenize(prompt)`` (its BOS, as at inference, so the prompt is tokenised exactly as
``flamingo eval`` and ``generate`` tokenise it) followed by the answer tokenised on its own (generation
continues the prompt's tokens; it never re-tokenises across the boundary). The sample's ``target_start``
is the answer's first token: :func:`flamingo_vlm.processing.labels.make_labels` masks everything before it.
A record longer than ``max_tokens`` is skipped (``bad_record``), not cut: cutting would drop the answer or
an image's token.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from .images import b64_bytes, decode_image, open_image, read_file
from .samples import Sample, SkipSample
from .sources import JsonlSource


class InstructFormat:
    """Decodes one instruction record (see the module docstring) into a :class:`Sample` with ``target_start``."""

    def __init__(self, processor, *, max_tokens: int = 512, image_dir: str | None = None) -> None:
        self.processor, self.max_tokens, self.image_dir = processor, max_tokens, image_dir
        self.source = JsonlSource()
        self.source_extensions = self.source.extensions

    def _image(self, entry: dict, shard: str) -> torch.Tensor:
        if "image_base64" in entry:
            data = b64_bytes(str(entry["image_base64"]))
        else:
            name = os.path.expanduser(str(entry["image"]))
            root = self.image_dir or os.path.dirname(os.path.abspath(shard))
            path = name if os.path.isabs(name) else os.path.join(root, name)
            if not os.path.isfile(path):
                raise SkipSample("missing_file", path)
            data = read_file(path)
        return self.processor.image_transform(decode_image(open_image(data)))[None]  # [1, C, H, W]

    def encode(self, items: list, answer: str, shard: str = "") -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """(input_ids [L], media [T=1, C, H, W] per image, target_start) for one record's fields."""
        parts, media = [], []
        for i, item in enumerate(items):
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict) and ("image" in item or "image_base64" in item):
                media.append(self._image(item, shard))
                parts.append(self.processor.media_token)
            else:
                raise SkipSample("bad_record", f"items[{i}] is neither text nor {{'image': path}}: {item!r}")
        if not media:
            raise SkipSample("bad_record", "the prompt has no image")
        prompt = self.processor.format_text("".join(parts))
        prompt_ids = self.processor.tokenize(prompt)["input_ids"]
        answer_ids = self.processor.tokenize(answer + self.processor.end_of_chunk_token, add_special_tokens=False)[
            "input_ids"
        ]
        if prompt_ids.count(self.processor.media_token_id) != len(media):
            raise SkipSample("bad_record", f"the text writes {self.processor.media_token} itself; give images as items")
        ids = prompt_ids + answer_ids
        if len(ids) > self.max_tokens:
            raise SkipSample("bad_record", f"{len(ids)} tokens, more than max_tokens={self.max_tokens}")
        return torch.tensor(ids, dtype=torch.long), media, len(prompt_ids)

    def decode(self, record: dict, rng: np.random.Generator) -> Sample:
        key = f"{record['__url__']}#{record['__key__']}"
        try:
            doc = json.loads(record["line"])
            items, answer = doc["items"], doc["answer"]
            if not isinstance(items, list) or not isinstance(answer, str) or not answer.strip():
                raise TypeError("`items` must be a list and `answer` a non-empty string")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise SkipSample("bad_record", f"{key}: {e}") from e
        try:
            ids, media, start = self.encode(items, answer, record["__url__"])
        except SkipSample as e:
            raise SkipSample(e.reason, f"{key}: {e}") from e
        except OSError as e:
            raise SkipSample("corrupt_image", f"{key}: {e}") from e
        return Sample(ids, media, key=key, target_start=start)


__all__ = ["InstructFormat"]
