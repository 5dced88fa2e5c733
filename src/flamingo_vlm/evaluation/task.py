"""What a benchmark is to the runner: examples, how one is written into a prompt, and how predictions score.

A :class:`Task` owns everything benchmark-specific (readers, prompt, answer post-processing, metric); the
runner (:mod:`flamingo_vlm.evaluation.runner`) only builds prompts from ``format_example`` and calls
``score``. Adding a benchmark is a new ``Task`` subclass (registered with :func:`register_task` for YAML
configs), never an edit of the runner.
"""

from __future__ import annotations

import importlib
import inspect
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import END_OF_CHUNK_TOKEN
from .metrics import exact_match_accuracy, vqa_normalize


@dataclass
class Example:
    """One benchmark item.

    id: unique within its split (written to the results). media: PIL images, image/video paths or
    :class:`flamingo_vlm.Video` objects, in prompt order. fields: everything else (question, answers,
    captions, label, ...), available to the prompt template as ``{name}``.
    """

    id: Any
    media: list = field(default_factory=list)
    fields: dict = field(default_factory=dict)


class Prediction(str):
    """A prediction for one query: the text itself (a ``str``, so a task may compare it directly), plus

    scores: rank tasks, candidate -> (length-normalised) log-likelihood, averaged over ensembled prompts;
    raw: generate tasks, the decoded continuation before :meth:`Task.postprocess`.
    """

    scores: dict[str, float] | None
    raw: str | None

    def __new__(cls, text: str, *, scores: dict[str, float] | None = None, raw: str | None = None) -> "Prediction":
        obj = super().__new__(cls, text)
        obj.scores = scores
        obj.raw = raw
        return obj


def as_media(item: Any) -> Any:
    """A media entry as the processor takes it: plain strings become paths (a str item would be prompt text)."""
    return Path(item) if isinstance(item, str) else item


