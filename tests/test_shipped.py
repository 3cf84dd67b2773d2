"""The weights we ship: present, ours, small enough, and better than the JPEG they restore."""

import json

import cv2
import numpy as np
import pytest
from conftest import REPO, live1_files

import qairn
from qairn.engine.restorer import DEFAULT_WEIGHTS
from qairn.metrics import psnr
from qairn.weights_io import read_metadata


@pytest.fixture(scope="module")
def shipped():
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"no shipped weights at {DEFAULT_WEIGHTS}")
    return qairn.Restorer(device="cpu", tile=None)


def test_file_is_ours_and_small():
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"no shipped weights at {DEFAULT_WEIGHTS}")
    assert DEFAULT_WEIGHTS.stat().st_size < 20e6
    meta = read_metadata(DEFAULT_WEIGHTS)
    training = json.loads(meta["training"])
    assert training["steps"] > 0
    assert json.loads(meta["config"])["preset"].startswith("small")


def test_restores_the_readme_sample(shipped):
    bgr = cv2.imread(str(REPO / "examples" / "sample_q10.jpg"))
    res = shipped.restore(bgr, channel_order="bgr")
    assert res.image.shape == bgr.shape and not np.array_equal(res.image, bgr)
    assert all(0 < v < 1 for v in res.quality.values())


def test_beats_jpeg_at_qf10_and_quality_orders_qf(shipped):
    # Which gate follows which distortion is learned, not set: for the shipped weights (20000 steps,
    # p = 64) Q3 is the score that rises with the JPEG QF most reliably (SRCC 0.73 over LIVE1 crops in
    # bench/results/quality_live1_small_crop256.json; 0.728, 0.759, 0.779 here); Q2 follows it more
    # weakly (0.58), and on this crop not monotonically (0.651, 0.703, 0.664 at QF 10, 40, 80).
    f = next(p for p in live1_files() if p.stem == "buildings")
    ref = cv2.imread(str(f))[:256, :256]
    gains, q3 = [], []
    for qf in (10, 40, 80):
        jpg = cv2.imdecode(cv2.imencode(".jpg", ref, [cv2.IMWRITE_JPEG_QUALITY, qf])[1], cv2.IMREAD_COLOR)
        res = shipped.restore(jpg, channel_order="bgr")
        gains.append(psnr(ref, res.image) - psnr(ref, jpg))
        q3.append(res.quality["Q3"])
    assert min(gains[:2]) > 0.1, gains
    assert q3[0] < q3[1] < q3[2], f"Q3 should rise from QF 10 to 40 to 80: {q3}"
