"""Time one forward and one 20-token greedy answer: vicrop_jax (jitted) vs transformers (PyTorch, eager).

Both load the same random checkpoint written by transformers; the prompt is the paper's question
template with one image. Prints a Markdown table. Usage:

    python -m benchmarks.bench_llava [--configs tiny medium] [--repeats 9]

Each figure is the median of `--repeats` timed calls after two warm-up calls, with the range beside it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

import vicrop_jax  # noqa: E402
from vicrop_jax._generation import encode_images, prompt_ids  # noqa: E402
from vicrop_jax.nn.decoding import greedy_generate, pad_prompt  # noqa: E402
from vicrop_jax.prompts import llava_prompt  # noqa: E402
from vicrop_jax.testing.hf_models import llava_config, save_llava  # noqa: E402
from benchmarks.bench_vicrop import cpu_model  # noqa: E402

CONFIGS = {
    "tiny": dict(image_size=28, num_heads=4, num_kv_heads=2),
    # LLaVA-1.5 shape family at reduced size: 16x16 patches, 8 LM layers of width 512, 32k vocabulary.
    "medium": dict(
        image_size=224, num_heads=8, num_kv_heads=8, text_layers=8, vision_layers=8, vocab_size=32000,
        width=512, vision_width=384,
    ),
}
QUESTION = "What is the color of the small shape ?"


def timed(repeats: int, fn) -> list[float]:
    """Wall times after two warm-up calls (the first calls of either framework pay one-time costs)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench(name: str, repeats: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as folder:
        reference = save_llava(Path(folder), llava_config(**CONFIGS[name]))
        model = vicrop_jax.load(folder)
    ids = prompt_ids(model, llava_prompt(QUESTION), 1)
    size = model.config.image_size
    pixels = np.random.RandomState(0).randn(1, size, size, 3).astype(np.float32)
    torch_ids, torch_pixels = torch.tensor([ids]), torch.tensor(pixels.transpose(0, 3, 1, 2))

    forward = jax.jit(lambda p, i, x: model.module.apply({"params": p}, i, x))
    jax_forward = lambda: forward(model.params, np.asarray(ids)[None], pixels[None]).block_until_ready()

    def torch_forward():
        with torch.no_grad():
            reference(input_ids=torch_ids, pixel_values=torch_pixels)

    def torch_generate():
        with torch.no_grad():
            reference.generate(input_ids=torch_ids, pixel_values=torch_pixels, max_new_tokens=20, do_sample=False,
                               min_new_tokens=20)

    def jax_generate():
        # encode + prefill + 20 steps; the EOS id is set unreachable so both sides decode exactly 20 tokens
        features = encode_images(model.module, model.params, pixels)
        padded, length = pad_prompt(ids)
        greedy_generate(model.module, model.params, padded[None], np.array([length]),
                        features.reshape(1, -1, features.shape[-1]), max_new_tokens=20,
                        eos_ids=(-5,)).block_until_ready()

    # torch first: XLA's CPU worker threads stay busy for a moment after a JAX call and would slow torch down
    return {
        "torch_forward": timed(repeats, torch_forward),
        "torch_generate": timed(repeats, torch_generate),
        "jax_forward": timed(repeats, jax_forward),
        "jax_generate": timed(repeats, jax_generate),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch threads, jax {jax.__version__} "
          f"on {jax.devices()[0].platform}, torch {torch.__version__}")
    print("| config | forward, vicrop_jax | forward, transformers | 20-token answer, vicrop_jax | "
          "20-token answer, transformers |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.configs:
        r = {key: "{:.1f} ({:.1f}-{:.1f}) ms".format(*(1e3 * t for t in (statistics.median(v), min(v), max(v))))
             for key, v in bench(name, args.repeats).items()}
        print(f"| {name} | {r['jax_forward']} | {r['torch_forward']} | {r['jax_generate']} | {r['torch_generate']} |")


if __name__ == "__main__":
    main()
