"""The embedded model vicrop-tiny, the synthetic data it was trained on, and the scripts that made it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

import vicrop_jax
from vicrop_jax._generation import pixel_values, prompt_ids
from vicrop_jax._loading import checkpoint_folder
from vicrop_jax.cli import DEMO_INDEX, DEMO_SEED
from vicrop_jax.cli import main as cli_main
from vicrop_jax.evaluation.datasets import read_dataset
from vicrop_jax.evaluation.metrics import attention_ratio
from vicrop_jax.families import LLAVA
from vicrop_jax.prompts import llava_prompt
from vicrop_jax.testing.synthetic import (
    BACKGROUNDS, BOX_COLOURS, FAR_APART, MAX_ASPECT, QUESTION_TYPES, RELATIVE_BOX_SIDES, SHAPES, make_record,
    make_scene, write_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 1


@pytest.fixture(scope="module")
def model():
    return vicrop_jax.load("vicrop-tiny")


def test_records_are_reproducible_and_seeds_differ():
    first, again, other = make_record(1, 7), make_record(1, 7), make_record(2, 7)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert (first.question, first.answer, first.bbox) == (again.question, again.answer, again.bbox)
    assert first.image.size != other.image.size or not np.array_equal(np.asarray(first.image), np.asarray(other.image))


def test_records_hold_a_red_box_around_the_answer_at_spread_sizes():
    records = [make_record(HELD_OUT_SEED, i) for i in range(60)]
    for record in records:
        x1, y1, x2, y2 = record.bbox
        pixels = np.asarray(record.image)
        assert tuple(pixels[y1, (x1 + x2) // 2]) == BOX_COLOURS["red"]
        assert record.answer in SHAPES and record.question == "What shape is in the red box?"
        assert 0 <= x1 < x2 <= record.image.width and 0 <= y1 < y2 <= record.image.height
    sizes = [r.relative_size for r in records]
    assert min(sizes) < 0.06 and max(sizes) > 0.2 and RELATIVE_BOX_SIDES[0] - 0.01 < min(sizes)


def test_written_dataset_is_in_the_spec_format(tmp_path):
    path = write_dataset(tmp_path, seed=5, count=3)
    records = read_dataset(path)
    for index, record in enumerate(records):
        expected = make_record(5, index)
        assert record.labels == (expected.answer,) and tuple(record.bbox) == expected.bbox
        assert Image.open(tmp_path / "images" / record.image_path).size == expected.image.size


@pytest.mark.parametrize("question_type", QUESTION_TYPES)
def test_version_2_scenes_are_reproducible_and_hold_their_ground_truth(question_type):
    records = [make_scene(HELD_OUT_SEED, i, question_type, ("square", "landscape", "portrait")[i % 3])
               for i in range(36)]
    again = make_scene(HELD_OUT_SEED, 5, question_type, "portrait")
    assert np.array_equal(np.asarray(again.image), np.asarray(records[5].image)) and again.answer == records[5].answer
    for i, record in enumerate(records):
        width, height = record.image.size
        aspect = ("square", "landscape", "portrait")[i % 3]
        assert record.question_type == question_type and record.aspect == aspect
        assert (width == height) == (aspect == "square") and max(width, height) <= MAX_ASPECT * min(width, height) + 1
        assert (width > height) == (aspect == "landscape")
        for x1, y1, x2, y2 in record.bboxes:
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert tuple(np.asarray(record.image)[y1, (x1 + x2) // 2]) in BOX_COLOURS.values()
        left, top, right, bottom = record.bbox  # one region holding every box the answer needs
        assert all(left <= b[0] and top <= b[1] and b[2] <= right and b[3] <= bottom for b in record.bboxes)
    answers = [r.answer for r in records]
    if question_type == "two_region":
        assert set(answers) == {"yes", "no"} and 0.25 < answers.count("yes") / len(answers) < 0.75
        for record in records:
            (a, b) = [((x1 + x2) / 2, (y1 + y2) / 2) for x1, y1, x2, y2 in record.bboxes]
            assert np.hypot(a[0] - b[0], a[1] - b[1]) >= FAR_APART * np.hypot(*record.image.size) - 1
    elif question_type == "counting":
        assert set(answers) <= {"0", "1", "2", "3", "4"} and len(set(answers)) >= 3
        assert all(2 <= len(r.bboxes) <= 4 and int(r.answer) <= len(r.bboxes) for r in records)
    else:
        assert set(answers) <= set(SHAPES) and all(len(r.bboxes) == 1 for r in records)


def test_version_2_keeps_version_1_single_detail_records_and_writes_every_type(tmp_path):
    assert np.array_equal(np.asarray(make_scene(1, 3, "single").image), np.asarray(make_record(1, 3).image))
    records = read_dataset(write_dataset(tmp_path, seed=5, count=8, version=2))
    raw = json.loads((tmp_path / "data.json").read_text())
    assert len(records) == 8 + 4 * 2
    assert [r["question_type"] for r in raw] == ["single"] * 10 + ["two_region"] * 2 + ["distractor"] * 2 + [
        "counting"] * 2
    assert [r.labels for r in records[:8]] == [(make_record(5, i).answer,) for i in range(8)]
    assert all(r.bboxes is not None and len(r.bboxes) >= 1 for r in records)


def test_embedded_model_loads_by_name_and_fits_the_wheel(model):
    folder = checkpoint_folder("vicrop-tiny")
    assert sum(f.stat().st_size for f in folder.iterdir()) < 25e6
    assert model.family is LLAVA and model.config.image_size == 112 and model.path == folder


@pytest.mark.slow
def test_embedded_model_matches_transformers(model):
    record = make_record(HELD_OUT_SEED, 0)
    ids = np.array([prompt_ids(model, llava_prompt(record.question), 1)])
    pixels = pixel_values(model, [record.image])
    ours = np.asarray(model.module.apply({"params": model.params}, ids, pixels[None]))
    reference = LlavaForConditionalGeneration.from_pretrained(model.path, attn_implementation="eager").eval()
    torch_pixels = torch.tensor(pixels.transpose(0, 3, 1, 2))
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor(ids), pixel_values=torch_pixels).logits.numpy()
        generated = reference.generate(input_ids=torch.tensor(ids), pixel_values=torch_pixels, max_new_tokens=5,
                                       do_sample=False)[0, ids.shape[1]:]
    np.testing.assert_allclose(ours, logits, atol=1e-4, rtol=0)
    text = vicrop_jax.generate(model, record.image, llava_prompt(record.question), max_new_tokens=5)
    assert text == model.tokenizer.decode(generated.tolist())


@pytest.mark.slow
def test_embedded_model_reads_large_shapes_and_vicrop_recovers_small_ones(model):
    records = [make_record(HELD_OUT_SEED, i) for i in range(96)]  # about 30 small boxes: a gain, not noise
    answers = vicrop_jax.answer_batch(model, [r.image for r in records], [r.question for r in records], "rel_att")
    large = [a.original_answer == r.answer for a, r in zip(answers, records) if r.relative_size > 0.15]
    small = [(a.original_answer == r.answer, a.answer == r.answer)
             for a, r in zip(answers, records) if r.relative_size < 0.07]
    assert len(large) >= 10 and np.mean(large) >= 0.8
    without, with_crop = np.mean(small, axis=0)
    assert len(small) >= 10 and with_crop >= without + 0.15


def test_demo_answers_a_generated_question_without_and_with_vicrop(model, tmp_path, capsys):
    assert cli_main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    record = make_record(DEMO_SEED, DEMO_INDEX)
    left, top, right, bottom = vicrop_jax.answer(model, record.image, record.question, "rel_att").bbox
    assert left <= record.bbox[0] and top <= record.bbox[1] and record.bbox[2] <= right and record.bbox[3] <= bottom
    assert f"true answer:          {record.answer!r}" in printed
    assert f"answer with ViCrop:   {record.answer!r}" in printed and "answer without crop:" in printed
    assert Image.open(tmp_path / "demo_map.png").size == record.image.size


def test_attention_ratio_weights_cells_by_their_overlap_with_the_box():
    attention = np.ones((8, 8))
    assert attention_ratio(attention, (13, 7, 50, 61), (80, 80)) == pytest.approx(1.0)
    attention[0, 0] = 5.0
    assert attention_ratio(attention, (0, 0, 10, 10), (80, 80)) == pytest.approx(5.0)
    outside = (50 * 5.0 + 6300 * 1.0) / 6350  # the other half of the cell, and the 63 cells of 100 px
    assert attention_ratio(attention, (0, 0, 5, 10), (80, 80)) == pytest.approx(5.0 / outside)
    with pytest.raises(ValueError, match="must cover part"):
        attention_ratio(attention, (0, 0, 80, 80), (80, 80))


def test_attention_ratio_of_maps_without_mass_outside_the_box_or_at_all():
    focused = np.zeros((8, 8))
    focused[0, 0] = 1.0
    assert attention_ratio(focused, (0, 0, 10, 10), (80, 80)) == float("inf")
    with pytest.raises(ValueError, match="zero everywhere"):
        attention_ratio(np.zeros((8, 8)), (0, 0, 10, 10), (80, 80))


@pytest.mark.slow
def test_training_script_writes_a_checkpoint_that_loads_and_differs_from_its_start(tmp_path):
    out = tmp_path / "trained"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.synthetic.train", "--out", str(out), "--steps", "2",
         "--batch-size", "2", "--log-every", "2", "--calibration-scenes", "3"], capture_output=True, text=True,
        check=True, cwd=ROOT,
    )
    assert "step 2" in result.stdout and "wrote" in result.stdout
    trained = vicrop_jax.load(out)
    assert 0 <= trained.config.map_layer < trained.config.text.num_layers
    from benchmarks.synthetic.train import model_hf_config
    from vicrop_jax.testing.checkpoints import init_llava_params

    start = init_llava_params(model_hf_config(), seed=0)
    assert not np.allclose(trained.params["multi_modal_projector"]["linear_1"]["kernel"],
                           start["multi_modal_projector"]["linear_1"]["kernel"])


@pytest.mark.slow
def test_the_evaluation_tables_cover_every_question_type_and_option(tmp_path):
    """The evaluation script's parts on a small held-out set: its runs through the eval runner, the version-1
    tables on the square single-detail questions, and the per-type table with the options as rows."""
    from benchmarks.synthetic import evaluate

    data = tmp_path / "data"
    write_dataset(data, evaluate.EVAL_SEED, 4, version=2)
    records = json.loads((data / "data.json").read_text())
    calibration = {"seed": evaluate.CALIBRATION_SEED, "records": 8, "gates": [0.5],
                   "gate_gains": [0.9], "second_region_mass": {m: 0.5 for m in evaluate.MAP_METHODS}}
    names = [name for name, _, _ in evaluate.configs(calibration)]
    for wanted in ("none", "gt", "random", "center", "rel_att regions=2", "grad_att regions=auto", "rel_att gate=0.5",
                   "auto", "pure_grad geometry=exact", "focus", "zoom_search", "focus answer_views=both"):
        assert wanted in names
    chosen = [("none", "none", {}), ("gt", "gt", {}), ("rel_att", "rel_att", {}),
              ("rel_att gate=0.5", "rel_att", {"gate": 0.5}),
              ("zoom_search answer_views=both", "zoom_search", {"options": ("answer_views=both",)})]
    results = {name: evaluate.run(tmp_path, data, "vicrop-tiny", name, method, options, 8)
               for name, method, options in chosen}
    results["rel_att geometry=exact"] = results["rel_att"]  # a row for the geometry table, not run again
    assert all(len(lines) == len(records) for lines in results.values())
    single = {r["id"] for r in records if evaluate.kind(r) == "single"}
    ratios = {r["id"]: 2.0 for r in records}
    v1 = evaluate.summarize({m: [l for l in results[m] if l["id"] in single] for m in ("none", "gt", "rel_att")},
                            ratios, 2, {"median_attention_ratio": [1.0], "box_hit_rate": [0.5]})
    assert v1["questions"] == 4 and set(v1["accuracy_by_tercile"]["gt"]) == set(evaluate.TERCILES)
    v2 = evaluate.v2_summary(results, records, ratios, calibration)
    assert v2["questions"] == {"single": 4, "single, non-square": 1, "two_region": 1, "distractor": 1, "counting": 1}
    assert v2["accuracy"]["gt"]["cropped"] == 100.0 and v2["accuracy"]["none"]["cropped"] == 0.0
    assert v2["accuracy"]["gt"]["centres_held"]["two_region"] == 100.0  # gt crops each of the two boxes
    assert v2["accuracy"]["rel_att"]["passes"] == 3 and v2["accuracy"]["none"]["passes"] == 1
    assert v2["accuracy"]["zoom_search answer_views=both"]["passes"] >= 2  # the root's question, then an answer
    table = evaluate.v2_markdown(v2)
    assert "| rel_att gate=0.5 |" in table and "| rel_att | " in table and "paper | exact" in table
    assert "| zoom_search answer_views=both |" in table and "passes / question" in table


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    """A fresh vicrop-tiny-qwen (its training script's config and vocabulary, untrained), as the script writes it."""
    from benchmarks.synthetic.train import RECIPES, QwenTrainer

    words = QwenTrainer.words(RECIPES[1])
    hf_config = QwenTrainer.hf_config(words)
    folder = QwenTrainer.write_checkpoint(tmp_path_factory.mktemp("qwen") / "model", hf_config,
                                          QwenTrainer.init_params(hf_config, 0), words)
    return folder, hf_config


@pytest.mark.slow
def test_written_qwen_checkpoint_loads_in_transformers_and_vicrop_jax_alike(qwen_checkpoint):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    from vicrop_jax.families import QWEN2_5_VL
    from vicrop_jax.nn.qwen_vit import VisionPatches
    from vicrop_jax.prompts import qwen2_5_vl_prompt

    folder, hf_config = qwen_checkpoint
    model = vicrop_jax.load(folder)
    assert model.family is QWEN2_5_VL and model.config.vision.depth == 0
    assert sum(f.stat().st_size for f in folder.iterdir()) < 25e6
    record = make_record(HELD_OUT_SEED, 0)
    prompt = qwen2_5_vl_prompt(record.question)
    assert AutoTokenizer.from_pretrained(folder)(prompt)["input_ids"] == model.tokenizer.encode(prompt)
    assert model.tokenizer.eos_id == hf_config["text_config"]["eos_token_id"] and model.tokenizer.bos_id is None
    inputs = model.family.generation_inputs(model, [record.image], prompt)
    processed = Qwen2VLImageProcessor.from_pretrained(folder)(images=[record.image], return_tensors="pt")
    assert processed["image_grid_thw"].tolist() == [[1, 16, 16]]  # 224 x 224: 8 x 8 LM tokens
    [patches] = inputs.encode_args
    np.testing.assert_array_equal(patches.patches[:256], processed["pixel_values"].numpy())
    ids = np.asarray(inputs.ids, np.int32)[None]
    ours = model.module.apply({"params": model.params}, ids, VisionPatches(*(np.asarray(a)[None] for a in patches)),
                              inputs.positions[None])
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    input_ids = torch.tensor(ids)
    with torch.no_grad():
        logits = reference(input_ids=input_ids, pixel_values=processed["pixel_values"],
                           image_grid_thw=processed["image_grid_thw"],
                           mm_token_type_ids=(input_ids == model.config.image_token_id).int()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_qwen_training_batches_end_with_the_answer_and_a_few_steps_lower_the_loss(tmp_path):
    """The Qwen trainer's batches (static shapes per image count: 64 tokens per 224 x 224 image), and its step."""
    import optax

    from benchmarks.synthetic.train import RECIPES, TEXT_LENGTH, Batches, QwenTrainer, make_train_step
    from vicrop_jax.testing.checkpoints import init_qwen_params, qwen_hf_config, write_qwen_checkpoint

    words = QwenTrainer.words(RECIPES[1])
    hf_config = qwen_hf_config(width=48, text_layers=2, num_heads=2, num_kv_heads=1, mrope_section=(4, 4, 4),
                               vision_width=32)
    folder = write_qwen_checkpoint(tmp_path / "toy", hf_config, init_qwen_params(hf_config, 0), words)
    trainer = QwenTrainer.from_folder(folder)
    batches = Batches(trainer, 3, seed=0, steps=100, recipe=RECIPES[1])
    for num_images in (1, 2):
        count, ids, lengths, (patches, positions) = batches.next()
        assert count == num_images and ids.shape == (3, 64 * num_images + TEXT_LENGTH)
        assert patches.patches.shape[:2] == (3, 256 * num_images) and positions.shape == (3, 3, ids.shape[1])
        for row, length in zip(ids, lengths):
            tokens = trainer.tokenizer.backend.decode(row[:length].tolist(), skip_special_tokens=False).split()
            assert tokens[-3] == "assistant" and tokens[-1] == "<|im_end|>"
            assert tokens[-2] in SHAPES + tuple(BACKGROUNDS)
            assert (row[:length] == trainer.config.image_token_id).sum() == 64 * num_images
    optimizer = optax.adam(3e-3)
    params = init_qwen_params(hf_config, 0)
    opt_state = optimizer.init(params)
    step = make_train_step(trainer.module, optimizer)
    losses = []
    for _ in range(6):
        params, opt_state, loss, _ = step(params, opt_state, ids, lengths, (patches, positions))
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.slow
def test_the_embedded_qwen_model_loads_by_name_and_vicrop_recovers_small_details():
    """vicrop-tiny-qwen, loaded by name as a user would, in transformers' format: large shapes read in the full
    view, ViCrop's crop recovers small ones."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    qwen = vicrop_jax.load("vicrop-tiny-qwen")
    assert qwen.family.name == "qwen2_5_vl" and qwen.config.map_layer is not None
    Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint_folder("vicrop-tiny-qwen"))
    records = [make_record(HELD_OUT_SEED, i) for i in range(32)]
    answers = [vicrop_jax.answer(qwen, r.image, r.question, "rel_att", max_new_tokens=3) for r in records]
    large = [a.original_answer == r.answer for a, r in zip(answers, records) if r.relative_size > 0.15]
    small = [(a.original_answer == r.answer, a.answer == r.answer)
             for a, r in zip(answers, records) if r.relative_size < 0.07]
    assert len(large) >= 5 and np.mean(large) >= 0.8
    without, with_crop = np.mean(small, axis=0)
    assert len(small) >= 5 and with_crop > without


def test_the_zoom_strategies_yes_no_answers_follow_the_views_geometry():
    """Recipe 3's auxiliary questions: existence is Yes when the view holds the box, No when it misses it (a
    partial overlap is redrawn); latent Yes when the view meets it; answering Yes when it holds it large enough."""
    from benchmarks.synthetic.train import aux_answers

    box = (100, 100, 120, 120)
    views = np.array([[0, 0, 200, 200], [90, 90, 130, 130], [110, 110, 300, 300], [300, 300, 400, 400]])
    assert aux_answers("existence", views, box).tolist() == [1, 1, -1, 0]
    assert aux_answers("latent", views, box).tolist() == [1, 1, 1, 0]
    assert aux_answers("answering", views, box).tolist() == [0, 1, 0, 0]  # 20 px: under a quarter of 200 px


def test_continuing_a_checkpoint_keeps_every_known_token_and_its_weights(tmp_path):
    """Recipe 3 grows a recipe-1 model's vocabulary by the yes/no questions' words: no known token changes its id,
    and its embedding and output rows are the trained ones; every other parameter is the trained one."""
    from flax.traverse_util import flatten_dict

    from benchmarks.synthetic.train import AUX_WORDS, RECIPES, Checkpoint, LlavaTrainer

    words = LlavaTrainer.words(RECIPES[1])
    hf_config = LlavaTrainer.hf_config(words)
    assert hf_config["text_config"]["vocab_size"] == 64  # recipe 1 still writes the recipe-1 model's vocabulary
    trained = LlavaTrainer.write_checkpoint(tmp_path / "recipe1", hf_config, LlavaTrainer.init_params(hf_config, 1),
                                            words)
    start = Checkpoint.read(LlavaTrainer, trained)
    grown = start.extended_words(LlavaTrainer.words(RECIPES[3]))
    assert grown[: len(start.words)] == start.words and set(AUX_WORDS) <= set(grown) - set(start.words)
    hf_config = LlavaTrainer.hf_config(grown)
    fresh = LlavaTrainer.init_params(hf_config, 0)
    trainer = LlavaTrainer.from_folder(LlavaTrainer.write_checkpoint(tmp_path / "recipe3", hf_config, fresh, grown))
    vocab = trainer.tokenizer.backend.get_vocab()
    assert all(vocab[w] == start.vocab[w] for w in start.words)
    params = {path: np.asarray(value) for path, value in flatten_dict(start.params_like(fresh, vocab)).items()}
    fresh = {path: np.asarray(value) for path, value in flatten_dict(fresh).items()}
    known = np.array([start.vocab[w] for w in start.words])
    new = np.array([vocab[w] for w in AUX_WORDS])
    token_axes = {("language_model", "embed_tokens", "embedding"): 0, ("language_model", "lm_head", "kernel"): 1}
    for path, axis in token_axes.items():
        np.testing.assert_array_equal(np.take(params[path], known, axis), np.take(start.params[path], known, axis))
        np.testing.assert_array_equal(np.take(params[path], new, axis), np.take(fresh[path], new, axis))
    other = ("multi_modal_projector", "linear_1", "kernel")
    np.testing.assert_array_equal(params[other], start.params[other])
    assert not np.array_equal(params[other], fresh[other])
