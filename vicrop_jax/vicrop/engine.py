"""The model passes every strategy runs against: one `Engine` per model and run settings.

A strategy asks for passes (plain answers, the map pipeline over a batch, a map on the host, an answer with given
crops, FOCUS's relevance, yes/no probabilities); the engine prepares the named device inputs (`MapInputs`,
`CropInputs`) through the model's family, calls the jitted programs of `_pipeline` and `zoom`, and turns their
outputs into `Answer`s with their `Cost`. Two paths give the same box and (within preprocessing tolerance) the
same answers:
- the device path (default): one jit-compiled program from pixels to answer tokens, no host round trip between
  the map and the answer, vmapped over a batch;
- the host path (`device_pipeline=False`, and high-resolution tiles): the map on the device, the box on the host
  (`boxes.select_boxes`), the crop by PIL and the checkpoint's image processor, as the published code does.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple, Sequence

import jax
import numpy as np
import PIL.Image

from vicrop_jax._generation import generate_ids, prompt_problem
from vicrop_jax._loading import Model
from vicrop_jax.nn.decoding import strip_generated
from vicrop_jax.prompts import NO_WORD, YES_WORD
from vicrop_jax.vicrop import _pipeline
from vicrop_jax.vicrop._pipeline import CropInputs, MapInputs
from vicrop_jax.vicrop.boxes import Box, selection_box_sizes, stitch_maps, tile_boxes, tile_grid
from vicrop_jax.vicrop.maps import StaticModel
from vicrop_jax.vicrop.methods import Geometry, MapMethod
from vicrop_jax.vicrop.strategy import Answer, Cost, Record, Search, int_box
from vicrop_jax.vicrop.zoom import MAX_TARGET_TOKENS, Focus, combined_relevance, focus_relevance, target_rows
from vicrop_jax.vicrop.zoom import yes_probabilities as yes_probabilities_program

HIGH_RES_THRESHOLD = 1024
LARGE_IMAGE_PIXELS = 4096 * 4096  # an image above this runs in a batch of its own


class PlainAnswer(NamedTuple):
    text: str
    confidence: float  # the probability of its first token
    cost: Cost


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
    return _first(MapInputs(*model.family.map_batch(model, [image], [question], method)))


def crop_batch(model: Model, images: list[PIL.Image.Image], questions: list[str], counts: tuple[int, ...],
               boxes=None) -> CropInputs:
    """The crop step's inputs of a batch (a leading axis on every leaf), with the prompt of each number of crops
    in `counts`; `boxes`: each record's boxes where they are given rather than selected."""
    family = model.family
    if boxes is None:
        box_sizes = [selection_box_sizes(image.size, base_size(model), family.map_grid(model, image.size))
                     for image in images]
    else:
        box_sizes = [{(right - left, bottom - top) for left, top, right, bottom in given} for given in boxes]
    arrays = [image_array(model, image) for image in images]
    padded = np.zeros((len(images), max(a.shape[0] for a, _ in arrays), max(a.shape[1] for a, _ in arrays), 3),
                      np.uint8)
    for i, (array, _) in enumerate(arrays):
        padded[i, : array.shape[0], : array.shape[1]] = array
    prompts = family.answer_batch_prompts(model, images, questions, counts, box_sizes)
    return CropInputs(padded, np.stack([size for _, size in arrays]), *prompts)


def crop_inputs(model: Model, image: PIL.Image.Image, question: str, counts: tuple[int, ...] = (1,),
                boxes=None) -> CropInputs:
    """The crop step's inputs of one record, with the prompt of each number of crops in `counts`."""
    return _first(crop_batch(model, [image], [question], counts, None if boxes is None else [boxes]))


def batch_inputs(model: Model, images: list[PIL.Image.Image], questions: list[str], map_questions: list[str],
                 method: MapMethod) -> tuple[MapInputs, CropInputs]:
    """Device inputs of `pipeline_batch`: images padded to one size bucket, prompts to one length bucket."""
    return (MapInputs(*model.family.map_batch(model, images, map_questions, method)),
            crop_batch(model, images, questions, method.crop_counts))


def _first(tree):
    return jax.tree_util.tree_map(lambda leaf: leaf[0], tree)


