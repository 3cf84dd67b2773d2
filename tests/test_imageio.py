"""qairn.engine.imageio: reading and writing image files (depths, orientation, gray, round trips)."""

import io
import re
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

from qairn.engine.imageio import ImageError, read_image, with_exif, write_image

TRANSPOSE = {  # EXIF orientation -> the Pillow operation that turns the stored pixels upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(arr: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels turned upright, by Pillow on an in-memory index image (not our numpy ops)."""
    h, w = arr.shape[:2]
    index = Image.fromarray(np.arange(h * w, dtype=np.int32).reshape(h, w))
    if orientation in TRANSPOSE:
        index = index.transpose(TRANSPOSE[orientation])
    return arr.reshape(h * w, *arr.shape[2:])[np.asarray(index)]


def tiff_bytes(
    arr: np.ndarray, orientation: int = 1, order: str = "<", big: bool = False, planar: int = 1, extra=()
) -> bytes:
    """An uncompressed TIFF (classic or BigTIFF, either byte order, interleaved samples in one strip or
    planar=2: one strip per plane) written by hand, so that depth, channels, layout and the orientation
    tag are exactly what the test says; extra: more entries (tag, (type, struct format), values), or ones
    that replace the helper's."""
    h, w = arr.shape[:2]
    spp = 1 if arr.ndim == 2 else arr.shape[2]
    layout = np.moveaxis(arr, 2, 0) if planar == 2 and spp > 1 else arr
    pixels = np.ascontiguousarray(layout).astype(arr.dtype.newbyteorder(order)).tobytes()
    pixels += b"\0" * (len(pixels) % 2)
    head = 16 if big else 8
    strips = spp if planar == 2 else 1
    strip = len(arr.tobytes()) // strips
    short, long_ = (3, "H"), (16 if big else 4, "Q" if big else "I")
    entries = [
        (256, long_, [w]),
        (257, long_, [h]),
        (258, short, [arr.dtype.itemsize * 8] * spp),
        (259, short, [1]),  # no compression
        (262, short, [1 if spp < 3 else 2]),  # min-is-black gray, or RGB
        (273, long_, [head + k * strip for k in range(strips)]),  # the strips right after the header
        (274, short, [orientation]),
        (277, short, [spp]),
        (278, long_, [h]),
        (279, long_, [strip] * strips),
        (284, short, [planar]),
    ] + ([(338, short, [2])] if spp in (2, 4) else [])  # unassociated alpha
    entries = sorted({e[0]: e for e in entries + list(extra)}.values(), key=lambda e: e[0])  # extra wins
    ifd = head + len(pixels)
    mark = b"II" if order == "<" else b"MM"
    if big:
        header = mark + struct.pack(order + "HHHQ", 43, 8, 0, ifd)
    else:
        header = mark + struct.pack(order + "HI", 42, ifd)
    return header + pixels + ifd_bytes(entries, order, big, ifd)


def ifd_bytes(entries, order: str, big: bool, at: int) -> bytes:
    """A TIFF directory to be placed at offset `at`, its values too long for an entry right after it.
    An entry is (tag, (type, struct format of one value), the numbers of all its values)."""
    size, inline = (20, 8) if big else (12, 4)
    extra_at = at + (8 if big else 2) + size * len(entries) + (8 if big else 4)
    table, extra = b"", b""
    for tag, (kind, fmt), values in entries:
        count = len(values) // len(fmt)  # a RATIONAL ("II") is two numbers
        value = struct.pack(order + fmt * count, *values)
        if len(value) > inline:
            value_at = extra_at + len(extra)
            extra += value + b"\0" * (len(value) % 2)
            value = struct.pack(order + ("Q" if big else "I"), value_at)
        table += struct.pack(order + ("HHQ" if big else "HHI"), tag, kind, count) + value.ljust(inline, b"\0")
    count = struct.pack(order + ("Q" if big else "H"), len(entries))
    return count + table + struct.pack(order + ("Q" if big else "I"), 0) + extra


def with_sub_ifd(data: bytes, tag: int, entries) -> bytes:
    """tiff_bytes' file with a directory (Exif, GPS) appended, its offset put in the first page's `tag`
    entry (given to tiff_bytes in `extra` with a 0)."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\0", b"\0+")
    size, off = (20, "Q") if big else (12, "I")
    data += b"\0" * (len(data) % 2)
    out = bytearray(data + ifd_bytes(entries, order, big, len(data)))
    first = struct.unpack_from(order + off, data, 8 if big else 4)[0]
    for k in range(struct.unpack_from(order + ("Q" if big else "H"), data, first)[0]):
        entry = first + (8 if big else 2) + k * size
        if struct.unpack_from(order + "H", data, entry)[0] == tag:
            kind = struct.unpack_from(order + "H", data, entry + 2)[0]
            at = entry + (12 if big else 8)  # the entry's value
            struct.pack_into(order + ("Q" if kind in (16, 18) else "I"), out, at, len(data))
            return bytes(out)
    raise KeyError(tag)


def rand(shape, dtype, seed=0):
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


# ---- orientation ------------------------------------------------------------------------------------
def test_hand_written_tiff_reads_as_written():
    """The helper's files are real TIFFs: Pillow reads them back as written, orientation and all."""
    for arr in (rand((5, 7), np.uint8), rand((5, 7), np.uint16), rand((5, 7, 3), np.uint8)):
        for order, orientation in (("<", 3), (">", 6)):
            with Image.open(io.BytesIO(tiff_bytes(arr, orientation, order))) as im:
                assert im.getexif().get(0x0112) == orientation
                np.testing.assert_array_equal(
                    np.asarray(ImageOps.exif_transpose(im)), upright(arr, orientation)
                )


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("channels", [0, 3, 4])
def test_16bit_tiff_orientation_is_applied_once(tmp_path, orientation, channels):
    """OpenCV's TIFF reader turns 16-bit pixels by the orientation tag itself; they were turned again."""
    arr = rand((6, 4, channels) if channels else (6, 4), np.uint16, seed=orientation)
    (tmp_path / "o.tif").write_bytes(tiff_bytes(arr, orientation))
    got = read_image(tmp_path / "o.tif")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, upright(arr, orientation))


@pytest.mark.parametrize("order, big", [(">", False), ("<", True), (">", True)])  # MM BigTIFF: OpenCV
def test_16bit_tiff_orientation_big_endian_and_bigtiff(tmp_path, order, big):
    arr = rand((5, 3, 3), np.uint16, seed=7)
    for orientation in (1, 3, 6, 7):
        (tmp_path / "o.tif").write_bytes(tiff_bytes(arr, orientation, order, big))
        np.testing.assert_array_equal(read_image(tmp_path / "o.tif"), upright(arr, orientation))


def test_16bit_tiff_written_by_pillow_with_orientation(tmp_path):
    arr = rand((6, 4), np.uint16, seed=1)
    for orientation in range(1, 9):
        Image.fromarray(arr).save(tmp_path / "p.tif", tiffinfo={274: orientation})
        np.testing.assert_array_equal(read_image(tmp_path / "p.tif"), upright(arr, orientation))


