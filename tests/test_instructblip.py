"""Numerical parity of the Flax InstructBLIP (Vicuna) with transformers' eager PyTorch model on the same weights.

Tiny random `InstructBlipForConditionalGeneration` checkpoints are written by `save_pretrained` and read
through the production path (`open_checkpoint` + `rename_keys` + `hf_to_flax`).
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from vicrop_jax.nn._attention import AttentionKernel
from vicrop_jax.nn.decoding import greedy_generate, pad_prompt, strip_generated
from vicrop_jax.nn.instructblip import InstructBlip, InstructBlipConfig
from weights_conversion.core import CheckpointMismatchError, check_table, flax_to_hf, hf_to_flax, rename_keys
from weights_conversion.instructblip_table import INSTRUCTBLIP_KEY_ALIASES, instructblip_table
from weights_conversion.safetensors_io import INDEX_FILE, open_checkpoint, write_checkpoint

pytestmark = pytest.mark.slow  # parity on several configs; test_instructblip_api.py stays in the fast subset

IMAGE_TOKEN_ID = 99
CONFIGS = {
    # full heads, a cross-attention in every Q-Former layer, padded instruction
    "mha-crossfreq1-q4": dict(
        image_size=28, vision_width=32, kv_heads=4, qformer_layers=2, cross_frequency=1, queries=4,
        instruction_padding=2, shard=None,
    ),
    # grouped KV heads, cross-attention every 2nd layer, vision width != Q-Former width, sharded checkpoint
    "gqa-crossfreq2-q6-sharded": dict(
        image_size=42, vision_width=48, kv_heads=2, qformer_layers=3, cross_frequency=2, queries=6,
        instruction_padding=0, shard="20KB",
    ),
}


def hf_config(*, image_size, vision_width, kv_heads, qformer_layers, cross_frequency, queries, **_):
    vision = transformers.InstructBlipVisionConfig(
        hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=14, initializer_range=0.02,
    )
    qformer = transformers.InstructBlipQFormerConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=qformer_layers, num_attention_heads=4,
        intermediate_size=64, cross_attention_frequency=cross_frequency,
    )
    text = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=100, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.InstructBlipConfig(
        vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=queries,
        image_token_index=IMAGE_TOKEN_ID,
    )


def load_flax(folder):
    """The production loading path: config.json -> config, safetensors (maybe sharded) -> params."""
    config = InstructBlipConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    module = InstructBlip(config)
    ids, pixels, qids, qmask = inputs(config, np.random.RandomState(0), 1, 0)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, pixels, qids, qmask)["params"]
    tensors = rename_keys(open_checkpoint(folder), INSTRUCTBLIP_KEY_ALIASES)
    return module, hf_to_flax(instructblip_table(config), tensors, abstract, np.float32), abstract


def inputs(config: InstructBlipConfig, rng, num_images: int, instruction_padding: int):
    """LM ids [image]*Q*I + BOS + text, pixels [1,I,H,W,3], Q-Former ids and mask [1,Tq] (padded at the end)."""
    text = rng.randint(3, 90, size=6)
    ids = np.array([[IMAGE_TOKEN_ID] * config.tokens_per_image * num_images + [1, *text]], np.int32)
    size = config.image_size
    pixels = rng.randn(1, num_images, size, size, 3).astype(np.float32)
    qids = np.concatenate([rng.randint(1, 60, size=5), np.zeros(instruction_padding, int)])[None].astype(np.int32)
    qmask = (np.arange(qids.shape[1]) < 5)[None].astype(np.int32)
    return ids, pixels, qids, qmask


def torch_images(pixels):
    """[1,I,H,W,C] -> [I,C,H,W]: in transformers each image is one batch row."""
    return torch.tensor(pixels[0].transpose(0, 3, 1, 2))


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    """(spec, Flax module, params, abstract params, torch reference, checkpoint folder)."""
    spec = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    config = hf_config(**spec)
    config._attn_implementation = "eager"
    reference = transformers.InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises them to zero; random queries make the test sharper
        reference.query_tokens.normal_()
    reference.save_pretrained(folder, **({"max_shard_size": spec["shard"]} if spec["shard"] else {}))
    assert (folder / INDEX_FILE).exists() == bool(spec["shard"])
    module, params, abstract = load_flax(folder)
    return spec, module, params, abstract, reference, folder


def reference_image_outputs(reference, pixels, qids, qmask, **kwargs):
    """transformers' image path (vision_model -> qformer -> language_projection), one call per image, in order."""
    qids, qmask = torch.tensor(qids), torch.tensor(qmask)
    return [
        reference.get_image_features(torch_images(pixels[:, i : i + 1]), qids, qmask, **kwargs)
        for i in range(pixels.shape[1])
    ]


