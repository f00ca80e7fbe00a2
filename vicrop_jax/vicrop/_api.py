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
from typing import NamedTuple, Sequence

import jax
import numpy as np
import PIL.Image

from vicrop_jax._generation import ImageLike, generate_ids, prompt_problem
from vicrop_jax._loading import Model
from vicrop_jax.nn.decoding import strip_generated
from vicrop_jax.preprocessing import load_image
from vicrop_jax.prompts import NO_WORD, YES_WORD
from vicrop_jax.vicrop import _pipeline
from vicrop_jax.vicrop._pipeline import CropInputs, MapInputs
from vicrop_jax.vicrop.boxes import Box, outside_mass, select_boxes, stitch_maps, tile_boxes, tile_grid
from vicrop_jax.vicrop.maps import StaticModel
from vicrop_jax.vicrop.methods import FixedCrop, Geometry, MapMethod, NoCrop, Strategy, resolve_method
from vicrop_jax.vicrop.strategy import Cost
from vicrop_jax.vicrop.zoom import (
    MAX_TARGET_TOKENS, AnswerViews, Focus, Search, ZoomStrategy, combined_relevance, focus_relevance,
    target_from_question, target_rows, yes_probabilities,
)

HIGH_RES_THRESHOLD = 1024
LARGE_IMAGE_PIXELS = 4096 * 4096  # an image above this runs in a batch of its own


@dataclasses.dataclass(frozen=True)
class Answer:
    answer: str  # with the crops as extra images (equal to original_answer when nothing was cropped)
    original_answer: str  # the original image only
    boxes: tuple[Box, ...]  # the cropped boxes (left, top, right, bottom) in original pixels, in map order
    importance: np.ndarray | None  # the map [grid_h, grid_w] for map methods (method "auto": the chosen one)
    timings: dict[str, float]
    confidence: float | None = None  # with a gate: the probability of the plain answer's first token
    chosen: str | None = None  # method "auto": the map whose crop answered
    cost: Cost | None = None  # the model passes it took, as the published procedure runs them

    @property
    def bbox(self) -> Box | None:
        """The first crop box, None when nothing was cropped."""
        return self.boxes[0] if self.boxes else None

    @property
    def cropped(self) -> bool:
        return bool(self.boxes)


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
                     answered: bool = True, crops: int = 1) -> str | None:
    """Why a question cannot be asked (empty; the map's prompt, or the answer's with `crops` crops, too long), or
    None. `answered=False` checks the map's prompt only (an importance map decodes nothing)."""
    if not question.strip():
        return "empty question"
    prompts = [(short_question or question, 1)] + ([(question, 1 + crops)] if answered else [])
    for text, images in prompts:
        problem = prompt_problem(model, model.family.prompt(text, images), images, max_new_tokens)
        if problem is not None:
            return problem
    return None


def most_crops(strategy: Strategy) -> int:
    """The most crops a strategy's answer prompt may hold."""
    return max(strategy.crop_counts) if isinstance(strategy, MapMethod) else 1


def _check_question(model: Model, question: str, max_new_tokens: int, short_question: str | None = None, *,
                    answered: bool = True, crops: int = 1) -> None:
    problem = question_problem(model, question, max_new_tokens, short_question, answered=answered, crops=crops)
    if problem is not None:
        raise ValueError(problem)


def base_size(model: Model) -> int:
    return model.family.crop_size(model.config)


def static_model(model: Model) -> StaticModel:
    config = model.image_config
    normalization = (config.rescale_factor, tuple(config.image_mean), tuple(config.image_std))
    return StaticModel(model.module, model.family, normalization, model.config.text.eos_token_ids,
                       model.family.prefix_tokens(model))


