"""The building blocks of ViCrop's importance maps, shared by every map method (`methods.py`).

A map pass is a forward of one prompt with the map's layers captured: over the whole prompt (`prompt_run`), or,
where the family shares a prefix (the text before the original image and the image) between a question's
prompts, over a prompt's suffix after the prefix's KV cache (`suffix_run`; the family cuts the prompt).
`captured_attention` and `attention_times_gradient` turn such a pass into a reader of the sown attention (plain,
or weighted by its gradient); the family turns that reader into a map. All of it is pure and jit-compatible.

Axis letters: N heads, T prompt positions, Ts suffix positions, S cache slots, P image positions, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from flax import traverse_util

from vicrop_jax.families import Family, PromptArrays
from vicrop_jax.families._base import ImageFeatures, PromptSplit
from vicrop_jax.nn.decoding import prefill
from vicrop_jax.nn.llama import KVCache

Run = Callable[[nn.Module], tuple[jax.Array, Any]]  # inside module.apply: -> (last-position logits [V], aux)


class StaticModel(NamedTuple):
    """The hashable parts of a model that shape the compiled programs."""

    module: nn.Module
    family: Family
    normalization: tuple  # (rescale factor, mean, std) of the image processor
    eos_ids: tuple[int, ...]
    prefix_tokens: int | None  # the text before the first image in the shared prefix, None where none is shared

    @property
    def config(self) -> Any:
        return self.module.config


class QuestionPass(NamedTuple):
    """The question prompt's prefill, made by a map pass: the original answer decodes from it."""

    logits: jax.Array  # [V] at the last position
    cache: KVCache


class QuestionPrefill(NamedTuple):
    """A plain answer's question pass, kept for the records a gate goes on to crop: the original's features, the
    last position's logits, the prompt's cache, and its attention map at the method's layer (rel-att's
    numerator)."""

    features: ImageFeatures
    logits: jax.Array  # [V]
    cache: KVCache  # the whole question prompt
    attention: jax.Array  # the family's map of the question's attention (as `Family.attention_map` gives it)


class PrefixMap(NamedTuple):
    """A map computed from the shared prefix, with what the answers reuse."""

    importance: jax.Array  # [gh, gw], or [M, gh, gw] for a method of M candidate maps
    features: ImageFeatures  # of the original image
    cache: KVCache  # the prefix, in a cache of the answers' length
    question_pass: QuestionPass | None  # None when the method ran no question pass the answers can take


def score(logits: jax.Array) -> jax.Array:
    """log softmax of the top logit: the scalar whose gradients the paper reads."""
    top = jnp.argmax(jax.lax.stop_gradient(logits))
    return jax.nn.log_softmax(logits.astype(jnp.float32))[top]


def sown(tree: Any, name: str) -> jax.Array:
    """The one array sown (or perturbed) under `name` anywhere in a variable collection, batch axis dropped."""
    (leaf,) = [v for path, v in traverse_util.flatten_dict(tree).items() if name in path]
    return (leaf[0] if isinstance(leaf, tuple) else leaf)[0]


def prompt_run(family: Family, pixels: jax.Array, prompt: PromptArrays, method) -> Run:
    """A whole prompt over one image (pixels [H,W,3]), the method's layers captured -> (logits [V], None)."""

    def run(m):
        features = family.map_features(m, pixels, prompt, method)
        embeds = m.embed(prompt.ids[None], features)
        cache = KVCache.zeros(m.config.text, 1, prompt.ids.shape[0], m.dtype)
        positions = None if prompt.positions is None else prompt.positions[..., None, :]
        hidden, _ = m.decode(embeds, cache, 0, (method.layer,), positions)
        return m.logits(hidden[0, prompt.length - 1]), None

    return run


def prefill_run(prompt: PromptArrays, features: jax.Array, layers=()) -> Run:
    """A whole prompt over given image features [M, D] into a fresh cache of its own length, the layers captured
    -> (logits [V], cache)."""

    def run(m):
        embeds = m.embed(prompt.ids[None], features[None])
        cache = KVCache.zeros(m.config.text, 1, prompt.ids.shape[0], m.dtype)
        positions = None if prompt.positions is None else prompt.positions[..., None, :]
        hidden, cache = m.decode(embeds, cache, 0, layers, positions)
        return m.logits(hidden[0, prompt.length - 1]), cache

    return run


