"""What a JPEG file itself says: its quantization tables, the quality it was saved at, and how far a
restoration may move from it.

A JPEG keeps each 8x8 block's DCT coefficients divided by its quantization table and rounded, so the
original picture's coefficients lie within half a step of the decoded picture's. Projecting a restored
picture back into those bins (clipping each coefficient to them) can only bring it nearer the original
(a projection onto a convex set that holds the original; up to rounding, and to how well the decoder's
chroma upsampling is undone), and it keeps the network from inventing detail the file rules out. That
matters most for high-quality files, where the bins are narrow and the network, trained on QF 5..95,
overshoots: on LIVE1 (29 images) at QF 95 restoring alone lost 0.61 dB against the JPEG, and gained
0.01 dB after the projection; at QF 10-40 the projection adds 0.008 dB, on every image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.linalg import solve_banded

from qairn.engine.imageio import _apply_orientation

# libjpeg's (IJG's) base tables, row by row (the JPEG standard's Annex K); quality q scales them.
IJG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ]
)
IJG_CHROMA = np.full((8, 8), 99)
IJG_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]

# JFIF's full-range BT.601 Y'CbCr (what libjpeg converts RGB to before the DCT); offsets left out:
# only differences between two pictures pass through it here.
RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
YCC_TO_RGB = np.linalg.inv(RGB_TO_YCC).astype(np.float32)
RGB_TO_YCC = RGB_TO_YCC.astype(np.float32)  # float32 throughout: pixel values 0..255 need no more

# The orthonormal 8-point DCT-II (JPEG's forward DCT): row u holds basis function u.
DCT8 = np.array(
    [
        [np.sqrt((1 if u == 0 else 2) / 8) * np.cos((2 * x + 1) * u * np.pi / 16) for x in range(8)]
        for u in range(8)
    ],
    dtype=np.float32,
)

# From this libjpeg quality up, restoring gained nothing on LIVE1, even clipped (mean PSNR over the
# JPEG: +0.01 dB at 95, -0.22 at 98; unclipped -0.61 and -2.02): `qairn restore` says so per file.
HIGH_QUALITY = 95

BAND_ROWS = 512  # consistent() works on bands of this many rows (rounded up to whole blocks)
BAND_CONTEXT = 16  # rows of context either side (8 chroma rows; across the unfancy solve a sample's
# weight falls sixfold per row: 6**-8, nothing of the band's cut edge reaches its kept rows)


def ijg_table(base: np.ndarray, quality: int) -> np.ndarray:
    """libjpeg's table at this quality (jpeg_quality_scaling, baseline: steps 1..255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base * scale + 50) // 100, 1, 255)


# log of libjpeg's luma and chroma tables at every quality 1..100: (2, 100, 8, 8), made once (a Motion
# JPEG's tables are read per frame)
LOG_IJG = np.log([[ijg_table(base, q) for q in range(1, 101)] for base in (IJG_LUMA, IJG_CHROMA)])


@dataclass(frozen=True)
class JpegFile:
    """A JPEG file's quantization, per component in the file's order (Y, then Cb and Cr; Y alone for
    gray): each an 8x8 table of steps in row order, and how many pixels across and down one of its
    samples covers ((1, 1) for Y; (2, 2) for 4:2:0 chroma, (2, 1) for 4:2:2). quality: the libjpeg
    quality whose tables are nearest; exact: the file's tables are exactly those (else it was saved by
    another encoder: a camera, Photoshop, and quality only says where it sits on libjpeg's scale).
    orientation: its EXIF orientation (1..8), which read_image applies and `consistent` undoes."""

    tables: tuple[np.ndarray, ...]
    factors: tuple[tuple[int, int], ...]
    quality: int
    exact: bool
    orientation: int = 1


def estimate_quality(luma: np.ndarray, chroma: np.ndarray | None = None) -> tuple[int, bool]:
    """(quality, exact): the libjpeg quality 1..100 whose tables are nearest these (in log steps: a
    step of 2 against 1 counts as 20 against 10), and whether they are exactly its tables."""
    err = np.abs(np.log(np.asarray(luma, np.float64)) - LOG_IJG[0]).sum(axis=(1, 2))
    if chroma is not None:
        err += np.abs(np.log(np.asarray(chroma, np.float64)) - LOG_IJG[1]).sum(axis=(1, 2))
    best = int(np.argmin(err))  # the first of equal ones (argmin's): steps of 1 in places from q 98 up
    return best + 1, bool(err[best] == 0)


