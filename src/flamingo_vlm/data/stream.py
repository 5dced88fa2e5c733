"""Deterministic, resumable streaming of one dataset across ranks and DataLoader workers.

A dataset's shards are split into ``lanes``: independent, endless readers (epoch after epoch), each
over its own shards (or, when there are fewer shards than lanes, its own stride of records in a shared
shard). The global batch of a step takes ``batch_size / lanes`` samples from every lane. Rank ``r`` of
``W`` reads lanes ``r, r + W, ...`` and each of its DataLoader workers a subset of those, so

- every rank (and worker) reads only its own shards;
- the global batch does not depend on the number of ranks or workers (only on ``lanes``): a run on
  2 processes sees the same samples as a run on 1;
- the position of a lane is three integers (epoch, shard, record), so a run resumes exactly, and
  re-reads at most one shuffle block of one shard per lane to get there.

Shuffling: the shard order of each lane is permuted per epoch, and records are permuted within blocks
of ``shuffle_block`` consecutive records of a shard. All randomness is keyed by (seed, dataset, lane,
epoch, shard, record), never by process state, so it is identical in any process and after a resume.
"""

from __future__ import annotations

import itertools
import logging
import os
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .samples import Sample, SkipSample
from .sources import ShardError

logger = logging.getLogger(__name__)

# A lane that cannot use this many records in a row is misconfigured (wrong format, wrong paths).
MAX_CONSECUTIVE_SKIPS = 2000


class RecordFormat(Protocol):
    source: Any  # has .records(url, skip) -> Iterator[dict]

    def decode(self, record: dict, rng: np.random.Generator) -> Sample: ...


@dataclass
class LaneState:
    """Where a lane is: shard ``shard`` of epoch ``epoch``'s order, ``record`` records into it.
    ``counts``: skip/drop events so far by reason, plus ``skipped_records``."""

    epoch: int = 0
    shard: int = 0
    record: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def copy(self) -> "LaneState":
        return LaneState(self.epoch, self.shard, self.record, dict(self.counts))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LaneState":
        return cls(int(d["epoch"]), int(d["shard"]), int(d["record"]), {k: int(v) for k, v in d.get("counts", {}).items()})


