"""Device twins of Qwen2.5-VL's host layout: an image's patch rows (`qwen_preprocessing._patchify`), its patch
positions, image and window ids (`qwen_vit.vision_patches`) and a prompt's multimodal rotary positions
(`families.qwen2_5_vl.rope_positions`), for an image whose size is only known inside a jitted program.

Axis letters: N patch rows (a static budget, a multiple of merge**2), F flattened patch (C * T * P * P),
Hc and Wc the canvas in pixels, C channels, T prompt tokens (padded), I images of a prompt.

A crop made on the device has a traced size, so its patch grid (h, w) is traced while every shape stays static:
the image fills the top-left h*P x w*P pixels of a fixed canvas, and its h*w patch rows the first rows of a fixed
budget N, the padding after them as the host pads (zero patches, image and window id -1, position 0). All
functions are pure jnp, take the grid as int32 arrays, and vmap over a batch of grids into one program. They
cannot check traced values: grids must be multiples of the merge size that fit the canvas and the budget, as
the host functions check.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vicrop_jax.nn.qwen_vit import QwenVisionConfig


class ImageLayout(NamedTuple):
    """One image's rows of `VisionPatches` (positions, image_ids, window_ids), and its window count."""

    positions: jax.Array  # [N, 2] int32 (row, col) of the patch in the image's patch grid, 0 for padding
    image_ids: jax.Array  # [N] int32 image id, -1 for padding
    window_ids: jax.Array  # [N] int32 window_offset + the image's own window, -1 for padding
    windows: jax.Array  # int32 scalar: the image's window count, the next image's window_offset when packing


def _check_budget(length: int, config: QwenVisionConfig) -> None:
    if length < config.merge_unit or length % config.merge_unit:
        raise ValueError(f"patch budget {length} must be a positive multiple of {config.merge_unit} (merge**2)")


