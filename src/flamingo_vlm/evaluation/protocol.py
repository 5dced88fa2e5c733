"""Evaluation protocols: the choices, beyond the metric, that move reported numbers (docs/evaluation.md).

``paper`` (the default) follows the Flamingo paper (appendix B); ``openflamingo`` reproduces what
OpenFlamingo's eval code (``open_flamingo/eval/evaluate.py``) does, so numbers can be put beside its tables.

A protocol has two halves: per-task settings (prompt wording, the answer a shot shows, decoding, answer
post-processing, rank scoring), which each :class:`~flamingo_vlm.evaluation.task.Task` class declares in
its ``protocol_settings`` and :meth:`Task.use_protocol` applies; and the runner's choices below (which
queries a ``limit`` keeps, the pool random shots come from, how 0-shot text-only examples are chosen).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Protocol:
    """The runner's side of a protocol.

    shot_pool_size: random shots are drawn from a seeded subset of the support set of this size, one subset
        per seed (OpenFlamingo's ``--query_set_size`` 2048); None: from the whole support set.
    random_limit: ``limit`` keeps a seeded random subset of the queries, drawn per seed (OpenFlamingo's
        ``--num_samples``); False: the first ``limit`` queries.
    retrieve_text_examples: with ``selection: rices``, the 0-shot prompt's text-only examples are the
        retrieved ones (OpenFlamingo); False: drawn at random as in the paper.
    """

    name: str
    shot_pool_size: int | None = None
    random_limit: bool = False
    retrieve_text_examples: bool = False

    def subsets(self, num_queries: int, num_support: int, limit: int | None, seed: int) -> tuple[list[int], list[int] | None]:
        """(indices of the evaluated queries, indices of the random-shot pool or None for the whole support set).

        Under a seeded protocol both come from one ``numpy`` generator seeded with ``seed``, queries first
        and then the pool, as OpenFlamingo draws them (``np.random.seed(seed)``; ``prepare_eval_samples``
        draws all queries in random order when no limit is given; ``get_query_set``), so the same seed
        evaluates the same queries against the same pool as OpenFlamingo on the same files.
        """
        count = num_queries if limit is None else min(limit, num_queries)
        if not (self.random_limit or self.shot_pool_size):
            return list(range(count)), None
        rng = np.random.RandomState(seed)  # the legacy generator: np.random.seed / np.random.choice's stream
        drawn = rng.choice(num_queries, count, replace=False).tolist()
        queries = drawn if self.random_limit else list(range(count))
        pool = None
        if self.shot_pool_size is not None and num_support > 0:
            pool = rng.choice(num_support, min(self.shot_pool_size, num_support), replace=False).tolist()
        return queries, pool

    def describe(self) -> dict:
        return asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    "paper": Protocol("paper"),
    "openflamingo": Protocol("openflamingo", shot_pool_size=2048, random_limit=True, retrieve_text_examples=True),
}


def get_protocol(protocol: str | Protocol) -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[protocol]


__all__ = ["PROTOCOLS", "Protocol", "get_protocol"]
