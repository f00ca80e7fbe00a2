"""ViCrop's device programs: map -> box -> crops -> encode the original and the crops -> both answers, jitted.

Nothing here asks which family or which method it runs: the family (`StaticModel.family`) says whether a prefix
is shared and how a box maps onto what the processor keeps; the method value says how its maps are made, how
many boxes each gives (K, static per program) and which answer to keep. A method makes M candidate maps (one,
or rel-att's and grad-att's for method "auto"); each gives K boxes, the paper's rule with the earlier boxes'
cells suppressed; its crops join the original as extra images of one prompt, prefilled once per crop count the
method allows (K, or 1 and 2 for regions="auto", where the map's mass outside the first box picks); of several
candidates, the answer whose first token is the most probable is decoded. The programs compile once per (image
bucket, prompt bucket, method value, model).

Axis letters: M candidate maps, K crops, V vocabulary, D LM width.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxlib.version import __version_info__ as jaxlib_version

from vicrop_jax.families import PromptArrays
from vicrop_jax.families._base import ImageFeatures
from vicrop_jax.nn.decoding import decode_from, prefill, stack_prompts
from vicrop_jax.vicrop.boxes import outside_mass_jax, select_boxes_jax
from vicrop_jax.vicrop.maps import (PrefixMap, QuestionPrefill, StaticModel, captured_attention, prefill_prefix,
                                    prefill_run, run_plain, split_prompt, suffix_run)
from vicrop_jax.vicrop.methods import Geometry, MapMethod

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
    crop_prompts: tuple[PromptArrays, ...]  # the prompt over the original and c crops, per c of `crop_counts`
    original_prompt: PromptArrays  # the prompt over the original alone
    crop_sizes: jax.Array | None = None  # a family at native resolution: the crop sizes it may meet and their
    geometry: Any = None  # processed sizes [C, 4], and the static shapes of its crops (a pytree without leaves)


class AnswerPasses(NamedTuple):
    """Both answers' prefills, stacked [..., 2]: with the crops first, the original alone second."""

    logits: jax.Array  # [..., 2, V] at the last prompt position
    caches: Any  # KVCache stacked [..., 2]
    lengths: jax.Array  # [..., 2]
    position_offsets: jax.Array | None = None  # [..., 2] multimodal RoPE's answer offsets, None without


class AnswerTokens(NamedTuple):
    with_crops: jax.Array  # [..., max_new_tokens]
    original: jax.Array  # [..., max_new_tokens]


class Choice(NamedTuple):
    """What a record's program chose where a method leaves it open (fixed to 0 and K otherwise)."""

    candidate: jax.Array  # [...] the map whose crops answered (`MapMethod.candidate_names`)
    regions: jax.Array  # [...] how many of its boxes were cropped
    confidence: jax.Array  # [...] the probability of the first answer token with those crops


class PipelineOutput(NamedTuple):
    importance: jax.Array  # [..., gh, gw] the chosen candidate's map (as the family's map program gives it)
    boxes: jax.Array  # [..., K, 4] (left, top, right, bottom) in original pixels, the first `choice.regions` cropped
    answers: AnswerTokens
    choice: Choice
    crop_lengths: jax.Array  # [..., M, counts] the length of each candidate's prompt of each crop count


