"""Declarative HF <-> Flax conversion: a table {flax path: (HF key, transform)} applied both ways.

The table is checked against the model's abstract parameters (`jax.eval_shape(module.init, ...)`),
and the checkpoint against the table: every missing, unexpected or mis-shaped tensor is named in
one error. A missing weight is never random-initialised.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

FlaxPath = tuple[str, ...]

# Buffers that transformers may store but that are recomputed, never learned.
IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class Transform:
    """A reversible array map between the HF layout and the Flax layout."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
LINEAR = Transform("linear", lambda w: w.T, lambda k: k.T)  # torch [out, in] <-> flax [in, out]
CONV2D = Transform(  # torch [out, in, kh, kw] <-> flax HWIO
    "conv2d", lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)
)

Table = dict[FlaxPath, tuple[str, Transform]]


def dense(flax_prefix: FlaxPath, hf_prefix: str, bias: bool = True) -> Table:
    table: Table = {flax_prefix + ("kernel",): (f"{hf_prefix}.weight", LINEAR)}
    if bias:
        table[flax_prefix + ("bias",)] = (f"{hf_prefix}.bias", IDENTITY)
    return table


def layer_norm(flax_prefix: FlaxPath, hf_prefix: str) -> Table:
    return {
        flax_prefix + ("scale",): (f"{hf_prefix}.weight", IDENTITY),
        flax_prefix + ("bias",): (f"{hf_prefix}.bias", IDENTITY),
    }


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match what the config says the model has."""


def _hf_shape(shape: tuple[int, ...], transform: Transform) -> tuple[int, ...]:
    return transform.to_hf(np.broadcast_to(np.zeros((), np.float32), shape)).shape


def check_table(table: Table, abstract_params: Any) -> None:
    """The table must cover the model's parameters exactly; a gap here is a bug in vicrop_jax."""
    flat = traverse_util.flatten_dict(abstract_params)
    missing = sorted("/".join(p) for p in set(flat) - set(table))
    extra = sorted("/".join(p) for p in set(table) - set(flat))
    if missing or extra:
        raise RuntimeError(f"conversion table out of sync with the model: unmapped {missing}, unknown {extra}")


def check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise one error naming every missing, mis-shaped or unexpected tensor (recomputed buffers may be extra)."""
    problems = []
    for key, want in sorted(expected.items()):
        if key not in found:
            problems.append(f"- missing    {key} (expected shape {want})")
        elif found[key] != want:
            problems.append(f"~ mis-shaped {key}: expected {want}, found {found[key]}")
    for key in sorted(set(found) - set(expected)):
        if not key.endswith(IGNORED_SUFFIXES):
            problems.append(f"+ unexpected {key} (shape {found[key]})")
    if problems:
        raise CheckpointMismatchError(
            f"{source} does not match the model its config describes ({len(problems)} problem(s)):\n"
            + "\n".join(problems)
        )


def hf_to_flax(
    table: Table, tensors: Mapping[str, np.ndarray], abstract_params: Any, dtype: Any, source: str = "checkpoint"
) -> dict:
    """Build the nested Flax parameter dict from HF tensors; raise one error naming every mismatch."""
    check_table(table, abstract_params)
    flat_abstract = traverse_util.flatten_dict(abstract_params)
    expected = {hf_key: (path, transform) for path, (hf_key, transform) in table.items()}
    shape_of = getattr(tensors, "shape", lambda k: tuple(tensors[k].shape))
    check_shapes(
        {hf_key: _hf_shape(tuple(flat_abstract[path].shape), transform)
         for hf_key, (path, transform) in expected.items()},
        {key: tuple(shape_of(key)) for key in tensors},
        source,
    )
    flat = {
        path: np.asarray(transform.to_flax(np.asarray(tensors[hf_key]))).astype(dtype)
        for hf_key, (path, transform) in expected.items()
    }
    return traverse_util.unflatten_dict(flat)


def flax_to_hf(table: Table, params: Any, dtype: Any = None) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_flax`: HF key -> numpy array, in `dtype` if given."""
    flat = traverse_util.flatten_dict(params)
    check_table(table, params)
    out = {}
    for path, (hf_key, transform) in table.items():
        array = np.asarray(jax.device_get(flat[path]))
        out[hf_key] = np.ascontiguousarray(transform.to_hf(array if dtype is None else array.astype(dtype)))
    return out


def rename_keys(tensors: Mapping[str, np.ndarray], aliases: tuple[tuple[str, str], ...]) -> "RenamedTensors":
    """Map alternative key prefixes (other transformers versions) onto the table's canonical ones."""
    source = {}
    for key in tensors:
        new = key
        for old_prefix, new_prefix in aliases:
            if key.startswith(old_prefix):
                new = new_prefix + key[len(old_prefix):]
                break
        source[new] = key
    return RenamedTensors(tensors, source)


class RenamedTensors(Mapping[str, np.ndarray]):
    """A lazy view of a checkpoint under canonical key names."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: dict[str, str]):
        self._tensors, self._source = tensors, source

    def __getitem__(self, key):
        return self._tensors[self._source[key]]

    def shape(self, key):
        original = self._source[key]
        if hasattr(self._tensors, "shape"):
            return tuple(self._tensors.shape(original))
        return tuple(self._tensors[original].shape)

    def __iter__(self):
        return iter(self._source)

    def __len__(self):
        return len(self._source)


def resolve_checkpoint_folder(path_or_repo_id: str | os.PathLike) -> Path:
    """A local folder as given, or a repo id ("org/name") looked up in the local HF cache, offline."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        cache = Path(
            os.environ.get("HF_HUB_CACHE")
            or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
        )
        repo = cache / ("models--" + name.replace("/", "--"))
        ref = repo / "refs" / "main"
        if ref.exists():
            snapshot = repo / "snapshots" / ref.read_text().strip()
            if snapshot.is_dir():
                return snapshot
        snapshots = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
        if snapshots:
            return snapshots[-1]
        raise FileNotFoundError(
            f"{name!r} is not a folder and not in the local Hugging Face cache ({repo}). vicrop_jax never "
            f"downloads: fetch it once with `hf download {name}` where a network is available, "
            "or pass the folder that holds config.json and the safetensors."
        )
    raise FileNotFoundError(f"{path} is not a folder with a checkpoint (config.json + safetensors)")
