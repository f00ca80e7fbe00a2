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

from weights_conversion.hf_folder import read_json

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
        size = self.path.stat().st_size
        bad = lambda why: ValueError(f"{self.path} is not a valid safetensors file: {why}; "  # noqa: E731
                                     "it was probably cut short or damaged, so copy or convert it again")
        if size < 8:
            raise bad(f"it is {size} bytes long, shorter than the 8-byte header length")
        with open(self.path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > size - 8:
                raise bad(f"its header claims {header_size} bytes but the file holds {size - 8} after the length")
            try:
                header = json.loads(f.read(header_size))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise bad("its header is not JSON") from None
        if not isinstance(header, dict):
            raise bad("its header is not a JSON object")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_size
        for key, entry in header.items():
            _check_entry(key, entry, size - self._data_start, bad)
        self._header = header

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


def _check_entry(key: str, entry, data_size: int, bad) -> None:
    """A header entry names a known dtype, a shape and a byte range of that size inside the file's data."""
    try:
        begin, end = entry["data_offsets"]
        itemsize = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]).itemsize
        count = int(np.prod(entry["shape"], dtype=np.int64))
    except (KeyError, TypeError, ValueError):
        raise bad(f"tensor {key!r} has no valid dtype, shape and data_offsets ({entry!r})") from None
    if not 0 <= begin <= end <= data_size:
        raise bad(f"tensor {key!r} lies at bytes {begin}..{end} of a data section of {data_size} bytes")
    if end - begin != count * itemsize:
        raise bad(f"tensor {key!r} of shape {entry['shape']} ({entry['dtype']}) needs {count * itemsize} bytes, "
                  f"its range holds {end - begin}")


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
        index = read_json(folder / INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{folder / INDEX_FILE} has no 'weight_map' object naming each tensor's shard")
        missing = sorted(name for name in set(weight_map.values()) if not (folder / name).is_file())
        if missing:
            raise FileNotFoundError(f"{folder / INDEX_FILE} names shard(s) that are not in the folder: "
                                    f"{', '.join(missing)}")
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
        _save(shards[0], folder / SINGLE_FILE)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _save(shard, folder / name)
    index = {
        "metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())},
        "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names


def _save(tensors: dict[str, np.ndarray], path: Path) -> None:
    """save_file writes through a private temporary file (mode 0600): give it an ordinary file's mode."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
