"""Explicit vs fused attention (`load(attention=...)`) on this machine's backend: seconds per question of the
plain answer and of each map method, the two kernels' passes alternating in one process.

    python -m benchmarks.bench_attention [--configs vicrop-tiny medium] [--questions 4] [--passes 5]

The default kernel of `load` ("auto") is the faster one per backend; this is the measurement behind it on the
CPU (on a GPU, `benchmarks/gpu_check.sh` takes the same figures in bfloat16).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.bench_vicrop import CONFIGS, METHODS, cpu_model, map_layer, seconds_per_question, workload, \
    write_checkpoint


def compare(name: str, folder: Path, count: int, passes: int) -> dict:
    """{method: {kernel: [seconds per question of each pass]}}."""
    import vicrop_jax

    images, questions = workload(name, count)
    explicit = vicrop_jax.load(folder, attention="explicit")
    models = {"explicit": explicit, "fused": explicit.with_attention("fused")}
    layer = map_layer(folder)
    out = {}
    for method in ("none", *METHODS):
        options = {"layer": layer} if method in METHODS else {}
        runs = {kernel: (lambda m: lambda i, q: vicrop_jax.answer(m, i, q, method, **options))(model)
                for kernel, model in models.items()}
        for run in runs.values():
            seconds_per_question(run, images, questions)  # compiles
        timed = [{kernel: seconds_per_question(run, images, questions) for kernel, run in runs.items()}
                 for _ in range(passes)]
        out[method] = {kernel: [t[kernel] for t in timed] for kernel in runs}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    import jax

    print(f"machine: {cpu_model()}, jax {jax.__version__} on {jax.devices()[0].platform}")
    for name in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            times = compare(name, write_checkpoint(name, Path(tmp)), args.questions, args.passes)
        print(f"\n### {name}: seconds per question, median (range) of {args.passes} passes of {args.questions} "
              "questions\n")
        print("| method | explicit | fused | fused / explicit |")
        print("| --- | --- | --- | --- |")
        for method, kernels in times.items():
            cells = ["{:.3f} ({:.3f}-{:.3f})".format(statistics.median(v), min(v), max(v)) for v in kernels.values()]
            ratio = statistics.median(f / e for f, e in zip(kernels["fused"], kernels["explicit"]))
            print(f"| {method} | {cells[0]} | {cells[1]} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
