"""How many programs ViCrop compiles on Qwen2.5-VL for a dataset of mixed image sizes.

    python -m benchmarks.bench_qwen_buckets --records 60 --method rel_att

Images of random sizes (sides 64 to 2048 px, aspect ratios up to 8:1) go through `vicrop_jax.answer` on a tiny
random Qwen2.5-VL checkpoint whose processor allows the published model's pixels, so ViCrop's budget (256*28*28
pixels) applies as on the real one. Each image's token grid differs; the device pipeline compiles per bucket of the
full-resolution image, of the original's patches, of its token grid and of the crops' canvas
(`families/qwen2_5_vl.py`), and per question-length bucket, which this counts. A count, not a timing: any machine
gives it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import vicrop_jax
from vicrop_jax._generation import encode_images
from vicrop_jax.families.qwen2_5_vl import merged_grid, patch_bucket
from vicrop_jax.nn.decoding import greedy_generate
from vicrop_jax.qwen_preprocessing import image_grid
from vicrop_jax.testing.hf_models import noise_image, qwen2_5_vl_config, save_qwen2_5_vl
from vicrop_jax.vicrop import _pipeline

PUBLISHED_MAX_PIXELS = 12845056  # Qwen2.5-VL's preprocessor_config.json


def programs() -> dict[str, int]:
    return {"pipeline": _pipeline.compiled_programs(), "vision tower": encode_images._cache_size(),
            "prefill + decoding": greedy_generate._cache_size()}


def image_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    sizes = []
    while len(sizes) < count:
        width, height = (int(v) for v in rng.integers(64, 2049, 2))
        if max(width, height) / min(width, height) <= 8:
            sizes.append((width, height))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=60)
    parser.add_argument("--method", default="rel_att")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp()) / "qwen"
    save_qwen2_5_vl(folder, qwen2_5_vl_config(), max_pixels=PUBLISHED_MAX_PIXELS)
    model = vicrop_jax.load(folder, "float32")
    budget = model.family.pixel_budget(model)
    grids, buckets = set(), set()
    print("| records | distinct token grids | patch buckets | pipeline | vision tower | prefill + decoding | all |")
    print("|---|---|---|---|---|---|---|")
    for i, (width, height) in enumerate(image_sizes(args.records, args.seed), 1):
        grid = image_grid(width, height, model.image_config, budget)
        grids.add(merged_grid(model.config, grid))
        buckets.add(patch_bucket(int(np.prod(grid))))
        vicrop_jax.answer(model, noise_image(width, height, seed=i), "What is the color of the shape ?",
                          args.method, max_new_tokens=2)
        if i in (1, 5, 10, 20, 40, args.records) or i == args.records:
            counts = programs()
            print(f"| {i} | {len(grids)} | {len(buckets)} | " + " | ".join(str(v) for v in counts.values())
                  + f" | {sum(counts.values())} |", flush=True)


if __name__ == "__main__":
    main()
