"""Where to crop: ViCrop's box selection, high-resolution tiling and the baselines' boxes.

`select_bbox` (numpy, on the host) is docs/method.md (Box selection) as the published code computes it;
`select_bbox_jax` is the same selection with fixed shapes, so that it jits, vmaps, and takes the image size as a
traced value. The two return the same box for every input (finite float32 maps), by construction rather than by
tolerance:

- Window sums: numpy's float32 `.sum()` of a window slice, which the published code takes on its float32 maps, is
  a pairwise sum over the window's cells in row-major order (`_pairwise_sum`; numpy 1.26 to 2.4 alike). Both
  implementations add in exactly that order, so every sum, and therefore every tie between windows, is
  bit-identical to the published one. (Windows over 8192 cells, which numpy versions chunk differently, would
  need stitched maps of absurdly small tiles.)
- The window in cells, `min(int(B*r / (W/gw)), gw)`, is the published float64 expression. The device reproduces it
  without float64: at trace time, for each count n of cells, the largest image side whose float64 expression
  still reaches n is found (the expression never grows with the side), and the device counts thresholds.
- Sharpness is computed in float32 as sum_i (max - s_i) / (k * nx * ny) over the k existing neighbours s_i, in
  the order left, right, up, down, on both sides. It equals the published (max - mean) / (nx * ny), which is
  float64; a flat neighbourhood gives exactly 0 in both (a float32 mean of equal values need not).
- The box side S = B*r and half = S//2 are the float64 Python expressions, of static values (336*1.2 = 403.2,
  half 201).
- The centre `int(px*bw + bw*nx/2)` is computed exactly, as floor(W*(2px+nx) / (2gw)) in integers. This is the one
  deliberate difference from the published code: its float64 expression can land one pixel lower when the exact
  value is an integer and W/gw is not a binary fraction (e.g. W = 640, gw = 24), and no float32 arithmetic can
  reproduce float64's rounding. It moves the box by one pixel in about 1% of random cases (measured in the tests).

A `frame` (left, top, right, bottom) says which part of the image the map's grid covers, e.g. the centre square a
CLIP processor keeps (None: the whole image, the published case, where the box is the same bit for bit). Windows
are counted in the frame's pixels and the centre is the frame's origin plus the exact centre within the frame; the
clamp is to the whole image, so a box may reach past the frame into the rest of the image.

Several regions (`select_boxes`): box k is the published rule on the map with every cell that meets boxes 0..k-1 set
to the map's minimum (`suppress`), and `outside_mass` is the share of the positive mass a box leaves out, to tell
whether another region is worth a crop. Which cells meet a box is decided in integers, and the device runs
`_pairwise_sum`'s tree itself for the mass, so these too agree bit for bit.

The device functions also take a map padded into a larger static canvas, its grid (gh, gw) a traced `grid_size`, so
maps of different grids share one program: a window that fits the grid reads its cells in the same order, and the
padding is never read, whatever it holds.

Accelerators flush float32 subnormals to zero, so both sides treat map values below 1.2e-38 in magnitude as 0.
Image sizes are (W, H) and boxes (left, top, right, bottom), PIL's crop convention, everywhere.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Python literals, as in the published list: 1.0 + 0.2 * i would give 1.4000000000000001 and other boxes.
RATIOS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
MAX_TILE = 1024
# numpy's pairwise summation: blocks of at most PAIRWISE_BLOCK elements, each summed with UNROLL accumulators.
PAIRWISE_BLOCK = 128
UNROLL = 8

Box = tuple[int, int, int, int]


# ---------------------------------------------------------------------------------------------------- shared


def _as_size(image_size: Sequence[int]) -> tuple[int, int]:
    """(W, H) as Python ints; rejects anything that is not two positive integers."""
    try:
        width, height = (operator.index(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be two integers (W, H), got {image_size!r}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive, got (W, H) = ({width}, {height})")
    return width, height


def _positive_int(value: int, name: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"{name} must be positive, got {number}")
    return number


def _as_base(base_size: int) -> int:
    return _positive_int(base_size, "base_size")


def _as_box(box: Sequence[int], name: str = "box") -> Box:
    """(left, top, right, bottom) as Python ints; rejects anything that is not four integers."""
    try:
        left, top, right, bottom = (operator.index(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be four integers (left, top, right, bottom), got {box!r}") from None
    return left, top, right, bottom


def _as_frame(frame: Sequence[int] | None, width: int, height: int) -> Box:
    """The frame as Python ints, the whole image for None; rejects one that is empty or leaves the image."""
    if frame is None:
        return 0, 0, width, height
    left, top, right, bottom = _as_box(frame, "frame")
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"frame must be a non-empty box inside the {width}x{height} image, got {frame!r}")
    return left, top, right, bottom


def _as_regions(regions: int) -> int:
    return _positive_int(regions, "regions")


def _window_cells(base_size: int, ratio: float, side: int, cells: int) -> int:
    """Cells spanned by a B*r window along one axis: the published float64 expression, capped at the grid."""
    return min(int(base_size * ratio / (side / cells)), cells)


def _half(base_size: int, ratio: float) -> int:
    """Half the box side: (B*r)//2 on the float, as published (336*1.2 = 403.2 -> 201)."""
    return int((base_size * ratio) // 2)


def _cells_in_box(shape, box, frame, xp, canvas: tuple[int, int] | None = None) -> np.ndarray | jax.Array:
    """[gh, gw] bool: the cells whose span in the frame meets the box, for host (xp = np) and device (xp = jnp).

    On the device the grid (gh, gw) = shape may be traced and lie in a static canvas (Gh, Gw): the result is then
    [Gh, Gw], False outside the grid.
    """
    rows, cols = shape
    height, width = shape if canvas is None else canvas
    left, top, right, bottom = box
    x0, y0, x1, y1 = frame
    return (_meets(top, bottom, y0, y1 - y0, rows, height, xp)[:, None]
            & _meets(left, right, x0, x1 - x0, cols, width, xp)[None, :])


def _meets(low, high, origin, side, cells, length: int, xp):
    """[length] bool: cell j < cells, [origin + j*side/cells, origin + (j+1)*side/cells), meets [low, high).

    The half-open spans intersect when each starts before the other ends; scaled by `cells`, the comparisons are
    between integers, so no rounding can make host and device disagree.
    """
    j = xp.arange(length)
    in_span = (j * side < (high - origin) * cells) & ((low - origin) * cells < (j + 1) * side)
    return (j < cells) & (low < high) & in_span


# ------------------------------------------------------------------------------------------ host reference


def selection_box_sizes(image_size: tuple[int, int], base_size: int, grid: tuple[int, int]
                        ) -> set[tuple[int, int]]:
    """The (w, h) of every box `select_bbox` may return for an image of this size and a map of this grid (gh,
    gw), whatever the map holds: a side of 2 * (B*r // 2) per ratio, cut at the image's edges, and the whole image
    where the smallest window covers the map (its whole frame, as published)."""
    width, height = image_size
    rows, cols = grid
    sizes = {(min(2 * _half(base_size, r), width), min(2 * _half(base_size, r), height)) for r in RATIOS}
    if _window_cells(base_size, 1.0, width, cols) == cols and _window_cells(base_size, 1.0, height, rows) == rows:
        sizes.add((width, height))
    return sizes


def select_bbox(
    importance: np.ndarray, image_size: tuple[int, int], base_size: int, frame: Sequence[int] | None = None
) -> Box:
    """The crop box for an importance map over the image (docs/method.md (Box selection), paper-exact).

    Tries windows of B*r pixels for r in RATIOS, keeps for each the cell position with the largest sum (first in
    x-major order), and picks the r whose maximum stands out most from its neighbours (first on ties). Returns the
    whole image when even r = 1 covers the grid. A grid cell wider or taller than B gives an empty window at r = 1;
    the published code then divides 0 by 0 and numpy's argmax takes the NaN, so r = 1 at cell (0, 0) wins. Kept.

    The grid covers `frame` (left, top, right, bottom), the whole image for None: windows are counted in the
    frame's pixels, the box is centred in the frame and clamped to the whole image. A frame that r = 1 covers
    gives the whole image too: the map cannot tell one part of it from another.
    """
    grid = _as_map(importance)
    width, height = _as_size(image_size)
    base = _as_base(base_size)
    x0, y0, x1, y1 = _as_frame(frame, width, height)
    rows, cols = grid.shape
    best = None
    for k, ratio in enumerate(RATIOS):
        nx = _window_cells(base, ratio, x1 - x0, cols)
        ny = _window_cells(base, ratio, y1 - y0, rows)
        if nx == cols and ny == rows:
            if k == 0:
                return 0, 0, width, height
            continue
        sums = _window_sums(grid, nx, ny)
        px, py = _first_max(sums)
        sharpness = math.inf if nx * ny == 0 else _sharpness(sums, px, py, nx * ny)
        if best is None or sharpness > best[0]:
            best = (sharpness, ratio, px, py, nx, ny)
    _, ratio, px, py, nx, ny = best
    half = _half(base, ratio)
    left, right = _span(x0 + _centre(px, nx, x1 - x0, cols), half, width)
    top, bottom = _span(y0 + _centre(py, ny, y1 - y0, rows), half, height)
    return left, top, right, bottom


def suppress(
    importance: np.ndarray, box: Sequence[int], image_size: tuple[int, int], frame: Sequence[int] | None = None
) -> np.ndarray:
    """The map (float32, subnormals flushed) with every cell that meets `box` set to the map's minimum.

    Cell j of gw spans x in [x0 + j*fw/gw, x0 + (j+1)*fw/gw), with x0 and fw the frame's left and width (y alike),
    and meets the box [left, right) x [top, bottom) where the two intersect: the next selection looks elsewhere.
    """
    grid = _as_map(importance)
    hit = _cells_in_box(grid.shape, _as_box(box), _as_frame(frame, *_as_size(image_size)), np)
    return np.where(hit, grid.min(), grid)


def select_boxes(
    importance: np.ndarray,
    image_size: tuple[int, int],
    base_size: int,
    regions: int = 1,
    frame: Sequence[int] | None = None,
) -> list[Box]:
    """`regions` boxes: box k is `select_bbox` of the map with the cells of boxes 0..k-1 suppressed (`suppress`)."""
    grid = _as_map(importance)
    found = []
    for _ in range(_as_regions(regions)):
        found.append(select_bbox(grid, image_size, base_size, frame))
        grid = suppress(grid, found[-1], image_size, frame)
    return found


def outside_mass(
    importance: np.ndarray, box: Sequence[int], image_size: tuple[int, int], frame: Sequence[int] | None = None
) -> float:
    """The share of the map's positive mass, sum of max(map, 0), in cells that do not meet `box` (0 for no mass).

    Both sums are float32 `_pairwise_sum`s in row-major order, as on the device. Rounding never decreases a sum
    when a term grows, so the part is at most the whole and the share lies in [0, 1].
    """
    grid = _as_map(importance)
    hit = _cells_in_box(grid.shape, _as_box(box), _as_frame(frame, *_as_size(image_size)), np)
    positive = np.where(grid > 0, grid, np.float32(0.0)).reshape(-1)
    total = _pairwise_sum(positive)
    outside = _pairwise_sum(np.where(hit.reshape(-1), np.float32(0.0), positive))
    return float(outside / total) if total > 0 else 0.0


def _as_map(importance: np.ndarray) -> np.ndarray:
    """The map as float32 with subnormals flushed to 0, as on the device; rejects non-2D, empty, non-finite."""
    grid = np.asarray(importance)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"importance must be a non-empty 2D map (gh, gw), got shape {grid.shape}")
    grid = grid.astype(np.float32)
    if not np.isfinite(grid).all():
        raise ValueError("importance contains NaN or infinite values (as float32)")
    return np.where(np.abs(grid) < np.finfo(np.float32).tiny, np.float32(0.0), grid)


