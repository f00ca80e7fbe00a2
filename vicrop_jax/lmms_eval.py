"""vicrop_jax as an lmms-eval model: `lmms-eval --model vicrop_jax --model_args pretrained=PATH,method=rel_att`.

lmms-eval finds the class through the `lmms_eval.models` entry point (pyproject.toml), which names `MANIFEST`.
Every generate_until request is answered with ViCrop by `answer_batch` (the crop happens inside each request);
loglikelihood scores a continuation given the image and the same method's crop, with one plain forward.
The context lmms-eval builds is passed as the question: the family's paper prompt wraps it.

Axis letters: T tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelManifest
    from lmms_eval.utils import simple_parse_args_string
except ImportError as error:  # the module is only for lmms-eval: say how to get it
    raise ImportError(f"vicrop_jax.lmms_eval needs lmms-eval ({error}): pip install 'vicrop_jax[lmms]', or see the "
                      "section 'lmms-eval' of docs/evaluation.md for the CPU install without torchvision") from error

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from loguru import logger
from tqdm import tqdm

import vicrop_jax
from vicrop_jax._generation import pixel_values
from vicrop_jax._loading import Model
from vicrop_jax.cli import DTYPE_CHOICES
from vicrop_jax.nn.decoding import pad_prompt
from vicrop_jax.vicrop.engine import Engine
from vicrop_jax.vicrop.methods import (
    Strategy, method_from_name, option_names, resolve_method, strategy_class, typed_options,
)
from vicrop_jax.vicrop.strategy import Record

MODEL_NAME = "vicrop_jax"
MANIFEST = ModelManifest(model_id=MODEL_NAME, simple_class_path="vicrop_jax.lmms_eval.VicropJax")

GREEDY_SETTINGS = {"temperature": 0, "do_sample": False, "num_beams": 1}  # anything else asks for sampling/beams
# top_p and top_k do nothing in greedy decoding; images go through the checkpoint's own image processor, as in
# vicrop-jax eval, whatever image_aspect_ratio a task names (it selects original LLaVA's preprocessing)
IGNORED_GENERATION_KWARGS = ("top_p", "top_k", "image_aspect_ratio")


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """What `--model_args` sets, converted from lmms-eval's strings; `method` already a value."""

    pretrained: str  # anything vicrop_jax.load takes: a folder, a cached repo id, "vicrop-tiny"
    method: Strategy
    batch_size: int = 1
    dtype: str = "auto"


@dataclasses.dataclass(frozen=True)
class Generation:
    """How one generate_until request decodes; None max_new_tokens means answer_batch's default."""

    max_new_tokens: int | None
    until: tuple[str, ...]


def positive_int(name: str, value: Any) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}={value!r}: expected a whole number of at least 1 ('auto' is not supported)")
    return int(text)


def parse_model_args(args: dict[str, Any]) -> ModelArgs:
    """`--model_args` as a ModelArgs; an unknown name is refused with the valid ones (ours and the method's)."""
    fields = [field.name for field in dataclasses.fields(ModelArgs)]
    if "pretrained" not in args:
        raise ValueError("model_args needs pretrained=PATH_OR_NAME (a checkpoint folder, a cached repo id or "
                         "vicrop-tiny)")
    method_name = str(args.get("method", "rel_att"))
    method_class = strategy_class(method_name)
    options = {name: value for name, value in args.items() if name not in fields}
    unknown = sorted(set(options) - set(option_names(method_class)))
    if unknown:
        method_options = ", ".join(option_names(method_class)) or "none"
        raise ValueError(f"unknown model_args {', '.join(unknown)}; valid: {', '.join(fields)}, and the options of "
                         f"method {method_name!r}: {method_options}")
    if method_class.needs_box:
        refusal = (f"method {method_name!r} crops the dataset's ground-truth box, which lmms-eval requests do not "
                   "carry; choose a map method or another baseline")
        raise ValueError(refusal)  # noqa: TRY004 (a method the user chose, not an argument of a wrong type)
    method = method_from_name(method_name, **typed_options(method_class, options, "model_args"))
    dtype = str(args.get("dtype", ModelArgs.dtype))
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    return ModelArgs(str(args["pretrained"]), method, positive_int("batch_size", args.get("batch_size", 1)), dtype)