def read_jpeg(source: str | Path | bytes) -> JpegFile | None:
    """The quantization of a JPEG (a file, or its bytes; of an MPO its first picture) read as Y'CbCr or
    gray, or None: not a JPEG, or one whose pixels are not Y'CbCr/gray (CMYK, YCCK, RGB stored as is),
    or an unusual layout (subsampling other than a whole number of pixels), or a broken table (a step
    of 0)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            # MPO: a phone's JPEG with previews or a depth map after it; read_image takes the first
            # picture, whose tables these are
            if im.format not in ("JPEG", "MPO") or im.mode not in ("L", "RGB"):
                return None
            if im.mode == "RGB" and im.info.get("adobe_transform") == 0:  # RGB coded as RGB
                return None
            if [c[0] for c in im.layer] == [ord("R"), ord("G"), ord("B")]:  # libjpeg's other sign of it
                return None
            layer, qtables = list(im.layer), dict(im.quantization)
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError):
        return None
    if len(layer) != (1 if im.mode == "L" else 3) or any(c[3] not in qtables for c in layer):
        return None
    if any(not (1 <= c[1] <= 4 and 1 <= c[2] <= 4) for c in layer):  # JPEG's range (a damaged header)
        return None
    hmax, vmax = max(c[1] for c in layer), max(c[2] for c in layer)
    if any(hmax % c[1] or vmax % c[2] for c in layer):
        return None
    tables = tuple(np.asarray(qtables[c[3]], np.float32).reshape(8, 8) for c in layer)
    if any((t == 0).any() for t in tables):  # a broken table: libjpeg decodes such a coefficient as 0
        return None  # whatever was stored, so there is no bin to keep it in
    quality, exact = estimate_quality(tables[0], tables[1] if len(tables) > 1 else None)
    factors = tuple((hmax // c[1], vmax // c[2]) for c in layer)
    return JpegFile(tables, factors, quality, exact, orientation if orientation in range(1, 9) else 1)


def jpeg_fits(jpeg: JpegFile, img: np.ndarray) -> bool:
    """Whether img is a picture `consistent` takes for this JPEG: uint8, gray for one component, RGB
    for three."""
    channels = 1 if img.ndim == 2 else img.shape[2]
    return img.dtype == np.uint8 and channels == len(jpeg.tables) and img.ndim in (2, 3)


def planes_fit(restored, decoded, jpeg: JpegFile) -> bool:
    """Whether (y, u, v) planes are a colour JPEG's own components, at their own sizes (a Motion JPEG
    frame as the decoder gives it), restored and decoded alike: uint8 numpy."""
    if len(jpeg.tables) != 3 or len(restored) != 3 or len(decoded) != 3:
        return False
    h, w = decoded[0].shape
    sizes = [(-(-h // fy), -(-w // fx)) for fx, fy in jpeg.factors]
    return all(
        isinstance(r, np.ndarray) and r.dtype == d.dtype == np.uint8 and r.shape == d.shape == size
        for r, d, size in zip(restored, decoded, sizes)
    )


def consistent_planes(restored, decoded, jpeg: JpegFile) -> tuple[np.ndarray, ...]:
    """`consistent` for Y'CbCr planes at the JPEG's own resolutions (see planes_fit): each clipped to
    its own bins. Exact, as RGB is not: no colour conversion, and no chroma upsampling to undo."""
    out = []
    for r, d, table in zip(restored, decoded, jpeg.tables):
        r32 = r.astype(np.float32)
        moved = r32 + _clip_plane(r32, d.astype(np.float32), table)
        out.append(np.clip(np.rint(moved), 0, 255).astype(np.uint8))
    return tuple(out)


def _pad(plane: np.ndarray, fy: int, fx: int) -> np.ndarray:
    # As an encoder pads a picture to whole blocks: its last row and column repeated.
    h, w = plane.shape
    if h % fy == 0 and w % fx == 0:
        return plane
    return np.pad(plane, ((0, -h % fy), (0, -w % fx)), mode="edge")


def _down(plane: np.ndarray, fx: int, fy: int) -> np.ndarray:
    """Subsample a plane as libjpeg does: the mean of each fy x fx box."""
    if fx == fy == 1:
        return plane
    p = _pad(plane, fy, fx)
    return p.reshape(p.shape[0] // fy, fy, p.shape[1] // fx, fx).mean(axis=(1, 3))


def _unfancy(plane: np.ndarray, axis: int) -> np.ndarray:
    """Undo, along one axis, what libjpeg's 'fancy' 2x upsampling followed by a 2-box mean does to a
    subsampled plane: each sample comes back as 3/4 of itself plus 1/8 of each neighbour (the edge
    sample repeated beyond the ends). A tridiagonal system, solved for every line at once."""
    n = plane.shape[axis]
    if n < 2:
        return plane
    bands = np.empty((3, n))
    bands[0], bands[1], bands[2] = 1 / 8, 3 / 4, 1 / 8  # above, on and below the diagonal
    bands[1, 0] = bands[1, -1] = 7 / 8  # the repeated edge sample is the edge sample itself
    lines = np.moveaxis(plane, axis, 0)
    solved = solve_banded((1, 1), bands, lines.reshape(n, -1)).astype(plane.dtype)
    return np.moveaxis(solved.reshape(lines.shape), 0, axis)


def _blocks_dct(plane: np.ndarray) -> np.ndarray:
    """Each 8x8 block's DCT, as (block row, u, block column, v): two matrix products (scipy's dctn
    over the strided block axes took ten times as long)."""
    p = _pad(plane, 8, 8)
    h, w = p.shape
    rows = (DCT8 @ p.reshape(h // 8, 8, w)).reshape(h // 8, 8, w // 8, 8)
    return rows @ DCT8.T


def _blocks_idct(coefs: np.ndarray) -> np.ndarray:
    by, _, bx, _ = coefs.shape
    rows = (DCT8.T @ coefs.reshape(by, 8, bx * 8)).reshape(by, 8, bx, 8)
    return (rows @ DCT8).reshape(by * 8, bx * 8)


def _clip_plane(restored: np.ndarray, decoded: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The change that brings each 8x8 block's DCT coefficients of `restored` within half a
    quantization step of `decoded`'s (JPEG's DCT is the orthonormal DCT-II)."""
    r, d = _blocks_dct(restored), _blocks_dct(decoded)
    half = table[None, :, None, :] / 2
    delta = np.clip(r, d - half, d + half) - r
    h, w = restored.shape
    return _blocks_idct(delta)[:h, :w]


