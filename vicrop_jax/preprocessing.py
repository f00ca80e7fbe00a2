"""Image loading and preprocessing that reproduces the Hugging Face CLIP and BLIP image processors.

LLaVA-1.5 uses `CLIPImageProcessor` and InstructBLIP uses `BlipImageProcessor`. The vision towers were
trained on exactly those pixels, so this module repeats transformers' PIL backend step for step (the
backend transformers uses when torchvision is missing): the same uint8 PIL resize, the same integer
rounding of the resized size, the same centre-crop offsets and zero padding, and the same float64-then-
float32 arithmetic, so the outputs are bit-identical to transformers'. Outputs are channels-last
(H, W, 3) because the Flax models are NHWC. Two deliberate differences, both in `load_image`: transparency
is dropped rather than composited over white, and 16-bit images are scaled rather than clipped.

Only numpy and PIL are needed at run time.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import PIL.ImageOps

ImageInput = str | os.PathLike | PIL.Image.Image | np.ndarray

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's convert("RGB") clips these modes at 255 instead of scaling them, which turns most 16-bit
# photographs white, so they are scaled to 8 bits first.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_WIDE_MODES = _SIXTEEN_BIT_MODES | {"I", "F"}
_EXIF_ORIENTATION = 0x0112

_ACCEPTED_INPUTS = (
    "a path to an image file, a PIL image, or a numpy array of shape (H, W), (H, W, 1), (H, W, 3) or "
    "(H, W, 4) with dtype uint8, uint16, or float in [0, 1]"
)


def load_image(image: ImageInput) -> PIL.Image.Image:
    """Return `image` as a fully decoded, upright RGB PIL image.

    Mirrors `transformers.image_utils.load_image`: EXIF orientation is applied (files and PIL images) and
    every mode goes through `convert("RGB")`, so transparency is dropped. That is what the LLaVA and LAVIS
    data pipelines did (`Image.open(f).convert("RGB")`); transformers' processors themselves now composite
    transparency over white instead. 16-bit and float modes are first scaled to 8 bits by their full
    range (see `_wide_to_uint8`), because convert("RGB") would clip them.
    Decoding happens here so that a truncated or corrupt file fails now, with its path in the message.
    """
    if isinstance(image, (str, os.PathLike)):
        return _pil_to_rgb(_open_upright(image))
    if isinstance(image, PIL.Image.Image):
        _decode(image, "the PIL image")
        if image.mode == "RGB" and image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return image  # already upright RGB: no copy (the pipelines load an image at each step that reads it)
        return _pil_to_rgb(PIL.ImageOps.exif_transpose(image))
    if isinstance(image, np.ndarray):
        return _array_to_pil(image).convert("RGB")
    raise ValueError(f"Cannot load an image from {type(image).__name__}; expected {_ACCEPTED_INPUTS}.")


def _open_upright(path: str | os.PathLike) -> PIL.Image.Image:
    """Open and decode an image file, EXIF orientation applied; missing files stay FileNotFoundError."""
    try:
        with PIL.Image.open(path) as opened:
            _decode(opened, f"Image file {os.fspath(path)!r}")
            return PIL.ImageOps.exif_transpose(opened)
    except FileNotFoundError:
        raise
    except OSError as error:  # includes PIL.UnidentifiedImageError
        raise ValueError(f"{os.fspath(path)!r} is not a readable image file: {error}") from error


def _decode(image: PIL.Image.Image, description: str) -> None:
    """Force PIL's lazy decoder to run, turning truncated-data errors into ValueError."""
    try:
        image.load()
    except OSError as error:
        raise ValueError(f"{description} could not be decoded (truncated or corrupt data?): {error}") from error


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL mode to RGB, scaling 16-bit and float modes instead of letting PIL clip them."""
    if image.mode in _WIDE_MODES:
        image = PIL.Image.fromarray(_wide_to_uint8(np.asarray(image), image.mode), mode="L")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"Cannot convert a PIL image of mode {image.mode!r} to RGB: {error}") from error


def _wide_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16-bit, 32-bit integer or float PIL image to uint8 by its nominal full range.

    I;16 uses 0..65535 (so 65535 -> 255 and 32896 -> 128, i.e. value/257 rounded). Mode I holds 16-bit
    PNG/TIFF data in practice, so it uses the same range unless its values exceed it, then its maximum.
    Mode F is read as [0, 1] when its maximum is at most 1, otherwise as [0, 255].
    """
    if mode == "F":
        if not np.isfinite(values).all():
            raise ValueError("The float (mode 'F') image contains NaN or infinite values.")
        full_scale = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    elif mode == "I":
        full_scale = max(65535.0, float(values.max(initial=0)))
    else:
        full_scale = 65535.0
    return _scale_to_uint8(values, full_scale)


