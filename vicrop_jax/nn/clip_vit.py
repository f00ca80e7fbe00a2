"""CLIP vision transformer (pre-layernorm, quick-GELU) in Flax linen, aligned with transformers' CLIP.

Axis letters: B batch, P patches (+1 for CLS), N heads, H head dim, D width.
Images come in NHWC. Hidden state i follows transformers' numbering: 0 is the embedding
after `pre_layrnorm`, i > 0 the output of encoder layer i-1. Only the layers up to the
deepest one asked for are run (LLaVA reads layer -2, so the last layer is skipped).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vicrop_jax.nn._attention import fits_all_heads, head_by_head
from vicrop_jax.nn._config import check_supported


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
            {"model_type": ("clip_vision_model",), "hidden_act": ("quick_gelu", "gelu")},
        )
        return cls(
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            image_size=hf["image_size"],
            patch_size=hf["patch_size"],
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


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return lambda x: jax.nn.gelu(x, approximate=False)


class ClipAttention(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        dense = lambda: nn.Dense(self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = dense(), dense(), dense(), dense()

    def __call__(self, x):
        c = self.config
        b, p, _ = x.shape
        head_dim = c.hidden_size // c.num_heads
        split = lambda y: y.reshape(b, p, c.num_heads, head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if fits_all_heads(b, c.num_heads, p, p):
            logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
            out = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(logits, axis=-1).astype(self.dtype), v)
        else:
            heads_first = lambda y: y.transpose(2, 0, 1, 3)  # noqa: E731  [N,B,P,H]
            out = head_by_head(heads_first(q)[:, :, None], heads_first(k), heads_first(v), None, self.dtype)
            out = out[:, :, 0].transpose(1, 2, 0, 3)
        return self.out_proj(out.reshape(b, p, c.hidden_size))


class ClipMLP(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc1 = nn.Dense(self.config.intermediate_size, **kw)
        self.fc2 = nn.Dense(self.config.hidden_size, **kw)

    def __call__(self, x):
        return self.fc2(activation(self.config.hidden_act)(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = self.config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(eps, **kw)
        self.self_attn = ClipAttention(self.config, **kw)
        self.layer_norm2 = nn.LayerNorm(eps, **kw)
        self.mlp = ClipMLP(self.config, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


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

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = self.config.layer_norm_eps
        self.embeddings = ClipEmbeddings(self.config, **kw)
        self.pre_layrnorm = nn.LayerNorm(eps, **kw)
        layer = nn.remat(ClipEncoderLayer)  # recomputed in the backward pass: see LlamaForCausalLM.setup
        self.layers = [layer(self.config, **kw) for _ in range(self.config.num_layers)]
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
