"""Parity of vicrop_jax.preprocessing with transformers' CLIP and BLIP image processors.

The references are transformers' PIL-backend processors (`CLIPImageProcessorPil`, `BlipImageProcessorPil`),
built from explicit settings, never from the hub. That backend is what `CLIPImageProcessor` falls back to
without torchvision, and it is the one this module reproduces; naming it keeps the tests meaningful when
torchvision is installed (the torchvision backend resizes tensors, not PIL images, so its values differ).
Our configs are read back from the preprocessor_config.json that transformers itself writes.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers import BlipImageProcessorPil, CLIPImageProcessorPil

from vicrop_jax.preprocessing import ImageProcessorConfig, load_image, preprocess, preprocess_batch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Same PIL resize on the same uint8 image and the same float64->float32 arithmetic: every case below
# measured a max difference of exactly 0; the tolerance is slack, not an expected error.
TOLERANCE = 1e-6


def clip_processor(**overrides) -> CLIPImageProcessorPil:
    settings = dict(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_mean=CLIP_MEAN,
        image_std=CLIP_STD, resample=3, do_center_crop=True,
    )
    return CLIPImageProcessorPil(**{**settings, **overrides})


def blip_processor(**overrides) -> BlipImageProcessorPil:
    settings = dict(size={"height": 224, "width": 224}, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
    return BlipImageProcessorPil(**{**settings, **overrides})


def saved_config(processor, folder) -> ImageProcessorConfig:
    """Our config, read from the preprocessor_config.json that transformers writes for `processor`."""
    processor.save_pretrained(folder)
    return ImageProcessorConfig.from_preprocessor_config(json.loads((folder / "preprocessor_config.json").read_text()))


@pytest.fixture(scope="module", params=["clip", "blip"])
def pair(request, tmp_path_factory):
    """(transformers processor, our config read from its saved json)."""
    processor = clip_processor() if request.param == "clip" else blip_processor()
    return processor, saved_config(processor, tmp_path_factory.mktemp(request.param))


def reference(processor, image) -> np.ndarray:
    """transformers' output for one image, transposed from NCHW to our HWC."""
    return processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def max_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max())


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Noisy content with some large-scale structure, so resize and crop offsets show up in the output."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    noise = rng.integers(0, 256, (height, width, 3))
    return ((ramp + noise) / 2).astype(np.uint8)


@pytest.mark.parametrize(
    "height, width", [(333, 517), (200, 1000), (900, 150), (7, 10), (336, 336), (224, 224)],
    ids=["odd", "wide", "tall", "tiny", "exact-clip", "exact-blip"],
)
def test_rgb_sizes_match_transformers(pair, height, width):
    processor, config = pair
    image = Image.fromarray(random_rgb(height, width))
    ours = preprocess(image, config)
    assert ours.shape == (*config.output_size, 3)
    assert max_difference(ours, reference(processor, image)) <= TOLERANCE


@pytest.mark.parametrize(
    "overrides",
    [
        dict(do_resize=False),  # zero padding wherever the image is smaller than the crop (odd margins)
        dict(size={"shortest_edge": 300}),  # pads the short axis, crops the long one
        dict(size={"shortest_edge": 225}, crop_size={"height": 223, "width": 224}),  # odd crop margins
        dict(do_rescale=False, do_normalize=False),
    ],
    ids=["no-resize", "short-edge-below-crop", "odd-crop", "raw-pixels"],
)
@pytest.mark.parametrize("height, width", [(7, 10), (333, 517)])
def test_center_crop_and_padding_match_transformers(tmp_path, overrides, height, width):
    processor = clip_processor(**overrides)
    image = Image.fromarray(random_rgb(height, width, seed=1))
    theirs = reference(processor, image)
    assert max_difference(preprocess(image, saved_config(processor, tmp_path)), theirs) <= TOLERANCE


def make_mode_image(mode: str, seed: int = 2) -> Image.Image:
    rgb = Image.fromarray(random_rgb(120, 90, seed))
    rng = np.random.default_rng(seed)
    if mode == "P":
        return rgb.quantize(64)
    if mode == "P-transparent":
        palette = rgb.quantize(64)
        palette.info["transparency"] = 3
        return palette
    image = rgb.convert(mode)
    if "A" in mode:
        alpha = Image.fromarray(rng.integers(0, 256, (120, 90), dtype=np.uint8))
        image.putalpha(alpha)
    return image


