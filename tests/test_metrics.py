"""PSNR, SSIM and PSNR-B: hand-computed cases, a brute-force SSIM, and the JPEG floor of DESIGN s3."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qairn import metrics

LIVE1 = Path(__file__).parents[1] / ".." / "shared" / "data" / "live1"
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def ssim_brute(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM written straight from its definition: an 11x11 Gaussian window at every valid position."""
    x = np.arange(11) - 5.0
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for c in range(a.shape[2]):
        xa, xb = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                pa, pb = xa[i : i + 11, j : j + 11], xb[i : i + 11, j : j + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append(((2 * ma * mb + C1) * (2 * cov + C2)) / ((ma**2 + mb**2 + C1) * (va + vb + C2)))
    return float(np.mean(vals))


def test_psnr_hand():
    a = np.zeros((4, 4, 3), np.uint8)
    assert metrics.psnr(a, a + 1) == pytest.approx(10 * math.log10(255**2), abs=1e-12)  # MSE 1
    b = a.copy()
    b[0, 0, 0] = 12  # MSE = 144 / 48 = 3
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 3), abs=1e-12)
    assert metrics.psnr(a, a) == math.inf


def test_ssim_constant_images_hand():
    # Flat images: all variances vanish and SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    a = np.full((16, 20, 3), 100, np.uint8)
    b = np.full((16, 20, 3), 110, np.uint8)
    expect = (2 * 100 * 110 + C1) / (100**2 + 110**2 + C1)
    assert metrics.ssim(a, b) == pytest.approx(expect, abs=1e-12)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_brute_force_and_torch():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (19, 23, 3), dtype=np.uint8)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    ref = ssim_brute(a, b)
    assert 0.2 < ref < 0.99
    assert metrics.ssim(a, b) == pytest.approx(ref, abs=1e-12)
    ta = torch.from_numpy(a).permute(2, 0, 1)[None].double()
    tb = torch.from_numpy(b).permute(2, 0, 1)[None].double()
    assert float(metrics.ssim_torch(ta, tb, data_range=255.0)) == pytest.approx(ref, abs=1e-12)
    # reduce=False: one SSIM per image of a batch (here the pair, and the pair against itself).
    per_image = metrics.ssim_torch(torch.cat([ta, ta]), torch.cat([tb, ta]), data_range=255.0, reduce=False)
    assert per_image.shape == (2,)
    assert per_image.tolist() == pytest.approx([ref, 1.0], abs=1e-12)
    # The float32 training loss agrees and is differentiable.
    xa = (ta / 255).float().requires_grad_()
    s = metrics.ssim_torch(xa, (tb / 255).float())
    s.backward()
    assert float(s.detach()) == pytest.approx(ref, abs=1e-5)
    assert torch.isfinite(xa.grad).all() and xa.grad.abs().sum() > 0


