"""`vicrop-jax eval`: one benchmark, one model, one method -> a JSONL file of per-record results.

    vicrop-jax eval --data textvqa_val.json --images train_images/ --model llava-hf/llava-1.5-7b-hf \\
        --method rel_att --batch-size 16 --out results/llava-textvqa-rel_att.jsonl

Batched: map methods run `answer_batch`'s vmapped program (`_pipeline.pipeline_batch`), one compile per
image-size and prompt-length bucket; baselines and `--high-res` go record by record (`answer`).

Resumable: a result line is appended per record, and each batch is flushed and fsync'd. Rerunning the
same command skips the ids already in the file (failed ones included: delete their lines to retry), and
a partial last line left by a killed run is cut off first, so a kill loses at most the batch in flight
and never duplicates a record. Every line records the settings that shape its result (`run`: method, model
and checkpoint hash, metric, data, dtype, map options, ...): a resume with other settings is refused, and so
is a second process writing the same file while the first holds its lock.

Failures stay per record: an empty or too long question, a missing or unreadable image, an image path that
leaves the image folder or a box outside the image is found on the host before batching and gets an `error`;
if a batch still raises, its records are retried one by one, so only the bad one gets the error. Exit status:
0 all answered, 1 some records failed, 2 bad usage or input (also an unwritable --out or a full disk).

Several GPUs on one host: nothing to do. With N local devices, the batch is rounded up to a multiple of
N and every batch array is placed with `NamedSharding(Mesh(local devices, ("data",)), P("data"))`, the
parameters replicated: each device runs the same program on its slice of the batch.

Several hosts (or several processes on one host, e.g. one per GPU via CUDA_VISIBLE_DEVICES): each process
takes the records i with i % count == index and writes `<out stem>.process{index}-of-{count}.jsonl`; the
processes never talk to each other, so a slow or failed one can be rerun (resumed) on its own.

    # explicit, e.g. two hosts:
    host0$ vicrop-jax eval ... --out r.jsonl --process-index 0 --process-count 2
    host1$ vicrop-jax eval ... --out r.jsonl --process-index 1 --process-count 2
    # or from the cluster environment (SLURM, Open MPI, TPU pods) through jax.distributed.initialize():
    $ srun --nodes 4 --ntasks-per-node 1 vicrop-jax eval ... --out r.jsonl --distributed
    # then, anywhere the files are visible:
    $ vicrop-jax score r.jsonl        # finds and merges r.process*-of-*.jsonl

The device mesh spans the local devices only (`jax.local_devices()`, not `jax.devices()`): a mesh over
all hosts' devices would make every process run every batch in lockstep, but processes hold different
records and finish their batches at different times.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
import PIL.Image
from jax.sharding import Mesh

import vicrop_jax
from vicrop_jax._loading import Model, checkpoint_identity
from vicrop_jax.vicrop.engine import Engine, padded_batch_size, question_problem
from vicrop_jax.vicrop.methods import (
    SECOND_REGION_MASS, Strategy, method_from_name, option_names, resolve_method,
    strategy_class, typed_options,
)
from vicrop_jax.evaluation.datasets import Record, check_options, read_dataset, record_options
from vicrop_jax.evaluation.metrics import METRIC_NAMES, area_fraction, score_answer
from vicrop_jax.evaluation.progress import progress_bar
from vicrop_jax.evaluation.results import append_results, exclusive_writer, process_path, read_results
from vicrop_jax.preprocessing import load_image
from vicrop_jax.vicrop.strategy import Record as StrategyRecord

MAX_LISTED_FAILURES = 10


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSettings:
    data: Path
    images: Path
    model: str
    out: Path
    method: str = "rel_att"
    metric: str = "auto"
    batch_size: int = 8
    dataset_format: str = "auto"
    dataset_name: str | None = None
    high_res: bool = False
    limit: int | None = None
    dtype: str = "auto"
    max_new_tokens: int = 20
    seed: int = 0
    layer: int | None = None
    qformer_layer: int = 2
    regions: int | str = 1
    second_region_mass: float = SECOND_REGION_MASS
    gate: float | None = None
    geometry: str = "paper"
    options: tuple[str, ...] = ()  # NAME=VALUE options of the method beyond the flags above (`--option`)
    process_index: int | None = None
    process_count: int | None = None
    distributed: bool = False
    allow_outside_images: bool = False

    def identity(self, metric: str, model_id: str) -> dict:
        """The settings that shape a run's results, all recorded in each line: a resume must match them."""
        return {
            "method": self.method, "model": self.model, "model_id": model_id, "metric": metric,
            "data": str(self.data.resolve()), "dataset_format": self.dataset_format, "dtype": self.dtype,
            "max_new_tokens": self.max_new_tokens, "seed": self.seed, "layer": self.layer,
            "qformer_layer": self.qformer_layer, "high_res": self.high_res, "regions": self.regions,
            "second_region_mass": self.second_region_mass, "gate": self.gate, "geometry": self.geometry,
            "options": sorted(self.options),
        }

    @property
    def method_label(self) -> str:
        """The method with the options that change what it does, as result files and score tables name it."""
        options = [f"{name}={getattr(self, name)}" for name, default in MAP_OPTION_DEFAULTS.items()
                   if getattr(self, name) != default]
        return " ".join([self.method, *options, *sorted(self.options)])


