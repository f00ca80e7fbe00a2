"""Sanity tests of the PyTorch ViCrop reference (benchmarks/torch_reference.py) on tiny random models.

The reference reads attentions through `output_attentions` and `torch.autograd.grad`; these tests
recompute the same maps a second way (forward hooks on the attention modules, `retain_grad`,
`.backward()`, and for InstructBLIP transformers' own forward with its own placeholder merge), and
the high-pass mask with torch's conv2d / a sorted-window median instead of the numpy stencils.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
from benchmarks import torch_reference as ref  # noqa: E402
from vicrop_jax.testing.hf_models import instructblip_config, llava_config, save_instructblip, save_llava  # noqa: E402

IMAGE_SIZE = 56  # 4 x 4 patch grid
GRID = IMAGE_SIZE // 14


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: thread hand-off costs ~1000x the work when the CPU is shared; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    config = llava_config(image_size=IMAGE_SIZE, num_heads=4, num_kv_heads=2, text_layers=2)
    model = save_llava(tmp_path_factory.mktemp("llava"), config)
    image_id = config.image_token_id
    rng = np.random.RandomState(0)
    n = GRID * GRID
    ids = torch.tensor([[1, *[image_id] * n, *rng.randint(10, 100, 7)]])
    general = torch.tensor([[1, *[image_id] * n, *rng.randint(10, 100, 9)]])
    pixels = torch.from_numpy(rng.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32))
    return model, ids, general, pixels


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """Q-Former of 3 layers with cross-attention in layers 0 and 2 only: K=1 must mean layer 2.

    The vision initialiser is raised so that patches differ and the cross-attention is not uniform.
    """
    config = instructblip_config(image_size=IMAGE_SIZE, num_query_tokens=4)
    config.qformer_config.num_hidden_layers = 3
    config.qformer_config.cross_attention_frequency = 2
    config.vision_config.initializer_range = 0.02  # the default 1e-10 makes every patch feature ~0
    config.qformer_config.initializer_range = 0.3  # the default 0.02 gives a near-uniform cross-attention
    model = save_instructblip(tmp_path_factory.mktemp("blip"), config)
    image_id, q = config.image_token_index, config.num_query_tokens
    rng = np.random.RandomState(1)
    ids = torch.tensor([[*[image_id] * q, 1, *rng.randint(10, 100, 6)]])
    general = torch.tensor([[*[image_id] * q, 1, *rng.randint(10, 100, 8)]])
    qids = torch.tensor([[2, *rng.randint(4, 80, 5), 3, 0]])  # padded at the end
    qmask = torch.tensor([[1] * 7 + [0]])
    gqids = torch.tensor([[2, *rng.randint(4, 80, 7), 3]])
    gqmask = torch.ones_like(gqids)
    pixels = torch.from_numpy(rng.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32))
    return model, (ids, general, qids, qmask, gqids, gqmask, pixels)


def random_image(size=(45, 37), seed=0) -> PIL.Image.Image:
    rng = np.random.RandomState(seed)
    return PIL.Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------
# second formulation: forward hooks on the attention modules, retain_grad, backward
# ----------------------------------------------------------------------------------------------


class AttentionRecorder:
    """Keeps the attention probabilities (output [1] of an attention module) with retain_grad."""

    def __init__(self, modules):
        self.weights = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            weights = output[1]
            if weights.requires_grad:
                weights.retain_grad()
            self.weights[name] = weights

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def last_position_score(logits):
    log_probs = torch.log_softmax(logits[0, -1], dim=-1)
    return log_probs.max()


def llava_hooked(model, ids, pixels, layer, backward):
    recorder = AttentionRecorder({"lm": model.model.language_model.layers[layer].self_attn})
    try:
        with torch.set_grad_enabled(backward):
            logits = model(input_ids=ids, pixel_values=pixels).logits
            if backward:
                last_position_score(logits).backward()
    finally:
        recorder.remove()
    att = recorder.weights["lm"].detach()[0, :, -1, 1 : 1 + GRID * GRID]  # BOS, then the image tokens
    grad = recorder.weights["lm"].grad[0, :, -1, 1 : 1 + GRID * GRID] if backward else None
    return att, grad


def cross_attention_modules(model):
    return [layer.crossattention.attention for layer in model.qformer.encoder.layer if layer.has_cross_attention]


def blip_logits(model, ids, qids, qmask, pixels):
    """transformers' own InstructBLIP forward (its own placeholder merge)."""
    return model(input_ids=ids, pixel_values=pixels, qformer_input_ids=qids, qformer_attention_mask=qmask).logits


