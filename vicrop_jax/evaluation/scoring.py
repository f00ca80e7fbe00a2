"""`vicrop-jax score`: result files -> the paper's tables (rows = methods, columns = datasets).

The per-record scores written by `eval` are averaged; nothing is re-scored. Files are merged (the
per-process files of a multi-host run, several methods, datasets and models) and lines deduplicated by
(model, dataset, method, id), the first kept. The "no crop" row is the original-image accuracy, over
each model's records of a dataset (deduplicated by id across methods); each method's row is its
accuracy with the crop. Failed records are left out and counted in a note. Where records carry a
ground-truth box, a table per dataset splits accuracy by relative box size: the paper's bands and terciles.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence, TextIO

from vicrop_jax.evaluation.metrics import SIZE_BANDS, TERCILES, size_band, tercile, tercile_edges
from vicrop_jax.evaluation.results import base_name, process_files, read_results
from vicrop_jax.vicrop.methods import STRATEGY_NAMES

FORMATS = ("text", "markdown", "csv")
NO_CROP = "no crop"
RESULT_FIELDS = ("id", "model", "method", "original_correct", "crop_correct")
METHOD_ORDER = (NO_CROP, *STRATEGY_NAMES)


@dataclasses.dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Each path, or, for the `--out` name of a multi-process run, its per-process files."""
    expanded = []
    for path in map(Path, paths):
        found = [path] if path.exists() else process_files(path)
        if not found:
            raise FileNotFoundError(f"{path} not found (nor per-process files {path.stem}.process*-of-*{path.suffix})")
        expanded += found
    return expanded


def load_lines(paths: Sequence[Path]) -> tuple[list[dict], int]:
    """Lines of all files, deduplicated by (model, dataset, method, id), each with its dataset named (from
    the line, else its file name); and the number of duplicates dropped."""
    lines, seen, dropped = [], set(), 0
    for path in paths:
        for number, line in enumerate(read_results(path), 1):
            problem = _line_problem(line)
            if problem:
                raise ValueError(f"{path} line {number} is not an eval result: {problem}")
            line = {**line, "dataset": line.get("dataset") or base_name(path), "model": model_identity(line)}
            key = (line["model"], line["dataset"], line["method"], str(line["id"]))
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
            lines.append(line)
    return lines, dropped


def _line_problem(line: dict) -> str | None:
    missing = [field for field in RESULT_FIELDS if field not in line]
    if missing:
        return f"it has no {', '.join(missing)}"
    number = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
    wrong = [f"{field} {line[field]!r}" for field, ok in (
        ("id", isinstance(line["id"], (str, int))), ("model", isinstance(line["model"], str)),
        ("method", isinstance(line["method"], str)), ("original_correct", number(line["original_correct"])),
        ("crop_correct", number(line["crop_correct"])),
        ("dataset", isinstance(line.get("dataset", ""), (str, type(None))))) if not ok]
    return f"wrongly typed {', '.join(wrong)}" if wrong else None


def model_identity(line: dict) -> str:
    """The model as its run recorded it: the path or repo id, and the checkpoint's hash where recorded, so that
    two checkpoints of one name are not blended."""
    model_id = (line.get("run") or {}).get("model_id")
    return f"{line['model']}#{model_id}" if model_id else line["model"]


def short_names(models: Sequence[str]) -> dict[str, str]:
    """Each model's shortest trailing part of its path that no other model shares, for the tables."""
    names = {}
    for model in models:
        path, _, model_id = model.partition("#")
        parts = path.rstrip("/").split("/")
        for count in range(1, len(parts) + 1):
            name = "/".join(parts[-count:])
            if all(other == model or not other.partition("#")[0].rstrip("/").endswith(name) for other in models):
                break
        same_path = [other for other in models if other.partition("#")[0] == path]
        names[model] = name + (f" ({model_id[:8]})" if len(same_path) > 1 and model_id else "")
    return names


def _row_key(model: str, method: str) -> tuple:
    """Rows by model, then the methods' order, a method's options (`rel_att regions=2`) after it."""
    name = method if method == NO_CROP else method.split(" ")[0]
    order = METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER)
    return model, order, method