class Task:
    """A few-shot benchmark. Class attributes are the defaults; the constructor overrides any of them.

    kind: "generate" (open-ended: beam search, then ``postprocess``) or "rank" (close-ended: the
    candidates are ranked by log-likelihood). The prompt of one example is its media followed by
    ``prompt.format(**fields)``; with its answer, ``answer_prefix + answer + answer_suffix`` follows
    (the paper's ``<image>Output: {caption}<EOC>``).
    """

    name: str = "task"
    kind: str = "generate"
    metric: str = "accuracy"
    prompt: str = "Output:"
    answer_prefix: str = " "
    answer_suffix: str = END_OF_CHUNK_TOKEN
    # Open-ended decoding (paper: beam search with 3 beams, stop at the first <EOC>).
    max_new_tokens: int = 20
    num_beams: int = 3
    generate_kwargs: dict | None = None
    # The paper's "0-shot": two text-only examples (images removed) before the query.
    zero_shot_text_examples: bool = True
    num_text_examples: int = 2
    # Close-ended scoring: mean (True) or summed (False) token log-likelihood; whether the candidate's
    # <|endofchunk|> is scored too (it tells "cat" from the start of "cat food").
    length_normalize: bool = True
    score_end_of_chunk: bool = True
    # Frames sampled uniformly from each video file.
    num_frames: int = 8
    # Text after each shot, before the next example (OpenFlamingo: a newline in caption / VQA prompts).
    shot_separator: str = ""
    # Beam search's length_penalty (None: transformers' default, 1.0; OpenFlamingo passes 0.0).
    length_penalty: float | None = None
    # Generated answers end at the first newline (OpenFlamingo does not cut there).
    cut_at_newline: bool = True
    # Rank tasks: tokenise the candidate alone (OpenFlamingo), not as it follows the prompt's text.
    tokenize_candidates_alone: bool = False
    # Per protocol, the attributes it sets (merged along the class hierarchy, derived classes last); a
    # protocol that does not name an attribute leaves the class default. See flamingo_vlm.evaluation.protocol.
    protocol_settings: dict[str, dict] = {
        "openflamingo": {
            "answer_prefix": "", "length_penalty": 0.0, "cut_at_newline": False,
            "tokenize_candidates_alone": True, "score_end_of_chunk": False,
        },
    }

    def __init__(
        self,
        name: str | None = None,
        *,
        prompt: str | None = None,
        answer_prefix: str | None = None,
        answer_suffix: str | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        generate_kwargs: dict | None = None,
        zero_shot_text_examples: bool | None = None,
        num_text_examples: int | None = None,
        length_normalize: bool | None = None,
        score_end_of_chunk: bool | None = None,
        num_frames: int | None = None,
        shot_separator: str | None = None,
        length_penalty: float | None = None,
        cut_at_newline: bool | None = None,
        tokenize_candidates_alone: bool | None = None,
    ) -> None:
        overrides = dict(
            name=name, prompt=prompt, answer_prefix=answer_prefix, answer_suffix=answer_suffix, max_new_tokens=max_new_tokens,
            num_beams=num_beams, generate_kwargs=generate_kwargs, zero_shot_text_examples=zero_shot_text_examples,
            num_text_examples=num_text_examples, length_normalize=length_normalize, score_end_of_chunk=score_end_of_chunk,
            num_frames=num_frames, shot_separator=shot_separator, length_penalty=length_penalty, cut_at_newline=cut_at_newline,
            tokenize_candidates_alone=tokenize_candidates_alone,
        )
        # what the task's config set explicitly: a protocol never overrides it
        self.explicit_settings = {key for key, value in overrides.items() if value is not None}
        self.protocol = "paper"
        for key, value in overrides.items():
            if value is not None:
                setattr(self, key, value)

    # ---- protocol ----------------------------------------------------------------------------
    @classmethod
    def settings_for(cls, protocol: str) -> dict:
        """The attributes ``protocol`` sets on this class: ``protocol_settings`` merged from base to derived;
        an attribute another protocol sets and this one does not keeps its class default."""
        merged: dict[str, dict] = {}
        for klass in reversed(cls.__mro__):
            for name, values in vars(klass).get("protocol_settings", {}).items():
                merged.setdefault(name, {}).update(values)
        keys = {key for values in merged.values() for key in values}
        defaults = {}
        for key in keys:  # the class default: the nearest class that defines the attribute itself
            defaults[key] = next(vars(k)[key] for k in cls.__mro__ if key in vars(k))
        return {**defaults, **merged.get(protocol, {})}

    def use_protocol(self, protocol: str) -> "Task":
        """Apply a protocol's task settings (``"paper"`` restores the class defaults); settings given to the
        constructor are kept. Returns self."""
        for key, value in self.settings_for(protocol).items():
            if key not in getattr(self, "explicit_settings", set()):
                setattr(self, key, value)
        self.protocol = protocol
        return self

    def protocol_record(self) -> dict:
        """The settings that the protocols choose between, as this task uses them (for the results JSON)."""
        keys = sorted(set(self.settings_for(self.protocol)) | {"prompt", "max_new_tokens", "num_beams"})
        return {key: getattr(self, key) for key in keys}

    # ---- data --------------------------------------------------------------------------------
    def support(self) -> list[Example]:
        """The pool that shots are drawn from (usually the train split)."""
        raise NotImplementedError(f"{type(self).__name__} must implement support()")

    def queries(self) -> list[Example]:
        """The evaluated examples (the val/test split)."""
        raise NotImplementedError(f"{type(self).__name__} must implement queries()")

    # ---- prompts -----------------------------------------------------------------------------
    def media_items(self, ex: Example) -> list:
        return [as_media(m) for m in ex.media]

    def prompt_text(self, ex: Example) -> str:
        """The text after the example's media, up to where the answer goes."""
        return self.prompt.format(**ex.fields)

    def format_example(self, ex: Example, with_answer: bool) -> list:
        """Interleaved processor items: ``[img, "Output: a cat.<|endofchunk|>"]`` or ``[img, "Output:"]``."""
        text = self.prompt_text(ex)
        if with_answer:
            text += self.answer_prefix + self.answer(ex) + self.answer_suffix
        return [*self.media_items(ex), text]

    def answer(self, ex: Example) -> str:
        """The answer written after a shot (and the reference for exact-match scoring)."""
        return str(ex.fields["answer"])

    def candidates(self, ex: Example) -> list[str]:
        """Rank tasks: the answers to rank for this query."""
        if "candidates" in ex.fields:
            return list(ex.fields["candidates"])
        raise NotImplementedError(f"{type(self).__name__} is a rank task: implement candidates() or give fields['candidates']")

    def continuation(self, candidate: str) -> str:
        """The text scored for one candidate after the query prompt: what ``format_example(with_answer=True)``
        appends to the query's text. Override both together if a task writes its answers differently."""
        return self.answer_prefix + candidate + (self.answer_suffix if self.score_end_of_chunk else "")

    def postprocess(self, text: str) -> str:
        """Generated text -> the answer: up to the end of the chunk, and its first line if ``cut_at_newline``."""
        text = text.split(END_OF_CHUNK_TOKEN)[0].strip()
        return text.split("\n")[0].strip() if self.cut_at_newline else text

    # ---- scoring -----------------------------------------------------------------------------
    def score(self, predictions: list, examples: list[Example]) -> dict[str, float]:
        """Metric values (in percent, as papers report them); the main one under ``self.metric``."""
        references = [self.answer(ex) for ex in examples]
        return {self.metric: 100.0 * exact_match_accuracy(predictions, references, normalize=vqa_normalize)}

    def submission(self, predictions: list, examples: list[Example]) -> list | None:
        """The predictions as the benchmark's test server takes them, for a split without answers (None: the
        split is scored here). Written by :func:`~flamingo_vlm.evaluation.evaluate` beside its results JSON."""
        return None

    def reference(self, ex: Example) -> Any:
        """What the results JSON shows next to each prediction."""
        return self.answer(ex)

    # ---- per-prompt hook ---------------------------------------------------------------------
    def episode(self, query: Example, shots: list[Example], rng: random.Random) -> tuple[Example, list[Example]]:
        """Rewrite one prompt's examples after shot selection (e.g. bind new words to classes for this prompt).

        Called for every prompt; the prediction is scored against the returned query.
        """
        return query, shots

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, metric={self.metric!r})"