def blip_hooked(model, ids, qids, qmask, pixels, layer, qformer_layer, backward):
    """Per-head (a_lm [H, Q], a_qf [H, Q, P]) and their gradients, from transformers' own forward."""
    modules = {
        "lm": model.language_model.model.layers[layer].self_attn,
        "qf": cross_attention_modules(model)[qformer_layer],
    }
    recorder = AttentionRecorder(modules)
    q = model.config.num_query_tokens
    try:
        with torch.set_grad_enabled(backward):
            logits = blip_logits(model, ids, qids, qmask, pixels)
            if backward:
                last_position_score(logits).backward()
    finally:
        recorder.remove()
    lm, qf = recorder.weights["lm"], recorder.weights["qf"]
    out = [lm.detach()[0, :, -1, :q], qf.detach()[0, :, :, 1:]]  # the queries are the first Q LM positions here
    if backward:
        out += [lm.grad[0, :, -1, :q], qf.grad[0, :, :, 1:]]
    return out


# ----------------------------------------------------------------------------------------------
# LLaVA
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ref.METHODS)
def test_llava_maps_have_grid_shape_and_are_finite(llava, method):
    model, ids, general, pixels = llava
    mask = ref.high_pass_mask(random_image(), IMAGE_SIZE) if method == "pure_grad" else None
    att = ref.llava_maps(model, ids, general, pixels, method=method, layer=1, high_pass=mask)
    assert att.shape == (GRID, GRID) and att.dtype == np.float32
    assert np.isfinite(att).all()
    assert (att >= 0).all() and att.max() > 0
    if method == "rel_att":
        assert (att > 0).all()