def test_ssim_rejects_small_or_mismatched():
    with pytest.raises(ValueError):
        metrics.ssim(np.zeros((10, 20, 3), np.uint8), np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(ValueError):
        metrics.ssim(np.zeros((12, 12, 3), np.uint8), np.zeros((12, 13, 3), np.uint8))


def gray(v: np.ndarray) -> np.ndarray:
    return np.repeat(v[..., None], 3, axis=2).astype(np.uint8)


def test_luma_studio():
    # Grey v: Y = round(16 + 219 v / 255).
    assert metrics.rgb_to_y_studio(gray(np.array([[0, 100, 110, 255]]))).tolist() == [[16, 102, 110, 235]]
    # Pure red, green, blue: round(16 + 65.481) = 81, round(16 + 128.553) = 145, round(16 + 24.966) = 41
    # (grey alone cannot tell the channels apart, nor can the LIVE1 floor to its 0.01 dB).
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    assert metrics.rgb_to_y_studio(primaries).tolist() == [[81, 145, 41]]


def test_psnr_b_hand():
    # 16x16 grey image, columns 0..7 at 100 (Y 102), 8..15 at 110 (Y 110): one vertical block edge
    # with squared step 64 in each of 16 rows. N_HB = 16 (16//8 - 1) = 16, N_VB = 16, so
    # D_B = 16*64 / 32 = 32, D_Bc = 0, eta = log2 8 / log2 16 = 3/4 and BEF = 24.
    v = np.full((16, 16), 100)
    v[:, 8:] = 110
    img = gray(v)
    assert metrics.blocking_effect_factor(metrics.rgb_to_y_studio(img)) == pytest.approx(24.0, abs=1e-12)
    assert metrics.psnr_b(img, img) == pytest.approx(10 * math.log10(255**2 / 24), abs=1e-12)
    ref = img.copy()
    ref[0, 0] += 4  # MSE = 3 * 16 / 768 = 1/16 on top of the BEF
    assert metrics.psnr_b(ref, img) == pytest.approx(10 * math.log10(255**2 / (24 + 1 / 16)), abs=1e-12)


def test_psnr_b_counts_non_multiple_width():
    # 16 rows x 20 columns, the same single edge at column 8. Yim & Bovik's counts:
    # N_HB = 16 (20//8 - 1) = 16, N_VB = 20 (16//8 - 1) = 20, so D_B = 1024 / 36 and BEF = 0.75 D_B.
    v = np.full((16, 20), 100)
    v[:, 8:] = 110
    y = metrics.rgb_to_y_studio(gray(v))
    assert metrics.blocking_effect_factor(y) == pytest.approx(0.75 * 1024 / 36, abs=1e-12)


def test_bef_hand_with_steps_inside_blocks_and_both_directions():
    """Every term of the BEF at once, where the cases above have D_Bc = 0 or one direction only.
    16 rows x 24 columns: column steps of 4 at the block edges 7|8 and 15|16 and of 1 elsewhere, a row
    step of 2 at 7|8. Boundary pairs: 16 rows x 2 x 16 + 24 columns x 4 = 608 over N_HB + N_VB = 16 x 2 +
    24 x 1 = 56. Other pairs: 16 rows x 21 x 1 = 336 over N_HBc + N_VBc = (16 x 23 - 32) + (24 x 15 - 24)
    = 672. eta = log2 8 / log2 16."""
    cols = np.arange(24) + 3 * (np.arange(24) // 8)
    rows = 2 * (np.arange(16) // 8)
    y = rows[:, None] + cols[None, :]
    bef = 0.75 * (608 / 56 - 336 / 672)
    assert metrics.blocking_effect_factor(y) == pytest.approx(bef, abs=1e-12)
    img = y.astype(np.uint8)  # gray: its own values are the luma
    assert metrics.psnr_b(img, img) == pytest.approx(10 * math.log10(255**2 / bef), abs=1e-12)


def test_psnr_and_psnr_b_refuse_different_shapes():
    # numpy broadcasting made these a number: an HxWx1 image against HxWx3, one row against all.
    a = np.zeros((16, 16, 3), np.uint8)
    for b in (np.full((16, 16, 1), 10, np.uint8), np.full((1, 16, 3), 10, np.uint8)):
        for f in (metrics.psnr, metrics.psnr_b):
            with pytest.raises(ValueError, match="shapes differ"):
                f(a, b)


def test_psnr_b_gray_hxwx1_and_refused_channels():
    # HxWx1 gray (which psnr and ssim take) raised IndexError in the RGB luma; it is the HxW case.
    v = np.full((16, 16), 100, np.uint8)
    v[:, 8:] = 110  # one block edge, step 10: BEF = 0.75 * 16 * 100 / 32 (see test_psnr_b_hand)
    ref = v.copy()
    ref[0, 0] = 104  # MSE 16 / 256
    expect = 10 * math.log10(255**2 / (0.75 * 1600 / 32 + 1 / 16))
    assert metrics.psnr_b(ref, v) == pytest.approx(expect, abs=1e-12)
    assert metrics.psnr_b(ref[..., None], v[..., None]) == pytest.approx(expect, abs=1e-12)
    # Four channels: the luma of RGB beside an MSE with alpha in it was a silent mix; refused.
    a = np.zeros((16, 16, 4), np.uint8)
    with pytest.raises(ValueError, match=r"psnr_b: .* got shape \(16, 16, 4\)"):
        metrics.psnr_b(a, a)


def test_psnr_b_sides_under_two_blocks():
    # A 12 px side has Yim & Bovik count 12 // 8 - 1 = 0: its edge at 8 is no counted boundary, so it
    # must not be summed as one either (it was, over a count clamped to 1: BEF 3/log2(12) * 768).
    v = np.full((12, 12), 100)
    v[:, 8:] = 110
    img = gray(v)
    assert metrics.blocking_effect_factor(metrics.rgb_to_y_studio(img)) == 0.0
    assert metrics.psnr_b(img, img) == math.inf
    # The other side still counts: 12 rows x 40 columns, the same edge, N_HB = 12 (40//8 - 1) = 48.
    v = np.full((12, 40), 100)
    v[:, 8:] = 110
    y = metrics.rgb_to_y_studio(gray(v))
    assert metrics.blocking_effect_factor(y) == pytest.approx(3 / math.log2(12) * 12 * 64 / 48, abs=1e-12)
    # Rows as columns: the same edges across a 12 px high image (the row boundary mask had no such
    # guard tested: it summed the edge at row 8 of a 12 px high image over a count of 0: BEF 643).
    for v in (np.full((12, 12), 100), np.full((12, 40), 100)):
        v[:, 8:] = 110
        y = metrics.rgb_to_y_studio(gray(v))
        assert metrics.blocking_effect_factor(y.T) == metrics.blocking_effect_factor(y)
    # One pixel thin: no pairs in one direction and eta = log2 8 / log2 1 undefined (was ZeroDivisionError).
    v = np.full((1, 20), 100)
    v[:, 8:] = 110
    ref, img = gray(v + 1), gray(v)
    assert metrics.blocking_effect_factor(metrics.rgb_to_y_studio(img)) == 0.0
    assert metrics.psnr_b(ref, img) == pytest.approx(metrics.psnr(ref, img), abs=1e-12)
    assert metrics.psnr_b(ref.transpose(1, 0, 2), img.transpose(1, 0, 2)) == pytest.approx(
        metrics.psnr(ref, img)
    )


def test_psnr_b_no_blocking_when_smooth():
    # Edges only inside blocks: D_B <= D_Bc gives BEF 0 and PSNR-B = PSNR.
    v = np.full((16, 16), 100)
    v[:, 4:] = 110
    img, ref = gray(v), gray(v + 1)
    assert metrics.blocking_effect_factor(metrics.rgb_to_y_studio(img)) == 0.0
    assert metrics.psnr_b(ref, img) == pytest.approx(metrics.psnr(ref, img), abs=1e-12)


# DESIGN.md section 3: the unrestored JPEG on the 29 LIVE1 images.
FLOOR = {
    10: (25.69, 0.743, 24.20),
    20: (28.06, 0.826, 26.49),
    30: (29.37, 0.862, 27.84),
    40: (30.28, 0.882, 28.83),
}


@pytest.mark.skipif(not LIVE1.is_dir(), reason=f"LIVE1 images not found at {LIVE1} (shared data absent)")
def test_jpeg_floor_live1():
    from qairn.train.evaluate import eval_restoration, summarize

    files = sorted(LIVE1.glob("*.png"))
    assert len(files) == 29
    summary = summarize(eval_restoration(files, tuple(FLOOR), progress=False), tuple(FLOOR))
    for qf, (p, s, b) in FLOOR.items():
        got = summary[qf]["jpeg"]
        assert got["psnr"] == pytest.approx(p, abs=0.01), qf
        assert got["ssim"] == pytest.approx(s, abs=0.001), qf
        assert got["psnrb"] == pytest.approx(b, abs=0.01), qf
