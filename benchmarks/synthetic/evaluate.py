"""The paper's analyses and the open questions' options on the held-out synthetic benchmark (version 2).

    python -m benchmarks.synthetic.evaluate --model vicrop-tiny --count 1000 --out runs/synthetic

1. Writes the held-out set (seed 1; training used seed 0) unless present: `count` square single-detail
   questions (version 1's, so their figures stay comparable), then `count // 4` of each question type
   (non-square single-detail, two-region, distractor, counting; `vicrop_jax.testing.synthetic`).
2. Calibrates on seed 4 (never on the evaluation seed), unless `calibration.json` is present: per map method,
   the `regions="auto"` threshold on the map's mass outside the first box that gives the best accuracy, and
   rel-att's two gate thresholds (the lowest that keeps 90% of rel-att's gain, and the one that keeps 97%).
3. Runs `vicrop-jax eval`'s runner once per configuration (`configs`: ViCrop's methods and options, the
   baselines, and the competing zoom strategies FOCUS and ZoomEye's search); results are JSONL that resume.
4. Prints and writes (`summary.json`, `summary.md`): the single-detail tables of version 1 (accuracy by size
   tercile, attention ratios for right and wrong answers, per LM layer); accuracy per question type and
   overall for every configuration, with the share of questions cropped, the model passes and prompt tokens
   per question (`Answer.cost`) and seconds per question; geometry paper vs exact on the non-square scenes; the
   maps' quality against the ground-truth boxes; and warm seconds per single-detail question (`warm_timing`).
High-resolution tiling is not run: the generated images are at most 768 px, below its 1024 px threshold.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

import vicrop_jax
from vicrop_jax import select_bbox
from vicrop_jax.vicrop.engine import Engine, map_inputs, static_model
from vicrop_jax.vicrop.methods import RelAtt, resolve_method
from vicrop_jax.evaluation.metrics import TERCILES, attention_ratio, tercile, tercile_edges
from vicrop_jax.evaluation.results import read_results
from vicrop_jax.evaluation.runner import EvalSettings, evaluate
from vicrop_jax.prompts import YES_WORD
from vicrop_jax.testing.synthetic import QUESTION_TYPES, make_record, write_dataset
from vicrop_jax.vicrop.boxes import outside_mass, select_boxes

EVAL_SEED = 1
CALIBRATION_SEED = 4
METHODS = ("none", "gt", "random", "center", "rel_att", "grad_att", "pure_grad")
MAP_METHODS = ("rel_att", "grad_att", "pure_grad")
ZOOM_STRATEGIES = ("focus", "zoom_search")
GATE_GAINS = (0.90, 0.97)  # the gates keep these shares of rel-att's gain on the calibration scenes
AUTO = "auto"


@functools.partial(jax.jit, static_argnames=("static", "method"))
def _attention(static, params, pixels, prompt, method):
    return method.attention(static, params, pixels, prompt)


def attention_maps(model, scenes: list[tuple], layer: int | None = None) -> list[np.ndarray]:
    """The question prompt's attention map (rel-att's numerator) of each (image, question, bbox) scene at
    `layer` (default: the model's map layer), on the image's token grid, from the inputs of ViCrop's map pass."""
    method = resolve_method(model, RelAtt(layer=layer))
    out = []
    for image, question, _ in scenes:
        pixels, prompt, _, _ = map_inputs(model, image, question, method)
        attention = _attention(static_model(model), model.params, pixels, prompt, method)
        out.append(model.family.host_map(model, image, np.asarray(attention)))
    return out


def layer_analysis(model, scenes: list[tuple]) -> dict[str, list[list]]:
    """Per LM layer and scene, from one attention map each: the attention ratio on the answer box (the
    paper's analysis), and whether ViCrop's box selection on that map gives a crop holding the answer
    box's centre (what a map is used for)."""
    ratios, hits = [], []
    for layer in range(model.config.text.num_layers):
        ratios.append([])
        hits.append([])
        for attention, (image, _, bbox) in zip(attention_maps(model, scenes, layer), scenes):
            ratios[-1].append(attention_ratio(attention, bbox, image.size))
            left, top, right, bottom = select_bbox(attention, image.size, model.family.crop_size(model.config))
            hits[-1].append(left <= (bbox[0] + bbox[2]) / 2 <= right and top <= (bbox[1] + bbox[3]) / 2 <= bottom)
    return {"attention_ratios": ratios, "box_hits": hits}


def by_layer(analysis: dict[str, list[list]]) -> dict[str, list[float]]:
    return {"median_attention_ratio": [float(np.median(r)) for r in analysis["attention_ratios"]],
            "box_hit_rate": [float(np.mean(h)) for h in analysis["box_hits"]]}


def load_scenes(records: list[dict], images: Path) -> list[tuple]:
    return [(Image.open(images / r["image_path"]).convert("RGB"), r["question"], r["bbox"]) for r in records]


def percent(values) -> float:
    return round(100 * float(np.mean(values)), 1) if len(values) else float("nan")


def summarize(results: dict[str, list[dict]], ratios: dict[str, float], layer: int, layers: dict) -> dict:
    none = results["none"]
    edges = tercile_edges([line["area_fraction"] for line in none])
    band = {line["id"]: tercile(line["area_fraction"], edges) for line in none}
    by_tercile = {
        method: {name: percent([l["crop_correct"] for l in results[method] if band[l["id"]] == name])
                 for name in TERCILES}
        for method in results
    }
    right = [ratios[l["id"]] for l in none if l["original_correct"]]
    wrong = [ratios[l["id"]] for l in none if not l["original_correct"]]
    describe = lambda values: {"mean": float(np.mean(values)) if values else None,  # noqa: E731
                               "median": float(np.median(values)) if values else None, "count": len(values)}
    return {
        "questions": len(none),
        "tercile_area_edges": [float(e) for e in edges],
        "accuracy": {method: percent([l["crop_correct"] for l in lines]) for method, lines in results.items()},
        "accuracy_by_tercile": by_tercile,
        "attention_ratio": {"layer": layer, "correct": describe(right), "wrong": describe(wrong)},
        "by_layer": layers,
    }


def markdown(summary: dict) -> str:
    rows = ["| method | overall | " + " | ".join(TERCILES) + " |", "| --- | ---: | " + " | ".join(["---:"] * 3) + " |"]
    for method, overall in summary["accuracy"].items():
        cells = " | ".join(f"{summary['accuracy_by_tercile'][method][t]:.1f}" for t in TERCILES)
        rows.append(f"| {method} | {overall:.1f} | {cells} |")
    ratio = summary["attention_ratio"]
    rows += ["", f"| answer without crop | questions | attention ratio (layer {ratio['layer']}), mean | median |",
             "| --- | ---: | ---: | ---: |"]
    for name in ("correct", "wrong"):
        r = ratio[name]
        shown = [f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("mean", "median")]
        rows.append(f"| {name} | {r['count']} | {shown[0]} | {shown[1]} |")
    ratios, hits = summary["by_layer"]["median_attention_ratio"], summary["by_layer"]["box_hit_rate"]
    rows += ["", "| LM layer | " + " | ".join(str(i) for i in range(len(ratios))) + " |",
             "| --- | " + " | ".join(["---:"] * len(ratios)) + " |",
             "| median attention ratio | " + " | ".join(f"{r:.2f}" for r in ratios) + " |",
             "| attention crop holds the answer | " + " | ".join(f"{100 * h:.1f}%" for h in hits) + " |"]
    return "\n".join(rows)


def configs(calibration: dict) -> list[tuple[str, str, dict]]:
    """(name, method, eval options) of every run; the gates and `regions="auto"` thresholds as calibrated."""
    runs = [(method, method, {}) for method in METHODS]
    for method in MAP_METHODS:
        runs += [(f"{method} regions=2", method, {"regions": 2}),
                 (f"{method} regions=auto", method, {"regions": AUTO,
                                                     "second_region_mass": calibration["second_region_mass"][method]})]
    runs += [(f"rel_att gate={gate:.3g}", "rel_att", {"gate": gate}) for gate in calibration["gates"]]
    runs.append(("auto", "auto", {}))
    runs += [(f"{method} geometry=exact", method, {"geometry": "exact"}) for method in MAP_METHODS]
    for strategy in ZOOM_STRATEGIES:
        runs += [(strategy, strategy, {}),
                 (f"{strategy} answer_views=both", strategy, {"options": ("answer_views=both",)})]
    return runs


def kind(record: dict) -> str:
    """A record's column: its question type, single-detail split into square and non-square scenes."""
    if record["question_type"] == "single":
        return "single" if record["aspect"] == "square" else "single, non-square"
    return record["question_type"]


KINDS = ("single", "single, non-square") + QUESTION_TYPES[1:]


def run(out: Path, data: Path, model: str, name: str, method: str, options: dict, batch_size: int,
        count: int | None = None) -> list[dict]:
    path = out / f"{name.replace(' ', '_').replace('=', '-')}.jsonl"
    print(f"== {name}", flush=True)
    evaluate(EvalSettings(data=data / "data.json", images=data / "images", model=model, out=path, method=method,
                          metric="gqa", batch_size=batch_size, limit=count, **options))
    return read_results(path)


def calibrate(model_name: str, out: Path, count: int, batch_size: int) -> dict:
    """Thresholds fitted on the calibration seed: `regions="auto"`'s per map method, and rel-att's gates."""
    data = out / "calibration"
    if not (data / "data.json").exists():
        write_dataset(data, CALIBRATION_SEED, count, version=2)
    records = json.loads((data / "data.json").read_text())
    model = vicrop_jax.load(model_name)
    scenes = {r["id"]: Image.open(data / "images" / r["image_path"]).convert("RGB") for r in records}
    masses, choices = {}, {}
    for method in MAP_METHODS:
        one = {l["id"]: l["crop_correct"] for l in run(out / "calibration-runs", data, model_name, method, method,
                                                       {}, batch_size)}
        two = {l["id"]: l["crop_correct"] for l in run(out / "calibration-runs", data, model_name,
                                                       f"{method} regions=2", method, {"regions": 2}, batch_size)}
        mass = {}
        for r in records:
            importance = vicrop_jax.importance_map(model, scenes[r["id"]], r["question"], method)
            [box] = select_boxes(importance, scenes[r["id"]].size, model.family.crop_size(model.config), 1)
            mass[r["id"]] = outside_mass(importance, box, scenes[r["id"]].size)
        candidates = sorted(set(mass.values())) + [1.0]
        accuracy = lambda t: np.mean([two[i] if mass[i] > t else one[i] for i in mass])  # noqa: E731
        masses[method] = float(max(candidates, key=lambda t: (accuracy(t), t)))
        choices[method] = float(accuracy(masses[method]))
    rel = {l["id"]: l for l in read_results(out / "calibration-runs" / "rel_att.jsonl")}
    confidence = {}
    for begin in range(0, len(records), batch_size):
        chunk = records[begin: begin + batch_size]
        answers = Engine(model).plain_answers([scenes[r["id"]] for r in chunk], [r["question"] for r in chunk])
        confidence.update({r["id"]: a.confidence for r, a in zip(chunk, answers)})
    gain = np.mean([rel[i]["crop_correct"] - rel[i]["original_correct"] for i in rel])
    gated = lambda t: np.mean([rel[i]["crop_correct"] if confidence[i] < t else rel[i]["original_correct"]  # noqa: E731
                               for i in rel]) - np.mean([rel[i]["original_correct"] for i in rel])
    levels = sorted(set(confidence.values())) + [1.0]
    gates = [float(next(t for t in levels if gated(t) >= share * gain)) for share in GATE_GAINS]
    return {"seed": CALIBRATION_SEED, "records": len(records), "second_region_mass": masses,
            "regions_auto_accuracy": choices, "gates": gates, "gate_gains": list(GATE_GAINS)}


def timed_runs(gates: list[float]) -> dict[str, tuple[str, dict]]:
    """The configurations `warm_timing` times: none, the map methods, rel-att's gates, the zoom strategies."""
    return {"none": ("none", {}), **{method: (method, {}) for method in MAP_METHODS},
            **{f"rel_att gate={gate:.3g}": ("rel_att", {"gate": gate}) for gate in gates},
            **{strategy: (strategy, {}) for strategy in ZOOM_STRATEGIES}}


def warm_timing(model, records: list[dict], images: Path, runs: dict[str, tuple[str, dict]], batch_size: int,
                passes: int = 3) -> dict[str, float]:
    """Seconds per question, warm, of each configuration of `runs` ({name: (method, options)}): a first pass
    compiles every program (the run files' timings include compiling), then `passes` passes alternate the
    configurations; the median pass."""
    scenes = [Image.open(images / r["image_path"]).convert("RGB") for r in records]
    questions = [r["question"] for r in records]
    measured: dict[str, list[float]] = {name: [] for name in runs}
    for turn in range(1 + passes):
        for name, (method, options) in runs.items():
            start = time.perf_counter()
            vicrop_jax.answer_batch(model, scenes, questions, method, batch_size=batch_size, **options)
            if turn:
                measured[name].append((time.perf_counter() - start) / len(records))
    return {name: float(np.median(values)) for name, values in measured.items()}


def yes_no_accuracy(model, seed: int, count: int, batch_size: int = 32) -> dict[str, float]:
    """How often the model's p(yes) is on the right side of 0.5 for the zoom strategies' yes/no questions about
    views of held-out scenes (`train.aux_question`: a random view, Yes or No equally), per question form (%)."""
    from benchmarks.synthetic.train import AUX_QUESTIONS, aux_question

    rng = np.random.default_rng([seed, 1])
    asked = [aux_question(rng, make_record(seed, i)) for i in range(count)]
    passes = Engine(model)
    right: dict[str, list[bool]] = {form: [] for form in AUX_QUESTIONS}
    for begin in range(0, count, batch_size):
        chunk = asked[begin: begin + batch_size]
        yes, _ = passes.yes_probabilities([aux.view for aux in chunk], [[aux.question] for aux in chunk])
        for aux, [p] in zip(chunk, yes):
            right[aux.form].append((p > 0.5) == (aux.answer == YES_WORD))
    return {form: percent(values) for form, values in right.items()}


def crop_holds_centres(line: dict) -> list[bool]:
    """For each ground-truth box of a record, whether one of the crops holds its centre."""
    crops = line.get("bboxes") or []
    holds = lambda box, c: c[0] <= (box[0] + box[2]) / 2 <= c[2] and c[1] <= (box[1] + box[3]) / 2 <= c[3]  # noqa: E731
    return [any(holds(box, crop) for crop in crops) for box in line["gt_bboxes"]]


def seconds(lines: list[dict]) -> float:
    return float(np.mean([l["timing"]["total"] for l in lines if l["timing"]]))


def v2_summary(results: dict[str, list[dict]], records: list[dict], ratios: dict[str, float],
               calibration: dict) -> dict:
    kinds = {r["id"]: kind(r) for r in records}
    aspects = {r["id"]: r["aspect"] for r in records}
    table = {}
    for name, lines in results.items():
        row = {k: percent([l["crop_correct"] for l in lines if kinds[l["id"]] == k]) for k in KINDS}
        row["overall"] = percent([l["crop_correct"] for l in lines])
        row["non-square"] = percent([l["crop_correct"] for l in lines if aspects[l["id"]] != "square"])
        row["cropped"] = percent([bool(l.get("cropped")) for l in lines])
        row["seconds"] = seconds(lines)
        costs = [l["cost"] for l in lines if l.get("cost")]
        row["passes"] = float(np.mean([c["passes"] + c["backward_passes"] for c in costs])) if costs else None
        row["prefill_tokens"] = float(np.mean([c["prefill_tokens"] for c in costs])) if costs else None
        row["centres_held"] = {k: percent([h for l in lines if kinds[l["id"]] == k for h in crop_holds_centres(l)])
                               for k in KINDS}
        table[name] = row
    ratio_by_kind = {k: float(np.median([v for i, v in ratios.items() if kinds[i] == k])) for k in KINDS}
    return {"accuracy": table, "median_attention_ratio": ratio_by_kind, "calibration": calibration,
            "questions": {k: sum(v == k for v in kinds.values()) for k in KINDS}}


def v2_markdown(summary: dict) -> str:
    counts = summary["questions"]
    heads = [f"{k} (n={counts[k]})" for k in KINDS]
    rows = ["| configuration | " + " | ".join(heads) + " | overall | cropped | passes / question "
            "| prompt tokens / question | s / question |", "| --- | " + " | ".join(["---:"] * (len(KINDS) + 5)) + " |"]
    for name, row in summary["accuracy"].items():
        cost = ("- | -" if row.get("passes") is None else f"{row['passes']:.1f} | {row['prefill_tokens']:.0f}")
        rows.append(f"| {name} | " + " | ".join(f"{row[k]:.1f}" for k in KINDS)
                    + f" | {row['overall']:.1f} | {row['cropped']:.0f}% | {cost} | {row['seconds']:.3f} |")
    table = summary["accuracy"]
    compared = [m for m in MAP_METHODS if m in table and f"{m} geometry=exact" in table]
    if compared:
        rows += ["", "| geometry, non-square scenes | paper | exact |", "| --- | ---: | ---: |"]
        rows += [f"| {m} | {table[m]['non-square']:.1f} | {table[m + ' geometry=exact']['non-square']:.1f} |"
                 for m in compared]
    rows += ["", "| crops hold the centre of each ground-truth box (%) | " + " | ".join(KINDS) + " |",
             "| --- | " + " | ".join(["---:"] * len(KINDS)) + " |"]
    for name, row in summary["accuracy"].items():
        if any(name.startswith(m) for m in MAP_METHODS + ZOOM_STRATEGIES + ("random", "center", "gt", "auto")) \
                and "gate" not in name:
            rows.append(f"| {name} | " + " | ".join(f"{row['centres_held'][k]:.1f}" for k in KINDS) + " |")
    ratio = summary["median_attention_ratio"]
    rows += ["", "| median attention ratio on the ground-truth boxes (rel-att's question map) | "
             + " | ".join(f"{ratio[k]:.2f}" for k in KINDS) + " |"]
    calibration = summary["calibration"]
    rows += ["", f"Calibration (seed {calibration['seed']}, {calibration['records']} questions): regions=auto "
             "threshold on the map's mass outside the first box "
             + ", ".join(f"{m} {t:.3f}" for m, t in calibration["second_region_mass"].items())
             + "; rel-att gates " + ", ".join(f"{g:.3g}" for g in calibration["gates"])
             + " (keep " + ", ".join(f"{s:.0%}" for s in calibration["gate_gains"]) + " of its gain there)."]
    return "\n".join(rows)


def yes_no_markdown(accuracy: dict[str, float], count: int) -> str:
    return "\n".join([f"| yes/no question about a view ({count} in all) | right |", "| --- | ---: |",
                      *(f"| {form} | {value:.1f}% |" for form, value in accuracy.items())])


def timing_markdown(timing: dict[str, float]) -> str:
    rows = ["| single-detail questions, warm | s / question | of a plain answer's | of rel_att's |",
            "| --- | ---: | ---: | ---: |"]
    rows += [f"| {name} | {value:.4f} | {value / timing['none']:.2f}x | {value / timing['rel_att']:.0%} |"
             for name, value in timing.items()]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vicrop-tiny")
    parser.add_argument("--count", type=int, default=1000, help="square single-detail questions (others: a quarter)")
    parser.add_argument("--calibration-count", type=int, default=400)
    parser.add_argument("--out", default="runs/synthetic")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--timing-count", type=int, default=400, help="single-detail questions the warm timing reads")
    parser.add_argument("--yes-no-count", type=int, default=600, help="yes/no questions about views of held-out scenes")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "data.json").exists():
        write_dataset(data, EVAL_SEED, args.count, version=2)
    records = json.loads((data / "data.json").read_text())
    calibration_path = out / "calibration.json"
    if not calibration_path.exists():
        calibration_path.write_text(json.dumps(calibrate(args.model, out, args.calibration_count, args.batch_size),
                                               indent=2))
    calibration = json.loads(calibration_path.read_text())
    model = vicrop_jax.load(args.model)
    results = {name: run(out, data, args.model, name, method, options, args.batch_size)
               for name, method, options in configs(calibration)}
    single = [r for r in records if kind(r) == "single"]
    single_ids = {r["id"] for r in single}
    scenes = load_scenes(single, data / "images")
    layer = resolve_method(model, "rel_att").layer
    analysis = layer_analysis(model, scenes)
    ratios = dict(zip([r["id"] for r in single], analysis["attention_ratios"][layer]))
    v1 = summarize({m: [l for l in results[m] if l["id"] in single_ids] for m in METHODS}, ratios, layer,
                   by_layer(analysis))
    all_scenes = load_scenes(records, data / "images")
    all_ratios = {r["id"]: float(np.mean([attention_ratio(attention, box, image.size) for box in r["bboxes"]]))
                  for r, attention, (image, _, _) in zip(records, attention_maps(model, all_scenes), all_scenes)}
    timing = warm_timing(model, single[: args.timing_count], data / "images", timed_runs(calibration["gates"]),
                         args.batch_size)
    yes_no = yes_no_accuracy(model, EVAL_SEED, args.yes_no_count)
    summary = {"single_detail": v1, "v2": v2_summary(results, records, all_ratios, calibration),
               "warm_seconds_per_single_detail_question": timing, "yes_no_accuracy": yes_no}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = (markdown(v1) + "\n\n" + v2_markdown(summary["v2"]) + "\n\n" + timing_markdown(timing) + "\n\n"
            + yes_no_markdown(yes_no, args.yes_no_count))
    (out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