def first_token_confidence(logits: jax.Array) -> jax.Array:
    """The probability of the greedy first token, from the logits [..., V] at the last prompt position."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).max(axis=-1)


def _take(tree, index):
    return jax.tree_util.tree_map(lambda leaf: leaf[index], tree)


def answer_passes(static: StaticModel, params, pixels, boxes, crop: CropInputs, cache_length: int,
                  counts: tuple[int, ...], count_choice: jax.Array, prefix: PrefixMap | None = None,
                  reuse_question_pass: bool = False) -> tuple[AnswerPasses, Choice, jax.Array]:
    """Crop each candidate's boxes [M, K, 4], encode the original and the crops, prefill both answers' prompts.

    Candidate m answers with its first c crops, c = `counts[count_choice[m]]` (`crop.crop_prompts` holds one
    prompt per count); of several candidates, the one whose first answer token is the most probable is kept.
    Where the family shares a prefix, it is prefilled once (or taken from the map's `prefix`) and each prompt
    runs its suffix; the original answer reuses the map's question pass when asked to. Also returns the length of
    each candidate's prompt of each count [M, counts].
    """
    module, family, (candidates, regions) = static.module, static.family, boxes.shape[:2]
    crops = family.crop_views(static, crop, boxes.reshape(-1, 4), pixels.dtype)
    question_pass, cache = None, None
    if prefix is None:
        original, crop_features = family.answer_features(module, params, pixels, crops, crop.original_prompt)
        if static.prefix_tokens is not None:
            split = split_prompt(static, crop.original_prompt, [original])
            cache = prefill_prefix(module, params, original.features, split.prefix, cache_length)
    else:
        original, cache, crop_features = prefix.features, prefix.cache, family.crop_features(module, params, crops)
        question_pass = prefix.question_pass if reuse_question_pass else None
    crop_features = jax.tree_util.tree_map(lambda leaf: leaf.reshape(candidates, regions, *leaf.shape[1:]),
                                           crop_features)

    def prompt_pass(prompt: PromptArrays, images: list[ImageFeatures]):
        """(logits, cache, length, rotary offset) of a prompt over the images (the original first), after the
        shared prefix where there is one."""
        if cache is None:
            prompt, features = family.answer_prompt(static.config, prompt, images)
            logits, new_cache = prefill(module, params, prompt.ids, prompt.length, features, cache_length,
                                        prompt.positions)
            return logits, new_cache, prompt.length, prompt.position_offset
        split = split_prompt(static, prompt, images)
        logits, new_cache = run_plain(module, params, suffix_run(cache, split))
        return logits, new_cache, split.prefix.length + split.suffix.length, split.suffix.position_offset

    def with_crops(m):
        """Candidate m's pass with the crop count it chose (all counts prefilled, one kept), and every count's
        prompt length."""
        crops_of = lambda count: [jax.tree_util.tree_map(lambda leaf: leaf[m, i], crop_features)  # noqa: E731
                                  for i in range(count)]
        passes = [prompt_pass(prompt, [original] + crops_of(count))
                  for prompt, count in zip(crop.crop_prompts, counts)]
        lengths = jnp.stack([length for _, _, length, _ in passes])
        if len(passes) == 1:
            return passes[0], lengths
        return _take(stack_prompts(*passes), count_choice[m]), lengths

    chosen = [with_crops(m) for m in range(candidates)]
    crop_lengths = jnp.stack([lengths for _, lengths in chosen])
    if candidates == 1:
        crop_pass, pick = chosen[0][0], jnp.int32(0)
    else:
        confidences = jnp.stack([first_token_confidence(logits) for (logits, *_), _ in chosen])
        pick = jnp.argmax(confidences).astype(jnp.int32)
        crop_pass = _take(stack_prompts(*(passed for passed, _ in chosen)), pick)
    if question_pass is None:
        question_pass = prompt_pass(crop.original_prompt, [original])
    else:
        question_pass = (*question_pass, crop.original_prompt.length, crop.original_prompt.position_offset)
    logits, caches, lengths, offsets = stack_prompts(tuple(crop_pass), tuple(question_pass))
    choice = Choice(pick, jnp.asarray(counts, jnp.int32)[count_choice[pick]], first_token_confidence(logits[0]))
    return AnswerPasses(logits, caches, lengths, offsets), choice, crop_lengths


def decode_answers(static: StaticModel, params, passes: AnswerPasses, max_new_tokens: int) -> AnswerTokens:
    """Answer passes with any leading axes [..., 2] -> both answers' tokens: one decoding loop for all of them
    (a loop inside vmap would copy its caches)."""
    lead = passes.lengths.shape
    flat = lambda a: a.reshape(-1, *a.shape[len(lead):])  # noqa: E731
    offsets = None if passes.position_offsets is None else flat(passes.position_offsets)
    tokens = decode_from(static.module, params, flat(passes.logits), jax.tree_util.tree_map(flat, passes.caches),
                         flat(passes.lengths), max_new_tokens, static.eos_ids, offsets).reshape(*lead, max_new_tokens)
    return AnswerTokens(tokens[..., 0, :], tokens[..., 1, :])


def map_program(static: StaticModel, params, inputs: MapInputs, cache_length: int, method: MapMethod,
                prefilled: QuestionPrefill | None = None):
    """The method's map (the family's path; after a plain answer's pass where a gate ran it) -> (importance,
    PrefixMap or None)."""
    if static.prefix_tokens is None:
        return method.whole_prompt_map(static, params, *inputs), None
    prefix = method.prefix_map(static, params, *inputs, cache_length, prefilled)
    return prefix.importance, prefix


def map_frame(static: StaticModel, image_size: jax.Array, method: MapMethod) -> jax.Array | None:
    """The part of the image [4] the map is laid on: the whole image as published (None), or with
    `geometry="exact"` the part the family's processor keeps (LLaVA: the centre square)."""
    if method.geometry is Geometry.PAPER:
        return None
    width, height = image_size[0], image_size[1]
    return static.family.processor_box(jnp.stack([0, 0, width, height]).astype(jnp.int32))