@pytest.mark.parametrize("mode", ["L", "P", "CMYK"])
def test_opaque_modes_match_transformers(pair, tmp_path, mode):
    processor, config = pair
    image = make_mode_image(mode)
    if mode == "CMYK":  # a real CMYK file, as cameras and print workflows write them
        image.save(tmp_path / "cmyk.jpg")
        image = Image.open(tmp_path / "cmyk.jpg")
        assert image.mode == "CMYK"
    assert max_difference(preprocess(image, config), reference(processor, image)) <= TOLERANCE


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P-transparent"])
def test_transparency_is_dropped_like_convert_rgb(pair, tmp_path, mode):
    """Transparency is dropped by convert("RGB"), as in the LLaVA and LAVIS data pipelines, which feed
    the processor `Image.open(f).convert("RGB")`; the reference is the processor on those RGB pixels.

    transformers 5 differs and is not consistent with itself: its processor composites a PIL image's
    transparency over white, both alpha bands and a `transparency` key in `image.info`. Its `load_image`
    (used for paths) calls convert("RGB") first, which removes an alpha band but turns a palette's
    transparent index into an RGB colour key that the processor then still composites. So for a path,
    transformers matches us on RGBA and LA but whitens the transparent palette colour.
    """
    processor, config = pair
    image = make_mode_image(mode)
    path = tmp_path / "transparent.png"
    image.save(path)
    expected = reference(processor, np.asarray(image.convert("RGB")))
    assert max_difference(preprocess(image, config), expected) <= TOLERANCE
    assert max_difference(preprocess(path, config), expected) <= TOLERANCE
    # Compositing really gives other pixels, so the choice above is a real one.
    assert np.abs(reference(processor, image) - expected).max() > 0.1


def test_sixteen_bit_png_is_scaled_not_clipped(pair, tmp_path):
    """16-bit images are scaled to 8 bits by their full range (value / 257, rounded).

    transformers (via Pillow's convert("RGB")) clips I;16 values at 255, which turns nearly every 16-bit
    photograph white; we deliberately differ, so the reference is the processor on the 8-bit image.
    """
    processor, config = pair
    rng = np.random.default_rng(3)
    values = rng.integers(0, 65536, (64, 48)).astype(np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    eight_bit = Image.fromarray(np.round(values / 257).astype(np.uint8))
    assert max_difference(preprocess(path, config), reference(processor, eight_bit)) <= TOLERANCE


@pytest.mark.parametrize(
    "values, expected",
    [
        (np.array([[65535, 32896, 0, 257]], np.uint16), [255, 128, 0, 1]),  # I;16
        (np.array([[65535, 32896, 0, -5]], np.int32), [255, 128, 0, 0]),  # I holding 16-bit data
        (np.array([[131070, 65535, 0, 0]], np.int32), [255, 128, 0, 0]),  # I beyond 16 bits: by its max
        (np.array([[1.0, 0.5, 0.0, 0.25]], np.float32), [255, 128, 0, 64]),  # F in [0, 1]
        (np.array([[255.0, 128.0, 0.0, 300.0]], np.float32), [255, 128, 0, 255]),  # F in [0, 255]
    ],
    ids=["I;16", "I", "I-wide", "F-unit", "F-byte"],
)
def test_wide_pil_modes_scale_to_eight_bits(values, expected):
    image = Image.fromarray(values)
    loaded = np.asarray(load_image(image))
    assert loaded.dtype == np.uint8 and loaded.shape == (1, 4, 3)
    np.testing.assert_array_equal(loaded[0, :, 0], expected)
    np.testing.assert_array_equal(loaded[..., 0], loaded[..., 2])


def test_exif_orientation_is_applied(pair, tmp_path):
    processor, config = pair
    stored = Image.fromarray(random_rgb(100, 160, seed=4))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(path))
    assert load_image(path).size == (100, 160) == upright.size
    theirs = reference(processor, upright)
    assert max_difference(preprocess(path, config), theirs) <= TOLERANCE
    assert max_difference(preprocess(Image.open(path), config), theirs) <= TOLERANCE
    assert max_difference(preprocess(str(path), config), reference(processor, str(path))) <= TOLERANCE
    # Loading twice must not rotate twice: the generation code preprocesses already loaded images.
    np.testing.assert_array_equal(np.asarray(load_image(load_image(path))), np.asarray(upright.convert("RGB")))
    loaded = load_image(path)
    assert load_image(loaded) is loaded, "an upright RGB image is used as it is, not copied"


