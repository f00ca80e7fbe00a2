"""Parity of vicrop_jax.qwen_preprocessing with transformers' Qwen2-VL image processor.

The reference is `transformers.Qwen2VLImageProcessor` itself: without torchvision, transformers resolves that name
to its PIL backend class `Qwen2VLImageProcessorPil` (asserted below), the one this module reproduces. Should
torchvision ever be installed, the PIL class is named directly, since the torchvision backend resizes tensors and
gives other values. Processors are built from explicit settings, never from the hub, and our configs are read
back from the files transformers itself writes. Both sides run the same uint8 PIL resize and the same float
arithmetic, so the outputs must be equal, not merely close.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast, ProcessorMixin, Qwen2VLImageProcessor, Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from vicrop_jax.qwen_preprocessing import (
    QwenImage,
    QwenImageProcessorConfig,
    image_grid,
    preprocess_qwen,
    resized_size,
    smart_resize,
)
from weights_conversion.hf_folder import read_image_processor_config

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
REFERENCE = Qwen2VLImageProcessorPil if HAS_TORCHVISION else Qwen2VLImageProcessor
MAP_PIXELS = 256 * 28 * 28


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Noise over a ramp: resize filters, rounding and patch order all show up in the output."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    return ((ramp + rng.integers(0, 256, (height, width, 3))) / 2).astype(np.uint8)


def saved_config(processor, folder) -> QwenImageProcessorConfig:
    """Our config, read from the preprocessor_config.json that transformers writes for `processor`."""
    processor.save_pretrained(folder)
    return QwenImageProcessorConfig.from_preprocessor_config(read_image_processor_config(folder))


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory):
    processor = REFERENCE()
    return processor, saved_config(processor, tmp_path_factory.mktemp("qwen"))


def assert_same(ours: QwenImage, processor, image, **call_kwargs) -> None:
    """Our patches and grid equal transformers' pixel_values and image_grid_thw, bit for bit."""
    theirs = processor(image, return_tensors="np", **call_kwargs)
    pixel_values, grid_thw = theirs["pixel_values"], theirs["image_grid_thw"]
    assert ours.patches.dtype == pixel_values.dtype == np.float32
    assert ours.patches.shape == pixel_values.shape
    np.testing.assert_array_equal(ours.patches, pixel_values)
    assert grid_thw.shape == (1, 3) and ours.grid == tuple(int(n) for n in grid_thw[0])


@pytest.mark.skipif(HAS_TORCHVISION, reason="with torchvision, transformers picks its torchvision backend")
def test_reference_is_the_pil_backend():
    assert Qwen2VLImageProcessor is Qwen2VLImageProcessorPil
    assert Qwen2VLImageProcessor().backend == "pil"


@pytest.mark.parametrize(
    "height, width",
    [(77, 123), (123, 77), (5, 5), (1, 30), (30, 1), (1, 200), (70, 98), (56, 84), (1500, 2000), (40, 3000),
     (2500, 30)],
    ids=["odd", "odd-tall", "tiny", "one-row", "one-column", "aspect-200", "halves-to-even", "already-multiple",
         "above-max-pixels", "very-wide", "very-tall"],
)
def test_sizes_match_transformers(default_pair, height, width):
    processor, config = default_pair
    image = Image.fromarray(random_rgb(height, width))
    ours = preprocess_qwen(image, config)
    assert_same(ours, processor, image)
    new_width, new_height = resized_size(width, height, config)
    assert new_width % 28 == 0 and new_height % 28 == 0
    assert ours.grid == image_grid(width, height, config) == (1, new_height // 14, new_width // 14)
    assert ours.patches.shape == (new_height * new_width // 14**2, 3 * 2 * 14 * 14)


@pytest.mark.parametrize("height, width", [(1, 201), (201, 1), (3, 700)])
def test_extreme_aspect_ratio_is_refused_like_transformers(default_pair, height, width):
    processor, config = default_pair
    image = Image.fromarray(random_rgb(height, width))
    with pytest.raises(ValueError, match="aspect ratio"):
        processor(image, return_tensors="np")
    with pytest.raises(ValueError, match=r"aspect ratio of .* at most 200"):
        preprocess_qwen(image, config)
    with pytest.raises(ValueError, match="aspect ratio"):
        resized_size(width, height, config)


def test_smart_resize_matches_transformers():
    """The size arithmetic over many sizes and budgets, margins and half-way roundings included."""
    rng = np.random.default_rng(0)
    sides = np.concatenate([rng.integers(1, 40, 150), rng.integers(1, 4000, 250), 14 * rng.integers(1, 100, 100)])
    budgets = [(56 * 56, 28 * 28 * 1280), (3136, MAP_PIXELS), (100, 12845056), (512 * 28 * 28, 1024 * 28 * 28)]
    compared = 0
    for height, width in zip(sides, rng.permutation(sides)):
        height, width = int(height), int(width)
        if max(height, width) / min(height, width) > 200:
            continue
        for factor in (28, 32):
            for min_pixels, max_pixels in budgets:
                expected = hf_smart_resize(height, width, factor, min_pixels, max_pixels)
                assert smart_resize(height, width, factor, min_pixels, max_pixels) == expected
                compared += 1
    assert compared > 2000
    for bad in [(0, 5), (5, -1), (2.5, 5)]:
        with pytest.raises(ValueError, match="must be"):
            smart_resize(*bad)


def mode_image(mode: str) -> Image.Image | np.ndarray:
    rgb = random_rgb(90, 130, seed=2)
    if mode == "array":
        return rgb
    if mode == "P":
        return Image.fromarray(rgb).quantize(64)
    image = Image.fromarray(rgb).convert(mode)
    if mode == "RGBA":
        image.putalpha(255)
    return image


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "array"], ids=["L", "P", "RGBA-opaque", "uint8-array"])
def test_other_inputs_match_transformers(default_pair, mode):
    processor, config = default_pair
    image = mode_image(mode)
    assert_same(preprocess_qwen(image, config), processor, image)


