"""Property tests of the Y'CbCr conversion (qairn.engine.color) and Restorer.restore_yuv over seeded random
pictures, code values, sizes, depths, dtypes and subsamplings (no image files needed)."""

import numpy as np
import pytest
import torch
from conftest import lively_model

import qairn
from qairn.engine import color

MATRICES = ("bt601", "bt709", "bt2020")
RANGES = ("limited", "full")
SUBSAMPLINGS = {"420": (2, 2), "422": (1, 2), "444": (1, 1)}


def csize(h: int, w: int, sub: str) -> tuple[int, int]:
    fy, fx = SUBSAMPLINGS[sub]
    return -(-h // fy), -(-w // fx)


def rgb_error_bound(matrix: str, crange: str, bits: int) -> float:
    """The most a half-code rounding of each plane moves R', G' or B' (in [0,1] units)."""
    _, ys, _, cs = color.levels(crange, bits)
    inv = torch.linalg.inv(color.rgb_matrix(matrix)).abs()
    return float((inv * 0.5 / torch.tensor([ys, cs, cs], dtype=torch.float64)).sum(1).max())


# ---- the conversion --------------------------------------------------------------------------------
def test_black_white_and_grey_land_on_the_nominal_codes():
    # The codes written out from the module doc (they were taken from color.levels, the code under test):
    # limited: black 16 s, white 235 s, chroma centre 128 s with s = 2**(bits - 8); full: 0, 2**bits - 1,
    # 2**(bits - 1).
    for matrix in MATRICES:
        for crange in RANGES:
            for bits in (8, 10, 12, 16):
                s = 2 ** (bits - 8)
                black, white, centre = (
                    (16 * s, 235 * s, 128 * s) if crange == "limited" else (0, 2**bits - 1, 2 ** (bits - 1))
                )
                grey = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1, 1).expand(3, 3, 1, 1)
                y, u, v = color.rgb_to_planes(grey, (1, 1), matrix, crange, bits)
                np.testing.assert_allclose(y.flatten(), [black, (black + white) / 2, white], atol=1e-3 * s)
                np.testing.assert_allclose(torch.cat([u, v]).flatten(), centre, atol=1e-3 * s)
    # the documented anchors: 8-bit white (235, 128, 128) limited, (255, 128, 128) full; 10-bit black 64
    # limited, (0, 512, 512) full
    white = torch.ones(1, 3, 1, 1)
    assert [round(float(p)) for p in color.rgb_to_planes(white, (1, 1), "bt601", "full")] == [255, 128, 128]
    black = color.rgb_to_planes(torch.zeros(1, 3, 1, 1), (1, 1), "bt2020", "full", bits=10)
    assert [round(float(p)) for p in black] == [0, 512, 512]
    assert [round(float(p)) for p in color.rgb_to_planes(torch.ones(1, 3, 1, 1), (1, 1), "bt709")] == [
        235,
        128,
        128,
    ]
    assert round(float(color.rgb_to_planes(torch.zeros(1, 3, 1, 1), (1, 1), bits=10)[0])) == 64


