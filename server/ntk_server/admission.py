"""Admission: every request states its device memory estimate before any work is done.

A request whose estimate is over the whole budget can never run and is refused at once. The
others wait, first come first served, in a bounded queue until the estimates of the admitted
requests plus their own fit in the budget; a full queue is refused with a retryable error.
Admission is head-of-line: a small request does not overtake a large one that waits, so a large
request cannot be starved by a stream of small ones.

All methods are called from the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque

from ntk_server.errors import QueueFull, ResourceExhausted

log = logging.getLogger(__name__)

# Share of the device's memory that admitted requests may plan to use. The rest is headroom for
# the allocator's fragmentation, the loaded models and the CUDA context.
DEVICE_MEMORY_FRACTION = 0.85
# On CPU the "device" is the host, shared with the process itself and everything else on it.
HOST_MEMORY_FRACTION = 0.5
UNLIMITED_BYTES = 1 << 62


def default_memory_budget_bytes(device) -> int:
    """DEVICE_MEMORY_FRACTION of a CUDA device's memory, HOST_MEMORY_FRACTION of host RAM on CPU."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        total = torch.cuda.get_device_properties(device).total_memory
        return int(total * DEVICE_MEMORY_FRACTION)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * HOST_MEMORY_FRACTION)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


class Ticket:
    """One request's claim on the memory budget; `release()` may be called more than once."""

    def __init__(self, admission: Admission, request_id: str, estimate_bytes: int):
        self.admission = admission
        self.request_id = request_id
        self.estimate_bytes = estimate_bytes
        self.admitted = False
        self.released = False
        self._event = asyncio.Event()

    async def wait(self) -> None:
        """Until admitted. Cancelling the waiter (client gone, deadline) leaves the queue."""
        try:
            await self._event.wait()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._release(self)


class Admission:
    """The memory budget and the queue of requests waiting for it."""

    def __init__(self, budget_bytes: int = UNLIMITED_BYTES, queue_limit: int = 256):
        self.budget_bytes = budget_bytes
        self.queue_limit = queue_limit
        self.admitted_bytes = 0
        self._admitted: dict[int, Ticket] = {}
        self._waiting: deque[Ticket] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def admitted(self) -> int:
        return len(self._admitted)

    def never_fits(self, estimate_bytes: int) -> bool:
        return estimate_bytes > self.budget_bytes

    def reserve(self, request_id: str, estimate_bytes: int, what: str = "request") -> Ticket:
        """A place in the queue; raises at once if the request can never fit or the queue is full.

        Call `await ticket.wait()` next, and `ticket.release()` when the request's work is over.
        """
        if self.never_fits(estimate_bytes):
            raise ResourceExhausted(
                f"{what} needs an estimated {estimate_bytes} bytes ({mib(estimate_bytes)}) of "
                f"device memory, over the server's memory budget of {self.budget_bytes} bytes "
                f"({mib(self.budget_bytes)}; option --memory-budget-bytes / "
                "NTK_MEMORY_BUDGET_BYTES); use smaller blocks, fewer examples or a smaller model",
                value=estimate_bytes,
            )
        if len(self._waiting) >= self.queue_limit:
            raise QueueFull(
                f"admission queue is full ({len(self._waiting)} requests waiting for memory, "
                f"limit queue_limit={self.queue_limit}); retry later"
            )
        ticket = Ticket(self, request_id, estimate_bytes)
        self._waiting.append(ticket)
        self._admit_waiting()
        if not ticket.admitted:
            log.debug(
                "request queued request_id=%s estimate=%d admitted_bytes=%d waiting=%d",
                request_id,
                estimate_bytes,
                self.admitted_bytes,
                len(self._waiting),
            )
        return ticket

    def _admit_waiting(self) -> None:
        while self._waiting:
            head = self._waiting[0]
            if self.admitted_bytes + head.estimate_bytes > self.budget_bytes:
                return
            self._waiting.popleft()
            head.admitted = True
            self._admitted[id(head)] = head
            self.admitted_bytes += head.estimate_bytes
            head._event.set()

    def _release(self, ticket: Ticket) -> None:
        if self._admitted.pop(id(ticket), None) is not None:
            self.admitted_bytes -= ticket.estimate_bytes
        else:
            try:
                self._waiting.remove(ticket)
            except ValueError:
                pass
        self._admit_waiting()