def test_16bit_png_exif_orientation_is_applied(tmp_path):
    """OpenCV leaves a PNG's eXIf orientation alone: read_image must still apply it (once)."""
    arr = rand((6, 4, 3), np.uint16, seed=2)
    exif = Image.new("L", (1, 1)).getexif()
    exif[0x0112] = 6
    block = exif.tobytes()
    block = block[6:] if block.startswith(b"Exif\0\0") else block
    ok, buf = cv2.imencode(".png", arr[..., ::-1])
    (tmp_path / "o.png").write_bytes(with_exif(buf.tobytes(), ".png", block))
    np.testing.assert_array_equal(read_image(tmp_path / "o.png"), upright(arr, 6))


@pytest.mark.parametrize("mode, channels", [("L", 0), ("RGBA", 4), ("RGB", 3)])
def test_8bit_uncompressed_tiff_orientation(tmp_path, mode, channels):
    """Pillow memory-maps uncompressed TIFFs; transposing the mapped gray/RGBA image (orientations
    5-8) gave wrong pixels."""
    arr = rand((6, 4, channels) if channels else (6, 4), np.uint8, seed=3)
    for orientation in range(1, 9):
        Image.fromarray(arr, mode).save(tmp_path / "o.tif", tiffinfo={274: orientation})
        got = read_image(tmp_path / "o.tif")
        np.testing.assert_array_equal(got, upright(arr, orientation), err_msg=f"orientation {orientation}")
        got[0, 0] = 0  # a writable array of its own


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("orientation", [6, 7])
def test_converted_modes_are_turned_once(tmp_path, suffix, orientation):
    """Palette and 1-bit images are converted before they are turned upright (Pillow turns a TIFF on
    load): still exactly once."""
    index = np.random.default_rng(orientation).integers(0, 4, (6, 4)).astype(np.uint8)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    bits = index % 2 == 1
    for arr, expected in ((index, palette[index]), (bits, bits * np.uint8(255))):
        im = Image.fromarray(arr, "P" if arr.dtype == np.uint8 else None)
        if im.mode == "P":
            im.putpalette(palette.flatten().tolist())
        exif = im.getexif()
        exif[0x0112] = orientation
        if suffix == ".tif":
            im.save(tmp_path / f"c{suffix}", tiffinfo={274: orientation})
        else:
            im.save(tmp_path / f"c{suffix}", exif=exif)
        np.testing.assert_array_equal(read_image(tmp_path / f"c{suffix}"), upright(expected, orientation))


# ---- depths and modes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("magic, maxval, channels", [(b"P5", 1023, 0), (b"P6", 4095, 3), (b"P5", 4095, 0)])
def test_10_and_12_bit_pnm_fill_the_16_bit_range(tmp_path, magic, maxval, channels):
    shape = (5, 7, channels) if channels else (5, 7)
    codes = np.random.default_rng(maxval).integers(0, maxval + 1, shape).astype(np.uint16)
    codes.flat[0], codes.flat[1] = 0, maxval  # both ends of the range
    path = tmp_path / ("x.ppm" if channels else "x.pgm")
    path.write_bytes(magic + b"\n# a comment\n7 5\n%d\n" % maxval + codes.astype(">u2").tobytes())
    got = read_image(path)
    assert got.dtype == np.uint16 and got.shape == shape
    np.testing.assert_array_equal(got, np.round(codes * (65535 / maxval)).astype(np.uint16))
    assert got.flat[0] == 0 and got.flat[1] == 65535


def test_ascii_10_bit_pgm_and_full_16_bit_pnm(tmp_path):
    codes = np.array([[0, 1, 512], [1000, 1022, 1023]], np.uint16)
    text = " ".join(map(str, codes.flatten())).encode()
    (tmp_path / "a.pgm").write_bytes(b"P2\n3 2\n1023\n" + text + b"\n")
    np.testing.assert_array_equal(
        read_image(tmp_path / "a.pgm"), np.round(codes * (65535 / 1023)).astype(np.uint16)
    )
    full = rand((4, 3), np.uint16, seed=4)  # maxval 65535: the samples as they are
    (tmp_path / "f.pgm").write_bytes(b"P5 3 4 65535\n" + full.astype(">u2").tobytes())
    np.testing.assert_array_equal(read_image(tmp_path / "f.pgm"), full)


def test_16_bit_tiff_with_separate_planes_is_refused_not_garbled(tmp_path):
    """OpenCV reads a 16-bit TIFF's separate R, G, B planes as if interleaved: refused in one line.
    8-bit planes (Pillow) and a one-plane 16-bit gray image are read as they are."""
    rgb16 = rand((5, 3, 3), np.uint16, seed=8)
    for order in "<>":
        (tmp_path / "p.tif").write_bytes(tiff_bytes(rgb16, order=order, planar=2))
        with pytest.raises(ImageError, match="p.tif: 16-bit TIFF with separate colour planes"):
            read_image(tmp_path / "p.tif")
    rgb8 = rand((5, 3, 3), np.uint8, seed=9)
    (tmp_path / "p8.tif").write_bytes(tiff_bytes(rgb8, planar=2))
    np.testing.assert_array_equal(read_image(tmp_path / "p8.tif"), rgb8)
    gray16 = rand((5, 3), np.uint16, seed=10)
    (tmp_path / "g.tif").write_bytes(tiff_bytes(gray16, order=">", planar=2))
    np.testing.assert_array_equal(read_image(tmp_path / "g.tif"), gray16)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_1_bit_images_are_gray(tmp_path, suffix):
    bits = np.random.default_rng(5).integers(0, 2, (5, 9)).astype(bool)
    Image.fromarray(bits).save(tmp_path / f"b{suffix}")
    with Image.open(tmp_path / f"b{suffix}") as im:
        assert im.mode == "1"
    got = read_image(tmp_path / f"b{suffix}")
    assert got.dtype == np.uint8 and got.shape == (5, 9)
    np.testing.assert_array_equal(got, bits * np.uint8(255))


def test_1_bit_pbm_is_gray(tmp_path):
    (tmp_path / "b.pbm").write_bytes(b"P1\n3 2\n1 0 1\n0 0 1\n")
    got = read_image(tmp_path / "b.pbm")
    np.testing.assert_array_equal(got, np.array([[0, 255, 0], [255, 255, 0]], np.uint8))  # 1 is black


# ---- writing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp", ".jpg"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_one_channel_arrays_are_written_gray(tmp_path, suffix, dtype):
    arr = rand((6, 5, 1), dtype, seed=6)
    write_image(tmp_path / f"g{suffix}", arr)
    with Image.open(tmp_path / f"g{suffix}") as im:
        assert im.mode in ("L", "I;16", "I;16B", "I"), im.mode
    got = read_image(tmp_path / f"g{suffix}")
    assert got.shape == (6, 5)
    if suffix in (".png", ".tif"):  # lossless, 16 bits kept
        np.testing.assert_array_equal(got, arr[..., 0])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 3), (7, 5, 4)])
