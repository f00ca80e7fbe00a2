"""Benchmark readers: the records of docs/method.md (Data) (JSON list or JSONL) and the official TextVQA json.

Every malformed record is reported at once, each with where it is (`record [3]` of a list, `line 4` of a
JSONL file), the field and what was expected, so a dataset can be fixed in one pass. Bytes that are not
UTF-8 are decoded as U+FFFD with a warning: the record goes on rather than failing a whole benchmark.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

from vicrop_jax.evaluation.metrics import question_options

FORMATS = ("auto", "records", "textvqa")
MAX_LISTED_PROBLEMS = 20


class DatasetError(ValueError):
    """A dataset file that cannot be read, with every problem found."""


@dataclasses.dataclass(frozen=True)
class Record:
    id: str | int
    question: str
    labels: tuple[str, ...]
    image_path: str  # relative to the image folder
    short_question: str | None = None  # V*-style: used for the map only
    bbox: tuple[float, float, float, float] | None = None  # ground truth (x1, y1, x2, y2)
    bboxes: tuple[tuple[float, float, float, float], ...] | None = None  # every box the answer needs (method gt)
    options: tuple[str, ...] | None = None  # multiple choice
    dataset: str | None = None
    target: str | None = None  # the object the zoom strategies look for (default: taken from the question)


class _FieldError(Exception):
    def __init__(self, field: str, expected: str, value: Any):
        super().__init__(f"field {field!r}: expected {expected}, got {_shown(value)}")


def _shown(value: Any) -> str:
    text = "nothing (missing)" if value is _MISSING else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


_MISSING = object()


def _get(raw: dict, field: str, expected: str, check, optional: bool = False) -> Any:
    value = raw.get(field, _MISSING)
    if optional and value in (_MISSING, None):
        return None
    if value is _MISSING or not check(value):
        raise _FieldError(field, expected, value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_label(value: Any) -> bool:
    return isinstance(value, str) or _is_number(value)


def _is_labels(value: Any) -> bool:
    return _is_label(value) or (isinstance(value, list) and bool(value) and all(map(_is_label, value)))


def _is_bbox(value: Any) -> bool:
    """Four finite numbers, x1 < x2 and y1 < y2, not wholly left of or above the image (it is clipped to the
    image once the image's size is known)."""
    return (isinstance(value, list) and len(value) == 4 and all(map(_is_number, value))
            and all(map(math.isfinite, value)) and value[0] < value[2] and value[1] < value[3]
            and value[2] > 0 and value[3] > 0)


def _is_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _as_labels(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in (value if isinstance(value, list) else [value]))


def parse_record(raw: Any, dataset: str | None = None) -> Record:
    """One record of docs/method.md (Data); raises _FieldError naming the first bad field."""
    if not isinstance(raw, dict):
        raise _FieldError("(record)", "a JSON object", raw)
    is_str = lambda v: isinstance(v, str)
    options = _get(raw, "options", "a list of at least 2 strings",
                   lambda v: isinstance(v, list) and len(v) >= 2 and all(map(is_str, v)), optional=True)
    box_rule = "[x1, y1, x2, y2] finite numbers with x1 < x2, y1 < y2, x2 > 0 and y2 > 0"
    bbox = _get(raw, "bbox", box_rule, _is_bbox, optional=True)
    bboxes = _get(raw, "bboxes", f"a non-empty list of boxes, each {box_rule}",
                  lambda v: isinstance(v, list) and bool(v) and all(map(_is_bbox, v)), optional=True)
    return Record(
        id=_get(raw, "id", "a string or an integer", _is_id),
        question=_get(raw, "question", "a string", is_str),
        labels=_as_labels(_get(raw, "labels", "a string or a non-empty list of strings", _is_labels)),
        image_path=_get(raw, "image_path", "a non-empty string (relative to the image folder)",
                        lambda v: is_str(v) and bool(v)),
        short_question=_get(raw, "short_question", "a string", is_str, optional=True),
        bbox=None if bbox is None else tuple(float(v) for v in bbox),
        bboxes=None if bboxes is None else tuple(tuple(float(v) for v in box) for box in bboxes),
        options=None if options is None else tuple(options),
        dataset=_get(raw, "dataset", "a string", is_str, optional=True) or dataset,
        target=_get(raw, "target", "a string", is_str, optional=True),
    )


def parse_textvqa_record(raw: Any, dataset: str | None = None) -> Record:
    """One entry of the official TextVQA json's `data` list; the image is `{image_id}.jpg`."""
    if not isinstance(raw, dict):
        raise _FieldError("(record)", "a JSON object", raw)
    is_str = lambda v: isinstance(v, str)
    image_id = _get(raw, "image_id", "a non-empty string", lambda v: is_str(v) and bool(v))
    return Record(
        id=_get(raw, "question_id", "a string or an integer", _is_id),
        question=_get(raw, "question", "a string", is_str),
        labels=_as_labels(_get(raw, "answers", "a non-empty list of strings", _is_labels)),
        image_path=f"{image_id}.jpg",
        dataset=dataset,
    )


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)) or (
            raw[:64].count(0) > 8):
        raise DatasetError(f"{path} is UTF-16 or UTF-32 text; expected UTF-8: save it as UTF-8 (e.g. "
                           f"`iconv -f UTF-16 -t UTF-8 {path.name}`)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        warnings.warn(f"{path}: bytes that are not UTF-8 (first at byte {error.start}) are read as U+FFFD",
                      stacklevel=3)
        return raw.decode("utf-8-sig", errors="replace")