def image_array(model: Model, image: PIL.Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution pixels zero-padded to the family's size bucket (one compile per bucket), and the true
    (W, H)."""
    width, height = image.size
    bucket = model.family.image_bucket
    padded = np.zeros((bucket(height), bucket(width), 3), np.uint8)
    padded[:height, :width] = np.asarray(image)
    return padded, np.array([width, height], np.int32)


def map_inputs(model: Model, image: PIL.Image.Image, question: str, method: MapMethod) -> MapInputs:
    """A map's inputs of one record: `map_batch` of one."""
    return jax.tree_util.tree_map(lambda leaf: leaf[0], MapInputs(*model.family.map_batch(model, [image], [question],
                                                                                         method)))


def crop_batch(model: Model, images: list[PIL.Image.Image], questions: list[str], counts: tuple[int, ...],
               boxes=None) -> CropInputs:
    """The crop step's inputs of a batch (a leading axis on every leaf), with the prompt of each number of crops
    in `counts`; `boxes`: each record's boxes where they are given rather than selected."""
    arrays = [image_array(model, image) for image in images]
    padded = np.zeros((len(images), max(a.shape[0] for a, _ in arrays), max(a.shape[1] for a, _ in arrays), 3),
                      np.uint8)
    for i, (array, _) in enumerate(arrays):
        padded[i, : array.shape[0], : array.shape[1]] = array
    prompts = model.family.answer_batch_prompts(model, images, questions, counts, base_size(model), boxes)
    return CropInputs(padded, np.stack([size for _, size in arrays]), *prompts)


def crop_inputs(model: Model, image: PIL.Image.Image, question: str, counts: tuple[int, ...] = (1,),
                boxes=None) -> CropInputs:
    """The crop step's inputs of one record, with the prompt of each number of crops in `counts`."""
    return jax.tree_util.tree_map(lambda leaf: leaf[0], crop_batch(model, [image], [question], counts,
                                                                   None if boxes is None else [boxes]))


def device_crop(model: Model, image: ImageLike, box: Sequence[int]) -> np.ndarray:
    """The model input the device path makes of one box of an image (fixed-size families: pixels [H,W,3])."""
    image = load_image(image)
    crop = crop_inputs(model, image, "", boxes=[tuple(box)])
    views = model.family.crop_views(static_model(model), crop, np.asarray([box], np.int32), np.float32)
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf[0]), views)


def _single_map(model: Model, image: PIL.Image.Image, question: str, method: MapMethod) -> tuple[np.ndarray, Cost]:
    """The map on the image's grid, and the passes it took."""
    inputs = map_inputs(model, image, question, method)
    importance = _pipeline.importance_program(static_model(model), model.params, inputs, method=method)
    cost = method.map_cost(int(inputs.question.length), int(inputs.general.length))
    return model.family.host_map(model, image, np.asarray(importance)), cost


def whole_prompt_map(model: Model, image: ImageLike, question: str, method: MapMethod) -> np.ndarray:
    """The map from full forwards of whole prompts, also for families whose maps run after a shared prefix."""
    image = load_image(image)
    importance = _pipeline.whole_prompt_program(static_model(model), model.params,
                                                map_inputs(model, image, question, method), method=method)
    return model.family.host_map(model, image, np.asarray(importance))


def lower_map(model: Model, image: ImageLike, question: str, method: MapMethod) -> jax.stages.Lowered:
    """The map's program lowered for these inputs (to inspect its compiled memory or HLO)."""
    inputs = map_inputs(model, load_image(image), question, method)
    program = _pipeline.importance_program.programs[method.low_memory]
    return program.lower(static_model(model), model.params, inputs, method=method)


def _high_res_map(model: Model, image: PIL.Image.Image, question: str, method: MapMethod) -> tuple[np.ndarray, Cost]:
    """One map per tile of at most 1024 px, stitched in tile order."""
    rows, cols, _, _ = tile_grid(image.size, HIGH_RES_THRESHOLD)
    tiles = [image.crop(box) for box in tile_boxes(image.size, HIGH_RES_THRESHOLD, clip=False)]
    maps, costs = zip(*(_single_map(model, tile, question, method) for tile in tiles))
    return stitch_maps(list(maps), rows, cols), sum(costs, Cost())


def _map(model: Model, image: PIL.Image.Image, question: str, method: MapMethod, high_res: bool
         ) -> tuple[np.ndarray, Cost]:
    if high_res and max(image.size) > HIGH_RES_THRESHOLD:
        return _high_res_map(model, image, question, method)
    return _single_map(model, image, question, method)


def _map_method(model: Model, method: str | Strategy, options: dict) -> MapMethod:
    strategy = resolve_method(model, method, **options)
    if not isinstance(strategy, MapMethod):
        raise ValueError(f"method {strategy.name!r} makes no map: use a map method for importance maps")
    return strategy