def reference_lm_inputs(reference, ids, image_features):
    """(LM input embeddings with the query outputs scattered over the placeholders in order, ids as a tensor)."""
    ids = torch.tensor(ids)
    embeds = reference.get_input_embeddings()(ids)
    mask = (ids == IMAGE_TOKEN_ID)[..., None]
    return embeds.masked_scatter(mask, image_features.reshape(-1, embeds.shape[-1])), ids


def test_logits_and_sown_attentions_match_transformers(case):
    spec, module, params, _, reference, _ = case
    config = module.config
    ids, pixels, qids, qmask = inputs(config, np.random.RandomState(1), 1, spec["instruction_padding"])
    lm_layer = config.text.num_layers - 1
    cross_layers = tuple(range(config.qformer.num_cross_attention_layers))
    logits, state = module.apply(
        {"params": params}, ids, pixels, qids, qmask,
        attention_layers=(lm_layer,), cross_attention_layers=cross_layers, mutable=["intermediates"],
    )
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(ids), pixel_values=torch_images(pixels), qformer_input_ids=torch.tensor(qids),
            qformer_attention_mask=torch.tensor(qmask), output_attentions=True,
        )
        # forward() does not pass output_attentions to the Q-Former; get_image_features does
        (cross,) = reference_image_outputs(reference, pixels, qids, qmask, output_attentions=True)
    assert np.abs(np.asarray(logits) - expected.logits.numpy()).max() <= 1e-4

    lm_sown = state["intermediates"]["language_model"]
    assert list(lm_sown) == [f"layers_{lm_layer}"], "only the LM layer asked for is materialised"
    np.testing.assert_allclose(
        np.asarray(lm_sown[f"layers_{lm_layer}"]["self_attn"]["attention_probs"][0]),
        expected.language_model_outputs.attentions[lm_layer].numpy(), atol=1e-5, rtol=0,
    )
    expected_cross = cross.qformer_outputs.cross_attentions
    assert len(expected_cross) == len(cross_layers)
    qformer_sown = state["intermediates"]["qformer"]
    for index in cross_layers:
        layer = index * config.qformer.cross_attention_frequency
        probs = qformer_sown[f"layer_{layer}"]["crossattention"]["attention"]["cross_attention_probs"][0]
        assert probs.shape == (1, 4, config.num_query_tokens, config.vision.num_patches + 1)
        np.testing.assert_allclose(np.asarray(probs), expected_cross[index].numpy(), atol=1e-5, rtol=0)


def test_only_requested_cross_attention_is_sown(case):
    _, module, params, _, _, _ = case
    ids, pixels, qids, qmask = inputs(module.config, np.random.RandomState(1), 1, 0)
    _, state = module.apply(
        {"params": params}, pixels[:, 0], qids, qmask, cross_attention_layers=(1,),
        method="encode_images", mutable=["intermediates"],
    )
    layer = module.config.qformer.cross_attention_frequency
    assert list(state["intermediates"]["qformer"]) == [f"layer_{layer}"]


def generate(module, params, ids, pixels, qids, qmask):
    features = module.apply({"params": params}, pixels[0], qids.repeat(pixels.shape[1], 0),
                            qmask.repeat(pixels.shape[1], 0), method="encode_images")
    padded, length = pad_prompt(ids[0])
    tokens = greedy_generate(
        module, params, padded[None], np.array([length], np.int32), features.reshape(1, -1, features.shape[-1]),
        max_new_tokens=20, eos_ids=module.config.text.eos_token_ids,
    )
    return strip_generated(np.asarray(tokens[0]))


def test_greedy_generation_is_token_identical(case):
    spec, module, params, _, reference, _ = case
    ids, pixels, qids, qmask = inputs(module.config, np.random.RandomState(2), 1, spec["instruction_padding"])
    ours = generate(module, params, ids, pixels, qids, qmask)
    with torch.no_grad():
        theirs = reference.generate(
            pixel_values=torch_images(pixels), qformer_input_ids=torch.tensor(qids),
            qformer_attention_mask=torch.tensor(qmask), input_ids=torch.tensor(ids),
            max_new_tokens=20, do_sample=False,
        )
    assert len(ours) > 1, "pick a seed whose generation does not end at once"
    assert ours == theirs[0, ids.shape[1]:].tolist()