def test_round_trip_is_exact(tmp_path, suffix, dtype, shape):
    arr = rand(shape, dtype, seed=len(shape) + dtype().itemsize)
    write_image(tmp_path / f"r{suffix}", arr)
    got = read_image(tmp_path / f"r{suffix}")
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".bmp"])
def test_eight_bit_formats_take_16_bit_arrays_scaled(tmp_path, suffix):
    arr = np.full((8, 8, 3), 257 * 200, np.uint16)
    write_image(tmp_path / f"s{suffix}", arr)
    got = read_image(tmp_path / f"s{suffix}")
    assert got.dtype == np.uint8 and abs(int(got.mean()) - 200) <= 2


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("suffix", [".png", ".tif", ".webp", ".jpg", ".bmp"])
def test_gray_alpha_arrays_are_written(tmp_path, suffix, dtype):
    """HxWx2 (gray + alpha) failed with a raw OpenCV channel error. PNG keeps it gray + alpha at 8 and
    16 bits, 8-bit TIFF too; WebP (no gray mode) and 16-bit TIFF get RGBA, JPEG and BMP the gray."""
    arr = rand((7, 5, 2), dtype, seed=11)
    write_image(tmp_path / f"ga{suffix}", arr)
    path = str(tmp_path / f"ga{suffix}")
    got = cv2.imread(path, cv2.IMREAD_UNCHANGED)  # BGRA for a gray + alpha PNG: gray in B, G and R
    gray = arr[..., 0]
    if suffix == ".png":
        assert (tmp_path / "ga.png").read_bytes()[25] == 4  # IHDR colour type 4: gray + alpha
        assert got.dtype == dtype
        np.testing.assert_array_equal(got[..., [0, 3]], arr)
        np.testing.assert_array_equal(got[..., 2], gray)
    elif suffix == ".tif" and dtype == np.uint8:
        with Image.open(path) as im:
            assert im.mode == "LA"
            np.testing.assert_array_equal(np.asarray(im), arr)
    elif suffix in (".tif", ".webp"):
        assert got.shape == (7, 5, 4)
        if suffix == ".tif":
            np.testing.assert_array_equal(got, arr[..., [0, 0, 0, 1]])
    else:
        assert got.shape == (7, 5)
        if suffix == ".bmp":
            np.testing.assert_array_equal(got, gray if dtype == np.uint8 else (gray / 257).round())


@pytest.mark.parametrize(
    "arr, says",
    [
        (np.zeros((4, 3, 5), np.uint8), "cannot write an array of shape (4, 3, 5) as an image"),
        (np.zeros((4, 3, 2, 1), np.uint8), "cannot write an array of shape (4, 3, 2, 1) as an image"),
        (np.zeros((4, 3), np.float32), "cannot write float32 pixels as an image (uint8 or uint16)"),
    ],
)
def test_write_refuses_what_is_not_an_image_naming_the_path(tmp_path, arr, says):
    with pytest.raises(ImageError, match=re.escape(f"{tmp_path / 'x.png'}: {says}")):
        write_image(tmp_path / "x.png", arr)
    assert list(tmp_path.iterdir()) == []


# ---- gray + alpha -------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("orientation", [1, 6])
def test_gray_alpha_files_are_read_gray_alpha(tmp_path, suffix, orientation):
    """An LA file came back RGBA: a gray input became a colour output. It is HxWx2, turned once."""
    arr = rand((6, 4, 2), np.uint8, seed=12)
    im = Image.fromarray(arr, "LA")
    if suffix == ".tif":
        im.save(tmp_path / f"la{suffix}", tiffinfo={274: orientation})
    else:
        exif = im.getexif()
        exif[0x0112] = orientation
        im.save(tmp_path / f"la{suffix}", exif=exif)
    got = read_image(tmp_path / f"la{suffix}")
    assert got.dtype == np.uint8 and got.shape == upright(arr, orientation).shape
    np.testing.assert_array_equal(got, upright(arr, orientation))


def test_16_bit_gray_alpha_png_is_read_gray_alpha(tmp_path):
    arr = rand((6, 4, 2), np.uint16, seed=13)
    write_image(tmp_path / "la16.png", arr)
    got = read_image(tmp_path / "la16.png")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_gray_alpha_round_trip_is_exact(tmp_path, dtype):
    arr = rand((7, 5, 2), dtype, seed=14)
    write_image(tmp_path / "r.png", arr)
    np.testing.assert_array_equal(read_image(tmp_path / "r.png"), arr)
    write_image(tmp_path / "r.tif", arr)  # 8-bit LA TIFF; 16 bits as RGBA (gray in R, G and B)
    np.testing.assert_array_equal(
        read_image(tmp_path / "r.tif"), arr if dtype == np.uint8 else arr[..., [0, 0, 0, 1]]
    )


def test_transparent_1_bit_and_gray_palette_images_are_gray(tmp_path):
    """A 1-bit or gray-palette image with transparency came back RGBA, a gray GIF RGB: now gray (+ alpha).
    A palette of colours is still RGB(A)."""
    bits = np.random.default_rng(15).integers(0, 2, (5, 9)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "b.png", transparency=0)
    got = read_image(tmp_path / "b.png")
    assert got.shape == (5, 9, 2)
    np.testing.assert_array_equal(got[..., 0], bits * np.uint8(255))
    np.testing.assert_array_equal(got[..., 1], bits * np.uint8(255))  # the black pixels are transparent
    gray = rand((5, 9), np.uint8, seed=16)
    Image.fromarray(gray).save(tmp_path / "g.gif")
    np.testing.assert_array_equal(read_image(tmp_path / "g.gif"), gray)  # a gray ramp: GIF keeps it
    Image.fromarray(gray).save(tmp_path / "t.gif", transparency=int(gray[0, 0]))
    got = read_image(tmp_path / "t.gif")
    assert got.shape == (5, 9, 2)
    np.testing.assert_array_equal(got[..., 0], gray)
    np.testing.assert_array_equal(got[..., 1], np.where(gray == gray[0, 0], 0, 255))
    colour = Image.fromarray(gray).convert("P")
    colour.putpalette([v for k in range(256) for v in (k, 255 - k, k)])
    colour.save(tmp_path / "c.png", transparency=int(gray[0, 0]))
    got = read_image(tmp_path / "c.png")
    assert got.shape == (5, 9, 4)
    np.testing.assert_array_equal(got[..., 1], 255 - gray)


