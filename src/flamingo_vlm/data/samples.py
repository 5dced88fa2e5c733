"""One training sample, and the ways reading a record can fail without stopping a run."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Why a record (or one image of it) was not used. Errors (corrupt, missing, malformed) are counted so a
# long run reports them instead of crashing; "filtered_image" is the expected effect of the filters.
SKIP_REASONS = (
    "corrupt_image",  # image bytes that do not decode
    "missing_file",  # an image file named by a document that is not there
    "bad_video",  # a video that does not decode or has no frames
    "bad_record",  # malformed document / no caption / no image member / unparsable json
    "bad_shard",  # a shard (tar, jsonl, parquet) that cannot be read (truncated, missing)
    "no_images",  # a document with no usable image left after filtering
    "filtered_image",  # an image dropped by the similarity, size or aspect-ratio filter (not an error)
)


class SkipSample(Exception):
    """Raised by a decoder: the record cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.dropped: dict[str, int] = {}  # images dropped before the record itself was given up


@dataclass
class Sample:
    """A tokenised sample and its media.

    input_ids: [L] token ids (``<image>`` once per medium, in order).
    media: one float tensor [T, C, H, W] per ``<image>`` token (an image is T=1).
    key: where it came from (``shard#key``), reported when a batch goes wrong.
    dropped: counts of images dropped from this sample, by reason (they did not stop the sample).
    target_start: supervised data (answer-only loss): the index of the first token that is a target
    (the answer's); the tokens before it are the prompt. None: the pretraining rule alone.
    """

    input_ids: torch.Tensor
    media: list[torch.Tensor]
    key: str = ""
    dropped: dict[str, int] = field(default_factory=dict)
    target_start: int | None = None
