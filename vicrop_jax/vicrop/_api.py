"""ViCrop end to end: importance map -> box -> crop -> encode both images -> answer.

Two paths give the same box and (within preprocessing tolerance) the same answers:
- the device path (default): one jit-compiled program from pixels to answer tokens (`_pipeline.py`), no host
  round trip between the map and the answer;
- the host path (`device_pipeline=False`): map on the device, box on the host (`boxes.select_bbox`), crop with
  PIL and the checkpoint's image processor, as the published code does.

Here the host prepares named device inputs (`MapInputs`, `CropInputs`) and turns the programs' outputs into
`Answer`s; a method given by name becomes a value once, in `resolve_method`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np
import PIL.Image

from vicrop_jax._generation import ImageLike, generate_ids, pixel_values, prompt_inputs, prompt_problem
from vicrop_jax._loading import Model
from vicrop_jax.nn.decoding import strip_generated
from vicrop_jax.preprocessing import load_image
from vicrop_jax.vicrop import _pipeline
from vicrop_jax.vicrop._pipeline import CropInputs, MapInputs
from vicrop_jax.vicrop.boxes import select_bbox, stitch_maps, tile_boxes, tile_grid
from vicrop_jax.vicrop.maps import StaticModel
from vicrop_jax.vicrop.methods import FixedCrop, MapMethod, NoCrop, Strategy, resolve_method

HIGH_RES_THRESHOLD = 1024
IMAGE_BUCKET = 256
NUM_CROPS = 1  # the paper's: one crop per question
LARGE_IMAGE_PIXELS = 4096 * 4096  # an image above this runs in a batch of its own


@dataclasses.dataclass(frozen=True)
class Answer:
    answer: str  # with the crop as a second image (equal to original_answer for method "none")
    original_answer: str  # the original image only
    bbox: tuple[int, int, int, int] | None  # (left, top, right, bottom) in original pixels
    importance: np.ndarray | None  # the map [grid_h, grid_w] for map methods
    timings: dict[str, float]


class BatchError(ValueError):
    """Some records of `answer_batch` could not be answered; the others were. `answers` holds an Answer per record
    (None where it failed), `failures` the position and reason of each failed one."""

    def __init__(self, answers: list[Answer | None], failures: list[tuple[int, str]]):
        self.answers, self.failures = answers, failures
        listed = "; ".join(f"record {i}: {why}" for i, why in failures[:10])
        more = f" and {len(failures) - 10} more" if len(failures) > 10 else ""
        super().__init__(f"{len(failures)} of {len(answers)} record(s) failed ({listed}{more}); the others were "
                         "answered: see .answers")


def question_problem(model: Model, question: str, max_new_tokens: int, short_question: str | None = None, *,
                     answered: bool = True) -> str | None:
    """Why a question cannot be asked (empty; the map's prompt, or the answer's with the crops, too long), or
    None. `answered=False` checks the map's prompt only (an importance map decodes nothing)."""
    if not question.strip():
        return "empty question"
    prompts = [(short_question or question, 1)] + ([(question, 1 + NUM_CROPS)] if answered else [])
    for text, images in prompts:
        problem = prompt_problem(model, model.family.prompt(text, images), images, max_new_tokens)
        if problem is not None:
            return problem
    return None


def _check_question(model: Model, question: str, max_new_tokens: int, short_question: str | None = None, *,
                    answered: bool = True) -> None:
    problem = question_problem(model, question, max_new_tokens, short_question, answered=answered)
    if problem is not None:
        raise ValueError(problem)


def base_size(model: Model) -> int:
    return model.config.image_size


def static_model(model: Model) -> StaticModel:
    config = model.image_config
    normalization = (config.rescale_factor, tuple(config.image_mean), tuple(config.image_std))
    return StaticModel(model.module, model.family, normalization, model.config.text.eos_token_ids,
                       model.family.prefix_length(model))


