"""ViCrop end to end on tiny checkpoints of both models: methods, paths, batching, compilation, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

import vicrop_jax
from vicrop_jax._generation import generate_ids, pixel_values, prompt_inputs
from vicrop_jax.nn.decoding import strip_generated
from vicrop_jax.families import INSTRUCTBLIP, LLAVA
from vicrop_jax.vicrop import _api as _vicrop, _pipeline, engine
from vicrop_jax.vicrop.boxes import tile_grid
from vicrop_jax.vicrop.methods import resolve_method
from vicrop_jax.testing.hf_models import llava_config, noise_image as scene, save_llava

QUESTION = "What is the color of the small shape ?"
METHODS = ["rel_att", "grad_att", "pure_grad"]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_device_and_host_paths_agree(model, method):
    image = scene()
    device = vicrop_jax.answer(model, image, QUESTION, method, layer=1)
    host = vicrop_jax.answer(model, image, QUESTION, method, layer=1, device_pipeline=False)
    assert device.bbox == host.bbox
    assert device.bbox == vicrop_jax.select_bbox(device.importance, image.size, model.config.image_size)
    np.testing.assert_allclose(device.importance, host.importance, rtol=1e-5, atol=1e-7)
    assert device.original_answer == host.original_answer
    assert device.answer == host.answer
    grid = model.config.vision.image_size // model.config.vision.patch_size
    assert device.importance.shape == (grid, grid) and device.importance.dtype == np.float32
    assert np.isfinite(device.importance).all()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_maps_and_answers_are_the_same_with_fused_attention(model, method):
    """The map layer stays explicit (its probabilities are read); the others run fused, also under the
    gradients of grad-att and pure-grad: the same map, box and answers."""
    image = scene()
    explicit = vicrop_jax.answer(model, image, QUESTION, method, layer=1)
    fused = vicrop_jax.answer(model.with_attention("fused"), image, QUESTION, method, layer=1)
    np.testing.assert_allclose(fused.importance, explicit.importance, rtol=1e-4, atol=1e-7)
    assert (fused.bbox, fused.original_answer, fused.answer) == (explicit.bbox, explicit.original_answer,
                                                                 explicit.answer)


def test_device_crop_matches_the_host_crop_within_preprocessing_tolerance(model):
    """The jitted crop+resize vs PIL crop + the checkpoint's image processor, in normalised units."""
    image = scene(300, 200)
    box = (40, 30, 152, 142)
    device = _vicrop.device_crop(model, image, box)
    host = pixel_values(model, [image.crop(box)])[0]
    difference = np.abs(np.asarray(device) - host)
    assert difference.mean() < 0.02  # bicubic kernels differ slightly (JAX vs Pillow); see tests/test_boxes.py
    assert difference.max() < 0.5


def test_a_new_question_reuses_the_compiled_pipeline(model):
    image = scene()
    vicrop_jax.answer(model, image, QUESTION, "rel_att", layer=1)
    compiled = _pipeline.compiled_programs()
    vicrop_jax.answer(model, scene(seed=5), "What is the shape on the left ?", "rel_att", layer=1)
    vicrop_jax.answer(model, scene(160, 100, seed=6), "how many ?", "rel_att", layer=1)
    assert _pipeline.compiled_programs() == compiled


@pytest.mark.slow
def test_answer_batch_equals_one_by_one(model):
    images = [scene(), scene(90, 120, seed=1), scene(seed=2)]
    questions = [QUESTION, "What shape is on the left ?", "how many ?"]
    batched = vicrop_jax.answer_batch(model, images, questions, "grad_att", batch_size=2, layer=1)
    for result, image, question in zip(batched, images, questions):
        single = vicrop_jax.answer(model, image, question, "grad_att", layer=1)
        assert (result.bbox, result.answer, result.original_answer) == (
            single.bbox, single.answer, single.original_answer
        )
        np.testing.assert_allclose(result.importance, single.importance, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "gt", "random", "center"])
def test_baselines(model, method):
    image = scene(400, 300)
    result = vicrop_jax.answer(model, image, QUESTION, method, bbox=(200, 150, 210, 160))
    plain = vicrop_jax.answer(model, image, QUESTION, "none")
    assert result.original_answer == plain.original_answer
    if method == "none":
        assert result.bbox is None and result.answer == result.original_answer
        return
    x1, y1, x2, y2 = result.bbox
    side = model.config.image_size
    assert 0 <= x1 < x2 <= 400 and 0 <= y1 < y2 <= 300 and (x2 - x1, y2 - y1) == (side, side)
    if method == "gt":
        assert x1 <= 200 and y1 <= 150 and x2 >= 210 and y2 >= 160


