"""Numerical parity of the Flax Qwen2.5-VL vision encoder with transformers' eager
`Qwen2_5_VisionTransformerPretrainedModel` on the same tiny random weights, read through the conversion table.

pixel_values are random rows [t*h*w, C*T*P*P] with their grids: the encoder never looks inside a patch beyond
its linear embedding, so no processor is needed.
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from vicrop_jax.nn._attention import AttentionKernel
from vicrop_jax.nn.qwen_vit import QwenVisionConfig, QwenVisionTransformer, VisionPatches, vision_patches
from weights_conversion.core import flax_to_hf, hf_to_flax, rename_keys
from weights_conversion.qwen2_5_vl_table import QWEN_KEY_ALIASES, qwen_vision_table

TOLERANCE = 1e-5
CONFIGS = {
    # windows of 2x2 merge units (6 per 8x12 image), full attention in the middle block only
    "win56-full1of3-h2": dict(
        depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=40, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
    ),
    # windows of 4x4 merge units (partial ones at the edges), no full-attention block
    "win112-nofull-h4": dict(
        depth=2, hidden_size=64, intermediate_size=80, num_heads=4, out_hidden_size=48, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[],
    ),
    # merge 3 (9 patches a token), one frame per patch, windows of 2x2 merge units, full attention in 0 and 2
    "merge3-win48-full02of3-h4": dict(
        depth=3, hidden_size=48, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=8,
        spatial_merge_size=3, temporal_patch_size=1, window_size=48, fullatt_block_indexes=[0, 2],
    ),
    # every block full attention
    "allfull-h4": dict(
        depth=2, hidden_size=32, intermediate_size=40, num_heads=4, out_hidden_size=24, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0, 1],
    ),
}
GRIDS = {2: [(1, 8, 12), (1, 16, 10)], 3: [(1, 9, 12), (1, 15, 6)]}  # by merge size


@functools.lru_cache(maxsize=None)
def reference(name: str):
    """The transformers model with every parameter random (norm weights near 1), its config and Flax params."""
    hf_config = Qwen2_5_VLVisionConfig(**CONFIGS[name])
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel(hf_config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key or "ln_q" in key:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif key.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:  # unit-scale activations: std 1/sqrt(fan in)
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    config = QwenVisionConfig.from_hf_config(hf_config.to_dict())
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, config, state, flax_params(config, state)


def flax_params(config, state, prefix=""):
    module = QwenVisionTransformer(config)
    dummy = vision_patches([], [], config, config.merge_unit)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy)["params"]
    return hf_to_flax(qwen_vision_table(config, (), prefix), state, abstract, np.float32)


def random_images(config, grids, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randn(t * h * w, config.patch_features).astype(np.float32) for t, h, w in grids]


def hf_features(model, images, grids):
    with torch.no_grad():
        out = model(hidden_states=torch.tensor(np.concatenate(images)), grid_thw=torch.tensor(grids))
    return out.pooler_output.numpy()


@functools.lru_cache(maxsize=None)
def encoder(name: str, kernel: AttentionKernel = AttentionKernel.EXPLICIT):
    return jax.jit(QwenVisionTransformer(reference(name)[1], attention_kernel=kernel).apply)


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers_with_padding(name, images):
    model, config, _, params = reference(name)
    grids = GRIDS[config.spatial_merge_size][:images]
    pixels = random_images(config, grids)
    expected = hf_features(model, pixels, grids)
    real = sum(len(p) for p in pixels)
    padded = vision_patches(pixels, grids, config, real + 3 * config.merge_unit)
    exact = vision_patches(pixels, grids, config, real)
    out_padded = np.asarray(encoder(name)({"params": params}, padded))
    out_exact = np.asarray(encoder(name)({"params": params}, exact))
    assert out_padded.shape == (real // config.merge_unit + 3, config.out_hidden_size)
    assert np.isfinite(out_padded).all()
    windows = len(set(padded.window_ids.tolist()) - {-1})
    diff = np.abs(out_padded[: len(expected)] - expected).max()
    padding_effect = np.abs(out_padded[: len(expected)] - out_exact).max()
    print(f"\n{name} images={images} windows={windows}: max |flax - torch| = {diff:.2e}, "
          f"padded vs unpadded {padding_effect:.2e}, |torch| max {np.abs(expected).max():.2f}")
    assert diff <= TOLERANCE
    assert padding_effect <= TOLERANCE  # summation order only: the padded keys weigh exactly 0


def test_windows_follow_transformers_grouping():
    """8x12 patches with 2x2-unit windows: 6 windows of 16 patches; 16x10: 4x3 windows, the last column half."""
    config = reference("win56-full1of3-h2")[1]
    grids = GRIDS[2]
    packed = vision_patches(random_images(config, grids), grids, config, 96 + 160 + 8)
    counts = np.bincount(packed.window_ids[packed.window_ids >= 0])
    assert counts.tolist() == [16] * 6 + [16, 16, 8] * 4
    assert (packed.image_ids == np.repeat([0, 1, -1], [96, 160, 8])).all()
    # the first merge unit of the first image is its top-left 2x2 patches, the second the block to its right
    assert packed.positions[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]


def test_one_program_per_padded_length():
    name = "win56-full1of3-h2"
    model, config, _, params = reference(name)
    apply = jax.jit(QwenVisionTransformer(config).apply)
    length = 160 + 96  # both prompts below fit
    outputs = []
    for grids in ([(1, 8, 12)], [(1, 16, 10)], GRIDS[2]):
        pixels = random_images(config, grids, seed=1)
        out = np.asarray(apply({"params": params}, vision_patches(pixels, grids, config, length)))
        expected = hf_features(model, pixels, grids)
        outputs.append(np.abs(out[: len(expected)] - expected).max())
    assert apply._cache_size() == 1
    assert max(outputs) <= TOLERANCE


def test_batch_axis_and_fused_kernel():
    """A leading batch axis gives each prompt's own result; the fused kernel computes the same."""
    name = "win56-full1of3-h2"
    _, config, _, params = reference(name)
    prompts = [vision_patches(random_images(config, grids, seed=2), grids, config, 256)
               for grids in ([(1, 8, 12)], GRIDS[2])]
    single = [np.asarray(encoder(name)({"params": params}, p)) for p in prompts]
    batched = np.asarray(encoder(name)({"params": params}, jax.tree_util.tree_map(lambda *a: np.stack(a), *prompts)))
    np.testing.assert_allclose(batched, np.stack(single), atol=TOLERANCE, rtol=0)
    fused = np.asarray(encoder(name, AttentionKernel.FUSED)({"params": params}, prompts[1]))
    assert np.abs(fused - single[1]).max() <= TOLERANCE