def _map_passes(static: StaticModel, params, inputs: MapInputs, crop: CropInputs, prefilled=None, *,
                method: MapMethod, max_new_tokens: int, reuse_question_pass: bool):
    """map(s) -> boxes -> crops -> the answers' prefills for one record, as traced device code."""
    family = static.family
    cache_length = max(prompt.ids.shape[0] for prompt in crop.crop_prompts) + max_new_tokens
    importance, prefix = map_program(static, params, inputs, cache_length, method, prefilled)
    maps = importance if method.candidate_names else importance[None]  # [M, ...]: one per candidate
    grids, grid_size = family.map_canvases(static.config, maps, inputs.question, crop.geometry)
    frame = map_frame(static, crop.image_size, method)
    counts, base = method.crop_counts, family.crop_size(static.config)
    boxes = jnp.stack([select_boxes_jax(grid, crop.image_size, base, max(counts), frame, grid_size=grid_size)
                       for grid in grids])
    if len(counts) == 1:
        count_choice = jnp.zeros(len(grids), jnp.int32)
    else:  # regions="auto": the second box when the map's mass outside the first passes the threshold
        count_choice = jnp.stack([
            (outside_mass_jax(grid, b[0], crop.image_size, frame, grid_size=grid_size)
             > method.second_region_mass).astype(jnp.int32)
            for grid, b in zip(grids, boxes)])
    passes, choice, crop_lengths = answer_passes(static, params, inputs.pixels, boxes, crop, cache_length, counts,
                                                 count_choice, prefix, reuse_question_pass)
    return maps[choice.candidate], boxes[choice.candidate], passes, choice, crop_lengths


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
    """map -> boxes -> crops -> (map, boxes, answers with the crops and without, choices) for one record."""
    importance, boxes, passes, choice, crop_lengths = _map_passes(static, params, inputs, crop, method=method,
                                                                  max_new_tokens=max_new_tokens,
                                                                  reuse_question_pass=reuse_question_pass)
    return PipelineOutput(importance, boxes, decode_answers(static, params, passes, max_new_tokens), choice,
                          crop_lengths)


