"""Per-answer scores of docs/method.md (Scoring), each equal to the scorer it names, and the size bands.

Every score is a float for one prediction (in [0, 1] but for `gqa_paper`); a benchmark's accuracy is their mean.
The references, read at these commits:
- the official VQA evaluation, GT-Vision-Lab/VQA `vqaEval.py` at a013f00 (2021, "Fixed processing answers bug");
- the paper's scorer, saccharomycetes/mllms_know `get_score.py` at a64c5d5.
Each metric's docstring says which it follows and where the other differs.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from typing import Sequence

import numpy as np

METRICS = ("vqa", "vqa_paper", "gqa", "gqa_paper", "mc", "pope")
METRIC_NAMES = {
    "vqa": "VQA accuracy, official evaluation", "vqa_paper": "VQA accuracy, the paper's scorer",
    "gqa": "label contained, once per record", "gqa_paper": "labels contained, summed as the paper's scorer",
    "mc": "multiple choice", "pope": "yes/no",
}

# The official VQA eval's tables (github.com/GT-Vision-Lab/VQA, vqaEval.py). Its capitalised contraction
# keys ("Im", "Ive", "Id've", "I'dve") are left out: they are looked up after lowercasing, so never match.
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official pattern reads "(?!<=\d)": a typo for a look-behind that makes it "a period not followed by a
# digit" (so "5." loses its period and "3.5" keeps it). Kept as is, because scores must match the official ones.
# Its `sub("", text, re.UNICODE)` passes re.UNICODE (32) as the count: at most 32 periods go.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
MAX_PERIODS_REMOVED = 32
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")

SIZE_BANDS = (("small", 0.005), ("medium", 0.05), ("large", math.inf))
TERCILES = ("tercile 1", "tercile 2", "tercile 3")


def _strip_punctuation(text: str) -> str:
    """The official rule: a mark touching a space, or any mark in a text with a digit comma ("1,000"), is
    deleted; otherwise it becomes a space ("y,es" -> "y es"). Then periods not followed by a digit go."""
    delete = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        glue = "" if delete or mark + " " in text or " " + mark in text else " "
        out = out.replace(mark, glue)
    return _PERIOD.sub("", out, count=MAX_PERIODS_REMOVED)


def _digits_articles_contractions(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def _clean(text: str) -> str:
    """The official evaluation's first step on every answer: newlines and tabs to spaces, ends stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str, *, clean: bool = True) -> str:
    """The VQA answer normalisation: punctuation, lower case, number words to digits, articles removed,
    contractions fixed ("dont" -> "don't"), whitespace collapsed. `clean=False` skips the official evaluation's
    pre-strip of newlines, tabs and the ends, as the paper's scorer does (which can change the punctuation
    rule: a mark touching a leading space is deleted rather than spaced)."""
    return _digits_articles_contractions(_strip_punctuation(_clean(text) if clean else text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy as the official evaluation computes it: prediction and answers cleaned (`_clean`); both
    normalised only when the answers are not all the same string; then the mean over the answers of
    min(1, matches among the other answers / 3). For 10 answers that is min(1, 0.3 * matches)."""
    answers = [_clean(answer) for answer in answers]
    predicted = _clean(prediction)
    if len(set(answers)) > 1:
        answers = [normalize_answer(answer, clean=False) for answer in answers]
        predicted = normalize_answer(predicted, clean=False)
    hits = [answer == predicted for answer in answers]
    return sum(min(1.0, (sum(hits) - hit) / 3) for hit in hits) / max(1, len(hits))


def vqa_paper_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy as the paper's scorer computes it: min(1, 0.3 * answers equal to the prediction), both
    always normalised, without the pre-strip. It differs from the official one on short answer lists, on
    lists of identical answers (the official compares them unnormalised) and on surrounding whitespace."""
    predicted = normalize_answer(prediction, clean=False)
    return min(0.3 * sum(normalize_answer(answer, clean=False) == predicted for answer in answers), 1)


def _contained(prediction: str, labels: Sequence[str]) -> list[bool]:
    predicted = normalize_answer(prediction, clean=False)
    return [normalize_answer(label, clean=False) in predicted for label in labels]


def gqa_accuracy(prediction: str, labels: Sequence[str]) -> float:
    """1 if a label, normalised as the paper's scorer does, is a substring of the normalised prediction.

    Substring, not word, containment is paper-exact; note that it lets the label "no" match "not". The paper's
    scorer adds 1 for every contained label, so a record can score above 1 (`gqa_paper_accuracy`).
    """
    return float(any(_contained(prediction, labels)))


def gqa_paper_accuracy(prediction: str, labels: Sequence[str]) -> float:
    """The paper's GQA score: the number of labels contained in the prediction (uncapped)."""
    return float(sum(_contained(prediction, labels)))


def choose_option(prediction: str, options: Sequence[str]) -> int:
    """Index of the option most similar to the prediction (difflib ratio on the raw strings, first on ties),
    as the paper's scoring matches free answers to choices."""
    ratios = [difflib.SequenceMatcher(None, prediction, option).ratio() for option in options]
    return ratios.index(max(ratios))


def question_options(question: str) -> tuple[str, ...]:
    """The choices of a V*-style question: the lines between the first (question) and the last
    (instruction), as the paper's scoring reads them."""
    return tuple(question.split("\n")[1:-1])


def multiple_choice_accuracy(prediction: str, options: Sequence[str], labels: Sequence[str]) -> float:
    """1 if the option closest to the prediction is the label: given as the option's text, or its letter
    (A for the first option, also written "(A)" or "A.").

    The option is chosen as the paper's scorer chooses it; the paper's scorer then scores the letter with its
    VQA rule, so a right choice gets 0.3 against one label: a slip we do not reproduce (V* reports accuracy).
    """
    chosen = choose_option(prediction, options)
    letter = string.ascii_uppercase[chosen] if chosen < len(string.ascii_uppercase) else None
    text = normalize_answer(options[chosen])
    return float(any(
        label.strip().strip("().").upper() == letter or normalize_answer(label) == text for label in labels
    ))


def pope_accuracy(prediction: str, labels: Sequence[str]) -> float:
    """1 if the prediction, matched to "yes" or "no" by string similarity as the paper's scorer does (the raw
    prediction, "yes" on ties), is the label. The label is read case-insensitively; the paper's compares it as
    written, the same for POPE's lowercase labels. (POPE's own script instead answers "no" when "no"/"not" is a
    word of the first sentence.)"""
    chosen = ("yes", "no")[choose_option(prediction, ("yes", "no"))]
    return float(labels[0].strip().lower() == chosen)


def score_answer(metric: str, prediction: str, labels: Sequence[str], options: Sequence[str] = ()) -> float:
    """The score of one prediction under `metric` (one of METRICS)."""
    if metric == "vqa":
        return vqa_accuracy(prediction, labels)
    if metric == "vqa_paper":
        return vqa_paper_accuracy(prediction, labels)
    if metric == "gqa":
        return gqa_accuracy(prediction, labels)
    if metric == "gqa_paper":
        return gqa_paper_accuracy(prediction, labels)
    if metric == "mc":
        return multiple_choice_accuracy(prediction, options, labels)
    if metric == "pope":
        return pope_accuracy(prediction, labels)
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def area_fraction(bbox: Sequence[float], image_size: tuple[int, int]) -> float:
    """Ground-truth box area over image area (W, H): the paper's measure of how small the answer is."""
    x1, y1, x2, y2 = bbox
    return (x2 - x1) * (y2 - y1) / (image_size[0] * image_size[1])


def size_band(fraction: float) -> str:
    """The paper's partition: small < 0.005 <= medium < 0.05 <= large."""
    return next(name for name, upper in SIZE_BANDS if fraction < upper)


def tercile_edges(fractions: Sequence[float]) -> tuple[float, float]:
    """Area fractions at 1/3 and 2/3 of the sorted values: equal-count bands for data that does not
    spread over the paper's bands (synthetic sets)."""
    ordered = sorted(fractions)
    return ordered[len(ordered) // 3], ordered[2 * len(ordered) // 3]


def tercile(fraction: float, edges: tuple[float, float]) -> str:
    return TERCILES[0] if fraction < edges[0] else TERCILES[1] if fraction < edges[1] else TERCILES[2]


def attention_ratio(attention: np.ndarray, bbox: Sequence[float], image_size: tuple[int, int]) -> float:
    """Mean attention per pixel inside `bbox` over the mean outside it, the grid map spread evenly over the
    image (each cell weighted by its overlap with the box): > 1 where the model looks at the answer; inf when
    nothing falls outside the box. A map without mass (zero everywhere, e.g. a relu'd gradient map) has no
    ratio: ValueError."""
    grid_h, grid_w = attention.shape
    width, height = image_size
    xs, ys = np.linspace(0, width, grid_w + 1), np.linspace(0, height, grid_h + 1)
    overlap_x = np.clip(np.minimum(xs[1:], bbox[2]) - np.maximum(xs[:-1], bbox[0]), 0, None)
    overlap_y = np.clip(np.minimum(ys[1:], bbox[3]) - np.maximum(ys[:-1], bbox[1]), 0, None)
    inside = np.outer(overlap_y, overlap_x)
    outside = np.outer(np.diff(ys), np.diff(xs)) - inside
    if inside.sum() <= 0 or outside.sum() <= 0:
        raise ValueError(f"box {list(bbox)} must cover part, but not all, of the {width}x{height} image")
    mean_inside = (attention * inside).sum() / inside.sum()
    mean_outside = (attention * outside).sum() / outside.sum()
    if mean_outside == 0:
        if mean_inside == 0:
            raise ValueError("the map is zero everywhere, so it has no attention ratio")
        return float("inf")
    return float(mean_inside / mean_outside)