# ---- colour-key transparency ------------------------------------------------------------------------
def png_bytes(codes: np.ndarray, depth: int, trns: tuple[int, ...]) -> bytes:
    """A gray (HxW) or RGB (HxWx3) PNG of these codes at this bit depth (1..16) with a tRNS colour key,
    written by hand (Pillow writes no 16-bit RGB, OpenCV no tRNS)."""
    h, w = codes.shape[:2]
    samples = codes.reshape(h, -1).astype(np.uint16)
    if depth == 16:
        rows = [samples[y].astype(">u2").tobytes() for y in range(h)]
    elif depth == 8:
        rows = [samples[y].astype(np.uint8).tobytes() for y in range(h)]
    else:  # packed, most significant bits first
        per = 8 // depth
        padded = np.zeros((h, -(-samples.shape[1] // per) * per), np.uint16)
        padded[:, : samples.shape[1]] = samples
        groups = padded.reshape(h, -1, per)
        shifts = np.arange(per - 1, -1, -1) * depth
        rows = [((groups[y] << shifts).sum(axis=1)).astype(np.uint8).tobytes() for y in range(h)]
    raw = b"".join(b"\0" + r for r in rows)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, 0 if codes.ndim == 2 else 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"tRNS", struct.pack(">" + "H" * len(trns), *trns))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels, depth", [(0, 8), (3, 8), (0, 16), (3, 16), (0, 1), (0, 2), (0, 4)])
def test_colour_key_becomes_alpha(tmp_path, channels, depth):
    """A gray or RGB PNG whose transparency is a colour key (tRNS) came back without it, silently: the
    key is now an alpha channel (0 where the pixel is the key, full elsewhere), like an RGBA file's."""
    shape = (6, 5, channels) if channels else (6, 5)
    codes = np.random.default_rng(depth + channels).integers(0, 2**depth, shape)
    codes[..., 1, :] = codes[..., 0, :]  # the key's pixel twice, and some more below
    key = tuple(np.atleast_1d(codes[0, 0]))
    codes[4:, 3] = codes[0, 0]
    (tmp_path / "k.png").write_bytes(png_bytes(codes, depth, tuple(int(k) for k in key)))
    got = read_image(tmp_path / "k.png")
    dtype = np.uint16 if depth == 16 else np.uint8
    top = np.iinfo(dtype).max
    assert got.dtype == dtype and got.shape == (6, 5, (channels or 1) + 1)
    scale = top // (2**depth - 1)  # 1-, 2- and 4-bit codes fill the 8-bit range
    np.testing.assert_array_equal(got[..., :-1], (codes * scale).reshape(got[..., :-1].shape))
    transparent = (codes == codes[0, 0]).all(axis=-1) if channels else codes == codes[0, 0]
    np.testing.assert_array_equal(got[..., -1], np.where(transparent, 0, top))


# ---- TIFFs Pillow cannot read: OpenCV ---------------------------------------------------------------
def two_pages(data: bytes) -> bytes:
    """tiff_bytes' BigTIFF with its directory copied as a second page (the same pixels)."""
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack_from(order + "Q", data, 8)[0]
    count = struct.unpack_from(order + "Q", data, ifd)[0]
    size = 8 + 20 * count + 8
    out = bytearray(data + data[ifd : ifd + size])
    struct.pack_into(order + "Q", out, ifd + size - 8, len(data))  # the first page's "next page"
    return bytes(out)


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((3, 4), np.uint8),
        ((3, 4, 3), np.uint8),
        ((3, 4), np.uint16),
        ((3, 4, 3), np.uint16),
        ((3, 4, 4), np.uint16),
    ],
)
@pytest.mark.parametrize("orientation", [1, 6, 7])
def test_big_endian_bigtiff_is_read_by_opencv(tmp_path, shape, dtype, orientation):
    """Pillow 13 does not recognise big-endian BigTIFF (its header check misses the byte order), so such a
    file was "not an image"; OpenCV reads it, its orientation applied once."""
    arr = rand(shape, dtype, seed=orientation)
    data = tiff_bytes(arr, orientation, ">", big=True)
    with pytest.raises(UnidentifiedImageError), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow: "Corrupt EXIF data"
        Image.open(io.BytesIO(data))
    (tmp_path / "mm.tif").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does Pillow's warning reach the user
        got = read_image(tmp_path / "mm.tif")
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, upright(arr, orientation))


def test_big_endian_bigtiff_keeps_the_checks(tmp_path, monkeypatch):
    """Through OpenCV too: the pixel limit before decoding, a warning for further pages, and a clear line
    where OpenCV would lose samples (gray + alpha comes back as gray) or change them (8-bit RGBA comes
    back premultiplied), or the file is damaged."""
    arr = rand((3, 4), np.uint8, seed=20)
    (tmp_path / "mm.tif").write_bytes(tiff_bytes(arr, order=">", big=True))
    decoded = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(1) or real(*a))
    with pytest.raises(
        ImageError, match=re.escape("mm.tif: 4x3 = 1.2e-05 MP is over the pixel limit of 1.1e-05 MP")
    ):
        read_image(tmp_path / "mm.tif", max_pixels=11)
    assert decoded == []
    (tmp_path / "pages.tif").write_bytes(two_pages(tiff_bytes(arr, order=">", big=True)))
    with pytest.warns(UserWarning, match="pages.tif: 2 frames; only the first is restored"):
        np.testing.assert_array_equal(read_image(tmp_path / "pages.tif"), arr)
    (tmp_path / "la.tif").write_bytes(tiff_bytes(np.stack([arr, arr], axis=2), order=">", big=True))
    says = (
        "la.tif: cannot decode TIFF (Pillow does not recognise it; OpenCV reads its 2 samples of 8 bits as 1"
    )
    with pytest.raises(ImageError, match=re.escape(says)):
        read_image(tmp_path / "la.tif")
    (tmp_path / "rgba.tif").write_bytes(tiff_bytes(rand((3, 4, 4), np.uint8, seed=22), order=">", big=True))
    with pytest.raises(
        ImageError, match="rgba.tif: cannot decode TIFF .* OpenCV premultiplies its 8-bit alpha"
    ):
        read_image(tmp_path / "rgba.tif")
    data = tiff_bytes(arr, order=">", big=True)
    (tmp_path / "bad.tif").write_bytes(data[:8] + struct.pack(">Q", len(data) + 100) + data[16:])
    with pytest.raises(
        ImageError, match="bad.tif: cannot decode TIFF .Pillow does not recognise it; its first "
    ):
        read_image(tmp_path / "bad.tif")
    (tmp_path / "junk.tif").write_bytes(b"MM\x00+" + bytes(40))
    with pytest.raises(ImageError, match="junk.tif: cannot decode TIFF"):
        read_image(tmp_path / "junk.tif")


def test_16_bit_gray_alpha_tiff_is_refused_clearly(tmp_path):
    """Pillow does not recognise 16-bit gray + alpha TIFF either, and OpenCV reads it as 8-bit gray:
    refused in a line that says so, not called "not an image" nor read without its alpha."""
    (tmp_path / "la16.tif").write_bytes(tiff_bytes(rand((3, 4, 2), np.uint16, seed=21)))
    with pytest.raises(
        ImageError, match=re.escape("reads its 2 samples of 16 bits as 1 of 8); save it as PNG")
    ):
        read_image(tmp_path / "la16.tif")


def test_bigtiff_offsets_past_2_63_are_damaged_not_a_traceback(tmp_path):
    """A BigTIFF offset is 64 bits; one past 2^63 made struct raise OverflowError (not struct.error), which
    escaped read_image as a traceback: for the first directory it is now the one 'damaged' line, and in the
    chain of further pages it ends the count like any other broken link."""
    arr = rand((3, 4), np.uint8, seed=30)
    data = tiff_bytes(arr, order=">", big=True)
    (tmp_path / "far.tif").write_bytes(data[:8] + struct.pack(">Q", 2**64 - 1) + data[16:])
    with pytest.raises(ImageError, match="far.tif: cannot decode TIFF .* first directory is damaged"):
        read_image(tmp_path / "far.tif")
    ifd = struct.unpack_from(">Q", data, 8)[0]
    count = struct.unpack_from(">Q", data, ifd)[0]
    nxt = bytearray(data)
    struct.pack_into(">Q", nxt, ifd + 8 + 20 * count, 2**64 - 1)  # the first page's "next page"
    (tmp_path / "next.tif").write_bytes(bytes(nxt))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one page: no "2 frames" warning for a link into nothing
        np.testing.assert_array_equal(read_image(tmp_path / "next.tif"), arr)


