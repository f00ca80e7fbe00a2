"""The GPU figures in one run: random LLaVA-1.5-7B- and 13B- and Qwen2.5-VL-3B- and 7B-shaped weights made on
the device (nothing to download), bfloat16; seconds per question of the plain answer and each map method at batch
1 and 8, with the explicit and the fused attention kernel; model FLOPs utilisation; peak device memory. One JSON
file of figures.

    bash benchmarks/gpu_check.sh [--out gpu_check.json] [--budget-s 270] [--shapes 7b 13b qwen3b qwen7b]
    bash benchmarks/gpu_check.sh --dry-run      # a tiny shape on any backend (the tests run it on the CPU)

Figures are written as they are taken; when the time budget is spent the rest are listed as skipped, so the
file is complete in what it holds whenever the run stops. FLOPs per question come from XLA's cost analysis of
the lowered programs (a decoding loop's body counts once: the 20 answer tokens are a few percent of the prompt
passes); batch 8 is counted as 8 times batch 1. The peak is the device allocator's running peak after each
figure (`memory_stats()["peak_bytes_in_use"]`), so it only grows within a shape.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("none", "rel_att", "grad_att", "pure_grad")
KERNELS = ("explicit", "fused")
BATCHES = (1, 8)
CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14)
SHAPES = {  # (vision tower, LLaMA decoder) as in llava-1.5-7b-hf and llava-1.5-13b-hf
    "7b": (CLIP_L14_336, dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)),
    "13b": (CLIP_L14_336, dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                               num_attention_heads=40, num_key_value_heads=40, vocab_size=32064)),
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=56, patch_size=14),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128)),
}
QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
QWEN_SHAPES = {  # (vision tower, Qwen2 decoder) as in Qwen2.5-VL-3B/7B-Instruct
    "qwen3b": (QWEN_VISION, dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                 num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                 mrope_section=[16, 24, 24])),
    "qwen7b": (QWEN_VISION, dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 mrope_section=[16, 24, 24])),
    "qwen-tiny": (dict(QWEN_VISION, depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                       fullatt_block_indexes=[1]),
                  dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, mrope_section=[2, 3, 3])),
}
QWEN_MAX_PIXELS = 12845056  # the published processor's; ViCrop's budget stays the release's 256 * 28 * 28
# dense bfloat16 peak of the GPUs this check is meant for, by a substring of jax's device_kind
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}
BENCH_SEED = 3  # synthetic questions no other run uses (training 0, evaluation 1, demo 2)


def random_model(shape: str, dtype=jnp.bfloat16):
    """A LLaVA-1.5 of the given shape with random weights initialised on the default device; the embedded
    model's tokenizer (its ids lie inside any vocabulary here) and a CLIP processor at the tower's size."""
    from vicrop_jax._loading import Model, checkpoint_folder
    from vicrop_jax._tokenizer import Tokenizer
    from vicrop_jax.families import LLAVA
    from vicrop_jax.preprocessing import ImageProcessorConfig

    vision, text = SHAPES[shape]
    tiny = checkpoint_folder("vicrop-tiny")
    tiny_config = json.loads((tiny / "config.json").read_text())
    hf = {"model_type": "llava", "image_token_id": tiny_config["image_token_id"], "vision_feature_layer": -2,
          "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
          "vision_config": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", **vision},
          "text_config": {"model_type": "llama", "hidden_act": "silu", "max_position_embeddings": 4096,
                          "bos_token_id": 1, "eos_token_id": 2, **text}}
    config = LLAVA.read_config(hf)
    module = LLAVA.module_class(config, dtype=dtype, param_dtype=dtype)
    init = jax.jit(lambda key: module.init(key, *LLAVA.init_inputs(config))["params"])
    params = init(jax.random.PRNGKey(0))
    size = vision["image_size"]
    processor = json.loads((tiny / "preprocessor_config.json").read_text())
    processor.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return Model(LLAVA, config, module, params, Tokenizer.from_folder(tiny),
                 ImageProcessorConfig.from_preprocessor_config(processor), tiny)


def random_qwen_model(shape: str, dtype=jnp.bfloat16):
    """A Qwen2.5-VL of the given shape with random weights initialised on the default device; the embedded
    vicrop-tiny-qwen's tokenizer and special token ids, its processor with the published pixel budget."""
    from vicrop_jax._loading import Model, checkpoint_folder
    from vicrop_jax._tokenizer import Tokenizer
    from vicrop_jax.families import QWEN2_5_VL
    from vicrop_jax.nn._config import MAP_LAYER_KEY
    from vicrop_jax.qwen_preprocessing import QwenImageProcessorConfig

    vision, text = QWEN_SHAPES[shape]
    tiny = checkpoint_folder("vicrop-tiny-qwen")
    hf = json.loads((tiny / "config.json").read_text())
    hf.pop(MAP_LAYER_KEY, None)  # the embedded model's own map layer; these shapes take the default
    section = text["mrope_section"]
    hf["vision_config"] = {"model_type": "qwen2_5_vl_vision", "hidden_act": "silu",
                           "out_hidden_size": text["hidden_size"], **vision}
    hf["text_config"] = {**hf["text_config"], "layer_types": None, "max_window_layers": text["num_hidden_layers"],
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
                         **{key: value for key, value in text.items() if key != "mrope_section"}}
    config = QWEN2_5_VL.read_config(hf)
    module = QWEN2_5_VL.module_class(config, dtype=dtype, param_dtype=dtype)
    init = jax.jit(lambda key: module.init(key, *QWEN2_5_VL.init_inputs(config))["params"])
    processor = json.loads((tiny / "preprocessor_config.json").read_text())
    processor["size"] = {"shortest_edge": 56 * 56, "longest_edge": QWEN_MAX_PIXELS}
    return Model(QWEN2_5_VL, config, module, init(jax.random.PRNGKey(0)), Tokenizer.from_folder(tiny),
                 QwenImageProcessorConfig.from_preprocessor_config(processor), tiny)


