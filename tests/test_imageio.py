"""qairn.engine.imageio: reading and writing image files (depths, orientation, gray, round trips)."""

import numpy as np
import pytest
from PIL import Image

from qairn.engine.imageio import read_image, write_image

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


def rand(shape, dtype, seed=0):
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


# ---- orientation ------------------------------------------------------------------------------------
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


# ---- depths and modes ---------------------------------------------------------------------------------
# ---- writing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 3), (7, 5, 4)])
def test_round_trip_is_exact(tmp_path, suffix, dtype, shape):
    arr = rand(shape, dtype, seed=len(shape) + dtype().itemsize)
    write_image(tmp_path / f"r{suffix}", arr)
    got = read_image(tmp_path / f"r{suffix}")
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, arr)
