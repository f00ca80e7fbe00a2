"""Qwen2.5-VL against transformers' `Qwen2_5_VLForConditionalGeneration` (eager, float32) on tiny random checkpoints
written by `save_pretrained` and read by `vicrop_jax.load`: logits, the attention of the map layer, greedy
generations, cached decoding, the checkpoint layouts."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file
from transformers import Qwen2VLImageProcessor

import vicrop_jax
from vicrop_jax._generation import generate_ids
from vicrop_jax._loading import save_hf_checkpoint
from vicrop_jax.families.qwen2_5_vl import rope_positions
from vicrop_jax.nn.llama import ATTENTION_PROBS
from vicrop_jax.nn.qwen_vit import VisionPatches
from vicrop_jax.prompts import qwen2_5_vl_prompt
from vicrop_jax.testing.hf_models import noise_image, qwen2_5_vl_config, save_qwen2_5_vl

# (config options, images as (width, height)): several windows per image, full attention at some blocks only,
# grouped KV heads, portrait, landscape, odd sizes, one and two images
SHAPES = {
    "landscape": (dict(), [(150, 110)], None),
    "portrait-two-images": (dict(width=48, num_kv_heads=1, mrope_section=(2, 2, 2), depth=2,
                                 fullatt_block_indexes=(1,), window_size=112), [(90, 200), (133, 61)], None),
    "odd-wide-sharded": (dict(width=64, num_heads=8, num_kv_heads=4, text_layers=3, depth=4,
                              fullatt_block_indexes=(0, 3), window_size=84, vision_heads=4, vision_width=48),
                         [(301, 97)], "100KB"),
}
LAYER = 1


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request, tmp_path_factory):
    options, sizes, shard = SHAPES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    torch_model = save_qwen2_5_vl(folder, qwen2_5_vl_config(**options), max_shard_size=shard)
    assert len(list(folder.glob("*.safetensors"))) > 1 if shard else 1
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    return vicrop_jax.load(folder, "float32"), torch_model, images, folder


def torch_inputs(folder, model, images, prompt):
    """transformers' inputs: its image processor, our expanded ids (the processor needs torchvision's video part)."""
    processed = Qwen2VLImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")
    grids = processed["image_grid_thw"].tolist()
    tokens = [t * h * w // 4 for t, h, w in grids]
    ids, _ = model.family.prompt_inputs(model, prompt, len(images), tokens)
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"],
                mm_token_type_ids=(input_ids == model.config.image_token_id).int()), ids, [tuple(g) for g in grids]


def full_forward(model, images, prompt, layer=None):
    """Our logits [T, V] (and the sown attention [N, T, T] of `layer`) from one forward without a cache."""
    inputs = model.family.generation_inputs(model, images, prompt)
    [patches] = inputs.encode_args
    batch = VisionPatches(*(np.asarray(leaf)[None] for leaf in patches))
    ids = np.asarray(inputs.ids, np.int32)[None]
    layers = () if layer is None else (layer,)
    logits, state = model.module.apply({"params": model.params}, ids, batch, inputs.positions[None], layers,
                                       mutable=["intermediates"])
    if layer is None:
        return np.asarray(logits[0]), None
    found = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
             if ATTENTION_PROBS in jax.tree_util.keystr(path)]
    return np.asarray(logits[0]), np.asarray(found[0][0])


def test_logits_and_the_map_layer_attention_equal_transformers(case):
    model, torch_model, images, folder = case
    prompt = qwen2_5_vl_prompt("What is the color of the shape ?", len(images))
    inputs, ids, grids = torch_inputs(folder, model, images, prompt)
    with torch.no_grad():
        out = torch_model(**inputs, output_attentions=True)
    logits, attention = full_forward(model, images, prompt, LAYER)
    np.testing.assert_allclose(logits, out.logits[0].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(attention, out.attentions[LAYER][0].numpy(), atol=1e-5, rtol=0)
    positions, _ = rope_positions(model.config, ids, grids)
    torch_positions, _ = torch_model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    np.testing.assert_array_equal(positions, torch_positions[:, 0].numpy())


def test_greedy_generation_equals_transformers_and_the_full_forward(case):
    model, torch_model, images, folder = case
    prompt = qwen2_5_vl_prompt("What shape is in the image ?", len(images))
    inputs, ids, _ = torch_inputs(folder, model, images, prompt)
    with torch.no_grad():
        expected = torch_model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    generation = model.family.generation_inputs(model, images, prompt)
    [patches] = generation.encode_args
    tokens = generate_ids(model, patches, generation.ids, 8, (), generation.positions, generation.position_offset)
    assert tokens == expected
    # cached step decoding (positions continued from the prompt's offset) = the full forward over prompt + answer
    eos = model.config.text.eos_token_ids
    answer = [t for t in tokens if t not in eos]
    logits, _ = full_forward(model, images, prompt + model.tokenizer.backend.decode(answer, skip_special_tokens=False))
    assert logits[len(ids) - 1:].argmax(-1).tolist()[: len(tokens)] == tokens


def test_generate_reads_the_prompt_as_written(case):
    model, _, images, _ = case
    text = vicrop_jax.generate(model, images, qwen2_5_vl_prompt("What is it ?", len(images)), max_new_tokens=4)
    assert isinstance(text, str)
    with pytest.raises(ValueError, match="image_pad"):
        vicrop_jax.generate(model, images, qwen2_5_vl_prompt("What is it ?", len(images) + 1))


def test_other_key_and_config_layouts_load_to_the_same_weights(case, tmp_path):
    model, _, images, folder = case
    old = tmp_path / "old"
    old.mkdir()
    tensors = {}
    for path in folder.glob("*.safetensors"):
        for key, value in load_file(path).items():
            key = "model." + key if key.startswith("visual.") else key.replace("model.", "model.language_model.")
            tensors[key] = value
    save_file(tensors, old / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    flat = {**{k: v for k, v in config.items() if k != "text_config"}, **config["text_config"],
            "model_type": "qwen2_5_vl"}
    rope = flat.pop("rope_parameters")
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["rope_theta"] = rope["rope_theta"]  # the published layout names it at the top level
    flat["vision_config"]["model_type"] = "qwen2_5_vl"
    (old / "config.json").write_text(json.dumps(flat))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (old / name).write_bytes((folder / name).read_bytes())
    reloaded = vicrop_jax.load(old, "float32")
    assert reloaded.config == model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded.params, model.params)


def test_conversion_round_trip_writes_transformers_keys(case, tmp_path):
    model, _, _, folder = case
    written = save_hf_checkpoint(model, tmp_path / "back")
    original = {k: v for path in folder.glob("*.safetensors") for k, v in load_file(path).items()}
    back = {k: v for path in written.glob("*.safetensors") for k, v in load_file(path).items()}
    assert back.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(back[key], original[key], err_msg=key)


def test_a_missing_or_misshaped_tensor_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    save_qwen2_5_vl(folder, qwen2_5_vl_config())
    [path] = folder.glob("*.safetensors")
    tensors = load_file(path)
    tensors.pop("visual.merger.mlp.2.bias")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(3, np.float32)
    tensors["visual.extra.weight"] = np.zeros(2, np.float32)
    save_file(tensors, path)
    with pytest.raises(ValueError) as error:
        vicrop_jax.load(folder, "float32")
    message = str(error.value)
    assert "merger.mlp.2.bias" in message and "q_proj.bias" in message and "extra.weight" in message


def test_sliding_window_and_video_only_options_are_refused(tmp_path):
    folder = tmp_path / "ckpt"
    save_qwen2_5_vl(folder, qwen2_5_vl_config())
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["use_sliding_window"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_sliding_window"):
        vicrop_jax.load(folder, "float32")


def test_the_prompt_is_the_release_chat_template():
    assert qwen2_5_vl_prompt("Where?", 2) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        "Where? Answer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n")


def test_image_smaller_than_a_merge_unit_is_resized_up(case):
    model, _, _, _ = case
    text = vicrop_jax.generate(model, Image.new("RGB", (9, 13), "red"), qwen2_5_vl_prompt("What ?"), max_new_tokens=2)
    assert isinstance(text, str)


# The published checkpoints' config.json (transformers 4 layout): Qwen2.5-VL-7B-Instruct and, where it differs, 3B
PUBLISHED_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
PUBLISHED_3B = {**PUBLISHED_7B, "hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16,
                "num_hidden_layers": 36, "num_key_value_heads": 2, "tie_word_embeddings": True,
                "max_window_layers": 70, "vision_config": {**PUBLISHED_7B["vision_config"], "out_hidden_size": 2048}}


@pytest.mark.parametrize("published, layer", [(PUBLISHED_7B, 22), (PUBLISHED_3B, 18)])
def test_the_published_configs_read_in_both_layouts_and_the_table_covers_the_model(published, layer):
    """The 7B and 3B configs as published and as transformers 5 rewrites them give one config; the conversion
    table covers the full-size parameter tree; the map layer is the release's 22 for the 7B's 28 layers."""
    from transformers import Qwen2_5_VLConfig
    from types import SimpleNamespace

    from vicrop_jax._loading import abstract_params
    from vicrop_jax.families.qwen2_5_vl import QWEN2_5_VL
    from vicrop_jax.nn.qwen2_5_vl import QwenVL, QwenVLConfig
    from vicrop_jax.vicrop.methods import resolve_method
    from weights_conversion.core import check_table

    config = QwenVLConfig.from_hf_config(published)
    assert QwenVLConfig.from_hf_config(Qwen2_5_VLConfig(**published).to_dict()) == config
    assert config.text.tie_word_embeddings == published["tie_word_embeddings"] and config.text.mrope_section == (
        16, 24, 24)
    params = abstract_params(QWEN2_5_VL, config, QwenVL(config))
    check_table(QWEN2_5_VL.conversion_table(config), params)
    model = SimpleNamespace(config=config, family=QWEN2_5_VL)
    assert resolve_method(model, "rel_att").layer == layer


def test_token_ids_given_to_the_composite_config_load():
    """transformers 5 keeps bos/eos/pad ids given to the composite config at its level: read there where the text
    config has none, the text config's own where it has them."""
    from transformers import Qwen2_5_VLConfig

    from vicrop_jax.nn.qwen2_5_vl import QwenVLConfig

    rewritten = Qwen2_5_VLConfig(**PUBLISHED_7B).to_dict()
    ids = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}
    moved = {**rewritten, **ids, "text_config": {k: v for k, v in rewritten["text_config"].items() if k not in ids}}
    config = QwenVLConfig.from_hf_config(moved)
    assert config == QwenVLConfig.from_hf_config(PUBLISHED_7B) and config.text.eos_token_ids == (151645,)
    both = {**rewritten, "eos_token_id": 7}
    assert QwenVLConfig.from_hf_config(both).text.eos_token_ids == (151645,)
