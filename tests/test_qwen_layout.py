"""The device twins of Qwen2.5-VL's host layout (`vicrop_jax.nn.qwen_layout`) against the host functions they
repeat, exactly: patch rows against `_patchify`, positions and image and window ids against `vision_patches`,
rotary positions against `rope_positions`. Each runs over a batch of different grids (or prompts) in one jitted,
vmapped program, traced once."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from vicrop_jax.families.qwen2_5_vl import rope_positions
from vicrop_jax.nn.llama import LlamaConfig
from vicrop_jax.nn.qwen2_5_vl import QwenVLConfig
from vicrop_jax.nn.qwen_layout import image_layout_jax, patchify_jax, rope_positions_jax
from vicrop_jax.nn.qwen_vit import QwenVisionConfig, _image_layout, vision_patches
from vicrop_jax.qwen_preprocessing import QwenImageProcessorConfig, _patchify

TINY = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32)
# (vision config, canvas side in patches, grids (h, w) in patches): one merge unit, one window, the whole canvas,
# wide, tall, sides that are not whole windows
CASES = {
    "merge2-window4": (QwenVisionConfig(**TINY, window_size=112), 16, [
        (2, 2), (8, 8), (16, 16), (4, 16), (16, 4), (6, 10), (2, 14), (14, 2), (10, 12), (12, 6), (2, 16),
    ]),
    "merge3-window2-one-frame": (
        QwenVisionConfig(**TINY, patch_size=8, spatial_merge_size=3, temporal_patch_size=1, window_size=48), 18, [
            (3, 3), (6, 6), (18, 18), (3, 18), (18, 3), (9, 15), (15, 9), (12, 6), (9, 9), (3, 6),
        ]),
}
IMAGE_TOKEN = 5
TEXT_TOKENS = (100, 200)
PROMPT_LENGTH = 96
MAX_IMAGES = 3
# text runs (counts) and images (merged grids (h, w)) in prompt order: text before, between and after the images,
# prompts that start or end with an image, adjacent images, one-token images, text alone
PROMPTS = [
    [5, (2, 3), 4],
    [0, (4, 4), 7],
    [3, (1, 1), 0],
    [2, (3, 5), 3, (5, 2), 6],
    [4, (2, 2), 0, (6, 1), 1],
    [0, (1, 6), 2, (2, 2), 0],
    [1, (1, 7), 2, (3, 3), 2, (2, 4), 3],
    [0, (2, 5), 0, (4, 3), 5, (1, 2), 0],
    [6, (3, 1), 0, (1, 1), 0, (5, 5), 2],
    [9],
]


@functools.lru_cache(maxsize=None)
def layout_program(name: str):
    """One jitted program over a batch: an image's patches and layout, and a second image's layout packed after
    it; and the list its traces append to."""
    config, side, _ = CASES[name]
    traces = []

    def one(pixels, grid, next_grid):
        traces.append(grid.shape)
        first = image_layout_jax(grid, side * side, config)
        second = image_layout_jax(next_grid, side * side, config, image_id=1, window_offset=first.windows)
        return patchify_jax(pixels, grid, side * side, config), first, second

    return jax.jit(jax.vmap(one)), traces


@pytest.mark.parametrize("name", CASES)
def test_patches_and_layout_match_the_host(name):
    config, side, grids = CASES[name]
    patch, merge, length = config.patch_size, config.spatial_merge_size, side * side
    processor = QwenImageProcessorConfig(patch_size=patch, merge_size=merge,
                                         temporal_patch_size=config.temporal_patch_size)
    program, traces = layout_program(name)
    rs = np.random.RandomState(0)
    for order in (grids, grids[::-1]):  # another batch of grids, the same program
        canvases = rs.randn(len(order), side * patch, side * patch, config.in_channels).astype(np.float32)
        following = order[1:] + order[:1]
        patches, first, second = jax.device_get(program(canvases, np.array(order, np.int32),
                                                        np.array(following, np.int32)))
        for b, ((h, w), (h2, w2)) in enumerate(zip(order, following)):
            rows = _patchify(canvases[b, : h * patch, : w * patch], processor).patches
            rows2 = _patchify(canvases[(b + 1) % len(order), : h2 * patch, : w2 * patch], processor).patches
            host = vision_patches([rows], [(1, h, w)], config, length)
            np.testing.assert_array_equal(patches[b], host.patches, err_msg=f"patches of {(h, w)}")
            for field in ("positions", "image_ids", "window_ids"):
                np.testing.assert_array_equal(getattr(first, field)[b], getattr(host, field),
                                              err_msg=f"{field} of {(h, w)}")
                assert getattr(first, field)[b].dtype == np.int32
            assert first.windows[b] == _image_layout((1, h, w), merge, config.window_merge_units)[2]
            packed = vision_patches([rows, rows2], [(1, h, w), (1, h2, w2)], config, 2 * length)
            real = slice(h * w, h * w + h2 * w2)
            for field in ("positions", "image_ids", "window_ids"):
                np.testing.assert_array_equal(getattr(second, field)[b][: h2 * w2], getattr(packed, field)[real],
                                              err_msg=f"{field} of {(h2, w2)} packed after {(h, w)}")
    assert len(traces) == 1


def host_config(merge: int) -> QwenVLConfig:
    text = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=2, head_dim=16)
    return QwenVLConfig(vision=QwenVisionConfig(**TINY, spatial_merge_size=merge), text=text,
                        image_token_id=IMAGE_TOKEN, vision_start_token_id=3, vision_end_token_id=4)


def prompt_ids(parts, rs) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The token ids of a prompt described by PROMPTS, and its images' merged grids."""
    ids, grids = [], []
    for part in parts:
        if isinstance(part, tuple):
            ids += [IMAGE_TOKEN] * (part[0] * part[1])
            grids.append(part)
        else:
            ids += list(rs.randint(*TEXT_TOKENS, size=part))
    return np.array(ids, np.int32), grids