# Options of map methods that a run records; lines written before they existed had their defaults.
MAP_OPTION_DEFAULTS = {"regions": 1, "second_region_mass": SECOND_REGION_MASS, "gate": None, "geometry": "paper"}
RECORDED_DEFAULTS = {**MAP_OPTION_DEFAULTS, "options": []}


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A record checked on the host: its decoded image, or why it cannot run."""

    index: int  # position in the dataset (after --limit), which seeds the random baseline
    record: Record
    image: PIL.Image.Image | None = None
    error: str | None = None
    error_kind: str | None = None  # one of ERROR_KINDS


# The "error_kind" of a failed result line: what to fix. The summary counts failures by kind.
ERROR_KINDS = {
    "question": "the question or its record (too long, a needed field missing)",
    "image_missing": "the image file is not in the image folder",
    "image_outside": "the image path leaves the image folder",
    "image_unreadable": "the image file cannot be decoded",
    "bbox": "the ground-truth box lies outside the image",
    "model": "the model raised on this record",
}


Outcome = vicrop_jax.Answer | str  # an answer, or the error message of a record that raised


def process_slot(settings: EvalSettings) -> tuple[int, int]:
    """(index, count) of this process: given, or from JAX (after jax.distributed.initialize())."""
    if (settings.process_index is None) != (settings.process_count is None):
        raise ValueError("pass both --process-index and --process-count, or neither")
    if settings.distributed:
        jax.distributed.initialize()
    if settings.process_index is None:
        return jax.process_index(), jax.process_count()
    if not 0 <= settings.process_index < settings.process_count:
        raise ValueError(f"--process-index {settings.process_index} is not in 0..{settings.process_count - 1}")
    return settings.process_index, settings.process_count


def assigned_records(records: Sequence[Record], limit: int | None, index: int, count: int):
    """(dataset position, record) pairs of this process: the first `limit` records, every count-th."""
    kept = records if limit is None else records[:limit]
    return [(i, record) for i, record in enumerate(kept) if i % count == index]


def finished_ids(path: Path, identity: dict) -> set[str]:
    """Ids already in `path` (a partial last line is cut off first); refuses the file of a run whose settings
    differ in anything that shapes the results."""
    if not path.exists():
        return set()
    lines = read_results(path, repair=True)
    for number, line in enumerate(lines, 1):
        run = line.get("run")
        if "id" not in line or not isinstance(run, dict):
            raise ValueError(f"{path} line {number} is not a result line that records its run's settings (an "
                             "older vicrop-jax or another program wrote it); pass another --out")
        differing = [f"{key} {run.get(key, RECORDED_DEFAULTS.get(key))!r} there, {value!r} now"
                     for key, value in identity.items() if run.get(key, RECORDED_DEFAULTS.get(key)) != value]
        if differing:
            raise ValueError(f"{path} line {number} comes from a run with other settings ({'; '.join(differing)}); "
                             "resuming needs the same settings, or pass another --out")
    return {str(line["id"]) for line in lines}


def choose_metric(records: Sequence[Record]) -> str:
    """The metric the data calls for: VQA accuracy for lists of human answers (3 or more), POPE for yes/no
    labels, GQA-style containment for other single labels. Multiple choice is asked for with --metric mc."""
    if any(len(record.labels) >= 3 for record in records):
        return "vqa"
    if all(label.strip().lower() in ("yes", "no") for record in records for label in record.labels):
        return "pope"
    return "gqa"


def data_mesh(batch_size: int) -> tuple[Mesh | None, int]:
    """A 1-D mesh over the local devices and the batch size rounded up to a multiple of their count."""
    devices = jax.local_devices()
    if len(devices) == 1:
        return None, batch_size
    return Mesh(np.array(devices), ("data",)), padded_batch_size(batch_size, len(devices))


def image_file(settings: EvalSettings, record: Record) -> Path:
    """The record's image; a path that leaves the image folder (absolute, `..`, a link out) is refused unless
    allowed, so that a dataset file cannot make the run read any file on the machine."""
    path = settings.images / record.image_path
    if not settings.allow_outside_images and not path.resolve().is_relative_to(settings.images.resolve()):
        raise PermissionError(f"image path {record.image_path!r} leaves the image folder {settings.images} "
                              "(pass --allow-outside-images to read it)")
    return path


def clipped_bbox(bbox: tuple[float, ...] | None, image_size: tuple[int, int]) -> tuple[float, ...] | None:
    """A ground-truth box clipped to the image; ValueError when nothing of it is inside."""
    if bbox is None:
        return None
    width, height = image_size
    x1, y1, x2, y2 = bbox
    box = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    if box[0] >= box[2] or box[1] >= box[3]:
        raise ValueError(f"bbox {list(bbox)} lies outside the {width}x{height} image")
    return box


def prepare(model: Model, strategy: Strategy, settings: EvalSettings, index: int, record: Record) -> Prepared:
    """Host checks before batching, so that a bad record never reaches (and fails) a batch."""
    problem = question_problem(model, record.question, settings.max_new_tokens, record.short_question,
                               crops=strategy.most_crops)
    if problem is None and strategy.needs_box and record.bbox is None:
        problem = "method 'gt' needs the record's ground-truth 'bbox'"
    if problem is not None:
        return Prepared(index, record, error=problem, error_kind="question")
    try:
        path = image_file(settings, record)
        image = load_image(path)
    except PermissionError as error:
        return Prepared(index, record, error=str(error), error_kind="image_outside")
    except FileNotFoundError:
        return Prepared(index, record, error=f"image not found: {settings.images / record.image_path}",
                        error_kind="image_missing")
    except Exception as error:  # ValueError for unreadable files, DecompressionBombError, ...
        return Prepared(index, record, error=f"unreadable image: {error}", error_kind="image_unreadable")
    try:
        bboxes = None if record.bboxes is None else tuple(clipped_bbox(b, image.size) for b in record.bboxes)
        record = dataclasses.replace(record, bbox=clipped_bbox(record.bbox, image.size), bboxes=bboxes)
    except ValueError as error:
        return Prepared(index, record, error=str(error), error_kind="bbox")
    return Prepared(index, record, image=image)


def answer_or_error(answer_fn: Callable[[list[Prepared]], list[vicrop_jax.Answer]],
                    prepared: list[Prepared]) -> list[Outcome]:
    """The answers of a batch; if it raises, its records one by one, so only a bad record gets an error."""
    try:
        return list(answer_fn(prepared))
    except Exception as error:
        if len(prepared) == 1:
            return [f"{type(error).__name__}: {error}"]
        return [answer_or_error(answer_fn, [p])[0] for p in prepared]


def run_strategy(settings: EvalSettings) -> Strategy:
    """The run's method as a value, with the options of the command line: its flags (`--layer`, `--regions`, ...)
    where the method takes them, and `--option NAME=VALUE`. A flag set for a method that does not take it is
    refused, and so is an option given both ways."""
    names = option_names(strategy_class(settings.method))
    flags = {"layer": settings.layer, "qformer_layer": settings.qformer_layer,
             **{name: getattr(settings, name) for name in MAP_OPTION_DEFAULTS}}
    defaults = {field.name: field.default for field in dataclasses.fields(EvalSettings)}
    given = [f"--{name.replace('_', '-')} {value}" for name, value in flags.items()
             if value != defaults[name] and name not in names]
    if given:
        raise ValueError(f"{', '.join(given)}: method {settings.method!r} does not take this")
    pairs = [option.partition("=") for option in settings.options]
    malformed = [name for name, equals, _ in pairs if not equals or not name]
    if malformed:
        raise ValueError(f"--option takes NAME=VALUE, got {', '.join(repr(o) for o in settings.options)}")
    options = typed_options(strategy_class(settings.method), {name: value for name, _, value in pairs}, "--option")
    twice = sorted(name for name in options if name in flags)
    if twice:
        raise ValueError(f"--option {', '.join(twice)}: give {', '.join('--' + n.replace('_', '-') for n in twice)} "
                         "instead")
    return method_from_name(settings.method, **{k: v for k, v in flags.items() if k in names}, **options)


def batch_answer_fn(model: Model, strategy: Strategy, settings: EvalSettings, mesh: Mesh | None):
    """The strategy's answers of a batch (map methods: one vmapped program, sharded over `mesh`, one compile per
    bucket and batch size), each record seeded by its dataset position."""
    strategy = resolve_method(model, strategy)
    engine = Engine(model, settings.max_new_tokens, settings.high_res, mesh=mesh)
    return lambda prepared: strategy.run(engine, [
        StrategyRecord(p.image, p.record.question, p.record.short_question or p.record.question,
               p.record.bboxes or p.record.bbox, settings.seed + p.index, p.record.target)
        for p in prepared
    ])


def result_line(prepared: Prepared, outcome: Outcome | None, identity: dict, dataset: str,
                method_label: str) -> dict:
    """One JSONL line: the record's fields, the run's settings, what the method did, and the record's scores."""
    record, metric = prepared.record, identity["metric"]
    line = {
        "id": record.id, "dataset": record.dataset or dataset, "question": record.question,
        "labels": list(record.labels), "image_path": record.image_path, "method": method_label,
        "model": identity["model"], "metric": metric, "run": identity,
    }
    if record.bbox is not None:
        line["gt_bbox"] = list(record.bbox)
        if prepared.image is not None:
            line["area_fraction"] = area_fraction(record.bbox, prepared.image.size)
    if record.bboxes is not None:
        line["gt_bboxes"] = [list(box) for box in record.bboxes]
    error = prepared.error or (outcome if isinstance(outcome, str) else None)
    if error is not None:
        return {**line, "original_answer": None, "crop_answer": None, "bbox": None, "bboxes": None,
                "cropped": None, "confidence": None, "chosen": None, "original_correct": None,
                "crop_correct": None, "timing": None, "cost": None, "error": error,
                "error_kind": prepared.error_kind or "model"}
    options = record_options(record) if metric == "mc" else ()
    return {
        **line,
        "original_answer": outcome.original_answer,
        "crop_answer": outcome.answer,
        "bbox": None if outcome.bbox is None else list(outcome.bbox),
        "bboxes": [list(box) for box in outcome.boxes],
        "cropped": outcome.cropped,
        "confidence": outcome.confidence,
        "chosen": outcome.chosen,
        "original_correct": score_answer(metric, outcome.original_answer, record.labels, options),
        "crop_correct": score_answer(metric, outcome.answer, record.labels, options),
        "timing": outcome.timings,
        "cost": None if outcome.cost is None else dataclasses.asdict(outcome.cost),
        "error": None,
    }


