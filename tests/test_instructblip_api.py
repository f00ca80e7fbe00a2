"""InstructBLIP through the public API: `load` + `generate` against transformers' processor + `generate`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipImageProcessor, InstructBlipProcessor, PreTrainedTokenizerFast

import vicrop_jax
from vicrop_jax._generation import pixel_values, prompt_inputs
from vicrop_jax.cli import main as cli_main
from vicrop_jax.families import INSTRUCTBLIP
from vicrop_jax.prompts import instructblip_prompt
from vicrop_jax.testing.hf_models import instructblip_config, save_instructblip

PROMPT = instructblip_prompt("What is the color of the small shape ?")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instructblip")
    reference = save_instructblip(folder, instructblip_config())
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor.from_pretrained(folder),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(folder),
        qformer_tokenizer=PreTrainedTokenizerFast.from_pretrained(folder / "qformer_tokenizer"),
        num_query_tokens=reference.config.num_query_tokens,
    )
    return folder, reference, processor


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (45, 61, 3), np.uint8))


def test_inputs_match_the_transformers_processor(checkpoint):
    folder, _, processor = checkpoint
    model = vicrop_jax.load(folder)
    expected = processor(images=[image(0)], text=PROMPT, return_tensors="np")
    ids, (qformer_ids, qformer_mask) = prompt_inputs(model, PROMPT, 1)
    assert ids == expected["input_ids"][0].tolist()
    length = int(qformer_mask.sum())
    assert qformer_ids[0, :length].tolist() == expected["qformer_input_ids"][0].tolist()
    assert not qformer_ids[0, length:].any()
    pixels = pixel_values(model, [image(0)])
    np.testing.assert_allclose(pixels[0], expected["pixel_values"][0].transpose(1, 2, 0), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_generate_matches_transformers(checkpoint, seed):
    folder, reference, processor = checkpoint
    model = vicrop_jax.load(folder)
    inputs = processor(images=[image(seed)], text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        tokens = reference.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    expected = processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert vicrop_jax.generate(model, [image(seed)], PROMPT) == expected


def test_two_images_put_both_query_blocks_before_the_text(checkpoint):
    folder, _, _ = checkpoint
    model = vicrop_jax.load(folder)
    ids, (qformer_ids, _) = prompt_inputs(model, PROMPT, 2)
    queries = model.config.num_query_tokens
    assert ids[: 2 * queries] == [model.config.image_token_id] * 2 * queries
    assert ids[2 * queries] == 1  # BOS of the tiny tokenizer
    assert qformer_ids.shape[0] == 2
    assert isinstance(vicrop_jax.generate(model, [image(0), image(1)], PROMPT), str)


def test_orbax_conversion_keeps_both_tokenizers(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    assert cli_main(["convert", str(folder), str(tmp_path / "orbax")]) == 0
    converted = vicrop_jax.load(tmp_path / "orbax")
    original = vicrop_jax.load(folder)
    assert converted.family is INSTRUCTBLIP
    assert vicrop_jax.generate(converted, [image(0)], PROMPT) == vicrop_jax.generate(original, [image(0)], PROMPT)