def importance_map(model: Model, image: ImageLike, question: str, method: str | Strategy = "rel_att", *,
                   high_res: bool = False, **options) -> np.ndarray:
    """The importance map (float32, grid-shaped) of `method` for a question about an image.

    method: a name (rel_att, grad_att, pure_grad, auto) with its options (layer, qformer_layer, heads,
    general_question, clip_negative), or a `MapMethod` value; method auto gives both its maps [2, gh, gw].
    With high_res=True, images with a side above 1024 px are tiled and the tile maps stitched.
    """
    method = _map_method(model, method, options)
    _check_question(model, question, 0, answered=False)
    return _map(model, load_image(image), question, method, high_res)[0]


def _box(box) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in np.asarray(box))


def answer(model: Model, image: ImageLike, question: str, method: str | Strategy = "rel_att", *,
           short_question: str | None = None, high_res: bool = False, max_new_tokens: int = 20,
           bbox: Sequence | None = None, seed: int = 0, device_pipeline: bool = True, target: str | None = None,
           **options) -> Answer:
    """Answer with ViCrop: the map of `method` picks the boxes, the crops join the original as extra images.

    method: a name, rel_att, grad_att, pure_grad, auto (maps) or the baselines none, gt (needs `bbox`: one box
    or a list of boxes), random, center, with its options as keywords (maps: regions, gate, geometry, ...); or
    a `Strategy` value; or the competing strategies focus and zoom_search, which look for `target` (default:
    `target_from_question`). `short_question` (V*-style) is used for the map only. `device_pipeline=False` runs
    the host path.
    """
    strategy = resolve_method(model, method, **options)
    _check_question(model, question, max_new_tokens, short_question, crops=most_crops(strategy))
    start = time.perf_counter()
    image = load_image(image)
    if isinstance(strategy, NoCrop):
        [plain] = plain_answers(model, [image], [question], max_new_tokens)
        return Answer(plain.text, plain.text, (), None, {"total": time.perf_counter() - start}, cost=plain.cost)
    if isinstance(strategy, ZoomStrategy):
        return _zoom_answer(model, image, question, strategy, zoom_target(target, short_question or question),
                            max_new_tokens, start)
    tiled = high_res and max(image.size) > HIGH_RES_THRESHOLD
    if isinstance(strategy, MapMethod) and strategy.gate is not None and device_pipeline and not tiled:
        [result] = run_padded_batch(model, [image], [question], [short_question or question], strategy,
                                    max_new_tokens, 1)
        return result
    if isinstance(strategy, MapMethod) and strategy.gate is not None:
        [plain] = plain_answers(model, [image], [question], max_new_tokens)
        if plain.confidence >= strategy.gate:
            return Answer(plain.text, plain.text, (), None, {"total": time.perf_counter() - start}, plain.confidence,
                          cost=plain.cost)
        cropped = answer(model, image, question, strategy.program_method, short_question=short_question,
                         high_res=high_res, max_new_tokens=max_new_tokens, device_pipeline=device_pipeline)
        timings = {**cropped.timings, "total": time.perf_counter() - start}
        return dataclasses.replace(cropped, timings=timings, confidence=plain.confidence,
                                   cost=plain.cost + cropped.cost)
    static = static_model(model)
    map_question = short_question or question
    if isinstance(strategy, MapMethod):
        if device_pipeline and not tiled:
            inputs = map_inputs(model, image, map_question, strategy)
            crop = crop_inputs(model, image, question, strategy.crop_counts)
            out = _pipeline.pipeline(static, model.params, inputs, crop, method=strategy,
                                     max_new_tokens=max_new_tokens, reuse_question_pass=short_question is None)
            return _pipeline_answer(model, strategy, jax.device_get(out), (inputs, crop), image,
                                    {"total": time.perf_counter() - start})
    found = host_boxes(model, image, map_question, strategy, high_res=high_res, bbox=bbox, seed=seed)
    map_done = time.perf_counter()
    texts, cost = answers_with_crops(model, image, question, found.boxes, max_new_tokens, device_pipeline)
    timings = {"map": map_done - start, "answer": time.perf_counter() - map_done, "total": time.perf_counter() - start}
    return Answer(*texts, tuple(_box(box) for box in found.boxes), found.importance, timings,
                  cost=found.cost + cost)


