"""Y'CbCr planes <-> R'G'B' tensors, computed on the engine's device, and `restore_yuv`.

Matrices (luma weights Kr, Kb; Kg = 1 - Kr - Kb):
  bt601  0.299,  0.114   SD video (BT.470BG / SMPTE 170M) and JPEG
  bt709  0.2126, 0.0722  HD video
  bt2020 0.2627, 0.0593  UHD video (non-constant luminance)
Ranges, at `bits` per sample (s = 2**(bits-8)):
  limited ("tv", "mpeg"): Y = s*(16 + 219 Y'),  C = s*(128 + 224 P)   P = Pb or Pr in [-0.5, 0.5]
  full    ("pc", "jpeg"): Y = (2**bits-1) Y',   C = 2**(bits-1) + (2**bits-1) P
JPEG (JFIF 1.02) uses BT.601 with full range (Y = 0.299 R + 0.587 G + 0.114 B, Cb = 128 + (B-Y)/1.772,
Cr = 128 + (R-Y)/1.402, all 0..255): planes taken from a JPEG are restore_yuv(..., matrix="bt601",
range="full"). Video is usually limited range, BT.709 for HD and BT.601 for SD. Matrix and range are
also taken as ITU-T H.273 codes, as PyAV frames give them (frame.colorspace, frame.color_range).

Chroma: 4:2:0 and 4:2:2 planes are upsampled with the triangle filter libjpeg uses ("fancy upsampling":
bilinear, centred siting, edges replicated), so the network sees chroma as it did in training, and are
downsampled by 2x2 (or 2x1) box averages. (H.264/MPEG-2 site 4:2:0 chroma "left", a quarter pixel
from centred; with the correction form below that offset moves only the correction, never the picture.)

restore_yuv applies the restoration as a correction: out = in + down(M (restored - rgb)), with `rgb` the
input converted to R'G'B' and clipped to [0, 1]. With no change to the picture the planes come back
bit-exact (no chroma blur, no gamut clipping of super-whites or out-of-gamut colours), whatever the
subsampling; the plain conversion round trip (planes_to_rgb, then rgb_to_planes) is measured in
tests/test_color.py.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F

from qairn.engine.caveats import caveat, flat_frames

MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "bt2020": (0.2627, 0.0593)}
MATRIX_ALIASES = {
    "601": "bt601",
    "bt470bg": "bt601",
    "smpte170m": "bt601",
    "709": "bt709",
    "2020": "bt2020",
    "bt2020nc": "bt2020",
    "itu601": "bt601",  # av.video.reformatter.Colorspace's names
    "itu709": "bt709",
}
RANGES = {
    "limited": "limited",
    "tv": "limited",
    "mpeg": "limited",
    "full": "full",
    "pc": "full",
    "jpeg": "full",
}


# ITU-T H.273 codes, as PyAV frames give them (frame.colorspace, frame.color_range: ints; av's
# Colorspace and ColorRange enums are IntEnums of the same codes).
MATRIX_CODES = {1: "bt709", 5: "bt601", 6: "bt601", 9: "bt2020"}
RANGE_CODES = {1: "limited", 2: "full"}
UNSPECIFIED_MATRIX, UNSPECIFIED_RANGE = 2, 0


class ColorError(ValueError):
    """Planes or colour parameters that cannot be converted; the message says what is wrong."""


def is_code(value) -> bool:
    """An H.273 code: an int of any kind (numpy's, an IntEnum), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def guessed_matrix(lines: int) -> str:
    """The matrix an untagged Y'CbCr frame of `lines` lines is taken to have, as players do: HD
    (720 lines or more) BT.709, SD BT.601. qairn video guesses so (with a note); the library does not."""
    return "bt709" if lines >= 720 else "bt601"


def check_matrix(matrix: str | int, lines: int | None = None) -> str:
    """The matrix's name: from a name or alias, or from an H.273 code (PyAV's frame.colorspace).
    lines: the frame's height, for the refusal of code 2 (unspecified) to name what to pass."""
    if is_code(matrix):
        code = int(matrix)
        if code in MATRIX_CODES:
            return MATRIX_CODES[code]
        taken = "codes 1 (bt709), 5 and 6 (bt601) and 9 (bt2020)"
        if code == UNSPECIFIED_MATRIX:
            # Most files made without colour tags decode so: the message names the matrix qairn video
            # would take, for the caller to pass (a library call guessing would do it without a word).
            if lines is None:
                advice = "matrix='bt709' for HD (720 lines or more), 'bt601' below, as qairn video assumes"
            else:
                advice = f"matrix='{guessed_matrix(lines)}' for {lines} lines, as qairn video assumes"
            raise ColorError(
                f"colour matrix code 2 (unspecified) takes no guess: name the matrix, e.g. {advice} "
                f"(the codes taken are {taken})"
            )
        raise ColorError(f"colour matrix code {code} is not supported; qairn converts {taken}")
    m = MATRIX_ALIASES.get(str(matrix).lower(), str(matrix).lower())
    if m not in MATRICES:
        raise ColorError(f"unknown colour matrix {matrix!r}; choose one of {', '.join(MATRICES)}")
    return m


def check_range(range: str | int) -> str:
    """'limited' or 'full': from a name or alias, or from an H.273 code (PyAV's frame.color_range)."""
    if is_code(range):
        code = int(range)
        if code in RANGE_CODES:
            return RANGE_CODES[code]
        said = " (unspecified)" if code == UNSPECIFIED_RANGE else ""
        raise ColorError(
            f"colour range code {code}{said} is not one qairn takes: 1 (limited, video's usual) or 2 (full)"
            + ("; untagged video is limited as qairn video takes it: pass range='limited'" if said else "")
        )
    r = RANGES.get(str(range).lower())
    if r is None:
        raise ColorError(f"unknown colour range {range!r}; choose 'limited' or 'full'")
    return r


def rgb_matrix(matrix: str) -> torch.Tensor:
    """3x3 matrix taking (R', G', B') to (Y', Pb, Pr)."""
    kr, kb = MATRICES[check_matrix(matrix)]
    kg = 1.0 - kr - kb
    return torch.tensor(
        [
            [kr, kg, kb],
            [-0.5 * kr / (1 - kb), -0.5 * kg / (1 - kb), 0.5],
            [0.5, -0.5 * kg / (1 - kr), -0.5 * kb / (1 - kr)],
        ],
        dtype=torch.float64,
    )


def levels(range: str, bits: int = 8) -> tuple[float, float, float, float]:
    """(luma offset, luma scale, chroma offset, chroma scale) in code values."""
    if check_range(range) == "limited":
        s = 2.0 ** (bits - 8)
        return 16 * s, 219 * s, 128 * s, 224 * s
    top = 2.0**bits - 1
    return 0.0, top, 2.0 ** (bits - 1), top


def upsample(c: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N,h',w') chroma -> (N,h,w): libjpeg's triangle filter (bilinear, centred siting)."""
    fy, fx = (2 if c.shape[-2] != h else 1), (2 if c.shape[-1] != w else 1)
    if fy == fx == 1:
        return c
    up = F.interpolate(c[:, None], scale_factor=(fy, fx), mode="bilinear", align_corners=False)
    return up[:, 0, :h, :w]


def downsample(c: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N,H,W) full-resolution chroma -> (N,h,w) by box averages (edges replicated for odd sizes)."""
    fy, fx = (2 if h != c.shape[-2] else 1), (2 if w != c.shape[-1] else 1)
    if fy == fx == 1:
        return c
    ph, pw = h * fy - c.shape[-2], w * fx - c.shape[-1]
    x = F.pad(c[:, None], (0, pw, 0, ph), mode="replicate") if ph or pw else c[:, None]
    return F.avg_pool2d(x, (fy, fx))[:, 0]


def chroma_size(h: int, w: int, u_shape) -> tuple[int, int]:
    """Check a chroma plane's size against the luma size (4:4:4, 4:2:2 or 4:2:0) and return it."""
    ch, cw = int(u_shape[-2]), int(u_shape[-1])
    # 4:4:0 (halved rows, full columns) is refused, except one column wide, where 4:2:0 looks the same
    if ch not in (h, -(-h // 2)) or cw not in (w, -(-w // 2)) or (ch != h and cw == w and w > 1):
        raise ColorError(
            f"chroma planes of {cw}x{ch} do not fit a {w}x{h} luma plane (expected 4:4:4, 4:2:2 or 4:2:0)"
        )
    return ch, cw


def planes_to_rgb(y, u, v, matrix: str = "bt709", range: str = "limited", bits: int = 8) -> torch.Tensor:
    """(N,H,W) luma and (N,h,w) chroma code values (any dtype, any device) -> (N,3,H,W) float32 R'G'B'
    in [0, 1] nominally, not clipped (values outside the RGB cube stay outside)."""
    h, w = y.shape[-2:]
    chroma_size(h, w, u.shape)
    yo, ys, co, cs = levels(range, bits)
    inv = torch.linalg.inv(rgb_matrix(matrix)).to(y.device, torch.float32)
    yy = (y.float() - yo) / ys
    pb = (upsample(u.float(), h, w) - co) / cs
    pr = (upsample(v.float(), h, w) - co) / cs
    return torch.einsum("ij,njhw->nihw", inv, torch.stack([yy, pb, pr], 1))


def rgb_to_planes(
    rgb: torch.Tensor,
    csize: tuple[int, int],
    matrix: str = "bt709",
    range: str = "limited",
    bits: int = 8,
    offsets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N,3,H,W) float R'G'B' -> float code values (N,H,W) luma and (N,h,w) chroma, not rounded.
    offsets=False converts a difference of two pictures (no black level or chroma centre added)."""
    yo, ys, co, cs = levels(range, bits)
    if not offsets:
        yo = co = 0.0
    ypp = torch.einsum("ij,njhw->nihw", rgb_matrix(matrix).to(rgb.device, torch.float32), rgb.float())
    h, w = csize
    return yo + ys * ypp[:, 0], co + cs * downsample(ypp[:, 1], h, w), co + cs * downsample(ypp[:, 2], h, w)


def quantize(plane: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    return plane.round().clamp(0, 2**bits - 1).to(dtype)


def plane_bits(dtype, bits: int | None, what: str = "planes") -> int:
    """Sample depth of integer planes: 8 for uint8; uint16/int16/int32 need bits= (9..16).
    what: what the errors call them ("frames" for RGB images)."""
    name = str(dtype).replace("torch.", "")
    if name == "uint8":
        if bits not in (None, 8):
            raise ColorError(f"uint8 {what} hold 8-bit samples, not {bits}-bit")
        return 8
    if name in ("uint16", "int16", "int32"):
        top = 15 if name == "int16" else 16  # int16 holds 15-bit codes; 16-bit ones read negative
        if bits is None:
            raise ColorError(f"{name} {what} need bits= (9..{top}), e.g. bits=10 for 10-bit video")
        # Not "need bits=" when bits=8 was given.
        if not 9 <= bits <= top:
            raise ColorError(f"{name} {what} hold 9..{top}-bit samples, not {bits}-bit")
        return bits
    raise ColorError(f"planes must be integer code values (uint8, or uint16 with bits=), not {name}")


def check_codes(plane: torch.Tensor, bits: int, name: str) -> None:
    """Refuse host planes with codes outside 0..2**bits-1: MSB-aligned 16-bit samples (P010) given
    bits=10, say, would otherwise be clamped into a wrong picture without a word. Planes already on a
    GPU are not read (that would cost a device sync per call)."""
    if plane.device.type != "cpu" or plane.dtype == torch.uint8:
        return
    lo, hi = (int(v) for v in torch.aminmax(plane.to(torch.int32)))  # torch's uint16 has no aminmax
    if lo < 0 or hi > 2**bits - 1:
        raise ColorError(
            f"plane {name} holds codes {lo}..{hi}, outside the {bits}-bit range 0..{2**bits - 1} "
            f"(MSB-aligned samples such as P010: shift them right by {16 - bits}, or pass bits=16)"
        )


def checked_planes(planes: list, device: torch.device, bits: int) -> list:
    """(y, u, v) integer planes with their codes checked (check_codes) on the way to a Restorer on
    device: a CPU Restorer's are copied to it first, and read there, so a GPU's planes are read as a
    host's are (they go to the CPU anyway); a GPU Restorer's stay where they are, a GPU's unread."""
    if device.type == "cpu":
        planes = [p.to(device) for p in planes]
    for p, name in zip(planes, "yuv"):
        check_codes(p, bits, name)
    return planes


# ---- restoration on planes -----------------------------------------------------------------------
def restore_planes(
    restorer,
    y: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    matrix: str,
    range: str,
    bits: int,
    return_maps: bool = False,
    image: bool = True,
):
    """(N,H,W)/(N,h,w) integer planes already on the restorer's device -> (planes of the same dtype,
    quality dict of (N,) tensors, maps or None), all on the device. See the module docstring.
    image=False: quality (and maps) only, the planes None (Restorer.restore_tensor(image=False))."""
    h, w = y.shape[-2:]
    csize = chroma_size(h, w, u.shape)
    if v.shape != u.shape:
        raise ColorError(f"U and V planes differ in shape: {tuple(u.shape)} vs {tuple(v.shape)}")
    rgb = planes_to_rgb(y, u, v, matrix, range, bits).clamp_(0, 1)
    # in_range: clamped just now, so restore_tensor need not read every value again to check.
    restored, q, maps = restorer.restore_tensor(rgb, return_maps, image=image, in_range=True)
    if not image:
        return None, q, maps
    dy, du, dv = rgb_to_planes(restored - rgb, csize, matrix, range, bits, offsets=False)
    out = tuple(quantize(p.float() + d, bits, p.dtype) for p, d in ((y, dy), (u, du), (v, dv)))
    return out, q, maps


def native(a: np.ndarray) -> np.ndarray:
    """a in this machine's byte order: big-endian samples (np.frombuffer(raw, ">u2") of a yuv420p10be or
    rgb48be pipe) are the same numbers, but torch takes no such array and their dtype is not np.uint16."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _as_batch(p, name: str) -> torch.Tensor:
    if isinstance(p, np.ndarray):
        if p.dtype == np.uint16:  # torch has limited uint16 support: widen (lossless)
            p = p.astype(np.int32)
        p = torch.from_numpy(np.require(p, requirements=["C", "W"]))  # read-only: torch warns
    elif not isinstance(p, torch.Tensor):
        raise ColorError(f"plane {name} must be a numpy array or torch tensor, not {type(p).__name__}")
    if p.ndim not in (2, 3) or 0 in p.shape:
        raise ColorError(f"plane {name} must be (H,W) or (N,H,W) and non-empty, got {tuple(p.shape)}")
    return p[None] if p.ndim == 2 else p


def restore_yuv(
    restorer,
    y,
    u,
    v,
    matrix: str | int = "bt709",
    range: str | int = "limited",
    bits: int | None = None,
    return_maps: bool = False,
    image: bool = True,
):
    """Restore Y'CbCr planes (numpy or tensors, (H,W) or (N,H,W), 4:2:0/4:2:2/4:4:4) and return a Result
    whose image is the (y, u, v) planes in the input's format (dtype, subsampling, device). Quality
    and maps: for numpy planes, floats and (H,W) arrays ((N,) and (N,H,W) for a batch); for tensors,
    on the Restorer's device, (N,) tensors and (N,1,h,w) maps, without the N for (H,W) planes.
    image=False: quality (and maps) only, the image None (restore_planes(image=False))."""
    from qairn.engine.restorer import Result

    lines = y.shape[-2] if getattr(y, "ndim", 0) >= 2 else None  # for code 2's advice; y is checked below
    matrix, range = check_matrix(matrix, lines), check_range(range)
    src = y
    if all(isinstance(t, np.ndarray) for t in (y, u, v)):  # np.memmap planes of a raw file too
        y, u, v = (native(np.asarray(t)) for t in (y, u, v))  # given back in src's byte order
    elif not all(isinstance(t, torch.Tensor) for t in (y, u, v)):
        # restore_yuv(*frame.planes): PyAV's planes are buffers with padded rows, of no dtype or shape.
        if any(hasattr(t, "line_size") for t in (y, u, v)):
            raise ColorError(
                "y, u and v are PyAV VideoPlanes (rows padded to line_size), not arrays: give "
                "qairn.engine.video.frame_planes(frame), the frame's numpy (y, u, v)"
            )
        raise ColorError("y, u and v must all be numpy arrays or all torch tensors")
    if len({str(p.dtype) for p in (y, u, v)}) != 1:
        raise ColorError(f"y, u and v differ in dtype: {y.dtype}, {u.dtype}, {v.dtype}")
    bits = plane_bits(y.dtype, bits)
    shapes = ", ".join(str(tuple(p.shape)) for p in (y, u, v))  # as given: an HxWx3 y is 8 frames here
    dev = restorer.device
    planes = checked_planes([_as_batch(p, n) for p, n in zip((y, u, v), "yuv")], dev, bits)
    if len({p.shape[0] for p in planes}) != 1:
        raise ColorError(f"y, u and v have different batch sizes: shapes {shapes}")
    # non_blocking for a host's planes only: a GPU's planes copied to a CPU Restorer so would be read
    # by the colour conversion before their bytes arrive (a device-to-host copy returns at once).
    planes = [p.to(dev, non_blocking=p.device.type == "cpu") for p in planes]
    out, q, maps = restore_planes(restorer, *planes, matrix, range, bits, return_maps, image)
    info = {"matrix": matrix, "range": range, "bits": bits}
    if isinstance(src, torch.Tensor):  # quality and maps stay on the device (no host sync), no caveat
        out = tuple(o.to(src.device) for o in out) if image else None
        if src.ndim == 2:  # one frame in, one frame out: its batch dimension goes from all of it
            out = tuple(o[0] for o in out) if image else None
            q = {k: t[0] for k, t in q.items()}
            maps = [m[0] for m in maps] if maps is not None else None
        return Result(out, q, maps, info)
    dtype = src.dtype
    out = tuple(o.cpu().numpy().astype(dtype, copy=False) for o in out) if image else None
    caveats = [caveat(*y.shape[-2:], flat) for flat in flat_frames(*planes, full=2.0**bits - 1).tolist()]
    info["caveat"] = caveats[0] if src.ndim == 2 else caveats
    if src.ndim == 2:
        out = tuple(o[0] for o in out) if image else None
        quality = {k: float(t[0]) for k, t in q.items()}
        maps = [m[0, 0].float().cpu().numpy() for m in maps] if maps is not None else None
    else:
        quality = {k: t.cpu().numpy() for k, t in q.items()}
        maps = [m[:, 0].float().cpu().numpy() for m in maps] if maps is not None else None
    return Result(out, quality, maps, info)
