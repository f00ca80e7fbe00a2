"""ViCrop's device programs: map -> box -> crops -> encode the original and the crops -> both answers, jitted.

Nothing here asks which family or which method it runs: the family (`StaticModel.family`) says whether a prefix
is shared and how a box maps onto what the processor keeps; the method value says how its map is made. The
answer step takes any number K of crop boxes [K, 4] (static per program): the crops join the original as extra
images of one prompt. The programs compile once per (image bucket, prompt bucket, method value, model).

Axis letters: K crops, V vocabulary, D LM width.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxlib.version import __version_info__ as jaxlib_version

from vicrop_jax._generation import encode_images
from vicrop_jax.families import PromptArrays
from vicrop_jax.nn.decoding import decode_from, prefill, stack_prompts
from vicrop_jax.vicrop.boxes import crop_and_resize_jax, select_bbox_jax
from vicrop_jax.vicrop.maps import PrefixMap, StaticModel, prefill_prefix, run_plain, split_prompt, suffix_run
from vicrop_jax.vicrop.methods import MapMethod

# Under differentiation the model's layers keep only their inputs and recompute the rest (`nn.remat`). XLA's
# default CPU scheduler runs independent work as early as it can, for concurrency, and so recomputes every
# layer before the first backward step, which keeps all activations alive again. Its memory-optimised
# scheduler recomputes a layer when its backward step needs it. Methods that differentiate the whole model
# (`low_memory`) compile with it; other backends ignore the option. jaxlib 0.9.1 replaced the boolean option
# by a scheduler type.
LOW_MEMORY_CPU = (
    {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"} if jaxlib_version >= (0, 9, 1)
    else {"xla_cpu_enable_concurrency_optimized_scheduler": False}
)


class MapInputs(NamedTuple):
    """What a map needs of one record on the device."""

    pixels: jax.Array  # [H, W, 3] the original image, preprocessed
    question: PromptArrays  # the map's question prompt
    general: PromptArrays  # the general prompt (rel-att's and pure-grad's ratio)
    high_pass: jax.Array | None  # pure-grad's mask [res, res], None for the other methods


class CropInputs(NamedTuple):
    """What the crops and answers need of one record on the device."""

    image: jax.Array  # [Hb, Wb, 3] uint8 full-resolution pixels, zero-padded to a size bucket
    image_size: jax.Array  # [2] the true (W, H)
    crop_prompt: PromptArrays  # the prompt over the original and the crops
    original_prompt: PromptArrays  # the prompt over the original alone


class AnswerPasses(NamedTuple):
    """Both answers' prefills, stacked [..., 2]: with the crops first, the original alone second."""

    logits: jax.Array  # [..., 2, V] at the last prompt position
    caches: Any  # KVCache stacked [..., 2]
    lengths: jax.Array  # [..., 2]


class AnswerTokens(NamedTuple):
    with_crops: jax.Array  # [..., max_new_tokens]
    original: jax.Array  # [..., max_new_tokens]


class PipelineOutput(NamedTuple):
    importance: jax.Array  # [..., gh, gw]
    boxes: jax.Array  # [..., K, 4] (left, top, right, bottom) in original pixels
    answers: AnswerTokens