@pytest.mark.parametrize("order, big, dtype", [(">", True, np.uint8), ("<", False, np.uint16)])
def test_opencv_refusing_a_size_is_an_image_error(tmp_path, order, big, dtype):
    """OpenCV raises cv2.error (rather than returning None) for a side over its CV_IO_MAX_IMAGE_WIDTH (2^20),
    which escaped read_image, for a TIFF it decodes (big-endian BigTIFF, 16 bits): now the one line."""
    arr = np.zeros((1, 2**20 + 1), dtype)
    (tmp_path / "wide.tif").write_bytes(tiff_bytes(arr, order=order, big=big))
    with pytest.raises(ImageError, match="wide.tif: cannot decode"):
        read_image(tmp_path / "wide.tif")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_an_8_bit_file_is_decoded_once(tmp_path, suffix, monkeypatch):
    """Pillow's getexif() on a PNG decodes the pixels (to look for an eXIf chunk after them); the header's
    image was then closed and the file decoded again from its bytes, which made reading a large PNG 1.7
    to 2 times slower than before. The image checked is now the one decoded."""
    import PIL.Image

    arr = rand((40, 30, 3), np.uint8, seed=31)
    write_image(tmp_path / f"a{suffix}", arr)
    decoders = []
    real = PIL.Image._getdecoder
    monkeypatch.setattr(PIL.Image, "_getdecoder", lambda *a, **k: decoders.append(a[1]) or real(*a, **k))
    got = read_image(tmp_path / f"a{suffix}")
    assert got.shape == arr.shape
    assert len(decoders) == 1, decoders


def test_big_endian_bigtiff_profile_and_exif_lookups_are_quiet(tmp_path):
    """read_image silenced Pillow's "Corrupt EXIF data" warning on a big-endian BigTIFF, but `qairn restore`
    then asks read_icc and read_exif about the same file, which opened it with Pillow again: the raw
    UserWarning (a site-packages path and line) was printed amid the run. They are quiet now too."""
    from qairn.engine.imageio import read_exif, read_icc

    (tmp_path / "mm.tif").write_bytes(tiff_bytes(rand((3, 4, 3), np.uint16, seed=32), order=">", big=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_icc(tmp_path / "mm.tif") is None
        assert read_exif(tmp_path / "mm.tif", size=(4, 3)) is None


# ---- damaged TIFF directories -----------------------------------------------------------------------
def tiff_entry(data: bytes, page: int, tag: int) -> int:
    """Where a little-endian classic TIFF's directory entry for `tag` on `page` (0: the first) starts."""
    at = struct.unpack_from("<I", data, 4)[0]
    for _ in range(page):
        at = struct.unpack_from("<I", data, at + 2 + 12 * struct.unpack_from("<H", data, at)[0])[0]
    for k in range(struct.unpack_from("<H", data, at)[0]):
        if struct.unpack_from("<H", data, at + 2 + 12 * k)[0] == tag:
            return at + 2 + 12 * k
    raise KeyError(tag)


@pytest.mark.parametrize(
    "page, tag, kind, raised, outcome",
    [
        (1, 259, 1, KeyError, "first page"),  # the second page's Compression as BYTE: an unknown b"\x01"
        (1, 256, 0, TypeError, "first page"),  # the second page's ImageWidth of no type: "Missing dimensions"
        (0, 273, 2, TypeError, "Pillow: TypeError: "),  # StripOffsets as ASCII text
        (0, 320, 4, KeyError, "read"),  # a palette's ColorMap as LONG: too long for the file, so dropped
    ],
)
def test_damaged_tiff_tags_are_one_line_not_a_traceback(tmp_path, page, tag, kind, raised, outcome):
    """Pillow raises TypeError or KeyError (not OSError) on some damaged classic TIFFs, when it counts the
    pages or decodes the strips: they escaped read_image as tracebacks. Now they are what Pillow said,
    and OpenCV is asked, as for the errors Pillow gives as OSError: it reads the first page of a file
    whose second page is damaged, else the one 'cannot decode TIFF' line names the file and both."""
    arr = rand((9, 7, 3), np.uint8, seed=40)
    im = Image.fromarray(arr) if tag != 320 else Image.fromarray(arr[..., 0]).convert("P")
    buf = io.BytesIO()
    im.save(buf, "TIFF", save_all=True, append_images=[im])
    data = bytearray(buf.getvalue())
    struct.pack_into("<H", data, tiff_entry(data, page, tag) + 2, kind)  # the entry's type
    with pytest.raises(raised), warnings.catch_warnings():  # what Pillow itself does with the file
        warnings.simplefilter("ignore")  # "Tag data larger than file"
        with Image.open(io.BytesIO(bytes(data))) as damaged:
            assert damaged.n_frames == 2
            damaged.load()
    (tmp_path / "d.tif").write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if outcome.startswith("Pillow"):
            with pytest.raises(ImageError, match=re.escape(f"d.tif: cannot decode TIFF ({outcome}")):
                read_image(tmp_path / "d.tif")
            return
        got = read_image(tmp_path / "d.tif")
    if outcome == "first page":
        np.testing.assert_array_equal(got, arr)
        assert any("d.tif: 2 frames" in str(w.message) for w in caught)
    else:
        assert got.shape == arr.shape[:2]  # OpenCV reads the indices as gray, without the colour map


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def exif_block(orientation: int) -> bytes:
    exif = Image.new("L", (1, 1)).getexif()
    exif[0x0112] = orientation
    block = exif.tobytes()
    return block[6:] if block.startswith(b"Exif\0\0") else block


@pytest.mark.parametrize(
    "where, chunk",
    [
        ("none", b""),
        ("early", png_chunk(b"eXIf", exif_block(6))),
        ("late", png_chunk(b"eXIf", exif_block(6))),
        ("late", png_chunk(b"tEXt", b"Raw profile type exif\0\nexif\n  26\n" + exif_block(3).hex().encode())),
        ("late", png_chunk(b"iTXt", b'XML:com.adobe.xmp\0\0\0\0\0<x:xmpmeta tiff:Orientation="8"/>')),
        ("late", png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"not EXIF"))),
    ],
    ids=["no EXIF", "eXIf first", "eXIf last", "EXIF as text last", "XMP last", "comment last"],
)
@pytest.mark.parametrize("channels", [0, 3])
def test_a_16_bit_png_is_decoded_once(tmp_path, where, chunk, channels, monkeypatch):
    """OpenCV decodes a 16-bit PNG, but Pillow's getexif() had decoded it first (to look for EXIF after
    the pixels): about 1.3 s instead of 0.65 s at 4000x3000. The chunks after the pixels are now read
    without decoding, and the orientation is still the one Pillow finds: in an eXIf chunk before or after
    the pixels, in EXIF given as text, or in XMP."""
    import PIL.Image

    arr = rand((6, 4, channels) if channels else (6, 4), np.uint16, seed=41)
    ok, buf = cv2.imencode(".png", arr[..., ::-1] if channels else arr)
    data = buf.tobytes()
    at = {"none": len(data), "early": 8 + 25, "late": len(data) - 12}[where]  # after IHDR, before IEND
    (tmp_path / "o.png").write_bytes(data[:at] + chunk + data[at:])
    with Image.open(tmp_path / "o.png") as im:  # Pillow's own answer, pixels decoded
        orientation = im.getexif().get(0x0112, 1)
    assert orientation == {b"": 1, b"eXIf": 6, b"tEXt": 3, b"iTXt": 8, b"zTXt": 1}[chunk[4:8]]
    decoded = []
    real_pillow, real_cv2 = PIL.Image._getdecoder, cv2.imdecode
    monkeypatch.setattr(
        PIL.Image, "_getdecoder", lambda *a, **k: decoded.append(a[1]) or real_pillow(*a, **k)
    )
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append("cv2") or real_cv2(*a))
    got = read_image(tmp_path / "o.png")
    assert decoded == ["cv2"]
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, upright(arr, orientation))


