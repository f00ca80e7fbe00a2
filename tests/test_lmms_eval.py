"""vicrop_jax as an lmms-eval model: model_args and generation_kwargs read strictly, generate_until answering as
answer_batch does, loglikelihood against a direct forward, and the real `lmms-eval` command on a local task
scoring what `vicrop-jax eval` + `vicrop-jax score` score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: pip install --no-deps lmms-eval==0.7.3 && "
                    "pip install -r requirements/lmms-eval-cpu.txt (docs/evaluation.md, lmms-eval)")

from lmms_eval.api.instance import Instance
from lmms_eval.utils import simple_parse_args_string

import vicrop_jax
from vicrop_jax import lmms_eval as integration
from vicrop_jax._generation import pixel_values
from vicrop_jax.cli import main
from vicrop_jax.testing.synthetic import make_record, write_dataset
from vicrop_jax.vicrop.engine import base_size

TASK_FOLDER = Path(__file__).parent / "lmms_task"
TASK = "vicrop_synthetic"
RECORDS = 5  # seed 1's first five: the crop changes one answer (the fifth), so the crop and no-crop scores differ
QUESTION = make_record(1, 0).question
GREEDY = {"until": ["\n\n"], "max_new_tokens": 20, "temperature": 0, "do_sample": False}


# model_args and generation_kwargs: pure functions, no model


def test_model_args_from_lmms_eval_strings_become_a_method_value():
    args = integration.parse_model_args(simple_parse_args_string(
        "pretrained=vicrop-tiny,method=grad_att,layer=2,heads=[0,3],clip_negative=false,batch_size=4,dtype=float32"))
    assert args == integration.ModelArgs("vicrop-tiny", vicrop_jax.GradAtt(layer=2, heads=(0, 3), clip_negative=False),
                                         4, "float32")
    unset = integration.parse_model_args({"pretrained": "x", "heads": "none", "layer": "None"})
    assert unset.method == vicrop_jax.RelAtt()
    assert integration.parse_model_args({"pretrained": "x", "method": "none"}).method == vicrop_jax.NoCrop()
    options = integration.parse_model_args(simple_parse_args_string(
        "pretrained=x,method=auto,regions=auto,gate=0.7,geometry=exact,second_region_mass=0.25"))
    assert options.method == vicrop_jax.ByConfidence(regions="auto", gate=0.7, geometry=vicrop_jax.Geometry.EXACT,
                                                     second_region_mass=0.25)
    assert integration.parse_model_args({"pretrained": "x", "regions": "2"}).method == vicrop_jax.RelAtt(regions=2)


@pytest.mark.parametrize("args, message", [
    ({"pretrained": "x", "learning_rate": 1}, ("unknown model_args learning_rate; valid: pretrained, method, "
                                               "batch_size, dtype, and the options of method 'rel_att': layer, heads, "
                                               "qformer_layer, general_question, regions, second_region_mass, gate, "
                                               "geometry")),
    ({"pretrained": "x", "clip_negative": True}, "unknown model_args clip_negative"),  # grad_att's, not rel_att's
    ({"method": "rel_att"}, "model_args needs pretrained="),
    ({"pretrained": "x", "method": "sharpen"}, "unknown method 'sharpen'; choose one of rel_att, grad_att"),
    ({"pretrained": "x", "method": "gt"}, "method 'gt' crops the dataset's ground-truth box"),
    ({"pretrained": "x", "layer": "middle"}, "model_args layer='middle' is not a valid"),
    ({"pretrained": "x", "heads": "[0,x]"}, "model_args heads='[0,x]' is not a valid"),
    ({"pretrained": "x", "batch_size": "auto"}, "batch_size='auto': expected a whole number of at least 1"),
    ({"pretrained": "x", "dtype": "float8"}, "dtype='float8': choose one of auto, float32, bfloat16, float16"),
])
def test_bad_model_args_are_refused_saying_what_is_valid(args, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        integration.parse_model_args(args)


def test_batch_size_of_model_args_and_of_the_harness():
    assert integration.with_harness_args({"batch_size": 2}, {"batch_size": 1}) == {"batch_size": 2}
    assert integration.with_harness_args({}, {"batch_size": "4"}) == {"batch_size": "4"}
    assert integration.with_harness_args({"batch_size": 4}, {"batch_size": "4"}) == {"batch_size": 4}
    with pytest.raises(ValueError, match="batch_size=2 in --model_args and --batch_size 4 differ"):
        integration.with_harness_args({"batch_size": 2}, {"batch_size": "4"})
    with pytest.raises(ValueError, match="--device cuda: vicrop_jax runs on JAX's default device"):
        integration.with_harness_args({}, {"batch_size": 1, "device": "cuda"})


def test_generation_kwargs_decode_greedily_or_are_refused():
    settings = integration.generation_settings({"until": ["ASSISTANT:"], "max_new_tokens": 16, "temperature": 0,
                                                "top_p": 1.0, "num_beams": 1, "do_sample": False,
                                                "image_aspect_ratio": "original"})
    assert settings == integration.Generation(16, ("ASSISTANT:",))
    assert integration.generation_settings({"until": "\n"}) == integration.Generation(None, ("\n",))
    with pytest.raises(ValueError, match="temperature=0.7: vicrop_jax decodes greedily only; set temperature=0"):
        integration.generation_settings({"temperature": 0.7, "do_sample": True})
    with pytest.raises(ValueError, match="num_beams=4: vicrop_jax decodes greedily only"):
        integration.generation_settings({"num_beams": 4})
    with pytest.raises(ValueError, match="generation_kwargs repetition_penalty not supported by vicrop_jax"):
        integration.generation_settings({"repetition_penalty": 1.2})


def test_answers_are_cut_at_the_first_stop_string():
    assert integration.cut_at_stops("square\n\nThe box is red. ASSISTANT: x", ["ASSISTANT:", "\n\n"]) == "square"
    assert integration.cut_at_stops("square", []) == "square"


# the model class on vicrop-tiny


@pytest.fixture(scope="module")
def lmm():
    return integration.VicropJax.create_from_arg_string("pretrained=vicrop-tiny,method=rel_att,batch_size=2",
                                                        {"batch_size": 1, "max_batch_size": None, "device": None})


def requests_for(lmm, kind: str, arguments: list[tuple]) -> list[Instance]:
    """Instances as lmms-eval builds them, over docs of seed 1 held in the model's task_dict."""
    docs = [{"image": make_record(1, i).image} for i in range(RECORDS)]
    lmm.task_dict = {TASK: {"test": docs}}
    return [Instance(kind, args, 0, {"task": TASK, "doc_id": args[-3], "repeats": 1}) for args in arguments]


