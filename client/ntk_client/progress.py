"""A one-line progress bar on stderr for long kernels: blocks and entries done, rate, time left.

Shown only on a terminal; silent when stderr is redirected or when the caller asks for quiet.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24
REDRAW_INTERVAL_S = 0.2

# (blocks_done, blocks_total, entries_done, entries_total)
ProgressCallback = Callable[[int, int, int, int], None]


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressBar:
    """Call with (blocks_done, blocks_total, entries_done, entries_total); `close()` at the end.

    Entries count kernel entries placed so far (mirrored blocks count twice), out of the size
    of the assembled kernel.
    """

    def __init__(self, label: str = "kernel", stream: TextIO | None = None):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False
        self._base: tuple[float, int] | None = None  # (time, entries) when counting started

    def __call__(self, blocks: int, blocks_total: int, entries: int, entries_total: int) -> None:
        now = time.monotonic()
        if self._base is None:
            self._base = (now, entries)
        done = blocks >= blocks_total
        if not done and now - self._last_draw < REDRAW_INTERVAL_S:
            return
        self._last_draw = now
        fraction = blocks / blocks_total if blocks_total else 1.0
        filled = int(BAR_WIDTH * fraction)
        elapsed = now - self._base[0]
        rate = (entries - self._base[1]) / elapsed if elapsed > 0 else 0.0
        left = (entries_total - entries) / rate if rate > 0 else float("nan")
        eta = _duration(left) if left == left else "?"
        line = (
            f"\r{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            f"{blocks}/{blocks_total} blocks  {_count(entries)}/{_count(entries_total)} entries  "
            f"{_count(rate)} entries/s  "
            + (f"done in {_duration(now - self._start)}" if done else f"{eta} left")
        )
        self.stream.write(line.ljust(100))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def progress_for(
    progress: bool | ProgressCallback | None, label: str = "kernel"
) -> ProgressCallback | None:
    """None: a bar when stderr is a terminal; True: always a bar; False: none; else the callable."""
    if callable(progress):
        return progress
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        progress = bool(isatty and isatty())
    return ProgressBar(label) if progress else None
