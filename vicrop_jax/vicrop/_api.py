"""ViCrop end to end: importance map -> box -> crop -> encode both images -> answer.

Two paths give the same box and (within preprocessing tolerance) the same answers:
- the device path (default): one jit-compiled program from pixels to answer tokens, no host round trip
  between the map and the answer (box selection with fixed shapes, crop and resize with static shapes,
  `boxes.crop_and_resize_jax`), compiled once per (image bucket, prompt bucket, options);
- the host path (`device_pipeline=False`): map on the device, box on the host (`boxes.select_bbox`),
  crop with PIL and the checkpoint's image processor, as the published code does.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from jaxlib.version import __version_info__ as jaxlib_version

from vicrop_jax._generation import ImageLike, encode_images, generate_ids, pixel_values, prompt_inputs
from vicrop_jax._loading import Model
from vicrop_jax.vicrop._prepare import map_options, prompt_arrays, question_prompt
from vicrop_jax.vicrop.boxes import (
    center_box, crop_and_resize_jax, grow_box, random_box, select_bbox, select_bbox_jax, stitch_maps, tile_boxes,
    tile_grid,
)
from vicrop_jax.nn.decoding import decode_from, prefill, stack_prompts, strip_generated
from vicrop_jax.vicrop.maps import MapOptions, PromptArrays, device_map, high_pass_mask
from vicrop_jax.vicrop._prefix import prefill_prefix, prefix_answer_passes, prefix_map_passes
from vicrop_jax.preprocessing import load_image

MAP_METHODS = ("rel_att", "grad_att", "pure_grad")
BASELINES = ("none", "gt", "random", "center")
HIGH_RES_THRESHOLD = 1024
IMAGE_BUCKET = 256

# Under differentiation the model's layers keep only their inputs and recompute the rest (`nn.remat`). XLA's
# default CPU scheduler runs independent work as early as it can, for concurrency, and so recomputes every
# layer before the first backward step, which keeps all activations alive again. Its memory-optimised
# scheduler recomputes a layer when its backward step needs it (medium pure-grad map: 360 -> 98 MiB of XLA
# temporaries). Pure-grad's programs, which differentiate the whole model, compile with it; other backends
# ignore the option. jaxlib 0.9.1 replaced the boolean option by a scheduler type.
LOW_MEMORY_CPU = (
    {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"} if jaxlib_version >= (0, 9, 1)
    else {"xla_cpu_enable_concurrency_optimized_scheduler": False}
)


def _jit_per_method(fun, **jit_options):
    """`fun` jit-compiled twice, pure-grad's programs with `LOW_MEMORY_CPU`; its keyword `options` picks."""
    programs = {False: jax.jit(fun, **jit_options), True: jax.jit(fun, compiler_options=LOW_MEMORY_CPU, **jit_options)}

    @functools.wraps(fun)
    def run(*args, options: MapOptions, **kwargs):
        return programs[options.method == "pure_grad"](*args, options=options, **kwargs)

    run.programs = programs
    return run


@dataclasses.dataclass(frozen=True)
class Answer:
    answer: str  # with the crop as a second image (equal to original_answer for method "none")
    original_answer: str  # the original image only
    bbox: tuple[int, int, int, int] | None  # (left, top, right, bottom) in original pixels
    importance: np.ndarray | None  # the map [grid_h, grid_w] for map methods
    timings: dict[str, float]


def base_size(model: Model) -> int:
    return model.config.image_size


