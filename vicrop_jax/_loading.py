"""`load`: a Hugging Face checkpoint folder (or cached repo id) -> a ready model bundle.

Conversion runs through the explicit tables of `weights_conversion`. A folder converted once with
`vicrop-jax convert` holds an Orbax checkpoint (Flax layout, no transposes), restored straight to the devices;
one converted before Orbax holds `flax_params.safetensors`, still read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vicrop_jax._tokenizer import Tokenizer
from vicrop_jax.compilation_cache import enable_compilation_cache
from vicrop_jax.families import Family, family_for
from vicrop_jax.nn._attention import AttentionKernel
from weights_conversion.core import IDENTITY, flax_to_hf, hf_to_flax, rename_keys, resolve_checkpoint_folder
from weights_conversion.hf_folder import read_config, read_image_processor_config
from weights_conversion.orbax_io import (
    PARAMS_FOLDER,
    is_orbax_checkpoint,
    restore_params,
    save_params,
)
from weights_conversion.safetensors_io import open_checkpoint, write_checkpoint

FLAX_PARAMS_FILE = "flax_params.safetensors"  # what `vicrop-jax convert` wrote before Orbax
EMBEDDED_MODELS = ("vicrop-tiny", "vicrop-tiny-qwen")  # vicrop_jax/models/ (benchmarks/synthetic/train.py makes them)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
AUTO = "auto"  # the checkpoint's own dtype (config.json's "dtype", or "torch_dtype" before transformers 5)


@dataclasses.dataclass(frozen=True)
class Model:
    """Everything needed to run a checkpoint: its family, module + params (a plain pytree), text/image processing."""

    family: Family
    config: Any
    module: nn.Module
    params: Any
    tokenizer: Tokenizer
    image_config: Any  # the family's image processor settings (`ImageProcessorConfig` for CLIP and BLIP)
    path: Path
    extra_tokenizer: Tokenizer | None = None  # the family's second reader of the prompt (InstructBLIP's Q-Former)

    def with_attention(self, attention: AttentionKernel | str) -> "Model":
        """The same weights with the attentions no map reads computed by another kernel (see `load`)."""
        return dataclasses.replace(self, module=self.module.clone(attention_kernel=AttentionKernel.resolve(attention)))


def resolve_dtype(dtype: Any, hf_config: dict[str, Any] | None = None) -> Any:
    """A dtype name, "auto" (the checkpoint's, float32 where it names none we run), or a dtype."""
    if isinstance(dtype, str):
        if dtype == AUTO and hf_config is not None:
            stored = hf_config.get("dtype") or hf_config.get("torch_dtype")
            return DTYPES.get(stored, jnp.float32)
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join((AUTO, *DTYPES))}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


@jax.jit
def _finite_leaves(params: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.isfinite(x).all(), params)


def nonfinite_parameters(params: Any) -> list[str]:
    """The "/"-joined paths of the parameters holding a NaN or an infinity, checked where they lie (no host copy)."""
    finite = jax.device_get(_finite_leaves(params))
    return ["/".join(path) for path, ok in traverse_util.flatten_dict(finite).items() if not ok]


def abstract_params(family: Family, config: Any, module: nn.Module) -> Any:
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), *family.init_inputs(config))["params"]


def on_default_device(abstract: Any) -> Any:
    """Every parameter whole on the first device, as `jax.device_put` places an array."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(lambda _: device, abstract)


def read_params(folder: Path, family: Family, config: Any, module: nn.Module, dtype: Any,
                shardings: Callable[[Any], Any] = on_default_device, allow_pickle: bool = False) -> Any:
    """The parameters on their devices, as `shardings(abstract tree)` places them.

    An Orbax checkpoint is restored slice by slice, each device reading its own part from the files; HF
    safetensors (or the Flax file of a conversion before Orbax) are converted on the host, then sent.
    """
    abstract = abstract_params(family, config, module)
    targets = shardings(abstract)
    if is_orbax_checkpoint(folder):
        return restore_params(folder, jax.tree_util.tree_map(
            lambda leaf, target: jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=target), abstract, targets))
    return jax.device_put(_host_params(folder, family, config, abstract, dtype, allow_pickle), targets)


def _host_params(folder: Path, family: Family, config: Any, abstract: Any, dtype: Any, allow_pickle: bool) -> Any:
    """Parameters from the Flax file if the folder has one, else from the HF safetensors via the table."""
    if (folder / FLAX_PARAMS_FILE).exists():
        tensors = open_checkpoint(folder, filename=FLAX_PARAMS_FILE)
        identity_table = {path: ("/".join(path), IDENTITY) for path in traverse_util.flatten_dict(abstract)}
        return hf_to_flax(identity_table, tensors, abstract, dtype, source=str(folder / FLAX_PARAMS_FILE))
    tensors = rename_keys(open_checkpoint(folder, allow_pickle=allow_pickle), family.key_aliases)
    return hf_to_flax(family.conversion_table(config), tensors, abstract, dtype, source=f"checkpoint {folder}")


def checkpoint_folder(path_or_repo_id: str | os.PathLike) -> Path:
    """An embedded model's name (unless a folder of that name exists here), a folder, or a cached repo id."""
    name = str(path_or_repo_id)
    if name in EMBEDDED_MODELS and not Path(name).is_dir():
        folder = Path(__file__).parent / "models" / name
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"the embedded model {name!r} is not in this installation ({folder}); "
                                    "benchmarks/synthetic/train.py trains it (see its docstring)")
        return folder
    return resolve_checkpoint_folder(path_or_repo_id)


