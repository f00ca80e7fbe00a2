"""The competing zoom strategies on ViCrop's backbone: FOCUS (arXiv 2506.21710) and ZoomEye (arXiv 2411.16044).

Both pick a crop of the original image with model passes of their own and answer from it (the crop alone, as both
papers do with LLaVA-1.5, or with `answer_views="both"` the original and the crop, ViCrop's answer step). They
differ in how the crop is found:
- `Focus`: one prefill of "Is there a {target} in the image?" in which no layer materialises attention
  probabilities (every LM layer may run the fused kernel); the relevance of each image token is read from the KV
  cache, as the cosine similarity of its value vectors with the target's; region proposals grown around the
  map's peaks are ranked, the target's presence in the best few is asked (in one batched call), and the surest
  one is cropped.
- `ZoomSearch`: the image as a tree of sub-views; the model's yes/no confidences about each view steer a bounded
  best-first search; a node whose view lets the model answer (by its own confidence) is cropped.

The strategies are host-side algorithms over two batched device programs (`focus_relevance`, `yes_probabilities`);
the model passes reach them through the `Engine`, which counts each in a `Cost`.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import functools
import re
import time
from typing import TYPE_CHECKING, ClassVar, Generator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from vicrop_jax.families import PromptArrays
from vicrop_jax.nn._attention import AttentionKernel
from vicrop_jax.nn.llama import ATTENTION_PROBS, KVCache
from vicrop_jax.nn.decoding import prefill
from vicrop_jax.prompts import ANSWERING_QUESTION, EXISTENCE_QUESTION, LATENT_QUESTION
from vicrop_jax.vicrop.boxes import Box, grow_box
from vicrop_jax.vicrop.maps import (
    StaticModel, captured_attention, prefill_prefix, run_plain, split_prompt, suffix_run,
)
from vicrop_jax.vicrop.strategy import Answer, Cost, Search, Strategy, default_map_layer, int_box

if TYPE_CHECKING:
    from vicrop_jax.vicrop.engine import Engine

MAX_TARGET_TOKENS = 16  # target phrases are padded to this many token rows (one program for any phrase)
PAPER_GRID = 24  # LLaVA-1.5's grid, on which FOCUS's region sizes are given


# ------------------------------------------------------------------------------------------------ the target


_STOP = r"the|a|an|and|or|of|in|on|at|with|to|is|are|hold|holds"
_ARTICLE = re.compile(rf"\b(?:the|a|an)\s+(.+?)(?=\s+(?:{_STOP})\b|[?.,;!]|$)", re.IGNORECASE)
NOT_OBJECTS = frozenset({"same", "image", "picture", "photo", "question", "following", "other", "left", "right", "top",
                         "bottom", "middle", "center", "centre", "front", "back", "background", "foreground"})


def target_from_question(question: str) -> str:
    """The object a question asks about, by a fixed rule: the words after the last article ("the", "a", "an")
    up to the next article, preposition, conjunction or punctuation, skipping phrases that name no object
    ("same", "image", ...); without any, the question itself. "What shape is in the red box?" -> "red box"."""
    phrases = [m.group(1).strip() for m in _ARTICLE.finditer(question)]
    objects = [p for p in phrases if p.lower() not in NOT_OBJECTS]
    return objects[-1] if objects else question.strip().rstrip("?.!")


def target_rows(full_ids: list[int], target_ids: list[int]) -> np.ndarray:
    """The positions of the target's tokens in a prompt's ids (their last occurrence), for `focus_relevance`."""
    span = len(target_ids)
    if not 0 < span <= MAX_TARGET_TOKENS:
        raise ValueError(f"the target phrase has {span} tokens; give a target of 1 to {MAX_TARGET_TOKENS} tokens")
    starts = [i for i in range(len(full_ids) - span + 1) if full_ids[i: i + span] == target_ids]
    if not starts:
        raise ValueError("the target's tokens are not in the prompt: give a target phrase the tokenizer keeps whole")
    return np.arange(starts[-1], starts[-1] + span, dtype=np.int32)


# ------------------------------------------------------------------------------------------ device programs


def value_similarity(values: tuple[jax.Array, ...], length: jax.Array, rows: jax.Array) -> jax.Array:
    """FOCUS's relevance rows [R, S] of the target tokens at `rows`: per layer, the cosine similarity of value
    vectors summed over KV heads, (S + I) / 2, each row normalised over the prompt's slots; summed over layers.
    values: per layer [1, K, H, S] (the cache's layout)."""
    slots = values[0].shape[-1]
    valid = jnp.arange(slots) < length
    identity = (rows[:, None] == jnp.arange(slots)[None]).astype(jnp.float32)
    total = jnp.zeros((rows.shape[0], slots), jnp.float32)
    for layer_values in values:
        v = layer_values[0].astype(jnp.float32)  # [K, H, S]
        unit = v / jnp.maximum(jnp.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        similarity = jnp.einsum("khr,khs->rs", jnp.take(unit, rows, axis=2), unit)
        similarity = jnp.where(valid, (similarity + identity) / 2, 0.0)
        total = total + similarity / similarity.sum(axis=-1, keepdims=True)
    return total


@functools.partial(jax.jit, static_argnames=("static", "strategy"))
def focus_relevance(static: StaticModel, params, pixels, prompt: PromptArrays, rows: jax.Array, *,
                    strategy: "Focus") -> jax.Array:
    """The relevance map of each target token row [R, ...] (the family's map layout) from one prefill whose LM
    layers sow nothing: with the fused kernel, no layer computes its attention probabilities. InstructBLIP's map
    goes from its 32 query tokens to the patches through the Q-Former's cross-attention (`qformer_layer`), the
    only spatial link that family has."""

    def run(m):
        features = static.family.map_features(m, pixels, prompt, strategy)
        embeds = m.embed(prompt.ids[None], features)
        positions = None if prompt.positions is None else prompt.positions[..., None, :]
        _, cache = m.decode(embeds, KVCache.zeros(m.config.text, 1, prompt.ids.shape[0], m.dtype), 0, (), positions)
        return None, cache

    read, (_, cache) = captured_attention(static.module, params, run)
    relevance = value_similarity(cache.values[strategy.first_layer:], prompt.length, rows)

    def token_map(row):
        lm_row = lambda name: row[None, None, :] if name == ATTENTION_PROBS else read(name)  # noqa: E731
        return static.family.attention_map(static.config, lm_row, 0, prompt, strategy)

    return jax.vmap(token_map)(relevance)


@functools.partial(jax.jit, static_argnames=("static",))
def yes_probabilities(static: StaticModel, params, pixels, prompts: PromptArrays, yes_no: jax.Array) -> jax.Array:
    """p(yes) / (p(yes) + p(no)) of the first answer token [V, Q] for Q prompts about each of V views (pixels
    [V, ...], prompts [V, Q, ...]). Where the family shares a prefix of text and the image between prompts, each
    view is encoded and its prefix prefilled once, and each question runs only its suffix; else each prompt runs
    whole."""
    module = static.module

    def whole(pixels, prompt):
        features = static.family.image_features(module, params, pixels, prompt)
        logits, _ = prefill(module, params, prompt.ids, prompt.length, features, prompt.ids.shape[0],
                            prompt.positions)
        return logits[yes_no]

    def shared(pixels, prompts):
        first = jax.tree_util.tree_map(lambda leaf: leaf[0], prompts)
        view = static.family.original_features(module, params, pixels, first)
        cache = prefill_prefix(module, params, view.features, split_prompt(static, first, [view]).prefix,
                               first.ids.shape[0])
        return jax.vmap(lambda prompt: run_plain(module, params, suffix_run(
            cache, split_prompt(static, prompt, [view])))[0][yes_no])(prompts)

    per_view = (jax.vmap(whole, in_axes=(None, 0)) if static.prefix_tokens is None else shared)
    return jax.nn.softmax(jax.vmap(per_view)(pixels, prompts).astype(jnp.float32), axis=-1)[..., 0]


def combined_relevance(maps: np.ndarray) -> np.ndarray:
    """FOCUS's map of a target phrase from its tokens' maps [R, gh, gw]: each cut at zero and normalised to sum
    1, then their product (renormalised to a peak of 1 as it goes, so that long phrases do not underflow). A
    token whose map has no positive cell (cosine similarities can all be negative) says nothing of where the
    target is and is left out; without any, the map is flat."""
    combined = np.ones(maps.shape[1:], np.float64)
    for token_map in np.maximum(np.asarray(maps, np.float64), 0.0):
        if token_map.sum() > 0:
            combined = combined * token_map / token_map.sum()
            combined = combined / max(combined.max(), 1e-300)
    return combined.astype(np.float32)


# --------------------------------------------------------------------------------------------- the interface


class AnswerViews(enum.Enum):
    """What a zoom strategy answers from: the crop alone, as both papers do with LLaVA-1.5 ("crop"), or the
    original and the crop as two images, ViCrop's answer step ("both")."""

    CROP = "crop"
    BOTH = "both"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZoomStrategy(Strategy, abc.ABC):
    """A strategy that searches for its crop with model passes of its own, then answers from what it found."""

    answer_views: AnswerViews | str = AnswerViews.CROP

    def resolved(self, model) -> "ZoomStrategy":
        try:
            return dataclasses.replace(self, answer_views=AnswerViews(self.answer_views))
        except ValueError:
            raise ValueError(f"answer_views must be one of {', '.join(v.value for v in AnswerViews)}, got "
                             f"{self.answer_views!r}") from None

    @abc.abstractmethod
    def steps(self, passes: "Engine", image: PIL.Image.Image, question: str, target: str
              ) -> Generator[Asked, Replies, Search]:
        """The search for the crop(s) of a question about `target` in the image, as a generator: it yields the
        yes/no questions it asks next (`Asked`), is sent back their p(yes) and prompt lengths, and returns what it
        found. So `run_searches` can ask the questions of many searches in one call."""

    def search(self, passes: "Engine", image: PIL.Image.Image, question: str, target: str) -> Search:
        """The crop(s) for a question about `target` in the image."""
        return run_searches(passes, [self.steps(passes, image, question, target)])[0]

    def host_boxes(self, engine, record):
        return self.search(engine, record.image, record.map_question, zoom_target(record.target, record.map_question))

    def run(self, engine, records):
        """The searches of all records side by side (each step's questions in one call), then the answers: from
        the crop alone (all records' crops and originals in one call), or from the original and the crop."""
        start = time.perf_counter()
        found = run_searches(engine, [self.steps(engine, r.image, r.map_question,
                                                 zoom_target(r.target, r.map_question)) for r in records])
        searched = time.perf_counter()
        if self.answer_views is AnswerViews.BOTH:
            answers = [engine.answer_from(record, search, searched) for record, search in zip(records, found)]
        else:
            views = [[_crop(r.image, box) for box in search.boxes] + [r.image] for r, search in zip(records, found)]
            plain = iter(engine.plain_answers([v for group in views for v in group],
                                              [r.question for r, group in zip(records, views) for _ in group]))
            answers = []
            for group, search in zip(views, found):
                texts = [next(plain) for _ in group]
                answers.append(Answer(texts[0].text, texts[-1].text, tuple(int_box(box) for box in search.boxes),
                                      search.importance, {}, cost=search.cost + texts[0].cost))
        share = (time.perf_counter() - start) / len(records)
        search_share = (searched - start) / len(records)
        timings = {"search": search_share, "answer": share - search_share, "total": share}
        return [dataclasses.replace(answer, timings=timings) for answer in answers]


class Asked(NamedTuple):
    """The yes/no questions a search asks in one step: p(yes) of each view (as the only image) for each of its
    questions."""

    views: list[PIL.Image.Image]
    questions: list[list[str]]  # per view


Replies = tuple[list[np.ndarray], list[np.ndarray]]  # per view of an `Asked`: p(yes) and prompt length per question


def run_searches(passes: "Engine", searches: list[Generator[Asked, Replies, Search]]) -> list[Search]:
    """Searches run side by side: at each step the questions of every unfinished search go in one call."""
    found: list[Search | None] = [None] * len(searches)
    asked: dict[int, Asked] = {}

    def advance(i: int, reply) -> None:
        try:
            asked[i] = searches[i].send(reply)
        except StopIteration as done:
            asked.pop(i, None)
            found[i] = done.value

    for i in range(len(searches)):
        advance(i, None)
    while asked:
        pending = list(asked.items())
        yes, lengths = passes.yes_probabilities([v for _, a in pending for v in a.views],
                                                [q for _, a in pending for q in a.questions])
        begin = 0
        for i, step in pending:
            end = begin + len(step.views)
            advance(i, (yes[begin:end], lengths[begin:end]))
            begin = end
    return found


def asked_cost(lengths: list[np.ndarray]) -> Cost:
    """The passes of one step's questions, as the published procedures run them: a whole prompt each."""
    return Cost(sum(len(view) for view in lengths), int(sum(np.sum(view) for view in lengths)))


def zoom_target(target: str | None, question: str) -> str:
    """The object a zoom strategy looks for: `target`, or by `target_from_question`; an empty one is refused."""
    target = (target if target is not None else target_from_question(question)).strip()
    if not target:
        raise ValueError("the target is empty: give target= the object to look for")
    return target


def _crop(image: PIL.Image.Image, box: Box) -> PIL.Image.Image:
    return image.crop(int_box(box))


def _checked(name: str, value, low, high=None, integer: bool = False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------- FOCUS


def _scaled_cells(cells: int, grid: int) -> int:
    return max(1, int(round(cells * grid / PAPER_GRID)))


def _window(center: tuple[int, int], side: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """A side x side window of cells centred on a cell, cut to the grid: (row0, col0, row1, col1), exclusive."""
    half = side // 2
    (r, c), (h, w) = center, shape
    return max(0, r - half), max(0, c - half), min(h, r - half + side), min(w, c - half + side)


def _iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda x: (x[2] - x[0]) * (x[3] - x[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Focus(ZoomStrategy):
    """FOCUS: relevance from the cached value vectors, region proposals, an existence check, the surest region.

    first_layer: the relevance sums layers first_layer.. to the last (None: the model's map layer, the paper's
    14 of 32 for LLaVA-1.5). anchors: peaks of the map kept as proposal centres, at least `anchor_distance`
    cells apart (None: the paper's 15, or 30 from 4 checks on); each proposal is a square of `roi_min` cells
    grown by two cells while the grown square's mean stays at least `expansion_threshold` of the peak's value,
    up to `roi_max` (cells: None scales the paper's 3, 5 and 3 on LLaVA-1.5's 24-cell grid to the model's grid).
    Proposals overlapping a better one by more than `nms_iou` are dropped; each becomes a crop of at least the
    model's resolution. The best `checks` proposals are asked, in one call, whether the target is there; with
    `overrun`, while none says yes, the next ones are asked one at a time. The proposal of the highest p(yes)
    is cropped. attention: the kernel of the prefill (`AttentionKernel` or its name; fused: no layer computes
    attention probabilities, FOCUS's point).
    """

    name: ClassVar[str] = "focus"
    heads: ClassVar[None] = None  # the family's map readers take the mean over all heads
    first_layer: int | None = None
    qformer_layer: int = 2
    anchors: int | None = None
    roi_min: int | None = None
    roi_max: int | None = None
    anchor_distance: int | None = None
    expansion_threshold: float = 0.5
    nms_iou: float = 0.3
    checks: int = 2
    overrun: bool = True
    question: str = EXISTENCE_QUESTION
    attention: AttentionKernel | str = AttentionKernel.FUSED

    def resolved(self, model) -> "Focus":
        layers = model.config.text.num_layers
        first = default_map_layer(model) if self.first_layer is None else self.first_layer
        _checked("first_layer", first, 0, layers - 1, integer=True)
        _checked("checks", self.checks, 1, integer=True)
        for name in ("anchors", "roi_min", "roi_max", "anchor_distance"):
            if getattr(self, name) is not None:
                _checked(name, getattr(self, name), 1, integer=True)
        _checked("expansion_threshold", self.expansion_threshold, 0.0, 1.0)
        _checked("nms_iou", self.nms_iou, 0.0, 1.0)
        if "{target}" not in self.question:
            raise ValueError(f"the FOCUS question must name the target as {{target}}, got {self.question!r}")
        anchors = (15 if self.checks < 4 else 30) if self.anchors is None else self.anchors
        strategy = dataclasses.replace(super().resolved(model), first_layer=int(first), anchors=anchors,
                                       attention=AttentionKernel.resolve(self.attention))
        model.family.check_map_options(model.config, strategy)
        return strategy

    def region_sizes(self, grid: tuple[int, int]) -> tuple[int, int, int]:
        """(roi_min, roi_max, anchor_distance) in cells of this grid."""
        side = max(grid)
        pick = lambda value, paper: _scaled_cells(paper, side) if value is None else value  # noqa: E731
        smallest = pick(self.roi_min, 3)
        return smallest, max(smallest, pick(self.roi_max, 5)), pick(self.anchor_distance, 3)

    def proposals(self, relevance: np.ndarray, image_size: tuple[int, int], base_size: int) -> list[Box]:
        """Region proposals, best first: windows grown around the map's peaks, overlaps suppressed, as crop boxes
        of at least `base_size` in image pixels (the grid stretched over the whole image, as ViCrop's boxes)."""
        grid = relevance.shape
        roi_min, roi_max, distance = self.region_sizes(grid)
        order = np.argsort(-relevance, axis=None, kind="stable")
        kept: list[tuple[int, int]] = []
        for flat in order:
            cell = divmod(int(flat), grid[1])
            if all(max(abs(cell[0] - r), abs(cell[1] - c)) >= distance for r, c in kept):
                kept.append(cell)
            if len(kept) == self.anchors:
                break
        windows = []
        for cell in kept:
            peak, side = float(relevance[cell]), roi_min
            while side + 2 <= roi_max:
                r0, c0, r1, c1 = _window(cell, side + 2, grid)
                if relevance[r0:r1, c0:c1].mean() < self.expansion_threshold * peak:
                    break
                side += 2
            window = _window(cell, side, grid)
            if all(_iou(window, other) <= self.nms_iou for other in windows):
                windows.append(window)
        width, height = image_size
        cell_w, cell_h = width / grid[1], height / grid[0]
        return [grow_box((c0 * cell_w, r0 * cell_h, c1 * cell_w, r1 * cell_h), image_size, base_size)
                for r0, c0, r1, c1 in windows]

    def steps(self, passes, image, question, target):
        relevance, cost = passes.relevance(image, self.question.format(target=target), target, self)
        proposals = self.proposals(relevance, image.size, passes.base_size)
        check = EXISTENCE_QUESTION.format(target=target)
        best, best_yes, begin, size = proposals[0], -1.0, 0, self.checks
        while begin < len(proposals):
            batch = proposals[begin: begin + size]
            yes, lengths = yield Asked([_crop(image, box) for box in batch], [[check]] * len(batch))
            cost += asked_cost(lengths)
            yes = np.concatenate(yes)
            top = int(np.argmax(yes))  # the first of equals: the better-ranked proposal
            if yes[top] > best_yes:
                best, best_yes = batch[top], float(yes[top])
            if not self.overrun or best_yes >= 0.5:
                break
            begin, size = begin + size, 1
        return Search((best,), relevance, cost)


# ------------------------------------------------------------------------------------------------- ZoomEye


@dataclasses.dataclass(frozen=True)
class Node:
    box: Box
    depth: int
    order: int  # creation order: the queue's sort is stable, so ties keep it
    priority: float
    answering: float | None = None  # asked when the node is popped


def split_box(box: Box, branching: int) -> list[Box]:
    """A view's sub-views, row by row: 2 x 2 (branching 4; 4 x 1 or 1 x 4 when one side is at least twice the
    other) or two halves along the longer side (branching 2); strides of whole pixels, the last row and column
    taking the remainder, as ZoomEye's tree."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    if branching == 2:
        rows, cols = (2, 1) if height > width else (1, 2)
    elif height >= 2 * width:
        rows, cols = 4, 1
    elif 2 * height <= width:
        rows, cols = 1, 4
    else:
        rows, cols = 2, 2
    xs = [left + i * (width // cols) for i in range(cols)] + [right]
    ys = [top + j * (height // rows) for j in range(rows)] + [bottom]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(rows) for i in range(cols)]


def splits(box: Box, min_side: int) -> bool:
    """Whether a view has sub-views: its longer side is at least the model's input side."""
    return max(box[2] - box[0], box[3] - box[1]) >= min_side


def tree_depth(box: Box, min_side: int, branching: int, limit: int) -> int:
    """The depth of the image's tree (its deepest view, at most `limit`): the last sub-view, which takes the
    remainder, is the largest, so it is the one that splits deepest."""
    depth = 0
    while depth < limit and splits(box, min_side):
        box, depth = split_box(box, branching)[-1], depth + 1
    return depth


def view_box(box: Box, image_size: tuple[int, int], min_side: int) -> Box:
    """The part of the image the model sees for a node: its box grown about its centre to at least `min_side` a
    side, cut (not shifted) where it passes the image's right or bottom edge, as ZoomEye's patches."""
    (left, top, right, bottom), (width, height) = box, image_size
    sides = max(right - left, min_side), max(bottom - top, min_side)
    x = max(0, (left + right) // 2 - sides[0] // 2)
    y = max(0, (top + bottom) // 2 - sides[1] // 2)
    return x, y, min(x + sides[0], width), min(y + sides[1], height)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZoomSearch(ZoomStrategy):
    """ZoomEye's search for one visual cue (its type-1 search), with its LLaVA-1.5 settings as defaults.

    The image is a tree of views (`split_box` down to views smaller than the model's input side, at most
    `max_depth` levels). A confidence is 2 p(yes) - 1 over the first answer token's Yes and No. A node in the
    queue has the priority w * existence + (1 - w) * latent, w = bias + (1 - bias) * depth^2 / D^2 (D the tree's
    depth); the children of a popped node are scored together, in the call that asks it. A popped node is asked
    whether the question can be answered from its view: at `answer_threshold` or above, it is the one. After
    `pops_per_depth` * D pops the threshold drops by the next of `threshold_decrease` (the last one repeats),
    `pop_increment` more pops are allowed, and the popped node of the highest answering confidence at or above
    the new threshold is taken; the search gives up below `lower_threshold` or when the queue runs out (no
    crop). The root means no crop; another node's view (`view_box`) is cropped. `node_budget` (None: no limit,
    as published) caps the views scored; a node whose children would pass it is not expanded.
    """

    name: ClassVar[str] = "zoom_search"
    max_depth: int = 5
    branching: int = 4
    bias: float = 0.2
    answer_threshold: float = 0.6
    lower_threshold: float = 0.0
    threshold_decrease: tuple[float, ...] = (0.1, 0.1, 0.2)
    pops_per_depth: int = 3
    pop_increment: int = 2
    node_budget: int | None = None
    existence_question: str = EXISTENCE_QUESTION
    latent_question: str = LATENT_QUESTION
    answering_question: str = ANSWERING_QUESTION

    def resolved(self, model) -> "ZoomSearch":
        _checked("max_depth", self.max_depth, 1, integer=True)
        if self.branching not in (2, 4):
            raise ValueError(f"branching must be 2 or 4 (sub-views per view), got {self.branching!r}")
        _checked("bias", self.bias, 0.0, 1.0)
        _checked("answer_threshold", self.answer_threshold, -1.0, 1.0)
        _checked("lower_threshold", self.lower_threshold, -1.0, 1.0)
        decrease = tuple(self.threshold_decrease)
        if not decrease or any(isinstance(d, bool) or not isinstance(d, (int, float)) or d <= 0 for d in decrease):
            raise ValueError(f"threshold_decrease must be one or more positive numbers, got {decrease!r}")
        _checked("pops_per_depth", self.pops_per_depth, 1, integer=True)
        _checked("pop_increment", self.pop_increment, 0, integer=True)
        if self.node_budget is not None:
            _checked("node_budget", self.node_budget, 1, integer=True)
        for name, field in (("existence_question", "{target}"), ("latent_question", "{target}"),
                            ("answering_question", "{question}")):
            if field not in getattr(self, name):
                raise ValueError(f"{name} must contain {field}, got {getattr(self, name)!r}")
        return dataclasses.replace(super().resolved(model), threshold_decrease=tuple(float(d) for d in decrease))

    def steps(self, passes, image, question, target):
        """Each pop is one step: the popped view's answering question and, asked beside it before its answer is
        known, its children's priorities (discarded, and not counted, where the search stops at this pop)."""
        root = Node((0, 0, *image.size), 0, 0, 0.0)
        depth = tree_depth(root.box, passes.base_size, self.branching, self.max_depth)
        priority_questions = [self.existence_question.format(target=target),
                              self.latent_question.format(target=target)]
        answering_question = [self.answering_question.format(question=question)]
        queue, popped, scored, cost = [root], [], 1, Cost()
        threshold, decreases = self.answer_threshold, list(self.threshold_decrease)
        pop_limit = self.pops_per_depth * depth
        chosen = None
        view = lambda box: _crop(image, view_box(box, image.size, passes.base_size))  # noqa: E731
        while queue:
            children = split_box(queue[0].box, self.branching) if queue[0].depth < depth and splits(
                queue[0].box, passes.base_size) else []
            if self.node_budget is not None and scored + len(children) > self.node_budget:
                children = []
            yes, lengths = yield Asked([view(queue[0].box)] + [view(box) for box in children],
                                       [answering_question] + [priority_questions] * len(children))
            node = dataclasses.replace(queue.pop(0), answering=float(2 * yes[0][0] - 1))
            cost += asked_cost(lengths[:1])
            popped.append(node)
            if node.answering >= threshold:
                chosen = node
                break
            if len(popped) >= pop_limit:
                threshold -= decreases.pop(0) if len(decreases) > 1 else decreases[0]
                pop_limit += self.pop_increment
                above = [n for n in popped if n.answering >= threshold]
                if above:
                    chosen = max(above, key=lambda n: (n.answering, -n.order))
                    break
                if threshold < self.lower_threshold:
                    break
            if children:
                found = 2 * np.stack(yes[1:]) - 1
                weight = self.bias + (1 - self.bias) * (node.depth + 1) ** 2 / depth**2
                queue += [Node(box, node.depth + 1, scored + i, float(weight * c[0] + (1 - weight) * c[1]))
                          for i, (box, c) in enumerate(zip(children, found))]
                scored, cost = scored + len(children), cost + asked_cost(lengths[1:])
                queue.sort(key=lambda n: -n.priority)
        if chosen is None or chosen.depth == 0:
            return Search((), None, cost)
        return Search((view_box(chosen.box, image.size, passes.base_size),), None, cost)