def image_array(image: PIL.Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution pixels zero-padded to a size bucket (one compile per bucket), and the true (W, H)."""
    width, height = image.size
    bucket = lambda n: -(-n // IMAGE_BUCKET) * IMAGE_BUCKET  # noqa: E731
    padded = np.zeros((bucket(height), bucket(width), 3), np.uint8)
    padded[:height, :width] = np.asarray(image)
    return padded, np.array([width, height], np.int32)


def map_inputs(model: Model, image: PIL.Image.Image, question: str, method: MapMethod) -> MapInputs:
    family = model.family
    question_arrays, general_arrays = family.prompt_arrays(
        model, [family.prompt(question), family.prompt(method.general_question)])
    return MapInputs(pixel_values(model, [image])[0], question_arrays, general_arrays,
                     method.high_pass(image, model.config.image_size))


def crop_inputs(model: Model, image: PIL.Image.Image, question: str, num_crops: int = NUM_CROPS) -> CropInputs:
    family = model.family
    [crop_prompt] = family.prompt_arrays(model, [family.prompt(question, 1 + num_crops)], num_images=1 + num_crops)
    [original_prompt] = family.prompt_arrays(model, [family.prompt(question)])
    return CropInputs(*image_array(image), crop_prompt, original_prompt)


def device_crop(model: Model, image: ImageLike, box: Sequence[int]) -> np.ndarray:
    """The model input [H,W,3] the device path makes of one box of an image."""
    image = load_image(image)
    crop = crop_inputs(model, image, "")
    return np.asarray(_pipeline.crop_pixels(static_model(model), crop, np.asarray([box], np.int32), np.float32)[0])


def _single_map(model: Model, image: PIL.Image.Image, question: str, method: MapMethod) -> np.ndarray:
    inputs = map_inputs(model, image, question, method)
    return np.asarray(_pipeline.importance_program(static_model(model), model.params, inputs, method=method))


def whole_prompt_map(model: Model, image: ImageLike, question: str, method: MapMethod) -> np.ndarray:
    """The map from full forwards of whole prompts, also for families whose maps run after a shared prefix."""
    inputs = map_inputs(model, load_image(image), question, method)
    return np.asarray(_pipeline.whole_prompt_program(static_model(model), model.params, inputs, method=method))


def lower_map(model: Model, image: ImageLike, question: str, method: MapMethod) -> jax.stages.Lowered:
    """The map's program lowered for these inputs (to inspect its compiled memory or HLO)."""
    inputs = map_inputs(model, load_image(image), question, method)
    program = _pipeline.importance_program.programs[method.low_memory]
    return program.lower(static_model(model), model.params, inputs, method=method)


def _high_res_map(model: Model, image: PIL.Image.Image, question: str, method: MapMethod) -> np.ndarray:
    """One map per tile of at most 1024 px, stitched in tile order."""
    rows, cols, _, _ = tile_grid(image.size, HIGH_RES_THRESHOLD)
    tiles = [image.crop(box) for box in tile_boxes(image.size, HIGH_RES_THRESHOLD, clip=False)]
    return stitch_maps([_single_map(model, tile, question, method) for tile in tiles], rows, cols)


def _map_method(model: Model, method: str | Strategy, options: dict) -> MapMethod:
    strategy = resolve_method(model, method, **options)
    if not isinstance(strategy, MapMethod):
        raise ValueError(f"method {strategy.name!r} makes no map: use a map method for importance maps")
    return strategy


def importance_map(model: Model, image: ImageLike, question: str, method: str | Strategy = "rel_att", *,
                   high_res: bool = False, **options) -> np.ndarray:
    """The importance map (float32, grid-shaped) of `method` for a question about an image.

    method: a name (rel_att, grad_att, pure_grad) with its options (layer, qformer_layer, heads,
    general_question, clip_negative), or a `MapMethod` value. With high_res=True, images with a side above
    1024 px are tiled and the tile maps stitched.
    """
    method = _map_method(model, method, options)
    _check_question(model, question, 0, answered=False)
    image = load_image(image)
    if high_res and max(image.size) > HIGH_RES_THRESHOLD:
        return _high_res_map(model, image, question, method)
    return _single_map(model, image, question, method)


def _decode(model: Model, tokens) -> str:
    return model.tokenizer.decode(strip_generated(np.asarray(tokens)))


def _box(box) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in np.asarray(box))


