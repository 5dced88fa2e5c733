"""Dynamic batching: requests wait in an asyncio queue; one worker thread runs the model on batches of them.

The collector takes the first waiting request, then keeps taking more until ``max_batch_size`` or until
``max_wait_s`` has passed; it groups them by key (requests that can share one model call: same task and
generation parameters) and runs each group in the single model thread. While a batch runs, new requests
queue up, so under load batches fill without waiting.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from .errors import RequestError


@dataclass
class BatchInfo:
    """How a request was run: seconds waiting in the queue, seconds of its batch's model call, batch size."""

    queue_s: float
    compute_s: float
    batch_size: int


@dataclass
class _Job:
    key: Hashable
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """``run_batch(key, payloads) -> results`` (one per payload, same order), called in one worker thread.

    If a batch of several fails, its requests are re-run one at a time, so one request's error reaches
    only that request.
    """

    def __init__(self, run_batch: Callable[[Hashable, list[Any]], list[Any]], *, max_batch_size: int = 8,
                 max_wait_s: float = 0.01, max_queue: int = 256) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.batches_run = 0
        self.requests_run = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._collector: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    # ---- lifecycle (inside the server's event loop) ------------------------------------------
    async def start(self) -> None:
        reset = getattr(self.run_batch, "reset", None)  # a model call cut short by an earlier stop() runs again
        if reset is not None:
            reset()
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flamingo-model")
        self._collector = asyncio.create_task(self._collect(), name="flamingo-batcher")

    async def stop(self) -> None:
        """Refuse what waits (503), cut a running model call short (``run_batch.cancel()``, if it has one) and
        wait for the model thread."""
        cancel = getattr(self.run_batch, "cancel", None)
        if cancel is not None:
            cancel()
        if self._collector is not None:
            self._collector.cancel()
            try:
                await self._collector
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if not job.future.done():
                    job.future.set_exception(RequestError(503, "the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._collector = self._queue = self._executor = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    # ---- requests ----------------------------------------------------------------------------
    async def submit(self, key: Hashable, payload: Any) -> tuple[Any, BatchInfo]:
        """Queue one request and wait for its result (or its exception)."""
        if self._queue is None:
            raise RuntimeError("the batcher is not running: call start() in the server's event loop")
        if self._queue.qsize() >= self.max_queue:
            raise RequestError(503, f"the server is busy ({self._queue.qsize()} requests waiting); retry later")
        job = _Job(key, payload, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(jobs) < self.max_batch_size:
                try:
                    jobs.append(self._queue.get_nowait() if self._queue.qsize() else
                                await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time())))
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            groups: dict[Hashable, list[_Job]] = {}
            for job in jobs:
                if not job.future.done():  # the client went away while it waited
                    groups.setdefault(job.key, []).append(job)
            for key, group in groups.items():
                start = time.perf_counter()
                try:
                    outcomes = await loop.run_in_executor(self._executor, self._run, key, [j.payload for j in group])
                except Exception as e:  # noqa: BLE001  (the collector must outlive any batch)
                    outcomes = [(False, e, len(group))] * len(group)
                compute = time.perf_counter() - start
                self.batches_run += 1
                self.requests_run += len(group)
                for job, (ok, value, size) in zip(group, outcomes):
                    if job.future.done():
                        continue
                    if ok:
                        job.future.set_result((value, BatchInfo(start - job.enqueued, compute, size)))
                    else:
                        job.future.set_exception(value)

    def _run(self, key: Hashable, payloads: list[Any]) -> list[tuple[bool, Any, int]]:
        """In the model thread: (True, result, batch size) or (False, exception, batch size) per payload."""
        try:
            results = self.run_batch(key, payloads)
            if len(results) != len(payloads):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(payloads)} requests")
            return [(True, r, len(payloads)) for r in results]
        except Exception as e:  # noqa: BLE001  (handed to the request that caused it)
            if len(payloads) == 1:
                return [(False, e, 1)]
        return [self._run(key, [p])[0] for p in payloads]
