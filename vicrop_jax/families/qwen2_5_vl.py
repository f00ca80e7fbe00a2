"""Qwen2.5-VL: each image at its own resolution (`smart_resize`), one `<|image_pad|>` per image expanded to its
merged-token count, rotary positions on three axes (`rope_positions`), a chat-format prompt.

On the device an image is its patch rows padded to a bucket (`pixels` [N, F]); the layout of the patches (their
grid positions, images, windows) travels with each prompt (`PromptArrays.image_text`), so that pure-grad
differentiates the patches alone. A map program returns the map over the bucket's merged tokens [N / 4], laid on
the image's own token grid inside a canvas for the box selection (`map_canvases`) and on the host (`host_map`).

A crop's size, and so its token count, follows its box, which is only known on the device. The host lists the box
sizes a record may meet and their processed sizes (`crop_sizes`: the box selection's few sizes, or the given
boxes'), so the device resizes each crop to exactly the processor's size inside static shapes (`CropGeometry`,
powers of two, so that a dataset of any sizes compiles few programs). The prompts hold each crop's placeholders
at the most tokens a crop can take and are cut to the crop's count on the device (`compact_image_blocks`), with
their rotary positions computed there; the prefix [chat template, original image] is shared by every prompt of
a record, its true length traced (`split_prompt`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vicrop_jax.families._base import (IMAGE_BUCKET, Family, GenerationInputs, ImageFeatures, PromptArrays,
                                       PromptSplit, expand_image_markers, head_mean, stack_arrays)
from vicrop_jax.nn.decoding import bucket_length, stack_prompts
from vicrop_jax.nn.llama import ATTENTION_PROBS
from vicrop_jax.nn.qwen2_5_vl import QwenVL, QwenVLConfig
from vicrop_jax.nn.qwen_layout import image_layout_jax, patchify_jax, rope_positions_jax
from vicrop_jax.nn.qwen_vit import VisionPatches, vision_patches
from vicrop_jax.preprocessing import normalize_crop
from vicrop_jax.prompts import QWEN_IMAGE, qwen2_5_vl_prompt
from vicrop_jax.qwen_preprocessing import (QwenImage, QwenImageProcessorConfig, image_grid, preprocess_qwen,
                                           resized_size)
from vicrop_jax.crop_resize import crop_and_resize_into_jax
from weights_conversion.qwen2_5_vl_table import QWEN_KEY_ALIASES, qwen2_5_vl_table

PATCH_BUCKET = 256  # a prompt's patches are padded to this (64 merged tokens) times a power of two
MAP_GRID = 8  # the box selection's square canvas: the token grid's long side rounded up to this times a power of 2
VICROP_MAX_PIXELS = 256 * 28 * 28  # the release's image budget for Qwen2.5-VL (at most 256 merged tokens)
CROP_SIZE = 224  # the release's smallest crop box for Qwen2.5-VL
RELEASE_DEPTH = 28  # Qwen2.5-VL-7B's LM layers, for which the release chose map layer 22


def power_of_two_at_least(value: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(value, 1.0))))


def patch_bucket(patches: int) -> int:
    """The patch rows an image set is padded to: PATCH_BUCKET times a power of two."""
    return PATCH_BUCKET * power_of_two_at_least(patches / PATCH_BUCKET)


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


@flax.struct.dataclass
class CropGeometry:
    """The static shapes of a batch's crops on the device (a pytree without leaves, so programs key on it): the
    canvas (h, w) a crop is resized into, the patch rows it is padded to, the largest downscale of a box to its
    processed size (a power of two), and the canvas (gh, gw) of the original's token grid for the box selection."""

    canvas: tuple[int, int] = flax.struct.field(pytree_node=False)
    patches: int = flax.struct.field(pytree_node=False)
    max_scale: int = flax.struct.field(pytree_node=False)
    map_grid: tuple[int, int] = flax.struct.field(pytree_node=False)


