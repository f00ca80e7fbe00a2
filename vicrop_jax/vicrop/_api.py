"""The `answer` API: a method given by name becomes a `Strategy` value once (`resolve_method`), records are checked
and loaded on the host, and the strategy runs them against an `Engine` of the model's passes. `answer` is
`answer_batch` of one."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from vicrop_jax._generation import ImageLike
from vicrop_jax._loading import Model
from vicrop_jax.preprocessing import load_image
from vicrop_jax.vicrop import _pipeline
from vicrop_jax.vicrop.engine import Engine, crop_inputs, map_inputs, question_problem, static_model
from vicrop_jax.vicrop.methods import MapMethod, Strategy, resolve_method
from vicrop_jax.vicrop.strategy import Answer, Record


class BatchError(ValueError):
    """Some records of `answer_batch` could not be answered; the others were. `answers` holds an Answer per record
    (None where it failed), `failures` the position and reason of each failed one, `causes` the exception raised
    for each (None where the record was refused before it ran)."""

    def __init__(self, answers: list[Answer | None], failures: list[tuple[int, str]],
                 causes: list[BaseException | None] | None = None):
        self.answers, self.failures = answers, failures
        self.causes = causes if causes is not None else [None] * len(failures)
        listed = "; ".join(f"record {i}: {why}" for i, why in failures[:10])
        more = f" and {len(failures) - 10} more" if len(failures) > 10 else ""
        super().__init__(f"{len(failures)} of {len(answers)} record(s) failed ({listed}{more}); the others were "
                         "answered: see .answers")


def importance_map(model: Model, image: ImageLike, question: str, method: str | Strategy = "rel_att", *,
                   high_res: bool = False, **options) -> np.ndarray:
    """The importance map (float32, grid-shaped) of `method` for a question about an image.

    method: a name (rel_att, grad_att, pure_grad, auto) with its options (layer, qformer_layer, heads,
    general_question, clip_negative), or a `MapMethod` value; method auto gives both its maps [2, gh, gw].
    With high_res=True, images with a side above 1024 px are tiled and the tile maps stitched.
    """
    strategy = resolve_method(model, method, **options)
    return strategy.importance(Engine(model, high_res=high_res), Record(load_image(image), question, question))


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


def device_crop(model: Model, image: ImageLike, box: Sequence[int]) -> np.ndarray:
    """The model input the device path makes of one box of an image (fixed-size families: pixels [H,W,3])."""
    image = load_image(image)
    crop = crop_inputs(model, image, "", boxes=[tuple(box)])
    views = model.family.crop_views(static_model(model), crop, np.asarray([box], np.int32), np.float32)
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf[0]), views)


def answer(model: Model, image: ImageLike, question: str, method: str | Strategy = "rel_att", *,
           short_question: str | None = None, high_res: bool = False, max_new_tokens: int = 20,
           bbox: Sequence | None = None, seed: int = 0, device_pipeline: bool = True, target: str | None = None,
           **options) -> Answer:
    """Answer with ViCrop: the map of `method` picks the boxes, the crops join the original as extra images.

    method: a name, rel_att, grad_att, pure_grad, auto (maps) or the baselines none, gt (needs `bbox`: one box
    or a list of boxes), random, center, with its options as keywords (maps: regions, gate, geometry, ...); or
    a `Strategy` value; or the competing strategies focus and zoom_search, which look for `target` (default:
    `target_from_question`). `short_question` (V*-style) is used for the map only. `device_pipeline=False` runs
    the host path. `answer_batch` of one.
    """
    image = load_image(image)  # an unreadable image raises its own error here
    try:
        [result] = answer_batch(model, [image], [question], method, short_questions=[short_question], batch_size=1,
                                max_new_tokens=max_new_tokens, bboxes=[bbox], high_res=high_res, seed=seed,
                                targets=[target], device_pipeline=device_pipeline, **options)
    except BatchError as error:
        [cause] = error.causes
        raise cause if cause is not None else ValueError(error.failures[0][1]) from None
    return result


def answer_batch(model: Model, images: Sequence[ImageLike], questions: Sequence[str],
                 method: str | Strategy = "rel_att", *, short_questions: Sequence[str | None] | None = None,
                 batch_size: int = 8, max_new_tokens: int = 20, bboxes: Sequence | None = None,
                 high_res: bool = False, seed: int = 0, targets: Sequence[str | None] | None = None,
                 device_pipeline: bool = True, **options) -> list[Answer]:
    """`answer` for many (image, question) pairs, `batch_size` records at a time.

    Map methods run each batch as one vmapped program: images are padded to one size bucket and prompts to one
    length bucket, so a run compiles once per bucket and batch size (a short last batch is not padded, a very
    large image runs alone). With a gate, the plain answers of a batch run first and only the records below the
    gate go on, as a smaller batch padded to a power of two (so at most log2(batch_size) + 1 batch sizes compile).
    Method none answers a batch in one program; the zoom strategies (`targets`: each record's object, None to
    take it from the question) run a batch's searches side by side, each step's questions in one call; the crop
    baselines and high-resolution tiling go record by record. Record i is seeded `seed + i`. A record that cannot
    run (an unreadable image, an empty or too long question) does not stop the others: they are answered, then
    `BatchError` lists the failures and holds every answer.
    """
    if isinstance(questions, str):
        raise ValueError("questions must be a list of strings, one per image, got one string (to ask one question "
                         "use answer)")
    for name, value, low in (("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions: pass one image per question")
    for name, given in (("short_questions", short_questions), ("bboxes", bboxes), ("targets", targets)):
        if given is not None and len(given) != len(questions):
            raise ValueError(f"{len(given)} {name} for {len(questions)} questions: pass one per question (None "
                             "where a record has none)")
    strategy = resolve_method(model, method, **options)
    engine = Engine(model, max_new_tokens, high_res, device_pipeline)
    short_questions = list(short_questions) if short_questions is not None else [None] * len(questions)
    boxes = list(bboxes) if bboxes is not None else [None] * len(questions)
    targets = list(targets) if targets is not None else [None] * len(questions)
    answers: list[Answer | None] = [None] * len(questions)
    failures: dict[int, tuple[str, BaseException | None]] = {}
    ready: list[tuple[int, Record]] = []
    for i, (image, question, short) in enumerate(zip(images, questions, short_questions)):
        problem = text_problem("question", question) or text_problem("short question", short, optional=True)
        problem = problem or question_problem(model, question, max_new_tokens, short, crops=strategy.most_crops)
        if problem is None:
            try:
                ready.append((i, Record(load_image(image), question, short or question, boxes[i], seed + i,
                                        targets[i])))
            except Exception as error:  # a missing or unreadable file: that record's failure alone
                problem = f"unreadable image: {error}"
        if problem is not None:
            failures[i] = (problem, None)
    for begin in range(0, len(ready), batch_size):
        chunk = ready[begin: begin + batch_size]
        for (i, _), outcome in zip(chunk, run_or_errors(strategy, engine, [record for _, record in chunk])):
            if isinstance(outcome, Exception):
                why = str(outcome) if isinstance(outcome, ValueError) else f"{type(outcome).__name__}: {outcome}"
                failures[i] = (why, outcome)
            else:
                answers[i] = outcome
    if failures:
        order = sorted(failures)
        raise BatchError(answers, [(i, failures[i][0]) for i in order], [failures[i][1] for i in order])
    return answers


def text_problem(name: str, value, optional: bool = False) -> str | None:
    """Why a question is not text, or None."""
    if isinstance(value, str) or (optional and value is None):
        return None
    return f"the {name} must be a string, got {type(value).__name__} {value!r:.60}"


def run_or_errors(strategy: Strategy, engine: Engine, records: list[Record]) -> list[Answer | Exception]:
    """The strategy's answers of a batch; if it raises, its records one by one, so that only a bad record gets an
    error (the exception it raised)."""
    try:
        return strategy.run(engine, records)
    except Exception as error:  # a bad record's TypeError as well as its ValueError: the others are answered
        if len(records) == 1:
            return [error]
        return [run_or_errors(strategy, engine, [record])[0] for record in records]
