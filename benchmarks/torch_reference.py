"""PyTorch reference for ViCrop's importance maps, on top of transformers' own models.

This is the baseline a user would otherwise run: the published procedure of "MLLMs Know Where to
Look" (ICLR 2025; code: github.com/saccharomycetes/mllms_know, files `llava_methods.py`,
`blip_methods.py`, `utils.py`), rewritten against transformers 5.x, in float32, with the
corrections of docs/method.md where it and the published code disagree. Our JAX maps are compared
with it, and it is timed against our pipeline.

Inputs are already tokenized / preprocessed tensors, so a test can feed exactly the same numbers
to both implementations:

- `input_ids` [1, T]: the prompt with the image placeholders already expanded (one
  `config.image_token_id` per visual feature, as LlavaProcessor / InstructBlipProcessor make them).
- `pixel_values` [N, 3, H, W] (NCHW, normalised); the map is always for the first image.
- Maps are float32 numpy arrays [gh, gw] over the patch grid of the vision tower
  (gh = gw = image_size // patch_size), in the ViT's row-major patch order: cell (r, c) is
  feature r * gw + c.

Models must be loaded with `attn_implementation="eager"`: only the eager attention returns the
probabilities, and returns them as tensors of the autograd graph (needed for grad-att).

The scalar whose gradient is taken is S = log_softmax(logits[0, -1])[argmax], which is what the
published `-CrossEntropyLoss(logit, argmax)` computes for a batch of one.

Qwen2.5-VL (the release's `qwen2_5_methods.py` and run.py): `qwen2_5_vl_maps` takes processor-made inputs
(`qwen2_5_vl_inputs`) and maps on the image's own merged-token grid; `vicrop_qwen2_5_vl` is the release's whole
per-question procedure, see its docstring for where it departs from the release.

Where this differs from the published code, and why:
- float32 throughout (published: bfloat16), so that parity tests can be tight.
- InstructBLIP, LM factor: the published slice `attentions[15][0, :, -1, :256]` (256 = patch
  count) cannot multiply the 32 x 256 Q-Former factor unless the sequence has exactly 32
  positions; the intent (queries first, in the transformers of the time) and docs/method.md (Importance maps) both
  say: the Q query-token positions. Here they are found as the first Q `image_token_id`
  placeholders of input_ids, wherever the processor put them.
- InstructBLIP, Q-Former factor: published reads `outputs.qformer_outputs.cross_attentions`,
  which transformers 5.x leaves None; see `_instructblip_forward`. The index K counts
  cross-attention layers only (the order of that tuple), so published K=2 is Q-Former layer 4
  of the real model (cross-attention every 2nd layer).
- The published InstructBLIP is loaded without `attn_implementation="eager"`; eager is required
  here (and is what makes attentions available at all).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import PIL.Image
import torch

METHODS = ("rel_att", "grad_att", "pure_grad")


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------


def _score(logits: torch.Tensor) -> torch.Tensor:
    """S = log softmax(logits at the last position)[argmax]; the published -CE(logit, argmax)."""
    log_probs = torch.log_softmax(logits[0, -1].float(), dim=-1)
    return log_probs[log_probs.argmax()]


def _head_mean(att: torch.Tensor, heads: Sequence[int] | None) -> torch.Tensor:
    """Mean over the head axis (axis 0); `heads` restricts it to the listed head indices."""
    if heads is not None:
        att = att[torch.as_tensor(list(heads), dtype=torch.long, device=att.device)]
    return att.mean(dim=0)


def _grad_weighted(att: torch.Tensor, grad: torch.Tensor, clip_negative: bool) -> torch.Tensor:
    """A * relu(dS/dA) (published grad-att); without the relu when clip_negative is False."""
    return att * (torch.relu(grad) if clip_negative else grad)


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def _grid(vision_config) -> tuple[int, int, int]:
    """(gh, gw, patch) of a square ViT; read from the config, never hard-coded (24/16, 14)."""
    patch = vision_config.patch_size
    side = vision_config.image_size // patch
    return side, side, patch


def _placeholder_columns(input_ids: torch.Tensor, token_id: int, count: int) -> torch.Tensor:
    """Positions of the first `count` placeholder tokens (= the first image) of input_ids[0]."""
    positions = torch.nonzero(input_ids[0] == token_id).flatten()
    if positions.numel() < count:
        raise ValueError(f"expected at least {count} image placeholders (id {token_id}), got {positions.numel()}")
    return positions[:count]


def _checked(attentions, index: int, what: str) -> torch.Tensor:
    """The attention tensor of one layer; a clear error when the model did not return it (not eager)."""
    if attentions is None or attentions[index] is None:
        raise ValueError(f"no {what} attentions returned: load the model with attn_implementation='eager'")
    return attentions[index]


def _block_mean(x: np.ndarray, patch: int) -> np.ndarray:
    """Mean over patch x patch cells, as skimage's block_reduce(x, (patch, patch), np.mean).

    The blocks are laid out [gh, gw, patch, patch] and reduced over the last two axes, like
    skimage's view_as_blocks, so the float32 summation order is the same.
    """
    h, w = x.shape
    blocks = x.reshape(h // patch, patch, w // patch, patch).transpose(0, 2, 1, 3)
    return blocks.mean(axis=(2, 3))


def _pixel_grad_norm(forward: Callable, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> np.ndarray:
    """Per-pixel L2 norm over channels of dS/d(pixel_values) of the first image, [H, W] float32."""
    pixels = pixel_values.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(_score(forward(input_ids, pixels)), pixels)
    # published: numpy, [H, W, C] layout, norm over the last axis
    return np.linalg.norm(_to_numpy(grad[0]).transpose(1, 2, 0), axis=2)


def _pure_grad(forward, input_ids, general_input_ids, pixel_values, patch, high_pass) -> np.ndarray:
    """Published pure-grad: gradient-norm ratio question / general, times the high-pass mask, block mean.

    No epsilon in the ratio (as published: a zero general gradient gives inf / nan). `high_pass`
    None means no mask (all pixels kept); the published method always passes `high_pass_mask`.
    """
    ratio = _pixel_grad_norm(forward, input_ids, pixel_values) / _pixel_grad_norm(
        forward, general_input_ids, pixel_values
    )
    if high_pass is not None:
        high_pass = np.asarray(high_pass, dtype=bool)
        if high_pass.shape != ratio.shape:
            raise ValueError(f"high_pass mask {high_pass.shape} does not match the pixels {ratio.shape}")
        ratio = ratio * high_pass
    return _block_mean(ratio.astype(np.float32), patch).astype(np.float32)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# ----------------------------------------------------------------------------------------------
# LLaVA-1.5
# ----------------------------------------------------------------------------------------------


def _llava_forward(model, input_ids: torch.Tensor, pixel_values: torch.Tensor):
    """transformers' own LLaVA forward; (logits of the last position, per-layer LM attentions)."""
    out = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True, logits_to_keep=1)
    return out.logits, out.attentions


