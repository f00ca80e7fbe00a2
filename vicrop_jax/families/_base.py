"""What every model family provides, and the device form of a tokenized prompt.

A family is a frozen, hashable value: jitted programs take it as a static argument, and the pipeline asks it
(never a family name) how to read a config, build prompts, lay a box onto what the processor keeps and read a
map out of the sown attention. Axis letters: N heads, T query positions, S key positions.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vicrop_jax.nn.decoding import bucket_length
from vicrop_jax.preprocessing import ImageProcessorConfig, normalize_crop, preprocess_batch
from vicrop_jax.crop_resize import crop_and_resize_jax

ReadAttention = Callable[[str], jax.Array]  # sown name -> probabilities [N, T, S] of one prompt
IMAGE_BUCKET = 256


class GenerationInputs(NamedTuple):
    """What `generate` runs for one prompt over its images."""

    ids: list[int]  # LM token ids, image placeholders expanded
    encode_args: tuple  # the arguments of the model's `encode_images` after the parameters
    positions: np.ndarray | None = None  # [3, T] rotary positions where they are not the token's index
    position_offset: int | None = None  # how far the answer's rotary positions run ahead of its cache slots
    bucket: int | None = None  # the padded prompt length, where the family sets it (default: the next multiple of 32)


class PromptArrays(NamedTuple):
    """One prompt on the device: ids right-padded to a bucket, true length, and the prompt's extra inputs of
    `encode_images` (InstructBLIP: the Q-Former's ids and mask; Qwen2.5-VL: the layout of its images' patches;
    none for LLaVA); for multimodal RoPE its positions [3, T] and the answer's offset from its slots."""

    ids: jax.Array
    length: jax.Array
    image_text: tuple[jax.Array, ...] = ()
    positions: jax.Array | None = None
    position_offset: jax.Array | None = None


class PromptSplit(NamedTuple):
    """A prompt cut after the prefix it shares with the other prompts of its question ([text, first image]): the
    prefix (ids [P], its true length p <= P: the slots after p are overwritten by the suffix or never attended),
    the suffix (ids [Ts] written from slot p, its length, its rotary positions and answer offset where they are
    not its slots) and the features [F, D] of the suffix's images, in the order of their positions."""

    prefix: PromptArrays
    suffix: PromptArrays
    features: jax.Array


class ImageFeatures(NamedTuple):
    """One image's LM features [M, D] and, for a family whose token count follows the image's size, its token
    grid [2] (rows, cols): the first rows * cols features are the image's, the rest padding. `grid` is None where
    every image has M tokens. Leaves may carry leading axes."""

    features: jax.Array
    grid: jax.Array | None = None


def expand_image_markers(ids: list[int], image_id: int, counts: list[int], marker: str, prompt_function: str
                         ) -> list[int]:
    """Token ids with the i-th image marker repeated counts[i] times (one position per image feature), refusing a
    prompt whose markers do not match the images given."""
    found = ids.count(image_id)
    if found != len(counts):
        raise ValueError(
            f"the prompt has {found} {marker} marker(s) but {len(counts)} image(s) were given; put one "
            f"{marker} per image where it belongs (see vicrop_jax.prompts.{prompt_function})"
        )
    counts_left = iter(counts)
    return [t for token in ids for t in ([token] * next(counts_left) if token == image_id else [token])]


def stack_arrays(trees: list) -> Any:
    """Host pytrees (prompt arrays) stacked leaf by leaf on a new leading axis."""
    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *trees)


