"""Test-session settings and the fixtures several test files share."""

import pytest
import torch

import vicrop_jax
from vicrop_jax.testing.hf_models import instructblip_config, llava_config, save_instructblip, save_llava

# On a 2-core machine, PyTorch's intra-op threads contend with XLA's CPU threads; tiny reference
# models then run orders of magnitude slower. One torch thread keeps the suite fast.
torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["llava", "instructblip"])
def tiny_model(request, tmp_path_factory):
    """A tiny random checkpoint of each family (56-px images), loaded as a real one is."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":
        save_llava(folder, llava_config(image_size=56, text_layers=3))
    else:
        save_instructblip(folder, instructblip_config(image_size=56))
    return vicrop_jax.load(folder)
