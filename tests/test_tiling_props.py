"""Property tests of tile plans (qairn.engine.tiling) and of tiled restoration in the Restorer, over
seeded random image sizes, tile sizes and overlaps."""

import numpy as np
import pytest
import torch
from conftest import lively_model

import qairn
from qairn.engine.tiling import ALIGN, ceil_to, plan_tiles

SCALES = (1, 2, 4)  # the gamma maps' resolutions


def random_cases(seed: int, count: int, max_side: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, max_side + 1, 2))
        tile = None if rng.random() < 0.1 else int(rng.integers(1, 700))
        overlap = int(rng.integers(0, 300))
        yield h, w, tile, overlap


def check_plan(h: int, w: int, tile: int | None, overlap: int, plan=None) -> None:
    plan = plan or plan_tiles(h, w, tile, overlap)
    hp, wp = ceil_to(h, ALIGN), ceil_to(w, ALIGN)
    assert (plan.rows.length, plan.cols.length) == (hp, wp)
    for ax, length in ((plan.rows, hp), (plan.cols, wp)):
        want_tile = length if tile is None else min(max(ALIGN, tile // ALIGN * ALIGN), length)
        assert ax.tile == want_tile
        starts = list(ax.starts)
        # Tiles lie inside the padded image, on the 16 grid, first at 0 and last at the end.
        assert starts[0] == 0 and starts[-1] + ax.tile == length
        assert all(s % ALIGN == 0 and 0 <= s <= length - ax.tile for s in starts)
        assert starts == sorted(set(starts))
        # Neighbours overlap by at least the overlap asked for (taken in steps of 16).
        assert all(ax.tile - (b - a) >= ceil_to(overlap, ALIGN) for a, b in zip(starts, starts[1:]))
        # Each core lies inside its own tile, and the cores partition the padded axis in order.
        assert len(ax.cores) == len(starts)
        assert all(s <= a < b <= s + ax.tile for (a, b), s in zip(ax.cores, starts))
        assert [c[0] for c in ax.cores[1:]] == [c[1] for c in ax.cores[:-1]]
        assert ax.cores[0][0] == 0 and ax.cores[-1][1] == length
        # The blend weights are a partition of unity over the padded axis.
        acc = np.zeros(length)
        for s, wgt in zip(starts, ax.weights):
            assert wgt.shape == (ax.tile,) and (wgt >= 0).all()
            acc[s : s + ax.tile] += wgt
        np.testing.assert_allclose(acc, 1.0, atol=1e-6)
    # Every pixel of the image, at each gamma scale, is in exactly one tile's core (clipped to the
    # image), so sums over the cores are sums over the image; each core box lies inside its tile.
    for s in SCALES:
        cover = np.zeros((-(-h // s), -(-w // s)), np.uint8)
        for i, j, y0, x0 in plan.tiles:
            c0, c1, d0, d1 = plan.core(i, j, s)
            assert 0 <= c0 <= c1 <= plan.rows.tile // s and 0 <= d0 <= d1 <= plan.cols.tile // s
            cover[y0 // s + c0 : y0 // s + c1, x0 // s + d0 : x0 // s + d1] += 1
        assert (cover == 1).all(), (h, w, tile, overlap, s)


def test_random_plans_partition_the_image():
    checked = refused = 0
    for h, w, tile, overlap in random_cases(seed=0, count=300, max_side=1500):
        hp, wp = ceil_to(h, ALIGN), ceil_to(w, ALIGN)
        t = None if tile is None else max(ALIGN, tile // ALIGN * ALIGN)
        if t is not None and (t < hp or t < wp) and t <= ceil_to(overlap, ALIGN):
            with pytest.raises(ValueError, match="larger than the overlap"):
                plan_tiles(h, w, tile, overlap)
            refused += 1
            continue
        check_plan(h, w, tile, overlap)
        checked += 1
    assert checked > 150 and refused > 10  # both branches really ran


def test_random_small_plans_with_many_tiles():
    """Small tiles and overlaps on small images: many tiles, narrowed seams, one-pixel images."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 400, 2))
        tile = int(rng.integers(2, 9)) * ALIGN
        overlap = int(rng.integers(0, tile - ALIGN + 1))
        check_plan(h, w, tile, overlap)


def test_check_plan_can_fail():
    """The checker catches cores that overlap (a broken split) or leave a gap, so its passes mean
    something."""
    import dataclasses

    plan = plan_tiles(300, 200, 128, 32)
    (a, b), rest = plan.rows.cores[0], plan.rows.cores[1:]
    for first in ((a, b + ALIGN), (a, b - ALIGN)):
        broken = dataclasses.replace(plan, rows=dataclasses.replace(plan.rows, cores=(first, *rest)))
        with pytest.raises(AssertionError):
            check_plan(300, 200, 128, 32, broken)
    check_plan(300, 200, 128, 32, plan)


# ---- the Restorer: tiled equals whole where every tile sees its pixels' whole receptive field ---------
@pytest.fixture(scope="module")
def small_model():
    """The tiny preset without residual blocks: a receptive field of about 40 pixels, so an overlap a few
    times that makes tiled inference exact while tiles stay small for the CPU."""
    return lively_model("tiny", seed=3, nb=0)


def receptive_radius(model) -> int:
    """How far (pixels) one input pixel reaches in the outputs (image and every gamma), measured."""
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    poked = x.clone()
    poked[..., 128, 128] += 0.5
    with torch.no_grad():
        (y0, g0), (y1, g1) = model(x), model(poked)
    radius = 0
    for a, b, s in zip([y0, *g0], [y1, *g1], (1, *SCALES)):
        ys, xs = torch.nonzero((a - b).abs().amax(dim=(0, 1)) > 0, as_tuple=True)
        reach = [128 - int(ys.min()) * s, (int(ys.max()) + 1) * s - 128, 128 - int(xs.min()) * s]
        radius = max(radius, *reach, (int(xs.max()) + 1) * s - 128)
    return radius


def restore_both(model, x, tile, overlap):
    whole = qairn.Restorer(model=model, device="cpu", tile=None, p=2.0)
    tiled = qairn.Restorer(model=model, device="cpu", tile=tile, overlap=overlap, p=2.0, tile_batch=8)
    return whole.restore_tensor(x, return_maps=True), tiled.restore_tensor(x, return_maps=True)


def test_tiled_restoration_equals_whole_with_enough_overlap(small_model):
    """A pixel's blend uses tiles at least overlap/4 from their edges and its core at least
    overlap/2 - 15: with overlap >= 4 x the receptive radius, tiles and the whole image compute the same
    numbers (up to float rounding), the maps agree, and the quality pooled over the cores equals the
    whole-image pooling."""
    radius = receptive_radius(small_model)
    assert 16 <= radius <= 64, radius  # the model is what this test was sized for
    need = ceil_to(4 * radius + 4, ALIGN)
    rng = np.random.default_rng(4)
    tiles_seen = 0
    for _ in range(4):
        overlap = need + ALIGN * int(rng.integers(0, 2))
        tile = overlap + ALIGN * int(rng.integers(3, 8))
        h, w = (int(v) for v in rng.integers(tile // 2, tile + 160, 2))
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
        (yw, qw, mw), (yt, qt, mt) = restore_both(small_model, x, tile, overlap)
        tiles_seen += plan_tiles(h, w, tile, overlap).count
        assert yt.shape == yw.shape == x.shape
        assert (yt - yw).abs().max() < 1e-5, (h, w, tile, overlap)
        for a, b in zip(mw, mt):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-5
        for k in qw:
            assert float(qt[k]) == pytest.approx(float(qw[k]), rel=1e-5, abs=0)
            pooled = float(mw[int(k[1]) - 1].double().pow(2).mean().sqrt())  # whole-image pooling by hand
            assert float(qt[k]) == pytest.approx(pooled, rel=1e-5, abs=0)
    assert tiles_seen >= 12  # the cases really tiled


def test_too_little_overlap_is_not_exact(small_model):
    """The check above can fail: with tiles cut at their edges (overlap 0) the pixels near a seam miss
    context, and the image and maps differ by far more than its tolerance."""
    x = torch.rand(1, 3, 200, 230, generator=torch.Generator().manual_seed(5))
    (yw, qw, mw), (yt, qt, mt) = restore_both(small_model, x, 96, 0)
    assert (yt - yw).abs().max() > 1e-4
    assert min((a - b).abs().max() for a, b in zip(mw, mt)) > 1e-3


def test_edge_shapes_and_image_kinds_tile_exactly(small_model):
    """The exactness above for what restore() takes: one-pixel rows and columns, an image smaller than
    its tile, more tiles per batch than tiles, gray, 16-bit, float, BGR and alpha inputs (alpha passed
    through untouched), each tiled against its whole-image restore."""
    radius = receptive_radius(small_model)
    overlap = ceil_to(4 * radius + 4, ALIGN)
    tile = overlap + 3 * ALIGN
    rng = np.random.default_rng(6)
    base = rng.random((tile + 37, tile + 21, 4))
    cases = [
        ((base[:1, :, :3] * 255).round().astype(np.uint8), "rgb", 4),  # one row, two tiles
        ((base[:, :1, :3] * 255).round().astype(np.uint8), "rgb", 4),  # one column
        ((base[:17, :9, :3] * 255).round().astype(np.uint8), "rgb", 4),  # smaller than the tile
        ((base[..., 0] * 65535).round().astype(np.uint16), "rgb", 64),  # gray 16-bit; 64 > 4 tiles
        (base[..., :3].astype(np.float32), "bgr", 2),
        ((base * 255).round().astype(np.uint8), "rgb", 4),  # RGBA
        ((base[..., 2:] * 65535).round().astype(np.uint16), "rgb", 3),  # gray + alpha, 16-bit
    ]
    whole = qairn.Restorer(model=small_model, device="cpu", tile=None, p=2.0)
    tiled_once = False
    for img, order, batch in cases:
        tiled = qairn.Restorer(
            model=small_model, device="cpu", tile=tile, overlap=overlap, p=2.0, tile_batch=batch
        )
        a = whole.restore(img, return_maps=True, channel_order=order)
        b = tiled.restore(img, return_maps=True, channel_order=order)
        tiled_once |= plan_tiles(*img.shape[:2], tile, overlap).count > 1
        assert b.image.shape == img.shape and b.image.dtype == img.dtype
        # One code at most: the same float, a hair apart, may round either side of a half.
        step = 1e-6 if img.dtype.kind == "f" else 1
        np.testing.assert_allclose(
            b.image.astype(np.float64), a.image, atol=step, rtol=0, err_msg=str(img.shape)
        )
        if img.ndim == 3 and img.shape[2] in (2, 4):
            np.testing.assert_array_equal(b.image[..., -1], img[..., -1])
        for k in a.quality:
            assert b.quality[k] == pytest.approx(a.quality[k], rel=1e-5, abs=0)
        for s, ma, mb in zip(SCALES, a.maps, b.maps):
            assert ma.shape == mb.shape == (-(-img.shape[0] // s), -(-img.shape[1] // s))
            np.testing.assert_allclose(mb, ma, atol=1e-5, rtol=0)
    assert tiled_once