def _image_array(image: PIL.Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution pixels zero-padded to a size bucket (one compile per bucket), and the true (W, H)."""
    width, height = image.size
    bucket = lambda n: -(-n // IMAGE_BUCKET) * IMAGE_BUCKET
    padded = np.zeros((bucket(height), bucket(width), 3), np.uint8)
    padded[:height, :width] = np.asarray(image)
    return padded, np.array([width, height], np.int32)


def _normalize_crop(crop: jax.Array, normalization: tuple) -> jax.Array:
    """Crop pixels in [0,255] -> model input, as the image processor does after its resize (uint8 rounding)."""
    rescale, mean, std = normalization
    crop = jnp.clip(jnp.round(crop), 0, 255) * rescale
    return (crop - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _processor_box(kind: str, box: jax.Array) -> jax.Array:
    """The part of a box that the processor keeps: CLIP center-crops to a square after resizing."""
    if kind != "llava":
        return box
    width, height = box[2] - box[0], box[3] - box[1]
    side = jnp.minimum(width, height)
    left = box[0] + (width - side) // 2
    top = box[1] + (height - side) // 2
    return jnp.stack([left, top, left + side, top + side])


def _crop_pixels(model_static, image, image_size, box, dtype):
    """The box of the full-resolution image as model input, as the image processor would make it."""
    module, kind, normalization = model_static[:3]
    size = module.config.image_size
    crop = crop_and_resize_jax(image, image_size, _processor_box(kind, box), (size, size))
    return _normalize_crop(crop, normalization).astype(dtype)


def _crop_passes(model_static, params, pixels, image, image_size, box, crop_prompt, original_prompt,
                 max_new_tokens):
    """Crop the box, encode original + crop, prefill both prompts -> (first logits [2,V], caches [2], lengths [2])
    of the answer with the crop and of the original answer, ready for `decode_from`.

    LLaVA's two prompts start with the same `[BOS, image]` prefix: it is prefilled once (`_prefix.py`).
    """
    module, kind = model_static[:2]
    crop_pixels = _crop_pixels(model_static, image, image_size, box, pixels.dtype)
    cache_length = crop_prompt.ids.shape[0] + max_new_tokens
    if kind == "llava":
        prefix_length = model_static[4]
        features = encode_images(module, params, jnp.stack([pixels, crop_pixels]))
        cache = prefill_prefix(module, params, features[0], crop_prompt.ids[:prefix_length], cache_length)
        return prefix_answer_passes(module, params, features[0], features[1], cache, prefix_length, crop_prompt,
                                    original_prompt, None)
    query_text = (jnp.stack([crop_prompt.qformer_ids] * 2), jnp.stack([crop_prompt.qformer_mask] * 2))
    features = encode_images(module, params, jnp.stack([pixels, crop_pixels]), *query_text)
    logits, caches = stack_prompts(
        prefill(module, params, crop_prompt.ids, crop_prompt.length, features.reshape(-1, features.shape[-1]),
                cache_length),
        prefill(module, params, original_prompt.ids, original_prompt.length, features[0], cache_length),
    )
    return logits, caches, jnp.stack([crop_prompt.length, original_prompt.length])


def _decode_answers(model_static, params, logits, caches, lengths, max_new_tokens):
    """Answer passes with any leading axes [..., 2] -> tokens of the answers with the crop and without
    [..., max_new_tokens] each: one decoding loop for all of them (a loop inside vmap would copy its caches)."""
    module, eos_ids = model_static[0], model_static[3]
    lead = lengths.shape
    flat = lambda a: a.reshape(-1, *a.shape[len(lead):])  # noqa: E731
    tokens = decode_from(module, params, flat(logits), jax.tree_util.tree_map(flat, caches), flat(lengths),
                         max_new_tokens, eos_ids).reshape(*lead, max_new_tokens)
    return tokens[..., 0, :], tokens[..., 1, :]


def _crop_and_answer(model_static, params, pixels, image, image_size, box, crop_prompt, original_prompt,
                     max_new_tokens):
    """Device program: crop the box, encode original + crop, both answers."""
    passes = _crop_passes(model_static, params, pixels, image, image_size, box, crop_prompt, original_prompt,
                          max_new_tokens)
    return _decode_answers(model_static, params, *passes, max_new_tokens)


def _prefix_passes_one(model_static, params, pixels, image, image_size, question, general, high_pass, crop_prompt,
                       original_prompt, *, options: MapOptions, max_new_tokens: int, reuse_question_pass: bool):
    """The LLaVA map pipeline up to the answers' decoding, from one prefix forward (see `_prefix.py`)."""
    module, prefix_length = model_static[0], model_static[4]
    importance, features, cache, question_pass = prefix_map_passes(
        module, params, pixels, question, general, high_pass, prefix_length,
        crop_prompt.ids.shape[0] + max_new_tokens, options)
    box = select_bbox_jax(importance, image_size, module.config.image_size)
    crop_features = encode_images(module, params, _crop_pixels(model_static, image, image_size, box,
                                                               pixels.dtype)[None])[0]
    passes = prefix_answer_passes(module, params, features, crop_features, cache, prefix_length, crop_prompt,
                                  original_prompt, question_pass if reuse_question_pass else None)
    return importance, box, passes


def _passes_one(model_static, params, pixels, image, image_size, question, general, high_pass, crop_prompt,
                original_prompt, *, options: MapOptions, max_new_tokens: int, reuse_question_pass: bool):
    """map -> box -> crop -> the answers' prefills for one record, as traced device code."""
    module = model_static[0]
    if model_static[1] == "llava":
        return _prefix_passes_one(model_static, params, pixels, image, image_size, question, general, high_pass,
                                  crop_prompt, original_prompt, options=options, max_new_tokens=max_new_tokens,
                                  reuse_question_pass=reuse_question_pass)
    importance = device_map(module, params, pixels, question, general, high_pass, options)
    box = select_bbox_jax(importance, image_size, module.config.image_size)
    passes = _crop_passes(model_static, params, pixels, image, image_size, box, crop_prompt, original_prompt,
                          max_new_tokens)
    return importance, box, passes


_STATIC = ("model_static", "options", "max_new_tokens", "reuse_question_pass")


@functools.partial(_jit_per_method, static_argnames=_STATIC)
def _pipeline(model_static, params, *record, options: MapOptions, max_new_tokens: int,
              reuse_question_pass: bool):
    """map -> box -> crop -> (map, box, answer with the crop, original answer) for one record."""
    importance, box, passes = _passes_one(model_static, params, *record, options=options,
                                          max_new_tokens=max_new_tokens, reuse_question_pass=reuse_question_pass)
    return importance, box, *_decode_answers(model_static, params, *passes, max_new_tokens)


@functools.partial(_jit_per_method, static_argnames=_STATIC)
def _pipeline_batch(model_static, params, *records, options: MapOptions, max_new_tokens: int,
                    reuse_question_pass: bool):
    """`_pipeline` for a batch of records (leading axis of every record array): everything up to the answers
    vmapped, then one decoding loop for all 2 x batch answers."""
    one = functools.partial(_passes_one, model_static, params, options=options, max_new_tokens=max_new_tokens,
                            reuse_question_pass=reuse_question_pass)
    importance, box, passes = jax.vmap(one)(*records)
    return importance, box, *_decode_answers(model_static, params, *passes, max_new_tokens)


_map_jit = _jit_per_method(device_map, static_argnums=(0,), static_argnames=("options",))
_crop_and_answer_jit = jax.jit(_crop_and_answer, static_argnames=("model_static", "max_new_tokens"))


def _model_static(model: Model):
    """The hashable parts of a model that shape the compiled programs."""
    config = model.image_config
    normalization = (config.rescale_factor, tuple(config.image_mean), tuple(config.image_std))
    prefix_length = len(prompt_inputs(model, "<image>", 1)[0]) if model.kind == "llava" else 0
    return (model.module, model.kind, normalization, model.config.text.eos_token_ids, prefix_length)


def _map_inputs(model: Model, image: PIL.Image.Image, question: str, options: MapOptions):
    """(question prompt, general prompt, high-pass mask) of one map; the mask is all ones but for pure-grad."""
    question_arrays, general_arrays = prompt_arrays(
        model, [question_prompt(model, question), question_prompt(model, options.general_question)]
    )
    return question_arrays, general_arrays, _high_pass(model, image, options)


def _high_pass(model: Model, image: PIL.Image.Image, options: MapOptions) -> np.ndarray:
    """Pure-grad's high-pass mask as float32 [res, res]; all ones for the other methods (it is unused)."""
    size = model.config.image_size
    if options.method == "pure_grad":
        return high_pass_mask(image, size).astype(np.float32)
    return np.ones((size, size), np.float32)


@functools.partial(_jit_per_method, static_argnames=("model_static", "options"))
def _prefix_map_jit(model_static, params, pixels, question, general, high_pass, *, options: MapOptions):
    return prefix_map_passes(model_static[0], params, pixels, question, general, high_pass, model_static[4],
                             question.ids.shape[0], options)[0]


def _single_map(model: Model, image: PIL.Image.Image, question: str, options: MapOptions) -> np.ndarray:
    """LLaVA's maps run from one prefix forward (`_prefix.py`); InstructBLIP's run whole prompts, whose
    image features depend on the prompt (the Q-Former reads the text)."""
    pixels = pixel_values(model, [image])[0]
    inputs = _map_inputs(model, image, question, options)
    if model.kind == "llava":
        return np.asarray(_prefix_map_jit(_model_static(model), model.params, pixels, *inputs, options=options))
    return np.asarray(_map_jit(model.module, model.params, pixels, *inputs, options=options))


def _high_res_map(model: Model, image: PIL.Image.Image, question: str, options: MapOptions) -> np.ndarray:
    """SPEC section 4: one map per tile of at most 1024 px, stitched in tile order."""
    rows, cols, _, _ = tile_grid(image.size, HIGH_RES_THRESHOLD)
    tiles = [image.crop(box) for box in tile_boxes(image.size, HIGH_RES_THRESHOLD, clip=False)]
    return stitch_maps([_single_map(model, tile, question, options) for tile in tiles], rows, cols)


def importance_map(model: Model, image: ImageLike, question: str, method: str = "rel_att", *,
                   high_res: bool = False, **options) -> np.ndarray:
    """The importance map (float32, grid-shaped) of `method` for a question about an image.

    options: layer, qformer_layer, heads, general_question, clip_negative (see SPEC section 2).
    With high_res=True, images with a side above 1024 px are tiled and the tile maps stitched.
    """
    opts = map_options(model, method, **options)
    image = load_image(image)
    if high_res and max(image.size) > HIGH_RES_THRESHOLD:
        return _high_res_map(model, image, question, opts)
    return _single_map(model, image, question, opts)


def _baseline_box(model: Model, method: str, image_size, bbox, seed: int):
    base = base_size(model)
    if method == "gt":
        if bbox is None:
            raise ValueError("method 'gt' needs the ground-truth box: pass bbox=(x1, y1, x2, y2)")
        return grow_box(bbox, image_size, base)
    if method == "random":
        return random_box(image_size, base, np.random.default_rng(seed))
    return center_box(image_size, base)


def _answer_prompts(model: Model, question: str) -> tuple[PromptArrays, PromptArrays]:
    crop_prompt = prompt_arrays(model, [question_prompt(model, question, 2)], num_images=2)[0]
    original_prompt = prompt_arrays(model, [question_prompt(model, question, 1)])[0]
    return crop_prompt, original_prompt


def _decode(model: Model, tokens) -> str:
    return model.tokenizer.decode(strip_generated(np.asarray(tokens)))


def answer(model: Model, image: ImageLike, question: str, method: str = "rel_att", *,
           short_question: str | None = None, high_res: bool = False, max_new_tokens: int = 20,
           bbox: Sequence[float] | None = None, seed: int = 0, device_pipeline: bool = True,
           **options) -> Answer:
    """Answer with ViCrop: the map of `method` picks a box, the crop joins the original as a second image.

    method: rel_att, grad_att, pure_grad (maps), or the baselines none, gt (needs `bbox`), random, center.
    `short_question` (V*-style) is used for the map only. `device_pipeline=False` runs the host path.
    """
    if method not in MAP_METHODS + BASELINES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(MAP_METHODS + BASELINES)}")
    start = time.perf_counter()
    image = load_image(image)
    pixels = pixel_values(model, [image])[0]
    if method == "none":
        ids, image_text = prompt_inputs(model, question_prompt(model, question), 1)
        text = model.tokenizer.decode(generate_ids(model, pixels[None], ids, max_new_tokens, image_text))
        return Answer(text, text, None, None, {"total": time.perf_counter() - start})
    crop_prompt, original_prompt = _answer_prompts(model, question)
    image_array, image_size = _image_array(image)
    static = _model_static(model)
    map_question = short_question or question
    if method in MAP_METHODS:
        opts = map_options(model, method, **options)
        if device_pipeline and not (high_res and max(image.size) > HIGH_RES_THRESHOLD):
            question_arrays, general_arrays, high_pass = _map_inputs(model, image, map_question, opts)
            importance, box, with_crop, original = _pipeline(
                static, model.params, pixels, image_array, image_size, question_arrays, general_arrays,
                high_pass, crop_prompt, original_prompt, options=opts, max_new_tokens=max_new_tokens,
                reuse_question_pass=short_question is None,
            )
            return Answer(_decode(model, with_crop), _decode(model, original),
                          tuple(int(v) for v in np.asarray(box)), np.asarray(importance),
                          {"total": time.perf_counter() - start})
        importance = importance_map(model, image, map_question, method, high_res=high_res, **options)
        box = select_bbox(importance, image.size, base_size(model))
    else:
        importance, box = None, _baseline_box(model, method, image.size, bbox, seed)
    map_done = time.perf_counter()
    if device_pipeline:
        with_crop, original = _crop_and_answer_jit(
            static, model.params, pixels, image_array, image_size, np.asarray(box, np.int32), crop_prompt,
            original_prompt, max_new_tokens=max_new_tokens,
        )
        texts = _decode(model, with_crop), _decode(model, original)
    else:
        texts = _host_answers(model, image, question, pixels, box, max_new_tokens)
    timings = {"map": map_done - start, "answer": time.perf_counter() - map_done, "total": time.perf_counter() - start}
    return Answer(*texts, tuple(int(v) for v in box), importance, timings)


