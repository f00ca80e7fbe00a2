"""`generate`: images + prompt -> the greedy answer, through the jitted decoder of `decoding.py`."""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import numpy as np
import PIL.Image

from vicrop_jax._loading import Model
from vicrop_jax.decoding import greedy_generate, pad_prompt, strip_generated
from vicrop_jax.preprocessing import load_image, preprocess

ImageLike = str | os.PathLike | PIL.Image.Image | np.ndarray
IMAGE_MARKER = "<image>"


@functools.partial(jax.jit, static_argnums=0)
def encode_images(module, params: Any, pixels: np.ndarray) -> jax.Array:
    """Preprocessed images [n,H,W,3] -> LM-space features [n, tokens_per_image, D]."""
    return module.apply({"params": params}, pixels, method="encode_images")


def as_image_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, (str, os.PathLike, PIL.Image.Image, np.ndarray)):
        return [images]
    return list(images)


def pixel_values(model: Model, images: Sequence[ImageLike]) -> np.ndarray:
    """Images -> [n, H, W, 3] float32, preprocessed as the checkpoint's image processor does."""
    return np.stack([preprocess(load_image(image), model.image_config) for image in images])


def prompt_ids(model: Model, prompt: str, num_images: int) -> list[int]:
    """Token ids with each `<image>` marker expanded to one position per visual token."""
    ids = model.tokenizer.encode(prompt)
    image_id = model.config.image_token_id
    found = ids.count(image_id)
    if found != num_images:
        raise ValueError(
            f"the prompt has {found} {IMAGE_MARKER} marker(s) but {num_images} image(s) were given; put one "
            f"{IMAGE_MARKER} per image where it belongs (see vicrop_jax.prompts.llava_prompt)"
        )
    expanded: list[int] = []
    for token in ids:
        expanded.extend([token] * model.config.tokens_per_image if token == image_id else [token])
    return expanded


def generate_ids(model: Model, pixels: np.ndarray, ids: list[int], max_new_tokens: int = 20) -> list[int]:
    """Greedy token ids (EOS included when reached) for one prompt and its preprocessed images."""
    features = encode_images(model.module, model.params, pixels)
    padded, length = pad_prompt(ids)
    tokens = greedy_generate(
        model.module, model.params, padded[None], np.array([length], np.int32),
        features.reshape(1, -1, features.shape[-1]),
        max_new_tokens=max_new_tokens, eos_ids=model.config.text.eos_token_ids,
    )
    return strip_generated(np.asarray(tokens[0]))


def generate(model: Model, images: ImageLike | Sequence[ImageLike], prompt: str, max_new_tokens: int = 20) -> str:
    """The greedy answer (prompt excluded) to `prompt`, which holds one `<image>` marker per image."""
    images = as_image_list(images)
    ids = prompt_ids(model, prompt, len(images))
    return model.tokenizer.decode(generate_ids(model, pixel_values(model, images), ids, max_new_tokens))
