"""The paper's open questions as options, on tiny checkpoints of both families: several regions from one map, a
second region only where the map calls for it, cropping only when the plain answer is unsure, the method chosen
by confidence, and the map laid on the part of the image the processor keeps."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import vicrop_jax
from vicrop_jax._generation import encode_images, pixel_values, prompt_inputs
from vicrop_jax.cli import main
from vicrop_jax.families import LLAVA
from vicrop_jax.nn.decoding import pad_prompt, prefill
from vicrop_jax.testing.hf_models import noise_image
from vicrop_jax.vicrop import _pipeline, engine
from vicrop_jax.vicrop.boxes import outside_mass, select_bbox, select_boxes

QUESTION = "What is the color of the small shape ?"
IMAGES = [noise_image(150, 110, seed) for seed in range(3)] + [noise_image(90, 200, 3), noise_image(260, 70, 4)]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def only_llava(model) -> None:
    """For what the pipeline does the same for every family (thresholds, batch padding): one family's run."""
    if model.family is not LLAVA:
        pytest.skip("family-independent; LLaVA's run is enough")


def base(model) -> int:
    return model.config.image_size


@pytest.mark.parametrize("regions", [1, 2, 3])
def test_k_regions_are_the_papers_boxes_on_the_suppressed_map_on_both_paths(model, regions):
    """K boxes from one map: the device program's equal the host's (`select_boxes` on its map, PIL crops), and
    one region is the paper's single box."""
    if model.family is not LLAVA and regions != 2:
        pytest.skip("the box logic is family-independent; two regions cover InstructBLIP's several-crop prompt")
    image = IMAGES[0]
    # the host's PIL crops equal the device's within preprocessing tolerance: a random model's long answers to
    # them can part after some tokens, its first ones agree
    device = vicrop_jax.answer(model, image, QUESTION, "rel_att", layer=1, regions=regions, max_new_tokens=4)
    host = vicrop_jax.answer(model, image, QUESTION, "rel_att", layer=1, regions=regions, device_pipeline=False,
                             max_new_tokens=4)
    assert len(device.boxes) == regions
    assert device.boxes == host.boxes == tuple(select_boxes(device.importance, image.size, base(model), regions))
    assert device.bbox == select_bbox(device.importance, image.size, base(model))
    assert (device.answer, device.original_answer) == (host.answer, host.original_answer)


def test_the_batch_program_gives_each_record_its_single_answer_with_k_regions(model):
    only_llava(model)  # InstructBLIP's several-crop prompt: test_k_regions_..., its batch program: test_vicrop.py
    images = IMAGES[2:]  # three sizes, the batch program's padding to one bucket included
    singles = [vicrop_jax.answer(model, image, QUESTION, "grad_att", layer=1, regions=2) for image in images]
    batch = vicrop_jax.answer_batch(model, images, [QUESTION] * len(images), "grad_att", layer=1, regions=2,
                                    batch_size=4)
    assert [(a.boxes, a.answer, a.original_answer) for a in batch] == [
        (a.boxes, a.answer, a.original_answer) for a in singles]


def test_regions_auto_adds_the_second_box_only_above_its_threshold(model):
    only_llava(model)
    image = IMAGES[1]
    one = vicrop_jax.answer(model, image, QUESTION, "rel_att", layer=1, regions=1)
    two = vicrop_jax.answer(model, image, QUESTION, "rel_att", layer=1, regions=2)
    mass = outside_mass(one.importance, one.bbox, image.size)
    assert 0.0 < mass < 1.0
    for threshold, expected in ((mass - 1e-3, two), (mass + 1e-3, one)):
        for device_pipeline in (True, False):
            auto = vicrop_jax.answer(model, image, QUESTION, "rel_att", layer=1, regions="auto",
                                     second_region_mass=threshold, device_pipeline=device_pipeline)
            assert (auto.boxes, auto.answer) == (expected.boxes, expected.answer)


def test_the_gate_crops_only_unsure_answers_and_never_drops_a_record(model):
    only_llava(model)
    questions = [QUESTION] * len(IMAGES)
    plain = vicrop_jax.answer_batch(model, IMAGES, questions, "none")
    cropped = vicrop_jax.answer_batch(model, IMAGES, questions, "rel_att", layer=1, batch_size=4)
    confidences = [a.confidence for a in vicrop_jax.answer_batch(model, IMAGES, questions, "rel_att", layer=1,
                                                                 gate=0.0, batch_size=4)]
    assert all(0.0 < c <= 1.0 for c in confidences)
    gate = float(np.median(confidences))
    gated = vicrop_jax.answer_batch(model, IMAGES, questions, "rel_att", layer=1, gate=gate, batch_size=4)
    assert len(gated) == len(IMAGES) and 0 < sum(a.cropped for a in gated) < len(IMAGES)
    for answer, confidence, without, with_crop in zip(gated, confidences, plain, cropped):
        assert answer.confidence == pytest.approx(confidence, abs=1e-6)
        if confidence >= gate:
            assert not answer.cropped and answer.answer == answer.original_answer == without.answer
        else:
            assert (answer.boxes, answer.answer) == (with_crop.boxes, with_crop.answer)
    single = vicrop_jax.answer(model, IMAGES[0], QUESTION, "rel_att", layer=1, gate=gate)
    assert (single.cropped, single.answer) == (gated[0].cropped, gated[0].answer)


