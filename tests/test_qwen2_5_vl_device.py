"""Qwen2.5-VL on the device pipeline: crops resized on the device to the processor's size for each box, the
prompts' image blocks cut to the crops' token counts there, batches vmapped. The host path (PIL crop, the numpy
processor, `generate`) is the oracle: same boxes, same answers."""

from __future__ import annotations

import numpy as np
import pytest

import vicrop_jax
from vicrop_jax.testing.hf_models import noise_image, qwen2_5_vl_config, save_qwen2_5_vl
from vicrop_jax.vicrop import _pipeline

QUESTION = "What is the color of the shape ?"
# landscape, portrait and odd sizes, over three model shapes (grouped KV heads, full attention in block 0, a
# window of 56 px or 112 px)
CASES = {
    "landscape": (dict(text_layers=3), (260, 150)),
    "portrait": (dict(width=48, num_kv_heads=1, mrope_section=(2, 2, 2), depth=2, fullatt_block_indexes=(0,),
                      window_size=112), (120, 250)),
    "odd": (dict(num_heads=2, num_kv_heads=2, mrope_section=(4, 2, 2), depth=2, vision_heads=4), (333, 177)),
}


def saved_case(name: str, tmp_path_factory):
    options, size = CASES[name]
    folder = tmp_path_factory.mktemp(name)
    save_qwen2_5_vl(folder, qwen2_5_vl_config(**options))
    return vicrop_jax.load(folder, "float32"), noise_image(*size, seed=3)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return saved_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def landscape(tmp_path_factory):
    """The option and batch tests run on one model shape (the maps and crops are family code, checked above on
    every shape)."""
    return saved_case("landscape", tmp_path_factory)


@pytest.mark.parametrize("method", ["rel_att", "grad_att", "pure_grad"])
def test_device_boxes_and_answers_equal_the_host_path(case, method):
    model, image = case
    device = vicrop_jax.answer(model, image, QUESTION, method, max_new_tokens=4)
    host = vicrop_jax.answer(model, image, QUESTION, method, max_new_tokens=4, device_pipeline=False)
    assert device.boxes == host.boxes
    assert (device.answer, device.original_answer) == (host.answer, host.original_answer)
    np.testing.assert_allclose(device.importance, host.importance, rtol=1e-4)
    assert device.cost == host.cost


def test_regions_and_given_boxes_equal_the_host_path(landscape):
    model, image = landscape
    device = vicrop_jax.answer(model, image, QUESTION, "rel_att", regions=2, max_new_tokens=4)
    host = vicrop_jax.answer(model, image, QUESTION, "rel_att", regions=2, max_new_tokens=4, device_pipeline=False)
    assert len(device.boxes) == 2 and device.boxes == host.boxes and device.answer == host.answer
    box = (5, 7, image.width - 3, image.height // 2)  # a wide box the processor downscales
    device = vicrop_jax.answer(model, image, QUESTION, "gt", bbox=box, max_new_tokens=4)
    host = vicrop_jax.answer(model, image, QUESTION, "gt", bbox=box, max_new_tokens=4, device_pipeline=False)
    assert device.boxes == host.boxes and device.answer == host.answer and device.cost == host.cost


def compiled_batches() -> int:
    return sum(program._cache_size() for program in _pipeline.pipeline_batch.programs)


@pytest.mark.slow
def test_a_batch_of_mixed_sizes_is_one_program_and_equals_single_answers(landscape):
    model, _ = landscape
    sizes = [(260, 150), (120, 250), (333, 177), (90, 300), (300, 300), (500, 120), (64, 64), (200, 201)]
    images = [noise_image(*size, seed=i) for i, size in enumerate(sizes)]
    before = compiled_batches()
    batch = vicrop_jax.answer_batch(model, images, [QUESTION] * len(images), "rel_att", max_new_tokens=3)
    assert compiled_batches() - before == 1
    for image, answer in zip(images[:3], batch[:3]):
        single = vicrop_jax.answer(model, image, QUESTION, "rel_att", max_new_tokens=3)
        assert (answer.boxes, answer.answer, answer.original_answer) == (single.boxes, single.answer,
                                                                           single.original_answer)
        np.testing.assert_allclose(answer.importance, single.importance, rtol=1e-4)


@pytest.mark.slow
def test_method_auto_and_the_gate_run_on_the_device(landscape):
    model, image = landscape
    chosen = vicrop_jax.answer(model, image, QUESTION, "auto", max_new_tokens=3)
    assert chosen.chosen in ("rel_att", "grad_att") and len(chosen.boxes) == 1
    single = vicrop_jax.answer(model, image, QUESTION, chosen.chosen, max_new_tokens=3)
    assert chosen.boxes == single.boxes and chosen.answer == single.answer
    images = [image, noise_image(90, 300, seed=5)]
    gated = vicrop_jax.answer_batch(model, images, [QUESTION] * 2, "rel_att", gate=1.0, max_new_tokens=3)
    plain = vicrop_jax.answer_batch(model, images, [QUESTION] * 2, "rel_att", max_new_tokens=3)
    for with_gate, without in zip(gated, plain):
        assert 0 < with_gate.confidence <= 1 and with_gate.boxes == without.boxes
        assert with_gate.answer == without.answer