def answers_with_crops(model: Model, image: PIL.Image.Image, question: str, boxes, max_new_tokens: int,
                       device_pipeline: bool = True) -> tuple[tuple[str, str], Cost]:
    """(the answer with the boxes' crops as extra images, the answer from the original alone), and the cost of
    the first: cropped and encoded on the device, or (`device_pipeline=False`) by the image processor."""
    if device_pipeline:
        crop = crop_inputs(model, image, question, (len(boxes),), boxes=[_box(box) for box in boxes])
        tokens, lengths = jax.device_get(_pipeline.crop_and_answer(
            static_model(model), model.params, model.family.answer_pixels(model, [image])[0], crop,
            np.asarray(boxes, np.int32), max_new_tokens=max_new_tokens))
        lengths = tuple(int(length) for length in lengths)
        tokens = (strip_generated(np.asarray(tokens.with_crops)), strip_generated(np.asarray(tokens.original)))
    else:
        inputs = [model.family.generation_inputs(model, images, model.family.prompt(question, len(images)), vicrop=True)
                  for images in ([image, *(image.crop(_box(box)) for box in boxes)], [image])]
        tokens = tuple(_generated(model, generation, max_new_tokens) for generation in inputs)
        lengths = tuple(len(generation.ids) for generation in inputs)
    texts = tuple(model.tokenizer.decode(t) for t in tokens)
    return texts, Cost(1, lengths[0], len(tokens[0]))


@dataclasses.dataclass(frozen=True)
class ModelPasses:
    """The model passes of the zoom strategies (`zoom.ModelPasses`), each batch one device call."""

    model: Model

    @property
    def base_size(self) -> int:
        return base_size(self.model)

    def relevance(self, image, question, target, strategy: Focus):
        model = self.model.with_attention(strategy.attention)
        family = model.family
        pixels, prompts = family.plain_inputs(model, [image], [question])
        prompt = jax.tree_util.tree_map(lambda leaf: leaf[0], prompts)
        rows = target_rows(list(np.asarray(prompt.ids[: prompt.length])), target_ids(model, question, target))
        padded = np.full(MAX_TARGET_TOKENS, rows[-1], np.int32)
        padded[: len(rows)] = rows
        maps = focus_relevance(static_model(model), model.params, pixels[0], prompt, padded, strategy=strategy)
        maps = family.host_map(model, image, np.asarray(maps))[: len(rows)]
        return combined_relevance(maps), Cost(1, int(prompt.length))

    def yes_probabilities(self, views, questions):
        model = self.model
        pixels, prompts = model.family.plain_inputs(model, views, questions)
        yes_no = np.array([answer_token(model, YES_WORD), answer_token(model, NO_WORD)], np.int32)
        yes = yes_probabilities(static_model(model), model.params, pixels, prompts, yes_no)
        return np.asarray(yes), Cost(len(views), int(np.sum(prompts.length)))


def answer_token(model: Model, word: str) -> int:
    """The first token of an answer that is `word`; a tokenizer that cannot spell it is refused."""
    ids = model.tokenizer.backend.encode(word, add_special_tokens=False).ids
    spelled = model.tokenizer.decode(ids[:1]) if ids else ""
    if not spelled or not word.startswith(spelled):  # an unknown word decodes to nothing
        raise ValueError(f"this model's tokenizer has no token for the answer {word!r}: the zoom strategies read "
                         "the model's yes/no confidences from it")
    return ids[0]


def target_ids(model: Model, question: str, target: str) -> list[int]:
    """The tokens of `target` as the tokenizer writes them inside the family's prompt of `question` (the target's
    last occurrence in the question)."""
    prompt = model.family.prompt(question)
    start = prompt.index(question) + question.rindex(target)
    end = start + len(target)
    encoding = model.tokenizer.backend.encode(prompt, add_special_tokens=False)
    spans = zip(encoding.ids, encoding.offsets)
    return [token for token, (low, high) in spans if low < min(high, end) and high > start]


def zoom_target(target: str | None, question: str) -> str:
    """The object a zoom strategy looks for: `target`, or by `target_from_question`; an empty one is refused."""
    target = (target if target is not None else target_from_question(question)).strip()
    if not target:
        raise ValueError("the target is empty: give target= the object to look for")
    return target