def _llava_image_columns(model, input_ids: torch.Tensor, num_images: int) -> torch.Tensor:
    """LM positions of the first image's patch features.

    Each image owns (#placeholders / #images) consecutive positions. Under the 'full' feature
    strategy the first of them is the CLS feature, which the map leaves out.
    """
    gh, gw, _ = _grid(model.config.vision_config)
    token_id = model.config.image_token_id
    per_image = int((input_ids[0] == token_id).sum()) // num_images
    columns = _placeholder_columns(input_ids, token_id, per_image)
    if per_image == gh * gw + 1:
        columns = columns[1:]
    if columns.numel() != gh * gw:
        raise ValueError(f"{per_image} placeholders per image do not fit a {gh}x{gw} patch grid")
    return columns


def _llava_attention_row(model, input_ids, pixel_values, layer, heads) -> torch.Tensor:
    """Head-mean attention of LM layer `layer` from the last position to the first image's patches."""
    columns = _llava_image_columns(model, input_ids, pixel_values.shape[0])
    with torch.no_grad():
        _, attentions = _llava_forward(model, input_ids, pixel_values)
    att = _checked(attentions, layer, "LM")
    return _head_mean(att[0, :, -1, columns], heads)


def llava_maps(
    model,
    input_ids: torch.Tensor,
    general_input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    *,
    method: str,
    layer: int = 14,
    heads: Sequence[int] | None = None,
    clip_negative: bool = True,
    high_pass: np.ndarray | None = None,
) -> np.ndarray:
    """ViCrop importance map of a `LlavaForConditionalGeneration`, float32 [gh, gw].

    - rel_att: A(question) / A(general), A = head mean of LM layer `layer`'s attention from the
      last position to the image positions.
    - grad_att: head mean of A * relu(dS/dA) on the question prompt only (no ratio).
    - pure_grad: see `_pure_grad`; `high_pass` is `high_pass_mask(image, image_size)`.
    `general_input_ids` is unused by grad_att (kept so every method has one signature).
    """
    _check_method(method)
    gh, gw, patch = _grid(model.config.vision_config)
    if method == "pure_grad":
        forward = lambda ids, px: _llava_forward(model, ids, px)[0]  # noqa: E731
        return _pure_grad(forward, input_ids, general_input_ids, pixel_values, patch, high_pass)
    if method == "rel_att":
        question = _llava_attention_row(model, input_ids, pixel_values, layer, heads)
        general = _llava_attention_row(model, general_input_ids, pixel_values, layer, heads)
        return _to_numpy(question / general).reshape(gh, gw)
    # grad_att
    columns = _llava_image_columns(model, input_ids, pixel_values.shape[0])
    with torch.enable_grad():
        logits, attentions = _llava_forward(model, input_ids, pixel_values)
        att = _checked(attentions, layer, "LM")
        (grad,) = torch.autograd.grad(_score(logits), att)
    weighted = _grad_weighted(att[0, :, -1, columns], grad[0, :, -1, columns], clip_negative)
    return _to_numpy(_head_mean(weighted, heads)).reshape(gh, gw)