def scored_rows(lines: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """(model, method, dataset) -> [{"id", "correct", "area_fraction"}]: crop scores of each method, and
    original scores as the method "no crop" (first line per model, dataset and id)."""
    cells: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    originals = set()
    for line in lines:
        if line.get("error") is not None:
            continue
        model, dataset = line["model"], line["dataset"]
        entry = {"id": str(line["id"]), "area_fraction": line.get("area_fraction")}
        cells[model, line["method"], dataset].append({**entry, "correct": line["crop_correct"]})
        if (model, dataset, entry["id"]) not in originals:
            originals.add((model, dataset, entry["id"]))
            cells[model, NO_CROP, dataset].append({**entry, "correct": line["original_correct"]})
    return cells


def _percent(entries: list[dict]) -> str:
    return f"{100 * sum(e['correct'] for e in entries) / len(entries):.2f}" if entries else "-"


def _rows(cells) -> list[tuple[str, str]]:
    return sorted({(model, method) for model, method, _ in cells}, key=lambda row: _row_key(*row))


def accuracy_table(cells, datasets: list[str], names: dict[str, str], metrics: dict[str, str]) -> Table:
    rows = [[names[model], method] + [_percent(cells.get((model, method, d), [])) for d in datasets]
            for model, method in _rows(cells)]
    headers = [f"{d} ({metrics[d]})" if metrics[d] else d for d in datasets]
    return Table("accuracy (%)", ["model", "method"] + headers, rows)


def size_table(cells, dataset: str, model_names: dict[str, str], metric: str) -> Table | None:
    """Accuracy per size band and tercile of one dataset, or None when its records carry no boxes."""
    fractions = {e["id"]: e["area_fraction"] for (_, _, d), entries in cells.items() if d == dataset
                 for e in entries if e["area_fraction"] is not None}
    if not fractions:
        return None
    edges = tercile_edges(list(fractions.values()))
    parts = {i: (size_band(f), tercile(f, edges)) for i, f in fractions.items()}
    counts = Counter(part for pair in parts.values() for part in pair)
    names = [name for name, _ in SIZE_BANDS] + list(TERCILES)
    bounds = dict(zip(TERCILES, (f"<{edges[0]:.3g}", f"{edges[0]:.3g}-{edges[1]:.3g}", f">={edges[1]:.3g}")))
    headers = [f"{name} {bounds[name]} (n={counts[name]})" if name in bounds else f"{name} (n={counts[name]})"
               for name in names]
    rows = []
    for model, method in _rows(cells):
        entries = [e for e in cells.get((model, method, dataset), []) if e["id"] in parts]
        if entries:
            cells_of = lambda name: _percent([e for e in entries if name in parts[e["id"]]])
            rows.append([model_names[model], method] + [cells_of(name) for name in names])
    title = f"{dataset}: accuracy (%{', ' + metric if metric else ''}) by ground-truth box area / image area "
    title += "(paper bands: small < 0.005 <= medium < 0.05 <= large; terciles)"
    return Table(title, ["model", "method"] + headers, rows)


def notes(lines: list[dict], cells, dropped: int, names: dict[str, str]) -> list[str]:
    """What the tables leave out: failed records, incomplete cells, duplicates."""
    found = []
    failed = Counter((names[line["model"]], line["method"], line["dataset"])
                     for line in lines if line.get("error") is not None)
    found += [f"{n} failed record(s) left out: {' '.join(key)}" for key, n in sorted(failed.items())]
    most = Counter()
    for (model, _, dataset), entries in cells.items():
        most[model, dataset] = max(most[model, dataset], len(entries))
    found += [f"{names[model]} {method} {dataset} covers {len(entries)} of {most[model, dataset]} records"
              for (model, method, dataset), entries in sorted(cells.items()) if len(entries) < most[model, dataset]]
    if dropped:
        found.append(f"{dropped} duplicate line(s) dropped")
    return found


def render(table: Table, fmt: str) -> str:
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([table.headers] + table.rows)
        return buffer.getvalue()
    if fmt == "markdown":
        lines = [f"**{table.title}**", "", "| " + " | ".join(table.headers) + " |",
                 "|" + "|".join(" --- " for _ in table.headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table.rows]) + "\n"
    widths = [max(len(row[i]) for row in [table.headers] + table.rows) for i in range(len(table.headers))]
    line = lambda row: "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
    return "\n".join([table.title, line(table.headers), line(["-" * w for w in widths])]
                     + [line(row) for row in table.rows]) + "\n"


def score(paths: Sequence[str | Path], fmt: str = "text", stdout: TextIO | None = None,
          stderr: TextIO | None = None) -> int:
    """Print the accuracy table, then the size tables; notes follow (on stderr for csv)."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    lines, dropped = load_lines(expand_paths(paths))
    if not lines:
        raise ValueError(f"no result lines in {', '.join(map(str, paths))}")
    cells = scored_rows(lines)
    datasets = list(dict.fromkeys(line["dataset"] for line in lines))
    names = short_names(list(dict.fromkeys(line["model"] for line in lines)))
    metrics = {d: "/".join(sorted({line["metric"] for line in lines if line["dataset"] == d and line.get("metric")}))
               for d in datasets}
    tables = [accuracy_table(cells, datasets, names, metrics)]
    tables += [t for t in (size_table(cells, d, names, metrics[d]) for d in datasets) if t]
    print("\n".join(render(table, fmt) for table in tables), end="", file=stdout)
    remarks = [f"note: {note}" for note in notes(lines, cells, dropped, names)]
    if remarks:
        print("\n".join(remarks), file=stderr if fmt == "csv" else stdout)
    return 0
