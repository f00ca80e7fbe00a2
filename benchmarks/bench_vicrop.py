"""Seconds per question, ours vs the published procedure in PyTorch; map peak memory; batched throughput.

    python -m benchmarks.bench_vicrop [--configs vicrop-tiny medium] [--questions 8] [--passes 5] [--runs 2]
                                      [--parts timing memory batch] [--batches 1 8 32]
    python -m benchmarks.bench_vicrop --quick   # medium, rel_att: fails past the floors (before a change lands)
    python -m benchmarks.bench_vicrop --configs qwen-medium --questions 3 --passes 3 --runs 1 --parts timing
                                      # about 8 minutes alone on 2 cores; --parts memory: 1.5 more
    python -m benchmarks.bench_vicrop --configs medium --parts strategies --questions 4 --passes 3
                                      # ViCrop beside the competing zoom strategies, ours only

- `vicrop-tiny`: the embedded model, on held-out synthetic scenes and their questions;
- `medium`: the LLaVA-1.5 shape family (CLIP ViT at 336 px, 576 image tokens, LLaMA decoder, 32k vocabulary)
  scaled so that one forward takes about a second on a 2-core CPU.
- `qwen-medium` (not in the default `--configs`): the Qwen2.5-VL-3B/7B shape family (ViT of patch 14 with window
  attention and full-attention blocks, 2 x 2 patch merger, Qwen2 decoder with grouped KV heads and multimodal
  rotary positions), scaled so that one transformers forward over the 640 x 480 scene's prompt (234 merged image
  tokens at the release's 256 * 28 * 28 pixel budget, 269 positions) takes about a second here; `qwen-tiny`: the
  tests' toy Qwen config, to check the script runs.
The reference is `torch_reference.vicrop_llava` (transformers eager attention, `output_attentions=True`,
`torch.autograd`), ours is `vicrop_jax.answer` (one compiled program per method, prefix-cached LLaVA maps); for
the Qwen configs the reference is `torch_reference.vicrop_qwen2_5_vl` (the release's procedure: map, box, PIL crop,
the crop answered as a second image), and ours runs the same device program as for LLaVA (the crop resized on the
device to the processor's size for its box, inside static shapes chosen per image size).
Each run is a fresh process (compiles, warms up, then `--passes` timed passes over the questions, ours and
the reference's alternating, so both meet the same drift of a shared machine); a figure is the median over
every pass of every run, with the range beside it, and a speed-up is the median of the per-pass ratios.
Peak memory of a map is measured in a fresh subprocess: after a warm-up, freed memory is returned to the
system (malloc_trim) and VmHWM reset, then one map is computed; the figure is the peak RSS growth.
`--parts strategies` times whole answers of ViCrop's methods and the competing zoom strategies (FOCUS, ZoomEye's
search; no published PyTorch procedure to compare with here) in one process, passes alternating, with the model
passes each answer took (`Answer.cost`) and the peak memory of one answer, measured as a map's.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("rel_att", "grad_att", "pure_grad")
STRATEGIES = ("none", "rel_att", "grad_att", "pure_grad", "focus", "zoom_search")
CONFIGS = ["vicrop-tiny", "medium"]  # the default run
QWEN_CONFIGS = ["qwen-tiny", "qwen-medium"]
BENCH_SEED = 3  # synthetic scenes no other run uses (training 0, evaluation 1, demo 2)
MEDIUM = dict(image_size=336, vision_width=256, vision_layers=6, width=768, text_layers=8, num_heads=12,
              num_kv_heads=12, vocab_size=32000)
# Qwen2.5-VL-3B: vision depth 32 (full attention in 7, 15, 23, 31), width 1280, 16 heads, windows of 112 px; decoder
# 36 layers of width 2048, 16 heads, 2 KV heads, head dim 128, mrope sections (16, 24, 24); 152k vocabulary
QWEN_MEDIUM = dict(vision_width=512, vision_heads=8, depth=8, fullatt_block_indexes=(3, 7), window_size=112,
                   width=1024, text_layers=12, num_heads=16, num_kv_heads=2, mrope_section=(8, 12, 12),
                   vocab_size=32000, initializer_range=0.02)  # the checkpoints' own; 0.2 saturates the attention
QWEN_CHECKPOINT_MAX_PIXELS = 12845056  # Qwen2.5-VL's own processor; ViCrop's budget stays the release's 256 * 28 * 28
QUESTIONS = ["What is the color of the small shape ?", "What is the letter on the left ?",
             "how many red shapes are there ?", "What digit is on the top right ?"]


def write_checkpoint(name: str, folder: Path) -> Path:
    """The folder to load: the embedded model's own, or a medium random checkpoint written to `folder`."""
    if name == "vicrop-tiny":
        from vicrop_jax._loading import checkpoint_folder

        return checkpoint_folder(name)
    if name in QWEN_CONFIGS:
        from vicrop_jax.testing.hf_models import qwen2_5_vl_config, save_qwen2_5_vl

        config = qwen2_5_vl_config(**(QWEN_MEDIUM if name == "qwen-medium" else {}))
        save_qwen2_5_vl(folder, config, max_pixels=QWEN_CHECKPOINT_MAX_PIXELS)
        return folder
    from vicrop_jax.testing.hf_models import llava_config, save_llava

    save_llava(folder, llava_config(**MEDIUM))
    return folder


