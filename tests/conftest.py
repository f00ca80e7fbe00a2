"""Test-session settings and the fixtures several test files share."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

import vicrop_jax
from vicrop_jax.testing.hf_models import instructblip_config, llava_config, save_instructblip, save_llava

# On a 2-core machine, PyTorch's intra-op threads contend with XLA's CPU threads; tiny reference
# models then run orders of magnitude slower. One torch thread keeps the suite fast.
torch.set_num_threads(1)

# `vicrop_jax.load` turns on JAX's persistent compilation cache in $XDG_CACHE_HOME: the suite (and the CLI runs it
# starts) writes to a cache of its own, never the user's, and starts from an empty one.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="vicrop-jax-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


@pytest.fixture(scope="module", params=["llava", "instructblip"])
def tiny_model(request, tmp_path_factory):
    """A tiny random checkpoint of each family (56-px images), loaded as a real one is."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":
        save_llava(folder, llava_config(image_size=56, text_layers=3))
    else:
        save_instructblip(folder, instructblip_config(image_size=56))
    return vicrop_jax.load(folder)