def block_mean(values: jax.Array, block: int) -> jax.Array:
    h, w = values.shape
    return values.reshape(h // block, block, w // block, block).mean(axis=(1, 3))


def head_mean(probs: jax.Array, heads: tuple[int, ...] | None) -> jax.Array:
    """probs [N, ...] -> mean over all heads or the listed ones."""
    return probs.mean(0) if heads is None else probs[jnp.asarray(heads)].mean(0)


def image_attention(probs: jax.Array, query_row, prompt: PromptArrays, image_token_id: int, count: int,
                    skip: int, heads: tuple[int, ...] | None) -> jax.Array:
    """Head-mean attention [count] of one query row of probs [N, T, S] to the first image's positions (the
    first `image_token_id` of the prompt, `skip` positions on)."""
    row = jnp.take(probs, query_row, axis=1)  # [N, S]
    start = jnp.argmax(prompt.ids == image_token_id) + skip
    return head_mean(jax.lax.dynamic_slice_in_dim(row, start, count, axis=1), heads)


@dataclasses.dataclass(frozen=True)
class Family(abc.ABC):
    """Everything that differs between model families. Subclasses override what their family does otherwise."""

    name: str  # for messages and result files, never compared
    # Whether images enter at one fixed size, as pixels [H, W, 3] with a fixed token count (lmms-eval's
    # loglikelihood scorer builds only such prompts); a family at native resolution (Qwen2.5-VL) sizes each image.
    fixed_resolution: ClassVar[bool] = True
    config_class: type  # a frozen config dataclass with `from_hf_config(config.json dict)`
    module_class: type[nn.Module]  # built as module_class(config, dtype=, param_dtype=, attention_kernel=)
    conversion_table: Callable[[Any], dict]  # config -> {flax path: (HF key, transform)}
    default_map_layer: int  # the paper's LM map layer (a shallower model uses its middle layer)
    key_aliases: tuple[tuple[str, str], ...] = ()  # other checkpoint key layouts, renamed onto the table's

    # Loading
    def read_config(self, hf_config: dict[str, Any]) -> Any:
        return self.config_class.from_hf_config(hf_config)

    def init_inputs(self, config: Any) -> tuple[np.ndarray, ...]:
        """Inputs of `module.init` that build every parameter: one image's placeholders and a blank image."""
        ids = np.full((1, config.tokens_per_image + 1), config.image_token_id, np.int32)
        pixels = np.zeros((1, 1, config.image_size, config.image_size, 3), np.float32)
        return ids, pixels

    def read_image_config(self, processor: dict[str, Any]) -> ImageProcessorConfig:
        """The image processor's settings from the checkpoint's processor file."""
        return ImageProcessorConfig.from_preprocessor_config(processor)

    def read_extra_tokenizer(self, folder: Path):
        """A second tokenizer the family's image encoder reads the prompt with, or None."""
        return None

    # Prompts
    @abc.abstractmethod
    def prompt(self, question: str, num_images: int = 1) -> str:
        """The paper-exact prompt of a question over `num_images` images."""

    @abc.abstractmethod
    def prompt_inputs(self, model, prompt: str, num_images: int) -> tuple[list[int], tuple[np.ndarray, ...]]:
        """LM token ids with image placeholders, and the extra inputs of `encode_images` per image [n, ...]."""

    def generation_inputs(self, model, images: list, prompt: str, vicrop: bool = False) -> GenerationInputs:
        """The inputs of `generate` for a prompt over images (anything `load_image` reads); `vicrop`: as ViCrop's
        answers see them (a family may give them another image budget than `generate`)."""
        ids, image_text = self.prompt_inputs(model, prompt, len(images))
        return GenerationInputs(ids, (preprocess_batch(images, model.image_config), *image_text))

    def prompt_arrays(self, model, prompts: list[str], num_images: int = 1) -> list[PromptArrays]:
        """Prompts tokenized and right-padded to one common bucket, so they stack into a batch."""
        encoded = [self.prompt_inputs(model, prompt, num_images) for prompt in prompts]
        bucket = bucket_length(max(len(ids) for ids, _ in encoded))
        # the image encoder's own text (InstructBLIP's Q-Former prompt, zero-padded and masked) to the longest
        text_length = [max((text[i].shape[-1] for _, text in encoded), default=0) for i in range(len(encoded[0][1]))]
        arrays = []
        for ids, image_text in encoded:
            padded = np.zeros(bucket, np.int32)
            padded[: len(ids)] = ids
            texts = tuple(np.pad(text[0], (0, length - text.shape[-1]))
                          for text, length in zip(image_text, text_length))
            arrays.append(PromptArrays(padded, np.int32(len(ids)), texts))
        return arrays

    def plain_inputs(self, model, images: list, questions: list[str]) -> tuple[Any, PromptArrays]:
        """A batch's images and question prompts over them alone, stacked on a leading axis."""
        prompts = self.prompt_arrays(model, [self.prompt(q) for q in questions])
        return preprocess_batch(images, model.image_config), stack_arrays(prompts)

    def map_grid(self, model, image_size: tuple[int, int]) -> tuple[int, int]:
        """The (gh, gw) of an image's map (a fixed grid here)."""
        return (model.config.vision.grid_size,) * 2

    def host_map(self, model, image, importance: np.ndarray) -> np.ndarray:
        """A map program's output as the map [gh, gw] of `image` (already so for fixed-grid families)."""
        return importance

    def crop_size(self, config: Any) -> int:
        """The side of the smallest crop box (the paper's: the model's input resolution)."""
        return config.image_size

    def prompt_problem(self, model, prompt: str) -> str | None:
        """Why a prompt cannot run beyond the LM's length limit (checked by the caller), or None."""
        return None

    def prefix_tokens(self, model) -> int | None:
        """The tokens before the first image's positions in the prefix that every prompt of a question shares
        (the text and the first image: its KV cache is then computed once), or None where the image's features
        depend on the prompt."""
        return None

    # Image geometry
    def processor_box(self, box: jax.Array) -> jax.Array:
        """The part of a crop box [4] that the image processor keeps (all of it unless it crops)."""
        return box

    # Maps
    def default_layer(self, num_layers: int) -> int:
        """The map layer of a model of this depth: the paper's (14 LLaVA, 15 InstructBLIP), or the middle layer of
        a shallower model."""
        return min(self.default_map_layer, num_layers // 2)

    def check_map_options(self, config: Any, method) -> None:
        """Family-specific range checks of a map method's options (clear errors before compiling)."""

    def map_features(self, module: nn.Module, pixels: jax.Array, prompt: PromptArrays, method) -> jax.Array:
        """Inside `module.apply`: one image's LM features [1, M, D] for a map pass, the map's layers captured."""
        return module.encode_images(pixels[None], *(text[None] for text in prompt.image_text))

    def image_features(self, module: nn.Module, params: Any, pixels: jax.Array, prompt: PromptArrays) -> jax.Array:
        """The LM features [M, D] of one prompt's image(s) (pixels [H,W,3] of one image here)."""
        return module.apply({"params": params}, pixels[None], *(text[None] for text in prompt.image_text),
                            method="encode_images")[0]

    # The device pipeline's answers (`vicrop/_pipeline.py`): crops, their features, the prompts over them
    def image_bucket(self, side: int) -> int:
        """The padded length of a full-resolution image's side on the device: the next multiple of 256 px (the
        crop reads a window around its box, so padding costs little but memory; a tight bucket keeps the
        batch's crops cheap where a box spans most of the image)."""
        return -(-side // IMAGE_BUCKET) * IMAGE_BUCKET

    def map_batch(self, model, images: list, questions: list[str], method) -> tuple[Any, PromptArrays,
                                                                                    PromptArrays, Any]:
        """A batch's map inputs, stacked: (pixels, question prompts, general prompts, pure-grad's masks or
        None), in one image size and one prompt bucket."""
        *question_arrays, general = self.prompt_arrays(
            model, [self.prompt(q) for q in questions] + [self.prompt(method.general_question)])
        high_pass = [method.high_pass(image, model.config.image_size) for image in images]
        return (preprocess_batch(images, model.image_config), stack_arrays(question_arrays),
                stack_arrays([general] * len(images)), None if high_pass[0] is None else np.stack(high_pass))

    def answer_batch_prompts(self, model, images: list, questions: list[str], counts: tuple[int, ...],
                             box_sizes: list[set[tuple[int, int]]]
                             ) -> tuple[tuple[PromptArrays, ...], PromptArrays, Any, Any]:
        """A batch's answer prompts, stacked: per crop count the prompts over the original and that many crops,
        the prompts over the original alone, and what a family at native resolution needs to size its crops on
        the device from the box sizes (w, h) each image may meet (the crop sizes with their processed sizes, and
        the static `CropGeometry`; None, None here)."""
        with_crops = tuple(stack_arrays(self.prompt_arrays(model, [self.prompt(q, 1 + count) for q in questions],
                                                           num_images=1 + count))
                           for count in counts)
        return with_crops, stack_arrays(self.prompt_arrays(model, [self.prompt(q) for q in questions])), None, None

    def answer_pixels(self, model, images: list) -> Any:
        """The originals as the answers' encoder takes them, stacked (as `map_batch` makes them)."""
        return preprocess_batch(images, model.image_config)

    def crop_views(self, static, crop, boxes: jax.Array, dtype) -> Any:
        """The encoder's inputs [K, ...] of the boxes [K, 4] of one record's full-resolution image (`CropInputs`),
        made as the image processor would make them (a loop over K, not vmap: the crop's window branch stays a
        branch)."""
        size = static.config.image_size

        def one(box):
            pixels = crop_and_resize_jax(crop.image, crop.image_size, self.processor_box(box), (size, size))
            return normalize_crop(pixels, static.normalization).astype(dtype)

        return jnp.stack([one(boxes[k]) for k in range(boxes.shape[0])])

    def answer_features(self, module: nn.Module, params: Any, pixels: jax.Array, crops: Any, prompt: PromptArrays
                        ) -> tuple[ImageFeatures, ImageFeatures]:
        """The features of the original (pixels, as the map read it) and of the crops ([K] leading) for the
        answers, each image encoded with the prompt's image text."""
        images = jnp.concatenate([pixels[None], crops])
        text = tuple(jnp.broadcast_to(t, (images.shape[0], *t.shape)) for t in prompt.image_text)
        features = module.apply({"params": params}, images, *text, method="encode_images")
        return ImageFeatures(features[0]), ImageFeatures(features[1:])

    def crop_features(self, module: nn.Module, params: Any, crops: Any) -> ImageFeatures:
        """The features [K, M, D] of crops whose original is already encoded (a family with a shared prefix)."""
        return ImageFeatures(module.apply({"params": params}, crops, method="encode_images"))

    def original_features(self, module: nn.Module, params: Any, pixels: Any, prompt: PromptArrays
                          ) -> ImageFeatures:
        """The features of the original image (a family with a shared prefix)."""
        return ImageFeatures(module.apply({"params": params}, pixels[None], method="encode_images")[0])

    def split_prompt(self, config: Any, prompt: PromptArrays, images: list[ImageFeatures], prefix_tokens: int
                     ) -> PromptSplit:
        """A prompt over `images` (the original first) cut after the shared prefix: every image has its fixed
        token count, so the cut is static."""
        cut = prefix_tokens + images[0].features.shape[0]
        later = [image.features for image in images[1:]] or [images[0].features]  # a suffix without images
        return PromptSplit(PromptArrays(prompt.ids[:cut], jnp.int32(cut)),
                           PromptArrays(prompt.ids[cut:], prompt.length - cut), jnp.concatenate(later))

    def answer_prompt(self, config: Any, prompt: PromptArrays, images: list[ImageFeatures]
                      ) -> tuple[PromptArrays, jax.Array]:
        """A prompt over these images as the LM takes it, and their features [P, D] in the order of its image
        positions (fixed token counts: the prompt as built on the host, the features concatenated)."""
        return prompt, jnp.concatenate([image.features for image in images])

    def map_canvases(self, config: Any, maps: jax.Array, prompt: PromptArrays, geometry
                     ) -> tuple[jax.Array, jax.Array | None]:
        """A map program's maps [C, ...] as grids [C, gh, gw] for the box selection, and the grid's size [2] where
        the grids are padded canvases (None: they are the maps' own grids)."""
        return maps, None

    def pixel_gradient_map(self, config: Any, gradients: jax.Array, high_pass: jax.Array,
                           prompt: PromptArrays) -> jax.Array:
        """pure-grad's map from the score gradients of the question and the general prompt with respect to the
        pixels [2, ...]: the ratio of their per-pixel L2 norms, times the high-pass mask, block-mean over patches."""
        norms = jnp.linalg.norm(gradients.astype(jnp.float32), axis=-1)
        return block_mean(norms[0] / norms[1] * high_pass, config.vision.patch_size)

    @abc.abstractmethod
    def attention_map(self, config: Any, read: ReadAttention, query_row, prompt: PromptArrays, method) -> jax.Array:
        """The grid map [gh, gw] (float32) from the sown (or gradient-weighted) attention of one prompt pass."""