def test_fused_attention_gives_the_same_logits_sown_attentions_and_tokens(case):
    """The fused kernel in every attention no map reads (EVA, Q-Former, LLaMA): logits within 1e-5 of the
    explicit ones, the sown layers unchanged, greedy tokens identical to transformers'."""
    spec, module, params, _, reference, _ = case
    fused = module.clone(attention_kernel=AttentionKernel.FUSED)
    ids, pixels, qids, qmask = inputs(module.config, np.random.RandomState(2), 1, spec["instruction_padding"])
    run = lambda m: m.apply(  # noqa: E731
        {"params": params}, ids, pixels, qids, qmask, attention_layers=(1,), cross_attention_layers=(0,),
        mutable=["intermediates"])
    (logits, state), (expected_logits, expected_state) = run(fused), run(module)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected_logits), atol=1e-5, rtol=0)
    for sown, expected in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected_state)):
        np.testing.assert_allclose(np.asarray(sown), np.asarray(expected), atol=1e-6, rtol=0)
    with torch.no_grad():
        theirs = reference.generate(
            pixel_values=torch_images(pixels), qformer_input_ids=torch.tensor(qids),
            qformer_attention_mask=torch.tensor(qmask), input_ids=torch.tensor(ids),
            max_new_tokens=20, do_sample=False,
        )
    assert generate(fused, params, ids, pixels, qids, qmask) == theirs[0, ids.shape[1]:].tolist()


def test_two_images_match_image_by_image_reference(case):
    spec, module, params, _, reference, _ = case
    ids, pixels, qids, qmask = inputs(module.config, np.random.RandomState(3), 2, spec["instruction_padding"])
    logits = module.apply({"params": params}, ids, pixels, qids, qmask)
    with torch.no_grad():
        outputs = reference_image_outputs(reference, pixels, qids, qmask)
        embeds, ids_t = reference_lm_inputs(reference, ids, torch.cat([out.pooler_output for out in outputs]))
        expected = reference.language_model(inputs_embeds=embeds).logits
        theirs = reference.language_model.generate(
            inputs_embeds=embeds, input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
            max_new_tokens=20, do_sample=False,
        )
    assert np.abs(np.asarray(logits) - expected.numpy()).max() <= 1e-4
    ours = generate(module, params, ids, pixels, qids, qmask)
    assert len(ours) > 1
    assert ours == theirs[0, ids.shape[1]:].tolist()


def test_gradient_wrt_cross_attention_matches_torch(case):
    """d log p(top) / d cross-attention probs, via Flax `perturb`, equals torch autograd on the returned probs."""
    spec, module, params, _, reference, _ = case
    config = module.config
    ids, pixels, qids, qmask = inputs(config, np.random.RandomState(4), 1, spec["instruction_padding"])
    index = config.qformer.num_cross_attention_layers - 1
    layer = index * config.qformer.cross_attention_frequency
    args = (ids, pixels, qids, qmask)
    logits, state = module.apply(
        {"params": params}, *args, cross_attention_layers=(index,), mutable=["perturbations"]
    )
    top = int(np.argmax(logits[0, -1]))

    def score(perturbations):
        out = module.apply({"params": params, "perturbations": perturbations}, *args, cross_attention_layers=(index,))
        return jax.nn.log_softmax(out[0, -1])[top]

    grads = jax.grad(score)(state["perturbations"])
    ours = np.asarray(grads["qformer"][f"layer_{layer}"]["crossattention"]["attention"]["cross_attention_probs"])

    (image,) = reference_image_outputs(reference, pixels, qids, qmask, output_attentions=True)
    probs = image.qformer_outputs.cross_attentions[index]
    probs.retain_grad()
    embeds, _ = reference_lm_inputs(reference, ids, image.pooler_output)
    torch_logits = reference.language_model(inputs_embeds=embeds).logits
    torch_logits[0, -1].log_softmax(-1)[top].backward()
    theirs = probs.grad.numpy()
    assert np.abs(theirs).max() > 0
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()