# ---- registry ------------------------------------------------------------------------------------
TASK_TYPES: dict[str, Callable[..., Task]] = {}


def register_task(type_name: str, factory: Callable[..., Task] | None = None):
    """Register a Task class (or factory) under ``type_name`` for YAML configs; usable as a decorator."""

    def add(f: Callable[..., Task]):
        TASK_TYPES[type_name] = f
        return f

    return add(factory) if factory is not None else add


def _constructor_keys(factory: Any) -> list[str] | None:
    """The keyword arguments ``factory`` accepts, following ``**options`` passed up to base classes'
    ``__init__`` (how task classes hand the shared options to :class:`Task`); None: cannot tell."""
    owners = [c for c in factory.__mro__ if "__init__" in c.__dict__ and c is not object] if isinstance(factory, type) else [factory]
    keys: list[str] = []
    for owner in owners:
        try:
            params = inspect.signature(owner.__init__ if isinstance(owner, type) else owner).parameters
        except (TypeError, ValueError):
            return None
        keys += [n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return keys
    return None  # the last constructor still takes **kwargs: anything may be accepted


def _check_task_keys(factory: Any, spec: dict[str, Any], type_name: str) -> None:
    """Refuse keys the task's constructor does not take, each with its closest known key (a typo in a config
    must not surface as ``__init__() got an unexpected keyword argument``)."""
    from ..yaml_config import unknown_keys_error

    known = _constructor_keys(factory)
    unknown = [k for k in spec if known is not None and k not in known]
    if unknown:
        cls = factory if isinstance(factory, type) else type(factory)
        where = f"task {spec['name']!r} ({type_name})" if "name" in spec else f"task {type_name!r}"
        raise unknown_keys_error(cls, unknown, where, known=sorted(set(known)))


def build_task(spec: dict[str, Any]) -> Task:
    """A Task from a config dict: ``{"type": "coco_captioning", "karpathy_json": ..., ...}``.

    ``type`` is a registered name or ``"package.module:ClassName"`` (custom tasks without registering);
    every other key is a constructor argument (``name`` defaults to the class's).
    """
    from . import tasks  # noqa: F401  (registers the built-in tasks)

    spec = dict(spec)
    if "type" not in spec:
        raise ValueError(f"a task config needs a 'type' (one of {sorted(TASK_TYPES)} or 'module:Class'), got {spec}")
    type_name = spec.pop("type")
    if ":" in type_name:
        module, _, attr = type_name.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    elif type_name in TASK_TYPES:
        factory = TASK_TYPES[type_name]
    else:
        raise ValueError(f"unknown task type {type_name!r}; registered: {sorted(TASK_TYPES)} (or give 'module:Class')")
    _check_task_keys(factory, spec, type_name)
    try:
        return factory(**spec)
    except TypeError as e:
        raise ValueError(f"task {spec.get('name', type_name)!r} ({type_name}): {e}") from e
