"""Orbax checkpoints of a parameter tree, the format `vicrop-jax convert` writes (Flax layout, no transposes).

Restored to a tree of targets that carry shardings, each device reads only its own slice from the files
(TensorStore), and the dtype is cast as it is read: a model split over a mesh never passes whole through host
memory. The slices read but not yet on their devices are bounded (`IN_FLIGHT_GB`), not the model's size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from weights_conversion.core import check_shapes

PARAMS_FOLDER = "orbax_params"
IN_FLIGHT_GB = 4  # Orbax's limit on slices read and not yet placed (its default, 96, leaves most models whole)


def is_orbax_checkpoint(folder: Path) -> bool:
    return (folder / PARAMS_FOLDER).is_dir()


def save_params(params: Any, folder: Path) -> Path:
    """Write the tree to `folder/orbax_params`, replacing an earlier one there."""
    path = (folder / PARAMS_FOLDER).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params, force=True)
    return path


def restore_params(folder: Path, targets: Any) -> Any:
    """The tree stored in `folder`, restored to `targets` (`jax.ShapeDtypeStruct`s with a sharding each).

    Keys and shapes are compared with the stored ones first, so that a checkpoint of another model is refused
    with every difference named, and a damaged one with its folder and what to do.
    """
    path = (folder / PARAMS_FOLDER).absolute()
    stored = _stored_arrays(path)
    check_shapes(_shapes(targets), _shapes(stored), source=f"Orbax checkpoint {path}")
    try:
        with ocp.StandardCheckpointer(restore_concurrent_gb=_in_flight_gb(stored)) as checkpointer:
            return checkpointer.restore(path, targets)
    except Exception as error:  # Orbax reports an unreadable chunk as a bare Exception
        raise _damaged(path, error) from error


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(key_path, simple=True, separator="/"): tuple(leaf.shape)
            for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _in_flight_gb(stored: Any) -> int:
    """IN_FLIGHT_GB, or more where one stored array is larger: Orbax refuses a read above its limit."""
    largest = max(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(stored))
    return max(IN_FLIGHT_GB, math.ceil(2 * largest / 1e9))


def _stored_arrays(path: Path) -> Any:
    """The stored tree's metadata: a shape and a dtype per array."""
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(path)
    except (OSError, ValueError) as error:
        raise _damaged(path, error) from error
    finally:
        handler.close()


def _damaged(path: Path, error: BaseException) -> ValueError:
    while error.__cause__ is not None:  # the innermost cause names the file; the outer ones wrap it
        error = error.__cause__
    reason = str(error).split(" [tensorstore_spec")[0].splitlines()[0]
    return ValueError(f"{path} is not a complete Orbax checkpoint ({reason}); it was probably cut short or damaged, "
                      f"so convert the checkpoint again (`vicrop-jax convert SOURCE {path.parent}`)")
