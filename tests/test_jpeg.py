"""qairn.engine.jpeg: a JPEG's tables and quality, and clipping a restoration to its quantization bins."""

import dataclasses
import io
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from qairn.engine import jpeg as J
from qairn.engine.imageio import _apply_orientation, read_image


def encode(rgb: np.ndarray, qf: int, sampling: int = cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, qf, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
    bgr = rgb[..., ::-1] if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(bgr), params)
    assert ok
    return buf.tobytes()


def decode(data: bytes) -> np.ndarray:  # as read_image decodes a JPEG: Pillow (libjpeg-turbo)
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.fixture
def crop(live1_image) -> np.ndarray:  # not whole blocks or MCUs either way: the edges are padded
    return np.ascontiguousarray(live1_image[:100, :134])


@pytest.mark.parametrize("qf", [1, 5, 10, 37, 50, 75, 90, 95, 99, 100])
def test_quality_of_libjpeg_tables_is_read_exactly(crop, qf):
    found = J.read_jpeg(encode(crop, qf))
    assert (found.quality, found.exact) == (qf, True)
    gray = J.read_jpeg(encode(crop[..., 0], qf))  # the luma table alone
    assert (gray.quality, gray.exact, len(gray.tables)) == (qf, True, 1)


def test_quality_of_other_tables_is_the_nearest_and_not_exact(crop):
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, "JPEG", qtables="web_high")  # Pillow's presets: no libjpeg quality's
    found = J.read_jpeg(buf.getvalue())
    assert not found.exact and 50 <= found.quality <= 100
    # Steps three times libjpeg's at 50 are libjpeg's scale at 16.7: between its 16 and 17
    tripled = [np.clip(J.ijg_table(base, 50) * 3, 1, 255) for base in (J.IJG_LUMA, J.IJG_CHROMA)]
    quality, exact = J.estimate_quality(*tripled)
    assert quality in (16, 17) and not exact


@pytest.mark.parametrize(
    "sampling, factors",
    [
        (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, (1, 1)),
        (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422, (2, 1)),
        (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, (2, 2)),
    ],
)
def test_chroma_subsampling_is_read(crop, sampling, factors):
    assert J.read_jpeg(encode(crop, 50, sampling)).factors == ((1, 1), factors, factors)


def test_a_phones_mpo_has_its_first_pictures_tables(crop):
    # Phones save a photo with its previews or a depth map after it (MPO); Pillow names the format
    # "MPO", and read_image restores the first picture, a JPEG like any other: it was left unclipped.
    mpo = io.BytesIO()
    second = Image.fromarray(np.ascontiguousarray(crop[::-1]))
    Image.fromarray(crop).save(mpo, "MPO", save_all=True, append_images=[second], quality=93)
    found = J.read_jpeg(mpo.getvalue())
    assert found is not None and (found.quality, found.exact, found.factors[1]) == (93, True, (2, 2))


