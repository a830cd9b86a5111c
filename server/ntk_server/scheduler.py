"""The device work queue: every piece of torch work runs here, off the event loop.

One worker thread owns the device, so work items never compete for its memory. Requests submit
one block at a time and wait for it before submitting the next, so the blocks of concurrent
requests interleave in arrival order and a small request is not stuck behind a large one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from ntk_server.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


class Scheduler:
    """Runs callables on one device worker thread; bounded queue."""

    def __init__(self, queue_limit: int = 256):
        self.queue_limit = queue_limit
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="device"
        )
        self._lock = threading.Lock()
        self._queued = 0
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return self._queued

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run fn(*args) on the device thread and return its result."""
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if self._queued >= self.queue_limit:
                raise ResourceExhausted(
                    f"device queue is full ({self._queued} items, limit queue_limit="
                    f"{self.queue_limit}); retry later"
                )
            self._queued += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, fn, *args)
        finally:
            with self._lock:
                self._queued -= 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