def _jsonl(text: str, path: Path) -> list[tuple[str, Any]]:
    """(location, value) of each non-blank line."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                entries.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DatasetError(
                    f"{path}: line {number} is not valid JSON ({error.msg}, column {error.colno}); expected a "
                    "JSON list of records, one JSON record per line, or the TextVQA json"
                ) from None
    return entries


def _entries(text: str, path: Path, dataset_format: str) -> tuple[str, list[tuple[str, Any]], str | None]:
    """(format, [(location, raw record)], dataset name found in the file)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if dataset_format == "textvqa":
            raise DatasetError(f"{path}: not valid JSON ({error.msg}, line {error.lineno} column {error.colno})")
        return "records", _jsonl(text, path), None
    if isinstance(document, dict) and "data" in document:
        if dataset_format == "records":
            raise DatasetError(f"{path} is a TextVQA-style json (an object with 'data'); use --dataset-format "
                               "textvqa or auto")
        if not isinstance(document["data"], list):
            raise DatasetError(f"{path}: 'data' must be a list of questions, got {_shown(document['data'])}")
        name = document.get("dataset_name")
        return "textvqa", [(f"data[{i}]", raw) for i, raw in enumerate(document["data"])], (
            name if isinstance(name, str) else None)
    if dataset_format == "textvqa":
        raise DatasetError(f"{path}: expected the TextVQA json (an object with a 'data' list)")
    if isinstance(document, list):
        return "records", [(f"record [{i}]", raw) for i, raw in enumerate(document)], None
    return "records", [("line 1", document)], None


def _where(location: str, raw: Any) -> str:
    if isinstance(raw, dict) and _is_id(raw.get("id", raw.get("question_id"))):
        return f"{location} (id {raw.get('id', raw.get('question_id'))!r})"
    return location


def read_dataset(path: str | Path, dataset_format: str = "auto", dataset: str | None = None) -> list[Record]:
    """Records of a benchmark file, in file order. `dataset` names it where the records do not."""
    if dataset_format not in FORMATS:
        raise ValueError(f"unknown dataset format {dataset_format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} not found")
    kind, entries, name = _entries(_decode(path), path, dataset_format)
    parse = parse_textvqa_record if kind == "textvqa" else parse_record
    records, problems, seen = [], [], {}
    for location, raw in entries:
        try:
            record = parse(raw, dataset or name)
        except _FieldError as error:
            problems.append(f"{_where(location, raw)}: {error}")
            continue
        if str(record.id) in seen:
            problems.append(f"{_where(location, raw)}: id repeats that of {seen[str(record.id)]} (ids must be unique)")
        seen.setdefault(str(record.id), location)
        records.append(record)
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise DatasetError(f"{path}: {len(problems)} malformed record(s):\n  {listed}{more}")
    if not records:
        raise DatasetError(f"{path} holds no records")
    return records


def check_options(records: list[Record]) -> None:
    """Multiple choice needs each record's choices: an `options` field, or V*-style lines in the question."""
    missing = [r for r in records if len(record_options(r)) < 2]
    if missing:
        ids = ", ".join(repr(r.id) for r in missing[:MAX_LISTED_PROBLEMS])
        raise DatasetError(
            f"metric 'mc' needs at least 2 choices per record, from an 'options' list or from the lines between "
            f"the question's first and last line; {len(missing)} record(s) have none: {ids}"
        )


def record_options(record: Record) -> tuple[str, ...]:
    return record.options or question_options(record.question)