def answer(model: Model, image: ImageLike, question: str, method: str | Strategy = "rel_att", *,
           short_question: str | None = None, high_res: bool = False, max_new_tokens: int = 20,
           bbox: Sequence[float] | None = None, seed: int = 0, device_pipeline: bool = True,
           **options) -> Answer:
    """Answer with ViCrop: the map of `method` picks a box, the crop joins the original as a second image.

    method: a name, rel_att, grad_att, pure_grad (maps) or the baselines none, gt (needs `bbox`), random,
    center, with its options as keywords; or a `Strategy` value. `short_question` (V*-style) is used for the
    map only. `device_pipeline=False` runs the host path.
    """
    strategy = resolve_method(model, method, **options)
    _check_question(model, question, max_new_tokens, short_question)
    start = time.perf_counter()
    image = load_image(image)
    if isinstance(strategy, NoCrop):
        pixels = pixel_values(model, [image])
        ids, image_text = prompt_inputs(model, model.family.prompt(question), 1)
        text = model.tokenizer.decode(generate_ids(model, pixels, ids, max_new_tokens, image_text))
        return Answer(text, text, None, None, {"total": time.perf_counter() - start})
    crop = crop_inputs(model, image, question)
    static = static_model(model)
    map_question = short_question or question
    if isinstance(strategy, MapMethod):
        if device_pipeline and not (high_res and max(image.size) > HIGH_RES_THRESHOLD):
            out = _pipeline.pipeline(static, model.params, map_inputs(model, image, map_question, strategy), crop,
                                     method=strategy, max_new_tokens=max_new_tokens,
                                     reuse_question_pass=short_question is None)
            return Answer(_decode(model, out.answers.with_crops), _decode(model, out.answers.original),
                          _box(np.asarray(out.boxes)[0]), np.asarray(out.importance),
                          {"total": time.perf_counter() - start})
    box, importance = host_box(model, image, map_question, strategy, high_res=high_res, bbox=bbox, seed=seed)
    map_done = time.perf_counter()
    pixels = pixel_values(model, [image])[0]
    if device_pipeline:
        tokens = _pipeline.crop_and_answer(static, model.params, pixels, crop, np.asarray([box], np.int32),
                                           max_new_tokens=max_new_tokens)
        texts = _decode(model, tokens.with_crops), _decode(model, tokens.original)
    else:
        texts = _host_answers(model, image, question, pixels, box, max_new_tokens)
    timings = {"map": map_done - start, "answer": time.perf_counter() - map_done, "total": time.perf_counter() - start}
    return Answer(*texts, _box(box), importance, timings)


def host_box(model: Model, image: PIL.Image.Image, question: str, strategy: Strategy, *, high_res: bool = False,
             bbox: Sequence[float] | None = None, seed: int = 0) -> tuple[tuple[int, int, int, int], np.ndarray | None]:
    """(the box a map method or a crop baseline chooses, the map or None), on the host path."""
    if isinstance(strategy, MapMethod):
        importance = importance_map(model, image, question, strategy, high_res=high_res)
        return select_bbox(importance, image.size, base_size(model)), importance
    if isinstance(strategy, FixedCrop):
        return strategy.box(image.size, base_size(model), bbox, seed), None
    raise ValueError(f"method {strategy.name!r} is neither a map method nor a crop baseline")


def _host_answers(model: Model, image: PIL.Image.Image, question: str, pixels: np.ndarray, box,
                  max_new_tokens: int) -> tuple[str, str]:
    """The published path: PIL crop, the image processor on the crop, two generations."""
    family = model.family
    crop_pixels = pixel_values(model, [image.crop(_box(box))])[0]
    ids, image_text = prompt_inputs(model, family.prompt(question, 2), 2)
    with_crop = generate_ids(model, np.stack([pixels, crop_pixels]), ids, max_new_tokens, image_text)
    ids, image_text = prompt_inputs(model, family.prompt(question, 1), 1)
    original = generate_ids(model, pixels[None], ids, max_new_tokens, image_text)
    return model.tokenizer.decode(with_crop), model.tokenizer.decode(original)


def _stack(trees: list) -> Any:
    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *trees)


def batch_inputs(model: Model, images: list[PIL.Image.Image], questions: list[str], map_questions: list[str],
                 method: MapMethod) -> tuple[MapInputs, CropInputs]:
    """Device inputs of `pipeline_batch`: images padded to one size bucket, prompts to one length bucket."""
    family = model.family
    arrays = [image_array(image) for image in images]
    padded = np.zeros((len(images), max(a.shape[0] for a, _ in arrays), max(a.shape[1] for a, _ in arrays), 3),
                      np.uint8)
    for i, (array, _) in enumerate(arrays):
        padded[i, : array.shape[0], : array.shape[1]] = array
    *map_prompts, general = family.prompt_arrays(
        model, [family.prompt(q) for q in map_questions] + [family.prompt(method.general_question)])
    high_pass = [method.high_pass(image, model.config.image_size) for image in images]
    inputs = MapInputs(pixel_values(model, images), _stack(map_prompts), _stack([general] * len(images)),
                       None if high_pass[0] is None else np.stack(high_pass))
    crop = CropInputs(
        padded, np.stack([size for _, size in arrays]),
        _stack(family.prompt_arrays(model, [family.prompt(q, 1 + NUM_CROPS) for q in questions],
                                    num_images=1 + NUM_CROPS)),
        _stack(family.prompt_arrays(model, [family.prompt(q) for q in questions])),
    )
    return inputs, crop