def test_a_16_bit_png_cut_short_is_called_truncated(tmp_path):
    """Pillow's decode (no longer made) called a 16-bit PNG cut in its pixels "truncated or corrupt", where
    OpenCV alone only says it cannot decode it. A 16-bit PNG that ends before its IEND chunk is called
    truncated, including one cut after its pixels, which was "cannot decode 16-bit PNG image"."""
    ok, buf = cv2.imencode(".png", rand((60, 40, 3), np.uint16, seed=42))
    for cut in (len(buf) // 2, len(buf) - 12):
        (tmp_path / "t.png").write_bytes(buf.tobytes()[:cut])
        with pytest.raises(ImageError, match=re.escape("t.png: truncated or corrupt PNG")):
            read_image(tmp_path / "t.png")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("where", ["none", "early", "late"])
def test_read_exif_does_not_decode_a_png(tmp_path, dtype, where, monkeypatch):
    """`qairn restore` asks read_exif for the EXIF to carry: Pillow's getexif() decoded a whole PNG
    (0.83 s for a 4000x3000 16-bit one) to look for an eXIf chunk after the pixels. The chunks are now
    read without the pixels, with the same EXIF found."""
    import PIL.Image

    from qairn.engine.imageio import read_exif

    exif = Image.new("L", (1, 1)).getexif()
    exif[0x010F], exif[0x0112] = "Canon", 6
    block = exif.tobytes()[6:]
    ok, buf = cv2.imencode(".png", rand((6, 4, 3), dtype, seed=43))
    data = buf.tobytes()
    chunk = png_chunk(b"eXIf", block) if where != "none" else b""
    at = 8 + 25 if where == "early" else len(data) - 12
    (tmp_path / "e.png").write_bytes(data[:at] + chunk + data[at:])
    decoded = []
    real = PIL.Image._getdecoder
    monkeypatch.setattr(PIL.Image, "_getdecoder", lambda *a, **k: decoded.append(a[1]) or real(*a, **k))
    got = read_exif(tmp_path / "e.png")
    assert decoded == []
    if where == "none":
        assert got is None
    else:
        found = Image.Exif()
        found.load(got)
        assert dict(found) == {0x010F: "Canon"}  # without the orientation, which read_image applies


@pytest.mark.parametrize("suffix", [".tif", ".jpg"])
def test_an_exif_of_only_the_orientation_is_none(tmp_path, suffix):
    """read_exif removes the orientation (read_image applies it), and an EXIF that had nothing else came
    back as an empty block (a TIFF always has the tag): restore wrote it, and warned that a .webp or .bmp
    output "drops the input's EXIF". There is nothing to carry: None."""
    from qairn.engine.imageio import read_exif

    arr = rand((3, 4, 3), np.uint8, seed=46)
    if suffix == ".tif":
        (tmp_path / "o.tif").write_bytes(tiff_bytes(arr, 6))
    else:
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(arr).save(tmp_path / "o.jpg", exif=exif)
    assert read_exif(tmp_path / f"o{suffix}") is None


# ---- metadata of TIFFs Pillow cannot read -----------------------------------------------------------
ICC = bytes(16) + b"RGB XYZ " + bytes(104) + b"a test profile"  # the colour space at bytes 16-20


def tiff_with_metadata(arr: np.ndarray, order: str, big: bool) -> bytes:
    """tiff_bytes' file with a maker, an ICC profile, and Exif and GPS directories (their pointers IFD8
    in a BigTIFF, as libtiff writes them, LONG in a classic TIFF)."""
    pointer = (18, "Q") if big else (4, "I")
    text = (2, "B")  # ASCII, given as its bytes
    data = tiff_bytes(
        arr,
        6,
        order,
        big,
        extra=[
            (271, text, list(b"Canon\0")),
            (34665, pointer, [0]),
            (34675, (7, "B"), list(ICC)),  # UNDEFINED
            (34853, pointer, [0]),
        ],
    )
    data = with_sub_ifd(
        data,
        34665,
        [
            (33434, (5, "II"), [1, 250]),  # ExposureTime, a RATIONAL
            (36867, text, list(b"2020:01:02 03:04:05\0")),  # DateTimeOriginal
            (40962, (4, "I"), [4000]),  # PixelXDimension
            (40963, (4, "I"), [3000]),  # PixelYDimension
        ],
    )
    return with_sub_ifd(data, 34853, [(0, (1, "B"), [2, 3, 0, 0])])  # GPSVersionID


def test_big_endian_bigtiff_keeps_its_profile_and_exif(tmp_path):
    """Pillow 13 cannot open a big-endian BigTIFF, so read_icc and read_exif gave None and `qairn restore`
    wrote the output without the colour profile and EXIF, silently. They are now read from the file's
    directories: the same as from a classic TIFF with the same tags, which Pillow reads."""
    from qairn.engine.imageio import read_exif, read_icc

    arr = rand((3, 4, 3), np.uint16, seed=44)
    (tmp_path / "mm.tif").write_bytes(tiff_with_metadata(arr, ">", big=True))
    (tmp_path / "ii.tif").write_bytes(tiff_with_metadata(arr, "<", big=False))
    np.testing.assert_array_equal(read_image(tmp_path / "mm.tif"), upright(arr, 6))
    assert read_icc(tmp_path / "ii.tif") == ICC  # Pillow's reading of the classic file
    assert read_icc(tmp_path / "mm.tif") == ICC
    blocks = [read_exif(tmp_path / name, size=(3, 4)) for name in ("ii.tif", "mm.tif")]
    assert blocks[1] is not None and blocks[1][:4] == b"MM\0*"  # a classic TIFF header, as EXIF must be
    read = []
    for block in blocks:
        exif = Image.Exif()
        exif.load(block)
        read.append((dict(exif), exif.get_ifd(0x8769), exif.get_ifd(0x8825)))
    assert read[1] == read[0]
    first, sub, gps = read[1]
    assert first == {271: "Canon", 0x8769: first[0x8769], 0x8825: first[0x8825]}  # no layout, no orientation
    assert sub == {33434: 1 / 250, 36867: "2020:01:02 03:04:05", 40962: 3, 40963: 4}  # the restored size
    assert gps == {0: b"\x02\x03\x00\x00"}


def test_damaged_big_endian_bigtiff_metadata_is_dropped_quietly(tmp_path):
    """The directories read for the profile and EXIF may be damaged or cut off: nothing is carried, and
    nothing is raised or printed."""
    from qairn.engine.imageio import read_exif, read_icc

    data = tiff_with_metadata(rand((3, 4, 3), np.uint16, seed=45), ">", big=True)
    damaged = {
        "junk": b"MM\0+" + bytes(40),
        "far": data[:8] + struct.pack(">Q", 2**64 - 1) + data[16:],  # the first directory past 2^63
        "cut": data[: len(data) - 60],  # in the GPS directory
    }
    for name, body in damaged.items():
        (tmp_path / f"{name}.tif").write_bytes(body)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            icc, exif = read_icc(tmp_path / f"{name}.tif"), read_exif(tmp_path / f"{name}.tif")
        if name != "cut":
            assert icc is None and exif is None, name
    assert icc == ICC  # what is whole is still read
    found = Image.Exif()
    found.load(exif)
    assert found[271] == "Canon" and found.get_ifd(0x8825) == {}


def test_little_endian_bigtiff_exif_is_a_classic_block(tmp_path):
    """Pillow opens a little-endian BigTIFF, but its EXIF came back with a BigTIFF header (b"II+"), which no
    EXIF reader takes (Pillow's own fails on it), and without the Exif and GPS directories, whose IFD8
    pointers Pillow skips. It is now read as the big-endian one is: the same EXIF as the classic file's."""
    from qairn.engine.imageio import read_exif

    arr = rand((3, 4, 3), np.uint8, seed=47)
    (tmp_path / "big.tif").write_bytes(tiff_with_metadata(arr, "<", big=True))
    (tmp_path / "classic.tif").write_bytes(tiff_with_metadata(arr, "<", big=False))
    read = []
    for name in ("classic.tif", "big.tif"):
        block = read_exif(tmp_path / name, size=(3, 4))
        assert block[2:4] in (b"*\0", b"\0*"), block[:8]
        exif = Image.Exif()
        exif.load(block)
        read.append((dict(exif), exif.get_ifd(0x8769), exif.get_ifd(0x8825)))
    assert read[1] == read[0]
    assert read[1][1][36867] == "2020:01:02 03:04:05" and read[1][2] == {0: b"\x02\x03\x00\x00"}


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_gray_palette_read_by_opencv_is_gray(tmp_path, orientation):
    """Pillow's reading gives a palette TIFF whose colours are all gray as gray (HxW); read by OpenCV (a
    big-endian BigTIFF, which Pillow cannot open) it came back RGB. Now gray too; colours stay RGB."""
    codes = rand((5, 7), np.uint8, seed=48)
    gray = [(255 - v) * 257 for v in range(256)] * 3  # 16-bit R, G and B ramps, the same: gray, reversed
    colour = [v * 257 for v in range(256)] + [(255 - v) * 257 for v in range(256)] + [0] * 256
    for name, palette in (("gray", gray), ("colour", colour)):
        extra = [(262, (3, "H"), [3]), (320, (3, "H"), palette)]  # Photometric: palette, ColorMap
        (tmp_path / "mm.tif").write_bytes(tiff_bytes(codes, orientation, ">", big=True, extra=extra))
        (tmp_path / "ii.tif").write_bytes(tiff_bytes(codes, orientation, "<", extra=extra))  # Pillow's
        got = read_image(tmp_path / "mm.tif")
        np.testing.assert_array_equal(got, read_image(tmp_path / "ii.tif"))
        if name == "gray":
            np.testing.assert_array_equal(got, upright(255 - codes, orientation))
        else:
            assert got.shape == upright(codes, orientation).shape + (3,)


@pytest.mark.parametrize(
    "entry",
    [(271, (5, "II"), [1, 2]), (0x011A, (1, "B"), [7])],  # Make as a RATIONAL, XResolution as a BYTE
    ids=["AttributeError", "TypeError"],
)
def test_exif_of_a_damaged_type_is_dropped_not_raised(tmp_path, entry):
    """Pillow reads an EXIF value of a type its tag cannot have, but its writer then raises AttributeError
    or TypeError: read_exif let it out, and `qairn restore` failed the file (pixels and all) with Pillow's
    message. Unwritable metadata is dropped, as unreadable metadata is."""
    from qairn.engine.imageio import read_exif

    ok, buf = cv2.imencode(".jpg", rand((6, 8, 3), np.uint8, seed=49))
    block = b"MM\0*" + struct.pack(">I", 8) + ifd_bytes([entry], ">", False, 8)
    (tmp_path / "x.jpg").write_bytes(with_exif(buf.tobytes(), ".jpg", block))
    assert read_image(tmp_path / "x.jpg").shape == (6, 8, 3)
    assert read_exif(tmp_path / "x.jpg") is None


def test_write_atomic_puts_the_data_on_disk_before_the_rename(tmp_path, monkeypatch):
    # Without an fsync, a crash just after the rename could leave the output empty on some file
    # systems, where the old file had been whole: the data must be synced, and before the rename.
    import os

    import qairn.engine.imageio as imageio

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        imageio.os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_size)) or real_fsync(fd)
    )
    monkeypatch.setattr(imageio.os, "replace", lambda a, b: events.append(("replace",)) or real_replace(a, b))
    imageio.write_atomic(tmp_path / "x.bin", b"12345")
    assert events == [("fsync", 5), ("replace",)]
    assert (tmp_path / "x.bin").read_bytes() == b"12345" and os.listdir(tmp_path) == ["x.bin"]