def padded_batch_size(count: int, devices: int = 1) -> int:
    """The records a batch of `count` runs as: `count`, rounded up to a multiple of the devices."""
    return -(-count // devices) * devices


def power_of_two(count: int) -> int:
    """The smallest power of two >= count: the sizes a gated batch's cropped part runs at."""
    return 1 << max(count - 1, 0).bit_length()


def view_bucket(count: int) -> int:
    """The views a yes/no call runs as: the count up to 8 (one search's step), then a multiple of 8 (the searches
    of a batch), so that little is padded and at most 8 + batch size programs compile."""
    return count if count <= 8 else -(-count // 8) * 8


def image_groups(images: Sequence[PIL.Image.Image]) -> list[list[int]]:
    """Positions of a batch's images that run together: all but the very large ones, which run alone, so that
    one large image does not pad every other image of its batch to its size."""
    large = [i for i, image in enumerate(images) if image.width * image.height > LARGE_IMAGE_PIXELS]
    rest = [i for i in range(len(images)) if i not in large]
    return ([rest] if rest else []) + [[i] for i in large]


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


@dataclasses.dataclass(frozen=True)
class Engine:
    """A model's passes under one run's settings. `mesh` (axis "data") splits a batch over its devices (the
    model's parameters are used where they are); `power_of_two_batches` rounds a device batch up to a power of two
    (a gate's cropped part, so that few batch sizes compile)."""

    model: Model
    max_new_tokens: int = 20
    high_res: bool = False
    device_pipeline: bool = True
    mesh: jax.sharding.Mesh | None = None
    power_of_two_batches: bool = False

    @property
    def base_size(self) -> int:
        """The smallest crop box side: the model's input resolution."""
        return base_size(self.model)

    @functools.cached_property
    def static(self) -> StaticModel:
        """The model's static part, made once per engine (Qwen's counts its template's tokens)."""
        return static_model(self.model)

    def tiled(self, image: PIL.Image.Image) -> bool:
        """Whether the image's map is made of tiles (high_res and a side above 1024 px)."""
        return self.high_res and max(image.size) > HIGH_RES_THRESHOLD

    # ------------------------------------------------------------------------------------------- plain answers

    def plain_answers(self, images: list[PIL.Image.Image], questions: list[str]) -> list[PlainAnswer]:
        """Each question's answer over its image alone, in one batched program."""
        model = self.model
        pixels, prompts = model.family.plain_inputs(model, images, questions)
        tokens, confidence = jax.device_get(_pipeline.plain_batch(self.static, model.params, pixels, prompts,
                                                                  max_new_tokens=self.max_new_tokens))
        generated = [strip_generated(t) for t in tokens]
        return [PlainAnswer(model.tokenizer.decode(ids), float(c), Cost(1, int(length), len(ids)))
                for ids, c, length in zip(generated, confidence, np.asarray(prompts.length))]

    # -------------------------------------------------------------------------------------------- map methods

    def map(self, record: Record, method: MapMethod) -> tuple[np.ndarray, Cost]:
        """The record's map on the image's grid (tiles stitched where the image is tiled), and its passes."""
        problem = question_problem(self.model, record.map_question, 0, answered=False)
        if problem is not None:
            raise ValueError(problem)
        image = record.image
        if not self.tiled(image):
            return self._single_map(image, record.map_question, method)
        rows, cols, _, _ = tile_grid(image.size, HIGH_RES_THRESHOLD)
        tiles = [image.crop(box) for box in tile_boxes(image.size, HIGH_RES_THRESHOLD, clip=False)]
        maps, costs = zip(*(self._single_map(tile, record.map_question, method) for tile in tiles))
        return stitch_maps(list(maps), rows, cols), sum(costs, Cost())

    def _single_map(self, image: PIL.Image.Image, question: str, method: MapMethod) -> tuple[np.ndarray, Cost]:
        model = self.model
        inputs = map_inputs(model, image, question, method)
        importance = _pipeline.importance_program(self.static, model.params, inputs, method=method)
        cost = method.map_cost(int(inputs.question.length), int(inputs.general.length))
        return model.family.host_map(model, image, np.asarray(importance)), cost

    def map_frame(self, image_size: tuple[int, int], method: MapMethod) -> Box | None:
        """The host side of `_pipeline.map_frame`: None as published, or the part of the image the processor
        keeps."""
        if method.geometry is Geometry.PAPER:
            return None
        return int_box(self.model.family.processor_box(np.array([0, 0, *image_size], np.int32)))

    def on_device(self, record: Record) -> bool:
        """Whether a map method answers the record with the device pipeline (else on the host path)."""
        return self.device_pipeline and not self.tiled(record.image)

    def pipeline_answers(self, method: MapMethod, records: list[Record]) -> list[Answer]:
        """A map method's answers by the device pipeline, vmapped over the records (one program per image
        group)."""
        answers: list[Answer | None] = [None] * len(records)
        for group in image_groups([r.image for r in records]):
            for i, answer in zip(group, self._pipeline_group(method, [records[i] for i in group])):
                answers[i] = answer
        return answers

    def _pipeline_group(self, method: MapMethod, records: list[Record]) -> list[Answer]:
        start = time.perf_counter()
        count = len(records)
        rounded = power_of_two(count) if self.power_of_two_batches else count
        fill = padded_batch_size(rounded, 1 if self.mesh is None else self.mesh.size) - count
        padded = records + records[-1:] * fill
        inputs = batch_inputs(self.model, [r.image for r in padded], [r.question for r in padded],
                              [r.map_question for r in padded], method)
        placed = inputs if self.mesh is None else jax.device_put(
            inputs, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data")))
        out = jax.device_get(_pipeline.pipeline_batch(
            self.static, self.model.params, *placed, method=method, max_new_tokens=self.max_new_tokens,
            reuse_question_pass=all(r.map_question == r.question for r in padded),
        ))
        elapsed = time.perf_counter() - start
        timings = {"total": elapsed / count, "batch": elapsed, "batch_records": count}  # its share, the batch
        return [self._pipeline_answer(method, out, inputs, records[i].image, timings, i) for i in range(count)]

    def continued_gate(self, method: MapMethod, records: list[Record]) -> list[Answer] | None:
        """The gate continuing from its plain answers, where the family shares a prefix and the map asks the
        question itself: one program answers every record and keeps its question pass (cache, and attention at the
        map layer) on the device; the records below the gate (padded to a power of two) go on from there, their
        map's question pass, prefix and original answer not run again. None where it cannot."""
        model = self.model
        can = (model.family.prefix_tokens(model) is not None
               and all(r.map_question == r.question and self.on_device(r) for r in records)
               and len(image_groups([r.image for r in records])) == 1 and (self.mesh is None or self.mesh.size == 1))
        if not can:
            return None
        start = time.perf_counter()
        program_method = method.program_method
        inputs = batch_inputs(model, [r.image for r in records], [r.question for r in records],
                              [r.question for r in records], program_method)
        tokens, confidence, prefilled = _pipeline.prefill_batch(self.static, model.params, inputs[0],
                                                                method=program_method,
                                                                max_new_tokens=self.max_new_tokens)
        tokens, confidence = jax.device_get((tokens, confidence))
        plain_share = (time.perf_counter() - start) / len(records)
        answers = []
        for row, sure, length in zip(tokens, confidence, inputs[0].question.length):
            generated = strip_generated(row)
            text = model.tokenizer.decode(generated)
            answers.append(Answer(text, text, (), None, {"total": plain_share}, float(sure),
                                  cost=Cost(1, int(length), len(generated))))
        crop = [i for i, answer in enumerate(answers) if answer.confidence < method.gate]
        if not crop:
            return answers
        start = time.perf_counter()
        index = np.asarray(crop + crop[-1:] * (power_of_two(len(crop)) - len(crop)))
        chosen = jax.tree_util.tree_map(lambda leaf: leaf[index], inputs)
        out = jax.device_get(_pipeline.pipeline_batch(
            self.static, model.params, *chosen, jax.tree_util.tree_map(lambda leaf: leaf[index], prefilled),
            method=program_method, max_new_tokens=self.max_new_tokens, reuse_question_pass=True))
        share = (time.perf_counter() - start) / len(crop)
        for position, i in enumerate(crop):
            result = self._pipeline_answer(program_method, out, chosen, records[i].image, {}, position)
            answers[i] = dataclasses.replace(result, confidence=answers[i].confidence,
                                             cost=answers[i].cost + result.cost,
                                             timings={"total": plain_share + share})
        return answers

    def _pipeline_answer(self, method: MapMethod, out, inputs: tuple[MapInputs, CropInputs],
                         image: PIL.Image.Image, timings: dict, index: int) -> Answer:
        """An Answer from record `index` of a pipeline program's output and its inputs, on the host."""
        model = self.model
        at = lambda array: np.asarray(array)[index]  # noqa: E731
        regions = int(at(out.choice.regions))
        chosen = method.candidate_names[int(at(out.choice.candidate))] if method.candidate_names else None
        tokens = [strip_generated(at(out.answers.with_crops)), strip_generated(at(out.answers.original))]
        question = inputs[0].question
        crop_lengths = at(out.crop_lengths)  # each candidate prefills its crops' prompts, one is decoded
        answers = Cost(crop_lengths.size, int(crop_lengths.sum()), len(tokens[0]))
        cost = method.map_cost(int(at(question.length)), int(at(inputs[0].general.length))) + answers
        return Answer(*(model.tokenizer.decode(t) for t in tokens),
                      tuple(int_box(box) for box in at(out.boxes)[:regions]),
                      model.family.host_map(model, image, at(out.importance)), dict(timings), chosen=chosen,
                      cost=cost)

    # ----------------------------------------------------------------------------------- answers with crops

    def answer_from(self, record: Record, found: Search, start: float) -> Answer:
        """The answer with the crops of boxes found on the host (none: the original alone); `start`: when the
        search began."""
        searched = time.perf_counter()
        if found.boxes:
            texts, cost = self.answers_with_crops(record.image, record.question, found.boxes)
        else:
            [plain] = self.plain_answers([record.image], [record.question])
            texts, cost = (plain.text, plain.text), plain.cost
        timings = {"search": searched - start, "answer": time.perf_counter() - searched,
                   "total": time.perf_counter() - start}
        return Answer(*texts, tuple(int_box(box) for box in found.boxes), found.importance, timings,
                      cost=found.cost + cost)

    def answers_with_crops(self, image: PIL.Image.Image, question: str, boxes) -> tuple[tuple[str, str], Cost]:
        """(the answer with the boxes' crops as extra images, the answer from the original alone), and the cost
        of the first: cropped and encoded on the device, or (`device_pipeline=False`) by the image processor."""
        model = self.model
        if self.device_pipeline:
            crop = crop_inputs(model, image, question, (len(boxes),), boxes=[int_box(box) for box in boxes])
            tokens, lengths = jax.device_get(_pipeline.crop_and_answer(
                self.static, model.params, model.family.answer_pixels(model, [image])[0], crop,
                np.asarray(boxes, np.int32), max_new_tokens=self.max_new_tokens))
            lengths = tuple(int(length) for length in lengths)
            tokens = (strip_generated(np.asarray(tokens.with_crops)), strip_generated(np.asarray(tokens.original)))
        else:
            inputs = [model.family.generation_inputs(model, images, model.family.prompt(question, len(images)),
                                                     vicrop=True)
                      for images in ([image, *(image.crop(int_box(box)) for box in boxes)], [image])]
            tokens = tuple(self._generated(generation) for generation in inputs)
            lengths = tuple(len(generation.ids) for generation in inputs)
        texts = tuple(model.tokenizer.decode(t) for t in tokens)
        return texts, Cost(1, lengths[0], len(tokens[0]))

    def _generated(self, inputs) -> list[int]:
        """The published path's generation: the image processor's inputs of one prompt -> its answer's ids."""
        pixels, *image_text = inputs.encode_args
        return generate_ids(self.model, pixels, inputs.ids, self.max_new_tokens, tuple(image_text),
                            inputs.positions, inputs.position_offset, inputs.bucket)

    # ------------------------------------------------------------------------------------ the zoom strategies

    def relevance(self, image: PIL.Image.Image, question: str, target: str, strategy: Focus
                  ) -> tuple[np.ndarray, Cost]:
        """FOCUS's relevance map [gh, gw] of the target over the image, asked with `question`."""
        model = self.model.with_attention(strategy.attention)
        family = model.family
        pixels, prompts = family.plain_inputs(model, [image], [question])
        prompt = _first(prompts)
        rows = target_rows(list(np.asarray(prompt.ids[: prompt.length])), target_ids(model, question, target))
        padded = np.full(MAX_TARGET_TOKENS, rows[-1], np.int32)
        padded[: len(rows)] = rows
        maps = focus_relevance(static_model(model), model.params, pixels[0], prompt, padded, strategy=strategy)
        maps = family.host_map(model, image, np.asarray(maps))[: len(rows)]
        return combined_relevance(maps), Cost(1, int(prompt.length))

    def yes_probabilities(self, views: list[PIL.Image.Image], questions: list[list[str]]
                          ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """p(yes) among {yes, no} of each view (as the only image) for each of its questions, and each prompt's
        length, per view, in one batched call: each view encoded once. The views are padded to a `view_bucket` and
        the questions to the most a view has, so that searches asking any number compile few programs."""
        model = self.model
        count, asked = len(views), [len(q) for q in questions]
        most = max(asked)
        views = views + views[-1:] * (view_bucket(count) - count)
        questions = [asked + asked[-1:] * (most - len(asked)) for asked in questions]
        questions += questions[-1:] * (len(views) - count)
        pixels, prompts = model.family.plain_inputs(model, [view for view in views for _ in range(most)],
                                                    [q for asked in questions for q in asked])
        by_view = jax.tree_util.tree_map(lambda leaf: leaf.reshape(len(views), most, *leaf.shape[1:]), prompts)
        yes_no = np.array([answer_token(model, YES_WORD), answer_token(model, NO_WORD)], np.int32)
        yes = np.asarray(yes_probabilities_program(self.static, model.params, pixels[::most], by_view, yes_no))
        lengths = np.asarray(by_view.length)
        return [yes[i, :n] for i, n in enumerate(asked)], [lengths[i, :n] for i, n in enumerate(asked)]
