"""Strategies run themselves: one defined outside the library, by its boxes alone or by its own batch-first
`run` over the engine's passes, goes through `answer` and `answer_batch` like the library's own."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import pytest

import vicrop_jax
from vicrop_jax.testing.hf_models import noise_image as scene
from vicrop_jax.vicrop.engine import Engine
from vicrop_jax.vicrop.strategy import Answer, Cost, Record, Search

QUESTIONS = ["What is the color of the small shape ?", "What shape is on the left ?", "how many ?"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeftHalf(vicrop_jax.Strategy):
    """Crops the image's left half: a strategy that only says where to crop."""

    name: ClassVar[str] = "left_half"

    def host_boxes(self, engine, record):
        width, height = record.image.size
        return Search(((0, 0, max(width // 2, 1), height),), None, Cost())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prefixed(vicrop_jax.Strategy):
    """Answers `prefix + question` over the original alone, a batch in one engine call, and counts its batches."""

    name: ClassVar[str] = "prefixed"
    prefix: str = "Look closely. "
    batches: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def run(self, engine, records):
        self.batches.append(len(records))
        plain = engine.plain_answers([r.image for r in records], [self.prefix + r.question for r in records])
        return [Answer(p.text, p.text, (), None, {"total": 0.0}, p.confidence, cost=p.cost) for p in plain]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def test_a_strategy_that_only_finds_boxes_is_answered_with_its_crops(model):
    images = [scene(), scene(90, 120, seed=1), scene(seed=2)]
    results = vicrop_jax.answer_batch(model, images, QUESTIONS, LeftHalf(), batch_size=2)
    for image, question, result in zip(images, QUESTIONS, results):
        box = (0, 0, image.width // 2, image.height)
        texts, cost = Engine(model).answers_with_crops(image, question, [box])
        assert result.boxes == (box,) and (result.answer, result.original_answer) == texts
        assert result.cost == cost and result.importance is None
    assert vicrop_jax.answer(model, images[0], QUESTIONS[0], LeftHalf()).answer == results[0].answer
    with pytest.raises(ValueError, match="method 'left_half' makes no map"):
        vicrop_jax.importance_map(model, images[0], QUESTIONS[0], LeftHalf())


def test_a_strategy_with_its_own_run_answers_whole_batches(model):
    images = [scene(seed=i) for i in range(5)]
    questions = [QUESTIONS[i % 3] for i in range(5)]
    strategy = Prefixed()
    results = vicrop_jax.answer_batch(model, images, questions, strategy, batch_size=2)
    assert strategy.batches == [2, 2, 1]  # one call per batch, not per record
    expected = Engine(model).plain_answers(images, ["Look closely. " + q for q in questions])
    assert [r.answer for r in results] == [p.text for p in expected]
    assert [r.cost for r in results] == [p.cost for p in expected]
    single = vicrop_jax.answer(model, images[0], questions[0], strategy, prefix="Look. ")
    assert single.answer == Engine(model).plain_answers(images[:1], ["Look. " + questions[0]])[0].text


def test_plain_answers_of_a_batch_equal_single_ones_whatever_the_question_lengths(model):
    # InstructBLIP's Q-Former prompt is padded to a bucket of its own: a long and a short question share a batch
    long = "Looking at every part of the picture, from the top left corner to the bottom right, " * 3 + "what is it?"
    images, questions = [scene(seed=1), scene(seed=2)], [QUESTIONS[2], long]
    batched = vicrop_jax.NoCrop().run(Engine(model), [Record(i, q, q) for i, q in zip(images, questions)])
    for image, question, result in zip(images, questions, batched):
        single = Engine(model).plain_answers([image], [question])[0]
        assert (result.answer, result.cost) == (single.text, single.cost)


def test_a_bad_record_of_a_batch_fails_alone_and_answer_raises_its_own_error(model):
    images = [scene(seed=i) for i in range(4)]
    questions = [QUESTIONS[0], None, QUESTIONS[1], QUESTIONS[2]]
    boxes = [(0, 0, 30, 30), None, ("a", "b", "c", "d"), (5, 5, 40, 40)]
    with pytest.raises(vicrop_jax.BatchError) as raised:
        vicrop_jax.answer_batch(model, images, questions, "gt", bboxes=boxes, batch_size=4)
    error = raised.value
    assert [i for i, _ in error.failures] == [1, 2]
    assert "question must be a string, got NoneType" in error.failures[0][1]
    assert error.failures[1][1].startswith("TypeError") or error.failures[1][1].startswith("ValueError")
    single = {i: vicrop_jax.answer(model, images[i], questions[i], "gt", bbox=boxes[i]) for i in (0, 3)}
    assert [a is not None for a in error.answers] == [True, False, False, True]
    assert all(error.answers[i].answer == single[i].answer for i in single)
    with pytest.raises(type(error.causes[1])):
        vicrop_jax.answer(model, images[2], questions[2], "gt", bbox=boxes[2])
    with pytest.raises(ValueError, match="got one string"):
        vicrop_jax.answer_batch(model, images[:3], "abc")
    for name, value in (("batch_size", -1), ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("seed", -1)):
        with pytest.raises(ValueError, match=f"{name} must be an integer of at least ., got {value}"):
            vicrop_jax.answer_batch(model, images[:1], QUESTIONS[:1], "random", **{name: value})
    gated = vicrop_jax.answer(model, images[0], QUESTIONS[0], "rel_att", gate=np.float32(1.0))
    assert gated.cropped and gated.confidence < 1.0