def test_jpeg_icc_segments_are_numbered_from_one_after_jfif():
    """The ICC spec numbers APP2 ICC_PROFILE segments from 1, and JFIF's APP0 must stay the first segment:
    Pillow reads a profile numbered from 0 or put before APP0 all the same, so only the bytes tell."""
    from qairn.engine.imageio import encode_image, with_icc

    jpg = encode_image(np.zeros((16, 16, 3), np.uint8), ".jpg")
    assert jpg[2:4] == b"\xff\xe0"  # OpenCV writes JFIF
    icc = bytes(16) + b"RGB " + bytes(range(256)) * 300  # 76820 bytes: two segments
    out = with_icc(jpg, ".jpg", icc)
    assert out[2:4] == b"\xff\xe0"
    heads = [i for i in range(len(out)) if out.startswith(b"\xff\xe2", i)]
    assert [out[i + 4 : i + 18] for i in heads] == [b"ICC_PROFILE\x00\x01\x02", b"ICC_PROFILE\x00\x02\x02"]
    with Image.open(io.BytesIO(out)) as im:
        assert im.info["icc_profile"] == icc


def test_a_gray_profile_fits_gray_and_gray_alpha_pixels_only():
    from qairn.engine.imageio import icc_fits

    gray, rgb = bytes(16) + b"GRAY" + bytes(8), bytes(16) + b"RGB " + bytes(8)
    for shape in [(4, 4), (4, 4, 2)]:
        assert icc_fits(gray, np.zeros(shape, np.uint8)) and not icc_fits(rgb, np.zeros(shape, np.uint8))
    for shape in [(4, 4, 3), (4, 4, 4)]:
        assert icc_fits(rgb, np.zeros(shape, np.uint8)) and not icc_fits(gray, np.zeros(shape, np.uint8))


