"""Tile plans for high-resolution inference.

The image is first padded (replicate) to a multiple of the network stride, exactly as a
whole-image forward would pad it; tiles are then cut from the padded image, all the same size, at
origins on the 8x8 JPEG grid and the network stride (multiples of 16). Neighbouring tiles overlap by
at least `overlap` pixels. Inside each overlap the outer quarter on either side is dropped (those
pixels saw the least context) and a linear ramp blends the middle half, so seams are blended rather
than cut. For quality pooling every pixel belongs to exactly one tile's core (the overlap is split at
its 16-aligned middle), so summing gamma**p over cores gives the whole-image pooled value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALIGN = 16  # lcm of the 8x8 JPEG grid and the network stride


def ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def aligned_tile(tile: int) -> int:
    """The tile that runs when `tile` is asked for: whole steps of ALIGN, one step at least."""
    return max(ALIGN, tile // ALIGN * ALIGN)


@dataclass(frozen=True)
class AxisPlan:
    length: int  # padded length (multiple of ALIGN)
    tile: int  # tile length along this axis (== length when one tile)
    starts: tuple[int, ...]
    cores: tuple[tuple[int, int], ...]  # [a, b) of each tile's core, in padded image coordinates
    weights: tuple[np.ndarray, ...]  # blend weight profile of each tile (length `tile`)


def plan_axis(length: int, tile: int, overlap: int) -> AxisPlan:
    """Place tiles along one axis of `length` pixels (already a multiple of ALIGN)."""
    assert length % ALIGN == 0 and tile % ALIGN == 0
    if length > tile and tile - overlap < ALIGN:  # (plan_tiles rounds and refuses these first)
        # Tiles that advance less than one 16-px step would search for their count forever.
        raise ValueError(f"tile {tile} must exceed the overlap {overlap} by {ALIGN} or more")
    if length <= tile:
        return AxisPlan(length, length, (0,), ((0, length),), (np.ones(length, np.float32),))
    last = length - tile
    n = 2
    while True:  # fewest tiles whose 16-aligned, evenly spread origins keep every overlap >= overlap
        starts = tuple(sorted({int(round(i * last / (n - 1) / ALIGN)) * ALIGN for i in range(n)}))
        if all(b - a <= tile - overlap for a, b in zip(starts, starts[1:])):
            break
        n += 1
    # Seam i (between tiles i and i+1) blends over the middle half of their overlap. Where rounding the
    # origins to 16 makes tiles i and i+2 overlap too, the seams are narrowed so that they never cross;
    # then tile i's weight, "past seam i-1 and not yet past seam i", sums to exactly 1 over the tiles.
    ends = [s + tile for s in starts]
    centres = [(s1 + e0) / 2 for s1, e0 in zip(starts[1:], ends)]
    halves = []
    for i, c in enumerate(centres):
        h = (ends[i] - starts[i + 1]) / 4
        if i > 0:
            h = min(h, (c - centres[i - 1]) / 2)
        if i + 1 < len(centres):
            h = min(h, (centres[i + 1] - c) / 2)
        halves.append(h)

    def past(i: int, x: np.ndarray) -> np.ndarray:  # 0 before seam i, a linear ramp across it, 1 after
        if i < 0:
            return np.ones_like(x)
        if i >= len(centres):
            return np.zeros_like(x)
        if halves[i] == 0:  # tiles that only touch: a hard cut at the shared edge
            return (x >= centres[i]).astype(np.float64)
        return np.clip((x - (centres[i] - halves[i])) / (2 * halves[i]), 0.0, 1.0)

    weights = []
    for i, s0 in enumerate(starts):
        x = np.arange(s0, s0 + tile, dtype=np.float64) + 0.5  # pixel centres
        weights.append((past(i - 1, x) * (1.0 - past(i, x))).astype(np.float32))
    cores = []
    core_start = 0
    for s1, e0 in zip(starts[1:], ends):
        split = s1 + ((e0 - s1) // 2) // ALIGN * ALIGN
        cores.append((core_start, split))
        core_start = split
    cores.append((core_start, length))
    return AxisPlan(length, tile, starts, tuple(cores), tuple(weights))


@dataclass(frozen=True)
class TilePlan:
    height: int  # original image size
    width: int
    rows: AxisPlan
    cols: AxisPlan

    @property
    def tiles(self) -> list[tuple[int, int, int, int]]:
        """(tile row index, tile col index, y0, x0) of every tile, row-major."""
        return [(i, j, y, x) for i, y in enumerate(self.rows.starts) for j, x in enumerate(self.cols.starts)]

    @property
    def count(self) -> int:
        return len(self.rows.starts) * len(self.cols.starts)

    def weight(self, i: int, j: int) -> np.ndarray:
        return np.outer(self.rows.weights[i], self.cols.weights[j])

    def core(self, i: int, j: int, scale: int = 1) -> tuple[int, int, int, int]:
        """Core box (y0, y1, x0, x1) of tile (i, j) in tile-local coordinates at 1/scale resolution,
        clipped to the original (unpadded) image so padded pixels never enter the pooled quality."""
        (ya, yb), (xa, xb) = self.rows.cores[i], self.cols.cores[j]
        y0, x0 = self.rows.starts[i], self.cols.starts[j]
        yb, xb = min(yb, self.height), min(xb, self.width)

        def s(v):  # ceil division: a gamma pixel at 1/scale covers image pixels [s*v, s*v + s)
            return -(-v // scale)

        return s(ya - y0), s(yb - y0), s(xa - x0), s(xb - x0)


def plan_tiles(height: int, width: int, tile: int | None, overlap: int) -> TilePlan:
    """Plan tiles for an image; tile=None (or a tile covering the image) gives one whole-image tile."""
    hp, wp = ceil_to(height, ALIGN), ceil_to(width, ALIGN)
    if tile is None:
        tile_h, tile_w = hp, wp
    else:
        tile = aligned_tile(tile)
        overlap = ceil_to(max(overlap, 0), ALIGN)
        if tile < hp or tile < wp:
            if tile <= overlap:
                raise ValueError(f"tile {tile} must be larger than the overlap {overlap}")
        tile_h, tile_w = min(tile, hp), min(tile, wp)
    return TilePlan(height, width, plan_axis(hp, tile_h, overlap), plan_axis(wp, tile_w, overlap))


def zero_or_more(text: str, expected: str, name: str) -> int:
    """An option's whole number, 0 or more (pixels, images), or argparse's error naming what was
    expected: -4 is one line at parse time, not a quiet "all" or an error after the model loads."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{name} must not be negative, got {value}")
    return value


def tile_arg(text: str) -> int | str | None:
    """The --tile option: "auto", 0 (whole images) or a tile size in pixels."""
    if text == "auto":
        return "auto"
    return zero_or_more(text, "auto, 0 or a tile size in pixels", "the tile size") or None


def overlap_arg(text: str) -> int:
    """The --overlap option: pixels, 0 or more. -4 was refused only once the model had loaded, as
    'overlap must be an int >= 0', naming no option."""
    return zero_or_more(text, "an overlap in pixels (0 or more)", "the overlap")