def _window_sums(grid: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """[gh-ny+1, gw-nx+1] sums of every nx-by-ny window, each `_pairwise_sum` of its cells in row-major order."""
    rows, cols = grid.shape
    windows = np.lib.stride_tricks.sliding_window_view(grid, (ny, nx))
    return _pairwise_sum(windows.reshape(rows - ny + 1, cols - nx + 1, ny * nx))


def _pairwise_sum(values: np.ndarray, xp=np) -> np.ndarray:
    """numpy's float32 pairwise summation along the last axis, written out so the device can repeat it (xp = jnp
    runs it as is on a static length; `_strided_sums` does it for traced lengths).

    Runs longer than PAIRWISE_BLOCK are split at n2 = n//2 - (n//2) % UNROLL and the halves' sums added; a block
    sums its first n - n % UNROLL values in UNROLL running accumulators, adds those as a tree, then the rest in
    order; runs shorter than UNROLL are summed in order.
    """
    n = values.shape[-1]
    if n > PAIRWISE_BLOCK:
        split = n // 2 - (n // 2) % UNROLL
        return _pairwise_sum(values[..., :split], xp) + _pairwise_sum(values[..., split:], xp)
    if n < UNROLL:
        total = xp.zeros(values.shape[:-1], xp.float32)
        for i in range(n):
            total = total + values[..., i]
        return total
    whole = n - n % UNROLL
    lanes = values[..., :UNROLL]
    for group in range(UNROLL, whole, UNROLL):
        lanes = lanes + values[..., group : group + UNROLL]
    lane = [lanes[..., j] for j in range(UNROLL)]
    total = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))
    for i in range(whole, n):
        total = total + values[..., i]
    return total