def cluttered_scene(seed: int, size: int = 640) -> Image.Image:
    """Random discs on noise with one small red square, cut to 640x480 (a non-square image)."""
    rng = np.random.RandomState(seed)
    image = Image.fromarray(rng.randint(90, 160, (size, size, 3), np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x, y, r = rng.randint(0, size), rng.randint(0, size), rng.randint(10, 40)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.randint(0, 255, 3)))
    draw.rectangle((470, 120, 486, 136), fill=(220, 30, 30))
    return image.crop((0, 0, size, 480))


def workload(name: str, count: int) -> tuple[list, list[str]]:
    """(images, questions): held-out synthetic scenes for the embedded model, cluttered scenes otherwise."""
    if name == "vicrop-tiny":
        from vicrop_jax.testing.synthetic import make_record

        records = [make_record(BENCH_SEED, i) for i in range(count)]
        return [r.image for r in records], [r.question for r in records]
    return [cluttered_scene(i) for i in range(count)], (QUESTIONS * count)[:count]


def map_layer(folder: Path) -> int:
    """vicrop_jax's default map layer of the checkpoint (vicrop-tiny names its own), for both sides."""
    import vicrop_jax
    from vicrop_jax.vicrop.methods import default_map_layer

    return default_map_layer(vicrop_jax.load(folder))


def is_qwen(folder: Path) -> bool:
    return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "qwen2_5_vl"


