"""Image files in and out: EXIF orientation, 8/16-bit, a pixel limit checked before decoding,
and atomic writes (temp name, then rename) so a failure never leaves a partial file."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import struct
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, TiffImagePlugin, UnidentifiedImageError

from qairn.messages import warn

# We check the pixel count ourselves (configurable) before decoding; PIL's own guard is disabled.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 200_000_000
# .jfif and .jpe are JPEGs too (browsers on Windows save .jfif): a folder of them was "contains no images".
JPEG_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".jpe"}
IMAGE_SUFFIXES = {".png", *JPEG_SUFFIXES, ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".jp2", ".gif"}
WRITE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
ALPHA_SUFFIXES = {".png", ".webp", ".tif", ".tiff"}  # the others are written without an alpha channel
DEEP_SUFFIXES = {".png", ".tif", ".tiff"}  # the others are written at 8 bits


class ImageError(ValueError):
    """A problem with one image file; the message names the file and the problem in one line."""


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    # EXIF orientation values 1..8 (see PIL.ImageOps.exif_transpose) as numpy ops.
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, -1)[::-1],  # transverse
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(ops[orientation](arr)) if orientation in ops else arr


def read_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, warn: Callable[[str], object] | None = None
) -> np.ndarray:
    """Read an image as RGB(A) or gray (HxW, or HxWx2 with alpha) numpy, uint8 or uint16, EXIF
    orientation applied; 1-bit and gray-palette images are gray. Of an animation or a multi-page file
    only the first frame is read, and warn(message) says so, as it does of a damaged JPEG decoded as it
    is (default: qairn.messages.warn, a UserWarning naming the caller's line)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    fmt = path.suffix.lstrip(".").upper() or None
    pillow_failed = None  # why Pillow could not read a TIFF, which OpenCV is then asked to
    frames = None  # told once: by Pillow's header, else by the OpenCV fallback
    try:
        # Opened from a file object, not by name: Pillow memory-maps an uncompressed file it opened by
        # name, and transposing a mapped gray or RGBA TIFF (orientations 5-8) gave wrong pixels. The image
        # checked is the one decoded: a PNG's getexif() decodes it (to look for an eXIf chunk after the
        # pixels), and a second decode of the file would double its read time. A 16-bit PNG is decoded
        # by OpenCV, so its EXIF is found without Pillow decoding it (_png_exif).
        with open(path, "rb") as f:
            im = _pillow_open(f, path)
            with im:  # the header first: nothing is decoded before the pixel limit is checked
                _check_pixels(path, *im.size, max_pixels)
                with _pillow_damage():  # a TIFF's page count reads every page's directory
                    frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    (warn or _warn)(_frames_message(path, frames, im.format))
                fmt = im.format
                png_depth, png_colour = _png_ihdr(path)
                png_whole = True  # whether a PNG runs to its IEND chunk (known for 16 bits only)
                if fmt == "PNG" and png_depth == 16:
                    exif, png_whole = _png_exif(im, path)
                else:
                    exif = im.getexif()
                orientation = exif.get(0x0112, 1)
                # TIFF tag 339 is SampleFormat: 2 signed integers, 3 floating point
                signed_or_float = fmt == "TIFF" and {2, 3} & set(_as_tuple(im.tag_v2.get(339, 1)))
                if im.mode == "F" or signed_or_float:
                    raise ImageError(
                        f"{path}: floating-point or signed pixels are not supported; save as 8 or 16 bit"
                    )
                # A colour key (PNG tRNS): pixels of this value are transparent.
                key = im.info.get("transparency")
                sixteen = im.mode.startswith("I;16") or im.mode == "I" or png_depth == 16
                # Pillow opens 16-bit RGB TIFF and PPM as 8-bit RGB: their headers tell.
                sixteen = sixteen or (fmt == "TIFF" and max(_as_tuple(im.tag_v2.get(258, 8))) > 8)
                maxval = _pnm_maxval(path) if fmt == "PPM" else 0
                sixteen = sixteen or maxval > 255
                if sixteen and fmt == "TIFF" and im.tag_v2.get(284, 1) == 2 and im.tag_v2.get(277, 1) > 1:
                    # OpenCV reads a 16-bit TIFF's separate colour planes as if interleaved: garbage pixels.
                    raise ImageError(
                        f"{path}: 16-bit TIFF with separate colour planes (PlanarConfiguration 2) is not "
                        "supported; save it with interleaved (contiguous) samples"
                    )
                if not sixteen:
                    with _pillow_damage():
                        im.load()
                    mode = im.mode
                    if fmt == "PNG" and png_colour == 0 and png_depth in (2, 4) and isinstance(key, int):
                        if key < 2**png_depth:  # Pillow fills 0..255 with 2- and 4-bit gray, not their key
                            im.info["transparency"] = key * (255 // (2**png_depth - 1))
                    # A colour key (gray, RGB, palette) becomes alpha, as an RGBA file's alpha is kept.
                    alpha = "A" in mode or "a" in mode or "transparency" in im.info
                    # 1-bit black and white is gray, and gray with alpha stays gray + alpha (HxWx2), not RGBA.
                    gray = mode in ("1", "L", "LA", "La")
                    target = ("LA" if alpha else "L") if gray else ("RGBA" if alpha else "RGB")
                    if mode != target:
                        im = im.convert(target)
                    arr = np.array(ImageOps.exif_transpose(im) if orientation != 1 else im)  # writable copy
                    gray_palette = (
                        mode in ("P", "PA")
                        and (arr[..., 0] == arr[..., 1]).all()
                        and (arr[..., 1] == arr[..., 2]).all()
                    )
                    if gray_palette:
                        arr = np.ascontiguousarray(arr[..., [0, 3]] if alpha else arr[..., 0])
                    if fmt in ("JPEG", "MPO"):  # MPO: a phone's JPEG with a second picture after it
                        f.seek(0)
                        damage = _jpeg_damage(f.read())
                        if damage:
                            (warn or _warn)(
                                f"{path}: corrupt JPEG data ({damage}); "
                                "the picture is taken as decoded, damage included"
                            )
                    return arr
    except ImageError:
        raise
    except UnidentifiedImageError:
        if _magic(path) not in TIFF_MAGIC:
            raise ImageError(f"{path}: not an image (unrecognised format)") from None
        pillow_failed = "Pillow does not recognise it"  # Pillow 13 misses big-endian BigTIFF's byte order
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # permission denied, an I/O error: not the content
            raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _magic(path) in TIFF_MAGIC:
            pillow_failed = f"Pillow: {msg}"
        elif "truncated" in msg.lower() or fmt in ("JPEG", "JPG"):
            raise ImageError(f"{path}: truncated or corrupt {fmt} ({msg})") from None
        else:
            raise ImageError(f"{path}: cannot decode ({msg})") from None
    if pillow_failed is not None:
        return _read_tiff_opencv(path, max_pixels, warn if frames is None else _quiet, pillow_failed)
    # 16-bit: OpenCV keeps the full depth (PIL would drop to 8 bits for RGB). OpenCV's TIFF reader turns
    # the pixels by the file's orientation tag itself; the tag is set to 1 in the bytes it gets, so the
    # orientation is applied once, below, whatever OpenCV's version does.
    data = path.read_bytes()
    if fmt == "TIFF":
        data = _tiff_upright(data)
    arr = _imdecode(data)
    if arr is None:
        if not png_whole:  # as Pillow says of an 8-bit PNG cut short
            raise ImageError(f"{path}: truncated or corrupt PNG (it ends before its IEND chunk)")
        raise ImageError(f"{path}: cannot decode 16-bit {fmt} image")
    if arr.dtype != np.uint16 and arr.dtype != np.uint8:
        raise ImageError(f"{path}: {arr.dtype} pixels are not supported; save as 8 or 16 bit")
    if 255 < maxval < 65535:  # 10- or 12-bit PGM/PPM samples (maxval 1023, 4095) fill the 16-bit range
        arr = ((np.minimum(arr, maxval).astype(np.uint32) * 65535 + maxval // 2) // maxval).astype(np.uint16)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        if fmt == "PNG" and png_colour == 4 and arr.shape[2] == 4:  # gray + alpha, given as BGRA by OpenCV
            arr = np.ascontiguousarray(arr[..., [0, 3]])
    elif fmt == "PNG" and png_colour == 0 and isinstance(key, int):  # OpenCV ignores a 16-bit gray key
        arr = np.stack([arr, np.where(arr == key, 0, np.iinfo(arr.dtype).max).astype(arr.dtype)], axis=2)
    return _apply_orientation(arr, orientation)


TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, either byte order


# Markers that may end a JPEG scan: tables (DHT, DAC, DQT, DRI), DNL, APPn, COM, the next scan, EOI.
SCAN_END_MARKERS = {0xC4, 0xCC, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)}


def _jpeg_damage(data: bytes) -> str | None:
    """Where a JPEG's marker structure is broken, up to its first EOI, or None. libjpeg reports such
    damage ("Corrupt JPEG data") as a warning, which Pillow drops: it decodes a restart marker without
    a restart interval, or out of turn, or an APPn segment in the middle of the compressed picture,
    without a word. Damage that makes no stray marker (bytes overwritten by zeros, say) is not seen:
    that takes a Huffman decode of the whole picture."""
    buf = np.frombuffer(data, np.uint8)
    # Every marker: 0xFF then a code (0x00 is a stuffed 0xFF byte of the data, 0xFF a fill byte).
    ff = np.flatnonzero(buf[:-1] == 0xFF)  # (one mask of the file's size; the rest are a few in 100)
    after = buf[ff + 1]
    marks = ff[(after != 0x00) & (after != 0xFF)]
    at, interval = 2, 0  # after SOI; the restart interval in MCUs (DRI), 0: none
    while at + 4 <= len(data):
        while data[at] == 0xFF and data[at + 1] == 0xFF:  # fill bytes before a marker
            at += 1
        code = data[at + 1]
        if data[at] == 0xFF and (code == 0x01 or 0xD0 <= code <= 0xD7):  # TEM, RSTn: no length, libjpeg
            at += 2  # passes over them here
            continue
        if data[at] != 0xFF or code not in SCAN_END_MARKERS and not 0xC0 <= code <= 0xCF:
            return f"no marker where one is due, at byte {at}"
        if code == 0xD9:
            return None
        end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if code == 0xDD:
            interval = int.from_bytes(data[at + 4 : at + 6], "big")
        if code != 0xDA:
            at = end
            continue
        turn = 0  # the scan's compressed data: restart markers in turn, up to the marker that ends it
        for m in marks[np.searchsorted(marks, end) :].tolist():
            code = data[m + 1]
            if not 0xD0 <= code <= 0xD7:
                if code not in SCAN_END_MARKERS:
                    return f"a stray marker 0xFF{code:02X} in the compressed picture, at byte {m}"
                at = m
                break
            if not interval or code != 0xD0 + turn:
                return f"a restart marker out of turn in the compressed picture, at byte {m}"
            turn = (turn + 1) % 8
        else:
            return None  # cut short: Pillow says so, or fills the rest
    return None


def _check_pixels(path: Path, w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise ImageError(
            f"{path}: {w}x{h} = {w * h / 1e6:.3g} MP is over the pixel limit "
            f"of {max_pixels / 1e6:.3g} MP (raise it with --max-pixels)"
        )


def _frames_message(path: Path, frames: int, fmt: str | None = None) -> str:
    if fmt == "MPO":  # Pillow's frames of a phone JPEG: a photo and what goes with it, not a moving picture
        return (
            f"{path}: a JPEG holding {frames} pictures (MPO: previews, a depth or HDR gain map, or a stereo "
            "pair's other view); only the first, the photo, is restored"
        )
    return f"{path}: {frames} frames; only the first is restored (qairn video takes moving pictures)"


def _pillow_open(fp, path: Path):
    """Image.open(fp) of the file at path, without the "Corrupt EXIF data" warning Pillow 13 gives a
    big-endian BigTIFF before it gives up on it (UnidentifiedImageError). Only such a file's open goes
    through warnings.catch_warnings: it swaps the process's filter list, so another thread's filter set
    meanwhile is dropped, and its warnings are ignored meanwhile."""
    if _magic(path) != b"MM\x00+":
        return Image.open(fp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Image.open(fp)


@contextlib.contextmanager
def _pillow_damage():
    """Pillow's errors on a damaged file, as ValueError: its TIFF plugin raises TypeError, KeyError,
    IndexError, struct.error and the like where a tag has the wrong type or count, when it counts the
    pages or decodes the strips. Only the Pillow calls inside are covered: the same exceptions from our
    own code are bugs, and stay tracebacks."""
    try:
        yield
    except (TypeError, KeyError, IndexError, ZeroDivisionError, struct.error) as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{type(e).__name__}: {detail}" if detail else type(e).__name__) from e


def _magic(path: Path) -> bytes:
    """The file's first 4 bytes (b"" if it cannot be read: open() will say why)."""
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def _tiff_first_page(data: bytes) -> tuple[dict[int, tuple[int, ...]], int]:
    """The first page's image tags {tag: values} (size, samples, bits, layout, orientation, and the
    pointers to the Exif and GPS directories) and the number of pages, from classic or BigTIFF bytes in
    either byte order; struct.error if the first is damaged."""
    bo = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    off, count_fmt, entry = (bo + "Q", bo + "Q", 20) if big else (bo + "I", bo + "H", 12)
    kinds = {1: "B", 3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}  # BYTE, SHORT, LONG, IFD, LONG8, IFD8
    at = struct.unpack_from(off, data, 8 if big else 4)[0]
    count = struct.unpack_from(count_fmt, data, at)[0]
    first = at + struct.calcsize(count_fmt)
    if first + count * entry > len(data):  # a count no file this size holds: not read entry by entry
        raise struct.error("the directory runs past the end of the file")
    tags = {}
    for k in range(count):
        e = first + k * entry
        tag, kind = struct.unpack_from(bo + "HH", data, e)
        n = struct.unpack_from(off, data, e + 4)[0]
        if (
            tag not in (256, 257, 258, 262, 274, 277, 284, 339, 34665, 34853)
            or kind not in kinds
            or not 0 < n <= 16
        ):
            continue
        fmt = bo + kinds[kind] * n
        where = e + 4 + struct.calcsize(off)
        if struct.calcsize(fmt) > struct.calcsize(off):  # too long for the entry: stored elsewhere
            where = struct.unpack_from(off, data, where)[0]
        tags[tag] = struct.unpack_from(fmt, data, where)
    pages, seen = 1, {at}
    try:  # the pages after the first are only counted (a damaged chain ends the count)
        at = struct.unpack_from(off, data, first + count * entry)[0]
        while at and at not in seen:
            seen.add(at)
            count = struct.unpack_from(count_fmt, data, at)[0]
            pages += 1  # counted once its directory is there: a link into nothing is no page
            at = struct.unpack_from(off, data, at + struct.calcsize(count_fmt) + count * entry)[0]
    except (struct.error, OverflowError):  # OverflowError: a BigTIFF offset past 2^63
        pass
    return tags, pages


def _read_tiff_opencv(path: Path, max_pixels: int, warn, why: str) -> np.ndarray:
    """A TIFF Pillow cannot read (Pillow 13 does not recognise big-endian BigTIFF), decoded by OpenCV with
    read_image's checks: the pixel limit before decoding, the first page only (with a warning), signed and
    float samples refused, orientation applied once; refused where OpenCV would lose samples or bits (it
    reads gray + alpha as 8-bit gray) or change them (it premultiplies 8-bit RGBA)."""
    try:
        data = path.read_bytes()
        tags, pages = _tiff_first_page(data)
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    except (struct.error, OverflowError):  # OverflowError: a BigTIFF offset past 2^63, which struct refuses
        raise ImageError(
            f"{path}: cannot decode TIFF ({why}; its first directory is damaged or cut off)"
        ) from None

    def one(tag: int, default: int) -> int:
        return tags.get(tag, (default,))[0]

    _check_pixels(path, one(256, 0), one(257, 0), max_pixels)
    if pages > 1:
        (warn or _warn)(_frames_message(path, pages))
    if {2, 3} & set(tags.get(339, (1,))):  # SampleFormat: signed integers, floating point
        raise ImageError(f"{path}: floating-point or signed pixels are not supported; save as 8 or 16 bit")
    bits, spp = max(tags.get(258, (1,))), one(277, 1)
    if bits > 8 and one(284, 1) == 2 and spp > 1:
        raise ImageError(
            f"{path}: 16-bit TIFF with separate colour planes (PlanarConfiguration 2) is not "
            "supported; save it with interleaved (contiguous) samples"
        )
    arr = _imdecode(_tiff_upright(data))
    if arr is None:
        raise ImageError(f"{path}: cannot decode TIFF ({why}; OpenCV cannot either)")
    if arr.dtype != np.uint16 and arr.dtype != np.uint8:
        raise ImageError(f"{path}: {arr.dtype} pixels are not supported; save as 8 or 16 bit")
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    # Gray (PhotometricInterpretation 0, 1) and RGB (2) must come back with every sample and every bit.
    if arr.dtype != (np.uint16 if bits > 8 else np.uint8) or (one(262, 1) in (0, 1, 2) and channels != spp):
        raise ImageError(
            f"{path}: cannot decode TIFF ({why}; OpenCV reads its {spp} samples of {bits} bits as "
            f"{channels} of {arr.dtype.itemsize * 8}); save it as PNG or classic TIFF"
        )
    if arr.dtype == np.uint8 and channels == 4:  # libtiff's RGBA reader, which OpenCV uses for 8 bits
        raise ImageError(
            f"{path}: cannot decode TIFF ({why}; OpenCV premultiplies its 8-bit alpha, changing the "
            "colours); save it as PNG or classic TIFF"
        )
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    # OpenCV gives a palette's colours as RGB; of a gray palette read_image gives gray, as from Pillow.
    if one(262, 1) == 3 and arr.ndim == 3 and arr.shape[2] == 3:
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
            arr = np.ascontiguousarray(arr[..., 0])
    return _apply_orientation(arr, one(274, 1))


def _tiff_upright(data: bytes) -> bytes:
    """TIFF bytes with the first page's Orientation tag (274) set to 1 (classic and BigTIFF)."""
    head = data[:4]
    if head not in TIFF_MAGIC:
        return data
    bo = "<" if head[:2] == b"II" else ">"
    big = head[2:] in (b"+\x00", b"\x00+")
    try:
        if big:
            ifd = struct.unpack_from(bo + "Q", data, 8)[0]
            count, first, size = struct.unpack_from(bo + "Q", data, ifd)[0], ifd + 8, 20
        else:
            ifd = struct.unpack_from(bo + "I", data, 4)[0]
            count, first, size = struct.unpack_from(bo + "H", data, ifd)[0], ifd + 2, 12
        for k in range(count):
            at = first + k * size
            tag, kind = struct.unpack_from(bo + "HH", data, at)
            if tag == 274 and kind in (3, 4, 16):  # SHORT (LONG, LONG8): the value sits in the entry
                out = bytearray(data)
                struct.pack_into(bo + {3: "H", 4: "I", 16: "Q"}[kind], out, at + (12 if big else 8), 1)
                return bytes(out)
    except (struct.error, OverflowError):  # a damaged directory: OpenCV will say what it makes of it
        pass
    return data


def _imdecode(data: bytes) -> np.ndarray | None:
    """cv2.imdecode of the bytes, None where OpenCV cannot decode them, including where it raises rather
    than returning None (a width or height over its CV_IO_MAX_IMAGE_WIDTH/HEIGHT, say)."""
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None


def _warn(message: str) -> None:  # read_image's own `warn` argument hides messages.warn there
    warn(message)


def _quiet(message: str) -> None:
    pass


def _as_tuple(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def _png_exif(im: Image.Image, path: Path) -> tuple[Image.Exif, bool]:
    """A PNG's EXIF, as im.getexif() gives it, without decoding the pixels, and whether the file runs to
    its IEND chunk. PngImageFile.getexif() decodes the image to reach the chunks after the pixels (a late
    eXIf, XMP or EXIF as text), which doubled a 16-bit PNG's read time as OpenCV then decodes it. Those
    chunks are read here by Pillow's own chunk reader into im.info, as its load() would put them, and
    Image.getexif (not PNG's, which would load) reads them from there."""
    whole = False
    with open(path, "rb") as f:
        f.seek(8)  # the PNG signature
        png = PngImagePlugin.PngStream(f)
        pixels = after = False  # in the IDAT chunks, past them: where load() reads the chunks again
        while True:
            try:
                cid, pos, length = png.read()
            except (struct.error, SyntaxError):  # cut off, or a broken chunk: load() stops there too
                break
            after = after or (pixels and cid != b"IDAT")
            pixels = pixels or cid == b"IDAT"
            if cid == b"IEND" or (after and cid == b"fcTL"):  # the end, or an APNG's next frame
                whole = True
                break
            if after:
                try:
                    png.call(cid, pos, length)
                except (EOFError, AttributeError):  # a chunk load() skips (AttributeError: an unknown one)
                    f.seek(pos + length)
                except UnicodeDecodeError:  # load() stops at a text chunk it cannot decode
                    break
            else:  # read by Image.open already, or the pixels
                f.seek(length, 1)
            f.seek(4, 1)  # the CRC, which load() does not check either
    im.info.update(png.im_info)
    return Image.Image.getexif(im), whole


def _pnm_maxval(path: Path) -> int:
    """The maxval of a binary or ASCII PPM/PGM header (P2, P3, P5, P6); > 255 means 16-bit samples.
    Bitmaps (P1, P4) have none: 1."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:2] not in (b"P2", b"P3", b"P5", b"P6"):
        return 1
    tokens = []
    for line in head.split(b"\n"):
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 4:
            break
    try:
        return int(tokens[3])
    except (IndexError, ValueError):
        return 255


def _png_ihdr(path: Path) -> tuple[int, int]:
    """A PNG's bit depth and colour type (0 gray, 2 RGB, 3 palette, 4 gray + alpha, 6 RGBA); (0, -1) for
    other files."""
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 26:
        return head[24], head[25]
    return 0, -1


def encode_image(arr: np.ndarray, suffix: str, jpeg_quality: int = 95) -> bytes:
    """uint8 or uint16 pixels (HxW or HxWx1 gray, HxWx2 gray + alpha, HxWx3 RGB, HxWx4 RGBA) encoded by
    the suffix. Gray + alpha stays gray + alpha in PNG (8 and 16 bits) and 8-bit TIFF; WebP has no gray
    mode and is given RGBA, as is 16-bit TIFF (Pillow cannot read 16-bit gray + alpha TIFF back); JPEG
    and BMP, which have no alpha, get the gray channel."""
    suffix = suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"cannot write {suffix!r} images; use one of {', '.join(sorted(WRITE_SUFFIXES))}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4)) or 0 in arr.shape:
        raise ValueError(
            f"cannot write an array of shape {arr.shape} as an image (HxW, HxWx1, HxWx2, HxWx3 or HxWx4)"
        )
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"cannot write {arr.dtype} pixels as an image (uint8 or uint16)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]  # HxWx1 (what the Restorer gives back for HxWx1) is a gray image
    if arr.ndim == 3 and arr.shape[2] == 2:  # gray + alpha: OpenCV writes neither
        if suffix == ".png":
            return _png_gray_alpha(arr)
        if suffix in (".tif", ".tiff") and arr.dtype == np.uint8:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(arr), "LA").save(buf, "TIFF", compression="tiff_lzw")
            return buf.getvalue()
        arr = arr[..., [0, 0, 0, 1]] if suffix in ALPHA_SUFFIXES else arr[..., 0]
    if arr.ndim == 3:
        if suffix not in ALPHA_SUFFIXES and arr.shape[2] == 4:
            arr = arr[..., :3]  # these formats have no alpha
        code = cv2.COLOR_RGBA2BGRA if arr.shape[2] == 4 else cv2.COLOR_RGB2BGR
        arr = cv2.cvtColor(arr, code)
    if arr.dtype == np.uint16 and suffix not in DEEP_SUFFIXES:
        arr = (arr.astype(np.float32) / 257.0).round().astype(np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if suffix in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(suffix, arr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {suffix} image")
    return buf.tobytes()


def gray_as_colour(arr: np.ndarray, suffix: str) -> bool:
    """Whether encode_image gives this gray (HxW, HxWx1) or gray + alpha (HxWx2) array colour channels: WebP
    has no gray mode, and 16-bit gray + alpha TIFF is written as RGBA (Pillow cannot read it back)."""
    suffix = suffix.lower()
    if arr.ndim == 3 and arr.shape[2] > 2:
        return False
    gray_alpha = arr.ndim == 3 and arr.shape[2] == 2
    return suffix == ".webp" or (gray_alpha and arr.dtype == np.uint16 and suffix in (".tif", ".tiff"))


def _png_gray_alpha(arr: np.ndarray) -> bytes:
    """An HxWx2 uint8 or uint16 array as a gray + alpha PNG (colour type 4), each row "Up" filtered."""
    import zlib

    h, w = arr.shape[:2]
    depth = 8 * arr.dtype.itemsize
    rows = np.ascontiguousarray(arr, arr.dtype.newbyteorder(">")).view(np.uint8).reshape(h, -1)
    up = rows.copy()
    up[1:] -= rows[:-1]  # uint8 arithmetic wraps: the PNG "Up" filter
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1).tobytes()  # filter type 2 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, 4, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def current_umask() -> int:
    """The process's umask, read from /proc/self/status (Linux 4.7 on) where it says it: os.umask reads
    it only by setting it, for a moment, in which a file another thread made got mode 0666 (the
    transcoder around qairn video's workers, a log rotating). Read each time: a daemon sets its own
    umask after its imports."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_atomic(path: str | Path, data) -> None:
    """Write `data` to `path` via a temp file in the same folder and an atomic rename. data: bytes, or a
    function that writes into the open file (`lambda f: torch.save(ckpt, f)`: a checkpoint is then not
    built in memory first). The data reaches
    the disk before the rename: else a crash just after it could leave `path` empty or cut short
    (the rename is journaled before the data on some file systems), where the old file had been whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def path_arg(text: str) -> str:
    """argparse type of an option naming a file or folder: '' (an unset shell variable) is refused.
    Path('') is the working folder: --data '' evaluated every image under it, and --json '' was
    taken as not asked for, so that no report was written and nothing said."""
    if not text:
        raise argparse.ArgumentTypeError("an empty name, not a file or folder")
    return text


def check_writable(*paths: str | Path | None) -> None:
    """Refuse, before any work, output paths whose folder is missing or read-only (None: not asked for),
    so a long evaluation or benchmark does not end by failing to write what it measured."""
    for p in filter(None, paths):
        folder = Path(p).resolve().parent
        if not folder.is_dir():
            raise FileNotFoundError(f"{p}: output folder does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):  # (as restore --json: its mode, a read-only mount)
            raise PermissionError(f"{p}: output folder is not writable")
        if Path(p).is_dir():  # the rename onto it would fail only after the whole run
            raise IsADirectoryError(f"{p}: is a directory; give a file name")


def check_distinct(outputs: dict, inputs: dict) -> None:
    """Refuse, before any work, outputs ({flag: path or None}) naming one file (the last written
    replaced the other) or an input ({what: path or None}; a report renamed over the weights left no
    model): SystemExit in one line."""
    named = [(flag, out, Path(out).resolve()) for flag, out in outputs.items() if out]
    for i, (flag, out, path) in enumerate(named):
        for other, other_out, other_path in named[i + 1 :]:
            if path == other_path:
                raise SystemExit(f"{flag} and {other} name the same file: {other_out}")
        for what, src in inputs.items():
            if src and path == Path(src).resolve():
                raise SystemExit(f"{flag} {out}: is {what}; write to another file")


def check_figure(path: str | Path | None) -> None:
    """--plot names a PNG (save_figure writes one): r.pdf or r.jpg got PNG bytes under its name,
    found out only once the run was over. None: no figure asked for."""
    if path and Path(path).suffix.lower() != ".png":
        raise ValueError(f"--plot {path}: the figure is written as PNG; give a name ending in .png")


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """A matplotlib figure as PNG, written atomically like every other output."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())


ICC_SUFFIXES = {".png", ".jpg", ".jpeg"}  # where write_image keeps a colour profile


def read_icc(path: str | Path) -> bytes | None:
    """The file's embedded ICC colour profile, or None. Phones write Display P3 and cameras Adobe RGB:
    an output without the profile would be shown as sRGB, with visibly different colours."""
    try:
        if _magic(Path(path)) == b"MM\x00+":  # Pillow 13 cannot open a big-endian BigTIFF
            return _bigtiff_metadata(Path(path))[0]
        with _pillow_open(path, Path(path)) as im:
            return im.info.get("icc_profile") or None
    except (OSError, ValueError, SyntaxError, struct.error, OverflowError):
        return None


def icc_space(icc: bytes) -> str:
    """A profile's colour space, from its header (bytes 16-20): "RGB", "GRAY", "CMYK", ..."""
    return icc[16:20].decode("ascii", "replace").strip()


def icc_fits(icc: bytes, arr: np.ndarray) -> bool:
    """Whether a profile describes these pixels: an RGB profile for colour, a gray one for gray.
    A CMYK JPEG's profile does not fit its RGB decode."""
    return icc_space(icc) == ("GRAY" if arr.ndim == 2 or arr.shape[2] <= 2 else "RGB")


def with_icc(data: bytes, suffix: str, icc: bytes) -> bytes:
    """Encoded PNG or JPEG bytes with the ICC profile embedded: a PNG iCCP chunk after IHDR, or JPEG
    APP2 ICC_PROFILE segments after SOI (and JFIF's APP0). Other formats come back unchanged."""
    import zlib

    suffix = suffix.lower()
    if suffix == ".png":
        body = b"ICC Profile\x00\x00" + zlib.compress(icc)  # name, NUL, compression method 0
        chunk = struct.pack(">I", len(body)) + b"iCCP" + body + struct.pack(">I", zlib.crc32(b"iCCP" + body))
        at = 8 + 8 + 13 + 4  # signature, then IHDR (length, type, 13 data bytes, CRC)
        return data[:at] + chunk + data[at:]
    if suffix in (".jpg", ".jpeg"):
        step = 65519  # the most one APP2 segment holds after its 14-byte ICC header
        parts = [icc[i : i + step] for i in range(0, len(icc), step)]
        segments = b"".join(
            b"\xff\xe2"
            + struct.pack(">H", 2 + 14 + len(part))
            + b"ICC_PROFILE\x00"
            + bytes([k + 1, len(parts)])
            + part
            for k, part in enumerate(parts)
        )
        at = 2
        if data[2:4] == b"\xff\xe0":  # JFIF's APP0 must stay first
            at = 4 + struct.unpack(">H", data[4:6])[0]
        return data[:at] + segments + data[at:]
    return data


EXIF_SUFFIXES = {".png", ".jpg", ".jpeg"}  # where write_image keeps EXIF metadata
# A TIFF's first IFD mixes the photo's record (make, date, resolution, XMP, the Exif and GPS IFDs) with
# the file's own layout: sizes, sample format, compression, strips and tiles, colour map, ICC profile
# (kept on its own). The layout tags do not describe the restored file and are dropped.
TIFF_LAYOUT_TAGS = {
    0x00FE, 0x00FF, 0x0100, 0x0101, 0x0102, 0x0103, 0x0106, 0x0111, 0x0115, 0x0116, 0x0117, 0x0118,
    0x0119, 0x011C, 0x013D, 0x0140, 0x0141, 0x0142, 0x0143, 0x0144, 0x0145, 0x014A, 0x0152, 0x0153,
    0x0154, 0x0155, 0x015B, 0x0200, 0x0201, 0x0202, 0x0211, 0x0212, 0x0213, 0x0214, 0x8773,
}  # fmt: skip


def read_exif(path: str | Path, size: tuple[int, int] | None = None) -> bytes | None:
    """The file's EXIF block (TIFF bytes, no "Exif" header) ready to go with the restored pixels, or None.
    read_image has already turned the pixels upright, so the orientation tag is removed (a viewer would
    rotate them twice), and size=(width, height) rewrites the EXIF pixel dimensions to match."""
    try:
        # Pillow 13 cannot open a big-endian BigTIFF, and of a little-endian one it skips the Exif and GPS
        # directories (IFD8 pointers) and writes the block with a BigTIFF header, which EXIF cannot have.
        if _magic(Path(path)) in (b"MM\x00+", b"II+\x00"):
            return _exif_block(_bigtiff_metadata(Path(path))[1], True, size)
        with _pillow_open(path, Path(path)) as im:  # open while the block is made: the Exif IFD is read then
            # A PNG's getexif() decodes the pixels to see the chunks after them: read_image has done so.
            exif = _png_exif(im, Path(path))[0] if im.format == "PNG" else im.getexif()
            return _exif_block(exif, im.format == "TIFF", size)
    except (OSError, ValueError, SyntaxError, struct.error, OverflowError):
        return None  # unreadable metadata is dropped, never a reason to fail the restore


def _exif_block(exif: Image.Exif, tiff: bool, size: tuple[int, int] | None) -> bytes | None:
    """read_exif's block of this EXIF, None if there is nothing to carry."""
    if tiff:  # Pillow gives a TIFF's whole first IFD: keep its record, not its layout
        for tag in [t for t in exif if t in TIFF_LAYOUT_TAGS]:
            del exif[tag]
    exif.pop(0x0112, None)  # Orientation
    if not exif:  # (after the orientation: a block of it alone would be written empty)
        return None
    if size is not None and 0x8769 in exif:  # (reading an absent IFD would add an empty one)
        sub = exif.get_ifd(0x8769)  # the Exif IFD: PixelXDimension, PixelYDimension
        for tag, value in zip((0xA002, 0xA003), size):
            if tag in sub:
                sub[tag] = value
    try:
        data = exif.tobytes()
    except (AttributeError, TypeError):  # Pillow's writer, given a value of a type its tag cannot have
        return None  # (a damaged file: Make as a RATIONAL, XResolution as BYTE): dropped like the unreadable
    return data[6:] if data.startswith(b"Exif\x00\x00") else data


def _bigtiff_metadata(path: Path) -> tuple[bytes | None, Image.Exif]:
    """A BigTIFF's ICC profile and EXIF (its first directory, with the Exif and GPS directories it points
    to) as a classic TIFF's. Pillow 13 cannot open a big-endian one: it takes a BigTIFF for one where
    byte 2 is 43, true of the little-endian mark only. Its directory reader still reads them, given a
    little-endian BigTIFF mark and the byte order apart (prefix). The Exif and GPS pointers come from
    _tiff_first_page: a BigTIFF has them as IFD8, a type Pillow skips."""
    data = path.read_bytes()
    tags, _ = _tiff_first_page(data)
    fp = io.BytesIO(data)
    head = b"II+\x00\x08\x00\x00\x00" + data[8:16]
    order = ">" if data[:2] == b"MM" else "<"

    def directory(at: int, group: int | None = None) -> dict:
        ifd = TiffImagePlugin.ImageFileDirectory_v2(head, prefix=data[:2], group=group)
        fp.seek(at)
        ifd.load(fp)
        return {k: v[0] if isinstance(v, tuple) and len(v) == 1 else v for k, v in ifd.items()}  # as Exif has

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's "Possibly corrupt EXIF data": what is damaged is dropped
        first = directory(struct.unpack_from(order + "Q", data, 8)[0])
        icc = first.pop(0x8773, None)
        exif = Image.Exif()  # written as a classic TIFF structure, big-endian
        for tag in (0x8769, 0x8825):  # Exif, GPS
            first.pop(tag, None)
            if tags.get(tag, (0,))[0]:  # (0: no directory)
                sub = directory(tags[tag][0], tag)
                sub.pop(0xA005, None)  # the Interop directory's pointer: not followed here, so not carried
                exif.get_ifd(tag).update(sub)  # before exif[tag] is set: get_ifd would then look in a file
                exif[tag] = tags[tag][0]
        for tag, value in first.items():
            exif[tag] = value
    return (icc if isinstance(icc, bytes) and icc else None), exif


def with_exif(data: bytes, suffix: str, exif: bytes) -> bytes:
    """Encoded PNG or JPEG bytes with an EXIF block embedded: a PNG eXIf chunk after IHDR, or a JPEG
    APP1 "Exif" segment after SOI (and JFIF's APP0). Other formats come back unchanged."""
    import zlib

    suffix = suffix.lower()
    if suffix == ".png":
        chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
        at = 8 + 8 + 13 + 4  # signature, then IHDR
        return data[:at] + chunk + data[at:]
    if suffix in (".jpg", ".jpeg"):
        body = b"Exif\x00\x00" + exif
        if len(body) + 2 > 0xFFFF:
            return data  # one APP1 segment is all EXIF may use; a block this big is dropped
        at = 4 + struct.unpack(">H", data[4:6])[0] if data[2:4] == b"\xff\xe0" else 2
        return data[:at] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + data[at:]
    return data


def write_image(
    path: str | Path,
    arr: np.ndarray,
    jpeg_quality: int = 95,
    icc: bytes | None = None,
    exif: bytes | None = None,
) -> None:
    """Encode by the path's suffix and write atomically; icc: a colour profile, exif: an EXIF block
    (read_exif) to embed (PNG, JPEG)."""
    path = Path(path)
    try:
        data = encode_image(arr, path.suffix, jpeg_quality)
    except ValueError as e:  # an unknown suffix, an array that is not an image
        raise ImageError(f"{path}: {e}") from None
    if icc:
        data = with_icc(data, path.suffix, icc)
    if exif:  # after the profile, so a JPEG reads SOI, APP0, APP1 (EXIF), APP2 (ICC) as viewers expect
        data = with_exif(data, path.suffix, exif)
    write_atomic(path, data)
