"""`generate`: images + prompt -> the greedy answer, through the jitted decoder of `decoding.py`."""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import numpy as np
import PIL.Image

from vicrop_jax._loading import Model
from vicrop_jax.nn.decoding import bucket_length, greedy_generate, strip_generated
from vicrop_jax.preprocessing import preprocess_batch

ImageLike = str | os.PathLike | PIL.Image.Image | np.ndarray


@functools.partial(jax.jit, static_argnums=0)
def encode_images(module, params: Any, pixels: np.ndarray, *image_text: np.ndarray) -> jax.Array:
    """Preprocessed images [n,H,W,3] (+ InstructBLIP's Q-Former ids and mask [n,Tq]) -> [n, tokens, D]."""
    return module.apply({"params": params}, pixels, *image_text, method="encode_images")


def as_image_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, (str, os.PathLike, PIL.Image.Image, np.ndarray)):
        return [images]
    return list(images)


def pixel_values(model: Model, images: Sequence[ImageLike]) -> np.ndarray:
    """Images -> [n, H, W, 3] float32, preprocessed as the checkpoint's image processor does (several at once
    on as many threads as there are cores, see `preprocess_batch`)."""
    return preprocess_batch(images, model.image_config)


def prompt_inputs(model: Model, prompt: str, num_images: int) -> tuple[list[int], tuple[np.ndarray, ...]]:
    """LM token ids with image placeholders, and the extra inputs of `encode_images` (none for LLaVA), as the
    model's family builds them."""
    return model.family.prompt_inputs(model, prompt, num_images)


def prompt_ids(model: Model, prompt: str, num_images: int) -> list[int]:
    """The LM token ids of a prompt over `num_images` images (image placeholders expanded)."""
    return prompt_inputs(model, prompt, num_images)[0]


def prompt_problem(model: Model, prompt: str, num_images: int, max_new_tokens: int) -> str | None:
    """Why a prompt cannot run (its tokens and the answer's outgrow the model's positions, or the family's own
    limits), or None."""
    try:
        tokens = len(prompt_inputs(model, prompt, num_images)[0]) + max_new_tokens
    except ValueError as error:  # e.g. a literal "<image>" in a LLaVA question
        return f"bad question: {error}"
    limit = model.config.text.max_position_embeddings
    if tokens > limit:
        return (f"question too long: {tokens} tokens, model allows {limit} (the prompt with {num_images} image(s) "
                f"and {max_new_tokens} new tokens)")
    return model.family.prompt_problem(model, prompt)


def check_prompt(model: Model, prompt: str, num_images: int, max_new_tokens: int) -> None:
    problem = prompt_problem(model, prompt, num_images, max_new_tokens)
    if problem is not None:
        raise ValueError(problem)


def generate_ids(
    model: Model, pixels: Any, ids: list[int], max_new_tokens: int = 20, image_text: tuple = (),
    positions: np.ndarray | None = None, position_offset: int | None = None, bucket: int | None = None,
) -> list[int]:
    """Greedy token ids (EOS included when reached) for one prompt and its preprocessed images (and, for
    multimodal RoPE, the prompt's positions [3, T] and the answer's offset), the prompt padded to `bucket`."""
    features = encode_images(model.module, model.params, pixels, *image_text)
    length = len(ids)
    padded = np.zeros(bucket or bucket_length(length), np.int32)
    padded[:length] = ids
    if positions is not None:
        positions = np.pad(positions, ((0, 0), (0, len(padded) - length)))[None]
        position_offset = np.array([position_offset], np.int32)
    tokens = greedy_generate(
        model.module, model.params, padded[None], np.array([length], np.int32),
        features.reshape(1, -1, features.shape[-1]), positions, position_offset,
        max_new_tokens=max_new_tokens, eos_ids=model.config.text.eos_token_ids,
    )
    return strip_generated(np.asarray(tokens[0]))


def generate(model: Model, images: ImageLike | Sequence[ImageLike], prompt: str, max_new_tokens: int = 20) -> str:
    """The greedy answer (prompt excluded) to `prompt`.

    LLaVA prompts hold one `<image>` marker per image (`prompts.llava_prompt`); InstructBLIP prompts hold
    none (`prompts.instructblip_prompt`): the images' query embeddings go in front, in order; Qwen2.5-VL prompts
    hold one `<|vision_start|><|image_pad|><|vision_end|>` per image (`prompts.qwen2_5_vl_prompt`).
    """
    images = as_image_list(images)
    check_prompt(model, prompt, len(images), max_new_tokens)
    inputs = model.family.generation_inputs(model, images, prompt)
    pixels, *image_text = inputs.encode_args
    tokens = generate_ids(model, pixels, inputs.ids, max_new_tokens, tuple(image_text), inputs.positions,
                          inputs.position_offset, inputs.bucket)
    return model.tokenizer.decode(tokens)