def _first_max(sums: np.ndarray) -> tuple[int, int]:
    """(x, y) of the largest sum, the first one scanning x in the outer loop and y in the inner one."""
    x, y = divmod(int(np.argmax(sums.T)), sums.shape[0])
    return x, y


def _sharpness(sums: np.ndarray, x: int, y: int, cells: int) -> np.float32:
    """sum over the existing left/right/up/down neighbours of (max - neighbour), / (count * cells); float32."""
    neighbours = [(y, x - 1), (y, x + 1), (y - 1, x), (y + 1, x)]
    inside = [sums[i, j] for i, j in neighbours if 0 <= i < sums.shape[0] and 0 <= j < sums.shape[1]]
    total = np.float32(0.0)
    for value in inside:
        total = total + (sums[y, x] - value)
    return total / np.float32(len(inside) * cells)


def _centre(position: int, cells: int, side: int, grid_cells: int) -> int:
    """int(position*bw + bw*cells/2) with bw = side/grid_cells, computed exactly in integers."""
    return side * (2 * position + cells) // (2 * grid_cells)


def _span(centre: int, half: int, side: int) -> tuple[int, int]:
    """The published clamp: centre into [half, side-half], lower bound first; then the box cut to the image."""
    centre = min(max(centre, half), side - half)
    return max(0, centre - half), min(side, centre + half)