def test_the_gate_and_auto_compile_a_bounded_number_of_programs(model):
    """A gated batch's cropped part runs at a power of two records: batch 4 compiles at most the plain program
    and batch sizes 1, 2, 4 of the pipeline, whatever the thresholds (here every count of cropped records from
    0 to 4); auto and regions="auto" one program each; a second pass compiles nothing."""
    only_llava(model)
    images = [noise_image(150, 110, seed) for seed in range(4)]
    questions = [QUESTION] * 4
    confidences = sorted(a.confidence for a in vicrop_jax.answer_batch(model, images, questions, "rel_att", layer=0,
                                                                       gate=0.0, batch_size=4))
    gates = [0.0, *(np.array(confidences[1:]) + np.array(confidences[:-1])) / 2, 1.0]

    def run_all():
        cropped = [sum(a.cropped for a in vicrop_jax.answer_batch(model, images, questions, "rel_att", layer=0,
                                                                  gate=float(gate), batch_size=4))
                   for gate in gates]
        vicrop_jax.answer_batch(model, images, questions, "auto", layer=0, batch_size=4)
        vicrop_jax.answer_batch(model, images, questions, "rel_att", layer=0, regions="auto", batch_size=4)
        return cropped

    before = _pipeline.compiled_programs()
    assert run_all() == [0, 1, 2, 3, 4]
    compiled = _pipeline.compiled_programs() - before
    assert compiled <= 3 + 1 + 2
    before = _pipeline.compiled_programs()
    run_all()
    assert _pipeline.compiled_programs() == before


def first_token_probability(model, image, question: str, box) -> float:
    """The most probable first answer token's probability with the PIL crop of `box` as a second image."""
    pixels = pixel_values(model, [image, image.crop(box)])
    ids, image_text = prompt_inputs(model, model.family.prompt(question, 2), 2)
    features = encode_images(model.module, model.params, pixels, *image_text)
    padded, length = pad_prompt(ids)
    logits, _ = prefill(model.module, model.params, padded, length, features.reshape(-1, features.shape[-1]),
                        len(padded))
    return float(jax.nn.softmax(logits).max())


def test_method_auto_keeps_the_answer_of_the_more_confident_map(model):
    for image in IMAGES[:1]:
        auto = vicrop_jax.answer(model, image, QUESTION, "auto", layer=1)
        singles = {name: vicrop_jax.answer(model, image, QUESTION, name, layer=1) for name in ("rel_att", "grad_att")}
        chosen, other = singles[auto.chosen], singles[({"rel_att", "grad_att"} - {auto.chosen}).pop()]
        assert (auto.boxes, auto.answer, auto.original_answer) == (chosen.boxes, chosen.answer, chosen.original_answer)
        np.testing.assert_allclose(auto.importance, chosen.importance, rtol=1e-4, atol=1e-7)
        if other.bbox != chosen.bbox:
            confidence = {n: first_token_probability(model, image, QUESTION, a.bbox) for n, a in singles.items()}
            assert confidence[auto.chosen] >= confidence[({"rel_att", "grad_att"} - {auto.chosen}).pop()] - 1e-3
    batch = vicrop_jax.answer_batch(model, IMAGES[:2], [QUESTION] * 2, "auto", layer=1)
    single = [vicrop_jax.answer(model, image, QUESTION, "auto", layer=1) for image in IMAGES[:2]]
    assert [(a.chosen, a.boxes, a.answer) for a in batch] == [(a.chosen, a.boxes, a.answer) for a in single]


def test_method_auto_refuses_the_host_path(model):
    with pytest.raises(ValueError, match="use device_pipeline=True"):
        vicrop_jax.answer(model, IMAGES[0], QUESTION, "auto", device_pipeline=False)


def test_exact_geometry_lays_the_map_on_what_the_processor_keeps(model):
    """LLaVA's CLIP keeps the centre square of a wide image: the exact box is the paper's rule on that square;
    InstructBLIP's processor keeps the whole image, so there exact is the paper's geometry."""
    image = IMAGES[4]  # 260 x 70
    paper = vicrop_jax.answer(model, image, QUESTION, "rel_att", layer=1)
    exact = vicrop_jax.answer(model, image, QUESTION, "rel_att", layer=1, geometry="exact")
    host = vicrop_jax.answer(model, image, QUESTION, "rel_att", layer=1, geometry="exact", device_pipeline=False)
    frame = (95, 0, 165, 70) if model.family is LLAVA else None
    assert exact.boxes == host.boxes == (select_bbox(exact.importance, image.size, base(model), frame),)
    if model.family is LLAVA:
        assert paper.bbox == select_bbox(paper.importance, image.size, base(model))
        assert exact.bbox[0] < 165 and exact.bbox[2] > 95  # the box meets the square the map came from
    else:
        assert exact.boxes == paper.boxes


