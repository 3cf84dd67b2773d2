"""Why a quality score says little of an image: one rule for `qairn score` and `restore` (a warning),
the library's Result.info["caveat"] and `qairn video`'s trace (a column)."""

from __future__ import annotations

import numpy as np
import torch

from qairn.engine.tiling import ALIGN

# Flat: every channel's standard deviation at most 1 code of 8-bit full scale (4 codes at 10 bits, 257 at
# 16, 1/255 for floats in [0, 1]). Measured (population std, 8-bit codes): black, mid-grey and white
# frames coded after a LIVE1 photo (320x240, 640x480; x264 crf 18/28/35, VP9 default and crf 31) came back
# with a few samples 1 or 2 codes off (5 in RGB), std at most 0.11 per Y'CbCr plane and 0.31 per RGB
# channel (VP9 crf 50 white: 0.80 and 0.91); every LIVE1 image has a channel of std 40 or more (RGB;
# Y'CbCr: 32.8), the darkest 64x64 crop of each one of 3.0 or more (statue; Y'CbCr: 2.0). One exact
# colour missed the coded frames; max - min would be undone by a single stray sample, the std is not.
FLAT_STD = 1 / 255  # of the sample range


def caveat(h: int, w: int, flat: bool) -> str | None:
    """Why the Q1..Q3 of an h x w image (flat: see flat_frames) say little of it, or None.

    Under the network's stride (16) on a side, most of what the gates see is the replicate padding: a
    1x1 image scored Q1 0.45, Q2 0.53, Q3 0.60 with the shipped weights in grey or white, 0.57, 0.63,
    0.59 in black. A flat image (one colour, give or take a code; its alpha aside) holds nothing to
    judge, yet scored like a photo: flat black Q2 0.768, above every LIVE1 JPEG tried, flat white
    0.643. Black fades are common in video, and a lossy codec gives them back a few codes off here and
    there."""
    if min(h, w) < ALIGN:
        return f"{w}x{h} pixels, under the network's {ALIGN} on a side: its Q1..Q3 mostly measure the padding"
    if flat:
        return (
            "flat (every channel's standard deviation at most 1/255 of full scale): it holds nothing to"
            " judge, its Q1..Q3 say nothing of it"
        )
    return None


def score_caveat(img: np.ndarray, bits: int | None = None) -> str | None:
    """caveat() of a numpy image as Restorer.restore takes it (HxW, HxWx1, HxWx2 gray + alpha, HxWx3,
    HxWx4 RGBA; bits: the sample depth of its integers, as restore's), its alpha aside: a flat colour
    under a varied alpha is flat too."""
    colour = img if img.ndim == 2 else img[..., : 1 if img.shape[2] <= 2 else 3]
    colour = torch.from_numpy(np.asarray(colour, colour.dtype.newbyteorder("=")))
    if colour.dtype == torch.uint16:  # torch's uint16 has few kernels
        colour = colour.to(torch.int32)
    planes = [colour[None]] if colour.ndim == 2 else colour[None].unbind(-1)
    full = 1.0 if img.dtype.kind == "f" else 2.0 ** (bits or 8 * img.dtype.itemsize) - 1
    return caveat(*img.shape[:2], bool(flat_frames(*planes, full=full)))


def flat_frames(*planes: torch.Tensor, full: float, at_once: bool | None = None) -> torch.Tensor:
    """(N,) bool, on the planes' device: whether each frame is flat, every one of planes, each (N, ...)
    one channel of N frames (a Y'CbCr plane, an RGB channel), of standard deviation at most FLAT_STD
    of full (the sample range: 255, 1023 for 10-bit codes, 1.0 for floats in [0, 1]).

    at_once (by default on a GPU): all frames in one reduction, left on the device, as deciding anything
    on the host would sync. Otherwise (the CPU) frame by frame and plane by plane, stopping at the first
    plane that varies: on one thread, std of one 1920x1080 uint8 luma took 2 ms, of four at once
    (std(dim=1)) 80 ms."""
    at_once = planes[0].device.type != "cpu" if at_once is None else at_once
    if at_once:
        return spread(planes).amax(0) <= full * FLAT_STD
    n = planes[0].shape[0]
    return torch.tensor([all(spread([p[i : i + 1]]) <= full * FLAT_STD for p in planes) for i in range(n)])


def spread(planes) -> torch.Tensor:
    """(len(planes), N): the standard deviation of each of the N frames of each plane (N, ...)."""
    return torch.stack([p.reshape(p.shape[0], -1).float().std(dim=1, correction=0) for p in planes])
