"""The PyTorch reference of the release's whole Qwen2.5-VL procedure (`torch_reference.vicrop_qwen2_5_vl`) against
`vicrop_jax.answer` on a tiny random checkpoint: same box, same answers; and its pieces (the release's resize before
the processor, the high-pass mask on a non-square image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import vicrop_jax
from benchmarks import torch_reference as ref
from vicrop_jax.testing.hf_models import noise_image, qwen2_5_vl_config, save_qwen2_5_vl
from vicrop_jax.vicrop.maps import high_pass_mask

QUESTION = "What is the color of the shape ?"
SIZES = [(260, 150), (120, 250)]  # several attention windows; a portrait image whose grid is taller than wide


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: thread hand-offs cost more than the work on a shared CPU
    folder = tmp_path_factory.mktemp("qwen")
    torch_model = save_qwen2_5_vl(folder, qwen2_5_vl_config(text_layers=3))
    model = vicrop_jax.load(folder, "float32")
    # the family's budget (the release's 256 * 28 * 28, capped by this checkpoint's smaller max_pixels)
    processor = ref.qwen_image_processor(folder, model.family.pixel_budget(model))
    yield model, (torch_model, AutoTokenizer.from_pretrained(folder), processor)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["rel_att", "grad_att"])
def test_the_release_procedure_gives_our_box_and_answers(qwen, method):
    model, reference = qwen
    layer = model.config.text.num_layers // 2
    for seed, size in enumerate(SIZES):
        image = noise_image(*size, seed=seed + 3)
        original, with_crop, bbox = ref.vicrop_qwen2_5_vl(*reference, image, QUESTION, method, layer=layer,
                                                          max_new_tokens=4)
        ours = vicrop_jax.answer(model, image, QUESTION, method, layer=layer, max_new_tokens=4)
        assert ours.boxes == (bbox,)
        assert (ours.original_answer, ours.answer) == (original.strip(), with_crop.strip())


def test_method_none_answers_without_a_box(qwen):
    model, reference = qwen
    image = noise_image(*SIZES[0], seed=3)
    original, with_crop, bbox = ref.vicrop_qwen2_5_vl(*reference, image, QUESTION, "none", max_new_tokens=4)
    assert bbox is None and original == with_crop
    assert vicrop_jax.answer(model, image, QUESTION, "none", max_new_tokens=4).answer == original.strip()


@pytest.mark.parametrize("size, expected", [((640, 480), (644, 476)), ((640, 427), (644, 420)),
                                            ((260, 150), (252, 140)), ((300, 300), (308, 308)), ((30, 20), (84, 56)),
                                            ((6000, 4000), (4368, 2912))])
def test_qwen_vl_utils_resize_rounds_to_multiples_of_28(size, expected):
    """fetch_image's defaults: nearest multiples of 28, the area within [4, 16384] * 28 * 28."""
    assert ref.qwen_vl_utils_resize(noise_image(*size)).size == expected


def test_high_pass_mask_on_a_non_square_image_equals_ours():
    image = noise_image(90, 60, seed=1)
    expected = high_pass_mask(image, (112, 56))
    assert expected.shape == (56, 112)
    np.testing.assert_array_equal(ref.high_pass_mask(image, (112, 56)), expected)
