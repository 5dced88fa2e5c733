"""A request's prompt -> interleaved model items (text and preprocessed media), checked against the limits.

Runs in the server's request threads, not the model's: base64 and image decoding and the image transform
happen here, so the model thread only runs the vision encoder (once per medium) and the LM.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

from ..processing import Video
from .errors import invalid, too_large
from .images import decode_image
from .schemas import Limits, PromptRequest

ITEM_KINDS = ("text", "image", "video")


@dataclass
class Prompt:
    """items: str and Video(frames [T, C, H, W]) in prompt order (an image is a video of one frame)."""

    items: list[str | Video]
    num_media: int
    num_tokens: int


class PromptReader:
    """Reads prompts for one model: its processor's image transform and media marker, its token budget."""

    def __init__(self, processor, limits: Limits, *, max_positions: int | None = None) -> None:
        self.processor = processor
        self.limits = limits
        self.max_positions = max_positions
        # The model thread tokenises with padding, which reconfigures the shared fast tokenizer; concurrent
        # use from request threads would race ("Already borrowed"), so they share their own copy, locked.
        self._tokenizer = copy.deepcopy(processor.tokenizer)
        self._lock = threading.Lock()

    def count_tokens(self, texts: list[str]) -> list[int]:
        with self._lock:
            return [len(ids) for ids in self._tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def read(self, request: PromptRequest, *, new_tokens: int = 0) -> Prompt:
        """Decode and check the prompt; ``new_tokens`` is what will follow it (generated or scored)."""
        items = self._items(request)
        if not any(isinstance(x, Video) or x for x in items):
            raise invalid("the prompt is empty: give at least one text or image item")
        marker = self.processor.media_token
        text = self.processor.format_text("".join(marker if isinstance(x, Video) else x for x in items))
        with self._lock:
            num_tokens = len(self._tokenizer(text)["input_ids"])
        if num_tokens > self.limits.max_prompt_tokens:
            raise too_large(f"the prompt is {num_tokens} tokens, over the server's limit of {self.limits.max_prompt_tokens}")
        if self.max_positions is not None and num_tokens + new_tokens > self.max_positions:
            raise too_large(
                f"the prompt ({num_tokens} tokens) plus {new_tokens} new tokens is over the language model's "
                f"{self.max_positions} positions"
            )
        return Prompt(items=items, num_media=sum(isinstance(x, Video) for x in items), num_tokens=num_tokens)

    # ---- the two prompt forms ----------------------------------------------------------------
    def _items(self, request: PromptRequest) -> list[str | Video]:
        if (request.prompt is None) == (request.text is None):
            raise invalid('give the prompt either as "prompt" (a list of items) or as "text" (with "images"), not both or neither')
        if request.prompt is not None:
            if request.images is not None:
                raise invalid('"images" goes with "text" (placeholder form); in a "prompt" list, images are {"image": ...} items')
            return self._interleaved(request.prompt)
        return self._placeholders(request.text, request.images or [])

    def _interleaved(self, prompt: list) -> list[str | Video]:
        marker = self.processor.media_token
        media = sum(1 for item in prompt if isinstance(item, dict) and ("image" in item or "video" in item))
        self._check_media_count(media)
        items: list[str | Video] = []
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

    def _placeholders(self, text: str, images: list[str]) -> list[str | Video]:
        marker = self.processor.media_token
        parts = text.split(marker)
        if len(parts) - 1 != len(images):
            raise invalid(f"the text has {len(parts) - 1} {marker} marker(s) but {len(images)} image(s) were given")
        self._check_media_count(len(images))
        items: list[str | Video] = [parts[0]] if parts[0] else []
        for i, (image, after) in enumerate(zip(images, parts[1:])):
            items.append(self._image(image, f"images[{i}]"))
            if after:
                items.append(after)
        return items

    # ---- media ---------------------------------------------------------------------------------
    def _check_media_count(self, n: int) -> None:
        if n > self.limits.max_media:
            raise too_large(f"{n} images/videos in the request, over the server's limit of {self.limits.max_media}")

    def _image(self, data, where: str) -> Video:
        image = decode_image(data, where, max_pixels=self.limits.max_image_pixels)
        return Video(self.processor.media_tensor(image))  # [1, C, H, W]

    def _video(self, frames, where: str) -> Video:
        if not isinstance(frames, list) or not frames:
            raise invalid(f"{where}: a video is a non-empty list of frames (base64 images or data URLs)")
        if len(frames) > self.limits.max_video_frames:
            raise too_large(f"{where}: {len(frames)} frames, over the server's limit of {self.limits.max_video_frames}")
        images = [decode_image(f, f"{where}[{t}]", max_pixels=self.limits.max_image_pixels) for t, f in enumerate(frames)]
        return Video(self.processor.media_tensor(Video(images)))  # [T, C, H, W]