def normalize_crop(crop: jax.Array, normalization: tuple) -> jax.Array:
    """Crop pixels in [0,255] -> model input, as the image processor does after its resize (uint8 rounding)."""
    rescale, mean, std = normalization
    crop = jnp.clip(jnp.round(crop), 0, 255) * rescale
    return (crop - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def crop_pixels(static: StaticModel, crop: CropInputs, boxes: jax.Array, dtype) -> jax.Array:
    """The boxes [K,4] of the full-resolution image as model inputs [K,H,W,3], as the image processor would make
    them (a loop over K, not vmap: the crop's window branch stays a branch)."""
    size = static.config.image_size

    def one(box):
        pixels = crop_and_resize_jax(crop.image, crop.image_size, static.family.processor_box(box), (size, size))
        return normalize_crop(pixels, static.normalization).astype(dtype)

    return jnp.stack([one(boxes[k]) for k in range(boxes.shape[0])])


def answer_passes(static: StaticModel, params, pixels, crops, crop: CropInputs, cache_length: int,
                  prefix: PrefixMap | None = None, reuse_question_pass: bool = False) -> AnswerPasses:
    """Encode the original and the crops [K,H,W,3], prefill both answers' prompts.

    Where the family shares a prefix, it is prefilled once (or taken from the map's `prefix`) and each prompt
    runs its suffix; the original answer reuses the map's question pass when asked to.
    """
    module, prompt = static.module, crop.crop_prompt
    encode = functools.partial(encode_images, module, params)
    if static.prefix_length is None:
        images = jnp.concatenate([pixels[None], crops])
        text = tuple(jnp.broadcast_to(t, (images.shape[0], *t.shape)) for t in prompt.image_text)
        features = encode(images, *text)
        passes = stack_prompts(
            prefill(module, params, prompt.ids, prompt.length, features.reshape(-1, features.shape[-1]), cache_length),
            prefill(module, params, crop.original_prompt.ids, crop.original_prompt.length, features[0], cache_length),
        )
        return AnswerPasses(*passes, jnp.stack([prompt.length, crop.original_prompt.length]))
    question_pass = None
    if prefix is None:
        features = encode(jnp.concatenate([pixels[None], crops]))
        original, crop_features = features[0], features[1:]
        cache = prefill_prefix(module, params, original, prompt.ids[: static.prefix_length], cache_length)
    else:
        original, cache, crop_features = prefix.features, prefix.cache, encode(crops)
        question_pass = prefix.question_pass if reuse_question_pass else None
    suffix = lambda p, features: run_plain(  # noqa: E731
        module, params, suffix_run(cache, static.prefix_length, *split_prompt(p, static.prefix_length), features))
    crop_pass = suffix(prompt, crop_features.reshape(-1, crop_features.shape[-1]))
    if question_pass is None:
        question_pass = suffix(crop.original_prompt, original)
    logits, caches = stack_prompts(tuple(crop_pass), tuple(question_pass))
    return AnswerPasses(logits, caches, jnp.stack([prompt.length, crop.original_prompt.length]))


def decode_answers(static: StaticModel, params, passes: AnswerPasses, max_new_tokens: int) -> AnswerTokens:
    """Answer passes with any leading axes [..., 2] -> both answers' tokens: one decoding loop for all of them
    (a loop inside vmap would copy its caches)."""
    lead = passes.lengths.shape
    flat = lambda a: a.reshape(-1, *a.shape[len(lead):])  # noqa: E731
    tokens = decode_from(static.module, params, flat(passes.logits), jax.tree_util.tree_map(flat, passes.caches),
                         flat(passes.lengths), max_new_tokens, static.eos_ids).reshape(*lead, max_new_tokens)
    return AnswerTokens(tokens[..., 0, :], tokens[..., 1, :])


def map_program(static: StaticModel, params, inputs: MapInputs, cache_length: int, method: MapMethod):
    """The method's map (the family's path) -> (importance, PrefixMap or None)."""
    if static.prefix_length is None:
        return method.whole_prompt_map(static, params, *inputs), None
    prefix = method.prefix_map(static, params, *inputs, cache_length)
    return prefix.importance, prefix


def _map_passes(static: StaticModel, params, inputs: MapInputs, crop: CropInputs, *, method: MapMethod,
                max_new_tokens: int, reuse_question_pass: bool):
    """map -> box -> crop -> the answers' prefills for one record, as traced device code."""
    cache_length = crop.crop_prompt.ids.shape[0] + max_new_tokens
    importance, prefix = map_program(static, params, inputs, cache_length, method)
    boxes = select_bbox_jax(importance, crop.image_size, static.config.image_size)[None]
    crops = crop_pixels(static, crop, boxes, inputs.pixels.dtype)
    passes = answer_passes(static, params, inputs.pixels, crops, crop, cache_length, prefix, reuse_question_pass)
    return importance, boxes, passes


def _jit_per_method(fun, **jit_options):
    """`fun` jit-compiled twice, the `low_memory` methods' programs with `LOW_MEMORY_CPU`; its `method` picks."""
    programs = {False: jax.jit(fun, **jit_options), True: jax.jit(fun, compiler_options=LOW_MEMORY_CPU, **jit_options)}

    @functools.wraps(fun)
    def run(*args, method: MapMethod, **kwargs):
        return programs[method.low_memory](*args, method=method, **kwargs)

    run.programs = tuple(programs.values())
    return run


_STATIC = ("static", "method", "max_new_tokens", "reuse_question_pass")


@functools.partial(_jit_per_method, static_argnames=_STATIC)
def pipeline(static: StaticModel, params, inputs: MapInputs, crop: CropInputs, *, method: MapMethod,
             max_new_tokens: int, reuse_question_pass: bool) -> PipelineOutput:
    """map -> box -> crop -> (map, boxes, answers with the crop and without) for one record."""
    importance, boxes, passes = _map_passes(static, params, inputs, crop, method=method, max_new_tokens=max_new_tokens,
                                            reuse_question_pass=reuse_question_pass)
    return PipelineOutput(importance, boxes, decode_answers(static, params, passes, max_new_tokens))


@functools.partial(_jit_per_method, static_argnames=_STATIC)
def pipeline_batch(static: StaticModel, params, inputs: MapInputs, crop: CropInputs, *, method: MapMethod,
                   max_new_tokens: int, reuse_question_pass: bool) -> PipelineOutput:
    """`pipeline` for a batch of records (a leading axis on every input): everything up to the answers vmapped,
    then one decoding loop for all 2 x batch answers."""
    one = functools.partial(_map_passes, static, params, method=method, max_new_tokens=max_new_tokens,
                            reuse_question_pass=reuse_question_pass)
    importance, boxes, passes = jax.vmap(one)(inputs, crop)
    return PipelineOutput(importance, boxes, decode_answers(static, params, passes, max_new_tokens))


@functools.partial(_jit_per_method, static_argnames=("static", "method"))
def importance_program(static: StaticModel, params, inputs: MapInputs, *, method: MapMethod) -> jax.Array:
    """The map alone, by the family's path."""
    return map_program(static, params, inputs, inputs.question.ids.shape[0], method)[0]


@functools.partial(_jit_per_method, static_argnames=("static", "method"))
def whole_prompt_program(static: StaticModel, params, inputs: MapInputs, *, method: MapMethod) -> jax.Array:
    """The map from full forwards of whole prompts, whatever the family (the reference for the prefix path)."""
    return method.whole_prompt_map(static, params, *inputs)


@functools.partial(jax.jit, static_argnames=("static", "max_new_tokens"))
def crop_and_answer(static: StaticModel, params, pixels, crop: CropInputs, boxes, *, max_new_tokens: int):
    """Crop given boxes [K,4], encode the original and the crops, both answers."""
    crops = crop_pixels(static, crop, boxes, pixels.dtype)
    passes = answer_passes(static, params, pixels, crops, crop, crop.crop_prompt.ids.shape[0] + max_new_tokens)
    return decode_answers(static, params, passes, max_new_tokens)


def compiled_programs() -> int:
    """How many programs the pipeline has compiled so far (a second question of the same shapes adds none)."""
    jitted = [*pipeline.programs, *pipeline_batch.programs, *importance_program.programs,
              *whole_prompt_program.programs, crop_and_answer]
    return sum(program._cache_size() for program in jitted)
