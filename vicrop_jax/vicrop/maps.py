"""ViCrop importance maps (SPEC section 2): rel-att, grad-att and pure-grad, for LLaVA-1.5 and InstructBLIP.

All device work is pure and jit-compatible: `device_map` takes preprocessed arrays and returns the grid
map, so the crop-and-answer pipeline can follow it without a host round trip. Attention comes from the
`sow`n probabilities of the one layer asked for; its gradient from Flax `perturb` and `jax.grad`;
pure-grad from `jax.grad` with respect to the pixel values.

Axis letters: N heads, T prompt positions, P image patches, Q query tokens, H/W pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from flax import traverse_util

from vicrop_jax.nn.llama import ATTENTION_PROBS, KVCache
from vicrop_jax.prompts import GENERAL_QUESTION

METHODS = ("rel_att", "grad_att", "pure_grad")
CROSS_ATTENTION_PROBS = "cross_attention_probs"
DEFAULT_LAYER = {"llava": 14, "instructblip": 15}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MapOptions:
    """Ablation knobs of a map (static: each combination compiles once)."""

    method: str = "rel_att"
    layer: int = 14
    qformer_layer: int = 2
    heads: tuple[int, ...] | None = None
    clip_negative: bool = True
    general_question: str = GENERAL_QUESTION


class PromptArrays(NamedTuple):
    """One prompt on the device: ids right-padded to a bucket, true length, Q-Former text (InstructBLIP)."""

    ids: jax.Array
    length: jax.Array
    qformer_ids: jax.Array | None = None
    qformer_mask: jax.Array | None = None


def check_options(kind: str, config: Any, options: MapOptions) -> None:
    """Clear errors for out-of-range layers and heads, before anything is compiled."""
    if options.method not in METHODS:
        raise ValueError(f"unknown map method {options.method!r}; choose one of {', '.join(METHODS)}")
    num_layers = config.text.num_layers
    if not 0 <= options.layer < num_layers:
        raise ValueError(f"layer {options.layer} is out of range: this model has LM layers 0..{num_layers - 1}")
    if options.heads is not None:
        bad = [h for h in options.heads if not 0 <= h < config.text.num_heads]
        if bad or not options.heads:
            raise ValueError(f"heads {list(options.heads)} invalid: LM heads are 0..{config.text.num_heads - 1}")
    if kind == "instructblip":
        count = config.qformer.num_cross_attention_layers
        if not 0 <= options.qformer_layer < count:
            raise ValueError(
                f"qformer_layer {options.qformer_layer} is out of range: this Q-Former has cross-attention "
                f"layers 0..{count - 1} (counted over cross-attention layers only)"
            )


def _sown(tree: Any, name: str) -> jax.Array:
    """The one array sown (or perturbed) under `name` anywhere in a variable collection."""
    leaves = [v for path, v in traverse_util.flatten_dict(tree).items() if name in path]
    (leaf,) = leaves
    return leaf[0] if isinstance(leaf, tuple) else leaf


def _forward(module, variables, pixels, prompt: PromptArrays, options: MapOptions, mutable):
    """Last-position logits [V] of one prompt over one image, with the map's layers captured."""
    kind_is_blip = prompt.qformer_ids is not None

    def run(m):
        if kind_is_blip:
            features = m.encode_images(
                pixels[None], prompt.qformer_ids[None], prompt.qformer_mask[None], (options.qformer_layer,)
            )
        else:
            features = m.encode_images(pixels[None])
        embeds = m.embed(prompt.ids[None], features)
        cache = KVCache.zeros(m.config.text, 1, prompt.ids.shape[0], m.dtype)
        hidden, _ = m.decode(embeds, cache, 0, (options.layer,))
        return m.logits(hidden[0, prompt.length - 1])

    return module.apply(variables, method=run, mutable=mutable)


def _head_mean(probs: jax.Array, heads: tuple[int, ...] | None) -> jax.Array:
    """probs [N, ...] -> mean over all heads or the listed ones."""
    return probs.mean(0) if heads is None else probs[jnp.asarray(heads)].mean(0)


def _attention_factors(module, prompt: PromptArrays, options: MapOptions, probs, cross_probs):
    """(LM row to the image positions [P or Q], Q-Former cross-attention [Q, P] or None), heads averaged.

    `probs` [N,T,T] of the LM layer; `cross_probs` [N,Q,P+1] of the Q-Former layer (InstructBLIP).
    """
    config = module.config
    row = jnp.take(probs, prompt.length - 1, axis=1)  # [N, T]: the last prompt token's attention
    start = jnp.argmax(prompt.ids == config.image_token_id)
    if cross_probs is None:  # LLaVA: the image positions, CLS dropped when the checkpoint keeps it
        skip = int(getattr(config, "keep_cls_feature", False))
        count = config.vision.num_patches
        lm = jax.lax.dynamic_slice_in_dim(row, start + skip, count, axis=1)
        return _head_mean(lm, options.heads), None
    lm = jax.lax.dynamic_slice_in_dim(row, start, config.num_query_tokens, axis=1)
    return _head_mean(lm, options.heads), cross_probs[:, :, 1:].mean(0)