# ----------------------------------------------------------------------------------------------
# Qwen2.5-VL (the release's qwen2_5_methods.py: rel-att at layer 22 of the 7B model; grad-att and pure-grad as
# for LLaVA, on the image's own token grid)
# ----------------------------------------------------------------------------------------------


def _qwen_forward(model, inputs: dict, pixel_values: torch.Tensor | None = None):
    """transformers' own forward on processor-made inputs (input_ids, pixel_values, image_grid_thw,
    mm_token_type_ids); (logits of the last position, per-layer LM attentions)."""
    inputs = {**inputs, "pixel_values": inputs["pixel_values"] if pixel_values is None else pixel_values}
    out = model(**inputs, output_attentions=True, logits_to_keep=1)
    return out.logits, out.attentions


def _qwen_image_columns(model, input_ids: torch.Tensor) -> torch.Tensor:
    """LM positions of the first image: between its <|vision_start|> and <|vision_end|> (the release's pos:pos_end)."""
    ids = input_ids[0].tolist()
    start = ids.index(model.config.vision_start_token_id) + 1
    return torch.arange(start, ids.index(model.config.vision_end_token_id))


def _qwen_token_grid(model, inputs: dict) -> tuple[int, int]:
    """The first image's merged-token grid: image_grid_thw[0, 1:] / merge (the release's att_shape)."""
    merge = model.config.vision_config.spatial_merge_size
    _, h, w = (int(v) for v in inputs["image_grid_thw"][0])
    return h // merge, w // merge


def _qwen_pixel_grad_norm(model, inputs: dict) -> np.ndarray:
    """Per-pixel L2 norm over channels of dS/d(pixels) of the first image [H', W'] (the resized image): the patch
    rows' gradients laid back onto the image, a pixel's repeated frames summed."""
    pixels = inputs["pixel_values"].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(_score(_qwen_forward(model, inputs, pixels)[0]), pixels)
    vision = model.config.vision_config
    merge, patch = vision.spatial_merge_size, vision.patch_size
    _, h, w = (int(v) for v in inputs["image_grid_thw"][0])
    rows = _to_numpy(grad[: h * w]).reshape(h // merge, w // merge, merge, merge, 3, -1, patch, patch).sum(axis=5)
    image = rows.transpose(0, 2, 5, 1, 3, 6, 4).reshape(h * patch, w * patch, 3)  # [H', W', C]
    return np.linalg.norm(image, axis=2)


def qwen2_5_vl_maps(model, inputs: dict, general_inputs: dict, *, method: str, layer: int = 22,
                    heads: Sequence[int] | None = None, clip_negative: bool = True,
                    high_pass: np.ndarray | None = None) -> np.ndarray:
    """ViCrop importance map of a `Qwen2_5_VLForConditionalGeneration`, float32 [gh, gw] on the first image's
    merged-token grid. `inputs` / `general_inputs`: the question's and the general prompt's processor outputs
    over the same image. rel_att: A(question) / A(general), A = head mean of LM layer `layer`'s attention from
    the last position to the image's tokens; grad_att: head mean of A * relu(dS/dA); pure_grad: the ratio of the
    per-pixel gradient norms, times `high_pass` ([H', W'] on the resized image), block mean over the
    (patch * merge)-pixel squares of the merged tokens."""
    _check_method(method)
    gh, gw = _qwen_token_grid(model, inputs)
    if method == "pure_grad":
        ratio = _qwen_pixel_grad_norm(model, inputs) / _qwen_pixel_grad_norm(model, general_inputs)
        if high_pass is not None:
            ratio = ratio * np.asarray(high_pass, dtype=bool)
        block = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
        return _block_mean(ratio.astype(np.float32), block).astype(np.float32)

    def row(prompt_inputs: dict, weighted: bool) -> torch.Tensor:
        columns = _qwen_image_columns(model, prompt_inputs["input_ids"])
        with torch.enable_grad() if weighted else torch.no_grad():
            logits, attentions = _qwen_forward(model, prompt_inputs)
            att = _checked(attentions, layer, "LM")
            if not weighted:
                return _head_mean(att[0, :, -1, columns], heads)
            (grad,) = torch.autograd.grad(_score(logits), att)
        return _head_mean(_grad_weighted(att[0, :, -1, columns], grad[0, :, -1, columns], clip_negative), heads)

    if method == "rel_att":
        return _to_numpy(row(inputs, False) / row(general_inputs, False)).reshape(gh, gw)
    return _to_numpy(row(inputs, True)).reshape(gh, gw)


# ----------------------------------------------------------------------------------------------
# InstructBLIP
# ----------------------------------------------------------------------------------------------


def _instructblip_forward(model, input_ids, qformer_input_ids, qformer_attention_mask, pixel_values):
    """InstructBLIP forward that also returns the Q-Former cross-attentions, inside the graph.

    transformers 5.x's `InstructBlipForConditionalGeneration.forward` does not pass
    `output_attentions` to the Q-Former (its `qformer_outputs.cross_attentions` is None), so the
    forward is spelled out: `get_image_features(..., output_attentions=True)` -> the 32 projected
    query outputs per image, written over the placeholder positions with the same `masked_scatter`
    transformers uses, then the language model on those embeddings. Gradients of the LM logit flow
    back into the cross-attention probabilities.

    Returns (logits of the last position, LM attentions per layer, Q-Former cross-attentions per
    cross-attention layer: index K counts cross-attention layers only, as docs/method.md (Importance maps) wants).
    """
    features = model.get_image_features(
        pixel_values,
        qformer_input_ids=qformer_input_ids,
        qformer_attention_mask=qformer_attention_mask,
        output_attentions=True,
        return_dict=True,
    )
    embeds = model.get_input_embeddings()(input_ids)
    image_embeds = features.pooler_output.to(embeds.device, embeds.dtype)
    placeholders = (input_ids == model.config.image_token_id).unsqueeze(-1).to(embeds.device)
    embeds = embeds.masked_scatter(placeholders, image_embeds)
    out = model.language_model(
        inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), output_attentions=True, logits_to_keep=1
    )
    return out.logits, out.attentions, features.qformer_outputs.cross_attentions