def answer_batch(model: Model, images: Sequence[ImageLike], questions: Sequence[str],
                 method: str | Strategy = "rel_att", *, short_questions: Sequence[str | None] | None = None,
                 batch_size: int = 8, max_new_tokens: int = 20, bboxes: Sequence | None = None,
                 high_res: bool = False, seed: int = 0, **options) -> list[Answer]:
    """`answer` for many (image, question) pairs: map methods run as one vmapped program per batch.

    Images are padded to one size bucket and prompts to one length bucket, so a run compiles once per bucket and
    batch size (a short last batch is not padded, a very large image runs alone). Baselines and
    high-resolution tiling run record by record. A record that cannot run (an unreadable image, an empty or too
    long question) does not stop the others: they are answered, then `BatchError` lists the failures and holds
    every answer.
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions: pass one image per question")
    strategy = resolve_method(model, method, **options)
    short_questions = list(short_questions) if short_questions is not None else [None] * len(questions)
    boxes = list(bboxes) if bboxes is not None else [None] * len(questions)
    answers: list[Answer | None] = [None] * len(questions)
    failures: list[tuple[int, str]] = []
    ready = []
    for i, (image, question, short) in enumerate(zip(images, questions, short_questions)):
        problem = question_problem(model, question, max_new_tokens, short)
        if problem is None:
            try:
                ready.append((i, load_image(image), question, short))
            except Exception as error:  # a missing or unreadable file: that record's failure alone
                problem = f"unreadable image: {error}"
        if problem is not None:
            failures.append((i, problem))
    if not isinstance(strategy, MapMethod) or high_res:
        for i, image, question, short in ready:
            try:
                answers[i] = answer(model, image, question, strategy, short_question=short, high_res=high_res,
                                    bbox=boxes[i], seed=seed + i, max_new_tokens=max_new_tokens)
            except ValueError as error:  # e.g. method gt without a box
                failures.append((i, str(error)))
    else:
        for begin in range(0, len(ready), batch_size):
            chunk = ready[begin: begin + batch_size]
            results = run_padded_batch(model, [c[1] for c in chunk], [c[2] for c in chunk],
                                       [c[3] or c[2] for c in chunk], strategy, max_new_tokens, batch_size)
            for (i, *_), result in zip(chunk, results):
                answers[i] = result
    if failures:
        raise BatchError(answers, sorted(failures))
    return answers


def padded_batch_size(count: int, devices: int = 1) -> int:
    """The records a batch of `count` runs as: `count`, rounded up to a multiple of the devices."""
    return -(-count // devices) * devices


def image_groups(images: Sequence[PIL.Image.Image]) -> list[list[int]]:
    """Positions of a batch's images that run together: all but the very large ones, which run alone, so that
    one large image does not pad every other image of its batch to its size."""
    large = [i for i, image in enumerate(images) if image.width * image.height > LARGE_IMAGE_PIXELS]
    rest = [i for i in range(len(images)) if i not in large]
    return ([rest] if rest else []) + [[i] for i in large]


def run_padded_batch(model: Model, images: list[PIL.Image.Image], questions: list[str], map_questions: list[str],
                     method: MapMethod, max_new_tokens: int, batch_size: int,
                     mesh: jax.sharding.Mesh | None = None) -> list[Answer]:
    """Vmapped pipeline calls for up to `batch_size` records: one for the images of ordinary size, one per very
    large image (`image_groups`), each padded only to a multiple of the mesh's devices.

    With a mesh (axis "data"), a batch is split over its devices; the model's parameters are used where they
    are (replicate them over the mesh once per run, as `vicrop-jax eval` does).
    """
    if len(questions) > batch_size:
        raise ValueError(f"{len(questions)} records for a batch of {batch_size}")
    answers: list[Answer | None] = [None] * len(questions)
    for group in image_groups(images):
        for i, result in zip(group, _run_group(model, [images[i] for i in group], [questions[i] for i in group],
                                               [map_questions[i] for i in group], method, max_new_tokens, mesh)):
            answers[i] = result
    return answers


def _run_group(model: Model, images: list[PIL.Image.Image], questions: list[str], map_questions: list[str],
               method: MapMethod, max_new_tokens: int, mesh: jax.sharding.Mesh | None) -> list[Answer]:
    start = time.perf_counter()
    count = len(questions)
    fill = padded_batch_size(count, 1 if mesh is None else mesh.size) - count
    records = batch_inputs(model, images + images[-1:] * fill, questions + questions[-1:] * fill,
                           map_questions + map_questions[-1:] * fill, method)
    if mesh is not None:
        records = jax.device_put(records, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    out = jax.device_get(_pipeline.pipeline_batch(
        static_model(model), model.params, *records, method=method, max_new_tokens=max_new_tokens,
        reuse_question_pass=map_questions == questions,
    ))
    elapsed = time.perf_counter() - start
    timings = {"total": elapsed / count, "batch": elapsed, "batch_records": count}  # this record's share, the batch
    return [
        Answer(_decode(model, out.answers.with_crops[i]), _decode(model, out.answers.original[i]),
               _box(out.boxes[i, 0]), out.importance[i], dict(timings))
        for i in range(count)
    ]