@functools.partial(_jit_per_method, static_argnames=_STATIC)
def pipeline_batch(static: StaticModel, params, inputs: MapInputs, crop: CropInputs,
                   prefilled: QuestionPrefill | None = None, *, method: MapMethod, max_new_tokens: int,
                   reuse_question_pass: bool) -> PipelineOutput:
    """`pipeline` for a batch of records (a leading axis on every input): everything up to the answers vmapped,
    then one decoding loop for all 2 x batch answers. `prefilled`: the records' plain answer passes, which a gate
    ran first (`prefill_batch`)."""
    one = functools.partial(_map_passes, static, params, method=method, max_new_tokens=max_new_tokens,
                            reuse_question_pass=reuse_question_pass)
    importance, boxes, passes, choice, crop_lengths = jax.vmap(one)(inputs, crop, prefilled)
    return PipelineOutput(importance, boxes, decode_answers(static, params, passes, max_new_tokens), choice,
                          crop_lengths)


@functools.partial(jax.jit, static_argnames=("static", "max_new_tokens"))
def plain_batch(static: StaticModel, params, pixels, prompt: PromptArrays, *, max_new_tokens: int):
    """The plain answers of a batch (pixels with a leading batch axis, prompts over the original alone) ->
    (tokens [B, T], the probability of each first token [B]): the baseline's answer and a gate's first step."""
    cache_length = prompt.ids.shape[-1] + max_new_tokens

    def one(pixels, prompt):
        features = static.family.image_features(static.module, params, pixels, prompt)
        return prefill(static.module, params, prompt.ids, prompt.length, features, cache_length, prompt.positions)

    logits, caches = jax.vmap(one)(pixels, prompt)
    tokens = decode_from(static.module, params, logits, caches, prompt.length, max_new_tokens, static.eos_ids,
                         prompt.position_offset)
    return tokens, first_token_confidence(logits)


@functools.partial(jax.jit, static_argnames=("static", "method", "max_new_tokens"))
def prefill_batch(static: StaticModel, params, inputs: MapInputs, *, method: MapMethod, max_new_tokens: int):
    """A gate's first step: the plain answers of a batch from its map inputs' question prompts -> (tokens [B, T],
    the probability of each first token [B], `QuestionPrefill`s [B] for the records the gate then crops)."""
    family, module = static.family, static.module
    cache_length = inputs.question.ids.shape[-1] + max_new_tokens

    def one(pixels, prompt):
        features = family.original_features(module, params, pixels, prompt)
        read, (logits, cache) = captured_attention(module, params, prefill_run(prompt, features.features,
                                                                                (method.layer,)))
        attention = family.attention_map(static.config, read, prompt.length - 1, prompt, method)
        return QuestionPrefill(features, logits, cache, attention)

    prefilled = jax.vmap(one)(inputs.pixels, inputs.question)
    caches = jax.vmap(lambda cache: cache.padded(cache_length))(prefilled.cache)
    tokens = decode_from(module, params, prefilled.logits, caches, inputs.question.length, max_new_tokens,
                         static.eos_ids, inputs.question.position_offset)
    return tokens, first_token_confidence(prefilled.logits), prefilled


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
    """Crop given boxes [K,4], encode the original and the crops -> (both answers, their prompts' lengths [2])
    (`crop.crop_prompts`: the prompt over the original and the K crops)."""
    cache_length = crop.crop_prompts[0].ids.shape[0] + max_new_tokens
    passes, _, _ = answer_passes(static, params, pixels, boxes[None], crop, cache_length, (boxes.shape[0],),
                                 jnp.zeros(1, jnp.int32))
    return decode_answers(static, params, passes, max_new_tokens), passes.lengths


def compiled_programs() -> int:
    """How many programs the pipeline has compiled so far (a second question of the same shapes adds none)."""
    jitted = [*pipeline.programs, *pipeline_batch.programs, *importance_program.programs,
              *whole_prompt_program.programs, crop_and_answer, plain_batch, prefill_batch]
    return sum(program._cache_size() for program in jitted)