def _instructblip_factors(model, input_ids, q_ids, q_mask, pixel_values, layer, qformer_layer, weighted, clip_negative):
    """Per-head (a_lm [H_lm, Q], a_qf [H_qf, Q, P]) of the first image, before the head means.

    a_lm: LM layer `layer` from the last position to the first Q placeholder positions (the query
    tokens of the first image). a_qf: Q-Former cross-attention layer `qformer_layer` from the Q
    queries to the patches (column 0, the CLS feature, dropped). With `weighted`, each becomes
    A * relu(dS/dA) of its own layer (grad-att).
    """
    num_queries = model.config.num_query_tokens
    columns = _placeholder_columns(input_ids, model.config.image_token_id, num_queries)
    with torch.set_grad_enabled(weighted):
        logits, lm_atts, qf_atts = _instructblip_forward(model, input_ids, q_ids, q_mask, pixel_values)
        lm = _checked(lm_atts, layer, "LM")
        qf = _checked(qf_atts, qformer_layer, "Q-Former cross-")
        if weighted:
            lm_grad, qf_grad = torch.autograd.grad(_score(logits), (lm, qf))
    a_lm, a_qf = lm[0, :, -1, columns], qf[0, :, :, 1:]
    if weighted:
        a_lm = _grad_weighted(a_lm, lm_grad[0, :, -1, columns], clip_negative)
        a_qf = _grad_weighted(a_qf, qf_grad[0, :, :, 1:], clip_negative)
    return a_lm, a_qf


def _instructblip_product(a_lm, a_qf, heads, qformer_heads) -> torch.Tensor:
    """A = head-mean(a_lm) [1 x Q] @ head-mean(a_qf) [Q x P] -> [P]."""
    return _head_mean(a_lm, heads) @ _head_mean(a_qf, qformer_heads)


def instructblip_maps(
    model,
    input_ids: torch.Tensor,
    general_input_ids: torch.Tensor,
    qformer_input_ids: torch.Tensor,
    qformer_attention_mask: torch.Tensor,
    general_qformer_input_ids: torch.Tensor,
    general_qformer_attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    *,
    method: str,
    layer: int = 15,
    qformer_layer: int = 2,
    heads: Sequence[int] | None = None,
    qformer_heads: Sequence[int] | None = None,
    clip_negative: bool = True,
    high_pass: np.ndarray | None = None,
) -> np.ndarray:
    """ViCrop importance map of an `InstructBlipForConditionalGeneration`, float32 [gh, gw].

    A = a_lm @ a_qf (docs/method.md (Importance maps)): a_lm = LM layer `layer` attention from the last position
    to the Q query-token placeholders (head mean over `heads`, all if None); a_qf = Q-Former
    cross-attention layer `qformer_layer` (0-based among cross-attention layers) from the queries
    to the patches, CLS dropped (head mean over `qformer_heads`, all if None).
    - rel_att: A(question prompt) / A(general prompt); both the LM and the Q-Former get their
      general-prompt ids.
    - grad_att: each factor replaced by A * relu(dS/dA) of its layer, then the same product;
      question prompt only.
    - pure_grad: as LLaVA (gradients through the whole model, general prompt in both the LM and
      the Q-Former).
    """
    _check_method(method)
    gh, gw, patch = _grid(model.config.vision_config)
    question = (input_ids, qformer_input_ids, qformer_attention_mask)
    general = (general_input_ids, general_qformer_input_ids, general_qformer_attention_mask)
    if method == "pure_grad":
        # the Q-Former ids travel with the LM ids: question with question, general with general
        forward = lambda prompt, px: _instructblip_forward(model, *prompt, px)[0]  # noqa: E731
        return _pure_grad(forward, question, general, pixel_values, patch, high_pass)

    def product(prompt, weighted):
        factors = _instructblip_factors(
            model, *prompt, pixel_values, layer, qformer_layer, weighted, clip_negative
        )
        return _instructblip_product(*factors, heads, qformer_heads)

    if method == "rel_att":
        return _to_numpy(product(question, False) / product(general, False)).reshape(gh, gw)
    return _to_numpy(product(question, True)).reshape(gh, gw)