@pytest.mark.slow
def test_short_question_drives_the_map_only(model):
    image = scene()
    long_question = QUESTION + " Options : red green"
    with_short = vicrop_jax.answer(model, image, long_question, "rel_att", short_question=QUESTION, layer=1)
    plain_map = vicrop_jax.importance_map(model, image, QUESTION, "rel_att", layer=1)
    np.testing.assert_allclose(with_short.importance, plain_map, rtol=1e-5)
    assert with_short.original_answer == vicrop_jax.answer(model, image, long_question, "none").answer


@pytest.mark.slow
def test_high_resolution_tiles_are_stitched(model):
    image = scene(2100, 700)
    grid = model.config.vision.image_size // model.config.vision.patch_size
    stitched = vicrop_jax.importance_map(model, image, QUESTION, "rel_att", high_res=True, layer=1)
    rows, cols, _, _ = tile_grid(image.size)
    assert (rows, cols) == (1, 3)  # rows = ceil(700 / 1024), cols = int(rows * 2100 / 700)
    assert stitched.shape == (grid * rows, grid * cols)
    result = vicrop_jax.answer(model, image, QUESTION, "rel_att", high_res=True, layer=1)
    assert result.bbox == vicrop_jax.select_bbox(stitched, image.size, model.config.image_size)


def test_bad_options_are_refused_with_the_valid_range(model):
    image = scene()
    with pytest.raises(ValueError, match=r"layer 7 is out of range: this model has LM layers 0\.\.\d"):
        vicrop_jax.importance_map(model, image, QUESTION, "rel_att", layer=7)
    with pytest.raises(ValueError, match=r"heads \[9\] invalid: LM heads are 0\.\.3"):
        vicrop_jax.importance_map(model, image, QUESTION, "rel_att", layer=1, heads=[9])
    with pytest.raises(ValueError, match="unknown method 'saliency'"):
        vicrop_jax.answer(model, image, QUESTION, "saliency")
    with pytest.raises(ValueError, match="needs the ground-truth box"):
        vicrop_jax.answer(model, image, QUESTION, "gt")
    if model.family is INSTRUCTBLIP:
        with pytest.raises(ValueError, match=r"qformer_layer 5 is out of range.*0\.\.2"):
            vicrop_jax.importance_map(model, image, QUESTION, "rel_att", layer=1, qformer_layer=5)


def test_default_map_layer_is_the_checkpoints_own_else_the_middle_one(model):
    """A config may name its map layer (`vicrop_attention_layer`); without it a shallow model uses the middle."""
    middle = model.config.text.num_layers // 2
    assert resolve_method(model, "rel_att").layer == middle
    named = dataclasses.replace(model, config=dataclasses.replace(model.config, map_layer=0))
    assert resolve_method(named, "rel_att").layer == 0
    assert resolve_method(named, "rel_att", layer=middle).layer == middle
    image = scene()
    np.testing.assert_array_equal(vicrop_jax.importance_map(named, image, QUESTION, "rel_att"),
                                  vicrop_jax.importance_map(model, image, QUESTION, "rel_att", layer=0))


def test_head_subsets_change_the_map(model):
    image = scene()
    every = vicrop_jax.importance_map(model, image, QUESTION, "rel_att", layer=1)
    first = vicrop_jax.importance_map(model, image, QUESTION, "rel_att", layer=1, heads=[0])
    assert not np.allclose(every, first)