def test_float_rgb_round_trip():
    """R'G'B' -> float planes (4:4:4, not rounded) -> R'G'B' is the identity to float precision."""
    g = torch.Generator().manual_seed(0)
    for k in range(36):
        matrix, crange, bits = MATRICES[k % 3], RANGES[k // 3 % 2], (8, 10, 12, 16)[k % 4]
        h, w = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        rgb = torch.rand(2, 3, h, w, generator=g) * 1.2 - 0.1  # out-of-gamut values too
        planes = color.rgb_to_planes(rgb, (h, w), matrix, crange, bits)
        back = color.planes_to_rgb(*planes, matrix, crange, bits)
        assert back.dtype == torch.float32 and back.shape == rgb.shape
        assert (back - rgb).abs().max() < 1e-5, (matrix, crange, bits)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_integer_codes_round_trip_exactly(dtype):
    """Any 4:4:4 code values (out of gamut included: not clipped) -> R'G'B' -> codes, rounded: the same
    codes, at every depth the dtype holds."""
    g = torch.Generator().manual_seed(1)
    depths = {torch.uint8: (8,), torch.int16: (9, 10, 12, 15), torch.int32: (9, 10, 12, 16)}[dtype]
    for k in range(24):
        matrix, crange, bits = MATRICES[k % 3], RANGES[k // 3 % 2], depths[k % len(depths)]
        h, w = (int(v) for v in torch.randint(1, 30, (2,), generator=g))
        codes = [torch.randint(0, 2**bits, (2, h, w), generator=g).to(dtype) for _ in range(3)]
        rgb = color.planes_to_rgb(*codes, matrix, crange, bits)
        back = [
            color.quantize(p, bits, dtype) for p in color.rgb_to_planes(rgb, (h, w), matrix, crange, bits)
        ]
        for a, b in zip(back, codes):
            assert a.dtype == dtype and torch.equal(a, b), (matrix, crange, bits)


@pytest.mark.parametrize("rgb_bits", [8, 16])
def test_integer_rgb_round_trip_within_the_rounding_bound(rgb_bits):
    """uint8 / uint16 R'G'B' -> planes rounded to `bits` -> R'G'B' rounded back: off by no more than half a
    code per plane can move it (exact for 8-bit pictures through 10-bit planes)."""
    g = torch.Generator().manual_seed(2)
    top = 2**rgb_bits - 1
    for k in range(36):
        matrix, crange, bits = MATRICES[k % 3], RANGES[k // 3 % 2], (8, 10, 16)[k % 3]
        h, w = (int(v) for v in torch.randint(1, 30, (2,), generator=g))
        pixels = torch.randint(0, top + 1, (1, 3, h, w), generator=g, dtype=torch.int32)
        planes = color.rgb_to_planes(pixels.float() / top, (h, w), matrix, crange, bits)
        codes = [color.quantize(p, bits, torch.int32) for p in planes]
        back = (color.planes_to_rgb(*codes, matrix, crange, bits).clamp(0, 1) * top).round().int()
        allowed = int(np.floor(rgb_error_bound(matrix, crange, bits) * top + 0.5 + 1e-3))
        assert int((back - pixels).abs().max()) <= allowed, (matrix, crange, bits, allowed)
        if rgb_bits == 8 and bits >= 10:
            assert allowed == 0
    assert rgb_error_bound("bt709", "limited", 8) * 255 > 1.5  # the bound is not vacuous


def test_flat_subsampled_chroma_comes_back():
    """A flat chroma plane survives upsampling then box downsampling, at every subsampling and odd size."""
    g = torch.Generator().manual_seed(3)
    for sub in SUBSAMPLINGS:
        for _ in range(8):
            h, w = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
            ch, cw = csize(h, w, sub)
            c = torch.full((1, ch, cw), float(torch.randint(0, 256, (1,), generator=g)))
            up = color.upsample(c, h, w)
            assert up.shape == (1, h, w)
            np.testing.assert_allclose(color.downsample(up, ch, cw), c, atol=1e-4)


def test_downsample_is_a_box_average_by_hand():
    """4:2:0 and 4:2:2 chroma is the mean of each 2x2 (2x1) box, the last row and column replicated for
    odd sizes; a flat plane (above) cannot tell that from taking one sample of each box."""
    c = torch.tensor([[[0.0, 4.0, 1.0], [8.0, 12.0, 3.0], [16.0, 20.0, 5.0]]])
    # 4:2:0: (0 + 4 + 8 + 12) / 4; (1 + 1 + 3 + 3) / 4; (16 + 20 + 16 + 20) / 4; 5.
    assert color.downsample(c, 2, 2).tolist() == [[[6.0, 2.0], [18.0, 5.0]]]
    # 4:2:2: rows kept, (0 + 4) / 2 and (1 + 1) / 2 along each.
    assert color.downsample(c, 3, 2).tolist() == [[[2.0, 1.0], [10.0, 3.0], [18.0, 5.0]]]


# ---- restore_yuv -------------------------------------------------------------------------------------
KINDS = [  # (numpy dtype, bits): the plane formats restore_yuv takes
    (np.uint8, None),
    (np.uint16, 10),
    (np.uint16, 12),
    (np.uint16, 16),
    (np.int16, 10),
    (np.int16, 15),
    (np.int32, 9),
    (np.int32, 16),
]


def random_planes(rng, kind, sub, batch=None):
    dtype, bits = kind
    h, w = (int(v) for v in rng.integers(1, 48, 2))
    top = 2 ** (bits or 8) - 1
    lead = () if batch is None else (batch,)
    y = rng.integers(0, top + 1, lead + (h, w)).astype(dtype)
    u, v = (rng.integers(0, top + 1, lead + csize(h, w, sub)).astype(dtype) for _ in range(2))
    return y, u, v


@pytest.fixture(scope="module")
def identity():
    """The tiny preset has the global residual (out = x + tail): a zero tail makes the picture pass
    through unchanged while the gates (and quality) stay those of a random model."""
    m = lively_model("tiny", seed=4)
    torch.nn.init.zeros_(m.tail.weight)
    torch.nn.init.zeros_(m.tail.bias)
    return qairn.Restorer(model=m, device="cpu", tile=None), qairn.Restorer(
        model=m, device="cpu", tile=32, overlap=16
    )


def test_restore_yuv_with_an_identity_model_gives_the_planes_back(identity):
    """Random codes (out of gamut, super-whites, any depth), every subsampling, odd sizes, numpy (H,W) and
    (N,H,W), tensors, whole and tiled: the planes come back bit-exact, in their own dtype."""
    rng = np.random.default_rng(5)
    for k in range(24):
        kind, sub = KINDS[k % len(KINDS)], list(SUBSAMPLINGS)[k % 3]
        matrix, crange = MATRICES[k % 3], RANGES[k // 3 % 2]
        planes = random_planes(rng, kind, sub, batch=None if k % 2 else 2)
        r = identity[k // 2 % 2]
        res = r.restore_yuv(*planes, matrix=matrix, range=crange, bits=kind[1])
        assert res.info.items() >= {"matrix": matrix, "range": crange, "bits": kind[1] or 8}.items()
        for a, b in zip(res.image, planes):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b, err_msg=f"{kind} {sub} {matrix} {crange}")
        if kind[0] != np.uint16:  # torch has few uint16 ops; tensors of the other dtypes round trip too
            tensors = [torch.from_numpy(p) for p in planes]
            res = r.restore_yuv(*tensors, matrix=matrix, range=crange, bits=kind[1])
            assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(res.image, tensors))


def test_restore_yuv_keeps_format_range_and_agrees_with_rgb_restore():
    """With a random model that does change the picture: the planes keep dtype, shape and code range;
    quality is in (0, 1) with maps at 1, 1/2, 1/4 of the size; and 4:4:4 planes of an in-gamut picture
    come back within a code of converting Restorer.restore_tensor's output to planes directly."""
    r = qairn.Restorer(model=lively_model("tiny", seed=6), device="cpu", tile=None)
    rng = np.random.default_rng(7)
    changed = 0
    for k in range(16):
        kind, sub = KINDS[k % len(KINDS)], list(SUBSAMPLINGS)[k % 3]
        matrix, crange = MATRICES[k % 3], RANGES[k // 3 % 2]
        y, u, v = random_planes(rng, kind, sub)
        bits = kind[1] or 8
        res = r.restore_yuv(y, u, v, matrix=matrix, range=crange, bits=kind[1], return_maps=True)
        for a, b in zip(res.image, (y, u, v)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert 0 <= a.min() and a.max() <= 2**bits - 1
        changed += any(not np.array_equal(a, b) for a, b in zip(res.image, (y, u, v)))
        assert set(res.quality) == {"Q1", "Q2", "Q3"} and all(0 < q < 1 for q in res.quality.values())
        h, w = y.shape
        assert [m.shape for m in res.maps] == [(-(-h // s), -(-w // s)) for s in (1, 2, 4)]
        # 4:4:4, in gamut: the correction form equals a plain conversion of the restored picture.
        h, w = (int(s) for s in rng.integers(8, 40, 2))
        rgb = torch.from_numpy(rng.random((1, 3, h, w), dtype=np.float32))
        dt = torch.from_numpy(np.zeros(0, kind[0])).dtype
        codes = [color.quantize(p, bits, dt) for p in color.rgb_to_planes(rgb, (h, w), matrix, crange, bits)]
        got = r.restore_yuv(*(c[0].numpy() for c in codes), matrix=matrix, range=crange, bits=kind[1]).image
        restored, _, _ = r.restore_tensor(color.planes_to_rgb(*codes, matrix, crange, bits).clamp(0, 1))
        want = [
            color.quantize(p, bits, torch.int64)
            for p in color.rgb_to_planes(restored, (h, w), matrix, crange, bits)
        ]
        for a, b in zip(got, want):
            assert np.abs(a.astype(np.int64) - b[0].numpy()).max() <= 1, (kind, matrix, crange)
    assert changed >= 12  # the model really restores: the invariants were not met by doing nothing
