"""A small progress bar for long evaluations: count, percent, rate and ETA on one line of stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 24
LOG_INTERVAL_S = 30.0  # when stderr is a file, not a terminal: one line per interval, not one per batch


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(label: str, done: int, total: int, failed: int, rate: float | None) -> str:
    """`label  34/120 [#######.................]  28%  2.10 rec/s  ETA 0:00:41  3 failed`."""
    fraction = done / total if total else 1.0
    filled = int(BAR_WIDTH * fraction)
    parts = [f"{label} {done}/{total} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {100 * fraction:3.0f}%"]
    if rate:
        parts.append(f"{rate:.2f} rec/s  ETA {format_duration((total - done) / rate)}")
    if failed:
        parts.append(f"{failed} failed")
    return "  ".join(parts)


class Progress:
    """Progress of `total` records of which `done` were finished by an earlier run.

    The rate counts this run's records only, and from the end of the first batch on, because the first
    batch includes compilation.
    """

    def __init__(self, label: str, total: int, done: int = 0, stream: TextIO | None = None):
        self.label, self.total, self.done, self.failed = label, total, done, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.first: tuple[float, int] | None = None
        self.last_print = -float("inf")

    def rate(self, now: float) -> float | None:
        if self.first is None or now <= self.first[0] or self.done == self.first[1]:
            return None
        return (self.done - self.first[1]) / (now - self.first[0])

    def update(self, finished: int, failed: int) -> None:
        now = time.perf_counter()
        self.done += finished
        self.failed += failed
        if self.first is None:
            self.first = (now, self.done)
        if self.tty or now - self.last_print >= LOG_INTERVAL_S or self.done >= self.total:
            self.last_print = now
            line = progress_line(self.label, self.done, self.total, self.failed, self.rate(now))
            self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
