"""Video question answering, MSVD-QA / MSRVTT-QA style: open-ended, top-1 exact match."""

from __future__ import annotations

from pathlib import Path

from ..metrics import exact_match_accuracy, vqa_normalize
from ..task import Example, Task, register_task
from .files import VideoFinder, memo, read_json, records, require_file
from .vqa import postprocess_vqa


def read_video_qa(path: str | Path, finder: VideoFinder) -> list[Example]:
    """A json list of {"video" or "video_id", "question", "answer", "id"?} (MSVD-QA, MSRVTT-QA)."""
    out = []
    for i, row in enumerate(records(read_json(path), "data", "questions")):
        fields = {"question": row["question"], "answer": str(row["answer"])}
        out.append(Example(id=row.get("id", i), media=[finder(row)], fields=fields))
    return out


@register_task("video_qa")
@register_task("msvd_qa")
@register_task("msrvtt_qa")
class VideoQA(Task):
    """``<video>Question: {question} Answer: {answer}<|endofchunk|>``; top-1 accuracy (exact match after
    VQA answer normalisation). Videos: ``video_dir``, named by the row (see :class:`VideoFinder`) or by
    ``video_name_format`` (MSVD-QA: "vid{video_id}.avi", MSRVTT-QA: "video{video_id}.mp4")."""

    name = "msvd_qa"
    kind = "generate"
    metric = "top1"
    prompt = "Question: {question} Answer:"
    max_new_tokens = 5
    # OpenFlamingo has no video benchmark: its image-VQA prompt and layout carried over
    protocol_settings = {"openflamingo": {"prompt": "Question:{question} Short answer:", "shot_separator": "\n"}}

    def __init__(
        self,
        name: str | None = None,
        qa_json: str | Path | None = None,
        video_dir: str | Path | None = None,
        support_qa_json: str | Path | None = None,
        *,
        video_name_format: str | None = None,
        support_video_dir: str | Path | None = None,
        **options,
    ) -> None:
        super().__init__(name, **options)
        self.qa_json = require_file(qa_json, "qa_json")
        self.finder = VideoFinder(video_dir, video_name_format)
        self.support_qa_json = require_file(support_qa_json, "support_qa_json") if support_qa_json else None
        self.support_finder = VideoFinder(support_video_dir, video_name_format) if support_video_dir else self.finder

    def queries(self) -> list[Example]:
        return memo(self, "queries", lambda: read_video_qa(self.qa_json, self.finder))

    def support(self) -> list[Example]:
        if self.support_qa_json is None:
            raise ValueError(f"task {self.name!r} has no support_qa_json to draw shots from")
        return memo(self, "support", lambda: read_video_qa(self.support_qa_json, self.support_finder))

    def postprocess(self, text: str) -> str:
        return postprocess_vqa(super().postprocess(text), self.cut_at_newline)

    def score(self, predictions: list, examples: list[Example]) -> dict[str, float]:
        refs = [self.answer(ex) for ex in examples]
        return {"top1": 100.0 * exact_match_accuracy(predictions, refs, normalize=vqa_normalize)}
