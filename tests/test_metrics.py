"""Scores of docs/method.md (Scoring) on known cases: the official VQA normalisation, VQA accuracy, GQA, multiple
choice, POPE, and the size bands."""

from __future__ import annotations

import pytest

from vicrop_jax.evaluation.metrics import (
    area_fraction, choose_option, gqa_accuracy, multiple_choice_accuracy, normalize_answer, pope_accuracy,
    question_options, score_answer, size_band, tercile, tercile_edges, vqa_accuracy, vqa_paper_accuracy,
)


@pytest.mark.parametrize("raw, normalized", [
    ("yes.", "yes"),  # a period not followed by a digit goes
    ("y,es", "y es"),  # a mark touching no space becomes a space (the official rule)
    ("yes, sir", "yes sir"),  # a mark touching a space is deleted
    ("hello-world", "hello world"),
    ("1,000", "1000"),  # a digit comma makes every mark deleted
    ("3.5", "3.5"),  # a period before a digit stays
    ("5.", "5"),
    ("The Dog", "dog"),  # case and articles
    ("a cat and an apple", "cat and apple"),
    ("two", "2"),  # number words
    ("Ten Dogs!", "10 dogs"),
    ("none", "0"),
    ("dont", "don't"),  # contractions
    ("Whats up?", "what's up"),
    ("  Yes  ", "yes"),  # surrounding and inner whitespace
    ("red\tand\nblue", "red and blue"),
    ("", ""),
])
def test_vqa_normalisation_corner_cases(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize("matches, accuracy", list(zip(range(10), [0, 0.3, 0.6, 0.9, 1, 1, 1, 1, 1, 1])))
def test_vqa_accuracy_of_ten_answers(matches, accuracy):
    answers = ["two"] * matches + ["three"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(accuracy)  # the leave-one-out mean
    assert vqa_paper_accuracy("2", answers) == pytest.approx(accuracy)  # min(1, 0.3 * matches)


# The official evaluation's corner cases (vqaEval.py at a013f00), worked from its rules.
@pytest.mark.parametrize("prediction, answers, accuracy", [
    ("Two", ["2"] * 10, 0.0),  # all answers identical: nothing is normalised, the prediction included
    ("Two", ["2"] * 9 + ["two"], 1.0),  # answers differ: both sides normalised
    ("yes", ["Yes"] * 10, 0.0),  # identical answers are compared as written, case included
    (" yes\n", ["yes"] * 10, 1.0),  # newlines, tabs and the ends are stripped first
    ("ok" + "." * 33, ["ok"] * 5 + ["no"] * 5, 0.0),  # at most 32 periods are removed: one stays
    ("ok" + "." * 32, ["ok"] * 5 + ["no"] * 5, 1.0),
    ("1,000", ["1000"] * 5 + ["no"] * 5, 1.0),
    ("u.s.a.", ["usa"] * 5 + ["no"] * 5, 1.0),
    ("The Dog.", ["a dog"] * 5 + ["no"] * 5, 1.0),
    (" -x-ray", ["x ray"] * 5 + ["no"] * 5, 1.0),  # stripped first, so "-" touches no space and becomes one
    ("I'm", ["im"] * 5 + ["Im"] * 5, 0.0),  # the capitalised contraction keys never match
    ("dog", ["dog", "cat", "cat"], (0 + 1 / 3 + 1 / 3) / 3),  # short lists: the leave-one-out mean
    ("dog", [], 0.0),
])
def test_vqa_accuracy_equals_the_official_evaluation(prediction, answers, accuracy):
    assert vqa_accuracy(prediction, answers) == pytest.approx(accuracy)


# The paper's scorer (get_score.py at a64c5d5), worked from its rules.
@pytest.mark.parametrize("metric, prediction, labels, score", [
    ("vqa_paper", "yes", ["yes"] * 3 + ["no"] * 7, 0.3 * 3),
    ("vqa_paper", "Two", ["2"] * 10, 1.0),  # always normalised
    ("vqa_paper", " -x-ray", ["x ray"] * 5 + ["no"] * 5, 0.0),  # no pre-strip: "-" touches a space, is deleted
    ("vqa_paper", "dog", ["dog", "cat", "cat"], 0.3),
    ("gqa_paper", "the red car", ["red", "car", "the"], 3.0),  # every contained label counts; "" is contained
    ("gqa_paper", "not sure", ["no"], 1.0),
    ("gqa", "the red car", ["red", "car", "the"], 1.0),  # ours: once per record
    ("pope", "NO", ["no"], 0.0),  # the raw prediction ties between yes and no: yes
    ("pope", "No, there is not.", ["no"], 1.0),
    ("pope", "maybe", ["yes"], 1.0),
])
def test_paper_scorer_cases(metric, prediction, labels, score):
    assert score_answer(metric, prediction, labels) == pytest.approx(score)


def test_normalisation_without_the_official_pre_strip():
    assert normalize_answer(" -x-ray") == "x ray"
    assert normalize_answer(" -x-ray", clean=False) == "xray"


def test_gqa_containment():
    assert gqa_accuracy("It is the red car.", ["Red"]) == 1.0
    assert gqa_accuracy("blue", ["red"]) == 0.0
    assert gqa_accuracy("not sure", ["no"]) == 1.0  # substring containment, paper-exact


def test_multiple_choice_by_string_similarity():
    options = question_options("What color is the cup?\n(A) red\n(B) dark blue\nAnswer with the option's letter.")
    assert options == ("(A) red", "(B) dark blue")
    assert choose_option("blue", options) == 1
    assert multiple_choice_accuracy("blue", options, ["B"]) == 1.0
    assert multiple_choice_accuracy("blue", options, ["(B)"]) == 1.0
    assert multiple_choice_accuracy("blue", options, ["A"]) == 0.0
    assert multiple_choice_accuracy("The cup is red.", ["red", "dark blue"], ["red"]) == 1.0
    assert multiple_choice_accuracy("The cup is red.", ["red", "dark blue"], ["dark blue"]) == 0.0
    assert choose_option("x", ["a", "b"]) == 0  # ties: the first


def test_pope_yes_no():
    assert pope_accuracy("Yes, there is a dog.", ["yes"]) == 1.0
    assert pope_accuracy("No", ["yes"]) == 0.0
    assert pope_accuracy("no", ["No"]) == 1.0


def test_score_answer_dispatches_and_refuses_unknown_metrics():
    assert score_answer("vqa", "two", ["2"] * 9 + ["3"]) == 1.0
    assert score_answer("gqa", "a red car", ["red"]) == 1.0
    assert score_answer("mc", "blue", ["B"], ["red", "blue"]) == 1.0
    assert score_answer("pope", "yes", ["no"]) == 0.0
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score_answer("bleu", "a", ["a"])


def test_size_bands_and_terciles():
    assert area_fraction((10, 10, 20, 30), (100, 200)) == pytest.approx(200 / 20000)
    assert [size_band(f) for f in (0.0, 0.0049, 0.005, 0.0499, 0.05, 1.0)] == [
        "small", "small", "medium", "medium", "large", "large"]
    fractions = [0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6]
    edges = tercile_edges(fractions)
    assert edges == (0.4, 0.7)
    parts = [tercile(f, edges) for f in fractions]
    assert {name: parts.count(name) for name in set(parts)} == {"tercile 1": 3, "tercile 2": 3, "tercile 3": 3}
