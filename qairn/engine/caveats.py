"""Why a quality score says little of an image: one rule for `qairn score` and `restore` (a warning),
the library's Result.info["caveat"] and `qairn video`'s trace (a column)."""

from __future__ import annotations

import numpy as np
import torch

from qairn.engine.tiling import ALIGN


def caveat(h: int, w: int, flat: bool) -> str | None:
    """Why the Q1..Q3 of an h x w image (flat: every pixel one colour) say little of it, or None.

    Under the network's stride (16) on a side, most of what the gates see is the replicate padding: a
    1x1 image scored Q1 0.45, Q2 0.53, Q3 0.60 with the shipped weights, whatever its colour. A flat
    image (one colour; its alpha aside) holds nothing to judge, yet scored like a photo: flat black
    Q2 0.768, above every LIVE1 JPEG tried, flat white 0.643. Black fades and title cards are common
    in video."""
    if min(h, w) < ALIGN:
        return f"{w}x{h} pixels, under the network's {ALIGN} on a side: its Q1..Q3 mostly measure the padding"
    if flat:
        return "every pixel has one colour: a flat image holds nothing to judge, its Q1..Q3 say nothing of it"
    return None


def score_caveat(img: np.ndarray) -> str | None:
    """caveat() of a numpy image as Restorer.restore takes it (HxW, HxWx1, HxWx2 gray + alpha, HxWx3,
    HxWx4 RGBA), its alpha aside: a flat colour under a varied alpha is flat too."""
    colour = img if img.ndim == 2 else img[..., : 1 if img.shape[2] <= 2 else 3]
    return caveat(*img.shape[:2], bool(colour.min() == colour.max()))


def flat_frames(*batches: torch.Tensor) -> torch.Tensor:
    """(N,) bool, on the batches' device: whether each frame has one value in every one of batches,
    each (N, ...): a stack of RGB frames, or a frame's y, u and v planes. On a GPU all frames at once,
    left there (deciding anything on the host would sync). On the CPU frame by frame: aminmax(dim=1)
    of four 1920x1080 uint8 lumas took 10 ms, four single aminmax 0.4 ms (one thread)."""
    if batches[0].device.type != "cpu":
        flat = torch.ones(batches[0].shape[0], dtype=torch.bool, device=batches[0].device)
        for b in batches:
            lo, hi = torch.aminmax(b.flatten(1), dim=1)
            flat &= lo == hi
        return flat
    return torch.tensor([all(one_value(b[i]) for b in batches) for i in range(batches[0].shape[0])])


def one_value(frame: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(frame)
    return bool(lo == hi)
