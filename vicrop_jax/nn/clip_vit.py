"""CLIP vision transformer (pre-layernorm, quick-GELU) in Flax linen, aligned with transformers' CLIP.

Axis letters: B batch, P patches (+1 for CLS), N heads, H head dim, D width.
Images come in NHWC. Hidden state i follows transformers' numbering: 0 is the embedding
after `pre_layrnorm`, i > 0 the output of encoder layer i-1. Only the layers up to the
deepest one asked for are run (LLaVA reads layer -2, so the last layer is skipped).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vicrop_jax.nn._attention import AttentionKernel, dot_product_attention
from vicrop_jax.nn._config import check_supported, refuse_unhandled
from vicrop_jax.nn._vision import VisionEncoderLayer


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ClipVisionConfig":
        check_supported(
            hf,
            "vision_config",
            {"model_type": ("clip_vision_model",), "hidden_act": ("quick_gelu", "gelu", None)},
        )
        # projection_dim and vocab_size belong to CLIP's heads, which the vision tower does not have
        refuse_unhandled(hf, "vision_config", {
            "model_type", "hidden_act", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "image_size", "patch_size", "num_channels", "layer_norm_eps", "projection_dim",
            "vocab_size",
        })
        return cls(
            # a missing attribute takes transformers' CLIPVisionConfig default, as transformers reads the file
            hidden_size=hf.get("hidden_size", 768),
            intermediate_size=hf.get("intermediate_size", 3072),
            num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12),
            image_size=hf.get("image_size", 224),
            patch_size=hf.get("patch_size", 32),
            num_channels=hf.get("num_channels", 3),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            hidden_act=hf.get("hidden_act", "quick_gelu"),
        )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def hidden_state_index(self, layer: int) -> int:
        """Non-negative index into the num_layers + 1 hidden states, as Python indexing reads `layer`."""
        count = self.num_layers + 1
        if not -count <= layer < count:
            raise ValueError(f"vision feature layer {layer} is out of range [{-count}, {count - 1}]")
        return layer % count


class ClipAttention(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        dense = lambda: nn.Dense(self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = dense(), dense(), dense(), dense()

    def __call__(self, x):
        c = self.config
        b, p, _ = x.shape
        head_dim = c.hidden_size // c.num_heads
        split = lambda y: y.reshape(b, p, c.num_heads, head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = dot_product_attention(q, k, v, None, self.dtype, kernel=self.attention_kernel)
        return self.out_proj(out.reshape(b, p, c.hidden_size))


class ClipEmbeddings(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        patches = nn.Conv(
            c.hidden_size, (c.patch_size, c.patch_size), strides=c.patch_size,
            padding="VALID", use_bias=False, name="patch_embedding", **kw,
        )(pixel_values.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        positions = nn.Embed(c.num_patches + 1, c.hidden_size, name="position_embedding", **kw)
        return x + positions(jnp.arange(c.num_patches + 1))[None]


class ClipVisionTransformer(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = self.config.layer_norm_eps
        self.embeddings = ClipEmbeddings(self.config, **kw)
        self.pre_layrnorm = nn.LayerNorm(eps, **kw)
        layer = nn.remat(VisionEncoderLayer)  # recomputed in the backward pass: see LlamaForCausalLM.setup
        attention = functools.partial(ClipAttention, attention_kernel=self.attention_kernel)
        self.layers = [layer(self.config, attention, **kw) for _ in range(self.config.num_layers)]
        self.post_layernorm = nn.LayerNorm(eps, **kw)

    def __call__(self, pixel_values: jax.Array, hidden_state_indices: Sequence[int]) -> list[jax.Array]:
        """pixel_values [B,H,W,C] -> the hidden states [B,P+1,D] at the given non-negative indices."""
        deepest = self.config.num_layers if self.is_initializing() else max(hidden_state_indices)
        hidden = [self.pre_layrnorm(self.embeddings(pixel_values))]
        for layer in self.layers[:deepest]:
            hidden.append(layer(hidden[-1]))
        if self.is_initializing():  # the pooled head is unused by LLaVA but part of the checkpoint
            self.post_layernorm(hidden[-1][:, 0])
        return [hidden[i] for i in hidden_state_indices]
