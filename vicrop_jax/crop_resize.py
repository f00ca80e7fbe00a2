"""A crop of an image resized on the device as the image processors resize it (PIL's antialiased bicubic):
to a fixed size (`crop_and_resize_jax`: CLIP, BLIP) or to a traced size inside a fixed canvas
(`crop_and_resize_into_jax`: Qwen2.5-VL, whose processed size follows the box). Jit- and vmap-able with traced
boxes and image sizes, for the families' device crops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NARROW_BOX_SCALE = 2  # crop_and_resize_jax: boxes up to this many times the output size are resized cheaply


def _keys_cubic(x: jax.Array) -> jax.Array:
    """Keys' cubic convolution kernel with a = -0.5, PIL's (and jax.image's) bicubic filter."""
    a = -0.5
    x = jnp.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return jnp.where(x < 1, near, jnp.where(x < 2, far, 0.0))


def _crop_resize_taps(start: jax.Array, stop: jax.Array, size: int, out: int, resized: jax.Array | None = None,
                      max_scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(indices [out, taps], weights [out, taps]): the input pixels and weights that resize pixels start..stop-1
    of an axis of `size` pixels to `out` pixels as PIL's antialiased bicubic resize of the crop does: pixel
    centres at i + 0.5, the kernel (support 2) widened by the downscale factor, the pixels outside the box
    weighing 0 and each output normalised over those inside. `taps` (static) covers the widest kernel, that
    of a box spanning the whole axis, so only the pixels an output reads are read. Positions are taken from
    the box's start and sums run tap by tap, so that a pixel's weight depends neither on where the box lies
    in the array nor on the number of taps: a window around the box gives the same weights, bit for bit."""
    taps = min(size, math.ceil(4 * max(size / out if max_scale is None else max_scale, 1.0)) + 2)
    length = out if resized is None else resized
    scale = (stop - start).astype(jnp.float32) / length
    support = 2.0 * jnp.maximum(scale, 1.0)
    centres = (jnp.arange(out, dtype=jnp.float32) + 0.5) * scale
    first = jnp.clip(start + jnp.floor(centres - 0.5 - support).astype(jnp.int32), 0, size - taps)
    indices = first[:, None] + jnp.arange(taps, dtype=jnp.int32)
    weights = _keys_cubic(((indices - start).astype(jnp.float32) + 0.5 - centres[:, None]) / jnp.maximum(scale, 1.0))
    weights = jnp.where((indices >= start) & (indices < stop), weights, 0.0)
    if resized is None:
        return indices, weights / sum(weights[:, t, None] for t in range(taps))
    total = sum(weights[:, t, None] for t in range(taps))
    inside = (jnp.arange(out) < resized)[:, None]  # outputs beyond the resized size read nothing
    return indices, jnp.where(inside, weights / jnp.where(inside, total, 1.0), 0.0)


def crop_and_resize_jax(
    image: jax.Array, valid_size: jax.Array, box: jax.Array, out_size: tuple[int, int]
) -> jax.Array:
    """Crop `box` out of image [H, W, C] and resize it to out_size (h, w) with antialiased Keys bicubic (a = -0.5).

    The device counterpart of `PIL.Image.crop(box).resize((w, h), Image.BICUBIC)`, jit- and vmap-able with a
    traced box and valid size: PIL's separable weights applied rows first, then columns, each output pixel
    reading only the input pixels under its kernel (a fixed number, so shapes stay static). Pixels outside the
    box weigh 0, so neither the rest of the image nor the padding beyond `valid_size` (W, H) (images padded
    to a bucket) leaks in. The box is clipped to the valid region and kept at least one pixel wide. A non-square
    box is stretched to out_size (aspect not kept). The result is float32 and unclipped, so any value range works.
    Against PIL on uint8 images, after rounding and clipping: mean |difference| 0.2, at most 1 on smooth images;
    on pure noise mean 0.27 and up to 25 where bicubic overshoots, because PIL rounds and clips between its two
    passes.

    The number of input pixels an output reads grows with the downscale factor, and a static count must cover
    the whole image. Boxes of at most `NARROW_BOX_SCALE` times out_size (every box the maps select but the whole
    image) are resized from a window of that size around them, with few taps (vicrop-tiny's 112-px crop of a
    768-px image: 10 taps instead of 28 per axis); the values agree with the whole image's to float32 rounding.
    With a batched box (vmap) both ways are computed.
    """
    out_h, out_w = out_size
    image = jnp.asarray(image)
    left, top, right, bottom = _clipped_box(box, valid_size)
    window_h = min(image.shape[0], NARROW_BOX_SCALE * out_h)
    window_w = min(image.shape[1], NARROW_BOX_SCALE * out_w)
    if (window_h, window_w) == image.shape[:2]:
        return _crop_resize(image, left, top, right, bottom, out_size)

    def narrow(image):
        # the window's origin: the box's corner, moved back where the window would leave the image
        y = jnp.minimum(top, image.shape[0] - window_h)
        x = jnp.minimum(left, image.shape[1] - window_w)
        window = jax.lax.dynamic_slice(image, (y, x, 0), (window_h, window_w, image.shape[2]))
        return _crop_resize(window, left - x, top - y, right - x, bottom - y, out_size)

    fits = (bottom - top <= window_h) & (right - left <= window_w)
    return jax.lax.cond(fits, narrow, lambda image: _crop_resize(image, left, top, right, bottom, out_size), image)


def _clipped_box(box: jax.Array, valid_size: jax.Array) -> tuple[jax.Array, ...]:
    """(left, top, right, bottom) of a box clipped to the valid (W, H) region, at least one pixel wide."""
    size = jnp.asarray(valid_size).astype(jnp.int32)
    box = jnp.asarray(box).astype(jnp.int32)
    left = jnp.clip(box[0], 0, size[0] - 1)
    top = jnp.clip(box[1], 0, size[1] - 1)
    return left, top, jnp.clip(box[2], left + 1, size[0]), jnp.clip(box[3], top + 1, size[1])


def _crop_resize(image: jax.Array, left, top, right, bottom, out_size: tuple[int, int], resized=None,
                 max_scale: float | None = None) -> jax.Array:
    """`crop_and_resize_jax` of a clipped box, with as many taps as a box spanning the whole image needs (or as
    a downscale by at most `max_scale` needs); with `resized` (h, w), into the top-left corner of out_size."""
    out_h, out_w = out_size
    resized_h, resized_w = (None, None) if resized is None else (resized[0], resized[1])
    row_indices, row_weights = _crop_resize_taps(top, bottom, image.shape[0], out_h, resized_h, max_scale)
    col_indices, col_weights = _crop_resize_taps(left, right, image.shape[1], out_w, resized_w, max_scale)
    # one gather per tap, summed: XLA fuses them (a single [out, taps, W, C] gather is materialised, slower)
    rows = sum(row_weights[:, t, None, None] * image[row_indices[:, t]].astype(jnp.float32)
               for t in range(row_indices.shape[1]))
    return sum(col_weights[None, :, t, None] * rows[:, col_indices[:, t]] for t in range(col_indices.shape[1]))


def crop_and_resize_into_jax(image: jax.Array, valid_size: jax.Array, box: jax.Array, resized: jax.Array,
                             canvas: tuple[int, int], max_scale: int) -> jax.Array:
    """`crop_and_resize_jax` to a traced size: the box resized to `resized` (h, w) <= canvas (h, w), in the
    canvas's top-left corner, zeros elsewhere; for processors whose output size follows the box (Qwen2.5-VL).

    `max_scale` (static) bounds the downscale factor, box side / resized side, which the caller knows: the box
    is resized from a window of max_scale times the canvas around it, with the taps that factor needs.
    """
    left, top, right, bottom = _clipped_box(box, valid_size)
    window_h = min(image.shape[0], max_scale * canvas[0])
    window_w = min(image.shape[1], max_scale * canvas[1])
    y = jnp.minimum(top, image.shape[0] - window_h)
    x = jnp.minimum(left, image.shape[1] - window_w)
    window = jax.lax.dynamic_slice(image, (y, x, 0), (window_h, window_w, image.shape[2]))
    return _crop_resize(window, left - x, top - y, right - x, bottom - y, canvas, resized, max_scale)
