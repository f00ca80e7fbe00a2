"""Every answer records its cost: the model passes of its strategy as the published procedure runs them (prompt
prefills, the tokens they hold, backward passes, decoded tokens), the same from `answer`, `answer_batch` and the
host path, with a gate's plain pass added."""

from __future__ import annotations

import pytest

import vicrop_jax
from vicrop_jax.prompts import GENERAL_QUESTION
from vicrop_jax.testing.hf_models import llava_config, noise_image, save_llava
from vicrop_jax.vicrop.strategy import Cost

QUESTION = "What is the color of the small shape ?"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    save_llava(folder, llava_config(image_size=56, text_layers=3))
    return vicrop_jax.load(folder)


def prompt_tokens(model, question: str, images: int) -> int:
    """A prompt's length with each image marker expanded to the image's tokens, counted from the tokenizer."""
    ids = model.tokenizer.encode(model.family.prompt(question, images))
    return len(ids) + images * (model.config.tokens_per_image - 1)


def decoded(model, text: str, limit: int = 20) -> int:
    """The answer's tokens and its EOS, unless it ran to the token limit."""
    return min(limit, len(model.tokenizer.encode(text)) - len(model.tokenizer.encode("")) + 1)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("method, options, passes, backward, prompts", [
    ("none", {}, 1, 0, [(QUESTION, 1)]),
    ("rel_att", {}, 3, 0, [(QUESTION, 1), (GENERAL_QUESTION, 1), (QUESTION, 2)]),
    ("grad_att", {}, 2, 1, [(QUESTION, 1), (QUESTION, 2)]),
    pytest.param("pure_grad", {}, 3, 2, [(QUESTION, 1), (GENERAL_QUESTION, 1), (QUESTION, 2)], marks=SLOW),
    pytest.param("auto", {}, 4, 1, [(QUESTION, 1), (GENERAL_QUESTION, 1), (QUESTION, 2), (QUESTION, 2)], marks=SLOW),
    pytest.param("rel_att", {"regions": "auto"}, 4, 0,
                 [(QUESTION, 1), (GENERAL_QUESTION, 1), (QUESTION, 2), (QUESTION, 3)], marks=SLOW),
    ("center", {}, 1, 0, [(QUESTION, 2)]),
    # a gate that crops: its plain pass, then rel-att's; one that does not: the plain pass alone
    ("rel_att", {"gate": 1.0}, 4, 0, [(QUESTION, 1), (QUESTION, 1), (GENERAL_QUESTION, 1), (QUESTION, 2)]),
    ("rel_att", {"gate": 0.0}, 1, 0, [(QUESTION, 1)]),
])
def test_the_cost_counts_the_published_procedures_passes(model, method, options, passes, backward, prompts):
    image = noise_image(150, 110)
    single = vicrop_jax.answer(model, image, QUESTION, method, **options)
    answers = [single.answer] + ([single.original_answer] if options.get("gate") == 1.0 else [])
    expected = Cost(passes, sum(prompt_tokens(model, q, n) for q, n in prompts),
                    sum(decoded(model, text) for text in answers), backward)
    assert single.cost == expected
    [batched] = vicrop_jax.answer_batch(model, [image], [QUESTION], method, **options)
    assert batched.cost == expected
    if method in ("rel_att", "center") and not options:
        assert vicrop_jax.answer(model, image, QUESTION, method, device_pipeline=False).cost == expected
