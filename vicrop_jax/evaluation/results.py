"""Result files: JSONL, one line per record, appended batch by batch and fsync'd, so a killed run leaves
complete lines plus at most one partial last line, which `read_results` detects."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from pathlib import Path
from typing import IO, Iterable, Iterator

_PROCESS_SUFFIX = re.compile(r"\.process\d+-of-\d+$")


def process_path(out: str | Path, index: int, count: int) -> Path:
    """results.jsonl -> results.process{index}-of-{count}.jsonl when several processes share a run."""
    out = Path(out)
    return out if count == 1 else out.with_name(f"{out.stem}.process{index}-of-{count}{out.suffix}")


def process_files(out: str | Path) -> list[Path]:
    """The per-process files that `process_path` makes of `out`, in name order."""
    out = Path(out)
    return sorted(out.parent.glob(f"{out.stem}.process*-of-*{out.suffix}"))


def base_name(path: str | Path) -> str:
    """The file name without suffix and without a per-process part: what a dataset is called by default."""
    return _PROCESS_SUFFIX.sub("", Path(path).stem)


def _parse_lines(data: bytes, path: Path) -> tuple[list[dict], int]:
    """Parsed lines and the byte offset where the intact part ends (one past the data when its last line
    lacks a newline). Only the last non-blank line may be bad: that is a write cut short by a killed run."""
    chunks = data.split(b"\n")
    filled = [i for i, chunk in enumerate(chunks) if chunk.strip()]
    lines, end = [], 0
    for i, chunk in enumerate(chunks):
        if chunk.strip():
            try:
                lines.append(json.loads(chunk))
            except (json.JSONDecodeError, UnicodeDecodeError):
                if i == filled[-1]:
                    return lines, end
                raise ValueError(f"{path}: line {i + 1} is not valid JSON, and it is not the last line, so it "
                                 "is not a write cut short by a killed run; fix or remove the file") from None
        end += len(chunk) + 1
    return lines, end if chunks[-1].strip() else len(data)


def read_results(path: str | Path, repair: bool = False) -> list[dict]:
    """The intact result lines of a file. A partial last line (a run killed mid-write) is ignored, and with
    `repair` cut off the file (or a missing final newline added) so that appending starts a clean line."""
    path = Path(path)
    data = path.read_bytes()
    lines, end = _parse_lines(data, path)
    if repair and end != len(data):
        with open(path, "r+b") as handle:
            if end < len(data):
                handle.truncate(end)
            else:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            os.fsync(handle.fileno())
    return lines


@contextlib.contextmanager
def exclusive_writer(path: Path) -> Iterator[IO[str]]:
    """The results file opened for appending, with an exclusive lock that a second writer is refused."""
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder: pass the path of a results file (e.g. {path / 'results.jsonl'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(path, "a", encoding="utf-8")
    except PermissionError:
        raise ValueError(f"cannot write {path}: permission denied; pass another --out") from None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another process is writing {path}: wait for it to finish (a rerun then resumes) "
                             "or pass another --out") from None
        yield handle


def append_results(handle: IO[str], lines: Iterable[dict]) -> None:
    """Write lines in one go, then flush and fsync: after a crash each line is either whole or last. Numbers
    that JSON cannot hold (NaN, infinity) are refused before anything is written."""
    handle.write("".join(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n" for line in lines))
    handle.flush()
    os.fsync(handle.fileno())