def test_ground_truth_crops_every_box_of_a_record(model):
    boxes = [(10, 10, 40, 40), (100, 60, 140, 100)]
    answer = vicrop_jax.answer(model, IMAGES[0], QUESTION, "gt", bbox=boxes)
    assert len(answer.boxes) == 2
    for (x1, y1, x2, y2), (left, top, right, bottom) in zip(boxes, answer.boxes):
        assert left <= x1 and top <= y1 and x2 <= right and y2 <= bottom


@pytest.mark.parametrize("options, problem", [
    ({"regions": 0}, "regions must be a positive number"), ({"regions": "two"}, "regions must be"),
    ({"gate": 1.5}, "gate must be a number between 0 and 1"), ({"geometry": "round"}, "unknown geometry"),
    ({"second_region_mass": -0.1}, "second_region_mass must be"),
])
def test_bad_options_are_refused_with_what_was_wrong(model, options, problem):
    with pytest.raises(ValueError, match=problem):
        vicrop_jax.answer(model, IMAGES[0], QUESTION, "rel_att", **options)


def test_a_question_that_fits_one_crop_but_not_eight_is_refused_for_eight(model):
    if model.family is not LLAVA:
        pytest.skip("InstructBLIP's Q-Former limits the question before the LM does")
    question = " ".join(["red"] * (model.config.text.max_position_embeddings - 2 * model.config.tokens_per_image - 60))
    assert engine.question_problem(model, question, 20, crops=1) is None
    assert "too long" in engine.question_problem(model, question, 20, crops=8)
    with pytest.raises(ValueError, match="too long"):
        vicrop_jax.answer(model, IMAGES[0], question, "rel_att", regions=8)


@pytest.fixture(scope="module")
def llava_records(tmp_path_factory, model):
    if model.family is not LLAVA:
        pytest.skip("the command line is the same for both families; LLaVA's run is enough")
    folder = tmp_path_factory.mktemp("records")
    (folder / "images").mkdir()
    records = []
    for i, image in enumerate(IMAGES):
        image.save(folder / "images" / f"{i}.png")
        records.append({"id": f"r{i}", "question": QUESTION, "labels": ["red"], "image_path": f"{i}.png",
                        "bbox": [5, 5, 60, 60], "bboxes": [[5, 5, 30, 30], [35, 35, 60, 60]]})
    (folder / "data.json").write_text(json.dumps(records))
    return folder


def eval_args(model, folder, out, *extra):
    return ["eval", "--data", str(folder / "data.json"), "--images", str(folder / "images"), "--model",
            str(model.path), "--batch-size", "2", "--out", str(out), "--layer", "1", *extra]


def test_eval_records_the_options_and_score_shows_them_as_rows(model, llava_records, tmp_path, capsys):
    regions, gated, gt = tmp_path / "regions.jsonl", tmp_path / "gated.jsonl", tmp_path / "gt.jsonl"
    assert main(eval_args(model, llava_records, regions, "--method", "rel_att", "--regions", "2")) == 0
    assert main(eval_args(model, llava_records, gated, "--method", "rel_att", "--gate", "0.5")) == 0
    assert main(["eval", "--data", str(llava_records / "data.json"), "--images", str(llava_records / "images"),
                 "--model", str(model.path), "--method", "gt", "--out", str(gt)]) == 0
    lines = {path: [json.loads(line) for line in path.read_text().splitlines()] for path in (regions, gated, gt)}
    assert all(line["method"] == "rel_att regions=2" and len(line["bboxes"]) == 2 for line in lines[regions])
    assert len(lines[gated]) == len(IMAGES)
    for line in lines[gated]:
        assert line["method"] == "rel_att gate=0.5" and line["cropped"] == (line["confidence"] < 0.5)
        assert (line["bbox"] is None) == (not line["cropped"])
    assert all(len(line["bboxes"]) == 2 and line["gt_bboxes"] == [[5, 5, 30, 30], [35, 35, 60, 60]]
               for line in lines[gt])
    capsys.readouterr()
    assert main(["score", str(regions), str(gated), str(gt)]) == 0
    table = capsys.readouterr().out
    assert "rel_att regions=2" in table and "rel_att gate=0.5" in table


def test_eval_refuses_to_resume_with_other_options_or_options_a_method_does_not_take(model, llava_records, tmp_path,
                                                                                      capsys):
    out = tmp_path / "results.jsonl"
    assert main(eval_args(model, llava_records, out, "--method", "rel_att", "--regions", "2", "--limit", "2")) == 0
    capsys.readouterr()
    assert main(eval_args(model, llava_records, out, "--method", "rel_att", "--regions", "3")) == 2
    assert "regions 2 there, 3 now" in capsys.readouterr().err
    assert main(eval_args(model, llava_records, tmp_path / "none.jsonl", "--method", "none", "--gate", "0.5")) == 2
    assert "--gate 0.5: method 'none' does not take this" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(eval_args(model, llava_records, tmp_path / "bad.jsonl", "--regions", "zero"))