def with_harness_args(model_args: dict[str, Any], harness: dict[str, Any]) -> dict[str, Any]:
    """`--model_args` joined with what lmms-eval's own options pass (`--batch_size`, always, 1 by default;
    `--device`, `--max_batch_size` when given). A batch_size in model_args wins over the default; two that
    differ are refused, and so are the options vicrop_jax does not take."""
    if harness.get("device") is not None:
        raise ValueError(f"--device {harness['device']}: vicrop_jax runs on JAX's default device; choose it with "
                         "JAX_PLATFORMS=cpu|cuda (and CUDA_VISIBLE_DEVICES) instead")
    if harness.get("max_batch_size") is not None:
        raise ValueError("--max_batch_size is for --batch_size auto, which vicrop_jax does not do; give a number")
    cli_batch = str(harness.get("batch_size", 1))
    if "batch_size" in model_args and cli_batch not in ("1", str(model_args["batch_size"])):
        raise ValueError(f"batch_size={model_args['batch_size']} in --model_args and --batch_size {cli_batch} "
                         "differ: give one of them")
    return {"batch_size": cli_batch, **model_args}


def generation_settings(gen_kwargs: dict[str, Any]) -> Generation:
    """A task's generation_kwargs as greedy decoding settings; sampling, beams or an unknown key are refused."""
    for key, greedy in GREEDY_SETTINGS.items():
        value = gen_kwargs.get(key)
        if value is not None and value != greedy:
            raise ValueError(f"generation_kwargs {key}={value!r}: vicrop_jax decodes greedily only; set {key}="
                             f"{greedy} (e.g. --gen_kwargs {key}={greedy})")
    handled = {"max_new_tokens", "until", *GREEDY_SETTINGS, *IGNORED_GENERATION_KWARGS}
    unknown = sorted(set(gen_kwargs) - handled)
    if unknown:
        raise ValueError(f"generation_kwargs {', '.join(unknown)} not supported by vicrop_jax; it handles "
                         f"{', '.join(sorted(handled))}")
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    tokens = gen_kwargs.get("max_new_tokens")
    return Generation(None if tokens is None else positive_int("max_new_tokens", tokens), until)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The text before the first of the stop strings (decoding itself stops at EOS only)."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def one_image(visuals: Any, task: str, doc_id: Any) -> PIL.Image.Image:
    """The document's single image: ViCrop crops one image per question."""
    if visuals is None:
        visuals = []
    elif not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    if len(visuals) != 1 or not isinstance(visuals[0], PIL.Image.Image):
        kinds = ", ".join(type(v).__name__ for v in visuals) or "none"
        raise ValueError(f"task {task!r} doc {doc_id}: vicrop_jax answers about exactly one image per question, the "
                         f"task gives {len(visuals)} visual(s) ({kinds})")
    return visuals[0].convert("RGB")


