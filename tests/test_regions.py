"""Frames, suppression and several regions in vicrop_jax.vicrop.boxes, and the overlay of a framed map.

The device functions must give the host's boxes and masses bit for bit, and frame=None (or the whole image as the
frame) the published box, as `tests.test_boxes.published_select_bbox` transcribes it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.test_boxes import published_select_bbox, random_map
from vicrop_jax.vicrop.boxes import (
    outside_mass,
    outside_mass_jax,
    select_bbox,
    select_bbox_jax,
    select_boxes,
    select_boxes_jax,
    suppress,
    suppress_jax,
)
from vicrop_jax.viz import overlay

GRIDS = [((24, 24), 336), ((16, 16), 224), ((6, 8), 336)]
BATCH = 64


def random_size(rng, base):
    """(W, H): smaller than the base, landscape or portrait up to 3:1, or about square."""
    kind = rng.integers(0, 3)
    if kind == 0:
        return int(rng.integers(20, base)), int(rng.integers(20, base))
    if kind == 1:
        short = int(rng.integers(100, 1000))
        size = short, int(short * rng.uniform(1, 3))
        return size if rng.random() < 0.5 else size[::-1]
    return int(rng.integers(300, 2500)), int(rng.integers(300, 2500))


def centre_square(size):
    width, height = size
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, (width - side) // 2 + side, (height - side) // 2 + side


def random_frame(rng, size, kind):
    """The whole image, its centre square, or any non-empty box inside it."""
    width, height = size
    if kind == 0:
        return 0, 0, width, height
    if kind == 1:
        return centre_square(size)
    left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
    return left, top, int(rng.integers(left + 1, width + 1)), int(rng.integers(top + 1, height + 1))


def random_cases(seed, shape, base, count):
    """maps [n, gh, gw], sizes [n, 2] and frames [n, 4] (whole, centre square, random in turn), as numpy."""
    rng = np.random.default_rng(seed)
    maps = np.stack([random_map(rng, shape, i % 5) for i in range(count)])
    sizes = [random_size(rng, base) for _ in range(count)]
    frames = [random_frame(rng, size, i % 3) for i, size in enumerate(sizes)]
    return maps, np.array(sizes, np.int32), np.array(frames, np.int32)


@functools.cache
def batched(function, **static):
    return jax.jit(jax.vmap(functools.partial(function, **static)))


def on_device(function, *arrays, frame=None, **static):
    """function vmapped and jitted over arrays (and frames, by keyword); batches are padded to BATCH records, so
    that tests share programs."""
    count = len(arrays[0])
    assert count <= BATCH

    def pad(a):
        return np.concatenate([a, np.repeat(a[:1], BATCH - count, axis=0)])

    framed = {} if frame is None else {"frame": pad(frame)}
    return np.asarray(batched(function, **static)(*map(pad, arrays), **framed))[:count]


def as_boxes(array):
    return [tuple(int(v) for v in box) for box in array]


def cases(maps, sizes, frames):
    """(map, (W, H), frame) records, sizes and frames as Python ints."""
    for grid, size, frame in zip(maps, sizes.tolist(), frames.tolist()):
        yield grid, tuple(size), tuple(frame)


# ------------------------------------------------------------------------------------------------- frames


@pytest.mark.parametrize("shape, base", GRIDS)
def test_no_frame_and_the_whole_image_give_the_published_box(shape, base):
    maps, sizes, _ = random_cases(1, shape, base, 30)
    whole = np.concatenate([np.zeros_like(sizes), sizes], axis=1)
    records = list(cases(maps, sizes, whole))
    expected = [published_select_bbox(grid, size, base, exact_centre=True) for grid, size, _ in records]
    assert [select_bbox(grid, size, base) for grid, size, _ in records] == expected
    assert [select_bbox(grid, size, base, frame) for grid, size, frame in records] == expected
    assert as_boxes(on_device(select_bbox_jax, maps, sizes, base_size=base)) == expected
    assert as_boxes(on_device(select_bbox_jax, maps, sizes, frame=whole, base_size=base)) == expected
    several = [select_boxes(grid, size, base, 2) for grid, size, _ in records]
    assert [select_boxes(grid, size, base, 2, frame) for grid, size, frame in records] == several
    assert [as_boxes(b) for b in on_device(select_boxes_jax, maps, sizes, base_size=base, regions=2)] == several


def test_a_frame_moves_the_box_into_it_and_the_clamp_is_to_the_image():
    # A 1200x600 image whose map covers the centre square (300, 0, 900, 600): 25-px cells, so the peak in the
    # map's first column lies at x 300..325. Without the frame the same map puts the box at the image's left edge.
    grid = np.zeros((24, 24), np.float32)
    grid[12, 0] = 1.0
    size, frame = (1200, 600), (300, 0, 900, 600)
    assert select_bbox(grid, size, 336)[0] == 0
    box = select_bbox(grid, size, 336, frame)
    assert 200 < box[0] < 300 and box[2] >= 325 and box[2] - box[0] == 336
    device = on_device(select_bbox_jax, grid[None], np.array([size]), frame=np.array([frame]), base_size=336)
    assert as_boxes(device) == [box]
    # the last column of a frame on the image's left half: the box reaches past the frame (x 600) into the image
    grid = np.zeros((24, 24), np.float32)
    grid[12, 23] = 1.0
    box = select_bbox(grid, size, 336, (0, 0, 600, 600))
    assert box[0] <= 575 and box[2] > 600 and box[2] - box[0] == 336
    # a frame that even r = 1 covers cannot tell its parts apart: the whole image, as without a frame
    assert select_bbox(grid, (1000, 300), 336, (350, 0, 650, 300)) == (0, 0, 1000, 300)


def test_frames_are_validated():
    grid = np.ones((24, 24), np.float32)
    for frame in [(0, 0, 101, 100), (-1, 0, 50, 50), (10, 0, 10, 50), (0, 0, 50), (0, 0, 50.5, 50)]:
        with pytest.raises(ValueError, match="frame"):
            select_bbox(grid, (100, 100), 336, frame)
        with pytest.raises(ValueError, match="frame"):
            select_boxes(grid, (100, 100), 336, 2, frame)
        with pytest.raises(ValueError, match="frame"):
            suppress(grid, (0, 0, 10, 10), (100, 100), frame)


# --------------------------------------------------------------------------------------------- regions


@pytest.mark.parametrize(
    "shape, base, regions",
    [((24, 24), 336, 1), ((24, 24), 336, 2), ((24, 24), 336, 3), ((16, 16), 224, 3), ((6, 8), 336, 3)],
)
def test_device_equals_host(shape, base, regions):
    maps, sizes, frames = random_cases(2 + regions, shape, base, 48)
    host = [select_boxes(grid, size, base, regions, frame) for grid, size, frame in cases(maps, sizes, frames)]
    device = on_device(select_boxes_jax, maps, sizes, frame=frames, base_size=base, regions=regions)
    assert [as_boxes(b) for b in device] == host
    assert all(len(b) == regions for b in host)
    first = [select_bbox(grid, size, base, frame) for grid, size, frame in cases(maps, sizes, frames)]
    assert [b[0] for b in host] == first
    if regions == 1:
        assert as_boxes(on_device(select_bbox_jax, maps, sizes, frame=frames, base_size=base)) == first
    else:  # suppression moves the later boxes (not those of flat maps, nor of images the window covers)
        assert sum(b[1] != b[0] for b in host) > len(host) // 4


def test_vmap_over_different_image_sizes_equals_each_record_alone():
    maps, sizes, frames = random_cases(7, (24, 24), 336, 8)
    assert len({tuple(s) for s in sizes.tolist()}) == 8
    batch = on_device(select_boxes_jax, maps, sizes, frame=frames, base_size=336, regions=2)
    single = jax.jit(select_boxes_jax, static_argnames=("base_size", "regions"))
    for i in range(8):
        record = single(jnp.asarray(maps[i]), jnp.asarray(sizes[i]), 336, regions=2, frame=jnp.asarray(frames[i]))
        np.testing.assert_array_equal(np.asarray(record), batch[i])


def test_box_k_is_the_selection_on_the_map_suppressed_by_the_boxes_before_it():
    maps, sizes, frames = random_cases(11, (24, 24), 336, 30)
    for grid, size, frame in cases(maps, sizes, frames):
        found = select_boxes(grid, size, 336, 3, frame)
        suppressed = grid
        for k, box in enumerate(found):
            assert box == select_bbox(suppressed, size, 336, frame), k
            suppressed = suppress(suppressed, box, size, frame)


def cell_extents(cells, origin, side):
    """Float [start, end) of each cell along an axis of the frame."""
    return [(origin + j * side / cells, origin + (j + 1) * side / cells) for j in range(cells)]


def brute_force_hit(shape, box, frame):
    rows, cols = shape
    left, top, right, bottom = box
    xs = cell_extents(cols, frame[0], frame[2] - frame[0])
    ys = cell_extents(rows, frame[1], frame[3] - frame[1])
    return np.array(
        [[max(x0, left) < min(x1, right) and max(y0, top) < min(y1, bottom) for x0, x1 in xs] for y0, y1 in ys]
    )


def random_box(rng, size, frame, shape):
    """Boxes whose edges are often exactly cell edges (frames a multiple of the grid make many), or anywhere."""
    width, height = size
    edges_x = [frame[0] + j * (frame[2] - frame[0]) // shape[1] for j in range(shape[1] + 1)]
    edges_y = [frame[1] + j * (frame[3] - frame[1]) // shape[0] for j in range(shape[0] + 1)]

    def coordinate(edges, side):
        return int(rng.choice(edges)) if rng.random() < 0.6 else int(rng.integers(0, side + 1))

    x = sorted([coordinate(edges_x, width), coordinate(edges_x, width)])
    y = sorted([coordinate(edges_y, height), coordinate(edges_y, height)])
    return x[0], y[0], x[1], y[1]


@pytest.mark.parametrize("shape", [(3, 4), (5, 2), (7, 7)])
def test_suppressed_cells_are_exactly_those_meeting_the_box(shape):
    rng = np.random.default_rng(sum(shape))
    grids, boxes, sizes, frames, expected = [], [], [], [], []
    for i in range(60):
        if i % 2:  # sides that are multiples of the grid: cell edges on whole pixels
            size = int(rng.integers(1, 5)) * shape[1] * 7, int(rng.integers(1, 5)) * shape[0] * 5
        else:
            size = int(rng.integers(5, 200)), int(rng.integers(5, 200))
        frame = random_frame(rng, size, i % 3)
        box = (0, 0, *size) if i % 10 == 0 else random_box(rng, size, frame, shape)
        grid = rng.standard_normal(shape).astype(np.float32)
        hit = brute_force_hit(shape, box, frame)
        result = suppress(grid, box, size, frame)
        np.testing.assert_array_equal(result, np.where(hit, grid.min(), grid))
        grids.append(grid), boxes.append(box), sizes.append(size), frames.append(frame), expected.append(result)
    counts = [brute_force_hit(shape, b, f).sum() for b, f in zip(boxes, frames)]
    assert 0 in counts and shape[0] * shape[1] in counts and len(set(counts)) > 3  # none, all, and partial boxes
    device = on_device(suppress_jax, np.stack(grids), np.array(boxes), np.array(sizes), np.array(frames))
    np.testing.assert_array_equal(device, np.stack(expected))


def two_peaks(strong=(5, 5), weak=(18, 17)):
    rows, cols = np.mgrid[:24, :24]
    def blob(y, x):
        return np.exp(-((rows - y) ** 2 + (cols - x) ** 2) / 2.0)

    return (blob(*strong) + 0.7 * blob(*weak)).astype(np.float32)


def test_two_separated_peaks_give_two_boxes_one_on_each():
    grid, size = two_peaks(), (1500, 1000)
    strong, weak = (5.5 * 1500 / 24, 5.5 * 1000 / 24), (17.5 * 1500 / 24, 18.5 * 1000 / 24)  # the peak cells' centres

    def holds(box, point):
        return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]

    first, second = select_boxes(grid, size, 336, 2)
    assert holds(first, strong) and not holds(first, weak)
    assert holds(second, weak) and not holds(second, strong)
    assert first[2] <= second[0] or second[2] <= first[0] or first[3] <= second[1] or second[3] <= first[1]
    device = on_device(select_boxes_jax, grid[None], np.array([size]), base_size=336, regions=2)
    assert as_boxes(device[0]) == [first, second]
    # the second peak is a real share of the mass the first box leaves out; a single peak leaves almost none
    assert 0.25 < outside_mass(grid, first, size) < 0.6
    assert outside_mass(two_peaks(weak=(5, 5)), first, size) < 0.05


def test_select_boxes_rejects_bad_regions():
    grid = np.ones((24, 24), np.float32)
    for regions in (0, -1, 1.5, "2", None):
        with pytest.raises(ValueError, match="regions"):
            select_boxes(grid, (500, 500), 336, regions)
        with pytest.raises(ValueError, match="regions"):
            select_boxes_jax(jnp.asarray(grid), jnp.array([500, 500]), 336, regions)


# ------------------------------------------------------------------------------------------- outside mass


@pytest.mark.parametrize("shape, base", GRIDS)
def test_outside_mass_device_equals_host_and_lies_in_0_1(shape, base):
    maps, sizes, frames = random_cases(5, shape, base, 40)
    rng = np.random.default_rng(6)
    boxes = np.array([random_box(rng, size, frame, shape) for _, size, frame in cases(maps, sizes, frames)], np.int32)
    host = np.array([outside_mass(grid, tuple(box), size, frame)
                     for (grid, size, frame), box in zip(cases(maps, sizes, frames), boxes.tolist())], np.float32)
    np.testing.assert_array_equal(on_device(outside_mass_jax, maps, boxes, sizes, frames), host)
    assert ((host >= 0) & (host <= 1)).all()
    assert ((host > 0) & (host < 1)).sum() > len(host) // 2


def test_outside_mass_of_maps_inside_and_outside_the_box():
    size, box = (400, 400), (0, 0, 200, 200)  # a 4x4 map: the box meets the top-left 2x2 cells
    hit = np.zeros((4, 4), bool)
    hit[:2, :2] = True
    inside = np.where(hit, 1.0, -3.0).astype(np.float32)  # negative values carry no mass
    outside = np.where(hit, -3.0, 2.0).astype(np.float32)
    flat = np.ones((4, 4), np.float32)
    for grid, expected in [(inside, 0.0), (outside, 1.0), (flat, 0.75), (-flat, 0.0), (0 * flat, 0.0)]:
        assert outside_mass(grid, box, size) == expected
        assert float(outside_mass_jax(jnp.asarray(grid), jnp.array(box), jnp.array(size))) == expected
    # a frame on the right half: the same box now meets no cell, so all the mass is outside it
    assert outside_mass(inside, box, size, (200, 0, 400, 400)) == 1.0


# ------------------------------------------------------------------------------------------------ overlay


def test_overlay_blends_inside_the_frame_only_and_draws_every_box():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, (60, 120, 3), dtype=np.uint8)  # no pure red: drawn edges are recognisable
    image, importance, frame = Image.fromarray(pixels), rng.random((4, 4)).astype(np.float32), (30, 0, 90, 60)
    result = np.asarray(overlay(image, importance, frame=frame))
    np.testing.assert_array_equal(result[:, :30], pixels[:, :30])
    np.testing.assert_array_equal(result[:, 90:], pixels[:, 90:])
    assert (result[:, 30:90] != pixels[:, 30:90]).any(axis=-1).mean() > 0.9
    alone = np.asarray(overlay(image.crop(frame), importance))  # the frame, blended as an image of its own
    np.testing.assert_array_equal(result[:, 30:90], alone)
    boxes = [(2, 2, 40, 30), (70, 20, 118, 58)]
    drawn = np.asarray(overlay(image, importance, boxes, frame=frame))
    red = (drawn == (255, 0, 0)).all(axis=-1)
    for left, top, right, bottom in boxes:
        assert red[top, left:right].all() and red[top:bottom, left].all()
    assert not red[45:, :60].any()  # beneath the first box and left of the second
    one = (np.asarray(overlay(image, importance, boxes[1], frame=frame)) == (255, 0, 0)).all(axis=-1)
    assert one[20, 70:118].all() and not one[2, 2:40].any()
