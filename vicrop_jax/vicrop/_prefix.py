"""LLaVA ViCrop without repeated work: the shared `[BOS, image]` prefix is encoded and prefilled once.

Every prompt of a LLaVA question starts with the same prefix (BOS and the original image's tokens): the
question prompt, the general prompt of rel-att, and the two-image prompt with the crop. Its KV cache is
computed once and each prompt runs only its suffix from there: question and general suffixes as one
batch, the original answer decoded from the question pass's cache, the crop prompt's suffix being the
crop's image tokens and the text. Only the one attention row a map needs is read. grad-att needs no
backward pass through the prefix: dS/dA of the last row depends on the suffix computation only. pure-grad
runs the prefix forward once too (`jax.vjp`); for one prompt after the other, the suffix gives a cotangent on
the prefix cache, pulled back to the pixels through that forward (its layers recomputed one at a time).

Axis letters: S cache slots, Ts suffix positions, N heads, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vicrop_jax._generation import encode_images
from vicrop_jax.nn.decoding import prefill, stack_prompts
from vicrop_jax.nn.llama import ATTENTION_PROBS, KVCache
from vicrop_jax.vicrop.maps import MapOptions, PromptArrays, _head_mean, _score, _sown, pixel_gradient_map


def prefill_prefix(module, params, features: jax.Array, prefix_ids: jax.Array, cache_length: int) -> KVCache:
    """The prefix (ids [P0] with image tokens, features [P,D]) in a fresh cache of S slots, as `prefill` writes
    any prompt (its logits, unused here, are pruned by the compiler)."""
    return prefill(module, params, prefix_ids, prefix_ids.shape[0], features, cache_length)[1]


def suffix_pass(module, variables, cache: KVCache, prefix_length: int, suffix_ids, suffix_length, features,
                layers=(), mutable=()):
    """Run a suffix (ids [Ts], image tokens filled from features [P,D]) after the cached prefix.

    Returns ((last-position logits [V], the cache with the suffix written), collections).
    """

    def run(m):
        embeds = m.embed(suffix_ids[None], features[None])
        hidden, new_cache = m.decode(embeds, cache, prefix_length, layers)
        return m.logits(hidden[0, suffix_length - 1]), new_cache

    if not mutable:
        return module.apply(variables, method=run), {}
    return module.apply(variables, method=run, mutable=list(mutable))


def image_row(module, probs: jax.Array, suffix_length, prefix_length: int, heads) -> jax.Array:
    """Head-mean attention [grid, grid] of the suffix's last position to the prefix image's patches."""
    config = module.config
    row = jnp.take(probs[0], suffix_length - 1, axis=1)  # [N, S]
    start = prefix_length - config.tokens_per_image + int(config.keep_cls_feature)
    patches = row[:, start: start + config.vision.num_patches]
    grid = config.vision.grid_size
    return _head_mean(patches, heads).reshape(grid, grid).astype(jnp.float32)


def _split(prompt: PromptArrays, prefix_length: int):
    return prompt.ids[prefix_length:], prompt.length - prefix_length


def prefix_map(module, params, features, cache: KVCache, prefix_length: int, question: PromptArrays,
               general: PromptArrays, options: MapOptions):
    """rel-att or grad-att from the cached prefix -> (map, question logits [V], question cache)."""
    variables = {"params": params}
    ids, length = _split(question, prefix_length)
    layers = (options.layer,)
    if options.method == "rel_att":
        general_ids, general_length = _split(general, prefix_length)

        def one(suffix_ids, suffix_length):
            (logits, new_cache), state = suffix_pass(module, variables, cache, prefix_length, suffix_ids,
                                                     suffix_length, features, layers, ["intermediates"])
            probs = _sown(state["intermediates"], ATTENTION_PROBS)
            return image_row(module, probs, suffix_length, prefix_length, options.heads), logits, new_cache

        maps, logits, caches = jax.vmap(one)(jnp.stack([ids, general_ids]), jnp.stack([length, general_length]))
        return maps[0] / maps[1], logits[0], jax.tree_util.tree_map(lambda c: c[0], caches)

    shapes = jax.eval_shape(lambda: suffix_pass(module, variables, cache, prefix_length, ids, length, features,
                                                layers, ["perturbations"])[1]["perturbations"])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def score(perturbations):
        (logits, new_cache), state = suffix_pass(module, {**variables, "perturbations": perturbations}, cache,
                                                 prefix_length, ids, length, features, layers, ["intermediates"])
        return _score(logits), (state["intermediates"], logits, new_cache)

    grads, (intermediates, logits, new_cache) = jax.grad(score, has_aux=True)(zeros)
    clip = jax.nn.relu if options.clip_negative else (lambda g: g)
    weighted = _sown(intermediates, ATTENTION_PROBS) * clip(_sown(grads, ATTENTION_PROBS))
    return image_row(module, weighted, length, prefix_length, options.heads), logits, new_cache


def pixel_gradients(module, params, pixels, prefix_ids, prefix_length: int, cache_length: int,
                    question: PromptArrays, general: PromptArrays):
    """dS/d(pixels) [2,H,W,3] of the question and the general prompt from one prefix forward
    -> (gradients, prefix features [P,D], prefix cache of S slots, question logits [V], question cache)."""
    variables = {"params": params}

    def prefix(x):
        features = encode_images(module, params, x[None])[0]
        return features, prefill_prefix(module, params, features, prefix_ids, prefix_length)

    (features, cache), pullback = jax.vjp(prefix, pixels)

    def prompt_gradients(prompt):
        def score(features, cache):
            (logits, new_cache), _ = suffix_pass(module, variables, cache.padded(cache_length), prefix_length,
                                                 *prompt, features)
            return _score(logits), (logits, new_cache)

        cotangents, outputs = jax.grad(score, argnums=(0, 1), has_aux=True)(features, cache)
        return pullback(cotangents)[0], outputs

    # One prompt at a time: a single cotangent of the prefix cache and one backward pass live at once.
    prompts = stack_prompts(_split(question, prefix_length), _split(general, prefix_length))
    gradients, (logits, caches) = jax.lax.map(prompt_gradients, prompts)
    return gradients, features, cache.padded(cache_length), logits[0], jax.tree_util.tree_map(lambda c: c[0], caches)


def prefix_map_passes(module, params, pixels, question: PromptArrays, general: PromptArrays, high_pass,
                      prefix_length: int, cache_length: int, options: MapOptions):
    """Any map of a LLaVA question from one prefix forward -> (map, prefix features [P,D], prefix cache of S
    slots, the question pass (logits [V], cache) from which the original answer is decoded)."""
    prefix_ids = question.ids[:prefix_length]
    if options.method == "pure_grad":
        gradients, features, cache, logits, question_cache = pixel_gradients(
            module, params, pixels, prefix_ids, prefix_length, cache_length, question, general)
        norms = jnp.linalg.norm(gradients.astype(jnp.float32), axis=-1)
        return pixel_gradient_map(module, norms, high_pass), features, cache, (logits, question_cache)
    features = encode_images(module, params, pixels[None])[0]
    cache = prefill_prefix(module, params, features, prefix_ids, cache_length)
    importance, logits, question_cache = prefix_map(module, params, features, cache, prefix_length, question,
                                                    general, options)
    return importance, features, cache, (logits, question_cache)


def prefix_answer_passes(module, params, features, crop_features, cache: KVCache, prefix_length: int,
                         crop_prompt: PromptArrays, original_prompt: PromptArrays, question_pass):
    """The prefills of both answers from the cached prefix -> (first logits [2,V], caches [2], lengths [2]):
    with the crop (its tokens + text as the suffix), and without (the map's question pass when given, else
    its own suffix pass)."""
    variables = {"params": params}
    ids, length = _split(crop_prompt, prefix_length)
    crop_pass, _ = suffix_pass(module, variables, cache, prefix_length, ids, length, crop_features)
    if question_pass is None:
        ids, length = _split(original_prompt, prefix_length)
        question_pass, _ = suffix_pass(module, variables, cache, prefix_length, ids, length, features)
    logits, caches = stack_prompts(crop_pass, question_pass)
    return logits, caches, jnp.stack([crop_prompt.length, original_prompt.length])
