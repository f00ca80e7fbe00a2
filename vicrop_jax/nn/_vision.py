"""What the ViT towers share: the pre-norm encoder layer and its MLP (CLIP and EVA differ in attention and
embeddings only). Submodule names follow transformers', so both towers' conversion tables read them."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return lambda x: jax.nn.gelu(x, approximate=False)


class VisionMLP(nn.Module):
    config: Any  # hidden_size, intermediate_size, hidden_act
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc1 = nn.Dense(self.config.intermediate_size, **kw)
        self.fc2 = nn.Dense(self.config.hidden_size, **kw)

    def __call__(self, x):
        return self.fc2(activation(self.config.hidden_act)(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """x + attention(LN(x)), then + MLP(LN(x))."""

    config: Any
    attention: Callable[..., nn.Module]  # the tower's attention (class or partial): (config, dtype=, param_dtype=)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = self.config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(eps, **kw)
        self.self_attn = self.attention(self.config, **kw)
        self.layer_norm2 = nn.LayerNorm(eps, **kw)
        self.mlp = VisionMLP(self.config, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))
