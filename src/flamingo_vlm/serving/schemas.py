"""Request bodies of the HTTP API, the server's limits, and JSON parsing with clear 4xx errors.

A prompt is either a list of interleaved items::

    {"prompt": [{"image": "<base64 or data URL>"}, {"text": "Output: a red circle.<|endofchunk|>"},
                {"video": ["<frame>", "<frame>", ...]}, {"text": "Output:"}]}

or OpenFlamingo-style placeholder text with its images: ``{"text": "<image>Output:", "images": ["..."]}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import bad_request, invalid, too_large


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything over a limit is refused with a 4xx naming the limit."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # one image or frame; checked from the header, before decoding
    max_request_pixels: int = 2 * 4096 * 4096  # all images and frames of one request together (decompression bombs)
    decode_budget_bytes: int = 1024 * 1024 * 1024  # media decoded or held at once, all requests together
    decode_wait_s: float = 5.0  # how long a request waits for that budget before a 503
    body_timeout_s: float = 30.0  # a body that stalls this long between chunks: 408
    max_media: int = 32  # images + videos per request
    max_video_frames: int = 32
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 256
    max_num_beams: int = 8
    max_candidates: int = 64
    max_queue: int = 256  # requests waiting for the model; more get 503


class PromptRequest(BaseModel):
    """The prompt, in one of its two forms (checked by :func:`prompt_items`).

    Strict: a value of the wrong JSON type is refused, never coerced (``"5"`` is not 5, ``"yes"`` not true)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: list[Any] | None = Field(None, description='interleaved items: {"text": ...}, {"image": ...}, {"video": [frames]}')
    text: str | None = Field(None, description="placeholder form: text with one <image> marker per image")
    images: list[str] | None = Field(None, description="placeholder form: the images of the <image> markers, in order")


MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


class GenerateRequest(PromptRequest):
    max_new_tokens: int = Field(20, ge=1)
    num_beams: int = Field(3, ge=1)
    do_sample: bool = False
    # Bounded so that logits / temperature stay finite in float32 (1e-30 or 1e308 would make NaN probabilities).
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description=f"with do_sample: {MIN_TEMPERATURE} to {MAX_TEMPERATURE}")
    top_k: int | None = Field(None, ge=1, le=2**31 - 1)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="with do_sample: reproducible sampling (the request then runs unbatched)")
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


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON (JSON numbers are finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range (over a float's largest value)")
    return value


def parse_json(body: bytes) -> dict:
    """Body bytes -> a JSON object; 400 naming the syntax error otherwise.

    Strict JSON: Python's ``NaN`` / ``Infinity`` extensions are refused, and so is a string holding a lone
    UTF-16 surrogate (``"\\ud800"``: valid JSON syntax, but no text; it would fail deep in the tokenizer).
    """
    try:
        data = json.loads(body, parse_constant=_not_json, parse_float=_finite_float)
    except UnicodeDecodeError as e:
        raise bad_request(f"malformed JSON: the body is not UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise bad_request(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except ValueError as e:  # from _not_json / _finite_float
        raise bad_request(f"malformed JSON: {e}") from e
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    where = _lone_surrogate(data, "")
    if where is not None:
        raise bad_request(f"{where or 'body'}: the string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")
    return data


def _has_surrogate(text: str) -> bool:
    if text.isascii():  # the common case, and fast on a long text
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # only a lone surrogate cannot be encoded
        return True
    return False


def _lone_surrogate(value: Any, where: str) -> str | None:
    """The place (``prompt[1].text``) of the first string (or key) holding a lone surrogate, else None."""
    if isinstance(value, str):
        return where if _has_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            place = f"{where}.{key}" if where else str(key)
            if _has_surrogate(key):
                return f"{where or 'body'} (a key)"
            found = _lone_surrogate(item, place)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def validate(model: type[BaseModel], data: dict) -> Any:
    """A request model from parsed JSON; 422 listing every invalid field (``num_beams: must be >= 1``)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
        raise invalid(f"invalid request: {problems}") from e