def _patch_coordinates(grid_hw: jax.Array, length: int, merge: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(row, col) in the patch grid of each of `length` rows in the processor's order (merge units row-major, the
    merge x merge patches of a unit together, row-major), and whether the row holds one of the h*w patches."""
    h, w = grid_hw[0], grid_hw[1]
    index = jnp.arange(length, dtype=jnp.int32)
    unit, within = jnp.divmod(index, merge * merge)
    unit_row, unit_col = jnp.divmod(unit, jnp.maximum(w // merge, 1))
    in_row, in_col = jnp.divmod(within, merge)
    return unit_row * merge + in_row, unit_col * merge + in_col, index < h * w


def patchify_jax(pixels: jax.Array, grid_hw: jax.Array, length: int, config: QwenVisionConfig) -> jax.Array:
    """pixels [Hc, Wc, C] (normalised; the image is the top-left h*P x w*P pixels), grid_hw int32 [2] (h, w) in
    patches -> patch rows [N, F]: the host's `_patchify` rows of the image, then zero rows up to N = `length`.

    Each row gathers one P x P block at its computed (row, col), so the canvas outside the image is never read.
    """
    patch, frames = config.patch_size, config.temporal_patch_size
    height, width, channels = pixels.shape
    if height % patch or width % patch or channels != config.in_channels:
        raise ValueError(f"canvas {pixels.shape} must be whole patches of {patch} pixels with "
                         f"{config.in_channels} channels")
    _check_budget(length, config)
    grid_hw = jnp.asarray(grid_hw, jnp.int32)
    rows, cols, valid = _patch_coordinates(grid_hw, length, config.spatial_merge_size)
    blocks = pixels.reshape(height // patch, patch, width // patch, patch, channels).transpose(0, 2, 4, 1, 3)
    picked = blocks[jnp.where(valid, rows, 0), jnp.where(valid, cols, 0)]  # [N, C, P, P]
    # a still image is a clip of identical frames, the time axis just after the channel
    clip = jnp.broadcast_to(picked[:, :, None], (length, channels, frames, patch, patch)).reshape(length, -1)
    return jnp.where(valid[:, None], clip, jnp.zeros((), pixels.dtype))


def image_layout_jax(grid_hw: jax.Array, length: int, config: QwenVisionConfig, image_id: jax.Array | int = 0,
                     window_offset: jax.Array | int = 0) -> ImageLayout:
    """grid_hw int32 [2] (h, w) in patches -> the layout `vision_patches` gives that image's rows, padded to N =
    `length`; windows are numbered from `window_offset`, row-major over the image's windows of
    `window_merge_units` merge units a side (partial ones at the right and bottom edges).

    To pack several images as `vision_patches` does, image k takes image_id k and the window_offset of the
    windows counts of images 0..k-1, and its rows go after theirs.
    """
    _check_budget(length, config)
    merge, window = config.spatial_merge_size, config.window_merge_units
    grid_hw = jnp.asarray(grid_hw, jnp.int32)
    rows, cols, valid = _patch_coordinates(grid_hw, length, merge)
    windows_w = -(-(grid_hw[1] // merge) // window)
    windows = -(-(grid_hw[0] // merge) // window) * windows_w
    own_window = (rows // merge // window) * windows_w + cols // merge // window
    return ImageLayout(
        jnp.where(valid[:, None], jnp.stack([rows, cols], axis=-1), 0),
        jnp.where(valid, jnp.asarray(image_id, jnp.int32), -1),
        jnp.where(valid, own_window + jnp.asarray(window_offset, jnp.int32), -1),
        windows,
    )


def rope_positions_jax(ids: jax.Array, image_token_id: int, grids: jax.Array, length: jax.Array | int
                       ) -> tuple[jax.Array, jax.Array]:
    """ids int32 [T] (a prompt right-padded, `length` real tokens), grids int32 [I, 2] the images' MERGED token
    grids (h, w), in prompt order -> the multimodal rotary positions [3, T] int32 and the answer's offset, as the
    host's `rope_positions(config, ids[:length], [(1, merge * h, merge * w), ...])` (which takes patch grids).

    The image tokens must form the images' blocks of h*w tokens in order (adjacent blocks allowed). A (0, 0) grid
    is an image of no tokens, so prompts with fewer images can share one program. Tokens after `length` are read
    as text (whatever their ids): they take the positions the answer's tokens would, slot + offset on all three
    axes (the host pads with 0).

    Vectorised: a token's position follows from the image tokens before it. Text advances all axes by one, an
    image by the longer side of its grid, so a token starts at (text tokens before it) + (the longer sides of
    the images before it); an image token adds its (row, col) in its image.
    """
    ids = jnp.asarray(ids, jnp.int32)
    grids = jnp.asarray(grids, jnp.int32).reshape(-1, 2)
    h, w = grids[:, 0], grids[:, 1]
    index = jnp.arange(ids.shape[0], dtype=jnp.int32)
    is_image = (ids == image_token_id) & (index < length)
    seen = (jnp.cumsum(is_image) - is_image).astype(jnp.int32)  # image tokens before each token
    zero = jnp.zeros(1, jnp.int32)
    ends = jnp.cumsum(h * w)
    done = jnp.sum(seen[:, None] >= ends[None, :], axis=1)  # images wholly before; an image token's own image
    advance = jnp.concatenate([zero, jnp.cumsum(jnp.maximum(h, w))])[done]
    start = index - seen + advance
    # a sentinel image for the text after the last one keeps the gathers in bounds (and allows I = 0)
    first_token = jnp.concatenate([zero, ends])[done]
    width = jnp.maximum(jnp.concatenate([w, jnp.ones(1, jnp.int32)])[done], 1)
    row, col = jnp.divmod(seen - first_token, width)
    positions = jnp.stack([start, start + jnp.where(is_image, row, 0), start + jnp.where(is_image, col, 0)])
    # the last position is the text count + the longer sides - 1, whether the prompt ends in text or an image
    offset = jnp.sum(jnp.maximum(h, w) - h * w).astype(jnp.int32)
    return positions.astype(jnp.int32), offset
