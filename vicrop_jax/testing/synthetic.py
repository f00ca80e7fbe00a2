"""Synthetic small-detail VQA: cluttered scenes whose answer hangs on small shapes drawn inside coloured boxes.

Each scene holds coloured squares with a white shape in each, among clutter (lines, outlines and unboxed
shapes of the same kinds, in muted colours). Question types (`QUESTION_TYPES`):
- single: *What shape is in the red box?* over one red box (version 1, drawn by `make_record` unchanged);
- two_region: a red and a blue box far apart, *Are the shapes in the red box and the blue box the same?*
  (yes/no, balanced), so one crop cannot show both;
- distractor: the same two boxes, *What shape is in the blue box?*;
- counting: two to four red boxes, *How many red boxes hold a star?* (0 to 4).
A box side spans 3.5% to 30% of the image's short side (log-uniform), so at a model resolution of 112 px
the smallest shapes cover two or three pixels (unreadable) while the box's colour still shows where to look.
Scenes are square or, in version 2, landscape or portrait up to 2:1, where LLaVA's center crop cuts part of
the scene off. Everything is drawn from `numpy.random.default_rng` seeded by the seed and the index (and
the type and aspect in version 2): the same arguments always give the same record on any machine, so
training and evaluation sets are disjoint by seed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
BOX_COLOURS = {"red": (215, 25, 25), "blue": (30, 70, 220)}
BACKGROUNDS = {"white": (238, 238, 238), "yellow": (236, 226, 160), "green": (178, 214, 170), "gray": (170, 170, 170)}
BOXED_SHAPE_FILL = (250, 250, 250)
IMAGE_SIDES = (448, 768)
RELATIVE_BOX_SIDES = (0.035, 0.30)
CLUTTER = (15, 35)
QUESTION = "What shape is in the {colour} box?"
SAME_QUESTION = "Are the shapes in the red box and the blue box the same?"
COUNT_QUESTION = "How many red boxes hold a star?"
QUESTION_TYPES = ("single", "two_region", "distractor", "counting")
ASPECTS = ("square", "landscape", "portrait")
MAX_ASPECT = 2.0
COUNT_BOXES = (2, 4)
FAR_APART = 0.5  # two-region boxes: centres at least this fraction of the image's diagonal apart
_TYPE_CODES = {name: code for code, name in enumerate(QUESTION_TYPES)}


@dataclasses.dataclass(frozen=True)
class SyntheticRecord:
    image: Image.Image
    question: str
    answer: str
    bbox: tuple[int, int, int, int]  # the region to crop, (left, top, right, bottom), right/bottom exclusive
    relative_size: float  # the smallest ground-truth box's side / the image's short side
    background: str
    bboxes: tuple[tuple[int, int, int, int], ...] = ()  # every box the answer needs, in the question's order
    question_type: str = "single"
    aspect: str = "square"


def _clutter_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Muted colours only, so that no clutter looks like a coloured box."""
    grey = int(rng.integers(60, 200))
    return tuple(int(np.clip(grey + rng.integers(-25, 26), 0, 255)) for _ in range(3))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """One of SHAPES filling `box` (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = box
    side = x2 - x1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(side / 5)))
    elif shape == "square":
        inset = side * 0.08
        draw.rectangle((x1 + inset, y1 + inset, x2 - inset, y2 - inset), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
    elif shape == "cross":
        arm = side / 6
        draw.rectangle((cx - arm, y1, cx + arm, y2), fill=fill)
        draw.rectangle((x1, cy - arm, x2, cy + arm), fill=fill)
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, side / 2, side / 5)
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: tuple[int, int], count: int) -> None:
    short = min(size)
    for _ in range(count):
        kind = rng.integers(3)
        x, y = rng.integers(0, size)
        extent = int(np.exp(rng.uniform(np.log(8), np.log(short * 0.2))))
        if kind == 0:
            dx, dy = rng.integers(-short // 3, short // 3, 2)
            draw.line((x, y, x + dx, y + dy), fill=_clutter_colour(rng), width=int(rng.integers(1, 5)))
        elif kind == 1:
            draw.rectangle((x, y, x + extent, y + extent * rng.uniform(0.5, 2)), outline=_clutter_colour(rng),
                           width=int(rng.integers(1, 4)))
        else:
            draw_shape(draw, SHAPES[rng.integers(len(SHAPES))], (x, y, x + extent, y + extent), _clutter_colour(rng))


def _clear(box: tuple[int, ...], taken: list[tuple[int, ...]]) -> bool:
    return all(box[2] + 4 <= t[0] or t[2] + 4 <= box[0] or box[3] + 4 <= t[1] or t[3] + 4 <= box[1] for t in taken)


def _place(rng: np.random.Generator, size: tuple[int, int], box_side: int, taken: list[tuple[int, ...]],
           min_distance: float = 0.0) -> tuple[int, ...] | None:
    """A box position inside the image that keeps clear of the boxes already placed and whose centre lies at
    least `min_distance` from theirs, or None when 100 tries find none."""
    for _ in range(100):
        x, y = (int(v) for v in rng.integers(0, (size[0] - box_side + 1, size[1] - box_side + 1)))
        box = (x, y, x + box_side, y + box_side)
        far = all(np.hypot(x - t[0] + (box_side - t[2] + t[0]) / 2, y - t[1] + (box_side - t[3] + t[1]) / 2)
                  >= min_distance for t in taken)
        if _clear(box, taken) and far:
            return box
    return None


def _place_all(rng: np.random.Generator, size: tuple[int, int], sides: list[int],
               min_distance: float = 0.0) -> list[tuple[int, ...]]:
    """Boxes of `sides` placed clear of each other (and `min_distance` apart), drawn again from the first until
    they fit; after 20 rounds, the sides are halved."""
    for round_ in range(40):
        scale = 1 if round_ < 20 else 2
        boxes: list[tuple[int, ...]] = []
        for side in sides:
            box = _place(rng, size, max(12, side // scale), boxes, min_distance)
            if box is None:
                break
            boxes.append(box)
        else:
            return boxes
    raise ValueError(f"cannot place {len(sides)} boxes of sides {sides} in a {size[0]}x{size[1]} image")


def _draw_boxed_shape(draw: ImageDraw.ImageDraw, box, colour, shape: str) -> None:
    """A filled box: even when the shape is a few pixels at the model's resolution, its colour still shows."""
    x1, y1, x2, y2 = box
    margin = (x2 - x1) * 0.15
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
    draw_shape(draw, shape, (x1 + margin, y1 + margin, x2 - margin, y2 - margin), BOXED_SHAPE_FILL)


