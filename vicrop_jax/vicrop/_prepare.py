"""Host-side preparation shared by maps and answers: prompts to padded device arrays, options."""

from __future__ import annotations

import numpy as np

from vicrop_jax._generation import prompt_inputs
from vicrop_jax._loading import Model
from vicrop_jax.nn.decoding import bucket_length
from vicrop_jax.vicrop.maps import DEFAULT_LAYER, MapOptions, PromptArrays, check_options
from vicrop_jax.prompts import GENERAL_QUESTION, instructblip_prompt, llava_prompt


def question_prompt(model: Model, question: str, num_images: int = 1) -> str:
    """The paper-exact prompt of the model family (SPEC section 1)."""
    if model.kind == "llava":
        return llava_prompt(question, num_images)
    return instructblip_prompt(question)


def prompt_arrays(model: Model, prompts: list[str], num_images: int = 1) -> list[PromptArrays]:
    """Prompts tokenized and right-padded to one common bucket, so they stack into a batch."""
    encoded = [prompt_inputs(model, prompt, num_images) for prompt in prompts]
    bucket = bucket_length(max(len(ids) for ids, _ in encoded))
    arrays = []
    for ids, image_text in encoded:
        padded = np.zeros(bucket, np.int32)
        padded[: len(ids)] = ids
        qformer = tuple(text[0] for text in image_text) if image_text else (None, None)
        arrays.append(PromptArrays(padded, np.int32(len(ids)), *qformer))
    return arrays


def default_map_layer(kind: str, config) -> int:
    """The checkpoint's own map layer where its config names one (`vicrop_attention_layer`, chosen by where its
    attention falls, as the paper chose its layers), else the paper's (14 LLaVA, 15 InstructBLIP), or the
    middle layer of a model too shallow to have it."""
    if config.map_layer is not None:
        return config.map_layer
    return min(DEFAULT_LAYER[kind], config.text.num_layers // 2)


def map_options(
    model: Model,
    method: str,
    *,
    layer: int | None = None,
    qformer_layer: int = 2,
    heads=None,
    clip_negative: bool = True,
    general_question: str = GENERAL_QUESTION,
) -> MapOptions:
    """Validated map options; the layer defaults to `default_map_layer`."""
    if layer is None:
        layer = default_map_layer(model.kind, model.config)
    options = MapOptions(
        method=method,
        layer=int(layer),
        qformer_layer=int(qformer_layer),
        heads=None if heads is None else tuple(int(h) for h in heads),
        clip_negative=bool(clip_negative),
        general_question=general_question,
    )
    check_options(model.kind, model.config, options)
    return options
