"""HatefulMemes (jsonl: {"id", "img", "label", "text"}): close-ended yes/no, ROC-AUC."""

from __future__ import annotations

import math
from pathlib import Path

from ..metrics import roc_auc
from ..task import Example, Task, register_task
from .files import memo, read_jsonl, require_dir, require_file


def read_hateful_memes(jsonl: str | Path, image_dir: str | Path) -> list[Example]:
    out = []
    for i, row in enumerate(read_jsonl(jsonl)):
        if "label" not in row:
            raise ValueError(f"{jsonl}: row {i} has no label (the unlabelled test split cannot be scored)")
        fields = {"text": row["text"], "label": int(row["label"])}
        out.append(Example(id=row.get("id", i), media=[Path(image_dir) / row["img"]], fields=fields))
    return out


def positive_probability(prediction, positive: str = "yes") -> float:
    """P(positive) among the candidates: a softmax of their scores (1/0 for a prediction without scores)."""
    scores = getattr(prediction, "scores", None)
    if not scores:
        return float(str(prediction) == positive)
    top = max(scores.values())
    if not math.isfinite(top):  # every candidate -inf (or a NaN score): no preference, not a NaN probability
        return 0.5
    weights = {c: math.exp(s - top) for c, s in scores.items()}
    return weights.get(positive, 0.0) / sum(weights.values())


@register_task("hateful_memes")
class HatefulMemes(Task):
    """``<image>is an image with written: "{text}" on it. Is it hateful? Answer: yes|no`` (paper, appendix B).

    Ranks "yes" against "no"; ROC-AUC of P(yes) (main) and accuracy.
    """

    name = "hateful_memes"
    kind = "rank"
    metric = "roc_auc"
    prompt = 'is an image with written: "{text}" on it. Is it hateful? Answer:'
    labels = ("no", "yes")
    # OpenFlamingo's get_hateful_memes_prompt (its text is the meme's "text" field, which it calls "ocr")
    protocol_settings = {"openflamingo": {"prompt": "is an image with: '{text}' written on it. Is it hateful? Answer:"}}

    def __init__(
        self,
        name: str | None = None,
        jsonl: str | Path | None = None,
        image_dir: str | Path | None = None,
        support_jsonl: str | Path | None = None,
        **options,
    ) -> None:
        super().__init__(name, **options)
        self.jsonl = require_file(jsonl, "jsonl")
        self.image_dir = require_dir(image_dir, "image_dir")
        self.support_jsonl = require_file(support_jsonl, "support_jsonl") if support_jsonl else None

    def queries(self) -> list[Example]:
        return memo(self, "queries", lambda: read_hateful_memes(self.jsonl, self.image_dir))

    def support(self) -> list[Example]:
        if self.support_jsonl is None:
            raise ValueError(f"task {self.name!r} has no support_jsonl to draw shots from")
        return memo(self, "support", lambda: read_hateful_memes(self.support_jsonl, self.image_dir))

    def answer(self, ex: Example) -> str:
        return self.labels[ex.fields["label"]]

    def candidates(self, ex: Example) -> list[str]:
        return list(self.labels)

    def score(self, predictions: list, examples: list[Example]) -> dict[str, float]:
        labels = [ex.fields["label"] for ex in examples]
        out = {"accuracy": 100.0 * sum(str(p) == self.answer(ex) for p, ex in zip(predictions, examples)) / max(len(examples), 1)}
        if 0 < sum(labels) < len(labels):
            out["roc_auc"] = 100.0 * roc_auc(labels, [positive_probability(p, self.labels[1]) for p in predictions])
        else:  # one class only (e.g. a --limit run): the AUC is undefined
            out["roc_auc"] = float("nan")
        return out
