"""LLaMA / Vicuna decoder in Flax linen, numerically aligned with transformers' `LlamaModel`.

Axis letters: B batch, T query positions, S key positions (cache slots), N query heads,
K key/value heads, H head dim, D width, F MLP width, V vocabulary.

The KV cache is an explicit pytree (`KVCache`) passed in and returned, so prefill, step
decoding, `jax.grad` and `jax.jit` compose. Attention probabilities of the layers named in
`attention_layers` pass through `sow` (collection "intermediates") and `perturb`
(collection "perturbations"), so maps and their gradients are one `apply` away.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vicrop_jax.nn._attention import (AttentionKernel, fits_all_heads, fused_attention, head_by_head,
                                      masked_softmax)
from vicrop_jax.nn._config import check_supported, get_rope_parameters, refuse_unhandled

ATTENTION_PROBS = "attention_probs"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    attention_bias: bool = False  # of q, k and v
    output_bias: bool = False  # of o (LLaMA: as attention_bias; Qwen2: none beside biased q, k, v)
    mlp_bias: bool = False
    mrope_section: tuple[int, ...] | None = None  # multimodal RoPE: rotary frequencies per (t, h, w) position axis
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Reads a transformers `LlamaConfig` dict (the `text_config` of LLaVA/InstructBLIP)."""
        check_supported(
            hf,
            "text_config",
            {"model_type": ("llama",), "hidden_act": ("silu", None), "pretraining_tp": (1, None)},
        )
        refuse_unhandled(hf, "text_config", {
            "model_type", "hidden_act", "pretraining_tp", "rope_parameters", "rope_theta", "rope_scaling",
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "attention_bias", "mlp_bias", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "max_position_embeddings",
        })
        rope = get_rope_parameters(hf)
        # a missing attribute takes transformers' LlamaConfig default (LLaMA-7B's), as transformers reads the file:
        # the published llava-1.5-7b-hf config.json names only what differs from those
        num_heads = hf.get("num_attention_heads", 32)
        hidden_size = hf.get("hidden_size", 4096)
        eos = hf.get("eos_token_id", 2)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=hf.get("vocab_size", 32000),
            hidden_size=hidden_size,
            intermediate_size=hf.get("intermediate_size", 11008),
            num_layers=hf.get("num_hidden_layers", 32),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope["rope_theta"],
            rope_type=rope["rope_type"],
            rope_factor=rope.get("factor", 1.0),
            rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
            rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
            rope_original_max_positions=rope.get("original_max_position_embeddings", 8192),
            attention_bias=hf.get("attention_bias", False),
            output_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
        )