# ----------------------------------------------------------------------------------------------
# high-pass mask (pure-grad)
# ----------------------------------------------------------------------------------------------


def _gaussian_kernel2d(kernel_size: int = 3) -> np.ndarray:
    """torchvision's gaussian_blur kernel for its default sigma, in float32.

    sigma = kernel_size * 0.15 + 0.35 (torchvision's default; 0.8 for k=3, the OpenCV value);
    1-D taps at linspace(-(k-1)/2, (k-1)/2, k), exp(-x^2 / (2 sigma^2)) normalised to sum 1;
    2-D = outer product (torchvision: torch.mm(k_y[:, None], k_x[None, :])).
    """
    sigma = kernel_size * 0.15 + 0.35
    half = (kernel_size - 1) * 0.5
    x = np.linspace(-half, half, kernel_size, dtype=np.float32)
    pdf = np.exp(np.float32(-0.5) * np.square(x / np.float32(sigma)))
    kernel1d = (pdf / pdf.sum()).astype(np.float32)
    return np.outer(kernel1d, kernel1d).astype(np.float32)


def _gaussian_blur(image: np.ndarray, kernel_size: int = 3) -> np.ndarray:
    """torchvision TF.gaussian_blur of a [C, H, W] float32 image, per channel.

    Padding: 'reflect' without repeating the edge sample (c b | a b c), because torchvision pads
    with torch.nn.functional.pad(mode='reflect') before its conv2d.
    """
    kernel = _gaussian_kernel2d(kernel_size)
    r = kernel_size // 2
    padded = np.pad(image, ((0, 0), (r, r), (r, r)), mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel_size, kernel_size), axis=(1, 2))
    return np.einsum("chwij,ij->chw", windows, kernel).astype(np.float32)


def _median_filter(x: np.ndarray, size: int = 7) -> np.ndarray:
    """scipy.ndimage.median_filter(x, size) of a 2-D array, with scipy's default boundary.

    Padding: scipy's mode 'reflect' repeats the edge sample (d c b a | a b c d), which is numpy's
    pad mode 'symmetric' (numpy's 'reflect' is a different rule). The window of an odd size is
    centred. The median of an odd window is one of its samples, so the result is exact.
    """
    r = size // 2
    padded = np.pad(x, r, mode="symmetric")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))
    return np.median(windows.reshape(*x.shape, size * size), axis=-1).astype(x.dtype)


def high_pass_map(image: PIL.Image.Image, resolution: int | tuple[int, int], median_size: int = 7,
                  blur_size: int = 3) -> np.ndarray:
    """The published `high_pass_filter(image, resolution, reduce=False)`, float32 [res, res].

    `TF.resize(pil, (res, res))` is PIL's own bilinear resize (antialiased), aspect not kept;
    `TF.to_tensor` gives floats in [0, 1]; h = image - blur; L2 norm over channels; median filter.
    The image is converted to RGB (the published pipeline opens every image with .convert('RGB')).
    A (width, height) `resolution` gives [height, width] (Qwen2.5-VL: the image as its processor resizes it).
    """
    size = (resolution, resolution) if np.isscalar(resolution) else tuple(resolution)
    resized = image.convert("RGB").resize(size, PIL.Image.BILINEAR)
    pixels = (np.asarray(resized, dtype=np.float32) / np.float32(255.0)).transpose(2, 0, 1)
    high = pixels - _gaussian_blur(pixels, blur_size)
    brightness = np.sqrt(np.square(high).sum(axis=0))
    return _median_filter(brightness, median_size)


def high_pass_mask(image: PIL.Image.Image, resolution: int | tuple[int, int]) -> np.ndarray:
    """Boolean [res, res] mask of the published pure-grad: high_pass_map > its median ([H, W] for (W, H))."""
    h = high_pass_map(image, resolution)
    return h > np.median(h)


# ----------------------------------------------------------------------------------------------
# box selection (published)
# ----------------------------------------------------------------------------------------------


