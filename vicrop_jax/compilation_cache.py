"""JAX's persistent compilation cache in the user's cache folder, so that a second run of the same programs
(the demo, an eval resumed, a notebook restarted) reads them from disk instead of compiling them again.

A cache folder the user already chose (`jax.config.update("jax_compilation_cache_dir", ...)` or the
`JAX_COMPILATION_CACHE_DIR` variable) is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def default_cache_folder() -> Path:
    """$XDG_CACHE_HOME/vicrop_jax/jax-compilation-cache (~/.cache when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vicrop_jax" / "jax-compilation-cache"


def enable_compilation_cache(folder: str | os.PathLike | None = None) -> Path:
    """Turn the persistent cache on (idempotent) and return the folder it writes to."""
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return Path(chosen)
    folder = Path(folder) if folder is not None else default_cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # every program of a ViCrop run is worth keeping: JAX's default skips those compiled in under a second
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder
