"""Few-shot prompts: shots then the query as interleaved items (paper, appendix B)."""

from __future__ import annotations

from .task import Example, Task


def build_prompt(task: Task, query: Example, shots: list[Example], *, text_only_shots: bool = False) -> list:
    """Interleaved items: each shot with its answer, then the query without (paper, appendix B).

    text_only_shots: drop the shots' media (the paper's "0-shot" prompts of two text-only examples).
    """
    items: list = []
    for shot in shots:
        part = task.format_example(shot, with_answer=True)
        items += [x for x in part if isinstance(x, str)] if text_only_shots else part
    return items + task.format_example(query, with_answer=False)
