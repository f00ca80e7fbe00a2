"""Peak host memory of `answer_batch` for a fixed workload at several batch sizes: it should follow the work,
not the batch size.

    python -m benchmarks.bench_memory [--batches 1 4 16 64]

Workloads on vicrop-tiny (rel_att): three held-out synthetic scenes; and the same with one of them replaced by a
6000 x 6000 image. Each figure comes from a fresh subprocess: the peak resident memory (VmHWM) after the run,
less the resident memory after loading the model and answering one warm-up question of another size bucket.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def probe(workload: str, batch: int) -> None:
    import numpy as np
    from PIL import Image

    import vicrop_jax
    from vicrop_jax.testing.synthetic import make_record

    def rss(field: str) -> float:
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        raise RuntimeError(field)

    model = vicrop_jax.load("vicrop-tiny")
    records = [make_record(3, i) for i in range(3)]
    images = [r.image for r in records]
    if workload == "one large image":
        images[1] = Image.fromarray(np.random.RandomState(0).randint(0, 255, (6000, 6000, 3), np.uint8))
    vicrop_jax.answer(model, make_record(3, 9).image, records[0].question, "rel_att")
    with open("/proc/self/clear_refs", "w") as handle:  # reset VmHWM to the current resident memory
        handle.write("5")
    before = rss("VmRSS")
    vicrop_jax.answer_batch(model, images, [r.question for r in records], "rel_att", batch_size=batch)
    print(json.dumps({"peak_mib": rss("VmHWM") - before}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--probe", nargs=2, metavar=("WORKLOAD", "BATCH"))
    args = parser.parse_args()
    if args.probe:
        probe(args.probe[0], int(args.probe[1]))
        return
    print("| workload | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("| --- |" + " ---: |" * len(args.batches))
    for workload in ("three scenes", "one large image"):
        cells = []
        for batch in args.batches:
            result = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--probe", workload, str(batch)],
                                    capture_output=True, text=True, check=True)
            cells.append(f"{json.loads(result.stdout.strip().splitlines()[-1])['peak_mib']:.0f} MiB")
        print(f"| {workload} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
