"""The datasets of a run (the paper's mixture, section 2.4) and the order they are used in.

- ``accumulate`` (the paper's choice): every optimizer step takes one batch of every dataset; their
  weighted losses' gradients are summed before the update.
- ``round_robin``: step ``t`` takes one batch of dataset ``t mod D`` only (the paper's ablation).

Datasets are endless streams (epoch after epoch), so they need not have equal numbers of batches.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from .images import ImageFilter
from .instruct import InstructFormat
from .interleaved import MMC4Format, ObelicsFormat
from .pairs import PairsFormat
from .samples import SKIP_REASONS, Sample
from .sources import JsonlSource, ParquetSource, TarSource, expand_paths
from .stream import DatasetStream, LaneState, StreamSpec, default_lanes
from .text import TokenLayout
from .video import VideoFormat

FORMATS = ("pairs", "mmc4", "obelics", "video", "instruct")
OBELICS_OPT_OUT_DIRS = ("opt_out_docs_removed*",)
DEFAULT_MAX_TOKENS = {"pairs": 32, "video": 32, "mmc4": 256, "obelics": 256, "instruct": 512}  # the paper's M3W window: 256


def dataset_shards(cfg: Any, data_root: str | None = None) -> list[str]:
    if cfg.format == "obelics":
        extensions = ParquetSource.extensions
    elif cfg.format == "mmc4":
        extensions = TarSource.extensions + JsonlSource.extensions
    elif cfg.format == "instruct":
        extensions = JsonlSource.extensions
    else:
        extensions = TarSource.extensions
    # an OBELICS snapshot's root holds data/ and the opt-out versions beside it: one copy of the set is read
    exclude = OBELICS_OPT_OUT_DIRS if cfg.format == "obelics" else ()
    shards = expand_paths(cfg.paths, extensions, data_root, exclude_dirs=exclude)
    if not shards:
        raise ValueError(f"dataset {cfg.name!r}: no files match paths {list(cfg.paths)}")
    return shards


def make_format(cfg: Any, layout: TokenLayout, transform, shards: Sequence[str], data_root: str | None = None, processor=None):
    """The record decoder for a dataset config (``format``: pairs | mmc4 | obelics | video | instruct;
    ``instruct`` tokenises prompts with ``processor``, as inference does)."""
    max_tokens = cfg.max_tokens or DEFAULT_MAX_TOKENS[cfg.format]
    if cfg.format == "pairs":
        return PairsFormat(layout, transform, max_tokens=max_tokens)
    if cfg.format == "video":
        return VideoFormat(layout, transform, max_tokens=max_tokens, num_frames=cfg.num_frames, fps=cfg.video_fps)
    image_dir = cfg.image_dir
    if image_dir and data_root and not os.path.isabs(os.path.expanduser(image_dir)):
        image_dir = os.path.join(data_root, image_dir)
    if cfg.format == "instruct":
        if processor is None:
            raise ValueError(f"dataset {cfg.name!r}: the instruct format needs the processor")
        return InstructFormat(processor, max_tokens=max_tokens, image_dir=image_dir and os.path.expanduser(image_dir))
    common = dict(
        max_tokens=max_tokens, max_images=cfg.max_images, p_next=cfg.p_next, image_dir=image_dir and os.path.expanduser(image_dir),
        image_filter=ImageFilter(cfg.min_image_size, cfg.max_aspect_ratio),
    )
    if cfg.format == "mmc4":
        jsonl = [s.endswith(JsonlSource.extensions) for s in shards]
        if any(jsonl) and not all(jsonl):
            raise ValueError(f"dataset {cfg.name!r}: mixes tar shards and jsonl files; use one dataset for each")
        return MMC4Format(layout, transform, min_similarity=cfg.min_similarity, jsonl=all(jsonl), **common)
    if cfg.format == "obelics":
        return ObelicsFormat(layout, transform, image_column=cfg.image_column, text_column=cfg.text_column, **common)
    raise ValueError(f"dataset {cfg.name!r}: unknown format {cfg.format!r}; expected one of {FORMATS}")


class Mixture:
    """This rank's streams of every dataset, and which of them each step uses."""

    def __init__(
        self,
        datasets: Sequence[Any],
        processor,
        *,
        strategy: str = "accumulate",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        data_root: str | None = None,
        state: dict | None = None,
    ) -> None:
        if strategy not in ("accumulate", "round_robin"):
            raise ValueError(f"mixture must be 'accumulate' or 'round_robin', got {strategy!r}")
        self.datasets, self.strategy = list(datasets), strategy
        layout = TokenLayout.from_processor(processor)
        self.pad_token_id, self.media_token_id = layout.pad_token_id, layout.media_token_id
        state = state or {}
        self.streams: list[DatasetStream] = []
        for cfg in self.datasets:
            shards = dataset_shards(cfg, data_root)
            saved = state.get(cfg.name)
            workers = cfg.num_workers if cfg.num_workers is not None else num_workers
            lanes = cfg.lanes or (saved["lanes"] if saved else default_lanes(cfg.batch_size, world_size, workers))
            if saved and saved["lanes"] != lanes:
                raise ValueError(f"dataset {cfg.name!r}: the checkpoint was written with lanes={saved['lanes']}, the config asks for {lanes}")
            states = {int(k): LaneState.from_dict(v) for k, v in (saved or {}).get("states", {}).items()}
            spec = StreamSpec(cfg.name, tuple(shards), lanes, seed=seed, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer)
            fmt = make_format(cfg, layout, processor.image_transform, shards, data_root, processor=processor)
            self.streams.append(
                DatasetStream(spec, fmt, batch_size=cfg.batch_size, rank=rank, world_size=world_size, num_workers=workers,
                              prefetch_factor=prefetch_factor, states=states)
            )

    def active(self, step: int) -> list[int]:
        """Indices of the datasets that step ``step`` trains on."""
        if self.strategy == "round_robin":
            return [step % len(self.datasets)]
        return list(range(len(self.datasets)))

    def next_samples(self, step: int) -> list[tuple[int, list[Sample]]]:
        return [(d, self.streams[d].next_samples()) for d in self.active(step)]

    def counts(self) -> list[dict[str, int]]:
        """Per dataset, this rank's skip/drop events so far by reason (and ``skipped_records``)."""
        return [s.counts() for s in self.streams]

    def state_dict(self) -> dict:
        return {cfg.name: s.state_dict() for cfg, s in zip(self.datasets, self.streams)}

    def close(self) -> None:
        for s in self.streams:
            s.close()


COUNT_KEYS = ("skipped_records",) + SKIP_REASONS