def test_transparency_is_dropped_like_convert_rgb(default_pair):
    """load_image drops transparency (convert("RGB"), as the training pipelines did); transformers' processor
    composites it over white. The reference is therefore the processor on convert("RGB")'s pixels."""
    processor, config = default_pair
    image = Image.fromarray(random_rgb(90, 130, seed=3)).convert("RGBA")
    image.putalpha(Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 130), dtype=np.uint8)))
    ours = preprocess_qwen(image, config)
    assert_same(ours, processor, image.convert("RGB"))
    composited = processor(image, return_tensors="np")["pixel_values"]
    assert np.abs(composited - ours.patches).max() > 0.1  # the choice is a real one


@pytest.mark.parametrize(
    "settings",
    [dict(max_pixels=MAP_PIXELS), dict(min_pixels=512 * 28 * 28, max_pixels=600 * 28 * 28),
     dict(min_pixels=100, max_pixels=60_000)],
    ids=["map-budget", "upscale", "small-bounds"],
)
@pytest.mark.parametrize("height, width", [(1500, 2000), (77, 123)])
def test_pixel_budgets_match_transformers(tmp_path, settings, height, width):
    processor = REFERENCE(**settings)
    config = saved_config(processor, tmp_path)
    assert (config.min_pixels, config.max_pixels) == (settings.get("min_pixels", 3136), settings["max_pixels"])
    image = Image.fromarray(random_rgb(height, width, seed=4))
    assert_same(preprocess_qwen(image, config), processor, image)


def test_max_pixels_override(default_pair):
    """The map pass reuses the answer pass's config with a smaller budget, per call or as a copy."""
    _, config = default_pair
    image = Image.fromarray(random_rgb(1500, 2000, seed=5))
    reference = REFERENCE(max_pixels=MAP_PIXELS)
    assert_same(preprocess_qwen(image, config, max_pixels=MAP_PIXELS), reference, image)
    small = config.with_max_pixels(MAP_PIXELS)
    assert small == dataclasses.replace(config, max_pixels=MAP_PIXELS) and config.max_pixels == 28 * 28 * 1280
    assert_same(preprocess_qwen(image, small), reference, image)
    assert resized_size(2000, 1500, config, max_pixels=MAP_PIXELS) == resized_size(2000, 1500, small) == (504, 364)
    assert image_grid(2000, 1500, small) == (1, 26, 36)
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        config.with_max_pixels(0)