def select_bbox_published(att_map: np.ndarray, image_size: tuple[int, int], bbox_size: int = 336):
    """Port of the published `bbox_from_att_image_adaptive`: same loops, same tie behaviour.

    Kept literal (x-outer / y-inner scan with a strict '>', np.argmax over the sharpness list,
    block size of the last iteration) so that our own vectorised selection can be checked against
    it. image_size = (W, H); returns (left, top, right, bottom). The published code returns floats
    such as 201.0 when the box side B*r is not an integer; every value is integral, so they are
    returned as ints (lossless).
    """
    ratios = [1, 1.2, 1.4, 1.6, 1.8, 2]
    max_att_poses, differences, block_nums = [], [], []
    rows, cols = att_map.shape
    for ratio in ratios:
        block_size = image_size[0] / cols, image_size[1] / rows
        block_num = min(int(bbox_size * ratio / block_size[0]), cols), min(int(bbox_size * ratio / block_size[1]), rows)
        if cols - block_num[0] < 1 and rows - block_num[1] < 1:
            if ratio == 1:
                return 0, 0, image_size[0], image_size[1]
            continue
        block_nums.append(block_num)
        sliding_att = np.zeros((rows - block_num[1] + 1, cols - block_num[0] + 1))
        max_att, max_att_pos = -np.inf, (0, 0)
        for x in range(cols - block_num[0] + 1):
            for y in range(rows - block_num[1] + 1):
                att = att_map[y : y + block_num[1], x : x + block_num[0]].sum()
                sliding_att[y, x] = att
                if att > max_att:
                    max_att, max_att_pos = att, (x, y)
        adjacent = []
        if max_att_pos[0] > 0:
            adjacent.append(sliding_att[max_att_pos[1], max_att_pos[0] - 1])
        if max_att_pos[0] < sliding_att.shape[1] - 1:
            adjacent.append(sliding_att[max_att_pos[1], max_att_pos[0] + 1])
        if max_att_pos[1] > 0:
            adjacent.append(sliding_att[max_att_pos[1] - 1, max_att_pos[0]])
        if max_att_pos[1] < sliding_att.shape[0] - 1:
            adjacent.append(sliding_att[max_att_pos[1] + 1, max_att_pos[0]])
        differences.append((max_att - np.mean(adjacent)) / (block_num[0] * block_num[1]))
        max_att_poses.append(max_att_pos)
    best = int(np.argmax(differences))
    max_att_pos, block_num = max_att_poses[best], block_nums[best]
    selected = bbox_size * ratios[best]
    half = selected // 2
    x_center = int(max_att_pos[0] * block_size[0] + block_size[0] * block_num[0] / 2)
    y_center = int(max_att_pos[1] * block_size[1] + block_size[1] * block_num[1] / 2)
    x_center = half if x_center < half else x_center
    y_center = half if y_center < half else y_center
    x_center = image_size[0] - half if x_center > image_size[0] - half else x_center
    y_center = image_size[1] - half if y_center > image_size[1] - half else y_center
    x1 = max(0, x_center - half)
    y1 = max(0, y_center - half)
    x2 = min(image_size[0], x_center + half)
    y2 = min(image_size[1], y_center + half)
    return int(x1), int(y1), int(x2), int(y2)


# ----------------------------------------------------------------------------------------------
# The whole published procedure for one LLaVA question (the baseline our pipeline is timed against)
# ----------------------------------------------------------------------------------------------

LLAVA_TEMPLATE = "{images}\nUSER: {question} Answer the question using a single word or phrase.\nASSISTANT:"


def llava_prompt_ids(model, tokenizer, question: str, num_images: int) -> torch.Tensor:
    """The paper's prompt, each `<image>` expanded to one placeholder per visual token (as LlavaProcessor)."""
    per_image = _grid(model.config.vision_config)[0] ** 2
    if model.config.vision_feature_select_strategy == "full":
        per_image += 1
    text = LLAVA_TEMPLATE.format(images="<image>" * num_images, question=question)
    return torch.tensor([tokenizer(text.replace("<image>", "<image>" * per_image))["input_ids"]])


def _generate(model, input_ids, pixel_values, max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, input_ids.shape[1]:].tolist()