def run_batches(model: Model, strategy: Strategy, settings: EvalSettings, identity: dict, pending, handle,
                batch_size: int, answer_fn, progress, dataset: str) -> None:
    """Answer `pending` batch by batch, appending each batch's lines (flushed, fsync'd) to `handle`; the
    progress bar shows this run's failures and accuracy with the crop so far."""
    failed, correct, answered = 0, 0, 0
    for begin in range(0, len(pending), batch_size):
        prepared = [prepare(model, strategy, settings, i, record) for i, record in pending[begin:begin + batch_size]]
        ready = [p for p in prepared if p.error is None]
        outcomes = dict(zip((p.index for p in ready), answer_or_error(answer_fn, ready) if ready else []))
        lines = [result_line(p, outcomes.get(p.index), identity, dataset, settings.method_label) for p in prepared]
        try:
            append_results(handle, lines)
        except OSError as error:  # a full disk: the lines written so far stay, and a rerun resumes
            raise ValueError(f"cannot append to {handle.name}: {error.strerror}; free space and rerun to "
                             "resume") from None
        failed += sum(line["error"] is not None for line in lines)
        answered += sum(line["error"] is None for line in lines)
        correct += sum(line["crop_correct"] or 0 for line in lines)
        progress.set_postfix_str(f"{failed} failed, accuracy {100 * correct / max(answered, 1):.1f}%", refresh=False)
        progress.update(len(lines))
    progress.close()


