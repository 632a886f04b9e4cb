"""Progress lines for long steps: done/total, rate and ETA, at a steady pace.

``Progress`` logs at most one line every ``every_s`` seconds (and at the end), e.g.::

    tiles 12,400/48,000 (26%), 930 tiles/s, ETA 38 s

It is cheap to call per item: ``advance`` only reads a monotonic clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("medprep.common.progress")


def format_duration(seconds: float) -> str:
    """``38 s``, ``4 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_line(unit: str, done: int, total: int | None, elapsed_s: float) -> str:
    """One progress line; ``total=None`` when the total is not known."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    rate_text = f"{rate:,.1f}" if rate < 10 else f"{rate:,.0f}"
    if not total:
        return f"{unit} {done:,}, {rate_text} {unit}/s"
    percent = 100.0 * done / total
    line = f"{unit} {done:,}/{total:,} ({percent:.0f}%), {rate_text} {unit}/s"
    if done < total and rate > 0:
        line += f", ETA {format_duration((total - done) / rate)}"
    return line


class Progress:
    """Counts work done and logs a progress line every ``every_s`` seconds.

    Parameters
    ----------
    unit : what is counted, plural ("tiles", "slices", "MB").
    total : how many there are, or None when unknown.
    every_s : seconds between two lines.
    emit : where lines go (default: the ``medprep.common.progress`` logger at INFO).
    clock : a monotonic clock in seconds (for tests).
    """

    def __init__(
        self,
        unit: str,
        total: int | None,
        *,
        every_s: float = 5.0,
        emit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.unit = unit
        self.total = total
        self.every_s = every_s
        self.done = 0
        self._emit = emit or log.info
        self._clock = clock
        self._start = clock()
        self._last = self._start

    def advance(self, n: int = 1) -> None:
        """Add ``n`` items; log a line when ``every_s`` has passed since the last one."""
        self.done += n
        now = self._clock()
        if now - self._last >= self.every_s:
            self._last = now
            self._emit(progress_line(self.unit, self.done, self.total, now - self._start))

    def finish(self) -> str:
        """Log and return the closing line (always written)."""
        line = progress_line(self.unit, self.done, self.total, self._clock() - self._start)
        self._emit(line)
        return line
