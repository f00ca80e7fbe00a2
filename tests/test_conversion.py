"""HF checkpoint <-> Flax conversion: round trips, dtypes, sharding, refusals with named keys."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util
from transformers import LlavaForConditionalGeneration

import vicrop_jax
from vicrop_jax._loading import abstract_params, save_hf_checkpoint
from vicrop_jax.families import family_for
from vicrop_jax.nn.llava import Llava
from weights_conversion.core import CheckpointMismatchError
from weights_conversion.safetensors_io import open_checkpoint, write_checkpoint
from vicrop_jax.testing.hf_models import llava_config, save_llava


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    save_llava(folder, llava_config())
    return folder


def flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}


def assert_same_params(a, b, dtype=None):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        expected = fb[key] if dtype is None else fb[key].astype(dtype)
        np.testing.assert_array_equal(fa[key], expected, err_msg="/".join(key))


def reference_logits(folder, ids, pixels):
    model = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_round_trip_loads_in_transformers(checkpoint, tmp_path, sharded):
    model = vicrop_jax.load(checkpoint)
    save_hf_checkpoint(model, tmp_path, max_shard_bytes=20_000 if sharded else None)
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    ids = np.array([[1, 7] + [3] * model.config.tokens_per_image + [9, 10]])
    pixels = np.random.RandomState(0).randn(1, 3, 28, 28).astype(np.float32)
    np.testing.assert_array_equal(reference_logits(tmp_path, ids, pixels), reference_logits(checkpoint, ids, pixels))
    assert_same_params(vicrop_jax.load(tmp_path).params, model.params)


def test_bfloat16_load_and_round_trip(checkpoint, tmp_path):
    model32 = vicrop_jax.load(checkpoint)
    model16 = vicrop_jax.load(checkpoint, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(model16.params)} == {jnp.dtype(jnp.bfloat16)}
    assert_same_params(model16.params, model32.params, dtype=ml_dtypes.bfloat16)
    save_hf_checkpoint(model16, tmp_path)
    stored = open_checkpoint(tmp_path)
    assert {stored[key].dtype for key in stored} == {np.dtype(ml_dtypes.bfloat16)}
    assert_same_params(vicrop_jax.load(tmp_path, dtype="bfloat16").params, model16.params)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert reloaded.lm_head.weight.dtype == torch.bfloat16


def test_a_flax_file_converted_before_orbax_still_loads(checkpoint, tmp_path):
    """`vicrop-jax convert` wrote the Flax-layout tree as flax_params.safetensors before it wrote Orbax."""
    model = vicrop_jax.load(checkpoint)
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    (tmp_path / "model.safetensors").unlink()
    flat = traverse_util.flatten_dict(jax.device_get(model.params))
    write_checkpoint({"/".join(path): np.asarray(value) for path, value in flat.items()}, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "flax_params.safetensors")
    assert_same_params(vicrop_jax.load(tmp_path).params, model.params)


def corrupt(checkpoint, tmp_path, edit):
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    stored = open_checkpoint(tmp_path)
    tensors = {key: np.array(stored[key]) for key in stored}
    edit(tensors)
    (tmp_path / "model.safetensors").unlink()
    write_checkpoint(tensors, tmp_path)
    return tmp_path


def test_missing_unexpected_and_misshaped_keys_are_all_named(checkpoint, tmp_path):
    def edit(tensors):
        del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
        tensors["multi_modal_projector.linear_1.bias"] = np.zeros(5, np.float32)
        tensors["vision_tower.extra_head.weight"] = np.zeros((2, 2), np.float32)

    with pytest.raises(CheckpointMismatchError) as error:
        vicrop_jax.load(corrupt(checkpoint, tmp_path, edit))
    message = str(error.value)
    assert "3 problem(s)" in message
    assert "- missing    language_model.model.layers.1.mlp.up_proj.weight (expected shape (64, 32))" in message
    assert "~ mis-shaped multi_modal_projector.linear_1.bias: expected (32,), found (5,)" in message
    assert "+ unexpected vision_tower.extra_head.weight (shape (2, 2))" in message


def test_config_that_does_not_match_the_weights_is_refused(checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="missing    language_model.model.layers.2.mlp.down_proj"):
        vicrop_jax.load(tmp_path)


def test_unsupported_config_attribute_is_refused(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["hidden_act"] = "gelu"
    with pytest.raises(ValueError, match=r"text_config.hidden_act = 'gelu' is not supported"):
        family_for(config).read_config(config)


def test_pickles_are_refused_unless_opted_in(checkpoint, tmp_path):
    reference = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    (tmp_path / "model.safetensors").unlink()
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle.*safetensors"):
        vicrop_jax.load(tmp_path)
    assert_same_params(vicrop_jax.load(tmp_path, allow_pickle=True).params, vicrop_jax.load(checkpoint).params)


def test_repo_id_resolves_in_the_local_hf_cache_offline(checkpoint, tmp_path, monkeypatch):
    snapshot = tmp_path / "models--tiny-org--tiny-llava" / "snapshots" / "abc123"
    shutil.copytree(checkpoint, snapshot)
    (tmp_path / "models--tiny-org--tiny-llava" / "refs").mkdir()
    (tmp_path / "models--tiny-org--tiny-llava" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert_same_params(vicrop_jax.load("tiny-org/tiny-llava").params, vicrop_jax.load(checkpoint).params)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        vicrop_jax.load("tiny-org/not-there")


def test_full_size_llava_7b_shapes_without_memory():
    """The real llava-1.5-7b-hf config builds a 7.06B-parameter tree (checked abstractly)."""
    hf = {
        "model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
        "text_config": {"model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
                        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                        "num_key_value_heads": 32, "vocab_size": 32064, "rms_norm_eps": 1e-5,
                        "rope_theta": 10000.0},
        "vision_config": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", "hidden_size": 1024,
                          "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                          "image_size": 336, "patch_size": 14},
    }
    family = family_for(hf)
    config = family.read_config(hf)
    tree = abstract_params(family, config, Llava(config))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))
    assert config.tokens_per_image == 576
    assert 7.0e9 < count < 7.1e9
    assert len(family.conversion_table(config)) == len(jax.tree_util.tree_leaves(tree))


def seven_b_configs():
    """llava-1.5-7b-hf and instructblip-vicuna-7b configs as transformers builds them for those sizes."""
    from transformers import CLIPVisionConfig, InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig
    from transformers import LlamaConfig, LlavaConfig

    vicuna = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
    llava = LlavaConfig(
        text_config=LlamaConfig(vocab_size=32064, pad_token_id=32001, **vicuna),
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    blip = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig().to_dict(), qformer_config=InstructBlipQFormerConfig().to_dict(),
        text_config=LlamaConfig(vocab_size=32001, pad_token_id=0, **vicuna).to_dict(), num_query_tokens=32,
        image_token_index=32001,
    )
    return {"llava": llava, "instructblip": blip}


@pytest.mark.parametrize("name", ["llava", "instructblip"])
def test_full_size_configs_as_transformers_writes_them_are_read_and_new_attributes_refused(name, tmp_path):
    hf_config = seven_b_configs()[name]
    hf_config.save_pretrained(tmp_path)
    for written in (json.loads((tmp_path / "config.json").read_text()), hf_config.to_dict()):
        family = family_for(written)
        config = family.read_config(written)
        assert config.text.num_layers == 32 and config.image_size == (336 if name == "llava" else 224)
    full = hf_config.to_dict()
    full["vision_config"]["use_rotary_positions"] = True
    with pytest.raises(ValueError, match=r"vision_config.use_rotary_positions = True is not handled by vicrop_jax"):
        family.read_config(full)
    full = hf_config.to_dict()
    full["text_config"]["pruned_heads"] = {"3": [0, 1]}
    with pytest.raises(ValueError, match=r"text_config.pruned_heads = .* is not handled .*\(handled at \{\} only\)"):
        family.read_config(full)



def test_the_published_llava_config_json_is_read_with_transformers_defaults():
    """config.json of llava-hf/llava-1.5-7b-hf as published (transformers 4.36): its text_config names only what
    differs from LlamaConfig's defaults (LLaMA-7B's sizes), which fill the rest as transformers fills them."""
    published = {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
        "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                        "torch_dtype": "float16", "vocab_size": 32064},
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
    }
    from transformers import LlavaConfig as TransformersLlavaConfig

    expected = TransformersLlavaConfig(**published).to_dict()
    family = family_for(published)
    for config in (family.read_config(published), family.read_config(expected)):
        text, vision = config.text, config.vision
        assert (text.hidden_size, text.intermediate_size, text.num_layers, text.num_heads, text.num_kv_heads) == (
            4096, 11008, 32, 32, 32)
        assert (text.vocab_size, text.max_position_embeddings, text.rms_norm_eps) == (32064, 4096, 1e-5)
        assert (vision.hidden_size, vision.num_layers, vision.image_size, vision.patch_size) == (1024, 24, 336, 14)
    text = expected["text_config"]
    assert (text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]) == (4096, 11008, 32)
