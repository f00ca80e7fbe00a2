"""Tensor-parallel sharding: the rule table on abstract trees, and parity with the unsharded model on 8 devices.

The parity check runs in a subprocess: the 8 simulated CPU devices come from an XLA flag that must be set
before jax initialises, and this test session has already initialised it with one device.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from vicrop_jax.nn.clip_vit import ClipVisionConfig
from vicrop_jax.nn.eva_vit import EvaVisionConfig
from vicrop_jax.nn.instructblip import InstructBlip, InstructBlipConfig
from vicrop_jax.nn.llama import LlamaConfig
from vicrop_jax.nn.llava import Llava, LlavaConfig
from vicrop_jax.nn.qformer import QFormerConfig
from vicrop_jax.sharding import describe, parameter_specs
from vicrop_jax.testing.devices import run_on_simulated_devices

M = "model"


def abstract(module, config, *extra_inputs):
    ids = jnp.full((1, config.tokens_per_image + 1), config.image_token_id, jnp.int32)
    pixels = jnp.zeros((1, 1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, pixels, *extra_inputs)["params"]


def llama(width: int, vocab: int, layers: int = 1, heads: int = 8, mlp: int | None = None) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp or 2 * width, num_layers=layers,
                       num_heads=heads, num_kv_heads=heads, head_dim=width // heads)


def flat_specs(params, axis_size=8):
    specs = parameter_specs(params, M, axis_size=axis_size)
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(specs).items()}


def test_llava_rules_and_a_non_divisible_vocabulary_is_replicated():
    vision = ClipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, image_size=28,
                              patch_size=14)
    config = LlavaConfig(vision=vision, text=llama(32, vocab=100), image_token_id=3)
    specs = flat_specs(abstract(Llava(config), config))
    lm, clip = "language_model/layers_0/", "vision_tower/layers_0/"
    assert specs[lm + "self_attn/q_proj/kernel"] == P(None, M)
    assert specs[lm + "self_attn/o_proj/kernel"] == P(M, None)
    assert specs[lm + "mlp/gate_proj/kernel"] == P(None, M)
    assert specs[lm + "mlp/down_proj/kernel"] == P(M, None)
    assert specs[lm + "input_layernorm/weight"] == P()
    assert specs[clip + "self_attn/q_proj/bias"] == P(M)  # column-parallel bias follows its outputs
    assert specs[clip + "self_attn/out_proj/bias"] == P()  # row-parallel bias is added after the all-reduce
    assert specs[clip + "mlp/fc1/kernel"] == P(None, M)
    assert specs[clip + "mlp/fc2/kernel"] == P(M, None)
    assert specs["multi_modal_projector/linear_1/kernel"] == P(None, M)
    assert specs["multi_modal_projector/linear_2/kernel"] == P(M, None)
    assert specs["vision_tower/embeddings/patch_embedding/kernel"] == P()
    # a vocabulary of 100 does not split over 8 devices: replicated, not padded or dropped
    assert specs["language_model/embed_tokens/embedding"] == P()
    assert specs["language_model/lm_head/kernel"] == P()
    assert flat_specs(abstract(Llava(config), config), axis_size=4)["language_model/lm_head/kernel"] == P(None, M)


def test_instructblip_rules():
    vision = EvaVisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, image_size=28,
                             patch_size=14)
    qformer = QFormerConfig(vocab_size=80, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, cross_attention_frequency=1)
    config = InstructBlipConfig(vision=vision, qformer=qformer, text=llama(32, vocab=128), num_query_tokens=4,
                                image_token_id=3)
    text = (jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))
    specs = flat_specs(abstract(InstructBlip(config), config, *text))
    q, eva = "qformer/layer_0/", "vision_model/layers_0/"
    assert specs[eva + "self_attn/qkv/kernel"] == P(None, M)
    assert specs[eva + "self_attn/projection/kernel"] == P(M, None)
    assert specs[q + "crossattention/attention/key/kernel"] == P(None, M)
    assert specs[q + "attention/output/dense/kernel"] == P(M, None)
    assert specs[q + "attention/output/LayerNorm/scale"] == P()
    assert specs[q + "intermediate_query/dense/kernel"] == P(None, M)
    assert specs[q + "output_query/dense/kernel"] == P(M, None)
    assert specs["qformer/embeddings/word_embeddings/embedding"] == P(M, None)
    assert specs["qformer/embeddings/position_embeddings/embedding"] == P()
    assert specs["language_projection/kernel"] == P(None, M)
    assert specs["query_tokens"] == P()
    assert specs["language_model/embed_tokens/embedding"] == P(M, None)


def test_qwen2_5_vl_rules_cover_every_parameter():
    from vicrop_jax.families.qwen2_5_vl import QWEN2_5_VL
    from vicrop_jax.nn.qwen2_5_vl import QwenVL, QwenVLConfig
    from vicrop_jax.testing.hf_models import qwen2_5_vl_config

    config = QwenVLConfig.from_hf_config(qwen2_5_vl_config(width=64, num_heads=8, num_kv_heads=8).to_dict())
    params = jax.eval_shape(QwenVL(config).init, jax.random.PRNGKey(0), *QWEN2_5_VL.init_inputs(config))["params"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a parameter that no rule covers warns
        specs = flat_specs(params)
    vit = "visual/blocks_0/"
    assert specs[vit + "attn/qkv/kernel"] == P(None, M) and specs[vit + "attn/proj/kernel"] == P(M, None)
    assert specs[vit + "mlp/gate_proj/kernel"] == P(None, M) and specs[vit + "mlp/down_proj/kernel"] == P(M, None)
    assert specs["visual/merger/mlp_0/kernel"] == P(None, M) and specs["visual/merger/mlp_2/kernel"] == P(M, None)
    assert specs["visual/patch_embed/proj/kernel"] == P() and specs["visual/merger/ln_q/weight"] == P()
    assert specs["language_model/layers_0/self_attn/q_proj/bias"] == P(M)


def test_unknown_parameters_are_replicated_and_reported():
    params = {"mystery": {"kernel": jax.ShapeDtypeStruct((16, 16), jnp.float32)},
              "q_proj": {"kernel": jax.ShapeDtypeStruct((16, 16), jnp.float32)}}
    with pytest.warns(UserWarning, match="/mystery/kernel"):
        specs = parameter_specs(params, M, axis_size=8)
    assert specs == {"mystery": {"kernel": P()}, "q_proj": {"kernel": P(None, M)}}
    assert "no rule" in describe(params, specs).splitlines()[0]


def test_full_size_llava_13b_splits_almost_every_parameter():
    """LLaVA-1.5-13B over 8 devices (abstract, no memory): every matrix splits; what stays whole is tiny."""
    vision = ClipVisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                              image_size=336, patch_size=14)
    config = LlavaConfig(vision=vision, text=llama(5120, vocab=32064, layers=40, heads=40, mlp=13824),
                         image_token_id=32000)
    params = abstract(Llava(config), config)
    specs = parameter_specs(params, M, axis_size=8)
    for path, spec in traverse_util.flatten_dict(specs).items():
        if path[-1] in ("kernel", "embedding") and "patch_embedding" not in path and "position_embedding" not in path:
            assert spec != P(), path
    summary = describe(params, specs).splitlines()[-1]
    assert float(summary.split("(")[1].rstrip("%)")) > 99.9


PARITY_SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
import vicrop_jax
from vicrop_jax import sharding
from vicrop_jax._generation import pixel_values, prompt_inputs
from vicrop_jax.prompts import instructblip_prompt, llava_prompt
from vicrop_jax.testing.hf_models import instructblip_config, llava_config, save_instructblip, save_llava
from PIL import Image

QUESTION = "What is the color of the small shape ?"
kind = sys.argv[2]
image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (110, 150, 3), np.uint8))
folder = Path(tempfile.mkdtemp()) / kind
if kind == "llava":
    save_llava(folder, llava_config(width=64, vision_width=64, num_heads=8, num_kv_heads=8, image_size=56))
    prompt = llava_prompt(QUESTION)
else:
    save_instructblip(folder, instructblip_config(image_size=56))
    prompt = instructblip_prompt(QUESTION)
mesh = sharding.make_mesh()
plain = vicrop_jax.load(folder)
split = sharding.shard_model(plain, mesh)
loaded = sharding.load_sharded(folder, mesh)
out = {"devices": len(jax.devices())}

q = split.params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
out["q_proj_shape"], out["q_proj_shard_shape"] = q.shape, q.sharding.shard_shape(q.shape)
out["q_proj_devices"] = len(q.devices())
same = lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim) and bool((a == b).all())
out["load_sharded_equals_shard_model"] = all(jax.tree.leaves(jax.tree.map(same, loaded.params, split.params)))

ids, image_text = prompt_inputs(plain, prompt, 1)
inputs = (np.array([ids], np.int32), pixel_values(plain, [image])[None], *image_text)
forward = jax.jit(lambda params, *x: plain.module.apply({"params": params}, *x))
compiled = forward.lower(split.params, *inputs).compile()
out["collectives"] = "all-reduce" in compiled.as_text()
logits = np.asarray(forward(plain.params, *inputs))
out["logits_max_diff"] = float(np.abs(np.asarray(compiled(split.params, *inputs)) - logits).max())
out["logits_scale"] = float(np.abs(logits).max())

out["generate"] = [vicrop_jax.generate(m, image, prompt) for m in (plain, split)]
answers = [vicrop_jax.answer(m, image, QUESTION, "rel_att", layer=1) for m in (plain, split)]
out["answers"] = [[a.answer, a.original_answer, list(a.bbox)] for a in answers]
out["map_max_diff"] = float(np.abs(answers[0].importance - answers[1].importance).max())
out["map_scale"] = float(np.abs(answers[0].importance).max())
print("RESULT " + json.dumps(out))
"""
KINDS = ("llava", "instructblip")


@pytest.fixture(scope="module")
def parity():
    return run_on_simulated_devices(PARITY_SCRIPT, {kind: [str(Path(__file__).parent), kind] for kind in KINDS})


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sharded_model_matches_the_unsharded_one_on_8_devices(parity, kind):
    """Same logits and maps up to float32 summation order (all-reduced partial sums), same texts and box."""
    out = parity[kind]
    assert out["devices"] == 8
    shape, shard = out["q_proj_shape"], out["q_proj_shard_shape"]
    assert shard == [shape[0], shape[1] // 8] and out["q_proj_devices"] == 8
    assert out["load_sharded_equals_shard_model"]
    assert out["collectives"], "the sharded forward should all-reduce partial sums, not run on one device"
    assert out["logits_max_diff"] < 1e-5 * max(1.0, out["logits_scale"])
    assert out["generate"][0] == out["generate"][1] and out["generate"][0]
    assert out["answers"][0] == out["answers"][1]
    assert out["map_max_diff"] < 1e-5 * max(1.0, out["map_scale"])
