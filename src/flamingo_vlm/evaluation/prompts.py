"""Few-shot prompts: shots then the query as interleaved items (paper, appendix B)."""

from __future__ import annotations

from .task import Example, Task


def build_prompt(task: Task, query: Example, shots: list[Example], *, text_only_shots: bool = False) -> list:
    """Interleaved items: each shot with its answer, then the query without (paper, appendix B).

    text_only_shots: drop the shots' media (the paper's "0-shot" prompts of two text-only examples).
    Each shot's text is followed by ``task.shot_separator`` (OpenFlamingo: a newline in caption and VQA
    prompts; the paper: nothing).
    """
    items: list = []
    for shot in shots:
        part = task.format_example(shot, with_answer=True)
        if task.shot_separator:
            part = part[:-1] + [part[-1] + task.shot_separator] if isinstance(part[-1], str) else part + [task.shot_separator]
        items += [x for x in part if isinstance(x, str)] if text_only_shots else part
    return items + task.format_example(query, with_answer=False)