def test_llava_rel_att_equals_hooked_attention_ratio(llava):
    model, ids, general, pixels = llava
    q, _ = llava_hooked(model, ids, pixels, 0, backward=False)
    g, _ = llava_hooked(model, general, pixels, 0, backward=False)
    expected = (q.mean(0) / g.mean(0)).reshape(GRID, GRID).numpy()
    got = ref.llava_maps(model, ids, general, pixels, method="rel_att", layer=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("clip_negative", [True, False])
def test_llava_grad_att_equals_retain_grad(llava, clip_negative):
    model, ids, general, pixels = llava
    att, grad = llava_hooked(model, ids, pixels, 1, backward=True)
    weight = grad.clamp(min=0) if clip_negative else grad
    expected = torch.einsum("hp,hp->p", att, weight).div(att.shape[0]).reshape(GRID, GRID).numpy()
    got = ref.llava_maps(model, ids, general, pixels, method="grad_att", layer=1, clip_negative=clip_negative)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    assert np.abs(expected).max() > 0


def test_llava_pure_grad_equals_backward(llava):
    model, ids, general, pixels = llava

    def grad_norm(prompt):
        x = pixels.clone().requires_grad_(True)
        last_position_score(model(input_ids=prompt, pixel_values=x).logits).backward()
        return x.grad[0].norm(dim=0).detach()

    mask = torch.from_numpy(ref.high_pass_mask(random_image(seed=3), IMAGE_SIZE))
    ratio = grad_norm(ids) / grad_norm(general) * mask
    expected = torch.nn.functional.avg_pool2d(ratio[None, None], 14)[0, 0].numpy()
    got = ref.llava_maps(model, ids, general, pixels, method="pure_grad", high_pass=mask.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("method", ["rel_att", "grad_att"])
def test_llava_head_selection_changes_the_map(llava, method):
    model, ids, general, pixels = llava
    every = ref.llava_maps(model, ids, general, pixels, method=method, layer=1)
    first = ref.llava_maps(model, ids, general, pixels, method=method, layer=1, heads=[0])
    listed = ref.llava_maps(model, ids, general, pixels, method=method, layer=1, heads=[0, 1, 2, 3])
    assert not np.allclose(every, first, rtol=1e-3, atol=0)
    np.testing.assert_allclose(listed, every, rtol=1e-6)


def test_llava_rejects_unknown_method(llava):
    model, ids, general, pixels = llava
    with pytest.raises(ValueError):
        ref.llava_maps(model, ids, general, pixels, method="attention")


# ----------------------------------------------------------------------------------------------
# InstructBLIP
# ----------------------------------------------------------------------------------------------


def test_instructblip_forward_matches_transformers(blip):
    model, (ids, _, qids, qmask, _, _, pixels) = blip
    with torch.no_grad():
        logits, lm_atts, qf_atts = ref._instructblip_forward(model, ids, qids, qmask, pixels)
        expected = blip_logits(model, ids, qids, qmask, pixels)
    np.testing.assert_allclose(logits[0, -1].numpy(), expected[0, -1].numpy(), rtol=1e-5, atol=1e-5)
    assert len(qf_atts) == 2  # cross-attention layers only (Q-Former layers 0 and 2)
    assert qf_atts[0].shape == (1, 4, 4, GRID * GRID + 1)


@pytest.mark.parametrize("method", ref.METHODS)
def test_instructblip_maps_have_grid_shape_and_are_finite(blip, method):
    model, inputs = blip
    mask = ref.high_pass_mask(random_image(), IMAGE_SIZE) if method == "pure_grad" else None
    att = ref.instructblip_maps(model, *inputs, method=method, layer=1, qformer_layer=1, high_pass=mask)
    assert att.shape == (GRID, GRID) and att.dtype == np.float32
    assert np.isfinite(att).all()
    assert (att >= 0).all() and att.max() > 0
    if method == "rel_att":
        assert (att > 0).all()


def test_instructblip_rel_att_equals_hooked_product(blip):
    model, (ids, general, qids, qmask, gqids, gqmask, pixels) = blip
    lm, qf = blip_hooked(model, ids, qids, qmask, pixels, 1, 1, backward=False)
    glm, gqf = blip_hooked(model, general, gqids, gqmask, pixels, 1, 1, backward=False)
    expected = ((lm.mean(0) @ qf.mean(0)) / (glm.mean(0) @ gqf.mean(0))).reshape(GRID, GRID).numpy()
    got = ref.instructblip_maps(
        model, ids, general, qids, qmask, gqids, gqmask, pixels, method="rel_att", layer=1, qformer_layer=1
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("qformer_layer", [0, 1])
def test_instructblip_grad_att_equals_retain_grad(blip, qformer_layer):
    model, inputs = blip
    ids, _, qids, qmask, _, _, pixels = inputs
    lm, qf, lm_grad, qf_grad = blip_hooked(model, ids, qids, qmask, pixels, 0, qformer_layer, backward=True)
    a_lm = (lm * lm_grad.clamp(min=0)).mean(0)
    a_qf = (qf * qf_grad.clamp(min=0)).mean(0)
    expected = torch.einsum("q,qp->p", a_lm, a_qf).reshape(GRID, GRID).numpy()
    got = ref.instructblip_maps(model, *inputs, method="grad_att", layer=0, qformer_layer=qformer_layer)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)
    assert expected.max() > 0


@pytest.mark.parametrize("method", ["rel_att", "grad_att"])
def test_instructblip_head_selection_changes_the_map(blip, method):
    model, inputs = blip
    every = ref.instructblip_maps(model, *inputs, method=method, layer=1, qformer_layer=1)
    lm_first = ref.instructblip_maps(model, *inputs, method=method, layer=1, qformer_layer=1, heads=[0])
    qf_first = ref.instructblip_maps(model, *inputs, method=method, layer=1, qformer_layer=1, qformer_heads=[0])
    listed = ref.instructblip_maps(
        model, *inputs, method=method, layer=1, qformer_layer=1, heads=[0, 1, 2, 3], qformer_heads=[0, 1, 2, 3]
    )
    assert not np.allclose(every, lm_first, rtol=1e-3, atol=0)
    assert not np.allclose(every, qf_first, rtol=1e-3, atol=0)
    np.testing.assert_allclose(listed, every, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# high-pass mask
# ----------------------------------------------------------------------------------------------


def torch_high_pass(image: PIL.Image.Image, resolution: int) -> np.ndarray:
    """Second formulation: torch conv2d with reflect padding, median = middle of the sorted 7x7 window."""
    resized = image.convert("RGB").resize((resolution, resolution), PIL.Image.BILINEAR)
    x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div(255)[None]
    taps = torch.exp(-0.5 * (torch.tensor([-1.0, 0.0, 1.0]) / 0.8) ** 2)
    taps = taps / taps.sum()
    kernel = torch.outer(taps, taps).expand(3, 1, 3, 3)
    blur = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=3)
    h = (x - blur)[0].pow(2).sum(0).sqrt()
    # scipy 'reflect' = edge repeated; build it by index (no numpy pad involved)
    idx = torch.arange(-3, resolution + 3).abs()
    idx = torch.where(idx >= resolution, 2 * resolution - 1 - idx, idx)
    idx = torch.where(torch.arange(-3, resolution + 3) < 0, idx - 1, idx)
    padded = h[idx][:, idx]
    windows = padded.unfold(0, 7, 1).unfold(1, 7, 1).reshape(resolution, resolution, 49)
    return windows.sort(dim=-1).values[..., 24].numpy()


@pytest.mark.parametrize("size", [(45, 37), (90, 60)])
def test_high_pass_mask_equals_torch_formulation(size):
    image = random_image(size, seed=size[0])
    h_ref = torch_high_pass(image, IMAGE_SIZE)
    h = ref.high_pass_map(image, IMAGE_SIZE)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-6)
    mask, expected = ref.high_pass_mask(image, IMAGE_SIZE), h_ref > np.median(h_ref)
    assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE) and mask.dtype == bool
    undecided = np.abs(h_ref - np.median(h_ref)) < 1e-6  # float ties only
    assert (mask == expected)[~undecided].all()
    assert 0.3 < mask.mean() <= 0.5


