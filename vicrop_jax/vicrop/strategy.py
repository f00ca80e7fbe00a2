"""What every way of answering a question is: a `Strategy` value that runs a batch of `Record`s against an
`Engine` of model passes, the `Answer` it gives, and the `Cost` of the model work it did."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
import PIL.Image

from vicrop_jax.vicrop.boxes import Box

if TYPE_CHECKING:
    from vicrop_jax.vicrop.engine import Engine


@dataclasses.dataclass(frozen=True)
class Cost:
    """The model work of a strategy's answer, as its published procedure runs it: prompt passes (each a prefill
    of one prompt over its images; a backward pass counted apart), the tokens those prompts hold (image tokens
    included, each prompt whole even where a prefix is shared or a pass reused), and the answer tokens decoded.
    The answer from the original alone, which every `Answer` carries for comparison, is not counted (but for
    method none, where it is the answer)."""

    passes: int = 0
    prefill_tokens: int = 0
    decoded_tokens: int = 0
    backward_passes: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclasses.dataclass(frozen=True)
class Answer:
    answer: str  # with the crops as extra images (equal to original_answer when nothing was cropped)
    original_answer: str  # the original image only
    boxes: tuple[Box, ...]  # the cropped boxes (left, top, right, bottom) in original pixels, in map order
    importance: np.ndarray | None  # the map [grid_h, grid_w] for map methods (method "auto": the chosen one)
    timings: dict[str, float]
    confidence: float | None = None  # with a gate: the probability of the plain answer's first token
    chosen: str | None = None  # method "auto": the map whose crop answered
    cost: Cost | None = None  # the model passes it took, as the published procedure runs them

    @property
    def bbox(self) -> Box | None:
        """The first crop box, None when nothing was cropped."""
        return self.boxes[0] if self.boxes else None

    @property
    def cropped(self) -> bool:
        return bool(self.boxes)


def int_box(box) -> Box:
    """A box (left, top, right, bottom) of any numbers or array as Python ints."""
    return tuple(int(v) for v in np.asarray(box))


class Record(NamedTuple):
    """One question of a batch, as a strategy receives it."""

    image: PIL.Image.Image
    question: str
    map_question: str  # what the map or the search is asked: V*'s short question, else the question
    bbox: Any = None  # the ground-truth box, or a list of boxes (method gt)
    seed: int = 0  # random crops
    target: str | None = None  # the object a zoom strategy looks for (None: taken from the question)


class Search(NamedTuple):
    """What a strategy found on the host: the boxes to crop (none: answer from the original alone), the map it
    read (None for baselines and ZoomEye) and the passes it took."""

    boxes: tuple[Box, ...]
    importance: np.ndarray | None
    cost: Cost


@dataclasses.dataclass(frozen=True, kw_only=True)
class Strategy:
    """How a question is answered: its `name` is what the API, the CLI and result files call it; `run` answers a
    batch of records with the engine's model passes."""

    name: ClassVar[str]
    needs_box: ClassVar[bool] = False  # every record must carry its ground-truth box

    @property
    def most_crops(self) -> int:
        """The most crops an answer prompt may hold."""
        return 1

    def resolved(self, model) -> "Strategy":
        """The strategy with its model-dependent defaults filled in and its options checked against the model."""
        return self

    def run(self, engine: "Engine", records: list[Record]) -> list[Answer]:
        """An answer per record, in order; a ValueError names what was wrong with the batch."""
        answers = []
        for record in records:
            start = time.perf_counter()
            answers.append(engine.answer_from(record, self.host_boxes(engine, record), start))
        return answers

    def host_boxes(self, engine: "Engine", record: Record) -> Search:
        """The boxes this strategy crops for a record, found on the host (with its map, if it reads one)."""
        raise NotImplementedError(f"method {self.name!r} defines neither run nor host_boxes")

    def importance(self, engine: "Engine", record: Record) -> np.ndarray:
        """The record's importance map [grid_h, grid_w] (map methods only)."""
        raise ValueError(f"method {self.name!r} makes no map: use a map method for importance maps")


def default_map_layer(model) -> int:
    """The checkpoint's own map layer where its config names one (`vicrop_attention_layer`, chosen by where its
    attention falls, as the paper chose its layers), else the family's for the model's depth
    (`Family.default_layer`)."""
    if model.config.map_layer is not None:
        return model.config.map_layer
    return model.family.default_layer(model.config.text.num_layers)