def _scale_to_uint8(values: np.ndarray, full_scale: float) -> np.ndarray:
    """Round values in [0, full_scale] to uint8 (values outside are clipped)."""
    scaled = np.clip(values.astype(np.float64), 0.0, full_scale) * (255.0 / full_scale)
    return np.round(scaled).astype(np.uint8)


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    """Wrap an (H, W[, C]) array as an 8-bit PIL image of mode L, RGB or RGBA."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"Cannot load an image from an array of shape {array.shape}; expected {_ACCEPTED_INPUTS}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"Cannot load an empty image (array shape {array.shape}).")
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        pixels = _scale_to_uint8(array, 65535.0)
    elif np.issubdtype(array.dtype, np.floating):
        if not (array.min() >= 0.0 and array.max() <= 1.0):  # also rejects NaN
            raise ValueError(
                f"A float image array must hold values in [0, 1], got [{array.min()}, {array.max()}]; "
                "scale it, or pass uint8."
            )
        pixels = _scale_to_uint8(array, 1.0)
    else:
        raise ValueError(f"Cannot load an image from an array of dtype {array.dtype}; expected {_ACCEPTED_INPUTS}.")
    return PIL.Image.fromarray(np.ascontiguousarray(pixels))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageProcessorConfig:
    """The settings of a Hugging Face CLIP or BLIP image processor (its preprocessor_config.json).

    `size` is {"shortest_edge": n} (resize keeping the aspect ratio, as CLIP does) or {"height": h,
    "width": w} (resize to exactly that, as BLIP does). `do_convert_rgb` is kept for round trips only:
    images are always converted to RGB because both vision towers take three channels.
    """

    kind: Literal["clip", "blip"]
    size: Mapping[str, int]
    crop_size: Mapping[str, int] | None = None
    do_resize: bool = True
    do_center_crop: bool = False
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = PIL.Image.Resampling.BICUBIC.value
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("clip", "blip"):
            raise ValueError(f"kind must be 'clip' or 'blip', got {self.kind!r}.")
        if set(self.size) not in ({"shortest_edge"}, {"height", "width"}):
            raise ValueError(f"size must be {{'shortest_edge'}} or {{'height', 'width'}}, got {dict(self.size)}.")
        if self.do_center_crop and (self.crop_size is None or set(self.crop_size) != {"height", "width"}):
            raise ValueError(f"do_center_crop needs crop_size {{'height', 'width'}}, got {self.crop_size}.")
        for name in ("image_mean", "image_std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise ValueError(f"{name} needs one value per RGB channel, got {values}.")
            object.__setattr__(self, name, values)
        object.__setattr__(self, "resample", int(self.resample))

    @classmethod
    def from_preprocessor_config(cls, config: Mapping[str, Any]) -> ImageProcessorConfig:
        """Read a transformers preprocessor_config.json dict; missing keys take the processor's defaults.

        Old configs (int `size`/`crop_size`, `feature_extractor_type` instead of `image_processor_type`)
        are read the way transformers reads them.
        """
        processor_type = config.get("image_processor_type") or config.get("feature_extractor_type") or ""
        if "blip" in processor_type.lower():
            kind, defaults, int_size_is_square = "blip", _BLIP_DEFAULTS, True
        elif "clip" in processor_type.lower():
            kind, defaults, int_size_is_square = "clip", _CLIP_DEFAULTS, False
        else:
            raise ValueError(
                f"Unsupported image processor type {processor_type!r}: expected a CLIP image processor "
                "(LLaVA-1.5) or a BLIP image processor (InstructBLIP)."
            )
        settings = {**defaults, **{key: config[key] for key in defaults if config.get(key) is not None}}
        settings["size"] = _size_dict(settings["size"], int_size_is_square)
        if settings["crop_size"] is not None:
            settings["crop_size"] = _size_dict(settings["crop_size"], True)
        return cls(kind=kind, **settings)

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every preprocessed image; an error when it depends on the input's shape."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        raise ValueError("Without a center crop or a fixed (height, width) resize, the output size follows the input.")


_CLIP_DEFAULTS = {
    "size": {"shortest_edge": 224},
    "crop_size": {"height": 224, "width": 224},
    "do_resize": True,
    "do_center_crop": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "resample": PIL.Image.Resampling.BICUBIC.value,
    "do_convert_rgb": True,
}
_BLIP_DEFAULTS = {**_CLIP_DEFAULTS, "size": {"height": 384, "width": 384}, "crop_size": None, "do_center_crop": False}


def _size_dict(size: int | Iterable[int] | Mapping[str, int], int_is_square: bool) -> dict[str, int]:
    """Normalise a size as transformers' `get_size_dict` does: int -> square or shortest edge, pair -> (h, w)."""
    if isinstance(size, Mapping):
        return {key: int(value) for key, value in size.items() if value is not None}
    if isinstance(size, int):
        return {"height": size, "width": size} if int_is_square else {"shortest_edge": size}
    height, width = size
    return {"height": int(height), "width": int(width)}


