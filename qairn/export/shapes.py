"""Shape plans for engines with fixed input shapes (static TensorRT engines, static ONNX files).

A static engine runs one (N,3,H,W). The Restorer hands backends equal tiles (`fixed_tile`), but the
last batch of tiles can be short and an image smaller than the tile arrives whole, so calls are fitted:
a short batch is filled up with copies of its last tile, a larger one is cut into engine-sized chunks,
and an input smaller than the engine is replicate-padded at the bottom/right (outputs cropped back).
Padding changes outputs only within the network's receptive field of the padded border, as tiling
does; an exact-size engine is preferred whenever one exists. A call that fits no engine gets a new
one, built for its own shape.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
SCALES = (1, 2, 4)  # gamma1, gamma2, gamma3 resolution divisors
Shape = tuple[int, int, int]  # (N, H, W); the channel count is always 3


def profile_shapes(shape: Shape, dynamic: bool = False, max_shape: Shape | None = None):
    """TensorRT optimization profile (min, opt, max), each (N,3,H,W), for the tile shape `shape`.
    Static (default): min = opt = max = shape, which lets TensorRT pick kernels for exactly that size.
    Dynamic: any batch from 1 and any size from 16x16 up to max_shape (default: the batch of
    `shape` and 2048x2048 or the tile if larger), tuned for `shape`."""
    n, h, w = shape
    opt = (n, 3, h, w)
    if not dynamic:
        return opt, opt, opt
    mn, mh, mw = max_shape if max_shape is not None else (n, max(h, 2048), max(w, 2048))
    if mn < n or mh < h or mw < w:
        raise ValueError(f"max shape {(mn, mh, mw)} is smaller than the tile shape {shape}")
    if mh % 16 or mw % 16:
        raise ValueError(f"max shape {(mn, mh, mw)}: H and W must be multiples of 16")
    return (1, 3, 16, 16), opt, (mn, 3, mh, mw)


def fits(shape: tuple, profile) -> bool:
    """Does an (N,3,H,W) input lie inside a (min, opt, max) profile?"""
    lo, _, hi = profile
    return all(a <= s <= b for a, s, b in zip(lo, shape, hi))


class FixedShapeRunner:
    """Calls of any (n,3,h,w) with h, w multiples of 16, run on runners of fixed (N,H,W) shapes.

    build(shape) returns a callable taking exactly (N,3,H,W) float32 and returning
    (restored (N,3,H,W), [gamma1, gamma2, gamma3]).
    """

    def __init__(self, build: Callable[[Shape], Callable], shape: Shape | None = None):
        self.build = build
        self.runners: dict[Shape, Callable] = {}
        # One build at a time: two threads needing a new shape at once both built it, and the engine
        # dropped from the table held its GPU memory, unclosed, until the garbage collector came.
        self.building = threading.Lock()
        if shape is not None:
            self.runner_for(tuple(shape))

    def runner_for(self, shape: Shape) -> Callable:
        if shape not in self.runners:
            with self.building:
                if shape not in self.runners:  # not built by another thread while this one waited
                    log.info("preparing an engine for N,H,W = %s", shape)
                    self.runners[shape] = self.build(shape)
        return self.runners[shape]

    def pick(self, n: int, h: int, w: int) -> Shape:
        exact = [s for s in self.runners if s[1:] == (h, w)]
        if exact:
            return max(exact)  # the largest batch: fewest chunks
        fitting = [s for s in self.runners if s[1] >= h and s[2] >= w]
        if fitting:
            return min(fitting, key=lambda s: (s[1] * s[2], -s[0]))
        return (n, h, w)

    def __call__(self, x: torch.Tensor):
        n, _, h, w = x.shape
        shape = self.pick(n, h, w)
        run = self.runner_for(shape)
        big, th, tw = shape
        if (th, tw) != (h, w):
            x = F.pad(x, (0, tw - w, 0, th - h), mode="replicate")
        ys, maps = [], [[], [], []]
        for b in range(0, n, big):
            chunk = x[b : b + big]
            k = chunk.shape[0]
            if k < big:
                chunk = torch.cat([chunk, chunk[-1:].expand(big - k, -1, -1, -1)])
            y, gammas = run(chunk.contiguous())
            ys.append(y[:k])
            for m, g in zip(maps, gammas):
                m.append(g[:k])
        y = torch.cat(ys)[..., :h, :w]
        gammas = [torch.cat(m)[..., : h // s, : w // s] for m, s in zip(maps, SCALES)]
        return y, gammas
