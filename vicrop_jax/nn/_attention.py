"""Scaled dot-product attention one head at a time, for passes whose scores outgrow the CPU's caches.

With all heads at once, the float32 scores [B,N,T,S] of a long prompt (LLaVA's 576 image tokens and more)
run to tens of MB, and each step after the first product (mask, softmax, product with the values) is a
trip to memory. One head's scores stay in cache from the first product to the last: the medium
benchmark's crop-prompt attention (12 heads, 607 queries, 1204 keys) took 75 ms per layer with all heads
and 22 ms head by head on 2 cores; CLIP ViT-L's (16 heads, 577 positions) 42-45 and 18-22 ms. Small passes
(decoding steps, short prompts) keep all heads at once, where a loop would only add overhead.
Differentiated (pure-grad's backward pass to the pixels), each head's probabilities are recomputed rather
than stored (`jax.checkpoint` on the loop body), also inside the recomputed layers of pure-grad's backward
pass: the medium pure-grad map's XLA temporaries are 98 MiB with it, 143 MiB without (0.4 s faster).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ALL_HEADS_MAX_SCORE_BYTES = 8 * 2**20


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