def checkpoint_identity(path_or_repo_id: str | os.PathLike) -> str:
    """A short hash of a checkpoint: its config.json and, per weights file (an Orbax checkpoint's included), its
    name, size and first and last 64 KiB, so that another or retrained checkpoint of the same name is told apart
    without reading it whole."""
    folder = checkpoint_folder(path_or_repo_id)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    orbax_files = sorted(path for path in (folder / PARAMS_FOLDER).rglob("*") if path.is_file())
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + orbax_files:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(2**16)
            handle.seek(max(0, size - 2**16))
            digest.update(f"{path.relative_to(folder)}:{size}:".encode() + head + handle.read())
    return digest.hexdigest()[:16]


def load(path_or_repo_id: str | os.PathLike, dtype: Any = AUTO, *, allow_pickle: bool = False,
         shardings: Callable[[Any], Any] = on_default_device, family: Family | None = None,
         check_finite: bool = False, attention: AttentionKernel | str = "auto",
         compilation_cache: bool = True) -> Model:
    """Load a LLaVA-1.5 or InstructBLIP-Vicuna checkpoint folder, a repo id in the local HF cache, or an
    embedded model by name (`"vicrop-tiny"`, trained on synthetic small-detail VQA, see README).

    `shardings` maps the abstract parameter tree to a `jax.sharding.Sharding` per parameter, where each goes
    (`sharding.load_sharded` splits them over a mesh); an Orbax checkpoint is restored straight to them.
    `family` overrides the one that config.json's model_type names (a family defined outside the library).
    `check_finite` refuses weights holding NaN or infinity, naming the tensors (the CLI always checks).
    `attention` computes the attentions no map reads explicitly or with `jax.nn.dot_product_attention`
    ("auto": fused on GPU, explicit on CPU, where it is faster); the layers a map reads are always explicit.
    `compilation_cache` turns on JAX's persistent compilation cache in the user's cache folder (see
    `vicrop_jax.compilation_cache`), so a second process compiles nothing it compiled before.

    dtype is both the parameter and the compute dtype ("auto": the one config.json records); attention logits
    and softmax stay float32.
    """
    kernel = AttentionKernel.resolve(attention)
    if compilation_cache:
        enable_compilation_cache()
    folder = checkpoint_folder(path_or_repo_id)
    hf_config = read_config(folder)
    family = family or family_for(hf_config)
    config = family.read_config(hf_config)
    dtype = resolve_dtype(dtype, hf_config)
    image_config = family.read_image_config(read_image_processor_config(folder))
    module = family.module_class(config, dtype=dtype, param_dtype=dtype, attention_kernel=kernel)
    params = read_params(folder, family, config, module, dtype, shardings, allow_pickle)
    if check_finite:
        bad = nonfinite_parameters(params)
        if bad:
            shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise ValueError(f"checkpoint {folder} holds NaN or infinite weights in {len(bad)} tensor(s): {shown}; "
                             "the file is damaged or was converted from a diverged run")
    return Model(family, config, module, params, Tokenizer.from_folder(folder), image_config, folder,
                 family.read_extra_tokenizer(folder))


def save_orbax_checkpoint(model: Model, out_folder: str | os.PathLike) -> Path:
    """Write params as an Orbax checkpoint plus the config, tokenizer and processor files: it loads without
    conversion, and `sharding.load_sharded` restores each device's slice straight from the files."""
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    save_params(model.params, out)
    _copy_side_files(model.path, out, dtype_name(model.module.param_dtype))
    return out


def save_hf_checkpoint(model: Model, out_folder: str | os.PathLike, dtype: Any = None, max_shard_bytes=None):
    """Write params back as a Hugging Face checkpoint (safetensors in transformers' key layout)."""
    dtype = model.module.param_dtype if dtype is None else resolve_dtype(dtype)
    tensors = flax_to_hf(model.family.conversion_table(model.config), model.params, dtype)
    out = Path(out_folder)
    write_checkpoint(tensors, out, max_shard_bytes)
    _copy_side_files(model.path, out, dtype_name(dtype))
    return out


def _copy_side_files(source: Path, out: Path, dtype: str) -> None:
    """Config (with the weights' dtype recorded), tokenizer(s) and processor files travel with converted weights."""
    config = {**read_config(source), "dtype": dtype}
    config.pop("torch_dtype", None)
    if source.resolve() != out.resolve():
        for name in _SIDE_FILES:
            if (source / name).exists():
                (out / name).write_bytes((source / name).read_bytes())
        for folder in (path for path in source.iterdir() if (path / "tokenizer.json").exists()):
            shutil.copytree(folder, out / folder.name, dirs_exist_ok=True)  # a second tokenizer (the Q-Former's)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


_SIDE_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "preprocessor_config.json", "processor_config.json", "generation_config.json", "chat_template.json",
)