def _zoom_answer(model: Model, image: PIL.Image.Image, question: str, strategy: ZoomStrategy, target: str,
                 max_new_tokens: int, start: float) -> Answer:
    """A zoom strategy's search for its crop, then its answer (from the crop, or the original and the crop) and
    the answer from the original alone."""
    found = strategy.search(ModelPasses(model), image, question, target)
    searched = time.perf_counter()
    if found.boxes and strategy.answer_views is AnswerViews.BOTH:
        texts, cost = answers_with_crops(model, image, question, found.boxes, max_new_tokens)
    else:
        views = [image.crop(_box(box)) for box in found.boxes] + [image]
        answers = plain_answers(model, views, [question] * len(views), max_new_tokens)
        texts, cost = (answers[0].text, answers[-1].text), answers[0].cost
    timings = {"search": searched - start, "answer": time.perf_counter() - searched,
               "total": time.perf_counter() - start}
    return Answer(*texts, tuple(_box(box) for box in found.boxes), found.importance, timings, cost=found.cost + cost)


def _pipeline_answer(model: Model, strategy: MapMethod, out, records: tuple[MapInputs, CropInputs],
                     image: PIL.Image.Image, timings: dict, index=()) -> Answer:
    """An Answer from (one record `index` of) a pipeline program's output and its inputs (`records`), on the
    host."""
    at = lambda array: np.asarray(array)[index]  # noqa: E731
    regions = int(at(out.choice.regions))
    chosen = strategy.candidate_names[int(at(out.choice.candidate))] if strategy.candidate_names else None
    tokens = [strip_generated(at(out.answers.with_crops)), strip_generated(at(out.answers.original))]
    inputs, _ = records
    crop_lengths = at(out.crop_lengths)  # each candidate prefills its crops' prompts, one is decoded
    answers = Cost(crop_lengths.size, int(crop_lengths.sum()), len(tokens[0]))
    cost = strategy.map_cost(int(at(inputs.question.length)), int(at(inputs.general.length))) + answers
    return Answer(*(model.tokenizer.decode(t) for t in tokens), tuple(_box(box) for box in at(out.boxes)[:regions]),
                  model.family.host_map(model, image, at(out.importance)), dict(timings), chosen=chosen, cost=cost)


def map_frame(model: Model, image_size: tuple[int, int], strategy: MapMethod) -> Box | None:
    """The host side of `_pipeline.map_frame`: None as published, or the part of the image the processor keeps."""
    if strategy.geometry is Geometry.PAPER:
        return None
    return _box(model.family.processor_box(np.array([0, 0, *image_size], np.int32)))


def host_boxes(model: Model, image: PIL.Image.Image, question: str, strategy: Strategy, *, high_res: bool = False,
               bbox: Sequence | None = None, seed: int = 0, target: str | None = None) -> Search:
    """The boxes a map method, a crop baseline or a zoom strategy (looking for `target`) chooses, on the host
    path, with the map (None for baselines) and the model passes it took."""
    if isinstance(strategy, MapMethod) and strategy.candidate_names:
        raise ValueError(f"method {strategy.name!r} chooses between its maps' answers on the device: it has no "
                         f"single box on the host path (use device_pipeline=True, or one of its map methods "
                         f"{', '.join(strategy.candidate_names)})")
    if isinstance(strategy, MapMethod):
        _check_question(model, question, 0, answered=False)
        importance, cost = _map(model, image, question, strategy, high_res)
        frame = map_frame(model, image.size, strategy)
        boxes = select_boxes(importance, image.size, base_size(model), max(strategy.crop_counts), frame)
        if len(strategy.crop_counts) > 1:
            wanted = outside_mass(importance, boxes[0], image.size, frame) > strategy.second_region_mass
            boxes = boxes[: strategy.crop_counts[int(wanted)]]
        return Search(tuple(boxes), importance, cost)
    if isinstance(strategy, FixedCrop):
        return Search(tuple(strategy.boxes(image.size, base_size(model), bbox, seed)), None, Cost())
    if isinstance(strategy, ZoomStrategy):
        return strategy.search(ModelPasses(model), image, question, zoom_target(target, question))
    raise ValueError(f"method {strategy.name!r} is neither a map method, a crop baseline nor a zoom strategy")


class PlainAnswer(NamedTuple):
    text: str
    confidence: float  # the probability of its first token
    cost: Cost


def plain_answers(model: Model, images: list[PIL.Image.Image], questions: list[str],
                  max_new_tokens: int) -> list[PlainAnswer]:
    """Each question's answer over its image alone, in one batched program."""
    pixels, prompts = model.family.plain_inputs(model, images, questions)
    tokens, confidence = jax.device_get(_pipeline.plain_batch(static_model(model), model.params, pixels, prompts,
                                                              max_new_tokens=max_new_tokens))
    generated = [strip_generated(t) for t in tokens]
    return [PlainAnswer(model.tokenizer.decode(ids), float(c), Cost(1, int(length), len(ids)))
            for ids, c, length in zip(generated, confidence, np.asarray(prompts.length))]