def workload(count: int):
    from benchmarks.bench_vicrop import cluttered_scene
    from vicrop_jax.testing.synthetic import make_record

    image = cluttered_scene(0)  # one size: one size bucket, one compile per program
    return [image] * count, [make_record(BENCH_SEED, i).question for i in range(count)]


def runner(model, method: str, batch: int, max_new_tokens: int):
    """A function answering one batch of `batch` questions, blocking until the answers are on the host."""
    import vicrop_jax

    images, questions = workload(batch)
    if batch == 1:
        return lambda: vicrop_jax.answer(model, images[0], questions[0], method, max_new_tokens=max_new_tokens)
    return lambda: vicrop_jax.answer_batch(model, images, questions, method, batch_size=batch,
                                           max_new_tokens=max_new_tokens)


def flops_per_question(model, method: str, max_new_tokens: int) -> float | None:
    """XLA's FLOP count of the lowered programs that answer one question (nothing is compiled)."""
    from vicrop_jax.vicrop import _pipeline, engine
    from vicrop_jax.vicrop.methods import resolve_method

    (image,), (question,) = workload(1)
    if method == "none":
        pixels, prompts = model.family.plain_inputs(model, [image], [question])
        lowered = [_pipeline.plain_batch.lower(engine.static_model(model), model.params, pixels, prompts,
                                               max_new_tokens=max_new_tokens)]
    else:
        strategy = resolve_method(model, method)
        program = _pipeline.pipeline.programs[strategy.low_memory]
        inputs = engine.map_inputs(model, image, question, strategy), engine.crop_inputs(model, image, question)
        lowered = [program.lower(engine.static_model(model), model.params, *inputs, method=strategy,
                                 max_new_tokens=max_new_tokens, reuse_question_pass=True)]
    costs = [program.cost_analysis() for program in lowered]
    if any(not cost or "flops" not in cost for cost in costs):
        return None
    return float(sum(cost["flops"] for cost in costs))


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((peak for name, peak in PEAK_BF16_FLOPS.items() if name in kind), None)


def peak_device_bytes(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def seconds_per_question(run, batch: int, repeats: int) -> dict:
    run()  # compiles
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append((time.perf_counter() - start) / batch)
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "runs": repeats}


def parameter_count(params) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def write(report: dict, out: Path) -> None:
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=1))
    partial.replace(out)


def check(shapes: list[str], out: Path, budget_s: float, repeats: int, max_new_tokens: int,
          batches=BATCHES, methods=METHODS) -> dict:
    device = jax.devices()[0]
    start = time.perf_counter()
    report = {"machine": {"device_kind": getattr(device, "device_kind", ""), "platform": device.platform,
                          "devices": jax.device_count(), "host": platform.node(), "jax": jax.__version__},
              "settings": {"dtype": "bfloat16", "repeats": repeats, "max_new_tokens": max_new_tokens,
                           "budget_s": budget_s},
              "models": {}, "figures": [], "skipped": []}
    peak = peak_flops(device)
    for shape in shapes:
        if time.perf_counter() - start > budget_s:
            report["skipped"].append({"shape": shape, "reason": "time budget spent"})
            continue
        explicit = random_qwen_model(shape) if shape in QWEN_SHAPES else random_model(shape)
        models = {"explicit": explicit, "fused": explicit.with_attention("fused")}
        report["models"][shape] = {"parameters": parameter_count(explicit.params),
                                   "init_s": round(time.perf_counter() - start, 1)}
        flops = {method: flops_per_question(explicit, method, max_new_tokens) for method in methods}
        for batch in batches:
            for method in methods:
                for kernel in KERNELS:
                    figure = {"shape": shape, "method": method, "batch": batch, "kernel": kernel}
                    if time.perf_counter() - start > budget_s:
                        report["skipped"].append({**figure, "reason": "time budget spent"})
                        continue
                    seconds = seconds_per_question(runner(models[kernel], method, batch, max_new_tokens), batch,
                                                   repeats)
                    figure.update(seconds_per_question=seconds, flops_per_question=flops[method],
                                  peak_device_bytes=peak_device_bytes(device))
                    figure["mfu"] = (None if peak is None or flops[method] is None
                                     else flops[method] / seconds["median"] / peak)
                    report["figures"].append(figure)
                    write(report, out)
                    print(json.dumps(figure), flush=True)
        del explicit, models
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    write(report, out)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--shapes", nargs="+", default=["7b", "13b", "qwen3b", "qwen7b"],
                        choices=[s for s in (*SHAPES, *QWEN_SHAPES) if "tiny" not in s])
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop taking figures after this long")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure after the compiling one")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny shape, the plain answer and rel_att, one timed run, batch 1 and 2: every "
                             "path of the script, on any backend")
    args = parser.parse_args(argv)
    from vicrop_jax.compilation_cache import enable_compilation_cache

    enable_compilation_cache()  # a rerun on the same machine skips the compiles
    if args.dry_run:
        report = check(["tiny", "qwen-tiny"], args.out, budget_s=float("inf"), repeats=1, max_new_tokens=4,
                       batches=(1, 2), methods=("none", "rel_att"))
    else:
        report = check(args.shapes, args.out, args.budget_s, args.repeats, args.max_new_tokens)
    print(f"{len(report['figures'])} figures, {len(report['skipped'])} skipped -> {args.out}")


if __name__ == "__main__":
    main()
