"""EVA ViT (InstructBLIP's vision model) in Flax linen, aligned with transformers' `InstructBlipVisionModel`.

Axis letters: B batch, P patches (+1 for CLS), N heads, H head dim, D width.
Images come in NHWC. Pre-layernorm blocks with a fused `qkv` projection whose bias is q and v only
(the checkpoint stores it fused as [q_bias; 0; v_bias]), exact GELU, no layer scale (transformers
5.24 has none), and a post layernorm on every position: its output is what the Q-Former reads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vicrop_jax.nn._attention import AttentionKernel, dot_product_attention
from vicrop_jax.nn._config import check_supported, refuse_unhandled
from vicrop_jax.nn._vision import VisionEncoderLayer


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"  # exact GELU, the only one transformers' EVA reads

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "EvaVisionConfig":
        """Reads the `vision_config` of a transformers `InstructBlipConfig`."""
        check_supported(
            hf,
            "vision_config",
            {
                "model_type": ("instructblip_vision_model",),
                "hidden_act": ("gelu", None),
                "qkv_bias": (True, False, None),
            },
        )
        refuse_unhandled(hf, "vision_config", {
            "model_type", "hidden_act", "qkv_bias", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "image_size", "patch_size", "layer_norm_eps",
        })
        for key in ("image_size", "patch_size"):
            if not isinstance(hf.get(key, 0), int):
                raise ValueError(f"vision_config.{key} = {hf[key]!r} is not supported by vicrop_jax (square only)")
        return cls(
            # a missing attribute takes transformers' InstructBlipVisionConfig default
            hidden_size=hf.get("hidden_size", 1408),
            intermediate_size=hf.get("intermediate_size", 6144),
            num_layers=hf.get("num_hidden_layers", 39),
            num_heads=hf.get("num_attention_heads", 16),
            image_size=hf.get("image_size", 224),
            patch_size=hf.get("patch_size", 14),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
            qkv_bias=hf.get("qkv_bias", True),
        )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


class EvaAttention(nn.Module):
    config: EvaVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.qkv = nn.Dense(3 * c.hidden_size, use_bias=c.qkv_bias, **kw)
        self.projection = nn.Dense(c.hidden_size, **kw)

    def __call__(self, x):
        c = self.config
        b, p, _ = x.shape
        head_dim = c.hidden_size // c.num_heads
        qkv = self.qkv(x).reshape(b, p, 3, c.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = dot_product_attention(q, k, v, None, self.dtype, kernel=self.attention_kernel)
        return self.projection(out.reshape(b, p, c.hidden_size))


class EvaEmbeddings(nn.Module):
    """Patch conv (with bias) + CLS + learned positions, stored as the [1, ...] tensors of the checkpoint."""

    config: EvaVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        patches = nn.Conv(
            c.hidden_size, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
            name="patch_embedding", dtype=self.dtype, param_dtype=self.param_dtype,
        )(pixel_values.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)
        init = nn.initializers.truncated_normal(0.02)
        cls = self.param("class_embedding", init, (1, 1, c.hidden_size), self.param_dtype)
        positions = self.param("position_embedding", init, (1, c.num_patches + 1, c.hidden_size), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), patches], axis=1)
        return x + positions.astype(self.dtype)


class EvaVisionTransformer(nn.Module):
    config: EvaVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = EvaEmbeddings(self.config, **kw)
        layer = nn.remat(VisionEncoderLayer)  # recomputed in the backward pass: see LlamaForCausalLM.setup
        attention = functools.partial(EvaAttention, attention_kernel=self.attention_kernel)
        self.layers = [layer(self.config, attention, **kw) for _ in range(self.config.num_layers)]
        self.post_layernorm = nn.LayerNorm(self.config.layer_norm_eps, **kw)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B,H,W,C] -> last hidden state after post_layernorm [B,P+1,D] (CLS first)."""
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)