def doc_image(doc: dict) -> list:
    return [doc["image"]]


@pytest.mark.slow
def test_generate_until_answers_with_the_crop_as_answer_batch_does(lmm):
    """Requests with other generation settings run apart; the answers come back in request order."""
    short = {**GREEDY, "max_new_tokens": 1}
    requests = requests_for(lmm, "generate_until", [
        (QUESTION, short if i == 1 else GREEDY, doc_image, i, TASK, "test") for i in range(3)])
    assert lmm.method == vicrop_jax.RelAtt(layer=1)  # vicrop-tiny's own map layer, filled in once
    images = [make_record(1, i).image for i in range(3)]
    first, third = vicrop_jax.answer_batch(lmm.model, [images[0], images[2]], [QUESTION] * 2, "rel_att", batch_size=2)
    [second] = vicrop_jax.answer_batch(lmm.model, images[1:2], [QUESTION], "rel_att", max_new_tokens=1)
    assert lmm.generate_until(requests) == [first.answer, second.answer, third.answer]


def direct_logprob(model, images, question: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | prompt, images) from one unpadded forward and a float64 log-softmax."""
    prompt = model.family.prompt(question, len(images))
    ids, image_text = model.family.prompt_inputs(model, prompt, len(images))
    context, whole = model.tokenizer.encode(prompt), model.tokenizer.encode(prompt + continuation)
    full = np.array(ids + whole[len(context):])
    logits = model.module.apply({"params": model.params}, full[None], pixel_values(model, images)[None],
                                *(text[:1] for text in image_text))
    log_probs = log_softmax(np.asarray(logits[0], np.float64), axis=-1)
    rows = np.arange(len(ids) - 1, len(full) - 1)  # row t predicts token t + 1
    return log_probs[rows, full[rows + 1]].sum(), bool((log_probs[rows].argmax(-1) == full[rows + 1]).all())


@pytest.mark.slow
def test_loglikelihood_scores_the_continuation_with_the_methods_crop(lmm):
    record = make_record(1, 4)  # its crop answer differs from its plain answer
    crop = vicrop_jax.answer(lmm.model, record.image, record.question, "rel_att", device_pipeline=False)
    assert crop.answer != crop.original_answer
    requests = requests_for(lmm, "loglikelihood", [
        (record.question, f" {crop.answer}", doc_image, 4, TASK, "test"),
        (record.question, lambda doc: f" {crop.original_answer}", doc_image, 4, TASK, "test"),
    ])
    box = vicrop_jax.select_bbox(vicrop_jax.importance_map(lmm.model, record.image, record.question, lmm.method),
                                 record.image.size, base_size(lmm.model))
    assert box == crop.bbox
    images = [record.image, record.image.crop(box)]
    (greedy_nll, greedy), (other_nll, other_greedy) = lmm.loglikelihood(requests)
    expected = [direct_logprob(lmm.model, images, record.question, f" {text}")
                for text in (crop.answer, crop.original_answer)]
    assert (greedy, other_greedy) == (True, False) == (expected[0][1], expected[1][1])
    assert [greedy_nll, other_nll] == pytest.approx([-expected[0][0], -expected[1][0]], rel=1e-4)  # float32, padded
    assert 0 < greedy_nll < other_nll  # a loss: lmms-eval picks a choice by its argmin


@pytest.fixture(scope="module")
def tiny_lmm(tiny_model):
    """The model class over the suite's tiny random checkpoint of each family, without a crop."""
    return integration.VicropJax(pretrained=str(tiny_model.path), method="none")


