"""Dynamic batching, apart from HTTP: requests put their images in one bounded queue; one worker
thread takes up to `max_batch` of them, waiting at most `max_delay` after the oldest arrived for
more, runs them through the model as one batch, and hands each request its own rows.

A full queue refuses at once (`QueueFull`): memory is bounded by `max_queue` images, whatever the
load. The worker is a thread, not a task: torch and onnxruntime release the GIL while they compute,
so the event loop goes on reading requests meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


class QueueFull(Exception):
    """The queue holds `max_queue` images already; the caller should come back later."""


@dataclass
class _Item:
    pixels: np.ndarray  # uint8 (32, 32, 3)
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, infer: Callable[[np.ndarray], list[list[float]]], max_batch: int, max_delay_s: float, max_queue: int,
                 on_batch: Callable[[int], None] = lambda n: None):
        self.infer = infer  # uint8 (N, 32, 32, 3) -> N rows, one number a class
        self.max_batch, self.max_delay_s, self.max_queue = max_batch, max_delay_s, max_queue
        self.on_batch = on_batch  # called with each batch's size, in the worker
        self.ready = threading.Event()  # set once the model has run a batch of each size it warms up with
        self.warmup_error: Exception | None = None  # the model failed its warm-up: requests get that error too
        self._items: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._work, name="inference", daemon=True)

    @property
    def depth(self) -> int:
        """Images waiting for the worker."""
        return len(self._items)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def close(self) -> None:
        """Refuse new images, run every image already queued, and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    async def submit(self, images: list[np.ndarray]) -> list[list[float]]:
        """Each image's row of the model's output, once its batch has run."""
        loop = asyncio.get_running_loop()
        items = [_Item(px, loop.create_future()) for px in images]
        with self._cond:
            if self._closed or len(self._items) + len(items) > self.max_queue:
                raise QueueFull(f"{len(self._items)} images are waiting (at most {self.max_queue})")
            was_empty = not self._items
            self._items.extend(items)
            if was_empty or len(self._items) >= self.max_batch:  # the worker waits for a first image or a full batch
                self._cond.notify()
        return list(await asyncio.gather(*(it.future for it in items)))

    def _work(self) -> None:
        try:
            for n in sorted({1, self.max_batch}):  # the first calls of a net are slow (allocation, kernel choice)
                self.infer(np.zeros((n, 32, 32, 3), np.uint8))
            self.ready.set()
        except Exception as e:
            self.warmup_error = e
        while batch := self._next_batch():
            try:
                rows, error = self.infer(np.stack([it.pixels for it in batch])), None
            except Exception as e:  # the requests get the error; the worker goes on
                rows, error = None, e
            self.on_batch(len(batch))
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_deliver, batch, rows, error)

    def _next_batch(self) -> list[_Item]:
        """Up to max_batch images, once there are that many or the oldest has waited max_delay; [] when closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if self._items:
                deadline = self._items[0].arrived + self.max_delay_s
                while len(self._items) < self.max_batch and not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
            return [self._items.popleft() for _ in range(min(self.max_batch, len(self._items)))]


def _deliver(batch: list[_Item], rows: list[list[float]] | None, error: Exception | None) -> None:
    for i, it in enumerate(batch):
        if it.future.done():  # its request went away (the client hung up)
            continue
        if error is not None:
            it.future.set_exception(error)
        else:
            assert rows is not None
            it.future.set_result(rows[i])