def test_conversion_table_round_trip():
    _, config, state, params = reference("merge3-win48-full02of3-h4")
    table = qwen_vision_table(config, (), "visual")
    hf = flax_to_hf(table, params)
    assert set(hf) == {f"visual.{k}" for k in state}
    for key, value in state.items():
        np.testing.assert_array_equal(hf[f"visual.{key}"], value, err_msg=key)
    # transformers' in-memory names (`model.visual.*`) are renamed onto the written layout (`visual.*`)
    in_memory = {f"model.{key}": value for key, value in hf.items()}
    back = flax_params(config, rename_keys(in_memory, QWEN_KEY_ALIASES), prefix="visual")
    flat, flat_back = traverse_util.flatten_dict(params), traverse_util.flatten_dict(back)
    assert flat.keys() == flat_back.keys()
    for path in flat:
        np.testing.assert_array_equal(flat_back[path], flat[path], err_msg="/".join(path))


def test_reads_saved_and_published_configs(tmp_path):
    Qwen2_5_VLConfig(vision_config=CONFIGS["win56-full1of3-h2"]).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["vision_config"]
    config = QwenVisionConfig.from_hf_config(saved)
    assert config == QwenVisionConfig(
        depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=40, window_size=56,
        fullatt_block_indexes=(1,), rope_theta=10000.0,
    )
    published = {  # Qwen/Qwen2.5-VL-7B-Instruct's vision_config
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2,
    }
    config = QwenVisionConfig.from_hf_config(published)
    read = (config.hidden_size, config.head_dim, config.window_merge_units, config.patch_features)
    assert read == (1280, 80, 4, 1176)


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 8}, "head_dim"),  # the rotary would read it; the attention would not
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, "rope_parameters"),
    ({"in_chans": 1}, "in_chans"),
    ({"patch_size": [14, 14]}, "patch_size"),
])
def test_refuses_what_it_does_not_implement(change, message):
    hf = Qwen2_5_VLVisionConfig(**CONFIGS["allfull-h4"]).to_dict() | change
    with pytest.raises(ValueError, match=message):
        QwenVisionConfig.from_hf_config(hf)


def test_vision_patches_refuses_bad_lengths_and_videos():
    config = reference("allfull-h4")[1]
    pixels = random_images(config, [(1, 8, 12)])
    for length in (92, 98):  # too short; not a multiple of 4
        with pytest.raises(ValueError, match="padded length"):
            vision_patches(pixels, [(1, 8, 12)], config, length)
    with pytest.raises(ValueError, match="video"):
        vision_patches(random_images(config, [(2, 8, 12)]), [(2, 8, 12)], config, 192)
    assert isinstance(vision_patches(pixels, [(1, 8, 12)], config, 96), VisionPatches)