class CropViews(NamedTuple):
    """Crops as the vision tower takes them, each padded to the batch's patch budget [K, N, ...], and their
    merged token grids [K, 2] (rows, cols)."""

    patches: VisionPatches
    grids: jax.Array


def layout_grid(config: QwenVLConfig, layout: tuple[jax.Array, ...]) -> jax.Array:
    """The merged token grid [2] (rows, cols) of the first image of a packed patch layout (positions, image ids,
    window ids)."""
    positions, image_ids, _ = layout
    rows_cols = jnp.max(jnp.where((image_ids == 0)[:, None], positions, -1), axis=0) + 1
    return rows_cols // config.vision.spatial_merge_size


def compact_image_blocks(prompt: PromptArrays, image_token_id: int, counts: jax.Array) -> PromptArrays:
    """The prompt with each image's block of placeholders cut to its image's token count (counts [I], in order):
    the host builds a crop's block at the most tokens a crop can take; the tokens after it move up."""
    ids = prompt.ids
    is_image = ids == image_token_id
    starts = is_image & ~jnp.concatenate([jnp.zeros(1, bool), is_image[:-1]])
    block = jnp.cumsum(starts) - 1
    slots = jnp.arange(ids.shape[0])
    within = slots - jax.lax.cummax(jnp.where(starts, slots, 0))  # the position inside its block
    kept = (~is_image | (within < counts[jnp.clip(block, 0, counts.shape[0] - 1)])) & (slots < prompt.length)
    order = jnp.argsort(~kept, stable=True)
    length = jnp.sum(kept).astype(prompt.length.dtype)
    compacted = jnp.where(slots < length, ids[order], 0)
    return prompt._replace(ids=compacted, length=length)