def preprocess(image: ImageInput, config: ImageProcessorConfig) -> np.ndarray:
    """One image -> float32 (H, W, 3) pixel values, as the transformers processor computes them (NHWC)."""
    rgb = load_image(image)
    if config.do_resize:
        height, width = _resized_size(rgb.height, rgb.width, config.size)
        rgb = rgb.resize((width, height), resample=config.resample)
    pixels = np.asarray(rgb)  # uint8: transformers crops before converting to float
    if config.do_center_crop:
        pixels = _center_crop(pixels, config.crop_size["height"], config.crop_size["width"])
    return rescale_and_normalize(pixels, config)


def rescale_and_normalize(pixels: np.ndarray, config) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 as transformers' processors do it (a config with do_rescale, rescale_factor,
    do_normalize, image_mean, image_std): the rescale in float64 rounded to float32, then the normalisation in
    float32 with the mean and std rounded to float32, which keeps the bits equal."""
    if config.do_rescale:
        pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        pixels = pixels.astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)
        std = np.asarray(config.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std
    return pixels


def normalize_crop(crop: jax.Array, normalization: tuple) -> jax.Array:
    """Crop pixels in [0,255] resized on the device -> model input, as the image processor does after its
    resize (uint8 rounding); normalization = (rescale factor, mean, std)."""
    rescale, mean, std = normalization
    crop = jnp.clip(jnp.round(crop), 0, 255) * rescale
    return (crop - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def preprocess_batch(images: Iterable[ImageInput], config: ImageProcessorConfig) -> np.ndarray:
    """Images -> float32 (N, H, W, 3); they must all come out the same size (true with a crop or fixed size).

    Several images are preprocessed on as many threads as there are cores: PIL's resize, most of the work,
    releases the GIL.
    """
    images = list(images)
    unique = list({id(image): image for image in images}.values())  # an image given twice is processed once
    if len(unique) < 2:
        processed = [preprocess(image, config) for image in unique]
    else:
        with ThreadPoolExecutor(min(len(unique), os.cpu_count() or 1)) as pool:
            processed = list(pool.map(lambda image: preprocess(image, config), unique))
    by_id = {id(image): pixels for image, pixels in zip(unique, processed)}
    return np.stack([by_id[id(image)] for image in images])


def _resized_size(height: int, width: int, size: Mapping[str, int]) -> tuple[int, int]:
    """Target (height, width), with transformers' `get_resize_output_image_size(default_to_square=False)`
    truncation for shortest-edge sizes: the long edge is int(shortest_edge * long / short)."""
    if "height" in size:
        return size["height"], size["width"]
    new_short = size["shortest_edge"]
    if width <= height:
        return int(new_short * height / width), new_short
    return new_short, int(new_short * width / height)


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Center crop as transformers does: the window starts at (size - crop) // 2 along each axis; an axis
    shorter than the crop is zero padded, the image placed ceil((crop - size) / 2) from the start."""
    rows = _crop_window(pixels.shape[0], crop_height)
    columns = _crop_window(pixels.shape[1], crop_width)
    cropped = np.zeros((crop_height, crop_width, pixels.shape[2]), dtype=pixels.dtype)
    cropped[rows[1], columns[1]] = pixels[rows[0], columns[0]]
    return cropped


def _crop_window(length: int, crop: int) -> tuple[slice, slice]:
    """(source slice, destination slice) of one axis of a center crop to `crop` pixels."""
    if length >= crop:
        start = (length - crop) // 2
        return slice(start, start + crop), slice(0, crop)
    start = (crop - length + 1) // 2
    return slice(0, length), slice(start, start + length)
