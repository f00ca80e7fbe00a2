"""ViCrop on Qwen2.5-VL: the three maps against transformers + torch.autograd on the image's own token grid, and
`answer` end to end for every method."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Qwen2VLImageProcessor

import vicrop_jax
from vicrop_jax._generation import encode_images
from vicrop_jax.cli import main
from vicrop_jax.nn.decoding import greedy_generate
from vicrop_jax.prompts import GENERAL_QUESTION, qwen2_5_vl_prompt
from vicrop_jax.testing.hf_models import noise_image, qwen2_5_vl_config, save_qwen2_5_vl
from vicrop_jax.vicrop import _pipeline
from vicrop_jax.vicrop.maps import high_pass_mask
from vicrop_jax.qwen_preprocessing import resized_size
from benchmarks import torch_reference

QUESTION = "What is the color of the shape ?"
# a landscape image of several windows, and a portrait one with grouped KV heads and full attention in block 0
CASES = {
    "landscape": (dict(text_layers=3), (260, 150)),
    "portrait": (dict(width=48, num_kv_heads=1, mrope_section=(2, 2, 2), depth=2, fullatt_block_indexes=(0,),
                      window_size=112), (120, 250)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    options, size = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    torch_model = save_qwen2_5_vl(folder, qwen2_5_vl_config(**options))
    return vicrop_jax.load(folder, "float32"), torch_model, noise_image(*size, seed=3)


def torch_inputs(model, image, question):
    """transformers' inputs of a map prompt: its image processor at the map budget, our expanded ids."""
    processor = Qwen2VLImageProcessor(min_pixels=model.image_config.min_pixels,
                                      max_pixels=model.family.pixel_budget(model))
    processed = processor(images=[image], return_tensors="pt")
    _, h, w = processed["image_grid_thw"][0].tolist()
    prompt = qwen2_5_vl_prompt(question)
    ids, _ = model.family.prompt_inputs(model, prompt, 1, [h * w // 4])
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"],
                mm_token_type_ids=(input_ids == model.config.image_token_id).int())


@pytest.mark.parametrize("method", ["rel_att", "grad_att", "pure_grad"])
def test_maps_equal_transformers_and_autograd_on_the_image_grid(case, method):
    model, torch_model, image = case
    ours = vicrop_jax.importance_map(model, image, QUESTION, method)
    size = resized_size(*image.size, model.image_config, model.family.pixel_budget(model))
    mask = high_pass_mask(image, size) if method == "pure_grad" else None
    layer = model.config.text.num_layers // 2
    expected = torch_reference.qwen2_5_vl_maps(
        torch_model, torch_inputs(model, image, QUESTION), torch_inputs(model, image, GENERAL_QUESTION),
        method=method, layer=layer, high_pass=mask)
    assert ours.shape == expected.shape == (size[1] // 28, size[0] // 28)
    assert np.isfinite(ours).all() and ours.std() > 0
    np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def compiled():
    return _pipeline.compiled_programs() + greedy_generate._cache_size() + encode_images._cache_size()


@pytest.mark.parametrize("method", ["rel_att", "grad_att", "pure_grad", "none", "center", "random", "gt"])
def test_answer_runs_every_method_and_a_second_question_compiles_nothing(case, method):
    model, _, image = case
    if method in ("center", "random", "gt") and image.width < image.height:
        pytest.skip("the crop baselines' boxes do not depend on the model: the landscape case covers them")
    bbox = (10, 20, 60, 90) if method == "gt" else None
    first = vicrop_jax.answer(model, image, QUESTION, method, bbox=bbox, max_new_tokens=3)
    before = compiled()
    other = noise_image(*image.size, seed=11)
    second = vicrop_jax.answer(model, other, "What shape is in the image ?", method, bbox=bbox, max_new_tokens=3)
    assert compiled() == before
    for result in (first, second):
        assert isinstance(result.answer, str) and isinstance(result.original_answer, str)
        for left, top, right, bottom in result.boxes:
            assert 0 <= left < right <= image.width and 0 <= top < bottom <= image.height
    assert (len(first.boxes) == 0) == (method == "none")
    if method in ("rel_att", "grad_att", "pure_grad"):
        budget = model.family.pixel_budget(model)
        assert first.importance.shape == tuple(d // 28 for d in resized_size(*image.size, model.image_config,
                                                                              budget))[::-1]


def test_the_crop_answers_as_a_second_image(case):
    """The answer with the crop equals generate() over the original and the crop, as the release asks it."""
    model, _, image = case
    result = vicrop_jax.answer(model, image, QUESTION, "rel_att", max_new_tokens=4)
    [box] = result.boxes
    expected = vicrop_jax.generate(model, [image, image.crop(box)], qwen2_5_vl_prompt(QUESTION, 2), max_new_tokens=4)
    assert result.answer == expected
    assert result.original_answer == vicrop_jax.generate(model, image, qwen2_5_vl_prompt(QUESTION), max_new_tokens=4)


def test_vicrop_jax_eval_runs_a_qwen_checkpoint(tmp_path):
    folder = tmp_path / "qwen"
    save_qwen2_5_vl(folder, qwen2_5_vl_config())
    (tmp_path / "images").mkdir()
    records = []
    for i, size in enumerate([(260, 150), (120, 250), (300, 300)]):
        noise_image(*size, seed=i).save(tmp_path / "images" / f"{i}.png")
        records.append({"id": f"q{i}", "question": QUESTION, "labels": ["red"], "image_path": f"{i}.png"})
    (tmp_path / "bench.json").write_text(json.dumps(records))
    out = tmp_path / "results.jsonl"
    assert main(["eval", "--data", str(tmp_path / "bench.json"), "--images", str(tmp_path / "images"), "--model",
                 str(folder), "--method", "rel_att", "--batch-size", "2", "--max-new-tokens", "3",
                 "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    model = vicrop_jax.load(folder, "float32")
    expected = vicrop_jax.answer(model, tmp_path / "images" / "1.png", QUESTION, "rel_att", max_new_tokens=3)
    assert [line["id"] for line in lines] == ["q0", "q1", "q2"] and all(line["error"] is None for line in lines)
    assert lines[1]["crop_answer"] == expected.answer and lines[1]["bbox"] == list(expected.bbox)
