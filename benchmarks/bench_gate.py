"""What the confidence gate costs and keeps on an embedded model: warm seconds per question of the plain answer,
rel-att and rel-att behind the gate, and their accuracy on the same held-out single-detail questions.

    python -m benchmarks.bench_gate --model vicrop-tiny --count 400 --gates 0.548 --passes 3

The questions are `testing.synthetic.make_record(seed, i)` for i < count (seed 1, the evaluation's; the gates
are the ones calibrated on seed 4 by `benchmarks/synthetic/evaluate.py`). A first pass compiles every program,
then `--passes` passes alternate the configurations (batches of `--batch-size`); a figure is the median pass.
Accuracy is GQA's (the label contained in the answer), with n and a 95% bootstrap interval; the kept share of
rel-att's gain is paired over the same questions.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import vicrop_jax
from vicrop_jax.evaluation.metrics import gqa_accuracy
from vicrop_jax.testing.synthetic import make_record

EVAL_SEED = 1
BOOTSTRAP = 1000


def interval(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """95% bootstrap interval of the mean of `values` [n] (or of the mean difference, for paired rows)."""
    means = values[rng.integers(0, len(values), (BOOTSTRAP, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vicrop-tiny")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--gates", type=float, nargs="+", default=[0.548])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model = vicrop_jax.load(args.model)
    records = [make_record(EVAL_SEED, i) for i in range(args.count)]
    images, questions = [r.image for r in records], [r.question for r in records]
    runs = {"none": ("none", {}), "rel_att": ("rel_att", {}),
            **{f"rel_att gate={gate}": ("rel_att", {"gate": gate}) for gate in args.gates}}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    correct: dict[str, np.ndarray] = {}
    cropped: dict[str, float] = {}
    for turn in range(1 + args.passes):
        for name, (method, options) in runs.items():
            start = time.perf_counter()
            answers = vicrop_jax.answer_batch(model, images, questions, method, batch_size=args.batch_size,
                                              **options)
            if turn:
                seconds[name].append((time.perf_counter() - start) / len(records))
            else:
                correct[name] = np.array([gqa_accuracy(a.answer, [r.answer]) for a, r in zip(answers, records)])
                cropped[name] = float(np.mean([a.cropped for a in answers]))
    rng = np.random.default_rng(0)
    plain = np.median(seconds["none"])
    gain = correct["rel_att"] - correct["none"]
    print(f"{args.model}, {args.count} single-detail questions of seed {EVAL_SEED}, batches of {args.batch_size}, "
          f"median of {args.passes} warm passes")
    print("| configuration | accuracy % (95% CI) | cropped | s / question | of a plain answer's | of rel_att's "
          "| share of rel_att's gain (95% CI) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for name in runs:
        low, high = interval(correct[name], rng)
        kept = correct[name] - correct["none"]
        share = kept.mean() / gain.mean() if gain.mean() else float("nan")
        ratios = interval(kept - gain, rng)  # paired: the gain lost against rel_att, as a share of its gain
        share_text = (f"{share:.0%} ({1 + ratios[0] / gain.mean():.0%}-{1 + ratios[1] / gain.mean():.0%})"
                      if gain.mean() else "-")
        print(f"| {name} | {100 * correct[name].mean():.1f} ({100 * low:.1f}-{100 * high:.1f}), n={len(records)} "
              f"| {cropped[name]:.0%} | {np.median(seconds[name]):.4f} | {np.median(seconds[name]) / plain:.2f}x "
              f"| {np.median(seconds[name]) / np.median(seconds['rel_att']):.0%} | {share_text} |")


if __name__ == "__main__":
    main()
