"""A request's prompt -> interleaved model items (text and preprocessed media), checked against the limits.

In two steps, both in the server's request threads (not the model's):

1. :meth:`PromptReader.plan`: the prompt's structure, its text (its length bounded before it is tokenised,
   then its tokens counted), and every image's header, so that the pixels and memory the request will take
   are known, and checked, before any pixel is decoded;
2. :meth:`PromptReader.decode`: the media decoded one frame at a time (each frame resized to the encoder's
   input as soon as it is decoded) under the server's :class:`~flamingo_vlm.serving.budget.DecodeSlots`.

So the model thread only runs the vision encoder (once per medium) and the LM.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..processing import Video
from ..processing.text import PromptTokenizer
from .budget import DecodeSlots, frame_decode_bytes
from .errors import invalid, too_large
from .images import decode_opened, open_image
from .schemas import Limits, PromptRequest

ITEM_KINDS = ("text", "image", "video")


@dataclass
class Prompt:
    """items: str and Video(frames [T, C, H, W]) in prompt order (an image is a video of one frame)."""

    items: list[str | Video]
    num_media: int
    num_tokens: int


@dataclass
class OpenedMedium:
    """An image or video whose headers were read and whose pixels are not decoded yet."""

    frames: list[Image.Image]
    where: list[str]  # each frame's place in the request, for error messages ("prompt[2].video[5]")

    @property
    def pixels(self) -> int:
        return sum(f.size[0] * f.size[1] for f in self.frames)


@dataclass
class PromptPlan:
    """A checked prompt before decoding: its items (str or :class:`OpenedMedium`), its token count, and the
    bytes its media will take while the request is served (decoded frames + the largest frame's decoding)."""

    items: list[str | OpenedMedium]
    num_tokens: int
    num_frames: int = 0
    pixels: int = 0
    cost_bytes: int = 0
    media: list[OpenedMedium] = field(default_factory=list)


class PromptReader:
    """Reads prompts for one model: its processor's image transform and media marker, its token budget.

    decode_slots: shared by every request of the server (None: a private, unbounded one).
    """

    def __init__(self, processor, limits: Limits, *, max_positions: int | None = None,
                 decode_slots: DecodeSlots | None = None) -> None:
        self.processor = processor
        self.limits = limits
        self.max_positions = max_positions
        self.decode_slots = decode_slots or DecodeSlots(2**62)
        size = processor.image_transform.size
        self.frame_bytes = 3 * size * size * 4  # one decoded frame as the encoder takes it: float32 [3, S, S]
        # The model thread tokenises with padding, which reconfigures its fast tokenizer; request threads
        # each use their own copy (no lock held across requests: a long text never delays a short one).
        self._template = copy.deepcopy(processor.tokenizer)
        self._template_lock = threading.Lock()
        self._local = threading.local()
        # No token is longer than this many characters (byte-level BPE and byte-fallback spellings are longer
        # than the text they stand for), so a text over limit x this many characters is over the limit in
        # tokens: it is refused without being tokenised.
        longest = max((len(t) for t in self._template.get_vocab()), default=1)
        self.max_text_chars = limits.max_prompt_tokens * max(longest, 1)

    def _tokenizer(self):
        """This thread's tokenizer, under the processor's ``special_tokens_in_text`` policy (as the model's)."""
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            with self._template_lock:
                own = copy.deepcopy(self._template)
            markers = (self.processor.media_token, self.processor.end_of_chunk_token)
            tok = self._local.tokenizer = PromptTokenizer(own, markers, self.processor.special_tokens_in_text)
        return tok

    def _token_ids(self, texts, where: str, **kwargs) -> list:
        try:
            return self._tokenizer()(texts, **kwargs)["input_ids"]
        except ValueError as e:  # special_tokens_in_text="refuse": the message names the token and where it is
            raise invalid(f"{where}: {e}") from e

    def _check_text_length(self, chars: int, what: str) -> None:
        if chars > self.max_text_chars:
            raise too_large(
                f"{what} is {chars:,} characters, more than {self.max_text_chars:,}: whatever its tokenisation, it is "
                f"over the server's limit of {self.limits.max_prompt_tokens} tokens"
            )

    def count_tokens(self, texts: list[str], where: str = "candidates") -> list[int]:
        for i, text in enumerate(texts):
            self._check_text_length(len(text), f"{where}[{i}]")
        return [len(ids) for ids in self._token_ids(texts, where, add_special_tokens=False)]

    def check_candidates(self, candidates: list[str]) -> None:
        """Score candidates are text appended to the prompt: no media marker in them."""
        marker = self.processor.media_token
        for i, c in enumerate(candidates):
            if marker in c:
                raise invalid(f"candidates[{i}] holds the {marker} marker, which stands for an image: candidates are text only")

    def plan(self, request: PromptRequest, *, new_tokens: int = 0) -> PromptPlan:
        """Check the prompt without decoding a pixel; ``new_tokens`` is what will follow it (generated or scored)."""
        items = self._items(request)
        if not any(isinstance(x, OpenedMedium) or x for x in items):
            raise invalid("the prompt is empty: give at least one text or image item")
        marker = self.processor.media_token
        texts = [marker if isinstance(x, OpenedMedium) else x for x in items]
        self._check_text_length(sum(len(t) for t in texts), "the prompt's text")
        media = [x for x in items if isinstance(x, OpenedMedium)]
        frames = [f for m in media for f in m.frames]
        pixels = sum(m.pixels for m in media)
        if pixels > self.limits.max_request_pixels:
            raise too_large(
                f"the request's images and frames hold {pixels:,} pixels together, over the server's limit of "
                f"{self.limits.max_request_pixels:,}"
            )
        text = self.processor.format_text("".join(texts))
        num_tokens = len(self._token_ids(text, "prompt"))
        if num_tokens > self.limits.max_prompt_tokens:
            raise too_large(f"the prompt is {num_tokens} tokens, over the server's limit of {self.limits.max_prompt_tokens}")
        if self.max_positions is not None and num_tokens + new_tokens > self.max_positions:
            raise too_large(
                f"the prompt ({num_tokens} tokens) plus {new_tokens} new tokens is over the language model's "
                f"{self.max_positions} positions"
            )
        largest = max((f.size[0] * f.size[1] for f in frames), default=0)
        cost = len(frames) * self.frame_bytes + frame_decode_bytes(largest)
        return PromptPlan(items, num_tokens, len(frames), pixels, cost, media)

    def decode(self, plan: PromptPlan) -> Prompt:
        """Decode the planned media, one frame at a time, each resized to the encoder's input at once."""
        items: list[str | Video] = []
        for item in plan.items:
            if isinstance(item, OpenedMedium):
                frames = []
                for image, where in zip(item.frames, item.where):
                    with self.decode_slots.take(image.size[0] * image.size[1]):
                        frames.append(self.processor.image_transform(decode_opened(image, where)))
                    image.close()
                items.append(Video(torch.stack(frames)))  # [T, C, H, W]
            else:
                items.append(item)
        return Prompt(items=items, num_media=len(plan.media), num_tokens=plan.num_tokens)

    # ---- the two prompt forms ----------------------------------------------------------------
    def _items(self, request: PromptRequest) -> list[str | OpenedMedium]:
        if (request.prompt is None) == (request.text is None):
            raise invalid('give the prompt either as "prompt" (a list of items) or as "text" (with "images"), not both or neither')
        if request.prompt is not None:
            if request.images is not None:
                raise invalid('"images" goes with "text" (placeholder form); in a "prompt" list, images are {"image": ...} items')
            return self._interleaved(request.prompt)
        return self._placeholders(request.text, request.images or [])

    def _interleaved(self, prompt: list) -> list[str | OpenedMedium]:
        marker = self.processor.media_token
        media = sum(1 for item in prompt if isinstance(item, dict) and ("image" in item or "video" in item))
        self._check_media_count(media)
        items: list[str | OpenedMedium] = []
        for i, item in enumerate(prompt):
            where = f"prompt[{i}]"
            if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in ITEM_KINDS:
                got = sorted(item) if isinstance(item, dict) else type(item).__name__
                raise invalid(f'{where}: an item is {{"text": str}}, {{"image": base64 or data URL}} or {{"video": [frames]}}; got {got}')
            kind, value = next(iter(item.items()))
            if kind == "text":
                if not isinstance(value, str):
                    raise invalid(f"{where}.text: expected a string, got {type(value).__name__}")
                if marker in value:
                    raise invalid(
                        f"{where}.text holds the {marker} marker, which stands for an image: send images as "
                        f'{{"image": ...}} items, or use the "text" + "images" form'
                    )
                items.append(value)
            elif kind == "image":
                items.append(self._image(value, f"{where}.image"))
            else:
                items.append(self._video(value, f"{where}.video"))
        return items

    def _placeholders(self, text: str, images: list[str]) -> list[str | OpenedMedium]:
        marker = self.processor.media_token
        parts = text.split(marker)
        if len(parts) - 1 != len(images):
            raise invalid(f"the text has {len(parts) - 1} {marker} marker(s) but {len(images)} image(s) were given")
        self._check_media_count(len(images))
        items: list[str | OpenedMedium] = [parts[0]] if parts[0] else []
        for i, (image, after) in enumerate(zip(images, parts[1:])):
            items.append(self._image(image, f"images[{i}]"))
            if after:
                items.append(after)
        return items

    # ---- media ---------------------------------------------------------------------------------
    def _check_media_count(self, n: int) -> None:
        if n > self.limits.max_media:
            raise too_large(f"{n} images/videos in the request, over the server's limit of {self.limits.max_media}")

    def _image(self, data, where: str) -> OpenedMedium:
        return OpenedMedium([open_image(data, where, max_pixels=self.limits.max_image_pixels)], [where])

    def _video(self, frames, where: str) -> OpenedMedium:
        if not isinstance(frames, list) or not frames:
            raise invalid(f"{where}: a video is a non-empty list of frames (base64 images or data URLs)")
        if len(frames) > self.limits.max_video_frames:
            raise too_large(f"{where}: {len(frames)} frames, over the server's limit of {self.limits.max_video_frames}")
        places = [f"{where}[{t}]" for t in range(len(frames))]
        return OpenedMedium([open_image(f, w, max_pixels=self.limits.max_image_pixels) for f, w in zip(frames, places)], places)