def pack_features(images: list[ImageFeatures], counts: jax.Array) -> jax.Array:
    """The images' features [M_i, D] (each padded) as one array [sum M_i, D] whose first sum(counts) rows are the
    images' own tokens, in order: the rows the prompt's image positions take."""
    features = jnp.concatenate([image.features for image in images])
    sizes = np.cumsum([0] + [image.features.shape[0] for image in images])
    ends = jnp.cumsum(counts)
    rows = jnp.arange(features.shape[0])
    image = jnp.clip(jnp.sum(rows[:, None] >= ends[None, :], axis=1), 0, len(images) - 1)
    source = jnp.asarray(sizes[:-1])[image] + rows - (ends - counts)[image]
    return features[jnp.clip(source, 0, features.shape[0] - 1)]


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

    def map_grid(self, model, image_size: tuple[int, int]) -> tuple[int, int]:
        """The image's merged token grid."""
        _, gh, gw = merged_grid(model.config, image_grid(*image_size, model.image_config, self.pixel_budget(model)))
        return gh, gw

    def host_map(self, model, image, importance: np.ndarray) -> np.ndarray:
        """The map over the bucket's merged tokens [..., M] -> the image's token grid [..., gh, gw]."""
        gh, gw = self.map_grid(model, image.size)
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

    # The device pipeline: crops resized on the device to their processed size, inside a static canvas and patch
    # budget; the prompts' image blocks cut to the crops' token counts there.
    def map_batch(self, model, images, questions, method):
        """Every record's image at ViCrop's budget, all padded to one patch bucket, its question and general
        prompts in one length bucket, pure-grad's masks in patch rows."""
        sets = [[image] for image in images for _ in range(2)]
        prompts = [self.prompt(text) for question in questions for text in (question, method.general_question)]
        patches, arrays = self.image_prompts(model, sets, prompts, self.pixel_budget(model))
        high_pass = [self.patch_mask(model, image, method, patches.shape[1]) for image in images]
        return (patches[0::2], stack_arrays(arrays[0::2]), stack_arrays(arrays[1::2]),
                None if high_pass[0] is None else np.stack(high_pass))

    def image_bucket(self, side: int) -> int:
        """256 px times a power of two: with the crop's other static shapes on the same ladder, a dataset of any
        sizes compiles few programs (a crop reads a window around its box, whatever the padding)."""
        return IMAGE_BUCKET * power_of_two_at_least(side / IMAGE_BUCKET)

    def answer_pixels(self, model, images):
        return self.plain_inputs(model, images, [""] * len(images))[0]

    def patch_mask(self, model, image, method, rows: int) -> np.ndarray | None:
        """pure-grad's mask on the image resized at ViCrop's budget, in patch rows [rows, P, P]."""
        size = resized_size(*image.size, model.image_config, self.pixel_budget(model))
        high_pass = method.high_pass(image, size)
        if high_pass is None:
            return None
        vision = model.config.vision
        patch_mask = patch_rows(high_pass, vision.patch_size, vision.spatial_merge_size)
        return np.pad(patch_mask, ((0, rows - len(patch_mask)), (0, 0), (0, 0)))

    def crop_sizes(self, model, box_sizes) -> list[tuple[int, ...]]:
        """(box w, box h, processed w, processed h) of every box size (w, h) the device may crop."""
        budget = self.pixel_budget(model)
        return [(w, h, *resized_size(w, h, model.image_config, budget)) for w, h in sorted(box_sizes)]

    def answer_batch_prompts(self, model, images, questions, counts, box_sizes):
        """The crops' processed sizes decide the static shapes (`CropGeometry`); each crop's block of placeholders
        is built at the batch's most crop tokens and cut on the device."""
        tables = [self.crop_sizes(model, sizes) for sizes in box_sizes]
        # every static shape on a ladder of powers of two, so that a dataset of any sizes compiles few programs
        rows = [row for table in tables for row in table]
        side = 8 * model.image_config.factor  # the canvas of a crop: 224 px (8 merged tokens) times a power of two
        canvas = (side * power_of_two_at_least(max(h for _, _, _, h in rows) / side),
                  side * power_of_two_at_least(max(w for _, _, w, _ in rows) / side))
        patches = PATCH_BUCKET * power_of_two_at_least(
            max(w * h for _, _, w, h in rows) / model.config.vision.patch_size**2 / PATCH_BUCKET)
        scale = power_of_two_at_least(max(2.0, *(max(bw / w, bh / h) for bw, bh, w, h in rows)))
        grids = [merged_grid(model.config, image_grid(*image.size, model.image_config, self.pixel_budget(model)))
                 for image in images]
        map_grid = (MAP_GRID * power_of_two_at_least(max(max(g[1:]) for g in grids) / MAP_GRID),) * 2
        geometry = CropGeometry(canvas=canvas, patches=patches, max_scale=scale, map_grid=map_grid)
        original_patches, originals = self.image_prompts(model, [[image] for image in images],
                                                         [self.prompt(q) for q in questions], self.pixel_budget(model))
        original_slots = original_patches.shape[1] // model.config.merge_unit
        crop_tokens = patches // model.config.merge_unit
        with_crops = []
        for count in counts:
            encoded = [self.prompt_inputs(model, self.prompt(q, 1 + count), 1 + count,
                                          [int(np.prod(grid))] + [crop_tokens] * count)[0]
                       for q, grid in zip(questions, grids)]
            # as if the original filled its padded slots: the suffix then fits after any cut (`split_prompt`)
            bucket = bucket_length(max(len(ids) - int(np.prod(grid)) + original_slots
                                       for ids, grid in zip(encoded, grids)))
            with_crops.append(stack_arrays([
                PromptArrays(np.pad(np.asarray(ids, np.int32), (0, bucket - len(ids))), np.int32(len(ids)))
                for ids in encoded]))
        width = max(len(table) for table in tables)
        table = np.stack([np.asarray(t + t[-1:] * (width - len(t)), np.int32) for t in tables])
        return tuple(with_crops), stack_arrays(originals), table, geometry

    def crop_views(self, static, crop, boxes, dtype) -> CropViews:
        """Each box resized to its processed size (looked up in `crop.crop_sizes`) in the canvas, normalised and
        cut into patch rows with their layout."""
        geometry, vision = crop.geometry, static.config.vision

        def one(box):
            size = jnp.stack([box[2] - box[0], box[3] - box[1]])
            row = crop.crop_sizes[jnp.argmax(jnp.all(crop.crop_sizes[:, :2] == size, axis=1))]
            resized = jnp.stack([row[3], row[2]])  # (h, w)
            pixels = crop_and_resize_into_jax(crop.image, crop.image_size, box, resized, geometry.canvas,
                                              geometry.max_scale)
            grid = resized // vision.patch_size
            patches = patchify_jax(normalize_crop(pixels, static.normalization), grid, geometry.patches, vision)
            positions, image_ids, window_ids, _ = image_layout_jax(grid, geometry.patches, vision)
            layout = VisionPatches(patches.astype(dtype), positions, image_ids, window_ids)
            return layout, grid // vision.spatial_merge_size

        views = [one(boxes[k]) for k in range(boxes.shape[0])]
        return CropViews(*stack_prompts(*views))

    def prefix_tokens(self, model) -> int:
        """The chat template's tokens before the first `<|image_pad|>` (system turn, user turn, vision start)."""
        return self.prompt_inputs(model, self.prompt(""), 1, [1])[0].index(model.config.image_token_id)

    def original_features(self, module, params, pixels, prompt):
        features = module.apply({"params": params}, VisionPatches(pixels, *prompt.image_text), method="encode_images")
        return ImageFeatures(features, layout_grid(module.config, prompt.image_text))

    def crop_features(self, module, params, crops: CropViews):
        return ImageFeatures(module.apply({"params": params}, crops.patches, method="encode_images"), crops.grids)

    def answer_features(self, module, params, pixels, crops: CropViews, prompt):
        return (self.original_features(module, params, pixels, prompt),
                self.crop_features(module, params, crops))

    def split_prompt(self, config, prompt, images, prefix_tokens):
        """The prompt laid out with its images' token counts (`answer_prompt`); the prefix ends after the
        original's own tokens (traced), at most at its padded count (static), where the suffix's slice starts."""
        original_slots = images[0].features.shape[0]
        laid_out, features = self.answer_prompt(config, prompt, images)
        cut, suffix_slots = prefix_tokens + original_slots, prompt.ids.shape[0] - prefix_tokens - original_slots
        own = images[0].grid[0] * images[0].grid[1]
        start = prefix_tokens + own
        positions = laid_out.positions
        prefix = PromptArrays(laid_out.ids[:cut], start, positions=positions[:, :cut])
        suffix = PromptArrays(jax.lax.dynamic_slice_in_dim(laid_out.ids, start, suffix_slots), laid_out.length - start,
                              positions=jax.lax.dynamic_slice_in_dim(positions, start, suffix_slots, axis=1),
                              position_offset=laid_out.position_offset)
        later = jax.lax.dynamic_slice_in_dim(features, own, features.shape[0] - original_slots)
        return PromptSplit(prefix, suffix, later if later.shape[0] else features)

    def answer_prompt(self, config, prompt, images):
        """The prompt's image blocks cut to the images' token counts, its rotary positions from their grids."""
        grids = jnp.stack([image.grid for image in images])
        counts = grids[:, 0] * grids[:, 1]
        prompt = compact_image_blocks(prompt, config.image_token_id, counts)
        positions, offset = rope_positions_jax(prompt.ids, config.image_token_id, grids, prompt.length)
        return prompt._replace(positions=positions, position_offset=offset), pack_features(images, counts)

    def map_canvases(self, config, maps, prompt, geometry):
        """Maps over the bucket's token slots [C, M] laid on the image's token grid, in a canvas of the batch's
        largest grid."""
        grid = layout_grid(config, prompt.image_text)
        rows, cols = geometry.map_grid
        index = jnp.arange(rows)[:, None] * grid[1] + jnp.arange(cols)[None, :]
        inside = (jnp.arange(rows)[:, None] < grid[0]) & (jnp.arange(cols)[None, :] < grid[1])
        canvases = jnp.where(inside, maps[:, jnp.clip(index, 0, maps.shape[1] - 1)], 0.0)
        return canvases, grid

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