def _scene(rng: np.random.Generator, size: tuple[int, int], clutter: tuple[int, int]):
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    image = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    _draw_clutter(draw, rng, size, int(rng.integers(clutter[0], clutter[1] + 1)))
    return image, draw, background


def _box_side(rng: np.random.Generator, size: tuple[int, int], relative_box_sides: tuple[float, float]) -> int:
    low, high = np.log(relative_box_sides[0]), np.log(relative_box_sides[1])
    return max(12, round(np.exp(rng.uniform(low, high)) * min(size)))


def make_record(seed: int, index: int, image_sides: tuple[int, int] = IMAGE_SIDES,
                relative_box_sides: tuple[float, float] = RELATIVE_BOX_SIDES,
                clutter: tuple[int, int] = CLUTTER) -> SyntheticRecord:
    """Square single-detail record `index` of the set drawn with `seed` (version 1: ranges are inclusive;
    box sides are log-uniform)."""
    rng = np.random.default_rng([seed, index])
    side = int(rng.integers(image_sides[0], image_sides[1] + 1))
    image, draw, background = _scene(rng, (side, side), clutter)
    asked = "red"
    bbox = _place(rng, (side, side), _box_side(rng, (side, side), relative_box_sides), [])
    shape = SHAPES[rng.integers(len(SHAPES))]
    _draw_boxed_shape(draw, bbox, BOX_COLOURS[asked], shape)
    return SyntheticRecord(image, QUESTION.format(colour=asked), shape, tuple(bbox), (bbox[2] - bbox[0]) / side,
                           background, (tuple(bbox),))


def _size(rng: np.random.Generator, image_sides: tuple[int, int], aspect: str) -> tuple[int, int]:
    """The scene's (width, height): its long side drawn from `image_sides`, the other up to MAX_ASPECT shorter."""
    long = int(rng.integers(image_sides[0], image_sides[1] + 1))
    if aspect == "square":
        return long, long
    short = round(long / np.exp(rng.uniform(np.log(1.25), np.log(MAX_ASPECT))))
    return (long, short) if aspect == "landscape" else (short, long)


