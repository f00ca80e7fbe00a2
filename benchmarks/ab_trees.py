"""A/B of two source trees of vicrop_jax on the same checkpoints and questions: seconds per question of
`vicrop_jax.answer` per method, and compilations during the timed pass (0 when a second question of the same
shapes reuses the programs).

    python -m benchmarks.ab_trees BEFORE_TREE AFTER_TREE [--configs vicrop-tiny medium] [--rounds 2]

Each measurement runs in a fresh subprocess with PYTHONPATH on one tree (public API only, so any version
answers), the two trees alternating round by round, so that both meet the same drift of the machine's speed.
The figure per tree is its best round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("none", "rel_att", "grad_att", "pure_grad")


def probe(folder: str, data: str) -> None:
    import jax
    from PIL import Image

    import vicrop_jax

    compiles = []
    compile_event = "/jax/core/compile/backend_compile_duration"
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(event) if event == compile_event else None)
    records = json.loads(Path(data).read_text())
    images = [Image.open(r["image"]).convert("RGB") for r in records]
    model = vicrop_jax.load(folder)
    out = {}
    for method in METHODS:
        for image, record in zip(images, records):  # warm-up: compiles every bucket the timed pass meets
            vicrop_jax.answer(model, image, record["question"], method)
        before = len(compiles)
        start = time.perf_counter()
        for image, record in zip(images, records):
            vicrop_jax.answer(model, image, record["question"], method)
        out[method] = {"seconds": (time.perf_counter() - start) / len(records), "compiles": len(compiles) - before}
    print(json.dumps(out))


def prepare(name: str, tmp: Path, count: int) -> tuple[Path, Path]:
    from benchmarks.bench_vicrop import workload, write_checkpoint

    folder = write_checkpoint(name, tmp)
    images, questions = workload(name, count)
    records = []
    for i, (image, question) in enumerate(zip(images, questions)):
        image.save(tmp / f"{i}.png")
        records.append({"image": str(tmp / f"{i}.png"), "question": question})
    (tmp / "records.json").write_text(json.dumps(records))
    return folder, tmp / "records.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trees", nargs="*", type=Path)
    parser.add_argument("--configs", nargs="+", default=["vicrop-tiny", "medium"])
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--probe", nargs=2, metavar=("FOLDER", "RECORDS"))
    args = parser.parse_args()
    if args.probe:
        probe(*args.probe)
        return
    for name in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            folder, records = prepare(name, Path(tmp), args.questions)
            best: dict[str, dict] = {}
            for _ in range(args.rounds):
                for tree in args.trees:
                    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
                    result = subprocess.run([sys.executable, "-m", "benchmarks.ab_trees", "--probe", str(folder),
                                             str(records)], env=env, cwd=tree, capture_output=True, text=True,
                                            check=True)
                    run = json.loads(result.stdout.strip().splitlines()[-1])
                    mine = best.setdefault(str(tree), run)
                    for method in METHODS:
                        if run[method]["seconds"] < mine[method]["seconds"]:
                            mine[method] = run[method]
        print(f"\n### {name}: seconds per question ({args.questions} questions, best of {args.rounds} rounds)\n")
        print("| method | " + " | ".join(str(t) for t in args.trees) + " |")
        print("| --- |" + " --- |" * len(args.trees))
        for method in METHODS:
            cells = [f"{best[str(t)][method]['seconds']:.3f} ({best[str(t)][method]['compiles']} compiles)"
                     for t in args.trees]
            print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
