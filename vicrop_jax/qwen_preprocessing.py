"""Image preprocessing that reproduces transformers' Qwen2-VL image processor, the one Qwen2.5-VL uses.

Qwen2-VL does not squash every image to one square size. It keeps roughly the image's own size and aspect
ratio, rounded on both axes to a multiple of `patch_size * merge_size` (28 px) with a pixel count inside
[min_pixels, max_pixels], and cuts the result into 14x14 patches that the vision tower reads as a sequence;
each 2x2 group of patches becomes one token of the language model. So the number of image tokens, and the
position of every patch, follow from the image size; ViCrop's crops are sized with `resized_size`.

This module repeats the PIL backend of `Qwen2VLImageProcessor` (what transformers uses when torchvision is
missing) step for step: the same size arithmetic in Python floats, the same uint8 PIL resize, the rescale in
float64 rounded to float32, the normalisation in float32, and the same patch order, so `QwenImage.patches`
equals transformers' `pixel_values` bit for bit. Images go through `vicrop_jax.preprocessing.load_image`
first, so its two deliberate differences hold here too: transparency is dropped (convert("RGB"), as the
training pipelines did) rather than composited over white, and 16-bit images are scaled rather than clipped.

Only numpy and PIL are needed at run time.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import PIL.Image

from vicrop_jax.preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageInput, load_image, rescale_and_normalize

# transformers' class defaults. Qwen2.5-VL checkpoints override max_pixels (12845056 = 16384 * 28 * 28).
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
# smart_resize refuses images whose long side is more than this many times the short side.
MAX_ASPECT_RATIO = 200

# The names transformers resolves to this processor: the current one, the 4.x "Fast" (torchvision) class, and
# the PIL backend's own class name (transformers strips the "Pil" when saving, but a hand-written file may keep it).
PROCESSOR_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")
_SWITCHES = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
_PIL_FILTERS = {member.value: member.name for member in PIL.Image.Resampling}


@dataclasses.dataclass(frozen=True, kw_only=True)
class QwenImageProcessorConfig:
    """The settings of a Hugging Face Qwen2-VL image processor (its preprocessor_config.json).

    `min_pixels`/`max_pixels` bound the pixel count of the resized image (transformers 5 stores them as
    size {"shortest_edge", "longest_edge"}, despite the names). `resample` is any PIL filter, bicubic (3) by
    default. `do_convert_rgb` is kept for round trips only: images are always converted to RGB, because the
    vision tower takes three channels.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = PIL.Image.Resampling.BICUBIC.value

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            object.__setattr__(self, name, _positive_int(getattr(self, name), name))
        for name in ("image_mean", "image_std"):
            object.__setattr__(self, name, _per_channel(getattr(self, name), name))
        for name in _SWITCHES:
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if isinstance(self.rescale_factor, bool) or not isinstance(self.rescale_factor, numbers.Real):
            raise ValueError(f"rescale_factor must be a number, got {self.rescale_factor!r}.")
        object.__setattr__(self, "rescale_factor", float(self.rescale_factor))
        if isinstance(self.resample, bool) or not isinstance(self.resample, numbers.Integral) \
                or int(self.resample) not in _PIL_FILTERS:
            filters = ", ".join(f"{value} ({name.lower()})" for value, name in sorted(_PIL_FILTERS.items()))
            raise ValueError(
                f"resample {self.resample!r} is not a PIL resampling filter; this processor resizes with PIL, "
                f"so it takes one of {filters}. Qwen2-VL checkpoints use 3 (bicubic)."
            )
        object.__setattr__(self, "resample", int(self.resample))

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this: one merge unit of patches, in pixels."""
        return self.patch_size * self.merge_size

    def with_max_pixels(self, max_pixels: int) -> QwenImageProcessorConfig:
        """A copy with another pixel budget (the attention-map pass runs at a smaller one than the answer pass)."""
        return dataclasses.replace(self, max_pixels=max_pixels)

    @classmethod
    def from_preprocessor_config(cls, config: Mapping[str, Any]) -> QwenImageProcessorConfig:
        """Read a transformers preprocessor_config.json dict; missing keys take the processor's defaults.

        Reads every layout transformers accepts: size {"shortest_edge", "longest_edge"} (what transformers 5
        writes), top-level `min_pixels`/`max_pixels` (Qwen2.5-VL's published files), and both together, where
        the top-level keys win. Older files (transformers 4.4x) also hold size {"min_pixels", "max_pixels"},
        which transformers replaces by the top-level keys, as done here. Keys that transformers' Qwen2-VL
        processor stores but never applies (do_center_crop, crop_size, do_pad, processor_class, ...) are ignored.
        A null switch (do_resize, do_rescale, ...) means off, as it does in transformers 5, where an explicit
        null replaces the class default; other nulls, which make transformers fail, are refused.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"An image processor config is a JSON object (dict), got {type(config).__name__}.")
        processor_type = config.get("image_processor_type")
        if processor_type not in PROCESSOR_TYPES:
            raise ValueError(
                f"Unsupported image processor type {processor_type!r}: this reads Qwen2-VL image processors "
                f"({', '.join(PROCESSOR_TYPES)}), as Qwen2-VL and Qwen2.5-VL checkpoints store them. Use the "
                "preprocessor_config.json of a Qwen2-VL/Qwen2.5-VL checkpoint, or vicrop_jax.preprocessing for "
                "CLIP and BLIP processors."
            )
        settings = {}
        for name in (field.name for field in dataclasses.fields(cls)):
            if name in ("min_pixels", "max_pixels") or name not in config:
                continue
            if config[name] is not None:
                settings[name] = config[name]
            elif name in _SWITCHES:
                settings[name] = False  # transformers keeps the null, and its `if do_x:` reads it as off
            else:
                raise ValueError(
                    f"{name} is null in the image processor config; transformers then fails when it preprocesses "
                    "(it does not fall back to the default). Remove the key for the default, or set a value."
                )
        bounds = _pixel_bounds(config, required=settings.get("do_resize", True) is not False)
        if bounds is not None:
            settings["min_pixels"], settings["max_pixels"] = bounds
        return cls(**settings)


