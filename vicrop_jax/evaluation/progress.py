"""The evaluation's progress bar: tqdm's, which is a widget in a notebook and a live line in a terminal; in a log
without a terminal it writes one plain line per LOG_INTERVAL_S, so the log stays readable line by line."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


class LogLines:
    """What tqdm writes, as whole lines: a log file keeps its carriage returns, and with them every refresh on
    one endless line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip(" ")
        if text.strip():
            self.stream.write(text if text.endswith("\n") else text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(label: str, total: int, done: int = 0, stream: TextIO | None = None) -> tqdm:
    """A bar over `total` records of which `done` were finished by an earlier run (a resumed eval)."""
    stream = stream or sys.stderr
    terminal = stream.isatty()
    return tqdm(total=total, initial=done, desc=label, unit="rec", file=stream if terminal else LogLines(stream),
                mininterval=0.1 if terminal else LOG_INTERVAL_S, dynamic_ncols=terminal, ascii=not terminal)
