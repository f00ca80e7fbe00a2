"""Scores of SPEC section 6 on known cases: the official VQA normalisation, VQA accuracy, GQA, multiple
choice, POPE, and the size bands."""

from __future__ import annotations

import pytest

from vicrop_jax.evaluation.metrics import (
    area_fraction, choose_option, gqa_accuracy, multiple_choice_accuracy, normalize_answer, pope_accuracy,
    question_options, score_answer, size_band, tercile, tercile_edges, vqa_accuracy,
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


@pytest.mark.parametrize("matches, accuracy", list(zip(range(11), [0, 0.3, 0.6, 0.9, 1, 1, 1, 1, 1, 1, 1])))
def test_vqa_accuracy_of_ten_answers(matches, accuracy):
    answers = ["two"] * matches + ["three"] * (10 - matches)
    assert vqa_accuracy("2", answers) == accuracy
    # The official leave-one-out average equals min(1, 0.3 * matches) for 10 answers.
    assert vqa_accuracy("2", answers, leave_one_out=True) == pytest.approx(accuracy)


def test_vqa_accuracy_normalises_both_sides_and_differs_from_official_on_short_lists():
    assert vqa_accuracy("The Two.", ["2", "2", "2", "two"]) == 1.0
    assert vqa_accuracy("dog", ["dog", "cat", "cat"]) == 0.3
    assert vqa_accuracy("dog", ["dog", "cat", "cat"], leave_one_out=True) == pytest.approx((0 + 1 / 3 + 1 / 3) / 3)
    assert vqa_accuracy("dog", []) == 0.0


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
    assert score_answer("vqa", "two", ["2"] * 10) == 1.0
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
