"""Tensor-parallel placement of a model's parameters over a device mesh, for checkpoints too big for one device.

Megatron-style: a column-parallel layer splits its output features over the mesh axis, the row-parallel
layer after it splits its input features, so each attention or MLP block needs one all-reduce; embeddings
and the LM head split the vocabulary. Only the placement of the parameters changes: the model code is
untouched, because `jax.jit` propagates the input shardings through the program (GSPMD) and inserts the
collectives. Kernels are flax's [in, out], embeddings [V, D].

    mesh = sharding.make_mesh()                                # every device on one "model" axis
    model = sharding.load_sharded(path, mesh, "float32")       # or sharding.shard_model(loaded, mesh)
    print(sharding.describe(model.params, sharding.parameter_specs(model.params, axis_size=mesh.size)))
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vicrop_jax._loading import Model, load

# Layers whose output features are split (lm_head: the vocabulary) ...
_COLUMN = (r"q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|qkv|linear_1|query|key|value"
           r"|intermediate(_query)?/dense|language_projection|lm_head|merger/mlp_0")
# ... and layers whose input features are split: they consume a column-parallel layer's output.
_ROW = r"o_proj|down_proj|out_proj|fc2|linear_2|projection|output(_query)?/dense|attn/proj|merger/mlp_2"

# (regex searched in the "/"-joined parameter path, the dimension split over the mesh axis or None for
# replicated). First match wins. Paths matching no rule are replicated and reported by a warning.
RULES: tuple[tuple[str, int | None], ...] = (
    (r"/patch_embed/proj/kernel$", None),  # Qwen2.5-VL's patch embedding: small, and read by every patch
    (rf"/({_COLUMN})/kernel$", 1),
    (rf"/({_COLUMN})/bias$", 0),
    (rf"/({_ROW})/kernel$", 0),
    (rf"/({_ROW})/bias$", None),  # added once, after the all-reduce of the partial sums
    (r"/(embed_tokens|word_embeddings)/embedding$", 0),
    (r"(?i)/(\w*norm\d?|ln_q)/(scale|bias|weight)$", None),
    (r"/(position_embeddings?|patch_embedding|class_embedding|query_tokens)(/(embedding|kernel|bias))?$", None),
)

NO_RULE = "no rule"


def _path(key_path) -> str:
    return "/" + jax.tree_util.keystr(key_path, simple=True, separator="/")


def _rule_dimension(path: str) -> int | None | str:
    """The dimension RULES split for a "/"-joined path: an int, None (replicated by rule) or NO_RULE."""
    for pattern, dim in RULES:
        if re.search(pattern, path):
            return dim
    return NO_RULE


def _spec(path: str, shape: tuple[int, ...], axis: str, axis_size: int) -> PartitionSpec:
    dim = _rule_dimension(path)
    if not isinstance(dim, int) or shape[dim] % axis_size:
        return PartitionSpec()
    return PartitionSpec(*(axis if i == dim else None for i in range(len(shape))))


def parameter_specs(params: Any, axis: str = "model", *, axis_size: int) -> Any:
    """A PartitionSpec per parameter (same tree), from RULES.

    A dimension is split only when `axis_size` divides it; otherwise that parameter is replicated (e.g. a
    vocabulary of 32001 over 8 devices), which costs memory, never correctness. Parameters that no rule
    recognises are replicated too, and named in a warning, so a new layer is never silently left whole.
    `describe(params, specs)` shows the outcome per parameter. Works on arrays and on `jax.eval_shape` trees.
    """
    unmatched = [
        _path(key_path) for key_path, _ in jax.tree_util.tree_leaves_with_path(params)
        if _rule_dimension(_path(key_path)) == NO_RULE
    ]
    if unmatched:
        warnings.warn(f"no sharding rule for {len(unmatched)} parameter(s), replicated: {unmatched}", stacklevel=2)
    return jax.tree_util.tree_map_with_path(
        lambda key_path, leaf: _spec(_path(key_path), tuple(leaf.shape), axis, axis_size), params
    )


def describe(params: Any, specs: Any) -> str:
    """A table of path, shape, spec and why a parameter is replicated, then the share of parameters split."""
    rows, total, split = [], 0, 0
    for (key_path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(specs)):
        path, size = _path(key_path), int(np.prod(leaf.shape))
        dim = _rule_dimension(path)
        sharded = any(name is not None for name in spec)
        note = NO_RULE if dim == NO_RULE else ("not divisible" if isinstance(dim, int) and not sharded else "")
        rows.append(f"{path[1:]:<64} {str(tuple(leaf.shape)):<22} {str(spec):<24} {note}".rstrip())
        total, split = total + size, split + size * sharded
    rows.append(f"{split:,} of {total:,} parameter values split ({100 * split / max(total, 1):.2f}%)")
    return "\n".join(rows)


def make_mesh(num_devices: int | None = None, axis: str = "model") -> Mesh:
    """A one-axis mesh over the first `num_devices` of `jax.devices()` (all by default).

    The axis is `Auto`, so jit propagates shardings by itself (jax.make_mesh defaults to `Explicit`,
    which would require sharding annotations in the model code).
    """
    devices = jax.devices()[:num_devices]
    return jax.make_mesh((len(devices),), (axis,), (jax.sharding.AxisType.Auto,), devices=devices)


def _named_shardings(params: Any, mesh: Mesh, axis: str = "model") -> Any:
    """A NamedSharding per parameter (arrays or a `jax.eval_shape` tree), from `parameter_specs`."""
    specs = parameter_specs(params, axis, axis_size=mesh.shape[axis])
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs)


def shard_model(model: Model, mesh: Mesh, axis: str = "model") -> Model:
    """The model with every parameter placed on the mesh by `parameter_specs`; generate/answer run unchanged.

    The model's parameters must fit where they are now; for a checkpoint that fits no single device use
    `load_sharded`, which never puts the whole tree on one.
    """
    return dataclasses.replace(model, params=jax.device_put(model.params, _named_shardings(model.params, mesh, axis)))


def load_sharded(
    path_or_repo_id: str | os.PathLike, mesh: Mesh, dtype: Any = "float32", *, axis: str = "model",
    allow_pickle: bool = False,
) -> Model:
    """`vicrop_jax.load`, with every parameter split over the mesh by `parameter_specs`, never whole on one device.

    From an Orbax checkpoint (`vicrop-jax convert`) each device restores its own slice from the files, so the
    host never holds the whole tree; HF safetensors are converted on the host first, the whole tree at once.
    """
    return load(path_or_repo_id, dtype, allow_pickle=allow_pickle,
                shardings=lambda abstract: _named_shardings(abstract, mesh, axis))