def consistent(restored: np.ndarray, decoded: np.ndarray, jpeg: JpegFile) -> np.ndarray:
    """`restored` moved back into the quantization bins of the JPEG that decoded to `decoded`: both
    uint8 RGB (HxWx3) or gray (HxW), as read_image gives them (EXIF orientation applied: it is undone
    here, for the file's blocks start at its stored top left). The change is made in Y'CbCr, each
    component at its own resolution, and spread evenly over the pixels a subsampled chroma sample
    covers (the smallest change that moves it)."""
    if restored.shape != decoded.shape or restored.dtype != np.uint8 or decoded.dtype != np.uint8:
        raise ValueError(
            f"restored {restored.shape} {restored.dtype} and decoded {decoded.shape} {decoded.dtype}: "
            "both must be the same shape, uint8"
        )
    gray = restored.ndim == 2
    if gray != (len(jpeg.tables) == 1) or (not gray and restored.shape[2] != 3):
        raise ValueError(f"a {restored.shape} picture for a {len(jpeg.tables)}-component JPEG")
    undo = {6: 8, 8: 6}.get(jpeg.orientation, jpeg.orientation)  # the others are their own inverse
    r, d = _apply_orientation(restored, undo), _apply_orientation(decoded, undo)
    out = np.empty_like(r)
    # In bands of rows, with context above and below (the unfancy solve reaches a few rows across):
    # float copies of a whole 50 MP photo took some 6 GB. Bands and their context start on whole
    # blocks of every component: 16 rows for 4:2:0, 24 or 32 for chroma samples 3 or 4 rows tall.
    block = 8 * max(fy for _, fy in jpeg.factors)
    rows, context = -(-BAND_ROWS // block) * block, -(-BAND_CONTEXT // block) * block
    for top in range(0, r.shape[0], rows):
        lo, hi = max(0, top - context), min(r.shape[0], top + rows + context)
        band = _consistent_band(r[lo:hi].astype(np.float32), d[lo:hi].astype(np.float32), jpeg)
        out[top : top + rows] = band[top - lo : top - lo + rows]
    return _apply_orientation(out, jpeg.orientation)


def _consistent_band(r: np.ndarray, d: np.ndarray, jpeg: JpegFile) -> np.ndarray:
    if r.ndim == 2:
        out = r + _clip_plane(r, d, jpeg.tables[0])
    else:
        h, w = r.shape[:2]
        # As (3, H, W) planes: one matrix product each way ((H, W, 3) @ (3, 3) ran H small ones)
        ycc_r = (RGB_TO_YCC @ r.reshape(-1, 3).T).reshape(3, h, w)
        ycc_d = (RGB_TO_YCC @ d.reshape(-1, 3).T).reshape(3, h, w)
        change = np.empty_like(ycc_r)
        for i, (table, (fx, fy)) in enumerate(zip(jpeg.tables, jpeg.factors)):
            down_r, down_d = _down(ycc_r[i], fx, fy), _down(ycc_d[i], fx, fy)
            # The decoder's chroma was upsampled with libjpeg's triangle filter, and the box mean of
            # that is a blurred chroma: its high frequencies, the ones restoration works on, come
            # back weakened (to 1/2 at the highest), and the bins would be centred wrong.
            for axis, f in ((0, fy), (1, fx)):
                if f == 2:
                    down_d = _unfancy(down_d, axis)
            delta = _clip_plane(down_r, down_d, table)
            change[i] = np.repeat(np.repeat(delta, fy, axis=0), fx, axis=1)[:h, :w]
        out = r + (YCC_TO_RGB @ change.reshape(3, -1)).T.reshape(h, w, 3)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
