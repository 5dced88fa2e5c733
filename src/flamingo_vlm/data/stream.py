"""Deterministic, resumable streaming of one dataset across ranks and DataLoader workers.

A dataset's shards are split into ``lanes``: independent, endless readers (epoch after epoch), each
over its own shards (or, when there are fewer shards than lanes, its own stride of records in a shared
shard). The global batch of a step is ``batch_size / lanes`` samples from every lane, lane after lane
(slot ``lane * per_lane + i``), and process ``r`` of ``W`` trains on slots ``[r B / W, (r + 1) B / W)``,
reading the lanes those slots come from (and each of its DataLoader workers a subset of them), so

- the global batch does not depend on the number of processes or workers (only on ``lanes``): a run
  on 2 processes sees the same samples as a run on 1, and a run resumes on any number of processes
  that divides the batch. When ``lanes`` is a multiple of the processes each reads only its own lanes;
  otherwise the processes whose slots split a lane both read (and decode) it and keep their part;
- the position of a lane is its read head (epoch, shard, record) and the positions of the records in
  its shuffle buffer, so a run resumes exactly: the head seeks to its record (a local tar shard is
  entered at the record's byte offset, see ``sources.tar_index``) and the buffer's records are fetched
  by position.

Shuffling: the shard order of each lane is permuted per epoch, and records pass through a shuffle
buffer of ``shuffle_buffer`` records that spans shard boundaries (the next record is drawn uniformly
from the buffer, which is refilled from the head; it drains at the end of each epoch, so an epoch
reads every record of the lane once). All randomness is keyed by (seed, dataset, lane, epoch, draw)
and a record's decoding by (epoch, shard, record), never by process state, so it is identical in any
process and after a resume.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .samples import Sample, SkipSample
from .sources import ShardError, read_records

logger = logging.getLogger(__name__)

# A lane that cannot use this many records in a row is misconfigured (wrong format, wrong paths).
MAX_CONSECUTIVE_SKIPS = 2000


class RecordFormat(Protocol):
    source: Any  # has .records(url, skip) -> Iterator[dict]

    def decode(self, record: dict, rng: np.random.Generator) -> Sample: ...


@dataclass
class LaneState:
    """Where a lane is in epoch ``epoch``: its head is ``record`` records into shard ``shard`` of the
    epoch's shard order; ``buffer`` holds the ``[shard, record]`` positions of the records in its shuffle
    buffer, in buffer order; ``drawn`` records were drawn this epoch. ``counts``: skip/drop events so
    far by reason, plus ``skipped_records``."""

    epoch: int = 0
    shard: int = 0
    record: int = 0
    buffer: list[list[int]] = field(default_factory=list)
    drawn: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def copy(self) -> "LaneState":
        return LaneState(self.epoch, self.shard, self.record, [list(p) for p in self.buffer], self.drawn, dict(self.counts))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LaneState":
        return cls(int(d["epoch"]), int(d["shard"]), int(d["record"]), [[int(s), int(r)] for s, r in d.get("buffer", [])],
                   int(d.get("drawn", 0)), {k: int(v) for k, v in d.get("counts", {}).items()})


@dataclass(frozen=True)
class StreamSpec:
    """What every lane of a dataset shares (picklable, so DataLoader workers can be spawned)."""

    name: str
    shards: tuple[str, ...]
    lanes: int
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000

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
    if lanes < 1 or batch_size % lanes:
        raise ValueError(f"dataset {name!r}: lanes={lanes} must divide batch_size={batch_size}")


def rank_lanes(lanes: int, batch_size: int, world_size: int, rank: int) -> tuple[list[int], tuple[int, int]]:
    """(the lanes process ``rank`` reads, its slots ``[lo, hi)`` of the global batch)."""
    per_lane, per_rank = batch_size // lanes, batch_size // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    return list(range(lo // per_lane, -(-hi // per_lane))), (lo, hi)


def shared_lanes(lanes: int, batch_size: int, world_size: int) -> int:
    """How many lanes more than one process reads (0 when ``lanes`` is a multiple of the processes)."""
    readers = [0] * lanes
    for r in range(world_size):
        for lane in rank_lanes(lanes, batch_size, world_size, r)[0]:
            readers[lane] += 1
    return sum(n > 1 for n in readers)


class Lane:
    """One endless, resumable reader; :meth:`take` decodes the next ``n`` usable samples."""

    def __init__(self, spec: StreamSpec, index: int, fmt: RecordFormat, state: LaneState | None = None) -> None:
        self.spec, self.index, self.fmt = spec, index, fmt
        self.state = state.copy() if state is not None else LaneState()
        self.plan = spec.lane_shards(index)
        self.position = (0, 0, 0)  # (epoch, shard, record) of the record last drawn: keys its decoding
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

    def _head(self, order: list[tuple[str, int, int]]) -> Iterator[tuple[int, int, dict]]:
        """(shard, record, record dict) from the head on, moving the head past each record it yields."""
        state = self.state
        while state.shard < len(order):
            url, stride, offset = order[state.shard]
            raw = self.fmt.source.records(url, skip=offset + state.record * stride)
            try:
                for k, record in enumerate(raw):
                    if k % stride:
                        continue  # another lane's record of a shared shard
                    state.record += 1
                    yield state.shard, state.record - 1, record
            except ShardError as e:
                self._count("bad_shard")
                logger.warning("dataset %s: skipping the rest of a shard: %s", self.spec.name, e)
            finally:
                raw.close()
            state.shard += 1
            state.record = 0

    def _restore(self, order: list[tuple[str, int, int]]) -> list[dict]:
        """The records at the buffer's saved positions (a resumed lane's), fetched by position."""
        by_shard: dict[int, list[int]] = {}
        for shard, record in self.state.buffer:
            by_shard.setdefault(shard, []).append(record)
        found: dict[tuple[int, int], dict] = {}
        for shard, records in by_shard.items():
            url, stride, offset = order[shard]
            try:
                got = read_records(self.fmt.source, url, [offset + r * stride for r in records])
            except ShardError as e:
                got = {}
                logger.warning("dataset %s: cannot re-read the shuffle buffer's records: %s", self.spec.name, e)
            found.update({(shard, r): got[offset + r * stride] for r in records if offset + r * stride in got})
        kept = [p for p in self.state.buffer if tuple(p) in found]
        if len(kept) < len(self.state.buffer):
            self._count("bad_shard", len(self.state.buffer) - len(kept))
            self.state.buffer = kept
        return [found[tuple(p)] for p in kept]

    def _iterate(self) -> Iterator[dict]:
        state = self.state
        size = self.spec.shuffle_buffer if self.spec.shuffle else 1
        while True:
            full_epoch = state.shard == 0 and state.record == 0 and not state.buffer
            produced = False
            order = self._shard_order(state.epoch)
            held = self._restore(order)  # aligned with state.buffer
            head = self._head(order)
            while True:
                while len(held) < size:  # fill the buffer from the head (it spans shard boundaries)
                    nxt = next(head, None)
                    if nxt is None:
                        break
                    held.append(nxt[2])
                    state.buffer.append([nxt[0], nxt[1]])
                if not held:
                    break
                j = int(self._rng(state.epoch, state.drawn).integers(len(held))) if size > 1 else 0
                record = held[j]
                self.position = (state.epoch, *state.buffer[j])
                held[j], state.buffer[j] = held[-1], state.buffer[-1]  # swap-remove: O(1), deterministic
                held.pop()
                state.buffer.pop()
                state.drawn += 1
                produced = True
                yield record
            state.epoch += 1
            state.shard = state.record = state.drawn = 0
            if full_epoch and not produced:
                raise RuntimeError(f"dataset {self.spec.name!r}: lane {self.index} read no record in a whole epoch of {[u for u, _, _ in self.plan]}")

    def take(self, n: int) -> list[Sample]:
        samples: list[Sample] = []
        skipped_in_a_row = 0
        while len(samples) < n:
            record = next(self._records)
            try:
                sample = self.fmt.decode(record, self._rng(*self.position))
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
    for the lanes this process (or DataLoader worker) reads, keeping the samples of slots ``[lo, hi)``."""

    def __init__(self, spec: StreamSpec, fmt: RecordFormat, lanes: list[int], states: dict[int, LaneState], per_lane: int,
                 slots: tuple[int, int]) -> None:
        self.spec, self.fmt, self.lanes, self.states, self.per_lane, self.slots = spec, fmt, lanes, states, per_lane, slots

    def __iter__(self):
        info = get_worker_info()
        mine = self.lanes if info is None else self.lanes[info.id :: info.num_workers]
        lanes = [Lane(self.spec, i, self.fmt, self.states.get(i)) for i in mine]
        lo, hi = self.slots
        while True:
            samples = []
            for lane in lanes:
                # slot lane * per_lane + i: the global batch is lane after lane, whatever process reads them
                slotted = ((lane.index * self.per_lane + i, s) for i, s in enumerate(lane.take(self.per_lane)))
                samples.extend((slot, s) for slot, s in slotted if lo <= slot < hi)
            yield {"samples": samples, "states": {lane.index: lane.state.copy() for lane in lanes}}


class DatasetStream:
    """This rank's share of one dataset's global batches, step after step.

    :meth:`next_samples` returns the rank's ``batch_size / world_size`` samples of the next step, in
    global-batch order; :meth:`state_dict` the position of the lanes it reads after the last step taken.
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
        self.lanes, self.slots = rank_lanes(spec.lanes, batch_size, world_size, rank)
        per_lane = batch_size // spec.lanes
        # a lane read by several processes counts its skips on the one holding its first slot
        self.counted = [lane for lane in self.lanes if self.slots[0] <= lane * per_lane < self.slots[1]]
        self.states = {lane: (states or {}).get(lane, LaneState()).copy() for lane in self.lanes}
        self.num_workers = min(num_workers, len(self.lanes))
        self.prefetch_factor = prefetch_factor
        self._items: Iterator[dict] | None = None
        self._loader: DataLoader | None = None

    def _start(self) -> None:
        stream = StepStream(self.spec, self.fmt, self.lanes, self.states, self.batch_size // self.spec.lanes, self.slots)
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
        """Skip/drop events so far of the lanes this rank counts (summed over ranks: every lane once), by reason."""
        total: dict[str, int] = {}
        for state in (self.states[lane] for lane in self.counted):
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