@pytest.mark.parametrize("suffix", [".bmp", ".jpg"])
def test_rgba_written_without_alpha_keeps_its_colours(suffix):
    # Formats without alpha drop the fourth channel: dropping the first instead (GBA as RGB) passed.
    from qairn.engine.imageio import encode_image

    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 250, 255  # red, opaque
    back = cv2.imdecode(np.frombuffer(encode_image(rgba, suffix), np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert back.shape == (16, 16, 3)
    np.testing.assert_allclose(back.astype(int), rgba[..., :3].astype(int), atol=4)


def _jpeg_markers(data: bytes) -> list[int]:
    """The markers of a JPEG's segments from SOI up to SOS."""
    markers, at = [], 2
    while data[at + 1] != 0xDA:
        markers.append(data[at + 1])
        at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
    return markers


def test_jpeg_metadata_segments_go_app0_exif_then_icc(tmp_path):
    # Viewers expect SOI, APP0 (JFIF), APP1 (EXIF), APP2 (ICC): the profile inserted after the EXIF (so
    # before it) still read back in Pillow, and passed.
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    icc = bytes(16) + b"RGB " + bytes(100)
    write_image(tmp_path / "a.jpg", np.zeros((16, 16, 3), np.uint8), icc=icc, exif=exif.tobytes()[6:])
    data = (tmp_path / "a.jpg").read_bytes()
    assert _jpeg_markers(data)[:3] == [0xE0, 0xE1, 0xE2]
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.getexif()[0x010F] == "Camera" and im.info["icc_profile"] == icc


def test_an_exif_too_big_for_one_jpeg_segment_is_dropped(tmp_path):
    # One APP1 segment holds at most 65533 bytes of EXIF: a bigger block is left out (the image and its
    # profile written all the same); not checked, its length did not fit the segment's 16 bits.
    exif = Image.Exif()
    exif[0x010E] = "x" * 70_000
    icc = bytes(16) + b"RGB " + bytes(100)
    arr = np.full((16, 16, 3), 200, np.uint8)
    write_image(tmp_path / "a.jpg", arr, icc=icc, exif=exif.tobytes()[6:])
    data = (tmp_path / "a.jpg").read_bytes()
    assert 0xE1 not in _jpeg_markers(data)
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.info["icc_profile"] == icc and not im.getexif()
        np.testing.assert_allclose(np.asarray(im).astype(int), arr, atol=2)


def test_a_tiffs_xmp_and_camera_tags_are_kept_and_its_layout_dropped(tmp_path):
    # XMP (tag 700) is part of the photo's record, in a TIFF's first directory beside its layout: taken
    # for a layout tag, it was dropped, and no test wrote a TIFF with XMP.
    from PIL import TiffImagePlugin

    from qairn.engine.imageio import read_exif

    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">qairn</x:xmpmeta>'
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[0x010F], info[0x02BC], info.tagtype[0x02BC] = "Camera", xmp, 1
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.tif", tiffinfo=info)
    exif = Image.Exif()
    exif.load(read_exif(tmp_path / "a.tif"))
    assert dict(exif) == {0x010F: "Camera", 0x02BC: xmp}


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".JPG", ".tif", ".webp", ".bmp"])
def test_the_suffixes_said_to_keep_metadata_are_those_that_keep_it(tmp_path, suffix):
    # The CLI warns that an output drops the profile or the EXIF by ICC_SUFFIXES and EXIF_SUFFIXES:
    # .jpeg left out of them warned of a loss that did not happen, and no test compared them.
    from qairn.engine.imageio import EXIF_SUFFIXES, ICC_SUFFIXES

    exif = Image.Exif()
    exif[0x010F] = "Camera"
    icc = bytes(16) + b"RGB " + bytes(100)
    path = tmp_path / f"a{suffix}"
    write_image(path, np.zeros((16, 16, 3), np.uint8), icc=icc, exif=exif.tobytes()[6:])
    with Image.open(path) as im:
        assert (im.info.get("icc_profile") == icc) == (suffix.lower() in ICC_SUFFIXES)
        assert (im.getexif().get(0x010F) == "Camera") == (suffix.lower() in EXIF_SUFFIXES)


def restart_jpeg(tmp_path, name: str = "rst.jpg") -> tuple:
    """A 64x64 noise JPEG with a restart marker after every MCU (a restart interval of 1, as cameras
    write them), its path and bytes."""
    rng = np.random.default_rng(0)
    ok, enc = cv2.imencode(
        ".jpg", rng.integers(0, 256, (64, 64, 3), np.uint8), [cv2.IMWRITE_JPEG_RST_INTERVAL, 1]
    )
    path = tmp_path / name
    path.write_bytes(enc.tobytes())
    return path, enc.tobytes()


def test_a_jpeg_with_zeroed_compressed_data_is_read_with_a_warning_naming_it(tmp_path):
    # Pillow decodes it without a word (libjpeg's "Corrupt JPEG data" warning is dropped); the zeroed
    # bytes took restart markers with them, so the markers that remain are out of turn.
    path, data = restart_jpeg(tmp_path)
    mid = (data.index(b"\xff\xda") + len(data)) // 2
    path.write_bytes(data[:mid] + bytes(64) + data[mid + 64 :])
    Image.open(path).load()  # what Pillow itself does: no error
    said = []
    arr = read_image(path, warn=said.append)
    assert arr.shape == (64, 64, 3)
    assert len(said) == 1 and said[0].startswith(f"{path}: corrupt JPEG data (a restart marker out of turn")
    assert said[0].endswith("the picture is taken as decoded, damage included")


@pytest.mark.parametrize("kind", ["restart", "progressive", "exif thumbnail"])
def test_a_whole_jpeg_is_read_without_a_corrupt_data_warning(tmp_path, kind):
    # Restart markers in turn, a progressive file's several scans and tables, and an EXIF segment that
    # holds a whole JPEG (markers inside a segment's payload) are not damage.
    if kind == "restart":
        path, _ = restart_jpeg(tmp_path)
    else:
        path = tmp_path / "a.jpg"
        img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), np.uint8))
        exif = Image.Exif()
        if kind == "exif thumbnail":
            thumb = io.BytesIO()
            img.resize((8, 8)).save(thumb, "JPEG")
            exif[0x010F] = "Camera"
            exif.get_ifd(0x8769)[0x927C] = thumb.getvalue()  # MakerNote holding a JPEG
        img.save(path, "JPEG", progressive=kind == "progressive", exif=exif)
    said = []
    read_image(path, warn=said.append)
    assert said == []


def test_a_jpeg_with_a_second_picture_is_not_called_a_moving_picture(tmp_path):
    """A phone JPEG holding a second picture (MPO: an HDR gain map, a depth map, a preview, a stereo
    pair's other view), which Pillow counts as 2 frames, warned "2 frames; only the first is restored
    (qairn video takes moving pictures)": neither is a frame, and qairn video cannot read it."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8))
    gain_map = Image.fromarray(rng.integers(0, 256, (20, 28), np.uint8))
    photo.save(tmp_path / "hdr.jpg", "MPO", save_all=True, append_images=[gain_map])
    said = []
    assert read_image(tmp_path / "hdr.jpg", warn=said.append).shape == (40, 56, 3)
    assert said == [
        f"{tmp_path / 'hdr.jpg'}: a JPEG holding 2 pictures (MPO: previews, a depth or HDR gain map, or "
        "a stereo pair's other view); only the first, the photo, is restored"
    ]


def test_reading_an_image_leaves_the_warning_filters_alone(tmp_path, monkeypatch):
    """warnings.catch_warnings swaps the process's filter list, and every image read went through one
    (for a big-endian BigTIFF's sake): a filter another thread set meanwhile (a transcoder's worker
    pool) was dropped as the read ended, and one thread's read of such a BigTIFF could leave every
    warning of the process ignored. Here the other thread's filter is set from inside Image.open."""
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.full((8, 8, 3), 100, np.uint8))
    real_open = Image.open

    def open_meanwhile(*args, **kwargs):
        warnings.filterwarnings("error", message="set by another thread")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", open_meanwhile)
    with warnings.catch_warnings():
        read_image(path)
        assert any(f[1] is not None and f[1].pattern == "set by another thread" for f in warnings.filters)
