"""The device work queue: every piece of torch work runs here, off the event loop.

One worker thread owns the device, so work items never compete for its memory. Work is queued
in lanes, one per request (a kernel stream's request id), and the worker takes one item from
each lane in turn (round robin). Requests submit one block at a time, so a huge kernel gets one
block, then a small request gets one, and so on: the small request finishes in about its own
time instead of after the huge one. An item whose caller went away (cancelled, deadline) before
it started is dropped, so a cancelled stream stops within the block that is running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ntk_server.errors import QueueFull, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Item:
    fn: Callable[..., Any]
    args: tuple
    future: concurrent.futures.Future


class Scheduler:
    """Runs callables on one device worker thread, fair across lanes; bounded queue."""

    def __init__(self, queue_limit: int = 256):
        self.queue_limit = queue_limit
        self._lanes: OrderedDict[str, deque[_Item]] = OrderedDict()
        self._cond = threading.Condition()
        self._queued = 0
        self._closed = False
        self._anonymous = itertools.count()
        self._thread = threading.Thread(target=self._work, name="device", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._queued

    async def run(self, fn: Callable[..., T], *args, lane: str | None = None) -> T:
        """Run fn(*args) on the device thread and return its result.

        `lane` groups the work of one request; lanes are served round robin.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if self._queued >= self.queue_limit:
                raise QueueFull(
                    f"device queue is full ({self._queued} items, limit queue_limit="
                    f"{self.queue_limit}); retry later"
                )
            key = lane if lane is not None else f"anonymous-{next(self._anonymous)}"
            self._lanes.setdefault(key, deque()).append(_Item(fn, args, future))
            self._queued += 1
            self._cond.notify()
        # Cancelling the awaiting task cancels `future`; the worker then skips it if not started.
        return await asyncio.wrap_future(future)

    def _next(self) -> _Item | None:
        with self._cond:
            while not self._lanes and not self._closed:
                self._cond.wait()
            if not self._lanes:
                return None
            key, items = next(iter(self._lanes.items()))
            item = items.popleft()
            if items:
                self._lanes.move_to_end(key)
            else:
                del self._lanes[key]
            self._queued -= 1
            return item

    def _work(self) -> None:
        while (item := self._next()) is not None:
            if not item.future.set_running_or_notify_cancel():
                continue  # the caller went away before the item started
            try:
                result = item.fn(*item.args)
            except BaseException as exc:  # handed to the awaiting request, which maps it
                item.future.set_exception(exc)
            else:
                item.future.set_result(result)
            finally:
                del item

    def close(self) -> None:
        """Refuse new work, cancel queued items, and wait for the running one to finish."""
        with self._cond:
            self._closed = True
            pending = [item for items in self._lanes.values() for item in items]
            self._lanes.clear()
            self._queued = 0
            self._cond.notify_all()
        for item in pending:
            item.future.cancel()
        self._thread.join()