def _host_answers(model: Model, image: PIL.Image.Image, question: str, pixels: np.ndarray, box,
                  max_new_tokens: int) -> tuple[str, str]:
    """The published path: PIL crop, the image processor on the crop, two generations."""
    crop_pixels = pixel_values(model, [image.crop(tuple(int(v) for v in box))])[0]
    ids, image_text = prompt_inputs(model, question_prompt(model, question, 2), 2)
    with_crop = generate_ids(model, np.stack([pixels, crop_pixels]), ids, max_new_tokens, image_text)
    ids, image_text = prompt_inputs(model, question_prompt(model, question, 1), 1)
    original = generate_ids(model, pixels[None], ids, max_new_tokens, image_text)
    return model.tokenizer.decode(with_crop), model.tokenizer.decode(original)


def _stack(trees: list) -> Any:
    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *trees)


def _batch_records(model: Model, images: list[PIL.Image.Image], questions: list[str], map_questions: list[str],
                   options: MapOptions) -> tuple:
    """Host inputs of `_pipeline_batch`: images padded to one size bucket, prompts to one length bucket."""
    arrays = [_image_array(image) for image in images]
    height = max(a.shape[0] for a, _ in arrays)
    width = max(a.shape[1] for a, _ in arrays)
    padded = np.zeros((len(images), height, width, 3), np.uint8)
    for i, (array, _) in enumerate(arrays):
        padded[i, : array.shape[0], : array.shape[1]] = array
    map_prompts = prompt_arrays(model, [question_prompt(model, q) for q in map_questions]
                                + [question_prompt(model, options.general_question)])
    general = map_prompts[-1]
    high_pass = np.stack([_high_pass(model, image, options) for image in images])
    return (
        pixel_values(model, images), padded, np.stack([s for _, s in arrays]), _stack(map_prompts[:-1]),
        _stack([general] * len(images)), high_pass,
        _stack(prompt_arrays(model, [question_prompt(model, q, 2) for q in questions], num_images=2)),
        _stack(prompt_arrays(model, [question_prompt(model, q) for q in questions])),
    )


