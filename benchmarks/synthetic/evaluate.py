"""The paper's analyses on a held-out synthetic set, for the embedded model (or any LLaVA checkpoint).

    python -m benchmarks.synthetic.evaluate --model vicrop-tiny --count 1000 --out runs/synthetic

1. Writes the held-out set (seed 1; training used seed 0) in docs/method.md (Data) format, unless present.
2. Runs `vicrop-jax eval`'s runner once per method (none, gt, random, center, rel_att, grad_att,
   pure_grad); results are JSONL that resume where a run stopped.
3. Prints and writes (`summary.json`, `summary.md`): accuracy by size tercile of the answer box's area
   without cropping and with the ground-truth crop; accuracy of every method; and the attention ratio
   (mean attention of the map layer, last prompt position, head mean, on the ground-truth box over
   the mean elsewhere, cells weighted by their overlap with the box) for right and wrong answers; per LM
   layer, its median and how often the crop box chosen on that layer's attention holds the answer.
High-resolution tiling is not run: the generated images are at most 768 px, below its 1024 px threshold.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax
import numpy as np
from PIL import Image

import vicrop_jax
from vicrop_jax import select_bbox
from vicrop_jax._generation import pixel_values
from vicrop_jax.vicrop._api import static_model
from vicrop_jax.vicrop.methods import RelAtt, resolve_method
from vicrop_jax.evaluation.metrics import TERCILES, attention_ratio, tercile, tercile_edges
from vicrop_jax.evaluation.results import read_results
from vicrop_jax.evaluation.runner import EvalSettings, evaluate
from vicrop_jax.testing.synthetic import write_dataset

EVAL_SEED = 1
METHODS = ("none", "gt", "random", "center", "rel_att", "grad_att", "pure_grad")


@functools.partial(jax.jit, static_argnames=("static", "method"))
def _attention(static, params, pixels, prompt, method):
    return method.attention(static, params, pixels, prompt)


def attention_maps(model, scenes: list[tuple], layer: int | None = None) -> list[np.ndarray]:
    """The question prompt's attention map (rel-att's numerator) of each (image, question, bbox) scene at
    `layer` (default: the model's map layer)."""
    method = resolve_method(model, RelAtt(layer=layer))
    out = []
    for image, question, _ in scenes:
        [prompt] = model.family.prompt_arrays(model, [model.family.prompt(question)])
        out.append(np.asarray(_attention(static_model(model), model.params, pixel_values(model, [image])[0], prompt,
                                         method)))
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
            left, top, right, bottom = select_bbox(attention, image.size, model.config.image_size)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vicrop-tiny")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--out", default="runs/synthetic")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "data.json").exists():
        write_dataset(data, EVAL_SEED, args.count)
    records = json.loads((data / "data.json").read_text())[: args.count]
    results = {}
    for method in args.methods:
        path = out / f"{method}.jsonl"
        print(f"== {method}", flush=True)
        evaluate(EvalSettings(data=data / "data.json", images=data / "images", model=args.model, out=path,
                              method=method, metric="gqa", batch_size=args.batch_size, limit=args.count))
        results[method] = read_results(path)
    if "none" not in results:
        raise SystemExit("--methods must include none: the terciles and attention ratios are defined on it")
    model = vicrop_jax.load(args.model)
    scenes = load_scenes(records, data / "images")
    layer = resolve_method(model, "rel_att").layer
    analysis = layer_analysis(model, scenes)
    ratios = dict(zip([r["id"] for r in records], analysis["attention_ratios"][layer]))
    summary = summarize(results, ratios, layer, by_layer(analysis))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown(summary) + "\n")
    print(markdown(summary))


if __name__ == "__main__":
    main()