def vicrop_llava(model, tokenizer, image_processor, image: PIL.Image.Image, question: str, method: str, *,
                 layer: int = 14, max_new_tokens: int = 20,
                 general_question: str = "Write a general description of the image.") -> dict:
    """The published per-question procedure: answer without crop, map (one or two more forwards with all
    attentions), box, PIL crop, processor, answer with both images. Returns tokens, box and map."""
    pixels = image_processor(image, return_tensors="pt")["pixel_values"]
    ids = llava_prompt_ids(model, tokenizer, question, 1)
    original = _generate(model, ids, pixels, max_new_tokens)
    if method == "none":
        return {"original": original, "crop": original, "bbox": None, "map": None}
    general = llava_prompt_ids(model, tokenizer, general_question, 1)
    size = model.config.vision_config.image_size
    high_pass = high_pass_mask(image, size) if method == "pure_grad" else None
    att_map = llava_maps(model, ids, general, pixels, method=method, layer=layer, high_pass=high_pass)
    bbox = select_bbox_published(att_map, image.size, size)
    both = image_processor([image, image.crop(bbox)], return_tensors="pt")["pixel_values"]
    crop = _generate(model, llava_prompt_ids(model, tokenizer, question, 2), both, max_new_tokens)
    return {"original": original, "crop": crop, "bbox": bbox, "map": att_map}


# ----------------------------------------------------------------------------------------------
# The whole release procedure for one Qwen2.5-VL question (run.py `vicrop_qa`, model "qwen2_5")
# ----------------------------------------------------------------------------------------------

QWEN_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{images}{question}"
                 "<|im_end|>\n<|im_start|>assistant\n")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_ANSWER_SUFFIX = " Answer the question using a single word or phrase."
QWEN_MAX_PIXELS = 256 * 28 * 28  # run.py: the processor's max_pixels (its size["longest_edge"]) for Qwen2.5-VL
QWEN_BBOX_SIZE = 224  # run.py: bbox_size of "qwen2_5"
# qwen_vl_utils' fetch_image defaults (IMAGE_FACTOR, MIN_PIXELS, MAX_PIXELS), the release's resize before the processor
QWEN_VL_UTILS_FACTOR, QWEN_VL_UTILS_MIN_PIXELS, QWEN_VL_UTILS_MAX_PIXELS = 28, 4 * 28 * 28, 16384 * 28 * 28