def answer_batch(model: Model, images: Sequence[ImageLike], questions: Sequence[str], method: str = "rel_att", *,
                 short_questions: Sequence[str | None] | None = None, batch_size: int = 8,
                 max_new_tokens: int = 20, bboxes: Sequence | None = None, high_res: bool = False,
                 seed: int = 0, **options) -> list[Answer]:
    """`answer` for many (image, question) pairs: map methods run as one vmapped program per batch.

    Each batch is padded to `batch_size` records (the last by repeating its final record), images to one
    size bucket and prompts to one length bucket, so a run compiles once per bucket. Baselines and
    high-resolution tiling run record by record.
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions: pass one image per question")
    short_questions = list(short_questions) if short_questions is not None else [None] * len(questions)
    if method not in MAP_METHODS or high_res:
        boxes = list(bboxes) if bboxes is not None else [None] * len(questions)
        return [
            answer(model, image, question, method, short_question=short, high_res=high_res, bbox=box,
                   seed=seed + i, max_new_tokens=max_new_tokens, **options)
            for i, (image, question, short, box) in enumerate(zip(images, questions, short_questions, boxes))
        ]
    opts = map_options(model, method, **options)
    results: list[Answer] = []
    for begin in range(0, len(questions), batch_size):
        chunk = slice(begin, begin + batch_size)
        map_questions = [s or q for s, q in zip(short_questions[chunk], questions[chunk])]
        results.extend(run_padded_batch(model, [load_image(image) for image in images[chunk]],
                                        list(questions[chunk]), map_questions, opts, max_new_tokens, batch_size))
    return results


def run_padded_batch(model: Model, images: list[PIL.Image.Image], questions: list[str], map_questions: list[str],
                     options: MapOptions, max_new_tokens: int, batch_size: int,
                     mesh: jax.sharding.Mesh | None = None) -> list[Answer]:
    """One vmapped pipeline call for up to `batch_size` records, padded by repeating the last one.

    With a mesh (axis "data"), the batch is split over its devices and the parameters replicated.
    """
    start = time.perf_counter()
    count, fill = len(questions), batch_size - len(questions)
    records = _batch_records(model, images + images[-1:] * fill, questions + questions[-1:] * fill,
                             map_questions + map_questions[-1:] * fill, options)
    params = model.params
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params = jax.device_put(params, replicated)
        records = jax.device_put(records, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    importance, box, with_crop, original = jax.device_get(_pipeline_batch(
        _model_static(model), params, *records, options=options, max_new_tokens=max_new_tokens,
        reuse_question_pass=map_questions == questions,
    ))
    elapsed = (time.perf_counter() - start) / count
    return [
        Answer(_decode(model, with_crop[i]), _decode(model, original[i]), tuple(int(v) for v in box[i]),
               importance[i], {"total": elapsed})
        for i in range(count)
    ]