@functools.partial(jax.jit, static_argnums=0)
def continuation_logprob(module, params: Any, ids: jax.Array, pixels: jax.Array, image_text: tuple,
                         start: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of the log-probabilities of ids[start:start+count] (ids [T] right-padded) under one forward, and
    whether each of those tokens is the greedy one."""
    logits = module.apply({"params": params}, ids[None], pixels[None], *image_text)[0]
    log_probs = jax.nn.log_softmax(logits[:-1].astype(jnp.float32), axis=-1)  # [T-1, V]: row t predicts token t+1
    targets = ids[1:]
    picked = jnp.take_along_axis(log_probs, targets[:, None], axis=1)[:, 0]
    position = jnp.arange(1, ids.shape[0])
    scored = (position >= start) & (position < start + count)
    greedy = jnp.all(jnp.where(scored, jnp.argmax(log_probs, axis=-1) == targets, True))
    return jnp.sum(jnp.where(scored, picked, 0.0)), greedy


def score_continuation(model: Model, pixels: np.ndarray, question: str, continuation: str) -> tuple[float, bool]:
    """(log p(continuation | the question's prompt over pixels [I,H,W,3]), is it the greedy continuation).

    The continuation's tokens are those the prompt + continuation text has beyond the prompt's own, as
    lm-eval splits them."""
    family, count = model.family, len(pixels)
    if not family.fixed_resolution:
        raise ValueError(f"loglikelihood requests are not supported for {family.name} (its images enter at their own "
                         "resolution, with rotary positions this scorer does not build): use generate_until tasks")
    prompt = family.prompt(question, count)
    ids, image_text = family.prompt_inputs(model, prompt, count)
    whole, context = model.tokenizer.encode(prompt + continuation), model.tokenizer.encode(prompt)
    full = ids + whole[len(context):]
    limit = model.config.text.max_position_embeddings
    if len(full) > limit:
        raise ValueError(f"prompt and continuation are {len(full)} tokens, the model allows {limit}")
    padded, _ = pad_prompt(full)
    total, greedy = continuation_logprob(model.module, model.params, padded, pixels,
                                         tuple(text[:1] for text in image_text), np.int32(len(ids)),
                                         np.int32(len(full) - len(ids)))
    return float(total), bool(greedy)


class VicropJax(lmms):
    """LLaVA-1.5 / InstructBLIP with ViCrop for lmms-eval's simple-model API.

    model_args: pretrained (required), method (default rel_att), batch_size, dtype, and the method's options
    (layer, heads=[0,5], qformer_layer, general_question, clip_negative).
    """

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        self.settings = parse_model_args(model_args)
        self.model = vicrop_jax.load(self.settings.pretrained, dtype=self.settings.dtype, check_finite=True)
        self.method = resolve_method(self.model, self.settings.method)  # the default layer filled in, options checked

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> VicropJax:
        return cls(**with_harness_args(simple_parse_args_string(arg_string), additional_config or {}))

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    def _doc(self, task: str, split: str, doc_id: Any) -> dict:
        return self.task_dict[task][split][doc_id]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy ViCrop answers (the crop answer), batched by answer_batch, cut at the task's stop strings."""
        groups: dict[Generation, list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault(generation_settings(request.args[1]), []).append(position)
        answers = [""] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="vicrop_jax answering")
        for settings, positions in groups.items():
            for begin in range(0, len(positions), self.batch_size):
                chunk = positions[begin: begin + self.batch_size]
                for position, text in zip(chunk, self._answer_chunk([requests[p] for p in chunk], settings, begin)):
                    answers[position] = cut_at_stops(text, settings.until)
                progress.update(len(chunk))
        progress.close()
        return answers

    def _answer_chunk(self, requests: list[Instance], settings: Generation, seed: int) -> list[str]:
        """One answer_batch call; a record that cannot run (too long a question) answers "" with a warning, as
        lmms-eval's own models do, and the others keep their answers."""
        images, questions = [], []
        for context, _, doc_to_visual, doc_id, task, split in (request.args for request in requests):
            images.append(one_image(doc_to_visual(self._doc(task, split, doc_id)), task, doc_id))
            questions.append(context)
        limits = {} if settings.max_new_tokens is None else {"max_new_tokens": settings.max_new_tokens}
        try:
            results = vicrop_jax.answer_batch(self.model, images, questions, self.method,
                                              batch_size=self.batch_size, seed=seed, **limits)
        except vicrop_jax.BatchError as error:
            for position, why in error.failures:
                logger.warning(f"vicrop_jax: doc {requests[position].args[3]} answered '': {why}")
            results = error.answers
        return ["" if result is None else result.answer for result in results]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(negative log-likelihood of each continuation, is it greedy), given the image and the method's crop.

        The first value is -sum log p over the continuation's tokens: lmms-eval 0.7.3 picks a multiple-choice
        answer by the argmin of it (its models return losses). The crop box is chosen once per question."""
        questions: dict[tuple, list[int]] = {}
        for position, request in enumerate(requests):
            if len(request.args) != 6:
                raise ValueError(f"loglikelihood request {request.args[:2]!r} has no image (an unconditional "
                                 "request, e.g. acc_mutual_info): vicrop_jax scores continuations of an image")
            context, _, _, doc_id, task, split = request.args
            questions.setdefault((context, task, split, doc_id), []).append(position)
        scores: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="vicrop_jax scoring")
        for seed, ((context, task, split, doc_id), positions) in enumerate(questions.items()):
            doc = self._doc(task, split, doc_id)
            image = one_image(requests[positions[0]].args[2](doc), task, doc_id)
            boxes = self.method.host_boxes(Engine(self.model), Record(image, context, context, seed=seed)).boxes
            pixels = pixel_values(self.model, [image] + [image.crop(box) for box in boxes])
            for position in positions:
                target = requests[position].args[1]
                continuation = target if isinstance(target, str) else str(target(doc))
                logprob, greedy = score_continuation(self.model, pixels, context, continuation)
                scores[position] = (-logprob, greedy)
                progress.update(1)
        progress.close()
        return scores

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vicrop_jax answers single-round questions only (generate_until, loglikelihood); "
                                  "multi-round tasks are not supported")
