"""Captioning: COCO and Flickr30K (Karpathy split json), video captioning (VATEX json). CIDEr and BLEU-4."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..metrics import bleu4, cider
from ..task import Example, Task, register_task
from .files import VideoFinder, memo, read_json, records, require_dir, require_file


class Captioning(Task):
    """Open-ended captioning: ``<image>Output: {caption}<|endofchunk|>``; CIDEr (main) and BLEU-4.

    tokenizer: how captions are PTB-tokenised before scoring ("auto": Java if present, else Python).
    """

    kind = "generate"
    metric = "cider"
    prompt = "Output:"
    max_new_tokens = 20
    tokenizer = "auto"
    # drop double quotes from a generated caption (OpenFlamingo's evaluate_captioning does)
    strip_quotes = False
    # OpenFlamingo's get_caption_prompt: "<image>Output:{caption}<|endofchunk|>" + "\n"
    protocol_settings = {"openflamingo": {"shot_separator": "\n", "strip_quotes": True}}

    def answer(self, ex: Example) -> str:
        return ex.fields["captions"][0].strip()  # a shot shows its first reference caption

    def reference(self, ex: Example):
        return ex.fields["captions"]

    def postprocess(self, text: str) -> str:
        # as OpenFlamingo: a caption ends where the model starts the next example
        caption = super().postprocess(text.split("Output", 1)[0])
        return caption.replace('"', "") if self.strip_quotes else caption

    def score(self, predictions: list, examples: list[Example]) -> dict[str, float]:
        refs = [ex.fields["captions"] for ex in examples]
        return {
            "cider": 100.0 * cider(predictions, refs, tokenizer=self.tokenizer),
            "bleu4": 100.0 * bleu4(predictions, refs, tokenizer=self.tokenizer),
        }


def read_karpathy(path: str | Path, image_dir: str | Path, splits: Sequence[str]) -> list[Example]:
    """Karpathy split json ({"images": [{filepath?, filename, split, sentences: [{raw}], cocoid?/imgid}]})."""
    image_dir = Path(image_dir)
    out = []
    for im in read_json(path)["images"]:
        if im["split"] not in splits:
            continue
        file = image_dir / im.get("filepath", "") / im["filename"]
        captions = [s["raw"].strip() for s in im["sentences"]]
        ex_id = im.get("cocoid", im.get("imgid", im["filename"]))
        out.append(Example(id=ex_id, media=[file], fields={"captions": captions, "filename": im["filename"]}))
    return out


@register_task("captioning")
@register_task("coco_captioning")
class CocoCaptioning(Captioning):
    """COCO (or any Karpathy-split json): queries from ``split``, shots from ``support_split``.

    Images are at ``image_dir / filepath / filename`` (COCO's json names the subfolder, e.g. val2014).
    """

    name = "coco"

    def __init__(
        self,
        name: str | None = None,
        karpathy_json: str | Path | None = None,
        image_dir: str | Path | None = None,
        split: str | Sequence[str] = "test",
        support_split: str | Sequence[str] = "train",
        **options,
    ) -> None:
        super().__init__(name, **options)
        self.karpathy_json = require_file(karpathy_json, "karpathy_json")
        self.image_dir = require_dir(image_dir, "image_dir")
        self.split = [split] if isinstance(split, str) else list(split)
        self.support_split = [support_split] if isinstance(support_split, str) else list(support_split)

    def queries(self) -> list[Example]:
        return memo(self, "queries", lambda: read_karpathy(self.karpathy_json, self.image_dir, self.split))

    def support(self) -> list[Example]:
        return memo(self, "support", lambda: read_karpathy(self.karpathy_json, self.image_dir, self.support_split))


@register_task("flickr30k_captioning")
class Flickr30KCaptioning(CocoCaptioning):
    """Flickr30K, Karpathy split (dataset_flickr30k.json; images directly in ``image_dir``)."""

    name = "flickr30k"


def read_video_captions(path: str | Path, finder: VideoFinder) -> list[Example]:
    """VATEX json ([{"videoID", "enCap": [...]}]) or rows with "video"/"video_id" and "captions"/"caption"."""
    out = []
    for i, row in enumerate(records(read_json(path), "annotations", "data", "videos")):
        captions = row.get("enCap") or row.get("captions") or row.get("caption")
        if captions is None:
            raise ValueError(f"{path}: row {i} has no enCap / captions / caption")
        captions = [captions] if isinstance(captions, str) else [c.strip() for c in captions]
        ex_id = row.get("videoID", row.get("video_id", row.get("video", row.get("id", i))))
        out.append(Example(id=ex_id, media=[finder(row)], fields={"captions": captions}))
    return out


@register_task("video_captioning")
@register_task("vatex")
class VideoCaptioning(Captioning):
    """Video captioning, VATEX style: a json list of {"videoID", "enCap": [10 captions]} and a video folder."""

    name = "vatex"

    def __init__(
        self,
        name: str | None = None,
        annotations_json: str | Path | None = None,
        video_dir: str | Path | None = None,
        support_annotations_json: str | Path | None = None,
        *,
        video_name_format: str | None = None,
        support_video_dir: str | Path | None = None,
        **options,
    ) -> None:
        super().__init__(name, **options)
        self.annotations_json = require_file(annotations_json, "annotations_json")
        self.finder = VideoFinder(video_dir, video_name_format)
        self.support_annotations_json = require_file(support_annotations_json, "support_annotations_json") if support_annotations_json else None
        self.support_finder = VideoFinder(support_video_dir, video_name_format) if support_video_dir else self.finder

    def queries(self) -> list[Example]:
        return memo(self, "queries", lambda: read_video_captions(self.annotations_json, self.finder))

    def support(self) -> list[Example]:
        if self.support_annotations_json is None:
            raise ValueError(f"task {self.name!r} has no support_annotations_json to draw shots from")
        return memo(self, "support", lambda: read_video_captions(self.support_annotations_json, self.support_finder))
