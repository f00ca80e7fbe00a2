"""Synthetic small-detail VQA: cluttered scenes whose answer is the shape drawn inside a red box.

Each scene holds one red square with a white shape in it, among clutter (lines, outlines and unboxed
shapes of the same kinds, in muted colours). The question asks for the boxed shape. The box side spans
3.5% to 30% of the image side (log-uniform), so at a model resolution of 112 px the smallest shapes
cover two or three pixels (unreadable) while the red of the box still shows where to look.
Everything is drawn from `numpy.random.default_rng([seed, index])`: the same (seed, index) always
gives the same record, on any machine, so training and evaluation sets are disjoint by seed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
BOX_COLOURS = {"red": (215, 25, 25)}
BACKGROUNDS = {"white": (238, 238, 238), "yellow": (236, 226, 160), "green": (178, 214, 170), "gray": (170, 170, 170)}
BOXED_SHAPE_FILL = (250, 250, 250)
IMAGE_SIDES = (448, 768)
RELATIVE_BOX_SIDES = (0.035, 0.30)
CLUTTER = (15, 35)
QUESTION = "What shape is in the {colour} box?"


@dataclasses.dataclass(frozen=True)
class SyntheticRecord:
    image: Image.Image
    question: str
    answer: str
    bbox: tuple[int, int, int, int]  # the asked box, (left, top, right, bottom), right/bottom exclusive
    relative_size: float  # box side / image side
    background: str


def _clutter_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Muted colours only, so that no clutter looks like the red box."""
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


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int, count: int) -> None:
    for _ in range(count):
        kind = rng.integers(3)
        x, y = rng.integers(0, side, 2)
        size = int(np.exp(rng.uniform(np.log(8), np.log(side * 0.2))))
        if kind == 0:
            dx, dy = rng.integers(-side // 3, side // 3, 2)
            draw.line((x, y, x + dx, y + dy), fill=_clutter_colour(rng), width=int(rng.integers(1, 5)))
        elif kind == 1:
            draw.rectangle((x, y, x + size, y + size * rng.uniform(0.5, 2)), outline=_clutter_colour(rng),
                           width=int(rng.integers(1, 4)))
        else:
            draw_shape(draw, SHAPES[rng.integers(len(SHAPES))], (x, y, x + size, y + size), _clutter_colour(rng))


def _place(rng: np.random.Generator, side: int, box_side: int, taken: list[tuple[int, ...]]) -> tuple[int, ...]:
    """A box position inside the image that keeps clear of the boxes already placed."""
    for _ in range(100):
        x, y = (int(v) for v in rng.integers(0, side - box_side + 1, 2))
        box = (x, y, x + box_side, y + box_side)
        if all(box[2] + 4 <= t[0] or t[2] + 4 <= box[0] or box[3] + 4 <= t[1] or t[3] + 4 <= box[1] for t in taken):
            return box
    return box


def _draw_boxed_shape(draw: ImageDraw.ImageDraw, box, colour, shape: str) -> None:
    """A filled box: even when the shape is a few pixels at the model's resolution, its colour still shows."""
    x1, y1, x2, y2 = box
    margin = (x2 - x1) * 0.15
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
    draw_shape(draw, shape, (x1 + margin, y1 + margin, x2 - margin, y2 - margin), BOXED_SHAPE_FILL)


def make_record(seed: int, index: int, image_sides: tuple[int, int] = IMAGE_SIDES,
                relative_box_sides: tuple[float, float] = RELATIVE_BOX_SIDES,
                clutter: tuple[int, int] = CLUTTER) -> SyntheticRecord:
    """Record `index` of the set drawn with `seed` (ranges are inclusive; box sides are log-uniform)."""
    rng = np.random.default_rng([seed, index])
    side = int(rng.integers(image_sides[0], image_sides[1] + 1))
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    image = Image.new("RGB", (side, side), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    _draw_clutter(draw, rng, side, int(rng.integers(clutter[0], clutter[1] + 1)))
    low, high = np.log(relative_box_sides[0]), np.log(relative_box_sides[1])
    asked = list(BOX_COLOURS)[rng.integers(len(BOX_COLOURS))]
    boxes: dict[str, tuple[int, ...]] = {}
    shapes: dict[str, str] = {}
    for colour in BOX_COLOURS:
        box_side = max(12, round(np.exp(rng.uniform(low, high)) * side))
        boxes[colour] = _place(rng, side, box_side, list(boxes.values()))
        shapes[colour] = SHAPES[rng.integers(len(SHAPES))]
        _draw_boxed_shape(draw, boxes[colour], BOX_COLOURS[colour], shapes[colour])
    bbox = boxes[asked]
    return SyntheticRecord(image, QUESTION.format(colour=asked), shapes[asked], tuple(bbox),
                           (bbox[2] - bbox[0]) / side, background)


def write_dataset(folder: str | Path, seed: int, count: int) -> Path:
    """Images (PNG) and a docs/method.md (Data) JSON list (`data.json`) of records 0..count-1 of `seed`."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(count):
        record = make_record(seed, index)
        name = f"{seed}_{index:05d}.png"
        record.image.save(folder / "images" / name)
        entries.append({"id": f"synthetic-{seed}-{index}", "question": record.question, "labels": [record.answer],
                        "image_path": name, "bbox": list(record.bbox)})
    path = folder / "data.json"
    path.write_text(json.dumps(entries, indent=1))
    return path