def test_what_is_not_a_ycbcr_or_gray_jpeg_has_no_tables(crop, tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(crop).save(png)
    cmyk = io.BytesIO()
    Image.fromarray(crop).convert("CMYK").save(cmyk, "JPEG")
    assert J.read_jpeg(png) is None
    assert J.read_jpeg(cmyk.getvalue()) is None
    assert J.read_jpeg(b"not an image") is None
    assert J.read_jpeg(tmp_path / "missing.jpg") is None


def test_a_table_with_a_step_of_zero_has_no_bins(crop):
    # A broken DQT: libjpeg decodes such a coefficient as 0 whatever was stored, so the original's is
    # not known. It was read as quality 1 with a numpy "divide by zero" warning, and clipping pinned
    # that coefficient of the restoration to 0.
    data = bytearray(encode(crop, 80))
    dqt = data.index(b"\xff\xdb")
    data[dqt + 5 + 63] = 0  # the luma table's last step (the highest frequencies)
    assert decode(bytes(data)).shape == crop.shape  # the file still decodes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert J.read_jpeg(bytes(data)) is None


def test_a_sampling_factor_of_zero_is_no_jpeg_to_clip(crop):
    # A damaged frame header (libjpeg refuses it: read_image fails the file) made read_jpeg raise
    # ZeroDivisionError instead of answering None.
    data = bytearray(encode(crop, 80))
    sof = data.index(b"\xff\xc0")
    data[sof + 11] = 0x20  # Y's sampling factors: 2 across, 0 down
    assert J.read_jpeg(bytes(data)) is None


def test_the_decoded_picture_is_kept_as_it_is(crop):
    for data in (encode(crop, 30), encode(crop[..., 1], 30)):
        dec = decode(data)
        assert np.array_equal(J.consistent(dec, dec, J.read_jpeg(data)), dec)


def test_clipped_coefficients_lie_within_half_a_step_of_the_decoded_ones():
    rng = np.random.default_rng(0)
    table = J.ijg_table(J.IJG_LUMA, 30).astype(np.float64)
    restored, decoded = rng.uniform(0, 255, (2, 20, 27))
    moved = J._blocks_dct(restored + J._clip_plane(restored, decoded, table))
    bins = J._blocks_dct(decoded)
    half = table[None, :, None, :] / 2
    inside = np.abs(moved - bins)[:2, :, :3] <= half + 1e-3  # whole blocks (the rest is padding); float32
    assert inside.all()
    assert not (np.abs(J._blocks_dct(restored) - bins)[:2, :, :3] <= half).all()  # (they were not)


@pytest.mark.parametrize("qf", [20, 60, 95])
def test_a_poor_restoration_comes_no_further_from_the_original(crop, qf):
    # The original lies in the bins, so the projection onto them can only come nearer it. Noise of
    # sigma 8 lies mostly within wide bins (QF 20: steps of 10 to 100+), and is taken out where they
    # are narrow (QF 95: luma steps of 1 to 5). Gray noise: luma only, whose samples are all kept
    # (4:2:0 chroma keeps only each 2x2 box's mean, and noise within a box stays).
    data = encode(crop, qf)
    dec = decode(data)
    rng = np.random.default_rng(1)
    noisy = np.clip(crop + rng.normal(0, 8, crop.shape[:2])[..., None], 0, 255).astype(np.uint8)
    clipped = J.consistent(noisy, dec, J.read_jpeg(data))
    assert psnr(clipped, crop) >= psnr(noisy, crop)
    if qf == 95:
        assert psnr(clipped, crop) > psnr(noisy, crop) + 3
    # and the original itself is hardly moved (it lies in the bins, up to the decoder's rounding)
    assert psnr(J.consistent(crop, dec, J.read_jpeg(data)), crop) > 40


def test_the_exif_turn_is_undone_for_the_blocks_and_done_again(crop, tmp_path):
    data = encode(crop, 95)  # narrow bins: the blocks' grid matters
    stored = J.read_jpeg(data)
    im = Image.open(io.BytesIO(data))
    exif = im.getexif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    path = tmp_path / "turned.jpg"
    path.write_bytes(data[:2] + _app1(exif.tobytes()) + data[2:])
    turned = J.read_jpeg(path)
    assert turned.orientation == 6 and turned.tables[0].tolist() == stored.tables[0].tolist()
    dec = read_image(path)  # as restore reads it: upright
    assert dec.shape[:2] == crop.shape[1::-1]
    rng = np.random.default_rng(2)
    restored = np.clip(dec + rng.normal(0, 8, dec.shape[:2])[..., None], 0, 255).astype(np.uint8)
    upright = J.consistent(restored, dec, turned)
    unturned = J.consistent(
        np.rot90(restored, 1), np.rot90(dec, 1), dataclasses.replace(turned, orientation=1)
    )
    assert np.array_equal(upright, _apply_orientation(unturned, 6))
    # The grid matters: the original, upright, lies in the bins of the file's own blocks, and is
    # moved off when the upright picture's top left is taken for the grid's
    reference = np.ascontiguousarray(np.rot90(crop, -1))
    kept = J.consistent(reference, dec, turned)
    moved = J.consistent(reference, dec, dataclasses.replace(turned, orientation=1))
    assert psnr(kept, reference) > psnr(moved, reference) + 1


def _app1(exif: bytes) -> bytes:
    body = b"Exif\x00\x00" + exif
    return b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body


def test_bands_give_what_one_pass_gives(crop, monkeypatch):
    data = encode(crop, 40)
    dec = decode(data)
    rng = np.random.default_rng(3)
    restored = np.clip(dec + rng.normal(0, 6, dec.shape), 0, 255).astype(np.uint8)
    whole = J.consistent(restored, dec, J.read_jpeg(data))
    monkeypatch.setattr(J, "BAND_ROWS", 16)
    banded = J.consistent(restored, dec, J.read_jpeg(data))
    assert np.abs(banded.astype(int) - whole).max() <= 1 and (banded != whole).mean() < 1e-3


@pytest.mark.parametrize("fy", [3, 4])
def test_bands_start_on_whole_blocks_of_chroma_samples_3_or_4_rows_tall(crop, monkeypatch, fy):
    # JPEG's sampling factors go up to 4 (libjpeg decodes such files; Pillow and OpenCV write none):
    # a chroma block is then 24 or 32 rows tall, and bands cut at multiples of 16 cut through them.
    data = encode(crop, 90, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444)  # narrow bins: the grid matters
    dec = decode(data)
    jpeg = dataclasses.replace(J.read_jpeg(data), factors=((1, 1), (1, fy), (1, fy)))
    rng = np.random.default_rng(4)
    restored = np.clip(dec + rng.normal(0, 6, dec.shape), 0, 255).astype(np.uint8)
    whole = J.consistent(restored, dec, jpeg)
    monkeypatch.setattr(J, "BAND_ROWS", 16)
    banded = J.consistent(restored, dec, jpeg)
    assert np.abs(banded.astype(int) - whole).max() <= 1 and (banded != whole).mean() < 1e-3


def test_a_picture_that_does_not_fit_the_jpeg_is_refused(crop):
    data = encode(crop, 40)
    dec = decode(data)
    with pytest.raises(ValueError, match="same shape"):
        J.consistent(dec[:50], dec, J.read_jpeg(data))
    with pytest.raises(ValueError, match="3-component"):
        J.consistent(dec[..., 0], dec[..., 0], J.read_jpeg(data))
    assert not J.jpeg_fits(J.read_jpeg(data), dec[..., 0]) and J.jpeg_fits(J.read_jpeg(data), dec)