class KVCache(NamedTuple):
    """Per-layer keys [B, K, S, H] and values [B, K, H, S], S = cache length.

    Both attention products then contract the last axis of both operands (q.k over H, p.v over S), the form
    XLA's CPU matmuls read in place: other layouts cost a transposed copy of the cache per layer and step.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        keys = tuple(jnp.zeros((batch, config.num_kv_heads, length, config.head_dim), dtype)
                     for _ in range(config.num_layers))
        values = tuple(jnp.zeros((batch, config.num_kv_heads, config.head_dim, length), dtype)
                       for _ in range(config.num_layers))
        return cls(keys=keys, values=values)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def padded(self, length: int) -> "KVCache":
        """The cache with empty slots appended up to `length`: a prompt is prefilled in a cache of its own
        length, so that its attention spans the slots it fills only, and padded for what comes after it."""
        extra = length - self.length
        keys = tuple(jnp.pad(k, ((0, 0), (0, 0), (0, extra), (0, 0))) for k in self.keys)
        values = tuple(jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, extra))) for v in self.values)
        return KVCache(keys, values)


def rope_inverse_frequencies(config: LlamaConfig) -> jax.Array:
    """Inverse RoPE frequencies [H/2], with the checkpoint's scaling (default, linear, llama3)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if config.rope_type == "linear":
        return inv_freq / config.rope_factor
    if config.rope_type == "llama3":
        low_wavelen = config.rope_original_max_positions / config.rope_low_freq_factor
        high_wavelen = config.rope_original_max_positions / config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / config.rope_factor, inv_freq)
        smooth = (config.rope_original_max_positions / wavelen - config.rope_low_freq_factor) / (
            config.rope_high_freq_factor - config.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(config: LlamaConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H] for integer positions [B, T] (or [3, B, T], one per multimodal RoPE axis), computed in
    float32 as transformers does.

    Multimodal RoPE (`mrope_section`) takes each block of frequencies from its own axis (temporal, height,
    width, in turn). They are read back through a gather, which makes XLA compute them once: an elementwise cos
    or sin is otherwise fused into each of its consumers and recomputed in every layer's rotation of q and of k,
    for every head (42 times in vicrop-tiny's ViCrop program, a sixth of its time on CPU).
    """
    freqs = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(config)
    if config.mrope_section is not None:
        bounds = np.cumsum((0, *config.mrope_section))
        freqs = jnp.concatenate([freqs[i % 3, ..., start:stop]
                                 for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]))], axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    rows = jnp.arange(positions.shape[-1])
    return tuple(jnp.take(f(emb), rows, axis=-2).astype(dtype) for f in (jnp.cos, jnp.sin))


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, H]; cos/sin [B, T, H]. HF's rotate-half convention (no weight permutation)."""
    return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    layer_index: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        c = self.config
        dense = lambda n, bias: nn.Dense(n, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj = dense(c.num_heads * c.head_dim, c.attention_bias)
        self.k_proj = dense(c.num_kv_heads * c.head_dim, c.attention_bias)
        self.v_proj = dense(c.num_kv_heads * c.head_dim, c.attention_bias)
        self.o_proj = dense(c.hidden_size, c.output_bias)

    def __call__(self, x, cos, sin, mask, keys, values, offset, capture: bool):
        """x [B,T,D]; mask [B,T,S] (True = may attend); keys [B,K,S,H] / values [B,K,H,S] written at offset."""
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        zero = jnp.zeros((), jnp.int32)
        keys = jax.lax.dynamic_update_slice(keys, k.transpose(0, 2, 1, 3).astype(keys.dtype),
                                            (zero, zero, offset, zero))
        values = jax.lax.dynamic_update_slice(values, v.transpose(0, 2, 3, 1).astype(values.dtype),
                                              (zero, zero, zero, offset))

        keys_in, values_in = keys.astype(self.dtype), values.astype(self.dtype)
        if not capture and self.attention_kernel is AttentionKernel.FUSED:
            out = fused_attention(q, keys_in.transpose(0, 2, 1, 3), values_in.transpose(0, 3, 1, 2), mask[:, None])
            return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim)), keys, values
        qg = q.reshape(b, t, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim)
        if capture or fits_all_heads(b, c.num_heads, t, keys.shape[2]):
            out = self._all_heads(qg, keys_in, values_in, mask, capture)
        else:  # head_by_head's operands are head-major, values [S,H] per head
            out = head_by_head(qg.transpose(2, 0, 3, 1, 4), keys_in.transpose(1, 0, 2, 3),
                               values_in.transpose(1, 0, 3, 2), mask[:, None], self.dtype).transpose(1, 3, 0, 2, 4)
        return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim)), keys, values

    def _all_heads(self, qg, keys, values, mask, capture: bool):
        """Attention of all heads at once -> [B,T,K,G,H]; a captured layer's probabilities [B,N,T,S] are sown
        and perturbable."""
        b, t, kv_heads, groups, head_dim = qg.shape
        logits = jnp.einsum("btkgh,bksh->bkgts", qg, keys, preferred_element_type=jnp.float32)
        logits = logits.reshape(b, kv_heads * groups, t, keys.shape[2]) * (head_dim**-0.5)
        probs = masked_softmax(logits, mask[:, None]).astype(self.dtype)
        if capture:
            probs = self.perturb(ATTENTION_PROBS, probs)
            self.sow("intermediates", ATTENTION_PROBS, probs)
        probs = probs.reshape(b, kv_heads, groups, t, keys.shape[2])
        return jnp.einsum("bkgts,bkhs->btkgh", probs, values)


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        dense = lambda n: nn.Dense(n, use_bias=c.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        self.gate_proj = dense(c.intermediate_size)
        self.up_proj = dense(c.intermediate_size)
        self.down_proj = dense(c.hidden_size)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    layer_index: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.input_layernorm = RMSNorm(c.rms_norm_eps, **kw)
        self.self_attn = LlamaAttention(c, self.layer_index, **kw, attention_kernel=self.attention_kernel)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, **kw)
        self.mlp = LlamaMLP(c, **kw)

    def __call__(self, x, cos, sin, mask, keys, values, offset, capture: bool):
        attn, keys, values = self.self_attn(self.input_layernorm(x), cos, sin, mask, keys, values, offset, capture)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), keys, values


class LlamaForCausalLM(nn.Module):
    """Decoder stack + LM head. `__call__` runs embeddings through the layers with a KV cache."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = AttentionKernel.EXPLICIT

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, **kw)
        # Under differentiation a layer keeps its inputs only and recomputes the rest in the backward pass
        # (pure-grad's memory); programs without a backward pass are unchanged. Argument 8 is `capture`.
        layer = nn.remat(LlamaDecoderLayer, static_argnums=(8,))
        self.layers = [layer(c, i, **kw, attention_kernel=self.attention_kernel) for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, **kw)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        cache: KVCache,
        offset: jax.Array | int = 0,
        attention_layers: Sequence[int] = (),
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """inputs_embeds [B,T,D] placed at cache slots offset..offset+T-1 -> (normed hidden [B,T,D], cache).

        Query p sees the keys of slots 0..p (prompts are right-padded). Its rotary position is its slot, unless
        `positions` [B,T] (or [3,B,T] for multimodal RoPE) say otherwise.
        """
        b, t, _ = inputs_embeds.shape
        offset = jnp.asarray(offset, jnp.int32)
        slot_positions = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))
        if positions is None:
            positions = slot_positions
        if self.config.mrope_section is not None and positions.ndim == 2:
            positions = jnp.broadcast_to(positions, (3, b, t))
        cos, sin = rope_cos_sin(self.config, positions, self.dtype)
        slots = jnp.arange(cache.length, dtype=jnp.int32)
        mask = slots[None, None, :] <= slot_positions[:, :, None]
        x = inputs_embeds.astype(self.dtype)
        keys, values = list(cache.keys), list(cache.values)
        for i, layer in enumerate(self.layers):
            x, keys[i], values[i] = layer(x, cos, sin, mask, keys[i], values[i], offset, i in attention_layers)
        return self.norm(x), KVCache(tuple(keys), tuple(values))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> float32 logits [..., V]."""
        if self.config.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)