def test_arrays(pair):
    processor, config = pair
    pixels = random_rgb(97, 131, seed=5)
    ours = preprocess(pixels, config)
    assert max_difference(ours, reference(processor, pixels)) <= TOLERANCE
    # A float image in [0, 1] is the uint8 image; transformers would rescale it twice, so compare to ours.
    np.testing.assert_array_equal(preprocess(pixels / 255.0, config), ours)
    np.testing.assert_array_equal(preprocess(pixels.astype(np.uint16) * 257, config), ours)
    gray = pixels[..., 0]
    assert max_difference(preprocess(gray, config), reference(processor, Image.fromarray(gray))) <= TOLERANCE
    np.testing.assert_array_equal(preprocess(gray[..., None], config), preprocess(gray, config))


def test_path_and_batch(pair, tmp_path):
    processor, config = pair
    images = [Image.fromarray(random_rgb(150 + 40 * i, 210 - 30 * i, seed=i)) for i in range(3)]
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"image{index}.png")
        image.save(paths[-1])
    batch = preprocess_batch([paths[0], str(paths[1]), images[2]], config)
    assert batch.shape == (3, *config.output_size, 3) and batch.dtype == np.float32
    theirs = processor(images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert max_difference(batch, theirs) <= TOLERANCE


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((8, 8, 5), np.uint8), r"shape \(8, 8, 5\)"),
        (np.zeros((3, 8, 8), np.uint8), r"shape \(3, 8, 8\)"),
        (np.zeros((8, 8, 3), np.int64), "dtype int64"),
        (np.full((8, 8, 3), 2.0), r"\[0, 1\]"),
        (np.full((8, 8, 3), np.nan), r"\[0, 1\]"),
        ([[0, 1], [2, 3]], "from list"),
    ],
    ids=["5-channel", "channels-first", "int64", "float-range", "nan", "list"],
)
def test_unsupported_inputs_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        load_image(bad)


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(random_rgb(64, 64, seed=6)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jpg", b""),
        ("truncated-header.jpg", jpeg_bytes()[:400]),  # fails in Image.open
        ("truncated.jpg", jpeg_bytes()[: len(jpeg_bytes()) * 2 // 3]),  # opens, fails only when decoded
        ("notes.png", b"just some text\n" * 20),
    ],
    ids=["zero-byte", "truncated-header", "truncated-data", "text-as-png"],
)
def test_unreadable_files_raise_value_error_naming_the_path(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=name) as raised:
        load_image(path)
    assert str(path) in str(raised.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nowhere.png")


def test_config_round_trip_through_transformers_json(tmp_path):
    clip = saved_config(clip_processor(), tmp_path / "clip")
    assert clip == ImageProcessorConfig(
        kind="clip", size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    assert clip.output_size == (336, 336)
    blip = saved_config(blip_processor(), tmp_path / "blip")
    assert blip == ImageProcessorConfig(kind="blip", size={"height": 224, "width": 224})
    assert blip.output_size == (224, 224)


@pytest.mark.parametrize(
    "processor_class, old_style",
    [
        # The shape of openai/clip-vit-large-patch14-336's file: int sizes and a feature-extractor type.
        (CLIPImageProcessorPil, {"feature_extractor_type": "CLIPFeatureExtractor", "size": 336, "crop_size": 336}),
        (CLIPImageProcessorPil, {"image_processor_type": "CLIPImageProcessorFast"}),  # all defaults
        (BlipImageProcessorPil, {"image_processor_type": "BlipImageProcessorFast", "size": 224}),
    ],
    ids=["clip-feature-extractor", "clip-defaults", "blip-int-size"],
)
def test_config_reads_old_style_and_partial_configs_as_transformers_does(processor_class, old_style):
    ours = ImageProcessorConfig.from_preprocessor_config(old_style)
    theirs = ImageProcessorConfig.from_preprocessor_config(processor_class.from_dict(old_style).to_dict())
    assert ours == theirs


def test_config_rejects_unknown_processors_and_bad_settings():
    with pytest.raises(ValueError, match="SiglipImageProcessor"):
        ImageProcessorConfig.from_preprocessor_config({"image_processor_type": "SiglipImageProcessor"})
    with pytest.raises(ValueError, match="Unsupported image processor type"):
        ImageProcessorConfig.from_preprocessor_config({})
    with pytest.raises(ValueError, match="size"):
        ImageProcessorConfig(kind="clip", size={"longest_edge": 336})
    with pytest.raises(ValueError, match="crop_size"):
        ImageProcessorConfig(kind="clip", size={"shortest_edge": 336}, do_center_crop=True)
    with pytest.raises(ValueError, match="output size follows the input"):
        ImageProcessorConfig(kind="clip", size={"shortest_edge": 336}).output_size
