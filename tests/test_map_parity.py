"""Our JAX importance maps vs the PyTorch reference (transformers + torch.autograd) on the same weights."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

import vicrop_jax
from vicrop_jax._generation import pixel_values, prompt_inputs
from vicrop_jax.families import LLAVA
from vicrop_jax.vicrop.maps import high_pass_mask
from vicrop_jax.prompts import GENERAL_QUESTION
from vicrop_jax.testing.hf_models import instructblip_config, llava_config, save_instructblip, save_llava

from benchmarks import torch_reference

pytestmark = pytest.mark.slow

QUESTION = "What is the color of the small shape ?"


@pytest.fixture(scope="module", params=["llava", "instructblip"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":
        reference = save_llava(folder, llava_config(image_size=56, text_layers=3, num_kv_heads=2))
    else:
        reference = save_instructblip(folder, instructblip_config(image_size=56))
    return vicrop_jax.load(folder), reference


def reference_map(model, reference, image, method, **options):
    """The same map from the PyTorch reference, fed the same token ids and pixels."""
    pixels = torch.tensor(pixel_values(model, [image]).transpose(0, 3, 1, 2))
    question, question_text = prompt_inputs(model, model.family.prompt(QUESTION), 1)
    general, general_text = prompt_inputs(model, model.family.prompt(GENERAL_QUESTION), 1)
    high_pass = torch_reference.high_pass_mask(image, model.config.image_size)
    ids = lambda tokens: torch.tensor([tokens])
    if model.family is LLAVA:
        return torch_reference.llava_maps(reference, ids(question), ids(general), pixels, method=method,
                                          high_pass=high_pass, **options)
    text = lambda arrays: [torch.tensor(a[:, : int(arrays[1].sum())]) for a in arrays]
    return torch_reference.instructblip_maps(
        reference, ids(question), ids(general), *text(question_text), *text(general_text), pixels,
        method=method, high_pass=high_pass, **options,
    )


def scene(seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (110, 150, 3), np.uint8))


@pytest.mark.parametrize("method", ["rel_att", "grad_att", "pure_grad"])
@pytest.mark.parametrize("options", [{}, {"heads": [0, 2]}, {"clip_negative": False}], ids=["all", "heads", "raw"])
def test_maps_match_the_torch_reference(pair, method, options):
    model, reference = pair
    if method != "grad_att" and "clip_negative" in options:
        pytest.skip("clip_negative only changes grad-att")
    image = scene()
    ours = vicrop_jax.importance_map(model, image, QUESTION, method, layer=1, **options)
    theirs = reference_map(model, reference, image, method, layer=1, **options)
    assert ours.shape == theirs.shape
    relative = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert relative <= 1e-3, relative


def test_high_pass_mask_matches_the_reference():
    image = Image.fromarray(np.random.RandomState(4).randint(0, 255, (90, 130, 3), np.uint8))
    ours, theirs = high_pass_mask(image, 56), torch_reference.high_pass_mask(image, 56)
    assert ours.dtype == bool and ours.shape == (56, 56)
    assert (ours != theirs).mean() < 1e-3  # float32 blur rounding may flip a pixel sitting on the median