def _generated(model: Model, inputs, max_new_tokens: int) -> list[int]:
    """The published path's generation: the image processor's inputs of one prompt -> its answer's ids."""
    pixels, *image_text = inputs.encode_args
    return generate_ids(model, pixels, inputs.ids, max_new_tokens, tuple(image_text), inputs.positions,
                        inputs.position_offset, inputs.bucket)


def batch_inputs(model: Model, images: list[PIL.Image.Image], questions: list[str], map_questions: list[str],
                 method: MapMethod) -> tuple[MapInputs, CropInputs]:
    """Device inputs of `pipeline_batch`: images padded to one size bucket, prompts to one length bucket."""
    return (MapInputs(*model.family.map_batch(model, images, map_questions, method)),
            crop_batch(model, images, questions, method.crop_counts))


def answer_batch(model: Model, images: Sequence[ImageLike], questions: Sequence[str],
                 method: str | Strategy = "rel_att", *, short_questions: Sequence[str | None] | None = None,
                 batch_size: int = 8, max_new_tokens: int = 20, bboxes: Sequence | None = None,
                 high_res: bool = False, seed: int = 0, targets: Sequence[str | None] | None = None,
                 **options) -> list[Answer]:
    """`answer` for many (image, question) pairs: map methods run as one vmapped program per batch.

    Images are padded to one size bucket and prompts to one length bucket, so a run compiles once per bucket and
    batch size (a short last batch is not padded, a very large image runs alone). With a gate, the plain answers
    of a batch run first and only the records below the gate go on, as a smaller batch padded to a power of two
    (so at most log2(batch_size) + 1 batch sizes compile). Baselines and
    high-resolution tiling run record by record, and so do the zoom strategies (`targets`: each record's object,
    None to take it from the question; their yes/no passes are batched within a record). A record that cannot run
    (an unreadable image, an empty or too
    long question) does not stop the others: they are answered, then `BatchError` lists the failures and holds
    every answer.
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions: pass one image per question")
    for name, given in (("short_questions", short_questions), ("bboxes", bboxes), ("targets", targets)):
        if given is not None and len(given) != len(questions):
            raise ValueError(f"{len(given)} {name} for {len(questions)} questions: pass one per question (None "
                             "where a record has none)")
    strategy = resolve_method(model, method, **options)
    short_questions = list(short_questions) if short_questions is not None else [None] * len(questions)
    boxes = list(bboxes) if bboxes is not None else [None] * len(questions)
    targets = list(targets) if targets is not None else [None] * len(questions)
    answers: list[Answer | None] = [None] * len(questions)
    failures: list[tuple[int, str]] = []
    ready = []
    for i, (image, question, short) in enumerate(zip(images, questions, short_questions)):
        problem = question_problem(model, question, max_new_tokens, short, crops=most_crops(strategy))
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
                                    bbox=boxes[i], seed=seed + i, max_new_tokens=max_new_tokens,
                                    target=targets[i])
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


def power_of_two(count: int) -> int:
    """The smallest power of two >= count: the sizes a gated batch's cropped part runs at."""
    return 1 << max(count - 1, 0).bit_length()


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
    large image (`image_groups`), each padded only to a multiple of the mesh's devices. With a gate, the plain
    answers of all records first (one program), then the pipeline for those below the gate only.

    With a mesh (axis "data"), a batch is split over its devices; the model's parameters are used where they
    are (replicate them over the mesh once per run, as `vicrop-jax eval` does).
    """
    if len(questions) > batch_size:
        raise ValueError(f"{len(questions)} records for a batch of {batch_size}")
    if method.gate is None:
        return _run_groups(model, images, questions, map_questions, method, max_new_tokens, mesh)
    if (model.family.prefix_tokens(model) is not None and map_questions == questions
            and len(image_groups(images)) == 1 and (mesh is None or mesh.size == 1)):
        return _gated_batch(model, images, questions, method, max_new_tokens)
    start = time.perf_counter()
    plain = plain_answers(model, images, questions, max_new_tokens)
    plain_share = (time.perf_counter() - start) / len(questions)
    crop = [i for i, p in enumerate(plain) if p.confidence < method.gate]
    answers = [Answer(p.text, p.text, (), None, {"total": plain_share}, p.confidence, cost=p.cost) for p in plain]
    cropped = _run_groups(model, [images[i] for i in crop], [questions[i] for i in crop],
                          [map_questions[i] for i in crop], method.program_method, max_new_tokens, mesh,
                          pad_to=power_of_two) if crop else []
    for i, result in zip(crop, cropped):
        answers[i] = dataclasses.replace(result, confidence=plain[i].confidence, cost=plain[i].cost + result.cost,
                                         timings={**result.timings, "total": plain_share + result.timings["total"]})
    return answers


def _gated_batch(model: Model, images: list[PIL.Image.Image], questions: list[str], method: MapMethod,
                 max_new_tokens: int) -> list[Answer]:
    """A gate that continues from its plain answers: one program answers every record and keeps its question
    pass (cache, and attention at the map layer) on the device; the records below the gate (padded to a power of
    two) go on from there, their map's question pass, prefix and original answer not run again."""
    start = time.perf_counter()
    program_method = method.program_method
    records = batch_inputs(model, images, questions, questions, program_method)
    static = static_model(model)
    tokens, confidence, prefilled = _pipeline.prefill_batch(static, model.params, records[0], method=program_method,
                                                            max_new_tokens=max_new_tokens)
    tokens, confidence = jax.device_get((tokens, confidence))
    plain_share = (time.perf_counter() - start) / len(questions)
    answers = []
    for row, sure, length in zip(tokens, confidence, records[0].question.length):
        generated = strip_generated(row)
        text = model.tokenizer.decode(generated)
        answers.append(Answer(text, text, (), None, {"total": plain_share}, float(sure),
                              cost=Cost(1, int(length), len(generated))))
    crop = [i for i, answer in enumerate(answers) if answer.confidence < method.gate]
    if not crop:
        return answers
    start = time.perf_counter()
    index = crop + crop[-1:] * (power_of_two(len(crop)) - len(crop))
    chosen = jax.tree_util.tree_map(lambda leaf: leaf[np.asarray(index)], records)
    out = jax.device_get(_pipeline.pipeline_batch(
        static, model.params, *chosen, jax.tree_util.tree_map(lambda leaf: leaf[np.asarray(index)], prefilled),
        method=program_method, max_new_tokens=max_new_tokens, reuse_question_pass=True))
    share = (time.perf_counter() - start) / len(crop)
    for position, i in enumerate(crop):
        result = _pipeline_answer(model, program_method, out, chosen, images[i], {}, position)
        answers[i] = dataclasses.replace(result, confidence=answers[i].confidence, cost=answers[i].cost + result.cost,
                                         timings={"total": plain_share + share})
    return answers