def _pixel_bounds(config: Mapping[str, Any], required: bool) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) as transformers' `Qwen2VLImageProcessor.__init__` merges them.

    Without a `size`, the class default size is the base; top-level min_pixels/max_pixels then replace its
    shortest_edge/longest_edge and drop the old-style size keys of the same names. None when the result has
    no usable bounds and none are needed (no resize), as transformers only checks them when resizing.
    """
    size = config.get("size")
    if size is None:
        size = {"shortest_edge": DEFAULT_MIN_PIXELS, "longest_edge": DEFAULT_MAX_PIXELS}
    elif not isinstance(size, Mapping):
        if not required:
            return None
        raise ValueError(
            f"size must be a dict {{'shortest_edge': min_pixels, 'longest_edge': max_pixels}}, got {size!r}: "
            "a Qwen2-VL processor bounds the pixel count, not a side length. Set size (or min_pixels and "
            "max_pixels) in the preprocessor config."
        )
    size = dict(size)
    for top_level, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if config.get(top_level) is not None:
            size[size_key] = config[top_level]
            size.pop(top_level, None)
    if set(size) == {"shortest_edge", "longest_edge"} and None not in size.values():
        return size["shortest_edge"], size["longest_edge"]
    if not required:
        return None
    raise ValueError(
        f"Cannot read the pixel bounds from size {dict(config.get('size') or {})} with min_pixels="
        f"{config.get('min_pixels')!r}, max_pixels={config.get('max_pixels')!r}: transformers needs size "
        "{'shortest_edge', 'longest_edge'} (min and max pixel count), or top-level min_pixels and max_pixels "
        "(which override size). Add the missing ones to the preprocessor config."
    )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _per_channel(values: Any, name: str) -> tuple[float, float, float]:
    """Three floats; a single number applies to every channel, as transformers' normalize allows."""
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        return (float(values),) * 3
    try:
        values = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three numbers (one per RGB channel), got {values!r}.") from None
    if len(values) != 3:
        raise ValueError(f"{name} needs one value per RGB channel (3), got {values}.")
    return values


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) of the resized image: multiples of `factor`, pixel count in [min_pixels, max_pixels].

    Each side is first rounded to the nearest multiple of `factor` (Python's round: halves to even). Only
    when that area falls outside the bounds are both sides scaled by one common ratio, then rounded down
    (too large) or up (too small) to multiples of `factor`, so the aspect ratio barely changes. The float
    expressions are transformers' own, in the same order: their rounding decides the size at the margins.
    Even a one-pixel side is accepted (it is scaled up), but not an aspect ratio above 200.
    """
    height, width = _side(height, "height"), _side(width, "width")
    aspect_ratio = max(height, width) / min(height, width)
    if aspect_ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"A {width}x{height} image has an aspect ratio of {aspect_ratio:.1f}; the Qwen2-VL image processor "
            f"takes at most {MAX_ASPECT_RATIO} (long side / short side). Crop or pad the image first."
        )
    new_height = round(height / factor) * factor
    new_width = round(width / factor) * factor
    if new_height * new_width > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_height = max(factor, math.floor(height / shrink / factor) * factor)
        new_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_height * new_width < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * grow / factor) * factor
        new_width = math.ceil(width * grow / factor) * factor
    return new_height, new_width


def _side(value: Any, name: str) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"The image {name} must be an integer number of pixels, got {value!r}.") from None
    if value < 1:
        raise ValueError(f"The image {name} must be at least 1 pixel, got {value}.")
    return value


def resized_size(
    width: int, height: int, config: QwenImageProcessorConfig, max_pixels: int | None = None
) -> tuple[int, int]:
    """(width, height), PIL's order, that `preprocess_qwen` resizes a width x height image or crop to.

    `max_pixels` overrides the config's budget, as in `preprocess_qwen`. Without do_resize the size is kept.
    """
    if not config.do_resize:
        return _side(width, "width"), _side(height, "height")
    budget = config.max_pixels if max_pixels is None else _positive_int(max_pixels, "max_pixels")
    new_height, new_width = smart_resize(height, width, config.factor, config.min_pixels, budget)
    return new_width, new_height


def image_grid(
    width: int, height: int, config: QwenImageProcessorConfig, max_pixels: int | None = None
) -> tuple[int, int, int]:
    """The (t, h, w) patch grid `preprocess_qwen` gives a width x height image: its `image_grid_thw` row.

    The language model sees h * w / merge_size**2 image tokens.
    """
    new_width, new_height = resized_size(width, height, config, max_pixels)
    return 1, new_height // config.patch_size, new_width // config.patch_size


class QwenImage(NamedTuple):
    """One preprocessed image, as transformers' Qwen2-VL processor returns it.

    `patches`: float32 [t*h*w, 3 * temporal_patch_size * patch_size**2], transformers' `pixel_values` rows:
    in raster order of merge units, each merge_size**2 consecutive rows one unit's patches in raster order;
    a row is channel-major, then the frame (a still image repeated temporal_patch_size times), then pixels.
    `grid`: (t, h, w) in patches, transformers' `image_grid_thw` row.
    """

    patches: np.ndarray
    grid: tuple[int, int, int]


def preprocess_qwen(image: ImageInput, config: QwenImageProcessorConfig, max_pixels: int | None = None) -> QwenImage:
    """One image -> its Qwen2-VL patches and grid, bit-identical to transformers' PIL backend.

    `image` is anything `load_image` accepts. `max_pixels` overrides the config's pixel budget for this call.
    """
    rgb = load_image(image)
    if config.do_resize:
        size = resized_size(rgb.width, rgb.height, config, max_pixels)
        if size != rgb.size:  # PIL returns a plain copy for the same size, so skipping changes nothing
            rgb = rgb.resize(size, resample=config.resample)
    elif rgb.width % config.factor or rgb.height % config.factor:
        raise ValueError(
            f"With do_resize false, both sides must be multiples of patch_size * merge_size = {config.factor}, "
            f"got a {rgb.width}x{rgb.height} image. Resize or crop it first, or set do_resize."
        )
    pixels = rescale_and_normalize(np.asarray(rgb), config)
    return _patchify(pixels, config)


def _patchify(pixels: np.ndarray, config: QwenImageProcessorConfig) -> QwenImage:
    """float32 (H, W, C) -> transformers' flat patch rows, merge units kept together.

    The vision tower's patch merger concatenates merge_size**2 consecutive rows, so the rows of one merge
    unit (2x2 neighbouring patches) must be adjacent; within a row, the layout is (C, T, P, P) for the
    tower's 3D patch convolution.
    """
    height, width, channels = pixels.shape
    patch, merge, frames = config.patch_size, config.merge_size, config.temporal_patch_size
    grid_h, grid_w = height // patch, width // patch
    tiles = pixels.reshape(grid_h // merge, merge, patch, grid_w // merge, merge, patch, channels)
    # (unit row, unit column, patch row in unit, patch column in unit, channel, pixel row, pixel column)
    tiles = tiles.transpose(0, 3, 1, 4, 6, 2, 5)
    # A still image is a clip of identical frames: repeat it along a time axis just after the channel.
    clip = np.broadcast_to(tiles[:, :, :, :, :, None], (*tiles.shape[:5], frames, patch, patch))
    patches = clip.reshape(grid_h * grid_w, channels * frames * patch * patch)  # copies: C-contiguous float32
    return QwenImage(patches=patches, grid=(1, grid_h, grid_w))
