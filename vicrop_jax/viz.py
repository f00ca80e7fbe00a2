"""Importance maps for people: the image with the map overlaid and the chosen boxes drawn."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import PIL.ImageDraw

from vicrop_jax.preprocessing import load_image


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0,1] -> RGB uint8 on a blue-cyan-yellow-red ramp (readable on photos)."""
    stops = np.array([[0, 0, 130], [0, 200, 255], [255, 230, 0], [220, 0, 0]], np.float32)
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.minimum(position.astype(int), len(stops) - 2)
    frac = (position - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def overlay(image, importance: np.ndarray, bbox=None, path: str | os.PathLike | None = None,
            alpha: float = 0.5, frame=None) -> PIL.Image.Image:
    """The image blended with the (min-max normalised, bilinearly upsampled) map, each box in red.

    The map is stretched over `frame` (left, top, right, bottom), the part of the image its grid covers, as in the
    box selection; None is the whole image. Outside the frame the image is left as it is. `bbox` is one box or a
    sequence of them. Saved as PNG when `path` is given.
    """
    image = load_image(image)
    left, top, right, bottom = (0, 0, *image.size) if frame is None else (int(v) for v in frame)
    importance = np.nan_to_num(np.asarray(importance, np.float32))
    span = importance.max() - importance.min()
    normalised = (importance - importance.min()) / span if span > 0 else np.zeros_like(importance)
    heat = PIL.Image.fromarray((normalised * 255).astype(np.uint8))
    heat = heat.resize((right - left, bottom - top), PIL.Image.BILINEAR)
    colored = PIL.Image.fromarray(colorize(np.asarray(heat, np.float32) / 255))
    result = image.copy()
    result.paste(PIL.Image.blend(image.crop((left, top, right, bottom)), colored, alpha), (left, top))
    draw, width = PIL.ImageDraw.Draw(result), max(2, round(min(image.size) / 150))
    for box in [] if bbox is None else np.asarray(bbox).reshape(-1, 4):
        draw.rectangle(tuple(int(v) for v in box), outline=(255, 0, 0), width=width)
    if path is not None:
        result.save(path, format="PNG")
    return result
