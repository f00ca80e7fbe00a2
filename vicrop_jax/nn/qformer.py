"""InstructBLIP's Q-Former (BERT-like) in Flax linen, aligned with transformers' `InstructBlipQFormerModel`.

Axis letters: B batch, Q learned queries, T instruction tokens, S self-attention keys (Q + T),
P image positions (patches + CLS), N heads, H head dim, D width, E image feature width.

Self-attention runs over [queries; instruction tokens] (padding keys masked); every
`cross_attention_frequency`-th layer the query positions alone cross-attend to the image features;
query and text positions then go through separate MLPs (`intermediate_query`/`output_query` and
`intermediate`/`output`). Cross-attention probabilities of the cross-attention layers named in
`cross_attention_layers` (0-based over the cross-attention layers only) pass through `perturb` and
`sow` under "cross_attention_probs", so ViCrop reads them and their gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vicrop_jax.nn._attention import AttentionKernel, dot_product_attention
from vicrop_jax.nn._config import check_supported, refuse_unhandled

CROSS_ATTENTION_PROBS = "cross_attention_probs"


@dataclasses.dataclass(frozen=True, kw_only=True)
class QFormerConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    encoder_hidden_size: int
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "QFormerConfig":
        """Reads the `qformer_config` of a transformers `InstructBlipConfig`."""
        check_supported(
            hf,
            "qformer_config",
            {
                "model_type": ("instructblip_qformer",),
                "hidden_act": ("gelu", None),
                "position_embedding_type": ("absolute", None),
            },
        )
        refuse_unhandled(hf, "qformer_config", {
            "model_type", "hidden_act", "position_embedding_type", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "intermediate_size", "encoder_hidden_size", "max_position_embeddings",
            "layer_norm_eps", "cross_attention_frequency",
        })
        return cls(
            # a missing attribute takes transformers' InstructBlipQFormerConfig default
            vocab_size=hf.get("vocab_size", 30522),
            hidden_size=hf.get("hidden_size", 768),
            num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12),
            intermediate_size=hf.get("intermediate_size", 3072),
            encoder_hidden_size=hf.get("encoder_hidden_size", 1408),
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            cross_attention_frequency=hf.get("cross_attention_frequency", 2),
        )

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0

    @property
    def num_cross_attention_layers(self) -> int:
        return sum(self.has_cross_attention(i) for i in range(self.num_layers))


class QFormerMultiHeadAttention(nn.Module):
    """BERT attention; keys/values come from `context` (the image features for cross-attention)."""

    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        dense = lambda: nn.Dense(self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        self.query, self.key, self.value = dense(), dense(), dense()

    def _capture(self, probs):
        probs = self.perturb(CROSS_ATTENTION_PROBS, probs)
        self.sow("intermediates", CROSS_ATTENTION_PROBS, probs)
        return probs

    def __call__(self, x, context, mask, capture: bool):
        """x [B,T,D] attends to context [B,S,D or E]; mask [B,S] (True = may attend) or None."""
        c = self.config
        head_dim = c.hidden_size // c.num_heads
        split = lambda y: y.reshape(*y.shape[:2], c.num_heads, head_dim)
        q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
        out = dot_product_attention(q, k, v, None if mask is None else mask[:, None, None, :], self.dtype,
                                    self._capture if capture else None, self.attention_kernel)
        return out.reshape(*x.shape[:2], c.hidden_size)


class QFormerResidualOutput(nn.Module):
    """Dense, then LayerNorm of (output + residual): HF's `...SelfOutput` and `...Output`."""

    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.dense = nn.Dense(self.config.hidden_size, **kw)
        self.LayerNorm = nn.LayerNorm(self.config.layer_norm_eps, **kw)

    def __call__(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class QFormerAttention(nn.Module):
    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.attention = QFormerMultiHeadAttention(self.config, **kw, attention_kernel=self.attention_kernel)
        self.output = QFormerResidualOutput(self.config, **kw)

    def __call__(self, x, context, mask, capture: bool = False):
        return self.output(self.attention(x, context, mask, capture), x)


class QFormerIntermediate(nn.Module):
    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(self.config.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")
        return jax.nn.gelu(dense(x), approximate=False)


class QFormerLayer(nn.Module):
    config: QFormerConfig
    layer_index: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.attention = QFormerAttention(c, **kw, attention_kernel=self.attention_kernel)
        if c.has_cross_attention(self.layer_index):
            self.crossattention = QFormerAttention(c, **kw, attention_kernel=self.attention_kernel)
        self.intermediate = QFormerIntermediate(c, **kw)
        self.output = QFormerResidualOutput(c, **kw)
        self.intermediate_query = QFormerIntermediate(c, **kw)
        self.output_query = QFormerResidualOutput(c, **kw)

    def __call__(self, x, mask, image_embeds, num_queries: int, capture: bool):
        """x [B,Q+T,D], mask [B,Q+T], image_embeds [B,P,E] -> [B,Q+T,D]."""
        x = self.attention(x, x, mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.config.has_cross_attention(self.layer_index):
            queries = self.crossattention(queries, image_embeds, None, capture)
        queries = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1] == 0:
            return queries
        return jnp.concatenate([queries, self.output(self.intermediate(text), text)], axis=1)


class QFormerEmbeddings(nn.Module):
    """Word + absolute position embeddings of the instruction, put after the queries, then LayerNorm."""

    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size, **kw)
        self.position_embeddings = nn.Embed(c.max_position_embeddings, c.hidden_size, **kw)
        self.layernorm = nn.LayerNorm(c.layer_norm_eps, **kw)

    def __call__(self, input_ids, query_embeds):
        """input_ids [B,T], query_embeds [B,Q,D] -> [B,Q+T,D]; text positions count from 0."""
        text = self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(input_ids.shape[1]))[None]
        return self.layernorm(jnp.concatenate([query_embeds.astype(self.dtype), text], axis=1))


class QFormerModel(nn.Module):
    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = QFormerEmbeddings(c, **kw)
        self.layer = [QFormerLayer(c, i, **kw, attention_kernel=self.attention_kernel) for i in range(c.num_layers)]

    def __call__(
        self,
        query_embeds: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        image_embeds: jax.Array,
        cross_attention_layers: Sequence[int] = (),
    ) -> jax.Array:
        """query_embeds [B,Q,D], instruction input_ids and attention_mask [B,T], image_embeds [B,P,E].

        Returns the last hidden state [B,Q+T,D]; the first Q positions are the query outputs.
        """
        b, num_queries = query_embeds.shape[:2]
        mask = jnp.concatenate([jnp.ones((b, num_queries), bool), attention_mask.astype(bool)], axis=1)
        x = self.embeddings(input_ids, query_embeds)
        image_embeds = image_embeds.astype(self.dtype)
        cross_index = 0
        for i, layer in enumerate(self.layer):
            capture = self.config.has_cross_attention(i) and cross_index in cross_attention_layers
            x = layer(x, mask, image_embeds, num_queries, capture)
            cross_index += self.config.has_cross_attention(i)
        return x
