"""Test-session settings and the fixtures several test files share."""

import atexit
import os
import shutil
import tempfile

import jax
import pytest
import torch

import vicrop_jax
from vicrop_jax.testing.hf_models import instructblip_config, llava_config, save_instructblip, save_llava

# On a 2-core machine, PyTorch's intra-op threads contend with XLA's CPU threads; tiny reference
# models then run orders of magnitude slower. One torch thread keeps the suite fast.
torch.set_num_threads(1)

# Compiling dominates the suite's time (thousands of small programs, each run a few times): LLVM's cheapest
# optimisation level compiles about a third faster, in this process and the ones it starts. JAX reads the flag
# when its backend starts, at the first computation, after these imports.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

# `vicrop_jax.load` turns on JAX's persistent compilation cache in $XDG_CACHE_HOME: the suite (and the CLI runs it
# starts) writes to a cache of its own, never the user's, and starts from an empty one.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="vicrop-jax-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
# ... but not in this process, whose thousands of programs are not worth serializing; the processes the suite
# starts (tests/test_compilation_cache.py's among them) keep the cache on.
jax.config.update("jax_enable_compilation_cache", False)


@pytest.fixture(scope="module", autouse=True)
def fresh_compilation_caches():
    """Drop every compiled program after each test file. Each one holds a few memory mappings; the whole suite's
    programs together pass Linux's default limit of 65,530 per process, and XLA then crashes while compiling."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="module", params=["llava", "instructblip"])
def tiny_model(request, tmp_path_factory):
    """A tiny random checkpoint of each family (56-px images), loaded as a real one is."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":
        save_llava(folder, llava_config(image_size=56, text_layers=3))
    else:
        save_instructblip(folder, instructblip_config(image_size=56))
    return vicrop_jax.load(folder)