def summary(lines: list[dict], out: Path, new: int, metric: str) -> str:
    """How many records, how many failed (and why), and the accuracies of the scored ones."""
    failed = [line for line in lines if line["error"] is not None]
    scored = [line for line in lines if line["error"] is None]
    text = [f"{len(lines)} records in {out} ({new} new this run), {len(scored)} answered, {len(failed)} failed"]
    kinds = collections.Counter(line.get("error_kind", "unrecorded") for line in failed)
    text += [f"  {count} failed: {kind} ({ERROR_KINDS.get(kind, 'written before error kinds were recorded')})"
             for kind, count in kinds.most_common()]
    if scored:
        mean = lambda key: 100 * sum(line[key] for line in scored) / len(scored)  # noqa: E731
        text.append(f"accuracy ({METRIC_NAMES[metric]}) over {len(scored)} answered: original "
                    f"{mean('original_correct'):.2f}%, with crop {mean('crop_correct'):.2f}%")
    text += [f"  failed id {line['id']!r}: {line['error']}" for line in failed[:MAX_LISTED_FAILURES]]
    if len(failed) > MAX_LISTED_FAILURES:
        text.append(f"  ... and {len(failed) - MAX_LISTED_FAILURES} more (see the 'error' field)")
    return "\n".join(text)


