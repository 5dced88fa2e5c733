"""Bytes each process sends and receives through the collectives, counted as they run.

:func:`count_collectives` wraps the ``torch.distributed`` functions FSDP2 and the training loop call
(``all_gather_single``, ``all_gather_into_tensor``, ``reduce_scatter_single``, ``reduce_scatter_tensor``,
``all_reduce``) for the duration of a ``with`` block, and adds up the bytes of this process's side of
each: the gathered output of an all-gather, the input of a reduce-scatter, the tensor of an all-reduce.
``train`` reports them per step with ``count_communication: true``; the dry run's estimate is the same
arithmetic done before anything runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class CommCounts:
    """Bytes by kind of collective, and the number of calls."""

    all_gather: int = 0
    reduce_scatter: int = 0
    all_reduce: int = 0
    calls: dict[str, int] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "comm/") -> dict[str, int]:
        return {f"{prefix}all_gather_bytes": self.all_gather, f"{prefix}reduce_scatter_bytes": self.reduce_scatter,
                f"{prefix}all_reduce_bytes": self.all_reduce}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# (function name, counter, which argument holds the tensor counted)
_WRAPPED = (
    ("all_gather_single", "all_gather", ("output_tensor", 0)),
    ("all_gather_into_tensor", "all_gather", ("output_tensor", 0)),
    ("reduce_scatter_single", "reduce_scatter", ("input", 1)),
    ("reduce_scatter_tensor", "reduce_scatter", ("input", 1)),
    ("all_reduce", "all_reduce", ("tensor", 0)),
)


@contextlib.contextmanager
def count_collectives() -> Iterator[CommCounts]:
    """Count the bytes of every collective this process runs inside the block (see module doc)."""
    counts = CommCounts()
    saved = {}
    for name, kind, (kwarg, index) in _WRAPPED:
        real = getattr(dist, name, None)
        if real is None:
            continue
        saved[name] = real

        def counted(*args, _real=real, _kind=kind, _kwarg=kwarg, _index=index, _name=name, **kwargs):
            tensor = kwargs.get(_kwarg, args[_index] if len(args) > _index else None)
            if torch.is_tensor(tensor):
                setattr(counts, _kind, getattr(counts, _kind) + _nbytes(tensor))
            counts.calls[_name] = counts.calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        setattr(dist, name, counted)
    try:
        yield counts
    finally:
        for name, real in saved.items():
            setattr(dist, name, real)