def test_median_filter_uses_edge_repeating_reflect():
    x = np.arange(25, dtype=np.float32).reshape(5, 5)
    # corner: rows/cols (2,1,0,0,1,2,3) around index 0 -> median of that 7x7 block
    rows = np.array([2, 1, 0, 0, 1, 2, 3])
    assert ref._median_filter(x)[0, 0] == np.median(x[rows][:, rows])


def test_gaussian_kernel_is_torchvision_default():
    k = ref._gaussian_kernel2d(3)
    taps = np.exp(-0.5 * (np.array([-1.0, 0.0, 1.0]) / 0.8) ** 2)
    np.testing.assert_allclose(k, np.outer(taps, taps) / taps.sum() ** 2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# box selection
# ----------------------------------------------------------------------------------------------


def test_select_bbox_returns_whole_image_when_smaller_than_base():
    att = np.random.RandomState(0).rand(24, 24)
    assert ref.select_bbox_published(att, (300, 200), 336) == (0, 0, 300, 200)


def test_select_bbox_centres_on_a_peak():
    att = np.full((24, 24), 0.1)
    att[18, 5] = 10.0  # row 18 (y), column 5 (x)
    box = ref.select_bbox_published(att, (2400, 2400), 336)
    x1, y1, x2, y2 = box
    assert all(isinstance(v, int) for v in box)
    assert x1 <= 5 * 100 < x2 and y1 <= 18 * 100 < y2
    assert (x2 - x1) == (y2 - y1) and (x2 - x1) in {int(336 * r) // 2 * 2 for r in (1, 1.2, 1.4, 1.6, 1.8, 2)}


def test_select_bbox_ties_take_the_first_position():
    att = np.ones((16, 16))
    # a flat map: every window ties, the scan keeps (0, 0); box clamped into the top-left corner
    assert ref.select_bbox_published(att, (448, 448), 224)[:2] == (0, 0)