def _combine(module, lm_factor, qformer_factor) -> jax.Array:
    grid = module.config.vision.image_size // module.config.vision.patch_size
    flat = lm_factor if qformer_factor is None else lm_factor @ qformer_factor
    return flat.reshape(grid, grid).astype(jnp.float32)


def _zero_perturbations(module, variables, pixels, prompt, options):
    shapes = jax.eval_shape(
        lambda: _forward(module, variables, pixels, prompt, options, ["perturbations"])[1]["perturbations"]
    )
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _score(logits: jax.Array) -> jax.Array:
    """log softmax of the top logit: the scalar whose gradients the paper reads."""
    top = jnp.argmax(jax.lax.stop_gradient(logits))
    return jax.nn.log_softmax(logits.astype(jnp.float32))[top]


def attention_map(module, params, pixels, prompt: PromptArrays, options: MapOptions) -> jax.Array:
    """Plain attention map of one prompt (the numerator/denominator of rel-att)."""
    _, state = _forward(module, {"params": params}, pixels, prompt, options, ["intermediates"])
    probs = _sown(state["intermediates"], ATTENTION_PROBS)[0]
    cross = _sown(state["intermediates"], CROSS_ATTENTION_PROBS)[0] if prompt.qformer_ids is not None else None
    return _combine(module, *_attention_factors(module, prompt, options, probs, cross))


def gradient_attention_map(module, params, pixels, prompt: PromptArrays, options: MapOptions) -> jax.Array:
    """grad-att: head means of A * relu(dS/dA) for the LM layer (and the Q-Former layer), one prompt."""
    variables = {"params": params}
    zeros = _zero_perturbations(module, variables, pixels, prompt, options)

    def score(perturbations):
        logits, state = _forward(
            module, {**variables, "perturbations": perturbations}, pixels, prompt, options, ["intermediates"]
        )
        return _score(logits), state["intermediates"]

    grads, intermediates = jax.grad(score, has_aux=True)(zeros)
    clip = jax.nn.relu if options.clip_negative else (lambda g: g)
    weighted = lambda name: (_sown(intermediates, name) * clip(_sown(grads, name)))[0]
    cross = weighted(CROSS_ATTENTION_PROBS) if prompt.qformer_ids is not None else None
    return _combine(module, *_attention_factors(module, prompt, options, weighted(ATTENTION_PROBS), cross))


def pixel_gradient_norm(module, params, pixels, prompt: PromptArrays, options: MapOptions) -> jax.Array:
    """Per-pixel L2 norm over channels of dS/d(pixel values) [H, W]."""

    def score(x):
        return _score(_forward(module, {"params": params}, x, prompt, options, [])[0])

    return jnp.linalg.norm(jax.grad(score)(pixels).astype(jnp.float32), axis=-1)


def block_mean(values: jax.Array, block: int) -> jax.Array:
    h, w = values.shape
    return values.reshape(h // block, block, w // block, block).mean(axis=(1, 3))


def pixel_gradient_map(module, norms: jax.Array, high_pass: jax.Array) -> jax.Array:
    """pure-grad's map from the gradient norms [2, H, W] of the question and the general prompt."""
    return block_mean(norms[0] / norms[1] * high_pass, module.config.vision.patch_size)


def device_map(
    module, params, pixels: jax.Array, question: PromptArrays, general: PromptArrays,
    high_pass: jax.Array, options: MapOptions,
) -> jax.Array:
    """The importance map [grid, grid] of one image (pixels [H,W,3]) for `options.method`; jit-compatible."""
    if options.method == "grad_att":
        return gradient_attention_map(module, params, pixels, question, options)
    both = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), question, general)
    if options.method == "rel_att":
        maps = jax.vmap(lambda p: attention_map(module, params, pixels, p, options))(both)
        return maps[0] / maps[1]
    # one prompt at a time: a backward pass keeps every layer's activations, two at once would double the peak
    norms = jax.lax.map(lambda p: pixel_gradient_norm(module, params, pixels, p, options), both)
    return pixel_gradient_map(module, norms, high_pass)


def high_pass_mask(image: PIL.Image.Image, resolution: int) -> np.ndarray:
    """Pure-grad's mask (SPEC section 2): fine detail above its median, on the image stretched to res x res.

    As the published code: bilinear PIL resize (torchvision's TF.resize on PIL), 3x3 Gaussian blur with
    sigma 0.8 and reflect padding (torchvision), median filter of size 7 with scipy's default boundary
    (half-sample symmetric, numpy's 'symmetric').
    """
    pixels = np.asarray(image.convert("RGB").resize((resolution, resolution), PIL.Image.BILINEAR), np.float32)
    pixels = pixels / 255.0
    taps = np.exp(-0.5 * (np.arange(-1, 2) / 0.8) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="reflect")
    rows = sum(taps[i] * padded[i: i + resolution] for i in range(3))
    blurred = sum(taps[j] * rows[:, j: j + resolution] for j in range(3))
    detail = np.sqrt(np.square(pixels - blurred).sum(axis=-1))
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(detail, 3, mode="symmetric"), (7, 7))
    filtered = np.median(windows.reshape(resolution, resolution, 49), axis=-1)
    return filtered > np.median(filtered)