@pytest.mark.slow
def test_loglikelihood_of_each_family_equals_a_direct_forward(tiny_lmm):
    requests = requests_for(tiny_lmm, "loglikelihood", [("What is it?", " red", doc_image, 0, TASK, "test")])
    [(nll, greedy)] = tiny_lmm.loglikelihood(requests)
    logprob, expected_greedy = direct_logprob(tiny_lmm.model, [make_record(1, 0).image], "What is it?", " red")
    assert nll == pytest.approx(-logprob, rel=1e-4) and greedy == expected_greedy  # float32, padded


def test_requests_vicrop_jax_cannot_answer_are_refused(lmm):
    two_images = requests_for(lmm, "generate_until", [("Q?", GREEDY, lambda doc: [doc["image"]] * 2, 0, TASK,
                                                       "test")])
    with pytest.raises(ValueError, match="task 'vicrop_synthetic' doc 0: vicrop_jax answers about exactly one image "
                                         "per question, the task gives 2 visual"):
        lmm.generate_until(two_images)
    unconditional = [Instance("loglikelihood", ("", " red"), 0, {"task": TASK, "doc_id": 0, "repeats": 1})]
    with pytest.raises(ValueError, match="has no image"):
        lmm.loglikelihood(unconditional)
    with pytest.raises(NotImplementedError, match="single-round questions only"):
        lmm.generate_until_multi_round(two_images)


# the real lmms-eval command


def score_rows(out: Path, capsys) -> dict[str, str]:
    """`vicrop-jax score`'s accuracy cells by method, as it prints them."""
    capsys.readouterr()
    assert main(["score", str(out), "--format", "csv"]) == 0
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()
    assert table[0] == "model,method,data (gqa)"
    return {row.split(",")[1]: row.split(",")[2] for row in table[1:]}


@pytest.mark.slow
def test_lmms_eval_scores_a_local_task_as_vicrop_jax_score_does(tmp_path, capsys):
    """Both answer the same records with vicrop-tiny, rel_att and batches of 2, from the same prompt (the task's
    context is the bare question, which the family's prompt wraps in both), through answer_batch's program, and
    both score with the library's GQA metric: any difference is a bug of the integration (its prompt, which
    answer it returns, its batching or stop strings)."""
    data = write_dataset(tmp_path, 1, RECORDS)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "vicrop_jax",
               "--model_args", "pretrained=vicrop-tiny,method=rel_att,batch_size=2", "--tasks", TASK,
               "--include_path", str(TASK_FOLDER), "--output_path", str(tmp_path / "lmms"), "--log_samples"]
    run = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    [results] = list((tmp_path / "lmms").glob("*/*_results.json"))
    [samples] = list((tmp_path / "lmms").glob(f"*/*_samples_{TASK}.jsonl"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lmms_score = json.loads(results.read_text())["results"][TASK]["gqa,none"]
    [printed] = [line.split("|") for line in run.stdout.splitlines() if line.startswith(f"|{TASK}|")]
    assert float(printed[[cell.strip() for cell in printed].index("gqa") + 2]) == lmms_score  # its printed table

    out = tmp_path / "results.jsonl"
    assert main(["eval", "--data", str(data), "--images", str(tmp_path / "images"), "--model", "vicrop-tiny",
                 "--method", "rel_att", "--batch-size", "2", "--out", str(out)]) == 0
    rows = score_rows(out, capsys)
    assert rows["no crop"] != rows["rel_att"]  # so that the equality below says the crop answer was scored
    assert f"{100 * lmms_score:.2f}" == rows["rel_att"]
    logged = [json.loads(line) for line in samples.read_text().splitlines()]
    answered = {sample["doc_id"]: sample["filtered_resps"] for sample in logged}
    eval_lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [answered[i] for i in range(RECORDS)] == [line["crop_answer"] for line in eval_lines]