def qwen_image_processor(folder, max_pixels: int = QWEN_MAX_PIXELS):
    """The checkpoint's Qwen2-VL image processor (its min_pixels, resampling, normalisation) with the release's
    `max_pixels`. The PIL backend, the one `Qwen2VLImageProcessor` resolves to without torchvision (and the one
    vicrop_jax reproduces bit for bit); `Qwen2_5_VLProcessor` is not used: its video processor needs torchvision."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(folder, max_pixels=max_pixels)


def qwen_vl_utils_resize(image: PIL.Image.Image) -> PIL.Image.Image:
    """What the release's `process_vision_info` (qwen_vl_utils `fetch_image`, default arguments) does to an image
    before the processor sees it: RGB, then each side rounded to a multiple of 28 (the area kept within
    [4, 16384] * 28 * 28, aspect ratio at most 200) and PIL's default resampling (bicubic). The processor then
    resizes this image again, to its own max_pixels."""
    import math

    image = image.convert("RGB")
    width, height = image.size
    aspect = max(width, height) / min(width, height)
    if aspect > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {aspect}")
    factor = QWEN_VL_UTILS_FACTOR
    new_height, new_width = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if new_height * new_width > QWEN_VL_UTILS_MAX_PIXELS:
        beta = math.sqrt(height * width / QWEN_VL_UTILS_MAX_PIXELS)
        new_height, new_width = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif new_height * new_width < QWEN_VL_UTILS_MIN_PIXELS:
        beta = math.sqrt(QWEN_VL_UTILS_MIN_PIXELS / (height * width))
        new_height, new_width = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return image.resize((new_width, new_height))


def qwen2_5_vl_inputs(model, tokenizer, image_processor, images: Sequence[PIL.Image.Image], prompt: str) -> dict:
    """The model's inputs for a chat prompt over `images`, as `prepare_qwen2_5_input` makes them with the processor:
    the chat template's text (`QWEN_TEMPLATE`, the default system prompt, the images first), each
    `<|image_pad|>` expanded to one id per merged token of its image, the image processor's pixel_values and
    image_grid_thw, and `mm_token_type_ids` (1 on image tokens), which transformers 5.x's rotary index needs."""
    processed = image_processor(images=list(images), return_tensors="pt")
    merge = model.config.vision_config.spatial_merge_size
    counts = iter((processed["image_grid_thw"].prod(dim=-1) // merge**2).tolist())
    image_id = model.config.image_token_id
    text = QWEN_TEMPLATE.format(images=QWEN_IMAGE * len(images), question=prompt)
    ids: list[int] = []
    for token in tokenizer(text)["input_ids"]:
        ids.extend([token] * next(counts) if token == image_id else [token])
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"],
                mm_token_type_ids=(input_ids == image_id).int())


def qwen2_5_vl_map_inputs(model, tokenizer, image_processor, image: PIL.Image.Image, question: str, method: str,
                          general_question: str = "Write a general description of the image."):
    """(question inputs, general-prompt inputs, pure-grad's high-pass mask or None) of `qwen2_5_vl_maps` over one
    image, with the release's answer suffix on both prompts; the mask is on the image as the processor resizes it."""
    inputs = qwen2_5_vl_inputs(model, tokenizer, image_processor, [image], question + QWEN_ANSWER_SUFFIX)
    general = qwen2_5_vl_inputs(model, tokenizer, image_processor, [image], general_question + QWEN_ANSWER_SUFFIX)
    high_pass = None
    if method == "pure_grad":
        _, h, w = (int(v) for v in inputs["image_grid_thw"][0])
        patch = model.config.vision_config.patch_size
        high_pass = high_pass_mask(image, (w * patch, h * patch))
    return inputs, general, high_pass


def _qwen_generate(model, tokenizer, inputs: dict, max_new_tokens: int) -> str:
    """Greedy answer, the prompt trimmed, decoded as the release does (special tokens skipped, no clean-up)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)


def vicrop_qwen2_5_vl(model, tokenizer, image_processor, image: PIL.Image.Image, question: str, method: str, *,
                      layer: int = 22, max_new_tokens: int = 20, bbox_size: int = QWEN_BBOX_SIZE,
                      general_question: str = "Write a general description of the image.",
                      release_resize: bool = False) -> tuple[str, str, tuple[int, int, int, int] | None]:
    """The release's per-question Qwen2.5-VL procedure (run.py `vicrop_qa` for "qwen2_5") on transformers:
    the map over the image (two forwards with all attentions for rel_att), `select_bbox_published` on the
    original image's size with `bbox_size` 224, the PIL crop of the original image, the answer over the image
    alone and the answer over [image, crop] (`model.generate(..., max_new_tokens, do_sample=False)`).
    Returns (original answer, answer with the crop, box); method "none" returns the original answer twice and
    no box. `image_processor`: `qwen_image_processor(folder)`; `tokenizer`: the checkpoint's.

    Where this follows the release, and where not:
    - Prompts: the question plus " Answer the question using a single word or phrase." in Qwen's chat template,
      for the map, the original answer and the two-image answer alike; the general prompt gets the same suffix.
    - rel_att is the release's `rel_attention_qwen2_5` (LM layer `layer`, 22 in the release; head mean of the
      last position's attention to the tokens between <|vision_start|> and <|vision_end|>; question / general;
      on the merged-token grid), through `qwen2_5_vl_maps`. The release's Qwen branch computes rel_att whatever
      the method; grad_att and pure_grad here are `qwen2_5_vl_maps`' (as for LLaVA, on the image's own grid;
      pure_grad's high-pass mask on the image as the processor resizes it).
    - The forwards of the map run under `torch.no_grad` with `logits_to_keep=1`; the release keeps the autograd
      graph and every position's logits. That only costs the release time and memory, not a different map.
    - float32 and eager attention (the release: bfloat16, the default attention, which falls back to eager for
      `output_attentions`).
    - Preprocessing: the release passes every image (and the crop) through qwen_vl_utils' `fetch_image` first, a
      bicubic resize to multiples of 28 (`qwen_vl_utils_resize`), and the processor then resizes that image again
      to max_pixels. vicrop_jax resizes once, from the original. By default (`release_resize=False`) this
      reference resizes once too, so that it can be checked against vicrop_jax token for token; with True it
      runs the release's double resize. The pixels always differ slightly (two bicubic resizes), and at about
      one size in five the token grid differs by a row or a column: 640 x 480 gives 18 x 13 merged tokens
      either way, but 640 x 427 (a common COCO size) gives 19 x 13 resized once and 19 x 12 after the release's
      first resize to 644 x 420. The box is always chosen on the original image's size, as in the release.
    - Processor inputs come from `qwen2_5_vl_inputs` (the image processor plus the expanded ids), not from
      `Qwen2_5_VLProcessor`, whose video processor needs torchvision.
    """
    prepare = qwen_vl_utils_resize if release_resize else (lambda picture: picture.convert("RGB"))
    image = image.convert("RGB")
    prompt = question + QWEN_ANSWER_SUFFIX
    seen = prepare(image)
    if method == "none":
        inputs = qwen2_5_vl_inputs(model, tokenizer, image_processor, [seen], prompt)
        original = _qwen_generate(model, tokenizer, inputs, max_new_tokens)
        return original, original, None
    inputs, general, high_pass = qwen2_5_vl_map_inputs(model, tokenizer, image_processor, seen, question, method,
                                                       general_question)
    att_map = qwen2_5_vl_maps(model, inputs, general, method=method, layer=layer, high_pass=high_pass)
    bbox = select_bbox_published(att_map, image.size, bbox_size)
    original = _qwen_generate(model, tokenizer, inputs, max_new_tokens)
    both = qwen2_5_vl_inputs(model, tokenizer, image_processor, [seen, prepare(image.crop(bbox))], prompt)
    return original, _qwen_generate(model, tokenizer, both, max_new_tokens), bbox
