"""Qwen2.5-VL vision encoder in Flax linen, aligned with transformers' `Qwen2_5_VisionTransformerPretrainedModel`.

Axis letters: B batch (optional), N patches (padded), U merge units (N / merge**2), D width, H head dim,
F flattened patch (C * T * P * P).

The patches of all images of one prompt come packed in one sequence, in the row order of transformers'
`pixel_values` (per image, merge blocks of merge x merge patches, block-major). transformers gathers the merge
units into windows and attends window by window (or image by image in `fullatt_block_indexes`); here the
tokens keep their order and a mask keeps each query inside its window (or image) instead, so every prompt
padded to the same length N runs one compiled program. Padding rows form a group of their own: they never
reach a real token, and they always see themselves, so nothing is NaN. The masked score of another window
weighs exactly zero after the softmax, so the result equals the windowed one up to summation order; the cost
is attention over all N keys rather than over the window's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vicrop_jax.nn._attention import AttentionKernel, dot_product_attention
from vicrop_jax.nn._config import check_supported, refuse_unhandled
from vicrop_jax.nn.llama import RMSNorm

# Keys of `rope_parameters` the axial vision rotary reads; any other would be a variant it does not implement.
ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta"})


def _int_attribute(hf: dict[str, Any], key: str, default: int) -> int:
    value = hf.get(key, default)
    if not isinstance(value, int):
        raise ValueError(f"vision_config.{key} = {value!r} is not supported by vicrop_jax (one int only)")
    return value


def _rope_theta(hf: dict[str, Any]) -> float:
    """transformers 5 keeps the theta in `rope_parameters` (type "axial"); a flat `rope_theta` is moved there."""
    rope = dict(hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "axial"))
    unknown = sorted(set(rope) - ROPE_KEYS)
    if rope_type != "axial" or unknown:
        raise ValueError(
            f"vision_config.rope_parameters = {rope!r} is not supported by vicrop_jax "
            "(the axial rotary with rope_type and rope_theta only)."
        )
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QwenVisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112  # in pixels: a window is window_size // (spatial_merge_size * patch_size) merge units
    fullatt_block_indexes: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6  # transformers fixes it for norm1, norm2 and the merger's ln_q; no config reads it
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a head dim divisible "
                "by 4 (the 2D rotary gives a quarter of it to each of the row and column frequencies)"
            )
        if self.window_merge_units < 1:
            raise ValueError(
                f"vision window_size {self.window_size} is smaller than one merge unit "
                f"({self.spatial_merge_size} x {self.patch_size} pixels)"
            )

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "QwenVisionConfig":
        """Reads the `vision_config` of a transformers `Qwen2_5_VLConfig` (as transformers 5 saves it, or as the
        published checkpoints name it: `in_chans` and `spatial_patch_size`, which transformers 5 ignores)."""
        check_supported(hf, "vision_config", {"model_type": ("qwen2_5_vl_vision", "qwen2_5_vl", None),
                                             "hidden_act": ("silu", None)})
        refuse_unhandled(hf, "vision_config", {
            "model_type", "hidden_act", "depth", "num_hidden_layers", "hidden_size", "intermediate_size", "num_heads",
            "num_attention_heads", "in_channels", "in_chans", "patch_size", "spatial_patch_size", "spatial_merge_size",
            "temporal_patch_size", "window_size", "out_hidden_size", "fullatt_block_indexes", "rope_parameters",
            "rope_theta",
            "tokens_per_second",  # the temporal positions of video tokens in the LM, not the vision tower's
        })
        # a missing attribute takes transformers' Qwen2_5_VLVisionConfig default, as transformers reads the file
        in_channels = _int_attribute(hf, "in_channels", 3)
        patch_size = _int_attribute(hf, "patch_size", 14)
        for alias, value in (("in_chans", in_channels), ("spatial_patch_size", patch_size)):
            if hf.get(alias, value) != value:
                raise ValueError(
                    f"vision_config.{alias} = {hf[alias]!r} disagrees with the value transformers uses ({value}); "
                    "vicrop_jax refuses the ambiguous config."
                )
        return cls(
            depth=_int_attribute(hf, "depth", hf.get("num_hidden_layers", 32)),
            hidden_size=_int_attribute(hf, "hidden_size", 3584),
            intermediate_size=_int_attribute(hf, "intermediate_size", 3420),
            num_heads=_int_attribute(hf, "num_heads", hf.get("num_attention_heads", 16)),
            out_hidden_size=_int_attribute(hf, "out_hidden_size", 3584),
            in_channels=in_channels,
            patch_size=patch_size,
            spatial_merge_size=_int_attribute(hf, "spatial_merge_size", 2),
            temporal_patch_size=_int_attribute(hf, "temporal_patch_size", 2),
            window_size=_int_attribute(hf, "window_size", 112),
            fullatt_block_indexes=tuple(hf.get("fullatt_block_indexes", (7, 15, 23, 31))),
            rope_theta=_rope_theta(hf),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        """Patches per merged output token (and per row of the merger's input)."""
        return self.spatial_merge_size**2

    @property
    def patch_features(self) -> int:
        """Length of one row of `pixel_values`: the Conv3d's receptive field, channel-major."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def window_merge_units(self) -> int:
        """Side of an attention window, in merge units (transformers' `vit_merger_window_size`)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


class VisionPatches(NamedTuple):
    """The packed patches of one prompt's images and what the masks and the rotary read. Padding rows (after the
    real ones) have image and window id -1. Leaves may carry a leading batch axis."""

    patches: jax.Array  # [N, F] float, rows in the order of transformers' pixel_values
    positions: jax.Array  # [N, 2] int32 (row, col) of the patch in its image's patch grid
    image_ids: jax.Array  # [N] int32 image of the patch (the full-attention group), -1 for padding
    window_ids: jax.Array  # [N] int32 attention window of the patch, unique over the prompt, -1 for padding


def _image_layout(grid: tuple[int, int, int], merge: int, window: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, col) [t*h*w, 2] and the window [t*h*w] of each patch of one image (windows numbered from 0, per
    frame, row-major), in the block-major order transformers' processor writes the patches; and the window count."""
    t, h, w = grid
    blocks_h, blocks_w = h // merge, w // merge
    # [blocks_h, blocks_w, merge, merge] -> the row and the column of each patch, in pixel_values order
    block_row, block_col, in_row, in_col = np.meshgrid(
        np.arange(blocks_h), np.arange(blocks_w), np.arange(merge), np.arange(merge), indexing="ij")
    rows, cols = (block_row * merge + in_row).ravel(), (block_col * merge + in_col).ravel()
    windows_w = -(-blocks_w // window)
    per_frame = -(-blocks_h // window) * windows_w
    frame_windows = ((block_row // window) * windows_w + block_col // window).ravel()
    positions = np.tile(np.stack([rows, cols], axis=-1), (t, 1))
    windows = (np.arange(t)[:, None] * per_frame + frame_windows[None]).ravel()
    return positions, windows, t * per_frame


def vision_patches(patches: list[np.ndarray], grids: list[tuple[int, int, int]], config: QwenVisionConfig,
                   length: int) -> VisionPatches:
    """Pack the patch rows [t*h*w, F] of each image (grid (t, h, w) in patches, as the processor's
    `image_grid_thw` gives it) into one sequence of `length` rows, a multiple of merge**2: every prompt padded
    to the same length runs the same compiled program.

    Images only (t == 1, as the processor writes a still image): in a video, transformers' full-attention blocks
    attend within each frame, which one group per image does not express.
    """
    if len(patches) != len(grids):
        raise ValueError(f"{len(patches)} patch arrays for {len(grids)} grids")
    merge = config.spatial_merge_size
    positions, image_ids, window_ids, offset = [], [], [], 0
    for i, (rows, grid) in enumerate(zip(patches, grids)):
        t, h, w = (int(n) for n in grid)
        if t != 1:
            raise ValueError(f"image {i} has grid {tuple(grid)}: video grids (t > 1) are not supported")
        if h % merge or w % merge:
            raise ValueError(f"image {i} grid {tuple(grid)}: h and w must be multiples of the merge size {merge}")
        if rows.shape != (t * h * w, config.patch_features):
            raise ValueError(f"image {i}: patches of shape {rows.shape}, expected {(t * h * w, config.patch_features)}")
        where, windows, count = _image_layout((t, h, w), merge, config.window_merge_units)
        positions.append(where)
        image_ids.append(np.full(len(where), i))
        window_ids.append(windows + offset)
        offset += count
    real = sum(len(p) for p in positions)
    if length < real or length % config.merge_unit:
        raise ValueError(
            f"padded length {length} must hold the {real} patches and be a multiple of {config.merge_unit} (merge**2)"
        )
    pad = length - real

    def packed(parts, fill, width=()):
        parts = parts + [np.full((pad, *width), fill)]
        return np.concatenate(parts).astype(np.int32)

    flat = np.zeros((length, config.patch_features), np.float32)
    if patches:
        flat[:real] = np.concatenate(patches)
    return VisionPatches(flat, packed(positions, 0, (2,)), packed(image_ids, -1), packed(window_ids, -1))


def rotary_tables(positions: jax.Array, config: QwenVisionConfig) -> tuple[jax.Array, jax.Array]:
    """positions [..., N, 2] -> cos, sin [..., N, H] (float32): frequencies over a quarter of the head dim, applied
    to the row, then to the column, and the pair repeated for the two halves that `rotate_half` pairs up."""
    quarter = jnp.arange(0, config.head_dim // 2, 2, dtype=jnp.float32) / (config.head_dim // 2)
    inv_freq = 1.0 / (config.rope_theta**quarter)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., N, 2, H/4]
    angles = angles.reshape(*angles.shape[:-2], -1)  # [row freqs | col freqs]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., N, heads, H] rotated in float32 (as transformers does), back in x's dtype."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


def group_mask(ids: jax.Array) -> jax.Array:
    """ids [B, N] -> [B, 1, N, N]: a token attends to the tokens of its own group (padding: the padding)."""
    return (ids[:, :, None] == ids[:, None, :])[:, None]


class QwenVisionAttention(nn.Module):
    config: QwenVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.qkv = nn.Dense(3 * c.hidden_size, **kw)
        self.proj = nn.Dense(c.hidden_size, **kw)

    def __call__(self, x, cos, sin, mask):
        """x [B,N,D], cos and sin [B,N,H], mask [B,1,N,N] -> [B,N,D]."""
        c = self.config
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, c.num_heads, c.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = dot_product_attention(q, k, v, mask, self.dtype, kernel=self.attention_kernel)
        return self.proj(out.reshape(b, n, c.hidden_size))


class QwenVisionMLP(nn.Module):
    """Gated SiLU MLP with biases."""

    config: QwenVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.gate_proj = nn.Dense(c.intermediate_size, **kw)
        self.up_proj = nn.Dense(c.intermediate_size, **kw)
        self.down_proj = nn.Dense(c.hidden_size, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class QwenVisionBlock(nn.Module):
    """x + attention(RMSNorm(x)), then + MLP(RMSNorm(x))."""

    config: QwenVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm1 = RMSNorm(self.config.rms_norm_eps, **kw)
        self.attn = QwenVisionAttention(self.config, attention_kernel=self.attention_kernel, **kw)
        self.norm2 = RMSNorm(self.config.rms_norm_eps, **kw)
        self.mlp = QwenVisionMLP(self.config, **kw)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class QwenPatchMerger(nn.Module):
    """RMSNorm, then each merge unit's merge**2 consecutive tokens concatenated, then Linear-GELU-Linear."""

    config: QwenVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.ln_q = RMSNorm(c.rms_norm_eps, **kw)
        self.mlp_0 = nn.Dense(c.merge_unit * c.hidden_size, **kw)  # transformers' mlp.0 (mlp.1 is the GELU)
        self.mlp_2 = nn.Dense(c.out_hidden_size, **kw)

    def __call__(self, x):
        """x [B,N,D] -> [B,U,out_hidden_size]."""
        b, n, d = x.shape
        x = self.ln_q(x).reshape(b, n // self.config.merge_unit, self.config.merge_unit * d)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class QwenPatchEmbed(nn.Module):
    """transformers' Conv3d without bias, whose kernel covers the whole patch: one matmul on the rows."""

    config: QwenVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches):
        proj = nn.Dense(self.config.hidden_size, use_bias=False, name="proj", dtype=self.dtype,
                        param_dtype=self.param_dtype)
        return proj(patches.astype(self.dtype))


class QwenVisionTransformer(nn.Module):
    config: QwenVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.patch_embed = QwenPatchEmbed(self.config, **kw)
        block = nn.remat(QwenVisionBlock)  # recomputed in the backward pass: see LlamaForCausalLM.setup
        block = functools.partial(block, attention_kernel=self.attention_kernel)
        self.blocks = [block(self.config, **kw) for _ in range(self.config.depth)]
        self.merger = QwenPatchMerger(self.config, **kw)

    def __call__(self, inputs: VisionPatches) -> jax.Array:
        """VisionPatches ([N, ...] leaves, or [B, N, ...]) -> merged features [U, out_hidden_size] (or [B, U, ...]):
        merge unit u is patch rows [u * merge**2, (u + 1) * merge**2), the real ones first, in transformers'
        output order; the padding's rows are finite and meaningless."""
        unbatched = inputs.patches.ndim == 2
        if unbatched:
            inputs = jax.tree_util.tree_map(lambda a: a[None], inputs)
        cos, sin = rotary_tables(inputs.positions, self.config)
        window_mask, image_mask = group_mask(inputs.window_ids), group_mask(inputs.image_ids)
        x = self.patch_embed(inputs.patches)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, image_mask if i in self.config.fullatt_block_indexes else window_mask)
        merged = self.merger(x)
        return merged[0] if unbatched else merged