def evaluate(settings: EvalSettings) -> int:
    """Run (or resume) an evaluation; returns the exit status (0 all answered, 1 some records failed)."""
    records = read_dataset(settings.data, settings.dataset_format, settings.dataset_name)
    metric = choose_metric(records) if settings.metric == "auto" else settings.metric
    if metric == "mc":
        check_options(records)
    if not settings.images.is_dir():
        raise ValueError(f"image folder {settings.images} not found")
    if settings.batch_size < 1 or (settings.limit is not None and settings.limit < 0):
        raise ValueError("--batch-size must be at least 1 and --limit at least 0")
    strategy = run_strategy(settings)
    index, count = process_slot(settings)
    assigned = assigned_records(records, settings.limit, index, count)
    out = process_path(settings.out, index, count)
    identity = settings.identity(metric, checkpoint_identity(settings.model))
    with exclusive_writer(out) as handle:
        finished = finished_ids(out, identity)
        pending = [(i, record) for i, record in assigned if str(record.id) not in finished]
        model = vicrop_jax.load(settings.model, dtype=settings.dtype, check_finite=True)
        mesh, batch_size = data_mesh(settings.batch_size)
        if batch_size != settings.batch_size:
            print(f"batch size {settings.batch_size} -> {batch_size}: a multiple of the {len(jax.local_devices())} "
                  "local devices", file=sys.stderr)
        if mesh is not None:  # the parameters are replicated over the mesh once, for every batch of the run
            replicated = jax.device_put(model.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            model = dataclasses.replace(model, params=replicated)
        answer_fn = batch_answer_fn(model, strategy, settings, mesh)
        progress = progress_bar("eval", len(assigned), len(assigned) - len(pending))
        run_batches(model, strategy, settings, identity, pending, handle, batch_size, answer_fn, progress,
                    settings.data.stem)
    ids = {str(record.id) for _, record in assigned}
    lines = [line for line in read_results(out) if str(line["id"]) in ids]
    print(summary(lines, out, len(pending), metric))
    return 1 if any(line["error"] is not None for line in lines) else 0
