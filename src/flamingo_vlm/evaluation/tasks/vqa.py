"""Visual question answering: VQAv2, OK-VQA, VizWiz, TextVQA. Official VQA accuracy.

Readers take the VQA format (a questions json {"questions": [...]} plus an annotations json
{"annotations": [{"question_id", "answers": [10 x {"answer"}], "multiple_choice_answer"}]}), which
VQAv2 and OK-VQA use and into which OpenFlamingo converts VizWiz and TextVQA; they also read VizWiz's
own json (a list of {"image", "question", "answers"}) and TextVQA's ({"data": [{"question_id",
"image_id", "question", "answers": [10 strings]}]}) when no annotations json is given.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ..metrics import textvqa_accuracy, vqa_accuracy, vqa_accuracy_by_type
from ..stemming import okvqa_stem
from ..task import Example, Task, register_task
from .files import memo, read_json, records, require_dir, require_file


def _answer_texts(answers: list) -> list[str]:
    return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]


def _answer_records(answers: list) -> list:
    """The annotation records as the official evaluator compares them: dicts whole (VQAv2's carry an
    answer_id, VizWiz's do not), plain strings as distinct annotations."""
    return [dict(a) if isinstance(a, dict) else str(a) for a in answers]


def _shot_answer(answers: list[str], given: str | None = None) -> str:
    """The answer a shot shows: the annotators' most common answer (VQA's multiple_choice_answer)."""
    if given:
        return given
    return Counter(answers).most_common(1)[0][0] if answers else ""


def read_vqa(
    questions_json: str | Path,
    annotations_json: str | Path | None,
    image_dir: str | Path,
    image_name_format: str = "COCO_{data_subtype}_{image_id:012d}.jpg",
) -> list[Example]:
    """VQA-format questions + annotations (or VizWiz / TextVQA native json) -> Examples.

    A test(-dev) split (questions without answers: no annotations_json, or native rows without
    "answers") gives examples with ``answers=None``: they can be predicted and written as an EvalAI
    result file (:func:`evalai_results`), not scored. ``answer_records`` keeps the annotation dicts for
    the official leave-one-out (VizWiz's have no answer_id).
    image_name_format is formatted with the question's fields and the file's ``data_subtype``
    (e.g. "val2014"): the default gives COCO's "COCO_val2014_000000000042.jpg".
    """
    image_dir = Path(image_dir)
    data = read_json(questions_json)
    out = []
    if annotations_json is not None:
        subtype = data.get("data_subtype", "val2014") if isinstance(data, dict) else "val2014"
        annotations = {a["question_id"]: a for a in records(read_json(annotations_json), "annotations")}
        for q in records(data, "questions"):
            ann = annotations.get(q["question_id"])
            if ann is None:
                raise ValueError(f"{annotations_json}: no annotation for question_id {q['question_id']}")
            answers = _answer_texts(ann["answers"])
            file = image_dir / image_name_format.format(**{"data_subtype": subtype, **q})
            fields = {
                "question": q["question"], "answers": answers, "answer_records": _answer_records(ann["answers"]),
                "image_id": q["image_id"], "answer": _shot_answer(answers, ann.get("multiple_choice_answer")),
                "answer_type": ann.get("answer_type"),
            }
            out.append(Example(id=q["question_id"], media=[file], fields=fields))
        return out
    subtype = data.get("data_subtype", "test2015") if isinstance(data, dict) else "test2015"
    for row in records(data, "data", "questions"):  # VizWiz / TextVQA native, or VQA-format questions alone
        raw = row.get("answers")
        answers = _answer_texts(raw) if raw is not None else None
        if "image" in row:  # VizWiz
            file, ex_id = image_dir / row["image"], row.get("question_id", row["image"])
        else:  # TextVQA, VQAv2 test(-dev) questions
            file, ex_id = image_dir / image_name_format.format(**{"data_subtype": subtype, **row}), row["question_id"]
        fields = {
            "question": row["question"], "answers": answers, "answer_records": _answer_records(raw) if raw is not None else None,
            "answer": _shot_answer(answers) if answers else "", "answer_type": row.get("answer_type"),
        }
        if "image" in row:
            fields["image"] = row["image"]
        if "image_id" in row:
            fields["image_id"] = row["image_id"]
        out.append(Example(id=ex_id, media=[file], fields=fields))
    return out


def postprocess_vqa(text: str, cut_at_newline: bool = True) -> str:
    """OpenFlamingo's VQA post-processing: the answer ends where a new "Question"/"Answer" starts, or at ", "
    (and, unless ``cut_at_newline`` is False as in OpenFlamingo, at the first newline)."""
    answer = re.split("Question|Answer|Short", text, maxsplit=1)[0]
    answer = re.split(", ", answer, maxsplit=1)[0].strip()
    return answer.split("\n")[0].strip() if cut_at_newline else answer


@register_task("vqa")
@register_task("vqav2")
class VQATask(Task):
    """Open-ended VQA: ``<image>Question: {question} Answer: {answer}<|endofchunk|>``; VQA accuracy.

    Queries from ``questions_json`` + ``annotations_json``, shots from the ``support_*`` pair (the train
    split). normalize_always: normalise answers even when all annotators agree (the official code does
    not; OpenFlamingo does). shot_answer: the answer a shot shows, "multiple_choice" (VQA's
    ``multiple_choice_answer``, the annotators' most common answer) or "first" (``answers[0]``, OpenFlamingo).
    """

    name = "vqav2"
    kind = "generate"
    metric = "vqa_accuracy"
    prompt = "Question: {question} Answer:"
    max_new_tokens = 5
    image_name_format = "COCO_{data_subtype}_{image_id:012d}.jpg"
    normalize_always = False
    shot_answer = "multiple_choice"
    # OpenFlamingo's get_vqa_prompt: "<image>Question:{question} Short answer:{answer}<|endofchunk|>" + "\n"
    protocol_settings = {
        "openflamingo": {
            "prompt": "Question:{question} Short answer:", "shot_separator": "\n", "shot_answer": "first", "normalize_always": True,
        },
    }

    def __init__(
        self,
        name: str | None = None,
        questions_json: str | Path | None = None,
        annotations_json: str | Path | None = None,
        image_dir: str | Path | None = None,
        support_questions_json: str | Path | None = None,
        support_annotations_json: str | Path | None = None,
        image_name_format: str | None = None,
        *,
        support_image_dir: str | Path | None = None,
        support_image_name_format: str | None = None,
        normalize_always: bool | None = None,
        shot_answer: str | None = None,
        **options,
    ) -> None:
        super().__init__(name, **options)
        if shot_answer not in (None, "multiple_choice", "first"):
            raise ValueError(f"shot_answer must be 'multiple_choice' or 'first', got {shot_answer!r}")
        self.questions_json = require_file(questions_json, "questions_json")
        self.annotations_json = require_file(annotations_json, "annotations_json") if annotations_json else None
        self.image_dir = require_dir(image_dir, "image_dir")
        self.support_questions_json = require_file(support_questions_json, "support_questions_json") if support_questions_json else None
        self.support_annotations_json = require_file(support_annotations_json, "support_annotations_json") if support_annotations_json else None
        self.support_image_dir = require_dir(support_image_dir, "support_image_dir") if support_image_dir else self.image_dir
        if image_name_format is not None:
            self.image_name_format = image_name_format
        self.support_image_name_format = support_image_name_format or self.image_name_format
        for key, value in (("normalize_always", normalize_always), ("shot_answer", shot_answer)):
            if value is not None:
                setattr(self, key, value)
                self.explicit_settings.add(key)

    def queries(self) -> list[Example]:
        return memo(self, "queries", lambda: read_vqa(self.questions_json, self.annotations_json, self.image_dir, self.image_name_format))

    def support(self) -> list[Example]:
        if self.support_questions_json is None:
            raise ValueError(f"task {self.name!r} has no support_questions_json to draw shots from")
        return memo(self, "support", lambda: read_vqa(
            self.support_questions_json, self.support_annotations_json, self.support_image_dir, self.support_image_name_format
        ))

    def answer(self, ex: Example) -> str:
        if self.shot_answer == "first" and ex.fields.get("answers"):
            return str(ex.fields["answers"][0])
        return str(ex.fields["answer"])

    def reference(self, ex: Example):
        return ex.fields["answers"]

    def postprocess(self, text: str) -> str:
        return postprocess_vqa(super().postprocess(text), self.cut_at_newline)

    def accuracy(self, prediction: str, ex: Example) -> float:
        """One prediction's accuracy in [0, 1]: the official VQA accuracy over the annotation records."""
        answers = ex.fields.get("answer_records") or ex.fields["answers"]
        return vqa_accuracy(prediction, answers, normalize_always=self.normalize_always)

    def score(self, predictions: list, examples: list[Example]) -> dict[str, float]:
        """vqa_accuracy (x100) and, where the annotations give answer types, ``vqa_accuracy/<type>``.

        A test(-dev) split (no answers) scores NaN: its :meth:`submission` is the file to submit instead.
        """
        if any(ex.fields.get("answers") is None for ex in examples):
            return {"vqa_accuracy": float("nan")}
        accs = [self.accuracy(p, ex) for p, ex in zip(predictions, examples)]
        out = {"vqa_accuracy": 100.0 * sum(accs) / max(len(accs), 1)}
        by_type = vqa_accuracy_by_type(accs, [ex.fields.get("answer_type") for ex in examples])
        out.update({f"vqa_accuracy/{t}": 100.0 * v for t, v in by_type.items()})
        return out


    def submission(self, predictions: list, examples: list[Example]) -> list | None:
        """A test(-dev) split's EvalAI result file (:func:`evalai_results`); None when the split has answers."""
        if examples and all(ex.fields.get("answers") is None for ex in examples):
            return evalai_results(predictions, examples)
        return None


def evalai_results(predictions: list, examples: list[Example]) -> list[dict]:
    """The EvalAI submission of a VQA test(-dev) split: ``[{"question_id", "answer"}]`` (VQAv2, TextVQA),
    or ``[{"image", "answer"}]`` for VizWiz (whose test questions are named by their image file)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    out = []
    for p, ex in zip(predictions, examples):
        key = {"image": ex.fields["image"]} if "image" in ex.fields else {"question_id": ex.id}
        out.append({**key, "answer": str(p)})
    return out


def write_evalai_results(path: str | Path, predictions: list, examples: list[Example]) -> Path:
    """Write :func:`evalai_results` as json (the file EvalAI's VQAv2 / VizWiz / TextVQA challenges take)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(evalai_results(predictions, examples)), encoding="utf-8")
    return path


@register_task("ok_vqa")
class OKVQA(VQATask):
    """OK-VQA (VQA format, COCO val2014/train2014 images). The prediction is stemmed as OK-VQA v1.1 stemmed
    its ``answers`` (:func:`flamingo_vlm.evaluation.stemming.okvqa_stem`) before the VQA accuracy."""

    name = "ok_vqa"
    stem = True

    def __init__(self, *args, stem: bool | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if stem is not None:
            self.stem = stem

    def accuracy(self, prediction: str, ex: Example) -> float:
        return super().accuracy(okvqa_stem(prediction) if self.stem else prediction, ex)


@register_task("vizwiz")
class VizWiz(VQATask):
    """VizWiz: VQA format with file names as image ids (OpenFlamingo's conversion), or VizWiz's own json.

    Scored with the official leave-one-out over VizWiz's answer records (no answer_id: all records equal to
    the held-out one leave together); answer types include "unanswerable".
    """

    name = "vizwiz"
    image_name_format = "{image_id}"


@register_task("textvqa")
class TextVQA(VQATask):
    """TextVQA: VQA format or TextVQA's own json; images ``{image_id}.jpg``.

    Scored with TextVQA's own evaluator (:func:`~flamingo_vlm.evaluation.metrics.textvqa_accuracy`:
    answers always normalised, commas dropped), not vqaEval.py.
    """

    name = "textvqa"
    image_name_format = "{image_id}.jpg"
    protocol_settings = {"openflamingo": {"max_new_tokens": 10}}  # evaluate.py passes max_generation_length=10

    def accuracy(self, prediction: str, ex: Example) -> float:
        return textvqa_accuracy(prediction, ex.fields["answers"])