def load_reference(folder: Path):
    """(model, tokenizer, image processor) of the reference, transformers' eager float32 model."""
    import torch
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, PreTrainedTokenizerFast

    torch.set_num_threads(2)
    if is_qwen(folder):
        from transformers import Qwen2_5_VLForConditionalGeneration

        from benchmarks import torch_reference

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
        return model, PreTrainedTokenizerFast.from_pretrained(folder), torch_reference.qwen_image_processor(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    return model, PreTrainedTokenizerFast.from_pretrained(folder), CLIPImageProcessor.from_pretrained(folder)


def seconds_per_question(fn, images, questions) -> float:
    start = time.perf_counter()
    for image, question in zip(images, questions):
        fn(image, question)
    return (time.perf_counter() - start) / len(images)


def timing_run(name: str, folder: Path, count: int, passes: int, methods: list[str]) -> dict:
    """One run: {side: {method: [seconds per question of each pass]}}, after a warm-up on one question per image
    size (JAX compiles every size bucket, torch's allocator fills); the two sides' passes alternate."""
    from benchmarks import torch_reference
    import vicrop_jax

    images, questions = workload(name, count)
    first_of_each_size = {image.size: i for i, image in reversed(list(enumerate(images)))}.values()
    warm_up = [images[i] for i in first_of_each_size], [questions[i] for i in first_of_each_size]
    model = vicrop_jax.load(folder)
    reference = load_reference(folder)
    layer = map_layer(folder)
    vicrop_reference = torch_reference.vicrop_qwen2_5_vl if is_qwen(folder) else torch_reference.vicrop_llava
    out = {"ours": {}, "reference": {}}
    for method in methods:
        options = {"layer": layer} if method in METHODS else {}
        sides = {
            "ours": lambda i, q: vicrop_jax.answer(model, i, q, method, **options),
            "reference": lambda i, q: vicrop_reference(*reference, i, q, method, layer=layer),
        }
        for fn in sides.values():
            seconds_per_question(fn, *warm_up)
        timed = [{side: seconds_per_question(fn, images, questions) for side, fn in sides.items()}
                 for _ in range(passes)]
        for side in sides:
            out[side][method] = [t[side] for t in timed]
    return out


def timings(name: str, folder: Path, count: int, passes: int, runs: int, methods: list[str]) -> dict:
    """`runs` timing runs, each in a fresh process, their passes pooled: {side: {method: [seconds]}}."""
    pooled = {"ours": {m: [] for m in methods}, "reference": {m: [] for m in methods}}
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_vicrop", "--timing-run", name, str(folder),
                               str(count), str(passes), *methods], capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise RuntimeError(f"timing run failed:\n{done.stderr[-3000:]}")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        for side in pooled:
            for method in methods:
                pooled[side][method] += run[side][method]
    return pooled


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Per-pass ratios of two sides' alternating passes (same drift of the machine in each pair)."""
    return [a / b for a, b in zip(numerators, denominators)]


def throughput(name: str, folder: Path, batches: list[int], repeats: int) -> dict:
    """Questions per second of rel_att through `answer_batch`, the median of `repeats` runs after a warm-up."""
    import vicrop_jax

    model = vicrop_jax.load(folder)
    layer = map_layer(folder)
    out = {}
    for batch in batches:
        count = max(batch, 8)
        images, questions = workload(name, count)
        def run():
            vicrop_jax.answer_batch(model, images, questions, "rel_att", batch_size=batch, layer=layer)

        run()  # the warm-up compiles every shape bucket the timed runs meet (the scenes' sizes differ)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        out[batch] = count / statistics.median(seconds)
    return out


def _high_water_kib() -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]), int(status["VmRSS"].split()[0])


def memory_probe(framework: str, name: str, folder: str, method: str) -> None:
    """Runs in a subprocess: peak RSS growth (MiB) of one map computation (framework "answer": one whole answer of
    ours) after a warm-up."""
    (image,), (question,) = workload(name, 1)
    if framework == "answer":
        import vicrop_jax

        model = vicrop_jax.load(folder)
        options = {"layer": map_layer(Path(folder))} if method in METHODS else {}
        run = lambda: vicrop_jax.answer(model, image, question, method, **options)  # noqa: E731
    elif framework == "ours":
        import vicrop_jax

        model = vicrop_jax.load(folder)
        layer = map_layer(Path(folder))
        run = lambda: vicrop_jax.importance_map(model, image, question, method, layer=layer)  # noqa: E731
    else:
        from benchmarks import torch_reference
        from vicrop_jax.prompts import GENERAL_QUESTION

        model, tokenizer, processor = load_reference(Path(folder))
        layer = map_layer(Path(folder))
        if is_qwen(Path(folder)):
            inputs, general, mask = torch_reference.qwen2_5_vl_map_inputs(model, tokenizer, processor, image,
                                                                          question, method, GENERAL_QUESTION)
            run = lambda: torch_reference.qwen2_5_vl_maps(model, inputs, general, method=method,  # noqa: E731
                                                          layer=layer, high_pass=mask)
        else:
            pixels = processor(image, return_tensors="pt")["pixel_values"]
            ids = torch_reference.llava_prompt_ids(model, tokenizer, question, 1)
            general = torch_reference.llava_prompt_ids(model, tokenizer, GENERAL_QUESTION, 1)
            mask = torch_reference.high_pass_mask(image, model.config.vision_config.image_size)
            run = lambda: torch_reference.llava_maps(model, ids, general, pixels, method=method,  # noqa: E731
                                                     layer=layer, high_pass=mask)
    run()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand memory freed by the warm-up back, so reuse shows as growth
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    _, before = _high_water_kib()
    run()
    peak, _ = _high_water_kib()
    print(json.dumps({"peak_mib": (peak - before) / 1024}))