def _union(boxes) -> tuple[int, int, int, int]:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def make_scene(seed: int, index: int, question_type: str, aspect: str = "square",
               image_sides: tuple[int, int] = IMAGE_SIDES,
               relative_box_sides: tuple[float, float] = RELATIVE_BOX_SIDES,
               clutter: tuple[int, int] = CLUTTER) -> SyntheticRecord:
    """Record `index` of `question_type` and `aspect` in the version-2 set drawn with `seed`. A square single
    record is version 1's `make_record(seed, index)`; `bbox` is the one region holding every box the answer
    needs (the ground-truth crop of one region), `bboxes` those boxes."""
    if question_type not in _TYPE_CODES:
        raise ValueError(f"unknown question type {question_type!r}; choose one of {', '.join(QUESTION_TYPES)}")
    if aspect not in ASPECTS:
        raise ValueError(f"unknown aspect {aspect!r}; choose one of {', '.join(ASPECTS)}")
    if question_type == "single" and aspect == "square":
        return make_record(seed, index, image_sides, relative_box_sides, clutter)
    rng = np.random.default_rng([seed, index, _TYPE_CODES[question_type], ASPECTS.index(aspect)])
    size = _size(rng, image_sides, aspect)
    image, draw, background = _scene(rng, size, clutter)
    if question_type == "single":
        shapes = [SHAPES[rng.integers(len(SHAPES))]]
        colours = ["red"]
        boxes = _place_all(rng, size, [_box_side(rng, size, relative_box_sides)])
        question, answer, needed = QUESTION.format(colour="red"), shapes[0], [0]
    elif question_type in ("two_region", "distractor"):
        colours = ["red", "blue"]
        first = SHAPES[rng.integers(len(SHAPES))]
        same = bool(rng.integers(2))
        second = first if same else SHAPES[(SHAPES.index(first) + rng.integers(1, len(SHAPES))) % len(SHAPES)]
        shapes = [first, second] if rng.integers(2) else [second, first]
        boxes = _place_all(rng, size, [_box_side(rng, size, relative_box_sides) for _ in colours],
                           FAR_APART * float(np.hypot(*size)))
        if question_type == "two_region":
            question, answer, needed = SAME_QUESTION, "yes" if shapes[0] == shapes[1] else "no", [0, 1]
        else:
            question, answer, needed = QUESTION.format(colour="blue"), shapes[1], [1]
    else:
        count = int(rng.integers(COUNT_BOXES[0], COUNT_BOXES[1] + 1))
        stars = int(rng.integers(0, count + 1))
        others = [s for s in SHAPES if s != "star"]
        shapes = ["star"] * stars + [others[rng.integers(len(others))] for _ in range(count - stars)]
        shapes = [shapes[i] for i in rng.permutation(count)]
        colours = ["red"] * count
        boxes = _place_all(rng, size, [_box_side(rng, size, relative_box_sides) for _ in range(count)])
        question, answer, needed = COUNT_QUESTION, str(stars), list(range(count))
    for box, colour, shape in zip(boxes, colours, shapes):
        _draw_boxed_shape(draw, box, BOX_COLOURS[colour], shape)
    truth = tuple(tuple(boxes[i]) for i in needed)
    relative = min(b[2] - b[0] for b in truth) / min(size)
    return SyntheticRecord(image, question, answer, _union(truth), relative, background, truth, question_type,
                           aspect)


def v2_scenes(count: int) -> list[tuple[str, str, int]]:
    """(type, aspect, index) of a version-2 set: `count` square single-detail records (version 1's, so their
    figures stay comparable), then `count // 4` records of each type: non-square single-detail ones
    (landscape and portrait in turn) and, for the other types, half square, a quarter landscape and a quarter
    portrait."""
    scenes = [("single", "square", index) for index in range(count)]
    for question_type in QUESTION_TYPES:
        for index in range(count // 4):
            aspect = (ASPECTS[1 + index % 2] if question_type == "single"
                      else ("square", "landscape", "square", "portrait")[index % 4])
            scenes.append((question_type, aspect, index))
    return scenes


def _entry(record: SyntheticRecord, record_id: str, name: str) -> dict:
    return {"id": record_id, "question": record.question, "labels": [record.answer], "image_path": name,
            "bbox": list(record.bbox), "bboxes": [list(b) for b in record.bboxes],
            "question_type": record.question_type, "aspect": record.aspect}


def write_dataset(folder: str | Path, seed: int, count: int, version: int = 1) -> Path:
    """Images (PNG) and a data.json in the evaluation's record format: version 1 is records 0..count-1 of
    `make_record(seed, ...)`; version 2 is the scenes of `v2_scenes(count)`."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    scenes = [("single", "square", i) for i in range(count)] if version == 1 else v2_scenes(count)
    entries = []
    for question_type, aspect, index in scenes:
        record = make_scene(seed, index, question_type, aspect)
        tag = "" if (question_type, aspect) == ("single", "square") else f"{question_type}-{aspect}-"
        name = f"{seed}_{tag}{index:05d}.png"
        record.image.save(folder / "images" / name)
        entries.append(_entry(record, f"synthetic-{seed}-{tag}{index}", name))
    path = folder / "data.json"
    path.write_text(json.dumps(entries, indent=1))
    return path
