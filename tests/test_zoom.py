"""The competing zoom strategies, FOCUS (`method="focus"`) and ZoomEye's search (`method="zoom_search"`): the
FOCUS map is the same from fused and from explicit attention and equals its formula on transformers' own value
cache; the search follows ZoomEye's rules, keeps to its node budget and is deterministic; both give a box inside
the image, an answer and its cost for every record, small and very wide images included, in all three families;
the answer comes from the crop alone or, asked, from the original and the crop; bad options are refused."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import vicrop_jax
from vicrop_jax._generation import pixel_values, prompt_inputs
from vicrop_jax.cli import main
from vicrop_jax.prompts import EXISTENCE_QUESTION, NO_WORD, YES_WORD, llava_prompt
from vicrop_jax.testing.hf_models import (
    instructblip_config, llava_config, noise_image, qwen2_5_vl_config, save_instructblip, save_llava,
    save_qwen2_5_vl,
)
from vicrop_jax.vicrop import zoom
from vicrop_jax.vicrop.engine import Engine, answer_token
from vicrop_jax.vicrop.methods import resolve_method
from vicrop_jax.vicrop.strategy import Cost, Search
from vicrop_jax.vicrop.zoom import (
    MAX_TARGET_TOKENS, ZoomSearch, combined_relevance, run_searches, split_box, target_from_question, tree_depth,
    view_box,
)

QUESTION = "What is the color of the small shape ?"
TARGET = "small shape"
OPTIONS = {"focus": {"checks": 2}, "zoom_search": {"node_budget": 9}}
IMAGES = {"landscape": (150, 110), "smaller than the input": (30, 20), "very wide": (900, 60)}


def _save(family: str, folder: Path) -> None:
    if family == "llava":
        save_llava(folder, llava_config(image_size=56, text_layers=3))
    elif family == "instructblip":
        save_instructblip(folder, instructblip_config(image_size=56))
    else:
        save_qwen2_5_vl(folder, qwen2_5_vl_config())


@pytest.fixture(scope="module", params=["llava", "instructblip", "qwen2_5_vl"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    _save(request.param, folder)
    return vicrop_jax.load(folder)


def test_the_target_is_the_last_object_phrase_of_the_question():
    assert target_from_question("What shape is in the red box?") == "red box"
    assert target_from_question("What is the color of the umbrella?") == "umbrella"
    assert target_from_question("What color is the bag on the left?") == "bag"
    assert target_from_question("Are the shapes in the red box and the blue box the same?") == "blue box"
    assert target_from_question("What is written?") == "What is written"


def test_focus_map_is_the_same_with_fused_and_explicit_attention(model):
    passes = Engine(model)
    question = EXISTENCE_QUESTION.format(target=TARGET)
    maps = {kernel: passes.relevance(noise_image(), question, TARGET,
                                     resolve_method(model, "focus", attention=kernel))[0]
            for kernel in ("fused", "explicit")}
    assert maps["fused"].shape == maps["explicit"].shape and maps["fused"].ndim == 2
    np.testing.assert_allclose(maps["fused"], maps["explicit"], rtol=1e-5, atol=1e-5 * maps["explicit"].max())
    assert maps["fused"].max() == pytest.approx(1.0) and maps["fused"].std() > 0


def test_yes_no_questions_about_one_view_share_its_prefix_and_equal_whole_prompts(model):
    engine = Engine(model)
    views = [noise_image(120, 90, seed=1), noise_image(60, 200, seed=2), noise_image(seed=3)]
    questions = [["Is there a red circle in the image?", "Is the small shape blue?"], ["Is it here?"],
                 ["Is there a small shape in the image?", "Could it be a square?"]]
    yes, lengths = engine.yes_probabilities(views, questions)
    assert [len(p) for p in yes] == [2, 1, 2] and [len(n) for n in lengths] == [2, 1, 2]
    for view, asked, shared, length in zip(views, questions, yes, lengths):
        pixels, prompts = model.family.plain_inputs(model, [view] * len(asked), asked)
        by_view = jax.tree_util.tree_map(lambda leaf: leaf[None], prompts)
        yes_no = np.array([answer_token(model, YES_WORD), answer_token(model, NO_WORD)], np.int32)
        whole = zoom.yes_probabilities(engine.static._replace(prefix_tokens=None), model.params, pixels[:1], by_view,
                                       yes_no)[0]
        np.testing.assert_allclose(shared, whole, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(length, prompts.length)


def _reference_focus_map(hf_model, inputs, target_positions, image_positions, first_layer: int) -> np.ndarray:
    """FOCUS's formula on transformers' value cache: per layer, cosine similarities summed over heads,
    (S + I) / 2, rows normalised; summed over layers; each target token's row over the image tokens normalised;
    their product, peak 1."""
    with torch.no_grad():
        cache = hf_model(**inputs, use_cache=True).past_key_values
    maps = []
    for row in target_positions:
        total = 0.0
        for layer in range(first_layer, hf_model.config.text_config.num_hidden_layers):
            values = cache.layers[layer].values[0].double().numpy()  # [K, T, H]
            unit = values / np.linalg.norm(values, axis=-1, keepdims=True)
            similarity = np.einsum("kh,kth->t", unit[:, row], unit)
            similarity[row] += 1.0
            similarity /= 2
            total = total + similarity / similarity.sum()
        maps.append(np.asarray(total)[image_positions])
    return combined_relevance(np.stack(maps)[:, None, :]).ravel()


def test_focus_map_equals_its_formula_on_the_transformers_value_cache(tmp_path):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    _save("llava", tmp_path)
    model = vicrop_jax.load(tmp_path)
    hf_model = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    question = EXISTENCE_QUESTION.format(target=TARGET)
    image = noise_image()
    ids, _ = prompt_inputs(model, llava_prompt(question), 1)  # the ids and pixels the map parity tests feed
    inputs = {"input_ids": torch.tensor([ids]),
              "pixel_values": torch.tensor(pixel_values(model, [image]).transpose(0, 3, 1, 2))}
    strategy = resolve_method(model, "focus", attention="explicit")
    ours, _ = Engine(model).relevance(image, question, TARGET, strategy)
    target_ids = AutoTokenizer.from_pretrained(tmp_path)(TARGET, add_special_tokens=False)["input_ids"]
    start = max(i for i in range(len(ids)) if ids[i: i + len(target_ids)] == target_ids)
    image_positions = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
    reference = _reference_focus_map(hf_model, inputs, range(start, start + len(target_ids)), image_positions,
                                     strategy.first_layer)
    np.testing.assert_allclose(ours.ravel(), reference, rtol=1e-4, atol=1e-5)


class ScriptedPasses:
    """A deterministic stand-in model: p(yes) from a function of the view's size and pixels and the question,
    by default a hash of them. Records the questions asked."""

    base_size = 56

    def __init__(self, yes=None):
        self.yes = yes or (lambda view, question: (hash((view.size, np.asarray(view).tobytes()[:64], question))
                                                   % 1000) / 1000)
        self.asked: list[str] = []

    def yes_probabilities(self, views, questions):
        self.asked += [q for asked in questions for q in asked]
        return ([np.asarray([self.yes(v, q) for q in asked]) for v, asked in zip(views, questions)],
                [np.full(len(asked), 10) for asked in questions])


def scored_nodes(passes: ScriptedPasses) -> int:
    """The root, then every view asked for its priority (existence and latent once each)."""
    return 1 + sum(question.startswith("Is there") for question in passes.asked)


@pytest.mark.parametrize("budget", [1, 5, 9, 30])
def test_the_search_keeps_to_its_node_budget_and_is_deterministic(budget):
    image = noise_image(640, 480)
    strategy = ZoomSearch(node_budget=budget, answer_threshold=0.99, lower_threshold=-1.0)
    passes = ScriptedPasses()
    first = strategy.search(passes, image, QUESTION, TARGET)
    assert scored_nodes(passes) <= budget and first.cost.passes <= len(passes.asked)
    assert first == strategy.search(ScriptedPasses(), image, QUESTION, TARGET)
    for box in first.boxes:
        assert 0 <= box[0] < box[2] <= 640 and 0 <= box[1] < box[3] <= 480


def test_searches_side_by_side_find_what_they_find_alone_in_fewer_calls():
    images = [noise_image(640, 480, seed=i) for i in range(3)] + [noise_image(200, 900, seed=3)]
    strategy = ZoomSearch(node_budget=30, answer_threshold=0.99, lower_threshold=-1.0)

    class Counted(ScriptedPasses):
        def __init__(self):
            super().__init__()
            self.calls = []

        def yes_probabilities(self, views, questions):
            self.calls.append(sum(len(asked) for asked in questions))
            return super().yes_probabilities(views, questions)

    alone = [Counted() for _ in images]
    found = [strategy.search(passes, image, QUESTION, TARGET) for passes, image in zip(alone, images)]
    together = Counted()
    assert run_searches(together, [strategy.steps(together, image, QUESTION, TARGET) for image in images]) == found
    assert len(together.calls) == max(len(passes.calls) for passes in alone) < sum(len(p.calls) for p in alone)
    assert sum(together.calls) == sum(sum(passes.calls) for passes in alone)


def test_without_a_budget_the_search_is_bounded_by_its_pop_limits():
    passes = ScriptedPasses(lambda view, question: 0.0)  # never answerable: every threshold drop happens
    found = ZoomSearch().search(passes, noise_image(1000, 800), QUESTION, TARGET)
    pops = sum(q.startswith("Question:") for q in passes.asked)
    depth = tree_depth((0, 0, 1000, 800), 56, 4, 5)  # 3 pops per level, 2 more per drop, 5 drops from 0.6 to -0.2
    assert found.boxes == () and pops == 3 * depth + 2 * 4
    # each pop's children are asked beside it; the last pop ends the search, so its children are neither
    # scored nor counted
    assert scored_nodes(passes) == 1 + 4 * pops and found.cost.passes == pops + 2 * 4 * (pops - 1)


def test_the_tree_splits_views_as_zoomeye_does():
    assert split_box((0, 0, 100, 100), 4) == [(0, 0, 50, 50), (50, 0, 100, 50), (0, 50, 50, 100),
                                               (50, 50, 100, 100)]
    assert split_box((0, 0, 400, 100), 4) == [(0, 0, 100, 100), (100, 0, 200, 100), (200, 0, 300, 100),
                                               (300, 0, 400, 100)]
    assert split_box((0, 0, 103, 60), 4) == [(0, 0, 51, 30), (51, 0, 103, 30), (0, 30, 51, 60), (51, 30, 103, 60)]
    assert split_box((0, 0, 103, 20), 4)[-1] == (75, 0, 103, 20)  # strides of 25, the last takes the rest
    assert split_box((0, 0, 101, 60), 2) == [(0, 0, 50, 60), (50, 0, 101, 60)]
    assert tree_depth((0, 0, 1000, 800), 336, 4, 5) == 2 and tree_depth((0, 0, 300, 200), 336, 4, 5) == 0
    assert tree_depth((0, 0, 700, 700), 336, 4, 5) == 2  # the last child, 350 px, splits once more
    # a view grows about its centre to the input side and is cut, not shifted, at the right and bottom edges
    assert view_box((10, 10, 30, 30), (640, 480), 56) == (0, 0, 56, 56)
    assert view_box((600, 450, 640, 480), (640, 480), 56) == (592, 437, 640, 480)


def test_an_answerable_root_is_answered_without_a_crop():
    passes = ScriptedPasses(lambda view, question: 1.0)
    assert ZoomSearch().search(passes, noise_image(640, 480), QUESTION, TARGET) == Search((), None, Cost(1, 10))


def test_a_dropped_threshold_takes_the_most_answerable_popped_node_not_the_deepest():
    image = noise_image(640, 480)
    # the root answers at 0.5 (confidence 0.0), every sub-view at 0.45 (-0.1): none reaches 0.6; once the pops
    # run out the threshold falls to 0.5, then 0.4, ..., 0.0, where the root is the best popped node: no crop
    def root(view, question):
        return 0.5 if view.size == image.size else (0.45 if question.startswith("Question") else 0.9)

    assert ZoomSearch().search(ScriptedPasses(root), image, QUESTION, TARGET).boxes == ()
    # every sub-view more answerable than the root (0.4 against 0.2), though not enough at first: when the
    # threshold reaches 0.4, the first popped of the equally answerable views is cropped, a child of the root,
    # though deeper views were popped by then
    def sub(view, question):
        return 0.7 if view.size != image.size and question.startswith("Question") else 0.6

    passes = ScriptedPasses(sub)
    found = ZoomSearch().search(passes, image, QUESTION, TARGET)
    assert found.boxes == (split_box((0, 0, 640, 480), 4)[0],)
    assert sum(q.startswith("Question") for q in passes.asked) > 5  # the pops went below the first level


@pytest.mark.parametrize("method", ["focus", "zoom_search"])
def test_every_record_gets_a_box_inside_its_image_an_answer_and_a_cost(model, method):
    images = [noise_image(*size, seed=i) for i, size in enumerate(IMAGES.values())]
    answers = vicrop_jax.answer_batch(model, images, [QUESTION] * len(images), method,
                                      targets=[TARGET, None, TARGET], **OPTIONS[method])
    for image, result in zip(images, answers):
        assert isinstance(result.answer, str) and isinstance(result.original_answer, str)
        for left, top, right, bottom in result.boxes:
            assert 0 <= left < right <= image.width and 0 <= top < bottom <= image.height
        assert result.cost.passes >= 2 and result.cost.prefill_tokens > 0 and result.cost.decoded_tokens > 0
        assert result.timings["total"] > 0
    if method == "focus":
        assert all(len(a.boxes) == 1 and a.importance is not None for a in answers)


def test_the_answer_comes_from_the_crop_alone_or_from_the_original_and_the_crop(model):
    image = noise_image(400, 150)
    crop = vicrop_jax.answer(model, image, QUESTION, "focus", target=TARGET)
    both = vicrop_jax.answer(model, image, QUESTION, "focus", target=TARGET, answer_views="both")
    assert crop.boxes == both.boxes and len(crop.boxes) == 1
    alone, original = Engine(model).plain_answers([image.crop(crop.bbox), image], [QUESTION] * 2)
    assert (crop.answer, crop.original_answer) == (alone.text, original.text)
    texts, answer_cost = Engine(model).answers_with_crops(image, QUESTION, both.boxes)
    assert (both.answer, both.original_answer) == texts
    assert crop.cost.passes == both.cost.passes  # the search, then one answer pass
    assert crop.cost.prefill_tokens - alone.cost.prefill_tokens == both.cost.prefill_tokens - answer_cost.prefill_tokens


def test_zoom_answers_are_deterministic(model):
    image = noise_image(400, 150)
    runs = [vicrop_jax.answer(model, image, QUESTION, "zoom_search", target=TARGET, node_budget=9)
            for _ in range(2)]
    assert runs[0].boxes == runs[1].boxes and runs[0].answer == runs[1].answer and runs[0].cost == runs[1].cost


def test_bad_options_and_targets_are_refused(model):
    image = noise_image()
    with pytest.raises(ValueError, match="node_budget must be an integer at least 1"):
        vicrop_jax.answer(model, image, QUESTION, "zoom_search", node_budget=0)
    with pytest.raises(ValueError, match="branching must be 2 or 4"):
        vicrop_jax.answer(model, image, QUESTION, "zoom_search", branching=3)
    with pytest.raises(ValueError, match="first_layer must be"):
        vicrop_jax.answer(model, image, QUESTION, "focus", first_layer=99)
    with pytest.raises(ValueError, match="takes no option layer"):
        vicrop_jax.answer(model, image, QUESTION, "focus", layer=1)
    with pytest.raises(ValueError, match="the target is empty"):
        vicrop_jax.answer(model, image, QUESTION, "zoom_search", target="  ")
    with pytest.raises(ValueError, match=f"give a target of 1 to {MAX_TARGET_TOKENS} tokens"):
        vicrop_jax.answer(model, image, QUESTION, "focus", target=" ".join(["red"] * (MAX_TARGET_TOKENS + 1)))
    with pytest.raises(ValueError, match="answer_views must be one of crop, both"):
        vicrop_jax.answer(model, image, QUESTION, "focus", answer_views="original")
    with pytest.raises(ValueError, match="1 targets for 2 questions"):
        vicrop_jax.answer_batch(model, [image] * 2, [QUESTION] * 2, "focus", targets=[TARGET])


def test_eval_runs_the_zoom_strategies_with_their_options_and_records_the_cost(tmp_path):
    _save("llava", tmp_path / "model")
    (tmp_path / "images").mkdir()
    records = []
    for i, size in enumerate(IMAGES.values()):
        noise_image(*size, seed=i).save(tmp_path / "images" / f"{i}.png")
        records.append({"id": i, "question": QUESTION, "labels": ["red"], "image_path": f"{i}.png",
                        **({"target": TARGET} if i else {})})
    (tmp_path / "data.json").write_text(json.dumps(records))
    common = ["eval", "--data", str(tmp_path / "data.json"), "--images", str(tmp_path / "images"),
              "--model", str(tmp_path / "model"), "--method", "zoom_search"]
    out = tmp_path / "zoom.jsonl"
    assert main([*common, "--out", str(out), "--option", "node_budget=5", "--option",
                 "threshold_decrease=[0.2,0.3]"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and all(line["cost"]["passes"] >= 2 and line["error"] is None for line in lines)
    assert lines[0]["method"] == "zoom_search node_budget=5 threshold_decrease=[0.2,0.3]"
    for refused in (["--option", "budget=5"], ["--layer", "1"], ["--option", "node_budget=many"]):
        assert main([*common, "--out", str(tmp_path / "bad.jsonl"), *refused]) == 2
    assert not (tmp_path / "bad.jsonl").exists() or not (tmp_path / "bad.jsonl").read_text()
