"""Request bodies of the HTTP API, the server's limits, and JSON parsing with clear 4xx errors.

A prompt is either a list of interleaved items::

    {"prompt": [{"image": "<base64 or data URL>"}, {"text": "Output: a red circle.<|endofchunk|>"},
                {"video": ["<frame>", "<frame>", ...]}, {"text": "Output:"}]}

or OpenFlamingo-style placeholder text with its images: ``{"text": "<image>Output:", "images": ["..."]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import bad_request, invalid, too_large


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything over a limit is refused with a 4xx naming the limit."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # checked from the header, before decoding (decompression bombs)
    max_media: int = 32  # images + videos per request
    max_video_frames: int = 32
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 256
    max_num_beams: int = 8
    max_candidates: int = 64
    max_queue: int = 256  # requests waiting for the model; more get 503


class PromptRequest(BaseModel):
    """The prompt, in one of its two forms (checked by :func:`prompt_items`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: list[Any] | None = Field(None, description='interleaved items: {"text": ...}, {"image": ...}, {"video": [frames]}')
    text: str | None = Field(None, description="placeholder form: text with one <image> marker per image")
    images: list[str] | None = Field(None, description="placeholder form: the images of the <image> markers, in order")


class GenerateRequest(PromptRequest):
    max_new_tokens: int = Field(20, ge=1)
    num_beams: int = Field(3, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, description="with do_sample: reproducible sampling (the request then runs unbatched)")
    stop: list[str] = Field(default_factory=list, description="extra strings that end the answer (it always ends at <|endofchunk|>)")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``FlamingoModel.generate`` (sampling ones only when sampling)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs["temperature"] = self.temperature
            if self.top_k is not None:
                kwargs["top_k"] = self.top_k
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        return kwargs

    def check_limits(self, limits: Limits) -> None:
        if "max_new_tokens" not in self.model_fields_set:  # the default never exceeds the server's limit
            self.max_new_tokens = min(self.max_new_tokens, limits.max_new_tokens)
        if self.max_new_tokens > limits.max_new_tokens:
            raise invalid(f"max_new_tokens={self.max_new_tokens} is over the server's limit of {limits.max_new_tokens}")
        if self.num_beams > limits.max_num_beams:
            raise invalid(f"num_beams={self.num_beams} is over the server's limit of {limits.max_num_beams}")


class ScoreRequest(PromptRequest):
    candidates: list[str] = Field(..., min_length=1, description="answers appended to the prompt's text as they are")
    length_normalize: bool = Field(True, description="rank by mean token log-prob (else by the sum)")

    def check_limits(self, limits: Limits) -> None:
        if len(self.candidates) > limits.max_candidates:
            raise too_large(f"{len(self.candidates)} candidates, over the server's limit of {limits.max_candidates}")
        for i, c in enumerate(self.candidates):
            if not c:
                raise invalid(f"candidates[{i}] is empty")


def parse_json(body: bytes) -> dict:
    """Body bytes -> a JSON object; 400 naming the syntax error otherwise."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError as e:
        raise bad_request(f"malformed JSON: the body is not UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise bad_request(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def validate(model: type[BaseModel], data: dict) -> Any:
    """A request model from parsed JSON; 422 listing every invalid field (``num_beams: must be >= 1``)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
        raise invalid(f"invalid request: {problems}") from e
