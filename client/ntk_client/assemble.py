"""Assemble a streamed kernel into an array, resuming broken streams from the blocks held.

A stream that breaks (server restarted, connection dropped, a retryable refusal) is asked for
again with only the missing block indices, the block shape pinned to the first header's and the
method pinned to the one the server resolved, so the block grid and every block's sum order are
those of an unbroken run and the result is identical bit for bit. Retries are bounded and back
off exponentially (RetryPolicy).

The output may be a numpy memmap (a path or an array given by the caller): blocks are written
as they arrive, so client memory stays at a few blocks whatever the kernel's size.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from ntk_client.grid import grid_indices

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
# Spread the retries of many clients that lost the same server over this share of the backoff.
BACKOFF_JITTER = 0.2


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff.

    max_attempts counts the first try; the n-th retry waits
    min(max_backoff_s, initial_backoff_s * multiplier ** (n - 1)), less up to 20% jitter.
    """

    max_attempts: int = 6
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    multiplier: float = 2.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError(f"backoffs must be >= 0 and multiplier >= 1, got {self}")

    def backoff_s(self, retry: int) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return base * (1 - BACKOFF_JITTER * random.random())


NO_RETRY = RetryPolicy(max_attempts=1)


def _same_grid(first, again) -> bool:
    keys = ("n1", "n2", "output_size", "layout", "method", "dtype", "symmetric", "batch_diagonal")
    keys += ("block_rows", "block_cols", "grid_rows", "grid_cols")
    return all(getattr(first, k) == getattr(again, k) for k in keys)


class _Output:
    """Where blocks go: a caller's array, a fresh array, or an .npy memmap at a path.

    A path is written under PATH.partial and renamed into place when complete, so the path
    never holds a half-written kernel.
    """

    def __init__(self, out, header, dtype: str):
        self.path: Path | None = None
        shape = tuple(header.shape)
        if out is None:
            self.array = np.empty(shape, dtype=dtype)
        elif isinstance(out, (str, os.PathLike)):
            self.path = Path(out)
            self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
            self.array = np.lib.format.open_memmap(
                self.partial, mode="w+", dtype=np.dtype(dtype), shape=shape
            )
        else:
            if tuple(out.shape) != shape:
                raise ValueError(f"out has shape {tuple(out.shape)}, the kernel has shape {shape}")
            self.array = out

    def finish(self) -> np.ndarray:
        if isinstance(self.array, np.memmap):
            self.array.flush()
        if self.path is None:
            return self.array
        del self.array
        os.replace(self.partial, self.path)
        return np.load(self.path, mmap_mode="r+")

    def discard(self) -> None:
        if self.path is not None:
            self.array = None
            self.partial.unlink(missing_ok=True)


def assemble(
    open_stream: Callable,
    place: Callable,
    out=None,
    *,
    dtype: str,
    retry: RetryPolicy,
    progress: Callable | None = None,
    timeout: float | None = None,
) -> np.ndarray:
    """Run a kernel stream to completion into `out`, resuming it when it breaks.

    open_stream(block_indices, header, timeout) opens a stream; `header` is None on the first
    try, else the first header, whose block shape and method the new request must pin.
    place(array, block, values, batch_diagonal) writes a block.
    """
    from ntk_client.client import NTKError  # the client module imports this one

    deadline = None if timeout is None else time.monotonic() + timeout
    header = output = None
    expected: set[int] = set()
    have: set[int] = set()
    entries = 0
    attempt = 1
    try:
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            missing: Sequence[int] = sorted(expected - have) if header is not None else ()
            try:
                stream = open_stream(missing, header, remaining)
                if header is None:
                    header = stream.header
                    expected = set(grid_indices(header))
                    output = _Output(out, header, dtype)
                elif not _same_grid(header, stream.header):
                    stream.cancel()
                    raise NTKError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"the resumed stream has a different block grid ({stream.header}) than "
                        f"the first ({header}); the server's limits changed, start again",
                    )
                total_entries = math.prod(header.shape)
                for block in stream:
                    place(output.array, block, block.values, header.batch_diagonal)
                    have.add(block.index)
                    entries += block.values.size * (2 if block.mirror else 1)
                    if progress is not None:
                        progress(len(have), len(expected), entries, total_entries)
                if have >= expected:
                    return output.finish()
                raise NTKError(
                    grpc.StatusCode.DATA_LOSS,
                    f"the stream ended after {len(have)} of {len(expected)} blocks",
                    retryable=True,
                )
            except NTKError as err:
                out_of_time = deadline is not None and time.monotonic() >= deadline
                if not err.retryable or attempt >= retry.max_attempts or out_of_time:
                    raise
                delay = retry.backoff_s(attempt)
                if deadline is not None:
                    delay = min(delay, max(0.0, deadline - time.monotonic()))
                log.info(
                    "kernel stream broke (%s) with %d of %d blocks held; resuming the %d missing "
                    "in %.2f s (attempt %d of %d)",
                    err,
                    len(have),
                    len(expected) if header is not None else 0,
                    len(expected - have) if header is not None else 0,
                    delay,
                    attempt + 1,
                    retry.max_attempts,
                )
                time.sleep(delay)
                attempt += 1
    except BaseException:
        if output is not None:
            output.discard()
        raise
