"""Greedy decoding with an explicit KV cache: one jitted prefill + `lax.while_loop` step decoding.

Works with any composite model that has `embed`, `decode` and `logits` methods (LLaVA and
InstructBLIP). Prompts are right-padded to a length bucket, so a new question of similar
length reuses the compiled program. A prompt is prefilled in a cache of its own length (its
attention spans no empty slots), then padded for the answer. Several prompts decode in one
loop, each at its own cache offset: the step is vmapped, the loop is not.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vicrop_jax.nn.llama import KVCache

BUCKET = 32  # padding of a prompt: small enough to waste little work, large enough for few compiles
PAD_TOKEN = -1


def bucket_length(length: int, bucket: int = BUCKET) -> int:
    """The padded prompt length: the next multiple of `bucket` (compiled shapes are per bucket)."""
    return max(bucket, -(-length // bucket) * bucket)


def pad_prompt(input_ids: Sequence[int], pad_id: int = 0, bucket: int = BUCKET) -> tuple[np.ndarray, int]:
    """Right-pad token ids to their bucket; returns (ids [T_bucket], true length)."""
    ids = np.full(bucket_length(len(input_ids), bucket), pad_id, np.int32)
    ids[: len(input_ids)] = input_ids
    return ids, len(input_ids)


def prefill(module: nn.Module, params: Any, input_ids, length, image_features, cache_length: int,
            positions: jax.Array | None = None):
    """Run one prompt [T] into a fresh cache of S slots; returns (logits of its last token [V], cache).
    `positions`: the prompt's rotary positions where they are not its slots ([3, T] for multimodal RoPE)."""
    embeds = module.apply({"params": params}, input_ids[None], image_features[None], method="embed")
    cache = KVCache.zeros(module.config.text, 1, input_ids.shape[0], module.dtype)
    positions = None if positions is None else positions[..., None, :]
    hidden, cache = module.apply({"params": params}, embeds, cache, 0, positions=positions, method="decode")
    logits = module.apply({"params": params}, hidden[0, length - 1], method="logits")
    return logits, cache.padded(cache_length)


def stack_prompts(*passes):
    """Per-prompt pytrees stacked leaf by leaf on a new leading axis [n]: (logits of the last token [V], cache)
    of prefilled prompts -> the input of `decode_from`; (suffix ids, length) -> one array each for a loop."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *passes)


class DecodeState(NamedTuple):
    """The carry of the decoding loop."""

    step: jax.Array  # the next token's index
    caches: KVCache  # stacked [n]
    tokens: jax.Array  # [n, max_new_tokens], PAD_TOKEN where not yet (or no longer) generated
    done: jax.Array  # [n] whether each answer has met an EOS


def decode_from(module, params, first_logits, caches: KVCache, lengths, max_new_tokens: int,
                eos_ids: tuple[int, ...], position_offsets: jax.Array | None = None):
    """Greedy tokens [n, max_new_tokens] of n prefilled prompts: the logits of their last tokens [n, V], their
    caches stacked on a leading axis [n], their lengths [n]; `position_offsets` [n]: how far each answer's rotary
    positions run ahead of its cache slots (multimodal RoPE's delta; None: they are its slots).

    One loop for all prompts (it runs until each has met an EOS or the limit): every step reads the weights
    once for all of them, and the carry is updated in place (a vmapped loop would copy every cache per step).
    Each answer stops at its first EOS (kept, as transformers does); later slots hold PAD_TOKEN.
    """
    eos = jnp.asarray(eos_ids if eos_ids else (-2,), jnp.int32)

    def step_one(token, cache, slot, position_offset):
        embeds = module.apply({"params": params}, token[None, None], method="embed_tokens")
        positions = None if position_offset is None else jnp.reshape(slot + position_offset, (1, 1))
        hidden, cache = module.apply({"params": params}, embeds, cache, slot, positions=positions, method="decode")
        logits = module.apply({"params": params}, hidden[0, -1], method="logits")
        return jnp.argmax(logits).astype(jnp.int32), cache

    def cond(state: DecodeState):
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    def body(state: DecodeState):
        previous = jnp.maximum(state.tokens[:, state.step - 1], 0)  # a finished answer's PAD_TOKEN: any id will do
        tokens, caches = jax.vmap(step_one)(previous, state.caches, lengths + state.step - 1, position_offsets)
        tokens = jnp.where(state.done, PAD_TOKEN, tokens)
        return DecodeState(state.step + 1, caches, state.tokens.at[:, state.step].set(tokens),
                           state.done | jnp.isin(tokens, eos))

    first = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)
    out = jnp.full((first.shape[0], max_new_tokens), PAD_TOKEN, jnp.int32).at[:, 0].set(first)
    return jax.lax.while_loop(cond, body, DecodeState(jnp.int32(1), caches, out, jnp.isin(first, eos))).tokens


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "eos_ids"))
def greedy_generate(
    module: nn.Module,
    params: Any,
    input_ids: jax.Array,
    lengths: jax.Array,
    image_features: jax.Array,
    positions: jax.Array | None = None,
    position_offsets: jax.Array | None = None,
    *,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
) -> jax.Array:
    """input_ids [B,T] right-padded, lengths [B], image_features [B,M,D] -> tokens [B,max_new_tokens];
    multimodal RoPE's positions [B,3,T] and their offsets [B] for the answer (see `decode_from`)."""
    cache_length = input_ids.shape[1] + max_new_tokens
    first_pass = lambda ids, length, features, positions: prefill(  # noqa: E731
        module, params, ids, length, features, cache_length, positions
    )
    logits, caches = jax.vmap(first_pass)(input_ids, lengths, image_features, positions)
    return decode_from(module, params, logits, caches, lengths, max_new_tokens, eos_ids, position_offsets)


def strip_generated(tokens: np.ndarray) -> list[int]:
    """Generated ids up to (and including) the first EOS, without padding."""
    return [int(t) for t in tokens if t != PAD_TOKEN]