@dataclass(frozen=True)
class StreamSpec:
    """What every lane of a dataset shares (picklable, so DataLoader workers can be spawned)."""

    name: str
    shards: tuple[str, ...]
    lanes: int
    seed: int = 0
    shuffle: bool = True
    shuffle_block: int = 256

    @property
    def name_key(self) -> int:
        return zlib.crc32(self.name.encode())  # a stable number for the name (hash() is salted per process)

    def lane_shards(self, lane: int) -> list[tuple[str, int, int]]:
        """(shard, stride, offset) read by ``lane``: whole shards, or one record in ``stride`` of a shared one."""
        s = len(self.shards)
        if s >= self.lanes:
            return [(url, 1, 0) for url in self.shards[lane :: self.lanes]]
        sharing = len(range(lane % s, self.lanes, s))  # lanes reading this shard
        return [(self.shards[lane % s], sharing, lane // s)]


def default_lanes(batch_size: int, world_size: int, num_workers: int) -> int:
    """world_size x the most workers (<= num_workers) that split a rank's batch evenly."""
    per_rank = batch_size // world_size
    workers = max(1, num_workers)
    return world_size * max(d for d in range(1, workers + 1) if per_rank % d == 0)


def check_lanes(name: str, lanes: int, batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise ValueError(f"dataset {name!r}: batch_size={batch_size} (global) is not divisible by the {world_size} processes")
    if lanes < 1 or lanes % world_size or batch_size % lanes:
        raise ValueError(
            f"dataset {name!r}: lanes={lanes} must be a multiple of the number of processes ({world_size}) "
            f"and divide batch_size={batch_size}"
        )


class Lane:
    """One endless, resumable reader; :meth:`take` decodes the next ``n`` usable samples."""

    def __init__(self, spec: StreamSpec, index: int, fmt: RecordFormat, state: LaneState | None = None) -> None:
        self.spec, self.index, self.fmt = spec, index, fmt
        self.state = state.copy() if state is not None else LaneState()
        self.plan = spec.lane_shards(index)
        self._records = self._iterate()
        self._warned = 0

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, self.spec.name_key, self.index, *key])

    def _count(self, reason: str, n: int = 1) -> None:
        self.state.counts[reason] = self.state.counts.get(reason, 0) + n

    def _shard_order(self, epoch: int) -> list[tuple[str, int, int]]:
        if not self.spec.shuffle or len(self.plan) < 2:
            return self.plan
        return [self.plan[i] for i in self._rng(epoch).permutation(len(self.plan))]

    def _shard(self, url: str, stride: int, offset: int, position: int) -> Iterator[tuple[int, dict]]:
        """(record index, record) of one shard from ``position`` on, in block-shuffled order."""
        block = self.spec.shuffle_block if self.spec.shuffle else 1024
        start = position - position % block
        raw = self.fmt.source.records(url, skip=offset + start * stride)
        mine = itertools.islice(raw, 0, None, stride)
        while True:
            chunk = list(itertools.islice(mine, block))
            if not chunk:
                return
            order = self._rng(self.state.epoch, self.state.shard, start).permutation(len(chunk)) if self.spec.shuffle else range(len(chunk))
            for i in range(position - start, len(chunk)):
                yield start + i, chunk[order[i]]
            if len(chunk) < block:
                return
            start += len(chunk)
            position = start

    def _iterate(self) -> Iterator[dict]:
        while True:
            full_epoch = self.state.shard == 0 and self.state.record == 0
            produced = False
            order = self._shard_order(self.state.epoch)
            while self.state.shard < len(order):
                url, stride, offset = order[self.state.shard]
                try:
                    for index, record in self._shard(url, stride, offset, self.state.record):
                        self.state.record = index + 1
                        produced = True
                        yield record
                except ShardError as e:
                    self._count("bad_shard")
                    logger.warning("dataset %s: skipping the rest of a shard: %s", self.spec.name, e)
                self.state.shard += 1
                self.state.record = 0
            self.state.epoch += 1
            self.state.shard = 0
            if full_epoch and not produced:
                raise RuntimeError(f"dataset {self.spec.name!r}: lane {self.index} read no record in a whole epoch of {[u for u, _, _ in self.plan]}")

    def take(self, n: int) -> list[Sample]:
        samples: list[Sample] = []
        skipped_in_a_row = 0
        while len(samples) < n:
            record = next(self._records)
            position = (self.state.epoch, self.state.shard, self.state.record)
            try:
                sample = self.fmt.decode(record, self._rng(*position))
            except SkipSample as e:
                self._count(e.reason)
                for reason, k in e.dropped.items():
                    self._count(reason, k)
                self._count("skipped_records")
                skipped_in_a_row += 1
            except Exception as e:  # noqa: BLE001 - a record must never stop a long run; it is counted and reported
                self._count("bad_record")
                self._count("skipped_records")
                skipped_in_a_row += 1
                if self._warned < 5:
                    self._warned += 1
                    logger.warning("dataset %s: record %s#%s failed: %r", self.spec.name, record.get("__url__"), record.get("__key__"), e)
            else:
                for reason, k in sample.dropped.items():
                    self._count(reason, k)
                samples.append(sample)
                skipped_in_a_row = 0
            if skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                raise RuntimeError(
                    f"dataset {self.spec.name!r}: {skipped_in_a_row} records in a row could not be used "
                    f"(counts so far: {self.state.counts}); is `format` right for these files?"
                )
        return samples


def _identity(x):
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode images; the main process owns the cores for compute


class StepStream(IterableDataset):
    """Yields, forever, one item per step: ``{"samples": [(slot, Sample)], "states": {lane: LaneState}}``
    for the lanes this process (or DataLoader worker) owns; ``slot`` orders the global batch."""

    def __init__(self, spec: StreamSpec, fmt: RecordFormat, lanes: list[int], states: dict[int, LaneState], per_lane: int) -> None:
        self.spec, self.fmt, self.lanes, self.states, self.per_lane = spec, fmt, lanes, states, per_lane

    def __iter__(self):
        info = get_worker_info()
        mine = self.lanes if info is None else self.lanes[info.id :: info.num_workers]
        lanes = [Lane(self.spec, i, self.fmt, self.states.get(i)) for i in mine]
        while True:
            samples = []
            for lane in lanes:
                # slot i * lanes + l: the global batch interleaves lanes, whatever process reads them
                samples.extend((i * self.spec.lanes + lane.index, s) for i, s in enumerate(lane.take(self.per_lane)))
            yield {"samples": samples, "states": {lane.index: lane.state.copy() for lane in lanes}}


class DatasetStream:
    """This rank's share of one dataset's global batches, step after step.

    :meth:`next_samples` returns the rank's ``batch_size / world_size`` samples of the next step, in
    global-batch order; :meth:`state_dict` the position of this rank's lanes after the last step taken.
    """

    def __init__(
        self,
        spec: StreamSpec,
        fmt: RecordFormat,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        states: dict[int, LaneState] | None = None,
    ) -> None:
        check_lanes(spec.name, spec.lanes, batch_size, world_size)
        self.spec, self.fmt, self.batch_size = spec, fmt, batch_size
        self.lanes = [lane for lane in range(spec.lanes) if lane % world_size == rank]
        self.states = {lane: (states or {}).get(lane, LaneState()).copy() for lane in self.lanes}
        self.num_workers = min(num_workers, len(self.lanes))
        self.prefetch_factor = prefetch_factor
        self._items: Iterator[dict] | None = None
        self._loader: DataLoader | None = None

    def _start(self) -> None:
        stream = StepStream(self.spec, self.fmt, self.lanes, self.states, self.batch_size // self.spec.lanes)
        if self.num_workers == 0:
            self._items = iter(stream)
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenise on their own
        self._loader = DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity, worker_init_fn=_worker_init,
            prefetch_factor=self.prefetch_factor, persistent_workers=True,
        )
        self._items = iter(self._loader)

    def next_samples(self) -> list[Sample]:
        if self._items is None:
            self._start()
        slotted: list[tuple[int, Sample]] = []
        for _ in range(max(1, self.num_workers)):  # one item per worker per step, in worker order
            item = next(self._items)
            slotted.extend(item["samples"])
            for lane, state in item["states"].items():
                self.states[lane] = state
        slotted.sort(key=lambda x: x[0])
        return [s for _, s in slotted]

    def counts(self) -> dict[str, int]:
        """Skip/drop events of this rank's lanes so far, by reason."""
        total: dict[str, int] = {}
        for state in self.states.values():
            for reason, n in state.counts.items():
                total[reason] = total.get(reason, 0) + n
        return total

    def state_dict(self) -> dict:
        return {"lanes": self.spec.lanes, "states": {str(lane): s.to_dict() for lane, s in self.states.items()}}

    def close(self) -> None:
        self._items = None
        if self._loader is not None:
            it = getattr(self._loader, "_iterator", None)  # shut persistent workers down now, not at exit
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            self._loader = None