def peak_memory(name: str, folder: Path, method: str) -> dict:
    out = {}
    for framework in ("ours", "reference"):
        result = subprocess.run([sys.executable, "-m", "benchmarks.bench_vicrop", "--memory-probe", framework, name,
                                 str(folder), method], capture_output=True, text=True, check=True, cwd=ROOT)
        out[framework] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def strategy_comparison(name: str, folder: Path, count: int, passes: int) -> dict:
    """Ours only, one process: {strategy: {"seconds": [per pass], "passes": mean model passes per question
    (prefills and backward passes), "prefill_tokens": mean per question, "peak_mib": one answer's}}; a warm-up
    pass, then the strategies' passes alternate."""
    import vicrop_jax

    images, questions = workload(name, count)
    model = vicrop_jax.load(folder)
    layer = map_layer(folder)
    run = lambda method: [vicrop_jax.answer(model, image, question, method,  # noqa: E731
                                            **({"layer": layer} if method in METHODS else {}))
                          for image, question in zip(images, questions)]
    out = {}
    for method in STRATEGIES:
        answers = run(method)
        out[method] = {"seconds": [], "passes": float(np.mean([a.cost.passes + a.cost.backward_passes
                                                               for a in answers])),
                       "prefill_tokens": float(np.mean([a.cost.prefill_tokens for a in answers]))}
    for _ in range(passes):
        for method in STRATEGIES:
            start = time.perf_counter()
            run(method)
            out[method]["seconds"].append((time.perf_counter() - start) / count)
    for method in STRATEGIES:
        probe = subprocess.run([sys.executable, "-m", "benchmarks.bench_vicrop", "--memory-probe", "answer", name,
                                str(folder), method], capture_output=True, text=True, check=True, cwd=ROOT)
        out[method]["peak_mib"] = json.loads(probe.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def strategy_table(compared: dict) -> list[str]:
    rows = ["| strategy | s / question | of a plain answer | model passes / question | prefill tokens / question "
            "| peak memory of an answer |", "| --- | --- | --- | --- | --- | --- |"]
    plain = compared["none"]["seconds"]
    for method, figures in compared.items():
        seconds = "{:.3f} ({:.3f}-{:.3f})".format(*spread(figures["seconds"]))
        rows.append(f"| {method} | {seconds} | {statistics.median(ratios(figures['seconds'], plain)):.2f}x | "
                    f"{figures['passes']:.1f} | {figures['prefill_tokens']:.0f} | {figures['peak_mib']:.0f} MiB |")
    return rows


QUICK_FLOORS = {"speed-up": 2.0, "over plain": 2.5}  # rel_att on medium; README: the figures they guard


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def timing_table(times: dict, methods: list[str]) -> list[str]:
    rows = ["| method | vicrop_jax (s) | PyTorch reference (s) | speed-up | ours / our plain answer |",
            "| --- | --- | --- | --- | --- |"]
    cell = lambda values, digits: "{:.{d}f} ({:.{d}f}-{:.{d}f})".format(*spread(values), d=digits)  # noqa: E731
    for method in methods:
        ours, theirs = times["ours"][method], times["reference"][method]
        over_plain = cell(ratios(ours, times["ours"]["none"]), 2) + "x" if "none" in methods else "-"
        rows.append(f"| {method} | {cell(ours, 3)} | {cell(theirs, 3)} | {cell(ratios(theirs, ours), 1)}x | "
                    f"{over_plain} |")
    return rows


def quick(folder: Path) -> int:
    """rel_att on medium, 2 questions, 3 passes: exit status 1 when a median falls past its floor."""
    times = timings("medium", folder, 2, 3, 1, ["none", "rel_att"])
    print("\n".join(timing_table(times, ["none", "rel_att"])))
    speed_up = statistics.median(ratios(times["reference"]["rel_att"], times["ours"]["rel_att"]))
    over_plain = statistics.median(ratios(times["ours"]["rel_att"], times["ours"]["none"]))
    failures = []
    if speed_up < QUICK_FLOORS["speed-up"]:
        failures.append(f"rel_att speed-up {speed_up:.2f}x is below the floor {QUICK_FLOORS['speed-up']}x")
    if over_plain > QUICK_FLOORS["over plain"]:
        failures.append(f"rel_att takes {over_plain:.2f}x our plain answer, above the ceiling "
                        f"{QUICK_FLOORS['over plain']}x")
    print("\n".join(failures) or f"quick check passed: rel_att {speed_up:.2f}x the reference, {over_plain:.2f}x "
          "our plain answer")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS + QWEN_CONFIGS)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--passes", type=int, default=5, help="timed passes per run, after a warm-up pass")
    parser.add_argument("--runs", type=int, default=2, help="timing runs, each in a fresh process")
    parser.add_argument("--methods", nargs="+", default=["none", *METHODS], choices=["none", *METHODS])
    parser.add_argument("--parts", nargs="+", default=["timing", "memory", "batch"],
                        choices=["timing", "memory", "batch", "strategies"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--quick", action="store_true", help="the pre-landing check (see QUICK_FLOORS)")
    parser.add_argument("--memory-probe", nargs=4, metavar=("FRAMEWORK", "CONFIG", "FOLDER", "METHOD"))
    parser.add_argument("--timing-run", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return 0
    if args.timing_run:
        name, folder, count, passes, *methods = args.timing_run
        print(json.dumps(timing_run(name, Path(folder), int(count), int(passes), methods)))
        return 0
    import jax
    import torch

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}")
    if args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            return quick(write_checkpoint("medium", Path(tmp)))
    for name in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_checkpoint(name, Path(tmp))
            if "timing" in args.parts:
                times = timings(name, folder, args.questions, args.passes, args.runs, args.methods)
                print(f"\n### {name}: seconds per question, median (range) over {args.runs} runs x {args.passes} "
                      f"passes of {args.questions} questions\n")
                print("\n".join(timing_table(times, args.methods)))
            if "memory" in args.parts:
                memory = {m: peak_memory(name, folder, m) for m in METHODS}
                print("\n| map | peak memory, vicrop_jax | peak memory, reference | ratio |")
                print("| --- | --- | --- | --- |")
                for method in METHODS:
                    ours, theirs = memory[method]["ours"], memory[method]["reference"]
                    print(f"| {method} | {ours:.0f} MiB | {theirs:.0f} MiB | {ours / max(theirs, 1e-9):.2f} |")
            if "strategies" in args.parts:
                print(f"\n### {name}: ViCrop and the competing zoom strategies, ours, median (range) of "
                      f"{args.passes} passes of {args.questions} questions\n")
                print("\n".join(strategy_table(strategy_comparison(name, folder, args.questions, args.passes))))
            if "batch" in args.parts:
                rates = throughput(name, folder, args.batches, args.passes)
                print("\n| rel_att batch size | questions / s (median of passes) | vs batch 1 |")
                print("| --- | --- | --- |")
                for batch, rate in rates.items():
                    print(f"| {batch} | {rate:.2f} | {rate / rates[args.batches[0]]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
