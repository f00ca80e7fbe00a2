"""Peak host memory of `sharding.load_sharded` on 8 simulated CPU devices: from HF safetensors (the whole tree
converted on the host, then sent) and from an Orbax checkpoint (each device's slice restored from the files).

    python -m benchmarks.bench_host_memory [--text-layers 8] [--dir /tmp]

The checkpoint is LLaVA-1.5-7B-shaped (CLIP ViT-L/14 at 336 px; LLaMA width 4096, MLP 11008, 32 heads,
vocabulary 32064) with `--text-layers` decoder layers, random bfloat16 weights written straight to both formats
(no torch model) in a temporary folder under `--dir`, deleted afterwards. Each load runs in a fresh subprocess.
On simulated CPU devices the device arrays live in host memory too, so the table also shows the peak less the
parameter bytes resident on the devices: what the load held on the host besides the model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
SHARD_BYTES = GIB  # safetensors shards, as transformers writes a 7B (it splits at 5 GB; smaller keeps writing lean)
FORMATS = ("hf", "orbax")


def llava_7b_config(text_layers: int) -> dict:
    """config.json of llava-hf/llava-1.5-7b-hf's shapes (bfloat16), with `text_layers` decoder layers."""
    from vicrop_jax.testing.checkpoints import llava_hf_config

    config = llava_hf_config(image_size=336, width=4096, vocab_size=32064, vision_width=1024, vision_layers=24,
                             text_layers=text_layers, num_heads=32, num_kv_heads=32)
    config["vision_config"].update(num_attention_heads=16, intermediate_size=4096, projection_dim=768)
    config["text_config"].update(intermediate_size=11008, rms_norm_eps=1e-5, max_position_embeddings=4096)
    config["dtype"] = "bfloat16"
    return config


def random_params(hf_config: dict, seed: int = 0) -> dict:
    """A flat {flax path: bfloat16 array} of the model's shapes, without building or initialising it."""
    import jax
    import ml_dtypes
    import numpy as np
    from flax import traverse_util

    from vicrop_jax.families import family_for

    family = family_for(hf_config)
    config = family.read_config(hf_config)
    abstract = jax.eval_shape(family.module_class(config).init, jax.random.PRNGKey(0), *family.init_inputs(config))
    rng = np.random.default_rng(seed)
    return {path: (0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(ml_dtypes.bfloat16)
            for path, leaf in traverse_util.flatten_dict(abstract["params"]).items()}


def write_side_files(folder: Path, hf_config: dict) -> None:
    """config.json, a word-level tokenizer and the CLIP processor config, as `load` reads them."""
    from vicrop_jax.testing.checkpoints import CLIP_MEAN, CLIP_STD, write_word_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_word_tokenizer(folder, [], hf_config["text_config"]["vocab_size"])
    size = hf_config["vision_config"]["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }))


def write_hf_safetensors(folder: Path, hf_config: dict, flat: dict) -> None:
    """The parameters in transformers' layout, one shard in memory at a time (plus its index)."""
    import numpy as np
    from safetensors.numpy import save_file

    from vicrop_jax.families import family_for

    family = family_for(hf_config)
    table = family.conversion_table(family.read_config(hf_config))
    shards, size = [{}], 0
    for path, (hf_key, transform) in sorted(table.items(), key=lambda item: item[1][0]):
        if shards[-1] and size + flat[path].nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][hf_key] = (path, transform)
        size += flat[path].nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        tensors = {key: np.ascontiguousarray(transform.to_hf(flat[path])) for key, (path, transform) in shard.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
    weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def write_checkpoints(root: Path, text_layers: int) -> None:
    """The same random weights as `root/hf` (safetensors) and `root/orbax` (what `vicrop-jax convert` writes)."""
    from flax import traverse_util

    from weights_conversion.orbax_io import save_params

    hf_config = llava_7b_config(text_layers)
    flat = random_params(hf_config)
    for name in FORMATS:
        write_side_files(root / name, hf_config)
    write_hf_safetensors(root / "hf", hf_config, flat)
    save_params(traverse_util.unflatten_dict(flat), root / "orbax")


def status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak) of this process. The peak is not `getrusage`'s ru_maxrss, which on
    Linux a process inherits from its parent across fork and exec: here, the writer's."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def probe(folder: Path) -> None:
    """Load `folder` sharded over all devices and print the memory figures as JSON (run in a fresh process)."""
    import jax
    import jax.numpy as jnp

    from vicrop_jax import sharding

    mesh = sharding.make_mesh()
    baseline = status_bytes("VmRSS")
    start = time.perf_counter()
    params = jax.block_until_ready(sharding.load_sharded(folder, mesh, "bfloat16").params)
    seconds = time.perf_counter() - start
    leaves = jax.tree_util.tree_leaves(params)
    lm_head = params["language_model"]["lm_head"]["kernel"]
    print(json.dumps({
        "devices": len(jax.devices()),
        "seconds": seconds,
        "baseline": baseline,
        "peak": status_bytes("VmHWM"),
        "after": status_bytes("VmRSS"),
        "parameters": sum(leaf.nbytes for leaf in leaves),
        "resident": sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards),
        "checksum": float(jnp.sum(lm_head.astype(jnp.float32))),  # both formats hold the same weights
    }))


def measure(folder: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_host_memory", "--probe", str(folder)], env=env,
                         capture_output=True, text=True, check=False)
    if run.returncode:
        raise RuntimeError(f"loading {folder} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text-layers", type=int, default=8, help="decoder layers (LLaVA-1.5-7B has 32)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the checkpoint goes")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_host_memory_", dir=args.dir))
    try:
        start = time.perf_counter()
        write_checkpoints(root, args.text_layers)
        print(f"wrote {root} in {time.perf_counter() - start:.0f} s; peak RSS of the writer "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB", file=sys.stderr)
        results = {name: measure(root / name) for name in FORMATS}
    finally:
        shutil.rmtree(root)
    if len({result["checksum"] for result in results.values()}) != 1:
        raise RuntimeError(f"the two formats loaded different weights: {results}")
    import jax

    print(f"LLaVA-1.5-7B shapes with {args.text_layers} decoder layers, bfloat16, on "
          f"{results['hf']['devices']} simulated CPU devices ({platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}); parameters {results['hf']['parameters'] / GIB:.2f} GiB")
    print("| load_sharded from | seconds | RSS before | peak RSS | peak / parameters | peak - resident parameters |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.0f} | {r['baseline'] / GIB:.2f} GiB | {r['peak'] / GIB:.2f} GiB "
              f"| {r['peak'] / r['parameters']:.2f} | {(r['peak'] - r['resident']) / GIB:.2f} GiB |")


if __name__ == "__main__":
    main()