# ---------------------------------------------------------------------------------------------- device path


def select_bbox_jax(
    importance: jax.Array,
    image_size: jax.Array,
    base_size: int,
    frame: jax.Array | None = None,
    *,
    grid_size: jax.Array | None = None,
) -> jax.Array:
    """`select_bbox` with fixed shapes: importance [gh, gw], image_size [2] int (W, H) -> box [4] int32.

    jit- and vmap-able with a traced image size and frame ([4] int, or None for the whole image), so images of any
    size share one program per grid shape and base size (base_size is static). All ratios are evaluated at once,
    with masks for the positions where a window does not fit. NaN in the map or a frame that is empty or leaves
    the image gives an unspecified box (the host version raises).

    With `grid_size` ([2] int (gh, gw), traced) the map is importance[:gh, :gw] of a larger canvas [Gh, Gw], so
    grids of any size up to the canvas share the program too; the rest of the canvas is never read. The box is
    `select_bbox` of importance[:gh, :gw]; a grid size outside 1..(Gh, Gw) gives an unspecified box.
    """
    grid = jnp.asarray(importance, jnp.float32)
    if grid.ndim != 2:
        raise ValueError(f"importance must be a 2D map (gh, gw), got shape {grid.shape}")
    base = _as_base(base_size)
    rows, cols = _grid_size_jax(grid, grid_size)
    size = jnp.asarray(image_size).astype(jnp.int32)
    width, height = size[0], size[1]
    x0, y0, x1, y1 = _frame_jax(frame, size)
    nx = _window_cells_jax(x1 - x0, base, cols, grid.shape[1])  # [R]
    ny = _window_cells_jax(y1 - y0, base, rows, grid.shape[0])  # [R]
    sums = jax.vmap(_window_sums_jax, in_axes=(None, 0, 0))(grid, nx, ny)  # [R, Gh, Gw]
    x_fits = jnp.arange(grid.shape[1]) <= (cols - nx)[:, None, None]
    y_fits = jnp.arange(grid.shape[0])[:, None] <= (rows - ny)[:, None, None]
    x_major = jnp.where(x_fits & y_fits, sums, -jnp.inf).transpose(0, 2, 1).reshape(len(RATIOS), -1)
    px, py = jnp.divmod(jnp.argmax(x_major, axis=1), grid.shape[0])
    sharpness = _sharpness_jax(sums, px, py, nx, ny, rows, cols)
    covers = (nx == cols) & (ny == rows)
    key = jnp.where(covers, -jnp.inf, jnp.where(nx * ny == 0, jnp.inf, sharpness))
    k = jnp.argmax(key)
    half = jnp.asarray([_half(base, r) for r in RATIOS], jnp.int32)[k]
    left, right = _span_jax(x0 + (x1 - x0) * (2 * px[k] + nx[k]) // (2 * cols), half, width)
    top, bottom = _span_jax(y0 + (y1 - y0) * (2 * py[k] + ny[k]) // (2 * rows), half, height)
    box = jnp.stack([left, top, right, bottom])
    return jnp.where(covers[0], jnp.stack([0, 0, width, height]), box).astype(jnp.int32)


def suppress_jax(
    importance: jax.Array,
    box: jax.Array,
    image_size: jax.Array,
    frame: jax.Array | None = None,
    *,
    grid_size: jax.Array | None = None,
) -> jax.Array:
    """`suppress` with fixed shapes: importance [gh, gw], box [4] int, image_size [2] int -> [gh, gw] float32.

    With `grid_size` (see `select_bbox_jax`) the map importance[:gh, :gw] is suppressed, to the minimum over it;
    the rest of the canvas is returned as it came (subnormals flushed, like the map).
    """
    grid = _flush_jax(jnp.asarray(importance, jnp.float32))
    rows, cols = _grid_size_jax(grid, grid_size)
    size = jnp.asarray(image_size).astype(jnp.int32)
    hit = _cells_in_box((rows, cols), jnp.asarray(box).astype(jnp.int32), _frame_jax(frame, size), jnp, grid.shape)
    valid = (jnp.arange(grid.shape[0])[:, None] < rows) & (jnp.arange(grid.shape[1]) < cols)
    return jnp.where(hit, jnp.min(jnp.where(valid, grid, jnp.inf)), grid)


def select_boxes_jax(
    importance: jax.Array,
    image_size: jax.Array,
    base_size: int,
    regions: int,
    frame: jax.Array | None = None,
    *,
    grid_size: jax.Array | None = None,
) -> jax.Array:
    """`select_boxes` with fixed shapes: boxes [regions, 4] int32; regions, like base_size, is static.

    A scan over the regions, so one `select_bbox_jax` is compiled however many there are. `grid_size` as there.
    """

    def step(grid, _):
        box = select_bbox_jax(grid, image_size, base_size, frame, grid_size=grid_size)
        return suppress_jax(grid, box, image_size, frame, grid_size=grid_size), box

    _, found = jax.lax.scan(step, jnp.asarray(importance, jnp.float32), length=_as_regions(regions))
    return found


def outside_mass_jax(
    importance: jax.Array,
    box: jax.Array,
    image_size: jax.Array,
    frame: jax.Array | None = None,
    *,
    grid_size: jax.Array | None = None,
) -> jax.Array:
    """`outside_mass` with fixed shapes: a float32 scalar, the host's value bit for bit (of importance[:gh, :gw]
    with `grid_size`, see `select_bbox_jax`).

    With `grid_size`, the sums are those of a window of the whole grid at (0, 0) in the canvas (`_strided_sums`);
    without, numpy's tree for the static count is unrolled, which compiles in a third of the time.
    """
    grid = _flush_jax(jnp.asarray(importance, jnp.float32))
    rows, cols = _grid_size_jax(grid, grid_size)
    size = jnp.asarray(image_size).astype(jnp.int32)
    hit = _cells_in_box((rows, cols), jnp.asarray(box).astype(jnp.int32), _frame_jax(frame, size), jnp, grid.shape)
    positive = jnp.where(grid > 0, grid, 0.0)
    both = jnp.stack([positive, jnp.where(hit, 0.0, positive)]).reshape(2, -1)  # [2, Gh * Gw], row-major
    if grid_size is None:
        total, outside = _pairwise_sum(both, jnp)
    else:
        first = jnp.zeros(1, jnp.int32)
        total, outside = jax.vmap(lambda v: _strided_sums(v, first, cols, grid.shape[1], rows * cols)[0])(both)
    return jnp.where(total > 0, outside / jnp.where(total > 0, total, 1.0), 0.0)


def _grid_size_jax(grid: jax.Array, grid_size: jax.Array | None) -> tuple:
    """(gh, gw): the traced `grid_size`, or for None the whole array's shape (static ints)."""
    if grid_size is None:
        return grid.shape
    size = jnp.asarray(grid_size)
    if size.shape != (2,):
        raise ValueError(f"grid_size must be [2] (gh, gw), got shape {size.shape}")
    size = size.astype(jnp.int32)
    return size[0], size[1]


def _frame_jax(frame: jax.Array | None, size: jax.Array) -> jax.Array:
    """[4] int32 (left, top, right, bottom): the frame, or the whole image for None."""
    if frame is None:
        return jnp.concatenate([jnp.zeros(2, jnp.int32), size])
    return jnp.asarray(frame).astype(jnp.int32)


def _flush_jax(grid: jax.Array) -> jax.Array:
    """Subnormals to 0, as `_as_map` does on the host."""
    return jnp.where(jnp.abs(grid) < jnp.finfo(jnp.float32).tiny, 0.0, grid)


@functools.cache
def _cell_thresholds(base_size: int, cells: int) -> np.ndarray:
    """[R, cells]: entry (k, n-1) is the largest (frame) side whose window for RATIOS[k] spans >= n cells (0: none).

    `_window_cells` never grows with the side, so counting the thresholds a side is <= to reproduces it exactly,
    float64 rounding included, with int32 comparisons on the device.
    """
    table = np.zeros((len(RATIOS), cells), np.int32)
    for k, ratio in enumerate(RATIOS):
        for n in range(1, cells + 1):
            side = int(base_size * ratio * cells / n) + 2  # above the threshold: float64 is off by ulps, not pixels
            while side > 0 and _window_cells(base_size, ratio, side, cells) < n:
                side -= 1
            table[k, n - 1] = side
    return table


@functools.cache
def _cell_threshold_table(base_size: int, max_cells: int) -> np.ndarray:
    """[max_cells, R, max_cells]: row c-1 is `_cell_thresholds(base_size, c)`, padded with 0 (no side reaches)."""
    table = np.zeros((max_cells, len(RATIOS), max_cells), np.int32)
    for cells in range(1, max_cells + 1):
        table[cells - 1, :, :cells] = _cell_thresholds(base_size, cells)
    return table


def _window_cells_jax(side: jax.Array, base_size: int, cells, max_cells: int | None = None) -> jax.Array:
    """[R] `_window_cells` of a traced side, for every ratio, on `cells` grid cells: a static int, or traced and at
    most max_cells (static)."""
    thresholds = jnp.asarray(_cell_threshold_table(base_size, cells if max_cells is None else max_cells))[cells - 1]
    return jnp.sum(side <= thresholds, axis=1, dtype=jnp.int32)


def _window_sums_jax(grid: jax.Array, nx: jax.Array, ny: jax.Array) -> jax.Array:
    """[gh, gw] sums of the nx-by-ny window at each top-left cell, bit-identical to `_window_sums`.

    Entries where the window does not fit are garbage (masked later). A window that fits a smaller grid in the
    top-left corner of the array reads only that grid's cells, in the same order: the same sums.
    """
    rows, cols = grid.shape
    starts = jnp.arange(rows * cols)
    return _strided_sums(_flush_jax(grid).reshape(-1), starts, nx, cols, nx * ny).reshape(rows, cols)


def _strided_sums(flat: jax.Array, starts: jax.Array, run, stride: int, n) -> jax.Array:
    """[len(starts)] `_pairwise_sum`s of n values each: from each start, rows of `run` values `stride` apart (a
    window's cells in row-major order, in a map of `stride` columns), bit-identical to the host's.

    numpy's split tree depends only on the count n (traced), so it is built once, to a static depth: a node
    short enough to be a block gets the children (all of it, nothing), and adding the empty sum 0.0 is exact, so
    the leaves' block sums combine bit for bit. Values past the end of flat read as 0.
    """
    run = jnp.maximum(run, 1)
    offsets, lengths = _pairwise_leaves(n, flat.shape[0])
    width = max(UNROLL, -(-min(PAIRWISE_BLOCK, flat.shape[0]) // UNROLL) * UNROLL)  # every leaf fits

    def leaf_sum(leaf):
        offset, length = leaf
        cell = offset + jnp.arange(width)  # the leaf's cells, numbered in row-major order
        index = starts[None, :] + ((cell // run) * stride + cell % run)[:, None]
        return _block_sums(flat.at[index].get(mode="fill", fill_value=0.0), length)

    sums = jax.lax.map(leaf_sum, (offsets, lengths))  # [leaves, len(starts)]
    while sums.shape[0] > 1:
        sums = sums[0::2] + sums[1::2]
    return sums[0]


def _pairwise_leaves(n: jax.Array, max_n: int) -> tuple[jax.Array, jax.Array]:
    """(offsets, lengths) [2**depth] of the blocks of `_pairwise_sum`'s split of n <= max_n values, in tree order."""
    offsets, lengths = jnp.zeros((1,), jnp.int32), jnp.reshape(n, (1,)).astype(jnp.int32)
    bound = max_n
    while bound > PAIRWISE_BLOCK:
        split = jnp.where(lengths > PAIRWISE_BLOCK, lengths // 2 - (lengths // 2) % UNROLL, lengths)
        offsets = jnp.stack([offsets, offsets + split], axis=1).reshape(-1)
        lengths = jnp.stack([split, lengths - split], axis=1).reshape(-1)
        bound = bound // 2 + UNROLL
    return offsets, lengths


def _block_sums(values: jax.Array, n: jax.Array) -> jax.Array:
    """`_pairwise_sum` of values[:n] for n <= PAIRWISE_BLOCK; masked values add 0.0, which is exact."""
    width = values.shape[0]

    def take(i, keep):
        return jnp.where(keep, values[i], 0.0)

    short = jnp.zeros(values.shape[1:], jnp.float32)
    for i in range(UNROLL - 1):
        short = short + take(i, i < n)
    whole = n - n % UNROLL
    lanes = [values[j] for j in range(UNROLL)]
    for group in range(UNROLL, width, UNROLL):
        lanes = [lane + take(group + j, group < whole) for j, lane in enumerate(lanes)]
    long = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
    for i in range(UNROLL, width):
        long = long + take(i, (i >= whole) & (i < n))
    return jnp.where(n < UNROLL, short, long)


def _sharpness_jax(sums: jax.Array, px: jax.Array, py: jax.Array, nx: jax.Array, ny: jax.Array, rows, cols):
    """[R] `_sharpness` at each ratio's maximum on a rows x cols grid; absent neighbours add 0.0, which is exact."""
    ratio = jnp.arange(len(RATIOS))

    def at(y, x):
        return sums[ratio, jnp.clip(y, 0, sums.shape[1] - 1), jnp.clip(x, 0, sums.shape[2] - 1)]

    neighbours = [
        (px >= 1, at(py, px - 1)),
        (px + 1 <= cols - nx, at(py, px + 1)),
        (py >= 1, at(py - 1, px)),
        (py + 1 <= rows - ny, at(py + 1, px)),
    ]
    peak = at(py, px)
    total = jnp.zeros(len(RATIOS), jnp.float32)
    for present, value in neighbours:
        total = total + jnp.where(present, peak - value, 0.0)
    count = sum(present.astype(jnp.int32) for present, _ in neighbours)
    return total / jnp.maximum(count * nx * ny, 1).astype(jnp.float32)


def _span_jax(centre: jax.Array, half: jax.Array, side: jax.Array) -> tuple[jax.Array, jax.Array]:
    centre = jnp.minimum(jnp.maximum(centre, half), side - half)
    return jnp.maximum(0, centre - half), jnp.minimum(side, centre + half)


# ----------------------------------------------------------------------------------------- high resolution


def tile_grid(image_size: tuple[int, int], max_tile: int = MAX_TILE) -> tuple[int, int, int, int]:
    """(rows, cols, tile_w, tile_h) of the published high-resolution split (docs/method.md (High-resolution images)).

    rows = ceil(H/max_tile) and cols = int(rows*W/H), so tiles are about square with a height of at most max_tile;
    a tile can be wider than max_tile (up to about twice). cols is at least 1: the published code gives 0 for
    images taller than `rows` times their width. Integer arithmetic; it equals the published float expressions.
    Which images to tile is the caller's choice: docs/method.md tiles sides over 1024, the published `*_high`
    methods tile every image (a small one gives rows = 1).
    """
    width, height = _as_size(image_size)
    if operator.index(max_tile) <= 0:
        raise ValueError(f"max_tile must be positive, got {max_tile}")
    rows = -(-height // max_tile)
    cols = max(1, rows * width // height)
    return rows, cols, -(-width // cols), -(-height // rows)


def tile_boxes(image_size: tuple[int, int], max_tile: int = MAX_TILE, clip: bool = True) -> list[Box]:
    """The tiles of `tile_grid`, row-major, as crop boxes.

    With clip (the default) the last row and column are cut at the image border. The published code crops the
    full tile size instead, and PIL fills what lies past the border with black (fewer than `cols` columns and
    `rows` rows): clip=False gives those boxes.
    """
    width, height = _as_size(image_size)
    rows, cols, tile_w, tile_h = tile_grid(image_size, max_tile)
    if clip and ((cols - 1) * tile_w >= width or (rows - 1) * tile_h >= height):
        raise ValueError(f"a {width}x{height} image is too thin to tile: a clipped tile would be empty")
    boxes = []
    for j in range(rows):
        for i in range(cols):
            x2, y2 = (i + 1) * tile_w, (j + 1) * tile_h
            boxes.append((i * tile_w, j * tile_h, min(x2, width) if clip else x2, min(y2, height) if clip else y2))
    return boxes


def stitch_maps(tile_maps: Sequence[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """Join rows*cols tile maps, each (gh, gw) and in `tile_boxes` order, into one (rows*gh, cols*gw) map."""
    maps = [np.asarray(m) for m in tile_maps]
    if len(maps) != rows * cols:
        raise ValueError(f"expected rows*cols = {rows * cols} tile maps, got {len(maps)}")
    if any(m.ndim != 2 or m.shape != maps[0].shape for m in maps):
        raise ValueError(f"tile maps must all be 2D of one shape, got {[m.shape for m in maps]}")
    return np.concatenate([np.concatenate(maps[j * cols : (j + 1) * cols], axis=1) for j in range(rows)], axis=0)


# ----------------------------------------------------------------------------------------------- baselines


def center_box(image_size: tuple[int, int], base_size: int) -> Box:
    """A base_size square in the middle of the image (cut to the image when it is smaller)."""
    width, height = _as_size(image_size)
    base = _as_base(base_size)
    left, top = max(0, (width - base) // 2), max(0, (height - base) // 2)
    return left, top, min(width, left + base), min(height, top + base)


def random_box(image_size: tuple[int, int], base_size: int, rng: np.random.Generator) -> Box:
    """A base_size square at a uniformly random position inside the image (cut to the image when it is smaller)."""
    width, height = _as_size(image_size)
    base = _as_base(base_size)
    left = int(rng.integers(0, max(0, width - base) + 1))
    top = int(rng.integers(0, max(0, height - base) + 1))
    return left, top, min(width, left + base), min(height, top + base)


def grow_box(bbox: Sequence[float], image_size: tuple[int, int], base_size: int) -> Box:
    """The `gt` crop: a ground-truth box (x1, y1, x2, y2) grown about its centre to at least base_size a side.

    Fractional coordinates are rounded outwards and the box is cut to the image first; the grown box is then
    shifted to lie inside the image, and cut to it where the image is smaller than base_size.
    """
    width, height = _as_size(image_size)
    base = _as_base(base_size)
    if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox) or bbox[0] > bbox[2] or bbox[1] > bbox[3]:
        raise ValueError(f"bbox must be finite (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2, got {bbox!r}")
    left, right = _grow(bbox[0], bbox[2], width, base)
    top, bottom = _grow(bbox[1], bbox[3], height, base)
    return left, top, right, bottom


def _grow(low: float, high: float, side: int, base: int) -> tuple[int, int]:
    """One axis of `grow_box`; an odd number of added pixels puts the extra one after the box."""
    low, high = min(max(math.floor(low), 0), side), min(max(math.ceil(high), 0), side)
    length = max(high - low, base)
    start = low - (length - (high - low)) // 2
    start = max(min(start, side - length), 0)
    return start, min(side, start + length)