def split_prompt(static: StaticModel, prompt: PromptArrays, images: list[ImageFeatures]) -> PromptSplit:
    """A prompt over `images` (the original first) cut after the prefix its question's prompts share."""
    return static.family.split_prompt(static.config, prompt, images, static.prefix_tokens)


def suffix_run(cache: KVCache, split: PromptSplit, layers=()) -> Run:
    """A prompt's suffix after the cached prefix (written from slot `split.prefix.length`)
    -> (logits [V], the cache with the suffix written)."""
    suffix = split.suffix

    def run(m):
        embeds = m.embed(suffix.ids[None], split.features[None])
        positions = None if suffix.positions is None else suffix.positions[..., None, :]
        hidden, new_cache = m.decode(embeds, cache, split.prefix.length, layers, positions)
        return m.logits(hidden[0, suffix.length - 1]), new_cache

    return run


def run_plain(module: nn.Module, params: Any, run: Run):
    return module.apply({"params": params}, method=run)


def captured_attention(module: nn.Module, params: Any, run: Run):
    """(reader of the sown attention [N,T,S] by name, (logits, aux)) of one pass."""
    outputs, state = module.apply({"params": params}, method=run, mutable=["intermediates"])
    return (lambda name: sown(state["intermediates"], name)), outputs


def attention_times_gradient(module: nn.Module, params: Any, run: Run, clip_negative: bool):
    """(reader of A * relu(dS/dA) by name, (logits, aux)) of one pass: grad-att's factors for every captured
    attention; without the relu when clip_negative is False."""
    _, weighted, outputs = attention_and_gradient(module, params, run, clip_negative)
    return weighted, outputs


def attention_and_gradient(module: nn.Module, params: Any, run: Run, clip_negative: bool):
    """(reader of A, reader of A * relu(dS/dA), (logits, aux)) of one pass: rel-att's numerator and grad-att's
    map come from the same forward."""
    shapes = jax.eval_shape(lambda: module.apply({"params": params}, method=run, mutable=["perturbations"])[1])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["perturbations"])

    def scored(perturbations):
        outputs, state = module.apply({"params": params, "perturbations": perturbations}, method=run,
                                      mutable=["intermediates"])
        return score(outputs[0]), (state["intermediates"], outputs)

    grads, (intermediates, outputs) = jax.grad(scored, has_aux=True)(zeros)
    clip = jax.nn.relu if clip_negative else (lambda g: g)
    attention = lambda name: sown(intermediates, name)  # noqa: E731
    return attention, (lambda name: attention(name) * clip(sown(grads, name))), outputs


def prefill_prefix(module: nn.Module, params: Any, features: jax.Array, prefix: PromptArrays,
                   cache_length: int) -> KVCache:
    """The prefix (ids [P] with image tokens, features [M, D]) in a fresh cache of S slots, as `prefill` writes
    any prompt (its logits, unused here, are pruned by the compiler)."""
    return prefill(module, params, prefix.ids, prefix.length, features, cache_length, prefix.positions)[1]


def high_pass_mask(image: PIL.Image.Image, resolution: int | tuple[int, int]) -> np.ndarray:
    """Pure-grad's mask [height, width]: fine detail above its median, on the image stretched to res x res (or to
    (width, height)).

    As the published code: bilinear PIL resize (torchvision's TF.resize on PIL), 3x3 Gaussian blur with
    sigma 0.8 and reflect padding (torchvision), median filter of size 7 with scipy's default boundary
    (half-sample symmetric, numpy's 'symmetric').
    """
    width, height = (resolution, resolution) if np.isscalar(resolution) else resolution
    pixels = np.asarray(image.convert("RGB").resize((width, height), PIL.Image.BILINEAR), np.float32)
    pixels = pixels / 255.0
    taps = np.exp(-0.5 * (np.arange(-1, 2) / 0.8) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="reflect")
    rows = sum(taps[i] * padded[i: i + height] for i in range(3))
    blurred = sum(taps[j] * rows[:, j: j + width] for j in range(3))
    detail = np.sqrt(np.square(pixels - blurred).sum(axis=-1))
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(detail, 3, mode="symmetric"), (7, 7))
    filtered = np.median(windows.reshape(height, width, 49), axis=-1)
    return filtered > np.median(filtered)
