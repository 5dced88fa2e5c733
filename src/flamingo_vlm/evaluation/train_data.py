"""A task's training split as supervised fine-tuning records (the paper's second way to adapt Flamingo, section 3.2).

Each example of ``task.support()`` (the train split that shots are drawn from at evaluation) becomes one
instruction record of :mod:`flamingo_vlm.data.instruct`: the prompt the evaluation would build for it as a
query (:func:`~flamingo_vlm.evaluation.prompts.build_prompt`, the same template, separators and protocol),
optionally after ``shots`` in-context examples drawn from the rest of the split, and the answer a shot of it
would show. ``flamingo train`` then trains on them with the loss on the answer only, so a model fine-tuned
this way is evaluated (``flamingo eval``) with exactly the prompt it was trained on.

Lives in evaluation/ (it reads the tasks and their prompts) and writes plain JSONL, so the training data
layer (data/, which may not import evaluation/) reads it without knowing any task.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

from ..config import END_OF_CHUNK_TOKEN
from ..processing.processor import Video
from .prompts import build_prompt
from .task import Example, Task


def _media_entry(item) -> dict:
    if isinstance(item, (str, os.PathLike)):
        return {"image": os.path.abspath(os.fspath(item))}
    if isinstance(item, Video):
        raise ValueError("video tasks cannot be written as instruction records yet (the format holds images only)")
    if hasattr(item, "save"):  # a PIL image held in memory
        buffer = io.BytesIO()
        item.convert("RGB").save(buffer, format="PNG")
        return {"image_base64": base64.b64encode(buffer.getvalue()).decode("ascii")}
    raise ValueError(f"cannot write a {type(item).__name__} medium into an instruction record")


def answer_text(task: Task, ex: Example) -> str:
    """What follows the query's prompt in a shot of ``ex``, without the closing ``<|endofchunk|>`` (the
    instruct format appends it): ``answer_prefix + answer``."""
    suffix = task.answer_suffix
    if suffix.endswith(END_OF_CHUNK_TOKEN):
        suffix = suffix[: -len(END_OF_CHUNK_TOKEN)]
    return task.answer_prefix + task.answer(ex) + suffix


def task_records(task: Task, *, shots: int = 0, seed: int = 0, limit: int | None = None) -> Iterator[dict]:
    """Instruction records ``{"items", "answer", "id", "task"}`` for the task's training split, in its order.

    shots: in-context examples in front of each query, drawn at random (``seed``) from the other examples
    of the split; their answers are part of the prompt (no loss on them).
    """
    pool = task.support()
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if shots and len(pool) <= shots:
        raise ValueError(f"task {task.name!r}: {shots} shots need more than {len(pool)} training examples")
    rng = random.Random(seed)
    for index, ex in enumerate(pool[:limit] if limit is not None else pool):
        chosen: list[Example] = []
        if shots:
            picks = rng.sample(range(len(pool) - 1), shots)  # every example but the query itself
            chosen = [pool[i + (i >= index)] for i in picks]
        query, chosen = task.episode(ex, chosen, rng)
        items = [x if isinstance(x, str) else _media_entry(x) for x in build_prompt(task, query, chosen)]
        yield {"items": items, "answer": answer_text(task, query), "id": query.id, "task": task.name}


def write_task_records(
    task: Task, path: str | os.PathLike, *, shots: int = 0, seed: int = 0, limit: int | None = None
) -> int:
    """Write :func:`task_records` to ``path`` (JSONL, atomically); returns the number of records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w") as f:
        for record in task_records(task, shots=shots, seed=seed, limit=limit):
            f.write(json.dumps(record, default=str) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


__all__ = ["answer_text", "task_records", "write_task_records"]
