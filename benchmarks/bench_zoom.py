"""Warm seconds per question of the zoom strategies on an embedded model, and their answers, to compare one
implementation with another (identical answers, boxes and costs).

    python -m benchmarks.bench_zoom --model vicrop-tiny --count 48 --passes 3 --save zoom.json
    python -m benchmarks.bench_zoom --model vicrop-tiny --count 48 --passes 3 --compare zoom.json
    python -m benchmarks.bench_zoom --model vicrop-tiny --calls 1x1 8x2

`--calls VxQ ...` times one yes/no call of V views and Q questions each instead (milliseconds, the median of 10
warm calls), with each view's prefix shared between its questions and with every prompt run whole.

The questions are `testing.synthetic.make_record(seed 1, i)` for i < count, answered with `answer_batch` in
batches of `--batch-size`. A first pass compiles, then `--passes` passes alternate the strategies; a figure is
the median pass (with the range).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import jax

import vicrop_jax
from vicrop_jax.prompts import NO_WORD, YES_WORD
from vicrop_jax.testing.synthetic import make_record
from vicrop_jax.vicrop import zoom
from vicrop_jax.vicrop.engine import Engine, answer_token

EVAL_SEED = 1


def outcome(answer) -> dict:
    return {"answer": answer.answer, "original": answer.original_answer,
            "boxes": [list(map(int, box)) for box in answer.boxes], "cost": list(vars(answer.cost).values())}


def time_calls(model, sizes: list[str]) -> None:
    """Milliseconds of one yes/no call per size, shared prefix against whole prompts."""
    engine, image = Engine(model), make_record(EVAL_SEED, 0).image
    questions = ["Is there a red square in the image?", "Could the red square be found by zooming in?"]
    yes_no = np.array([answer_token(model, YES_WORD), answer_token(model, NO_WORD)], np.int32)
    print("| views x questions | shared prefix, ms | whole prompts, ms |")
    print("| --- | ---: | ---: |")
    for size in sizes:
        views, asked = (int(n) for n in size.split("x"))
        crops = [image.crop((i, 0, image.width // 2 + i, image.height // 2)) for i in range(views)]
        pixels, prompts = model.family.plain_inputs(model, [c for c in crops for _ in range(asked)],
                                                    [q for _ in crops for q in (questions * asked)[:asked]])
        by_view = jax.tree_util.tree_map(lambda leaf: leaf.reshape(views, asked, *leaf.shape[1:]), prompts)
        row = []
        for static in (engine.static, engine.static._replace(prefix_tokens=None)):
            def call(static=static):
                return np.asarray(zoom.yes_probabilities(static, model.params, pixels[::asked], by_view, yes_no))

            call()
            row.append(np.median([timed(call) for _ in range(10)]) * 1000)
        print(f"| {size} | {row[0]:.1f} | {row[1]:.1f} |")


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vicrop-tiny")
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--strategies", nargs="+", default=["zoom_search", "focus"])
    parser.add_argument("--save", help="write the answers here")
    parser.add_argument("--compare", help="check the answers against a file written by --save")
    parser.add_argument("--calls", nargs="+", metavar="VxQ", help="time single yes/no calls of these sizes")
    args = parser.parse_args()
    model = vicrop_jax.load(args.model)
    if args.calls:
        time_calls(model, args.calls)
        return
    records = [make_record(EVAL_SEED, i) for i in range(args.count)]
    images, questions = [r.image for r in records], [r.question for r in records]
    seconds: dict[str, list[float]] = {name: [] for name in ["none", *args.strategies]}
    outcomes: dict[str, list[dict]] = {}
    for turn in range(1 + args.passes):
        for name in seconds:
            start = time.perf_counter()
            answers = vicrop_jax.answer_batch(model, images, questions, name, batch_size=args.batch_size)
            if turn:
                seconds[name].append((time.perf_counter() - start) / len(records))
            else:
                outcomes[name] = [outcome(a) for a in answers]
    plain = float(np.median(seconds["none"]))
    print(f"{args.model}, {args.count} questions of seed {EVAL_SEED}, batches of {args.batch_size}, "
          f"median (range) of {args.passes} warm passes")
    print("| strategy | s / question | of a plain answer's | model passes / question |")
    print("| --- | --- | ---: | ---: |")
    for name, values in seconds.items():
        passes = np.mean([o["cost"][0] for o in outcomes[name]])
        print(f"| {name} | {np.median(values):.4f} ({min(values):.4f}-{max(values):.4f}) | "
              f"{np.median(values) / plain:.2f}x | {passes:.1f} |")
    if args.save:
        with open(args.save, "w") as handle:
            json.dump(outcomes, handle)
    if args.compare:
        with open(args.compare) as handle:
            reference = json.load(handle)
        for name in args.strategies:
            same = sum(a == b for a, b in zip(outcomes[name], reference[name]))
            print(f"{name}: {same} of {len(reference[name])} answers identical (answer, original, boxes, cost)")


if __name__ == "__main__":
    main()