@pytest.mark.parametrize(
    "settings",
    [dict(resample=2), dict(do_rescale=False), dict(do_normalize=False), dict(do_rescale=False, do_normalize=False),
     dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0], rescale_factor=1 / 127.5),
     dict(patch_size=16, merge_size=2, temporal_patch_size=3), dict(merge_size=1)],
    ids=["bilinear", "no-rescale", "no-normalize", "raw", "other-mean-std", "patch-16-temporal-3", "no-merge"],
)
def test_other_settings_match_transformers(tmp_path, settings):
    processor = REFERENCE(**settings)
    config = saved_config(processor, tmp_path)
    image = Image.fromarray(random_rgb(123, 217, seed=6))
    ours = preprocess_qwen(image, config)
    assert_same(ours, processor, image)
    patch, frames = config.patch_size, config.temporal_patch_size
    assert ours.patches.shape[1] == 3 * frames * patch * patch


def test_without_resize(tmp_path):
    processor = REFERENCE(do_resize=False)
    config = saved_config(processor, tmp_path)
    image = Image.fromarray(random_rgb(56, 84, seed=7))
    assert_same(preprocess_qwen(image, config), processor, image)
    assert resized_size(84, 56, config) == (84, 56)
    with pytest.raises(ValueError, match="multiples of patch_size \\* merge_size = 28"):
        preprocess_qwen(Image.fromarray(random_rgb(50, 84)), config)


def test_patch_rows_keep_merge_units_together():
    """Row k of the patches is patch (row, column) of the grid in merge-unit order, frames repeated."""
    config = QwenImageProcessorConfig(do_resize=False, do_rescale=False, do_normalize=False)
    pixels = random_rgb(56, 84, seed=8)
    patches = preprocess_qwen(pixels, config).patches.reshape(-1, 3, 2, 14, 14)
    # The 2x3 merge units of a 4x6 patch grid; inside each, its four patches in raster order.
    order = [(2 * ur + r, 2 * uc + c) for ur in range(2) for uc in range(3) for r in range(2) for c in range(2)]
    for row, (pr, pc) in enumerate(order):
        expected = pixels[14 * pr:14 * pr + 14, 14 * pc:14 * pc + 14].transpose(2, 0, 1)
        np.testing.assert_array_equal(patches[row, :, 0], expected)
        np.testing.assert_array_equal(patches[row, :, 1], expected)


class ImageTextProcessor(ProcessorMixin):
    """A processor of an image processor and a tokenizer. Qwen2.5-VL's own processor needs a video processor,
    which needs torchvision; its processor_config.json nests the image processor the same way."""

    def __init__(self, image_processor=None, tokenizer=None):
        super().__init__(image_processor, tokenizer)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<|image_pad|>": 1, "a": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   unk_token="<unk>")


@pytest.mark.parametrize("layout", ["image_processor", "processor"])
def test_saved_processor_loads(tmp_path, layout):
    """What transformers 5 writes: size {"shortest_edge", "longest_edge"}, no min_pixels/max_pixels keys,
    in preprocessor_config.json (image processor) or nested in processor_config.json (processor)."""
    settings = dict(min_pixels=4 * 28 * 28, max_pixels=MAP_PIXELS, resample=2, image_mean=[0.5, 0.5, 0.5],
                    image_std=[0.5, 0.5, 0.5], merge_size=2, patch_size=14, temporal_patch_size=2)
    image_processor = REFERENCE(**settings)
    if layout == "processor":
        ImageTextProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer()).save_pretrained(tmp_path)
        assert not (tmp_path / "preprocessor_config.json").exists()
        written = json.loads((tmp_path / "processor_config.json").read_text())["image_processor"]
    else:
        image_processor.save_pretrained(tmp_path)
        written = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert written["image_processor_type"] == "Qwen2VLImageProcessor"
    assert written["size"] == {"shortest_edge": 4 * 28 * 28, "longest_edge": MAP_PIXELS}
    assert "min_pixels" not in written and "max_pixels" not in written
    loaded = QwenImageProcessorConfig.from_preprocessor_config(read_image_processor_config(tmp_path))
    assert loaded == QwenImageProcessorConfig(**{**settings, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3})
    image = Image.fromarray(random_rgb(300, 200, seed=9))
    assert_same(preprocess_qwen(image, loaded), image_processor, image)


OLD_STYLE = {  # what transformers 4.45 saved, size keys named like the top-level ones
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    "min_pixels": 3136, "max_pixels": 12845056, "size": {"min_pixels": 3136, "max_pixels": 12845056},
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "do_resize": True, "resample": 3,
    "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True, "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
PUBLISHED_QWEN25 = {  # the layout of Qwen2.5-VL's published preprocessor_config.json: no size at all
    key: OLD_STYLE[key] for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
                                    "image_mean", "image_std", "image_processor_type")
} | {"processor_class": "Qwen2_5_VLProcessor"}


