"""Qwen2.5-VL: each image at its own resolution (`smart_resize`), one `<|image_pad|>` per image expanded to its
merged-token count, rotary positions on three axes (`rope_positions`), a chat-format prompt.

On the device an image is its patch rows padded to a bucket (`pixels` [N, F]); the layout of the patches (their
grid positions, images, windows) travels with each prompt (`PromptArrays.image_text`), so that pure-grad
differentiates the patches alone. A map program returns the map over the bucket's merged tokens [N / 4], read on
the host as the image's own token grid (`host_map`): the grid, and so the crop's size and token count, differ
per image, and the crops are made on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax.numpy as jnp
import numpy as np

from vicrop_jax.families._base import (Family, GenerationInputs, PromptArrays, expand_image_markers, head_mean,
                                       stack_arrays)
from vicrop_jax.nn.decoding import bucket_length
from vicrop_jax.nn.llama import ATTENTION_PROBS
from vicrop_jax.nn.qwen2_5_vl import QwenVL, QwenVLConfig
from vicrop_jax.nn.qwen_vit import VisionPatches, vision_patches
from vicrop_jax.prompts import QWEN_IMAGE, qwen2_5_vl_prompt
from vicrop_jax.qwen_preprocessing import (QwenImage, QwenImageProcessorConfig, image_grid, preprocess_qwen,
                                           resized_size)
from weights_conversion.qwen2_5_vl_table import QWEN_KEY_ALIASES, qwen2_5_vl_table

PATCH_BUCKET = 256  # a prompt's patches are padded to a multiple of this (64 merged tokens): one compile per bucket
VICROP_MAX_PIXELS = 256 * 28 * 28  # the release's image budget for Qwen2.5-VL (at most 256 merged tokens)
CROP_SIZE = 224  # the release's smallest crop box for Qwen2.5-VL
RELEASE_DEPTH = 28  # Qwen2.5-VL-7B's LM layers, for which the release chose map layer 22


def patch_bucket(patches: int) -> int:
    return max(PATCH_BUCKET, -(-patches // PATCH_BUCKET) * PATCH_BUCKET)


def prompt_bucket(config: QwenVLConfig, ids: Sequence[int], patches: int) -> int:
    """The padded length of a prompt over images padded to `patches` rows: the length it would have if its images
    filled their bucket, so that a patch bucket and a question's length bucket fix the program's shapes (the
    image's own token count, which varies within a patch bucket, does not)."""
    text = len(ids) - sum(1 for token in ids if token == config.image_token_id)
    return bucket_length(text + patches // config.merge_unit)


def merged_grid(config: QwenVLConfig, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """An image's grid of patches (t, h, w) -> its grid of LM tokens."""
    merge = config.vision.spatial_merge_size
    return grid[0], grid[1] // merge, grid[2] // merge


def image_tokens(config: QwenVLConfig, grid: tuple[int, int, int]) -> int:
    """The LM tokens of an image of patch grid (t, h, w)."""
    return int(np.prod(merged_grid(config, grid)))


def rope_positions(config: QwenVLConfig, ids: Sequence[int], grids: Sequence[tuple[int, int, int]]
                   ) -> tuple[np.ndarray, int]:
    """Multimodal rotary positions [3, T] of a prompt's tokens, and how far the answer's positions run ahead of
    its slots, as transformers' `get_rope_index` makes them for still images: text advances all three axes by
    one; an image's tokens take (start, start + row, start + col); the text after it starts at start + the
    longer side of its token grid."""
    ids = np.asarray(ids)
    positions = np.zeros((3, len(ids)), np.int64)
    is_image = ids == config.image_token_id
    grids = iter(grids)
    index, current = 0, 0
    while index < len(ids):
        if not is_image[index]:
            positions[:, index] = current
            index, current = index + 1, current + 1
            continue
        t, h, w = merged_grid(config, next(grids))
        rows, cols = np.divmod(np.arange(t * h * w) % (h * w), w)
        stop = index + t * h * w
        positions[0, index:stop] = current + np.arange(t * h * w) // (h * w)
        positions[1, index:stop] = current + rows
        positions[2, index:stop] = current + cols
        index, current = stop, current + max(h, w)
    return positions.astype(np.int32), int(positions.max(initial=-1)) + 1 - len(ids)


def patch_rows(values: np.ndarray, patch: int, merge: int) -> np.ndarray:
    """A per-pixel array [H, W] of the resized image -> [N, P, P] in the processor's patch order (merge units
    together), so that it lines up with the patch rows."""
    height, width = values.shape
    blocks = values.reshape(height // patch // merge, merge, patch, width // patch // merge, merge, patch)
    return blocks.transpose(0, 3, 1, 4, 2, 5).reshape(-1, patch, patch)


@dataclasses.dataclass(frozen=True)
class QwenFamily(Family):
    fixed_resolution: ClassVar[bool] = False
    # ViCrop's image budget (maps and answers, the release's), never above the checkpoint's processor's;
    # `generate` uses the processor's own
    vicrop_max_pixels: int = VICROP_MAX_PIXELS

    def pixel_budget(self, model) -> int:
        """The most pixels ViCrop's passes give an image (original or crop)."""
        return min(self.vicrop_max_pixels, model.image_config.max_pixels)

    def read_image_config(self, processor: dict[str, Any]) -> QwenImageProcessorConfig:
        return QwenImageProcessorConfig.from_preprocessor_config(processor)

    def init_inputs(self, config: QwenVLConfig) -> tuple[Any, ...]:
        """One image of one merged token (a merge unit of patches) and its placeholder."""
        unit, merge = config.merge_unit, config.vision.spatial_merge_size
        rows = np.zeros((unit, config.vision.patch_features), np.float32)
        patches = vision_patches([rows], [(1, merge, merge)], config.vision, unit)
        batch = VisionPatches(*(np.asarray(leaf)[None] for leaf in patches))
        return np.full((1, 1), config.image_token_id, np.int32), batch, np.zeros((1, 3, 1), np.int32)

    def prompt(self, question: str, num_images: int = 1) -> str:
        return qwen2_5_vl_prompt(question, num_images)

    def most_image_tokens(self, model) -> int:
        """The LM tokens of an image at ViCrop's largest size (a bound for checks made before the images are
        read; `generate` checks the prompt it builds)."""
        return self.pixel_budget(model) // model.image_config.factor**2

    def prompt_inputs(self, model, prompt: str, num_images: int, token_counts: Sequence[int] | None = None):
        """Each `<|image_pad|>` becomes one position per merged token of its image (`token_counts`, in order;
        without them, the most an image can take); no extra image inputs."""
        counts = list(token_counts) if token_counts is not None else [self.most_image_tokens(model)] * num_images
        if len(counts) != num_images:
            raise ValueError(f"{len(counts)} token counts for {num_images} image(s)")
        return expand_image_markers(model.tokenizer.encode(prompt), model.config.image_token_id, counts, QWEN_IMAGE,
                                    "qwen2_5_vl_prompt"), ()

    def image_patches(self, model, images: Sequence[QwenImage], length: int | None = None) -> VisionPatches:
        """One prompt's processed images as the vision tower's input, padded to `length` (default: its bucket)."""
        total = sum(len(image.patches) for image in images)
        return vision_patches([image.patches for image in images], [image.grid for image in images],
                              model.config.vision, length or patch_bucket(total))

    def image_prompts(self, model, image_sets: Sequence[Sequence[Any]], prompts: Sequence[str],
                      max_pixels: int | None = None) -> tuple[np.ndarray, list[PromptArrays]]:
        """Each prompt over its images: their patch rows, all padded to one bucket [n, N, F], and the prompts, all
        padded to one length bucket, with their images' layout, rotary positions and answer offsets."""
        processed = [[preprocess_qwen(image, model.image_config, max_pixels) for image in images]
                     for images in image_sets]
        length = max(patch_bucket(sum(len(image.patches) for image in images)) for images in processed)
        encoded = []
        for images, prompt in zip(processed, prompts):
            tokens = [image_tokens(model.config, image.grid) for image in images]
            ids, _ = self.prompt_inputs(model, prompt, len(images), tokens)
            encoded.append((ids, self.image_patches(model, images, length), images))
        bucket = max(prompt_bucket(model.config, ids, length) for ids, _, _ in encoded)
        patches, arrays = [], []
        for ids, layout, images in encoded:
            positions, offset = rope_positions(model.config, ids, [image.grid for image in images])
            padded = np.zeros(bucket, np.int32)
            padded[: len(ids)] = ids
            arrays.append(PromptArrays(padded, np.int32(len(ids)), tuple(layout[1:]),
                                       np.pad(positions, ((0, 0), (0, bucket - len(ids)))), np.int32(offset)))
            patches.append(layout.patches)
        return np.stack(patches), arrays

    def plain_inputs(self, model, images, questions):
        patches, prompts = self.image_prompts(model, [[image] for image in images],
                                              [self.prompt(q) for q in questions], self.pixel_budget(model))
        return patches, stack_arrays(prompts)

    def map_inputs(self, model, image, question: str, method):
        """The image at ViCrop's budget; pure-grad's mask on the resized image, in patch rows [N, P, P]."""
        patches, (question_arrays, general_arrays) = self.image_prompts(
            model, [[image], [image]], [self.prompt(question), self.prompt(method.general_question)],
            self.pixel_budget(model))
        size = resized_size(*image.size, model.image_config, self.pixel_budget(model))
        high_pass = method.high_pass(image, size)
        if high_pass is not None:
            vision = model.config.vision
            rows = patch_rows(high_pass, vision.patch_size, vision.spatial_merge_size)
            high_pass = np.pad(rows, ((0, patches.shape[1] - len(rows)), (0, 0), (0, 0)))
        return patches[0], question_arrays, general_arrays, high_pass

    def host_map(self, model, image, importance: np.ndarray) -> np.ndarray:
        """The map over the bucket's merged tokens [..., M] -> the image's token grid [..., gh, gw]."""
        grid = image_grid(*image.size, model.image_config, self.pixel_budget(model))
        _, gh, gw = merged_grid(model.config, grid)
        return importance[..., : gh * gw].reshape(*importance.shape[:-1], gh, gw)

    def default_layer(self, num_layers: int) -> int:
        """The release's layer 22 for the 7B model (28 layers), the middle layer for other depths."""
        return self.default_map_layer if num_layers == RELEASE_DEPTH else num_layers // 2

    def crop_size(self, config: QwenVLConfig) -> int:
        return CROP_SIZE

    def map_features(self, module, pixels, prompt: PromptArrays, method):
        return module.encode_images(VisionPatches(pixels, *prompt.image_text))[None]

    def image_features(self, module, params, pixels, prompt: PromptArrays):
        return module.apply({"params": params}, VisionPatches(pixels, *prompt.image_text), method="encode_images")

    def attention_map(self, config: QwenVLConfig, read, query_row, prompt: PromptArrays, method):
        """The LM layer's attention from the query row to the image's merged tokens, over the bucket's M token
        slots [M] (1 beyond the image's own tokens, which the host drops)."""
        slots = prompt.image_text[0].shape[0] // config.merge_unit
        is_image = prompt.ids == config.image_token_id
        where = jnp.argmax(is_image) + jnp.arange(slots)
        row = jnp.take(read(ATTENTION_PROBS), query_row, axis=1)  # [N, S]
        attention = head_mean(jnp.take(row, jnp.minimum(where, row.shape[1] - 1), axis=1), method.heads)
        return jnp.where(jnp.arange(slots) < is_image.sum(), attention, 1.0).astype(jnp.float32)

    def pixel_gradient_map(self, config: QwenVLConfig, gradients, high_pass, prompt: PromptArrays):
        """pure-grad on the patch rows [2, N, C*T*P*P]: a pixel's gradient sums over the image's repeated frames;
        the ratio of the per-pixel norms, masked, is averaged over each merged token's pixels -> [N / 4]."""
        vision = config.vision
        channels, frames, patch = vision.in_channels, vision.temporal_patch_size, vision.patch_size
        pixels = gradients.astype(jnp.float32).reshape(2, -1, channels, frames, patch, patch).sum(axis=3)
        norms = jnp.linalg.norm(pixels, axis=2)  # [2, N, P, P]; zero in the padding rows, which the mask drops
        kept = high_pass > 0
        ratio = jnp.where(kept, norms[0] / jnp.where(kept, norms[1], 1.0), 0.0)
        return ratio.reshape(-1, config.merge_unit * patch * patch).mean(axis=1)

    def generation_inputs(self, model, images, prompt: str, vicrop: bool = False) -> GenerationInputs:
        budget = self.pixel_budget(model) if vicrop else None
        processed = [preprocess_qwen(image, model.image_config, budget) for image in images]
        tokens = [image_tokens(model.config, image.grid) for image in processed]
        ids, _ = self.prompt_inputs(model, prompt, len(images), tokens)
        positions, offset = rope_positions(model.config, ids, [image.grid for image in processed])
        limit = model.config.text.max_position_embeddings
        if len(ids) > limit:
            raise ValueError(f"prompt too long: {len(ids)} tokens with its images, the model allows {limit}; give "
                             "smaller images or a processor with a smaller max_pixels")
        patches = self.image_patches(model, processed)
        bucket = prompt_bucket(model.config, ids, len(patches.patches))
        return GenerationInputs(ids, (patches,), positions, offset, bucket)


QWEN2_5_VL = QwenFamily(name="qwen2_5_vl", config_class=QwenVLConfig, module_class=QwenVL,
                        conversion_table=qwen2_5_vl_table, default_map_layer=22, key_aliases=QWEN_KEY_ALIASES)
