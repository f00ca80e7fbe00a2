"""Lazy reading and writing of Hugging Face safetensors checkpoints, without torch.

Tensors are memory-mapped (bfloat16 included, through ml_dtypes), so a sharded 7B checkpoint
is read one tensor at a time. PyTorch pickles (`*.bin`) are refused unless explicitly allowed,
since unpickling can run code.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping key -> memory-mapped array over one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
        header.pop("__metadata__", None)
        self._header = header
        self._data_start = 8 + header_size

    def __getitem__(self, key: str) -> np.ndarray:
        entry = self._header[key]
        begin, end = entry["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start + begin, shape=(end - begin,))
        return raw.view(dtype).reshape(entry["shape"])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)


class Checkpoint(Mapping[str, np.ndarray]):
    """All tensors of a checkpoint folder (one file or shards listed by the index), read lazily."""

    def __init__(self, files: dict[str, SafetensorsFile]):
        self._file_of = files

    def __getitem__(self, key: str) -> np.ndarray:
        return self._file_of[key][key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file_of[key].shape(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def open_checkpoint(folder: str | os.PathLike, allow_pickle: bool = False, filename: str | None = None):
    """Open the weights of a checkpoint folder.

    Reads `model.safetensors` or the shards named by `model.safetensors.index.json` (or any other
    single `*.safetensors` when `filename` is given). A folder with only `pytorch_model*.bin` is
    refused unless `allow_pickle=True`, which reads it with `torch.load(weights_only=True)`.
    """
    folder = Path(folder)
    if filename is not None:
        single = SafetensorsFile(folder / filename)
        return Checkpoint({key: single for key in single})
    if (folder / INDEX_FILE).exists():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        shards = {name: SafetensorsFile(folder / name) for name in sorted(set(weight_map.values()))}
        files = {key: shards[name] for key, name in weight_map.items()}
        for shard in shards.values():  # keys present in a shard but missing from the index still count
            for key in shard:
                files.setdefault(key, shard)
        return Checkpoint(files)
    if (folder / SINGLE_FILE).exists():
        return open_checkpoint(folder, filename=SINGLE_FILE)
    pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if pickles:
        if allow_pickle:
            return _read_pickles(folder, pickles)
        raise ValueError(
            f"{folder} holds only PyTorch pickle weights ({', '.join(pickles)}). Pickles can run code when "
            "loaded, so vicrop_jax reads safetensors only. Convert them once with transformers: "
            "`LlavaForConditionalGeneration.from_pretrained(folder).save_pretrained(out_folder)` (which writes "
            "safetensors), or pass allow_pickle=True to read them with torch.load(weights_only=True)."
        )
    raise FileNotFoundError(
        f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
    )


def _read_pickles(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    import torch  # only on explicit opt-in

    tensors: dict[str, np.ndarray] = {}
    for name in names:
        state = torch.load(folder / name, map_location="cpu", weights_only=True)
        for key, value in state.items():
            value = value.detach()
            tensors[key] = (
                value.float().numpy().astype(ml_dtypes.bfloat16) if value.dtype == torch.bfloat16 else value.numpy()
            )
    return tensors


def write_checkpoint(
    tensors: Mapping[str, np.ndarray], folder: str | os.PathLike, max_shard_bytes: int | None = None
) -> list[str]:
    """Write tensors as `model.safetensors`, or as shards plus an index when they exceed max_shard_bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        if max_shard_bytes is not None and shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = array
        size += array.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())},
        "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names
