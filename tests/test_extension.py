"""The extension points work without touching the library: a map method and a model family defined here."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

import vicrop_jax
from vicrop_jax.families import LLAVA, LlavaFamily
from vicrop_jax.testing.hf_models import llava_config, noise_image as scene, save_llava
from vicrop_jax.vicrop.methods import resolve_method

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the color of the small shape ?", "What shape is on the left ?", "how many ?"]


def centre_prior(shape: tuple[int, int], sigma: float):
    y, x = np.meshgrid((np.arange(shape[0]) + 0.5) / shape[0] - 0.5, (np.arange(shape[1]) + 0.5) / shape[1] - 0.5,
                       indexing="ij")
    return np.exp(-(x**2 + y**2) / (2 * sigma**2)).astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CentreWeighted(vicrop_jax.MapMethod):
    """rel-att times a Gaussian prior on the image centre (photographers centre what matters)."""

    name: ClassVar[str] = "centre_weighted"
    sigma: float = 0.25

    def whole_prompt_map(self, static, params, pixels, question, general, high_pass):
        relative = vicrop_jax.RelAtt(layer=self.layer, heads=self.heads, qformer_layer=self.qformer_layer,
                                     general_question=self.general_question)
        importance = relative.whole_prompt_map(static, params, pixels, question, general, high_pass)
        return importance * jnp.asarray(centre_prior(importance.shape, self.sigma))


@dataclasses.dataclass(frozen=True)
class WholePromptLlava(LlavaFamily):
    """LLaVA that shares no prefix between prompts: maps and answers from whole prompts."""

    def prefix_tokens(self, model):
        return None


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def test_a_map_method_defined_outside_the_library_runs_through_answer_and_answer_batch(model):
    images = [scene(), scene(90, 120, seed=1), scene(seed=2)]
    method = CentreWeighted(layer=1, sigma=0.2)
    results = vicrop_jax.answer_batch(model, images, QUESTIONS, method, batch_size=2)
    for image, question, batched in zip(images, QUESTIONS, results):
        single = vicrop_jax.answer(model, image, question, method)
        relative = vicrop_jax.importance_map(model, image, question, "rel_att", layer=1)
        expected = relative * centre_prior(relative.shape, 0.2)
        np.testing.assert_allclose(single.importance, expected, rtol=1e-4, atol=1e-7)
        assert single.bbox == vicrop_jax.select_bbox(single.importance, image.size, model.config.image_size)
        assert (batched.bbox, batched.answer, batched.original_answer) == (
            single.bbox, single.answer, single.original_answer)
        np.testing.assert_allclose(batched.importance, single.importance, rtol=1e-4, atol=1e-7)
    assert vicrop_jax.importance_map(model, images[0], QUESTIONS[0], method, sigma=0.5).shape == relative.shape


def test_options_replace_the_fields_of_a_method_value_and_unknown_ones_are_refused(model):
    assert resolve_method(model, CentreWeighted(layer=1), sigma=0.5) == CentreWeighted(layer=1, sigma=0.5)
    with pytest.raises(ValueError, match=r"method 'rel_att' takes no option sigma \(its options: layer, heads"):
        vicrop_jax.answer(model, scene(), QUESTIONS[0], "rel_att", sigma=0.5)
    with pytest.raises(ValueError, match="method 'none' takes no option layer"):
        vicrop_jax.answer(model, scene(), QUESTIONS[0], "none", layer=1)


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    save_llava(folder, llava_config(image_size=56, text_layers=3))
    return folder


@pytest.mark.parametrize("method", ["rel_att", "pure_grad"])  # an attention map, and the pixel-gradient hook
def test_a_family_defined_outside_the_library_loads_and_answers(llava_folder, method):
    """A LLaVA family without the shared prefix runs every map and answer from whole prompts: the same boxes,
    maps and answers as the library's prefix-cached LLaVA."""
    toy = WholePromptLlava(**{**vars(LLAVA), "name": "whole-prompt-llava", "default_map_layer": 0})
    model = vicrop_jax.load(llava_folder, family=toy)
    assert model.family is toy and resolve_method(model, method).layer == 0
    reference = vicrop_jax.load(llava_folder)
    image = scene()
    ours = vicrop_jax.answer(model, image, QUESTIONS[0], method, layer=1)
    theirs = vicrop_jax.answer(reference, image, QUESTIONS[0], method, layer=1)
    assert (ours.bbox, ours.answer, ours.original_answer) == (theirs.bbox, theirs.answer, theirs.original_answer)
    np.testing.assert_allclose(ours.importance, theirs.importance, rtol=1e-4, atol=1e-7)
    [batched] = vicrop_jax.answer_batch(model, [image], QUESTIONS[:1], method, layer=1)
    assert (batched.bbox, batched.answer) == (ours.bbox, ours.answer)