@pytest.mark.parametrize(
    "config, bounds",
    [(OLD_STYLE, (3136, 12845056)), (PUBLISHED_QWEN25, (3136, 12845056)),
     ({**OLD_STYLE, "size": {"shortest_edge": 1, "longest_edge": 2}, "max_pixels": MAP_PIXELS}, (3136, MAP_PIXELS)),
     ({"image_processor_type": "Qwen2VLImageProcessorFast", "size": {"shortest_edge": 100, "longest_edge": 2000},
       "max_pixels": None, "min_pixels": None}, (100, 2000)),
     ({"image_processor_type": "Qwen2VLImageProcessor", "do_center_crop": True,
       "crop_size": {"height": 28, "width": 28}, "do_pad": True, "pad_size": None, "data_format": "channels_first",
       "device": None}, (3136, 1003520))],
    ids=["old-style", "published-qwen2.5", "top-level-wins", "fast-null-bounds", "ignored-keys"],
)
def test_config_layouts_load_as_transformers_reads_them(config, bounds):
    ours = QwenImageProcessorConfig.from_preprocessor_config(config)
    assert ours == QwenImageProcessorConfig(min_pixels=bounds[0], max_pixels=bounds[1])
    theirs = REFERENCE.from_dict(config)
    assert (theirs.size["shortest_edge"], theirs.size["longest_edge"]) == bounds
    image = Image.fromarray(random_rgb(60, 45, seed=10))
    assert_same(preprocess_qwen(image, ours), theirs, image)


@pytest.mark.parametrize(
    "changes, message",
    [({"image_processor_type": "CLIPImageProcessor"}, "Unsupported image processor type 'CLIPImageProcessor'"),
     ({"image_processor_type": None}, "Unsupported image processor type None"),
     ({"resample": 9}, "resample 9 is not a PIL resampling filter"),
     ({"resample": None}, "resample is null"),
     ({"image_std": None}, "image_std is null"),
     ({"resample": "bicubic"}, "resample 'bicubic' is not a PIL resampling filter"),
     ({"patch_size": 0}, "patch_size must be a positive integer"),
     ({"image_mean": [0.5, 0.5]}, "image_mean needs one value per RGB channel"),
     ({"do_rescale": "yes"}, "do_rescale must be true or false")],
)
def test_unsupported_values_are_refused(changes, message):
    config = {**PUBLISHED_QWEN25, **changes}
    with pytest.raises(ValueError, match=message):
        QwenImageProcessorConfig.from_preprocessor_config(config)


@pytest.mark.parametrize(
    "size, extra",
    [({"min_pixels": 3136, "max_pixels": 50_000}, {}), ({"shortest_edge": 3136}, {}), (448, {}),
     ({"min_pixels": 3136, "max_pixels": 50_000}, {"min_pixels": 3136})],
    ids=["old-size-without-top-level", "no-longest-edge", "int-size", "half-overridden"],
)
def test_sizes_transformers_cannot_resize_with_are_refused(size, extra):
    """transformers loads these but fails when it resizes (or, for mixed keys, when it loads); we fail early."""
    config = {"image_processor_type": "Qwen2VLImageProcessor", "size": size, **extra}
    with pytest.raises(ValueError):
        REFERENCE.from_dict({"size": size, **extra})(Image.fromarray(random_rgb(60, 45)), return_tensors="np")
    with pytest.raises(ValueError, match=r"size|pixel bounds"):
        QwenImageProcessorConfig.from_preprocessor_config(config)
    assert QwenImageProcessorConfig.from_preprocessor_config({**config, "do_resize": False}).do_resize is False


def test_null_switch_is_off_as_in_transformers():
    """transformers 5 keeps an explicit null over the class default, and `if do_normalize:` reads it as off."""
    config = {**PUBLISHED_QWEN25, "do_normalize": None, "do_convert_rgb": None}
    ours = QwenImageProcessorConfig.from_preprocessor_config(config)
    assert ours.do_normalize is False and ours.do_convert_rgb is False and ours.do_rescale is True
    image = Image.fromarray(random_rgb(60, 45, seed=11))
    assert_same(preprocess_qwen(image, ours), REFERENCE.from_dict(config), image)


def test_factor_and_frozen():
    config = QwenImageProcessorConfig()
    assert config.factor == 28 and QwenImageProcessorConfig(patch_size=16).factor == 32
    with pytest.raises(AttributeError):
        config.max_pixels = 1
