"""Greedy decoding with an explicit KV cache: one jitted prefill + `lax.while_loop` step decoding.

Works with any composite model that has `embed`, `decode` and `logits` methods (LLaVA and
InstructBLIP). Prompts are right-padded to a length bucket, so a new question of similar
length reuses the compiled program. Each example runs with its own cache offset under `vmap`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vicrop_jax.llama import KVCache

BUCKET = 64
PAD_TOKEN = -1


def bucket_length(length: int, bucket: int = BUCKET) -> int:
    """The padded prompt length: the next multiple of `bucket` (compiled shapes are per bucket)."""
    return max(bucket, -(-length // bucket) * bucket)


def pad_prompt(input_ids: Sequence[int], pad_id: int = 0, bucket: int = BUCKET) -> tuple[np.ndarray, int]:
    """Right-pad token ids to their bucket; returns (ids [T_bucket], true length)."""
    ids = np.full(bucket_length(len(input_ids), bucket), pad_id, np.int32)
    ids[: len(input_ids)] = input_ids
    return ids, len(input_ids)


def prefill(module: nn.Module, params: Any, input_ids, length, image_features, cache_length: int):
    """Run one prompt [T] into a fresh cache; returns (hidden at the last prompt token [D], cache)."""
    embeds = module.apply({"params": params}, input_ids[None], image_features[None], method="embed")
    cache = KVCache.zeros(module.config.text, 1, cache_length, module.dtype)
    hidden, cache = module.apply({"params": params}, embeds, cache, 0, method="decode")
    return hidden[0, length - 1], cache


def decode_from(module, params, first_logits, cache, length, max_new_tokens: int, eos_ids: tuple[int, ...]):
    """Greedy tokens [max_new_tokens] starting from the logits of the last prompt token.

    Stops at the first EOS (kept in the output, as transformers does); later slots hold PAD_TOKEN.
    """
    eos = jnp.asarray(eos_ids if eos_ids else (-2,), jnp.int32)

    def cond(state):
        step, _, _, done = state
        return (step < max_new_tokens) & ~done

    def body(state):
        step, cache, out, _ = state
        embeds = module.apply({"params": params}, out[step - 1][None, None], method="embed_tokens")
        hidden, cache = module.apply({"params": params}, embeds, cache, length + step - 1, method="decode")
        token = jnp.argmax(module.apply({"params": params}, hidden[0, -1], method="logits")).astype(jnp.int32)
        return step + 1, cache, out.at[step].set(token), jnp.isin(token, eos)

    first = jnp.argmax(first_logits).astype(jnp.int32)
    out = jnp.full((max_new_tokens,), PAD_TOKEN, jnp.int32).at[0].set(first)
    state = (jnp.int32(1), cache, out, jnp.isin(first, eos))
    return jax.lax.while_loop(cond, body, state)[2]


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "eos_ids"))
def greedy_generate(
    module: nn.Module,
    params: Any,
    input_ids: jax.Array,
    lengths: jax.Array,
    image_features: jax.Array,
    *,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
) -> jax.Array:
    """input_ids [B,T] right-padded, lengths [B], image_features [B,M,D] -> tokens [B,max_new_tokens]."""
    one = lambda ids, length, features: generate_one(  # noqa: E731
        module, params, ids, length, features, max_new_tokens, eos_ids
    )
    return jax.vmap(one)(input_ids, lengths, image_features)


def generate_one(module, params, input_ids, length, image_features, max_new_tokens: int, eos_ids):
    """Greedy tokens [max_new_tokens] of one prompt (ids [T], features [M,D]), as traced device code."""
    last_hidden, cache = prefill(module, params, input_ids, length, image_features,
                                 input_ids.shape[0] + max_new_tokens)
    first_logits = module.apply({"params": params}, last_hidden, method="logits")
    return decode_from(module, params, first_logits, cache, length, max_new_tokens, eos_ids)


def strip_generated(tokens: np.ndarray) -> list[int]:
    """Generated ids up to (and including) the first EOS, without padding."""
    return [int(t) for t in tokens if t != PAD_TOKEN]
