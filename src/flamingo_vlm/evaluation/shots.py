"""Which support examples go into a prompt: random (per seed) or RICES (Yang et al. 2022; Flamingo appendix B).

RICES retrieves the support examples whose media are most similar to the query's under the frozen vision
encoder, and puts the most similar last (closest to the query). Support embeddings are computed once,
in batches, and cached on disk when a cache directory is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..inference.media import MediaEncoder
from .task import Example, Task


class ShotPool:
    """A support set indexed once by example id, so that drawing ``n`` shots for a query costs O(n), not
    O(support set): at VQAv2 size (443k questions) a per-query list of the candidates alone is milliseconds.

    examples: the support set (kept, not copied). Ids are normally hashable; a pool with an unhashable id
    falls back to finding the query by a scan.
    """

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples
        self._positions: dict | None = {}
        try:
            for j, ex in enumerate(examples):
                self._positions.setdefault(ex.id, []).append(j)
        except TypeError:  # an unhashable id
            self._positions = None

    def __len__(self) -> int:
        return len(self.examples)

    def positions(self, example_id) -> list[int]:
        """Ascending indices of the examples whose id equals ``example_id``."""
        if self._positions is not None:
            try:
                return self._positions.get(example_id, [])
            except TypeError:  # an unhashable query id equals no hashable support id
                return []
        return [j for j, ex in enumerate(self.examples) if ex.id == example_id]

    def sample(self, n: int, rng: random.Random, exclude_id=None) -> list[Example]:
        """Exactly ``rng.sample([ex for ex in examples if ex.id != exclude_id], min(n, that many))``: the same
        shots from the same generator state, with no list over the pool.

        ``random.sample`` reads only the population's length and the items at the indices it draws (a
        ``range`` is a sequence of O(1) indexing), so sampling indices of the pool without the excluded
        examples and mapping each to the pool skips the copy. Its set-based branch draws O(n) indices; its
        pool branch copies the population, but only when it is at most about 12n + 21 long.
        """
        excluded = [] if exclude_id is None else self.positions(exclude_id)
        size = len(self.examples) - len(excluded)
        out = []
        for j in rng.sample(range(size), min(n, size)):
            for p in excluded:  # ascending: the j-th kept index steps over each excluded one at or before it
                if p <= j:
                    j += 1
            out.append(self.examples[j])
        return out


def sample_random_shots(pool: Sequence[Example] | ShotPool, n: int, rng: random.Random, exclude_id=None) -> list[Example]:
    """``n`` distinct examples of ``pool`` in random order, never the query itself (``exclude_id``).

    Pass a :class:`ShotPool` built once per support set to make each call O(n); a plain list is indexed
    on every call (O(len(pool))).
    """
    return (pool if isinstance(pool, ShotPool) else ShotPool(pool)).sample(n, rng, exclude_id)


def shot_permutations(shots: list[Example], count: int, rng: random.Random) -> list[list[Example]]:
    """The given order first, then up to ``count - 1`` other distinct orders (prompt ensembling, appendix B)."""
    orders = [list(shots)]
    possible = 1
    for k in range(2, len(shots) + 1):
        possible *= k
        if possible >= count:
            break
    seen = {tuple(id(s) for s in shots)}
    while len(orders) < min(count, possible):
        order = list(shots)
        rng.shuffle(order)
        key = tuple(id(s) for s in order)
        if key not in seen:
            seen.add(key)
            orders.append(order)
    return orders


class RICES:
    """Retrieval-based In-Context Example Selection over a task's support set."""

    def __init__(
        self,
        task: Task,
        media: MediaEncoder,
        *,
        support: list[Example] | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        self.task = task
        self.media = media
        self.support = support if support is not None else task.support()
        self._pool = ShotPool(self.support)
        self.batch_size = batch_size
        self.progress = progress
        self.support_embeddings = self._load_or_embed(cache_dir)  # [N, d]

    def _fingerprint(self) -> str:
        vision = getattr(self.media.model.config, "vision_name_or_path", None)
        parts = [vision, self.task.num_frames, [(str(ex.id), [str(m) if isinstance(m, (str, Path)) else "obj" for m in ex.media]) for ex in self.support]]
        return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]

    def _load_or_embed(self, cache_dir) -> torch.Tensor:
        path = None
        if cache_dir is not None:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.task.name)
            path = Path(cache_dir) / f"rices-{safe}-{self._fingerprint()}.pt"
            if path.is_file():
                return torch.load(path)
        embeddings = self.embed(self.support, desc=f"RICES {self.task.name} support")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(embeddings, tmp)
            os.replace(tmp, path)
        return embeddings

    def embed(self, examples: list[Example], desc: str | None = None, *, queries: bool = False) -> torch.Tensor:
        """Examples -> [len, d]: the mean of their media embeddings, L2-normalised (zero without media).

        queries: the examples are queries about to be prompted; their visual tokens are kept from the same
        vision pass (``MediaEncoder.embeddings(keep_visual_tokens=True)``).
        """
        per_example = [self.task.media_items(ex) for ex in examples]
        out: torch.Tensor | None = None
        bar = tqdm(total=len(examples), desc=desc, disable=not (self.progress and desc), unit="ex")
        for start in range(0, len(examples), self.batch_size):
            chunk = per_example[start : start + self.batch_size]
            items = [m for media in chunk for m in media]
            if items:
                emb = self.media.embeddings(items, self.task.num_frames, keep_visual_tokens=queries)
                if out is None:
                    out = torch.zeros(len(examples), emb.shape[1])
                owner = torch.tensor([start + i for i, media in enumerate(chunk) for _ in media])
                out.index_add_(0, owner, emb)
            bar.update(len(chunk))
        bar.close()
        if out is None:
            raise ValueError(f"RICES: the examples of task {self.task.name!r} have no media to retrieve by")
        return torch.nn.functional.normalize(out, dim=-1)

    def select(self, queries: list[Example], n: int) -> list[list[Example]]:
        """For each query, its ``n`` most similar support examples, least similar first (most similar last).

        Exact search: one [queries, N] similarity product and a top-k per query; everything else per query
        is O(n) (the id index of the support set is built once, in the constructor).
        """
        if n <= 0:
            return [[] for _ in queries]
        excluded = [self._pool.positions(q.id) for q in queries]  # the support's id index is built once
        k = min(n, len(self.support) - max((len(p) for p in excluded), default=0))
        selected = []
        for start in range(0, len(queries), 256):  # [256, N] similarities at a time
            chunk = queries[start : start + 256]
            similarity = self.embed(chunk, queries=True) @ self.support_embeddings.T
            for i in range(len(chunk)):  # never retrieve the query itself
                similarity[i, excluded[start + i]] = -float("inf")
            top = similarity.topk(k, dim=1).indices.flip(1)  # ascending similarity: most similar last
            selected += [[self.support[j] for j in row] for row in top.tolist()]
        return selected


__all__ = ["RICES", "ShotPool", "sample_random_shots", "shot_permutations"]
