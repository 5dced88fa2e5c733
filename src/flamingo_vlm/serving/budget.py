"""What bounds the server's memory and CPU under many media at once (decompression bombs under the limits).

Two budgets, both known before any pixel is decoded (image headers give every frame's size):

- :class:`MemoryBudget` (bytes, per request, in the event loop): what a request's media cost while it is
  served, its decoded frames waiting for the model plus the largest frame being decoded. A request
  reserves its cost before decoding and holds it until its answer is sent; one over the whole budget is
  refused (413), one that does not fit now waits a little, then gets 503.
- :class:`DecodeSlots` (pixels, per frame, in the decoding threads): how many pixels are being decoded at
  once across all requests. Large frames take turns; small ones (a normal request's images) fit beside
  them, so a flood of large frames does not hold up a small request.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator

from .errors import RequestError, too_large

# A frame of W x H pixels, while decoded and resized: its native mode (up to 4 bytes a pixel), the RGB(X)
# copy PIL makes (4 bytes a pixel) and the resize's intermediate: at most this many bytes a pixel.
DECODE_BYTES_PER_PIXEL = 12


def frame_decode_bytes(pixels: int) -> int:
    """Peak bytes of decoding one frame of ``pixels`` pixels into RGB and resizing it."""
    return DECODE_BYTES_PER_PIXEL * pixels


class MemoryBudget:
    """``capacity`` bytes shared by the requests being served; :meth:`reserve` waits up to ``wait_s``."""

    def __init__(self, capacity: int, *, wait_s: float = 5.0) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.used = 0
        self._cond: asyncio.Condition | None = None  # made in the server's event loop, on first use

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        if nbytes > self.capacity:
            raise too_large(
                f"the request's media need {nbytes / 2**20:.0f} MiB to decode and hold, over the server's budget of "
                f"{self.capacity / 2**20:.0f} MiB: send fewer or smaller images/frames"
            )
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.used + nbytes <= self.capacity), self.wait_s)
            except asyncio.TimeoutError:
                raise RequestError(503, "the server is busy decoding other requests' media; retry later") from None
            self.used += nbytes
        try:
            yield
        finally:
            async with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


class DecodeSlots:
    """At most ``capacity`` pixels decoded at once across threads; :meth:`take` waits up to ``wait_s``.

    Admission is greedy, not first-come: a frame that fits goes ahead of a larger one that waits.
    """

    def __init__(self, capacity: int, *, wait_s: float = 30.0) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def take(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.capacity)  # a frame over the whole capacity decodes alone
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self.used + pixels > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RequestError(503, "the server is busy decoding other requests' media; retry later")
                self._cond.wait(left)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


__all__ = ["DECODE_BYTES_PER_PIXEL", "DecodeSlots", "MemoryBudget", "frame_decode_bytes"]
