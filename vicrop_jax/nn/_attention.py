"""Scaled dot-product attention: explicit (probabilities readable, one head at a time when the scores outgrow
the CPU's caches) or fused (`jax.nn.dot_product_attention`, which never hands out the probabilities).

With all heads at once, the float32 scores [B,N,T,S] of a long prompt (LLaVA's 576 image tokens and more)
run to tens of MB, and each step after the first product (mask, softmax, product with the values) is a
trip to memory. One head's scores stay in cache from the first product to the last (docs/benchmarks.md
gives the times). Small passes (decoding steps, short prompts) keep all heads at once, where a loop
would only add overhead. Differentiated (pure-grad's backward pass to the pixels), each head's probabilities
are recomputed rather than stored (`jax.checkpoint` on the loop body), also inside the recomputed layers of
pure-grad's backward pass, which keeps that pass's memory down.
"""

from __future__ import annotations

import enum
from typing import Callable

import jax
import jax.numpy as jnp

ALL_HEADS_MAX_SCORE_BYTES = 8 * 2**20


class AttentionKernel(enum.Enum):
    """How the attentions whose probabilities no map reads are computed. A layer a map reads (the sown and
    perturbed layers) is always explicit, whatever the kernel."""

    EXPLICIT = "explicit"  # transformers' eager order, written out (fastest on CPU: docs/benchmarks.md measures it)
    FUSED = "fused"  # jax.nn.dot_product_attention: cuDNN's fused kernel on GPU in 16-bit, XLA's otherwise

    @classmethod
    def resolve(cls, choice: "AttentionKernel | str") -> "AttentionKernel":
        """A kernel, or its name: "explicit", "fused" or "auto" (the faster one on the default backend)."""
        if isinstance(choice, cls):
            return choice
        if choice == "auto":
            return cls.FUSED if jax.default_backend() == "gpu" else cls.EXPLICIT
        try:
            return cls(choice)
        except ValueError:
            raise ValueError(f"unknown attention kernel {choice!r}; choose auto, explicit or fused") from None


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """q [B,T,N,H], k and v [B,S,K,H] (K divides N), mask broadcastable to [B,N,T,S] or None -> [B,T,N,H]."""
    cudnn = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
             and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn" if cudnn else None)


def fits_all_heads(batch: int, heads: int, queries: int, keys: int) -> bool:
    """Whether a pass's float32 scores of all heads are small enough to compute at once."""
    return batch * heads * queries * keys * 4 <= ALL_HEADS_MAX_SCORE_BYTES


def masked_softmax(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax over keys, masked slots at float32's minimum (as transformers' eager attention adds it)."""
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def head_by_head(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, dtype) -> jax.Array:
    """q [K,B,G,T,H], k and v [K,B,S,H], mask broadcastable to [B,G,T,S] (True = may attend) or None
    -> [K,B,G,T,H]. K key/value heads, each read by G query heads; same operations and order as the
    all-heads attention of the models (float32 scores, scaled after the product, softmax, cast to dtype)."""
    scale = q.shape[-1] ** -0.5

    def one_head(operands):
        q, k, v = operands
        logits = jnp.einsum("bgth,bsh->bgts", q, k, preferred_element_type=jnp.float32) * scale
        return jnp.einsum("bgts,bsh->bgth", masked_softmax(logits, mask).astype(dtype), v)

    return jax.lax.map(jax.checkpoint(one_head), (q, k, v))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, dtype,
                          probs_hook: Callable[[jax.Array], jax.Array] | None = None,
                          kernel: AttentionKernel = AttentionKernel.EXPLICIT) -> jax.Array:
    """q [B,T,N,H], k and v [B,S,N,H], mask broadcastable to [B,1,T,S] (True = may attend) or None -> [B,T,N,H].

    The vision towers' and the Q-Former's attention, in transformers' eager order (float32 scores scaled after
    the product, masked softmax, cast to dtype, product with the values). `probs_hook` sees the probabilities
    [B,N,T,S] of all heads before the value product (to sow or perturb them); without one, the fused kernel runs
    when asked for, and otherwise passes whose scores outgrow the caches run head by head.
    """
    if probs_hook is None and kernel is AttentionKernel.FUSED:
        return fused_attention(q, k, v, mask)
    b, t, n, h = q.shape
    if probs_hook is None and not fits_all_heads(b, n, t, k.shape[1]):
        heads_first = lambda y: y.transpose(2, 0, 1, 3)  # noqa: E731  [N,B,T,H]
        out = head_by_head(heads_first(q)[:, :, None], heads_first(k), heads_first(v), mask, dtype)
        return out[:, :, 0].transpose(1, 2, 0, 3)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * h**-0.5
    probs = masked_softmax(logits, mask).astype(dtype)
    if probs_hook is not None:
        probs = probs_hook(probs)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)