@functools.lru_cache(maxsize=None)
def rope_program():
    traces = []

    def one(ids, grids, length):
        traces.append(ids.shape)
        return rope_positions_jax(ids, IMAGE_TOKEN, grids, length)

    return jax.jit(jax.vmap(one)), traces


@pytest.mark.parametrize("merge", [2, 3])
def test_rope_positions_match_the_host(merge):
    """Prompts of zero to three images padded with image tokens (which must be read as text past the length), the
    grids padded with (0, 0) to three images."""
    rs = np.random.RandomState(merge)
    prompts = [prompt_ids(parts, rs) for parts in PROMPTS]
    ids = np.full((len(prompts), PROMPT_LENGTH), IMAGE_TOKEN, np.int32)
    grids = np.zeros((len(prompts), MAX_IMAGES, 2), np.int32)
    for b, (tokens, image_grids) in enumerate(prompts):
        ids[b, : len(tokens)] = tokens
        grids[b, : len(image_grids)] = np.reshape(image_grids, (-1, 2))
    lengths = np.array([len(tokens) for tokens, _ in prompts], np.int32)
    program, traces = rope_program()
    positions, offsets = jax.device_get(program(ids, grids, lengths))
    assert positions.dtype == offsets.dtype == np.int32
    for b, (tokens, image_grids) in enumerate(prompts):
        expected, offset = rope_positions(host_config(merge), tokens,
                                          [(1, merge * h, merge * w) for h, w in image_grids])
        np.testing.assert_array_equal(positions[b, :, : len(tokens)], expected, err_msg=str(PROMPTS[b]))
        assert offsets[b] == offset, PROMPTS[b]
        answer = np.arange(len(tokens), PROMPT_LENGTH) + offset
        np.testing.assert_array_equal(positions[b, :, len(tokens):], np.broadcast_to(answer, (3, len(answer))))
    assert len(traces) == 1


def test_rope_positions_of_text_alone():
    """No image axis at all (I = 0): every token on the diagonal, the padding too, no offset."""
    positions, offset = jax.jit(rope_positions_jax, static_argnums=1)(
        np.arange(100, 108, dtype=np.int32), IMAGE_TOKEN, np.zeros((0, 2), np.int32), 6)
    np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(8), (3, 8)))
    assert offset == 0