def _run_groups(model: Model, images: list[PIL.Image.Image], questions: list[str], map_questions: list[str],
                method: MapMethod, max_new_tokens: int, mesh: jax.sharding.Mesh | None,
                pad_to=lambda count: count) -> list[Answer]:
    answers: list[Answer | None] = [None] * len(questions)
    for group in image_groups(images):
        for i, result in zip(group, _run_group(model, [images[i] for i in group], [questions[i] for i in group],
                                               [map_questions[i] for i in group], method, max_new_tokens, mesh,
                                               pad_to)):
            answers[i] = result
    return answers


def _run_group(model: Model, images: list[PIL.Image.Image], questions: list[str], map_questions: list[str],
               method: MapMethod, max_new_tokens: int, mesh: jax.sharding.Mesh | None, pad_to) -> list[Answer]:
    start = time.perf_counter()
    count = len(questions)
    fill = padded_batch_size(pad_to(count), 1 if mesh is None else mesh.size) - count
    records = batch_inputs(model, images + images[-1:] * fill, questions + questions[-1:] * fill,
                           map_questions + map_questions[-1:] * fill, method)
    placed = records if mesh is None else jax.device_put(
        records, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    out = jax.device_get(_pipeline.pipeline_batch(
        static_model(model), model.params, *placed, method=method, max_new_tokens=max_new_tokens,
        reuse_question_pass=map_questions == questions,
    ))
    elapsed = time.perf_counter() - start
    timings = {"total": elapsed / count, "batch": elapsed, "batch_records": count}  # this record's share, the batch
    return [_pipeline_answer(model, method, out, records, images[i], timings, i) for i in range(count)]
