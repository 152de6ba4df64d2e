"""Dynamic batching: requests waiting together become one forward pass, on one worker thread.

Concurrent requests each submit their images; one asyncio task takes the oldest waiting image,
gathers more until `max_batch` images or `max_wait` seconds after the first, and runs the batch
function on a single worker thread (one forward at a time: the model's threads already use the
cores). The queue is bounded: a submit beyond `max_queue` waiting images is refused at once
(QueueFull, HTTP 503) instead of waiting without end. `close()` refuses new work and `drain()`
finishes every accepted image before the worker stops (graceful shutdown).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """More images wait than the queue holds: try again shortly."""


class Closed(Exception):
    """The server is shutting down and takes no new work."""


@dataclass
class _Item:
    payload: Any
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """Counters for /health and the tests: forward passes, images, the largest batch."""

    batches: int = 0
    images: int = 0
    largest: int = 0
    sizes: collections.Counter = field(default_factory=collections.Counter)

    def to_json(self) -> dict:
        return {
            "batches": self.batches, "images": self.images, "largest_batch": self.largest,
            "mean_batch": round(self.images / self.batches, 2) if self.batches else 0.0,
        }  # fmt: skip


class Batcher:
    """Gathers submitted payloads into calls of `run_batch(payloads) -> results` (same order)."""

    def __init__(
        self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch: int = 32,
        max_wait: float = 0.005, max_queue: int = 256,
    ) -> None:  # fmt: skip
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait >= 0")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._waiting: collections.deque[_Item] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._in_forward = 0

    @property
    def queued(self) -> int:
        """Images accepted and not yet answered (waiting or in the running forward pass)."""
        return len(self._waiting) + self._in_forward

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serve-infer")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    def check_room(self, n: int = 1) -> None:
        """Raise QueueFull / Closed now if `n` more images would be refused: a request learns it
        before its body is read and decoded."""
        if self._closed or self._worker is None:
            raise Closed("the server is shutting down")
        if self.queued + n > self.max_queue:
            raise QueueFull(f"{self.queued} images already wait (the queue holds {self.max_queue})")

    def submit_many(self, payloads: Sequence[Any]) -> list[asyncio.Future]:
        """Queue every payload or none (QueueFull / Closed); futures resolve to their results."""
        self.check_room(len(payloads))
        loop = asyncio.get_running_loop()
        items = [_Item(p, loop.create_future()) for p in payloads]
        self._waiting.extend(items)
        assert self._wakeup is not None
        self._wakeup.set()
        return [item.future for item in items]

    def close(self) -> None:
        """Refuse new submits; what was accepted is still answered."""
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def drain(self) -> None:
        """close(), answer every accepted image, then stop the worker."""
        self.close()
        if self._worker is not None:
            await self._worker
            self._worker = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _gather(self) -> list[_Item]:
        """The oldest waiting items, up to max_batch, waiting at most max_wait for more."""
        deadline = self._waiting[0].queued_at + self.max_wait
        assert self._wakeup is not None
        while len(self._waiting) < self.max_batch and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        batch = []
        while self._waiting and len(batch) < self.max_batch:
            item = self._waiting.popleft()
            if not item.future.done():  # a timed-out or disconnected request's image is dropped
                batch.append(item)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not self._waiting:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = await self._gather()
            if not batch:
                continue
            self._in_forward = len(batch)
            try:
                results = await loop.run_in_executor(
                    self._executor, self.run_batch, [item.payload for item in batch]
                )
            except Exception as e:  # noqa: BLE001 - the requests get the error, the worker goes on
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
            else:
                self.stats.batches += 1
                self.stats.images += len(batch)
                self.stats.largest = max(self.stats.largest, len(batch))
                self.stats.sizes[len(batch)] += 1
                for item, result in zip(batch, results):
                    if not item.future.done():
                        item.future.set_result(result)
            finally:
                self._in_forward = 0