def test_conversion_round_trip(case, tmp_path):
    """table check, flax_to_hf -> hf_to_flax identity, and our export loads in transformers with equal logits."""
    spec, module, params, abstract, reference, folder = case
    table = instructblip_table(module.config)
    check_table(table, abstract)
    tensors = flax_to_hf(table, params)
    back = hf_to_flax(table, tensors, abstract, np.float32)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)

    write_checkpoint(tensors, tmp_path, max_shard_bytes=16_000)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    exported = transformers.InstructBlipForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    ids, pixels, qids, qmask = inputs(module.config, np.random.RandomState(5), 1, spec["instruction_padding"])
    kwargs = dict(
        input_ids=torch.tensor(ids), pixel_values=torch_images(pixels), qformer_input_ids=torch.tensor(qids),
        qformer_attention_mask=torch.tensor(qmask),
    )
    with torch.no_grad():
        np.testing.assert_array_equal(exported(**kwargs).logits.numpy(), reference(**kwargs).logits.numpy())


def test_model_prefixed_layout_loads_through_the_aliases(case, tmp_path):
    _, module, params, _, _, folder = case
    moved = {"vision_model.": "model.vision_model.", "qformer.": "model.qformer.", "query_tokens": "model.query_tokens",
             "language_projection.": "model.language_projection.", "language_model.model.": "model.language_model.",
             "language_model.lm_head.": "lm_head."}
    tensors = {}
    for key, value in flax_to_hf(instructblip_table(module.config), params).items():
        prefix = next(p for p in moved if key.startswith(p))
        tensors[moved[prefix] + key[len(prefix):]] = value
    write_checkpoint(tensors, tmp_path)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    jax.tree_util.tree_map(np.testing.assert_array_equal, load_flax(tmp_path)[1], params)


def test_mismatched_checkpoint_names_every_bad_key(case, tmp_path):
    _, module, params, _, _, folder = case
    tensors = flax_to_hf(instructblip_table(module.config), params)
    deleted = "qformer.encoder.layer.0.crossattention.attention.key.weight"
    misshaped = "vision_model.embeddings.position_embedding"
    del tensors[deleted]
    tensors[misshaped] = tensors[misshaped][:, :-1]
    write_checkpoint(tensors, tmp_path)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointMismatchError) as error:
        load_flax(tmp_path)
    assert deleted in str(error.value) and misshaped in str(error.value)


def test_flan_t5_variant_is_refused():
    text = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, vocab_size=100)
    hf = transformers.InstructBlipConfig(text_config=text, image_token_index=99).to_dict()
    with pytest.raises(ValueError, match=r"only the Vicuna \(LLaMA\) variants"):
        InstructBlipConfig.from_hf_config(hf)


def test_full_size_vicuna_7b_shapes():
    """The published Vicuna-7B layout, without memory: table in sync, key shapes as in the checkpoint."""
    hf = transformers.InstructBlipConfig(
        vision_config=transformers.InstructBlipVisionConfig(),
        qformer_config=transformers.InstructBlipQFormerConfig(vocab_size=30523),
        text_config=transformers.LlamaConfig(vocab_size=32001, pad_token_id=0, max_position_embeddings=2048),
        num_query_tokens=32, image_token_index=32000,
    ).to_dict()
    config = InstructBlipConfig.from_hf_config(hf)
    assert (config.tokens_per_image, config.image_size, config.qformer.num_cross_attention_layers) == (32, 224, 6)
    module = InstructBlip(config)
    ids = np.full((1, 40), config.image_token_id, np.int32)
    pixels = np.zeros((1, 1, 224, 224, 3), np.float32)
    qids, qmask = np.zeros((1, 8), np.int32), np.ones((1, 8), np.int32)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, pixels, qids, qmask)["params"]
    table = instructblip_table(config)
    check_table(table, abstract)
    flat = {hf_key: path for path, (hf_key, _) in table.items()}
    leaves = traverse_util.flatten_dict(abstract)
    assert leaves[flat["vision_model.encoder.layers.38.self_attn.qkv.weight"]].shape == (1408, 3 * 1408)
    assert leaves[flat["query_tokens"]].shape == (1, 32, 768)
    assert leaves[flat["qformer.encoder.layer.10.crossattention.attention.key.weight"]].shape == (1408, 768)
    assert leaves[flat["language_projection.weight"]].shape == (768, 4096)
    assert ("qformer", "layer_11", "crossattention") not in {p[:3] for p in leaves}