@pytest.mark.slow
def test_viz_writes_an_overlay_png(model, tmp_path):
    image = scene(300, 200)
    result = vicrop_jax.answer(model, image, QUESTION, "rel_att", layer=1)
    picture = vicrop_jax.viz.overlay(image, result.importance, result.bbox, tmp_path / "map.png")
    saved = Image.open(tmp_path / "map.png")
    assert saved.format == "PNG" and saved.size == image.size
    x1, y1, x2, y2 = result.bbox
    assert np.asarray(picture)[y1, (x1 + x2) // 2].tolist() == [255, 0, 0]  # the box's top edge is drawn


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_prefix_cached_maps_equal_whole_prompt_maps(model, method):
    """LLaVA's maps from the shared prefix cache equal the maps of full forwards over whole prompts."""
    if model.family is not LLAVA:
        pytest.skip("InstructBLIP's prefix differs per prompt (the Q-Former reads the text)")
    image = scene()
    options = resolve_method(model, method, layer=1)
    whole = _vicrop.whole_prompt_map(model, image, QUESTION, options)
    cached = vicrop_jax.importance_map(model, image, QUESTION, method, layer=1)
    np.testing.assert_allclose(cached, np.asarray(whole), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_pure_grad_backward_keeps_each_layers_input_only(tmp_path):
    """Pure-grad's compiled map needs, per extra layer, memory for a few [tokens, width] arrays (its input, its
    cache and that cache's cotangent), not for every activation of the layer: layers are recomputed in the
    backward pass one at a time (nn.remat and the memory-optimised CPU scheduler)."""
    image = scene()

    def temporaries(layers: int) -> int:
        folder = tmp_path / str(layers)
        save_llava(folder, llava_config(image_size=112, text_layers=layers, vision_layers=layers, width=64,
                                        vision_width=64))
        model = vicrop_jax.load(folder)
        options = resolve_method(model, "pure_grad", layer=1)
        lowered = _vicrop.lower_map(model, image, QUESTION, options)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    tokens_by_width = (1 + (112 // 14) ** 2) * 64 * 4  # bytes of one [tokens, width] float32 array
    per_layer = (temporaries(5) - temporaries(2)) / 3  # one vision and one text layer each
    assert per_layer < 8 * tokens_by_width  # keeping every activation takes about 50


def test_bad_questions_are_refused_by_the_api_with_the_cli_messages(model):
    image, long = scene(), "red " * 5000
    with pytest.raises(ValueError, match="^empty question$"):
        vicrop_jax.answer(model, image, "  ")
    with pytest.raises(ValueError, match="^empty question$"):
        vicrop_jax.importance_map(model, image, "")
    calls = [lambda: vicrop_jax.answer(model, image, long), lambda: vicrop_jax.importance_map(model, image, long),
             lambda: vicrop_jax.generate(model, image, model.family.prompt(long)),
             lambda: vicrop_jax.answer_batch(model, [image], [long])]
    for call in calls:
        with pytest.raises(ValueError, match=r"question too long: \d+ tokens, model allows \d+ \(the prompt with"):
            call()


@pytest.mark.slow
def test_answer_batch_answers_the_others_when_a_record_fails(model, tmp_path):
    images = [scene(), tmp_path / "missing.png", scene(seed=2)]
    with pytest.raises(_vicrop.BatchError, match=r"1 of 3 record\(s\) failed \(record 1: unreadable image") as caught:
        vicrop_jax.answer_batch(model, images, [QUESTION] * 3, "rel_att", layer=1, batch_size=1000)
    answers = caught.value.answers
    assert answers[1] is None and caught.value.failures[0][0] == 1
    for i in (0, 2):
        single = vicrop_jax.answer(model, images[i], QUESTION, "rel_att", layer=1)
        assert (answers[i].bbox, answers[i].answer, answers[i].original_answer) == (
            single.bbox, single.answer, single.original_answer)


def test_batches_are_padded_only_to_the_devices_and_large_images_run_alone():
    assert [engine.padded_batch_size(count) for count in (1, 3, 8)] == [1, 3, 8]
    assert engine.padded_batch_size(3, devices=8) == 8 and engine.padded_batch_size(9, devices=8) == 16
    small, large = Image.new("RGB", (640, 480)), Image.new("RGB", (5000, 4000))
    assert engine.image_groups([small, large, small, large]) == [[0, 2], [1], [3]]
    assert engine.image_groups([large]) == [[0]]


def test_the_answer_step_takes_any_number_of_crops(model):
    """Two crop boxes: the device program's answer equals `generate` over the original and the same two crops."""
    image = scene(300, 200)
    boxes = np.array([[40, 30, 152, 142], [150, 60, 262, 172]], np.int32)
    crop = engine.crop_inputs(model, image, QUESTION, (2,))
    pixels = pixel_values(model, [image])[0]
    tokens, lengths = _pipeline.crop_and_answer(engine.static_model(model), model.params, pixels, crop, boxes,
                                                max_new_tokens=8)
    crops = [_vicrop.device_crop(model, image, box) for box in boxes]
    ids, image_text = prompt_inputs(model, model.family.prompt(QUESTION, 3), 3)
    expected = generate_ids(model, np.stack([pixels, *crops]), ids, 8, image_text)
    assert strip_generated(np.asarray(tokens.with_crops)) == expected and int(lengths[0]) == len(ids)
    ids, image_text = prompt_inputs(model, model.family.prompt(QUESTION), 1)
    assert strip_generated(np.asarray(tokens.original)) == generate_ids(model, pixels[None], ids, 8, image_text)
