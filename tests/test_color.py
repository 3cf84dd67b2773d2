"""Y'CbCr conversion (qairn.engine.color) and Restorer.restore_yuv, on real images."""

import math
import re

import cv2
import numpy as np
import pytest
import torch
from conftest import live1_files, lively_model

import qairn
from qairn.engine import color
from qairn.metrics import psnr

MATRICES = ("bt601", "bt709")
RANGES = ("limited", "full")


def identity_restorer(tile=None):
    """A model whose picture output is its input (gates still random): tail zeroed, residual on."""
    m = lively_model()
    torch.nn.init.zeros_(m.tail.weight)
    torch.nn.init.zeros_(m.tail.bias)
    return qairn.Restorer(model=m, device="cpu", tile=tile, overlap=16)


def jpeg(rgb: np.ndarray, qf: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, qf])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()


def to_planes(rgb: np.ndarray, matrix, crange, sub: str, bits: int = 8):
    """Our own RGB -> quantised planes, (1,H,W) tensors; sub in '420', '444'."""
    h, w = rgb.shape[:2]
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    csize = (-(-h // 2), -(-w // 2)) if sub == "420" else (h, w)
    dtype = torch.uint8 if bits == 8 else torch.int32
    return [color.quantize(p, bits, dtype) for p in color.rgb_to_planes(x, csize, matrix, crange, bits)]


def planes_psnr(a, b, peak=255.0) -> float:
    d = np.concatenate([(x.double() - y.double()).flatten().numpy() for x, y in zip(a, b)])
    mse = float(np.mean(d**2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


@pytest.fixture(scope="module")
def images():
    """Three LIVE1 images, cropped to 192x160 (and one to an odd 151x97)."""
    files = live1_files()[:3]
    imgs = [cv2.imread(str(f), cv2.IMREAD_COLOR)[..., ::-1] for f in files]
    return [np.ascontiguousarray(i[:160, :192]) for i in imgs] + [
        np.ascontiguousarray(imgs[0][40:137, 20:171])
    ]


# ---- the conversion itself, against independent implementations --------------------------------------
@pytest.mark.parametrize("matrix", ["bt601", "bt709", "bt2020"])
@pytest.mark.parametrize("crange", RANGES)
def test_matches_swscale_444(images, matrix, crange):
    """Forward and inverse conversion agree with FFmpeg's swscale (via PyAV) to one code value."""
    av = pytest.importorskip("av")
    sws = {"bt601": "ITU601", "bt709": "ITU709", "bt2020": "BT2020"}[matrix]
    cr = "MPEG" if crange == "limited" else "JPEG"
    img = images[0]
    f = av.VideoFrame.from_ndarray(img, format="rgb24")
    g = f.reformat(format="yuv444p", dst_colorspace=sws, dst_color_range=cr, interpolation="BICUBIC")
    ref = [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width] for p in g.planes]
    ours = to_planes(img, matrix, crange, "444")
    for a, b in zip(ours, ref):
        assert np.abs(a[0].numpy().astype(int) - b).max() <= 1
    back_ref = g.reformat(format="rgb24", src_colorspace=sws, src_color_range=cr).to_ndarray()
    planes = [torch.from_numpy(p.copy())[None] for p in ref]
    back = (color.planes_to_rgb(*planes, matrix, crange).clamp(0, 1) * 255).round().byte()[0].permute(1, 2, 0)
    assert np.abs(back.numpy().astype(int) - back_ref).max() <= 1


def test_jpeg_is_bt601_full_range(images):
    """libjpeg's own Y'CbCr (PIL's draft mode skips its colour conversion) converted with bt601/full
    matches libjpeg's RGB decode; bt709 does not."""
    import io

    from PIL import Image

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(images[0][..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 50])
    im = Image.open(io.BytesIO(buf.tobytes()))
    im.draft("YCbCr", im.size)
    assert im.mode == "YCbCr"
    planes = [torch.from_numpy(np.asarray(im)[..., i].copy())[None] for i in range(3)]
    ref = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    for matrix, ok_ in (("bt601", True), ("bt709", False)):
        rgb = (
            (color.planes_to_rgb(*planes, matrix, "full").clamp(0, 1) * 255)
            .round()
            .byte()[0]
            .permute(1, 2, 0)
        )
        err = np.abs(rgb.numpy().astype(int) - ref).max()
        assert (err <= 1) if ok_ else (err > 5), f"{matrix}: max error {err}"


@pytest.mark.parametrize("odd", [False, True], ids=["even", "odd"])
def test_chroma_upsampling_matches_libjpeg(images, odd):
    """The JPEG's raw 4:2:0 chroma (FFmpeg's mjpeg decoder, no conversion) upsampled by us matches
    libjpeg's "fancy" upsampled chroma (the IDCTs of the two decoders differ by one code value). Odd
    sides too: there the upsampled plane has a row (column) too many, cut at the far end (cut at the
    near end, the chroma moved by one pixel passed the even size)."""
    av = pytest.importorskip("av")
    import io

    from PIL import Image

    bgr = np.ascontiguousarray(images[0][: 101 if odd else None, : 77 if odd else None, ::-1])
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 50])
    with av.open(io.BytesIO(buf.tobytes()), format="mjpeg") as c:
        frame = next(c.decode(video=0))
    assert frame.format.name == "yuvj420p"
    im = Image.open(io.BytesIO(buf.tobytes()))
    im.draft("YCbCr", im.size)
    h, w = im.size[1], im.size[0]
    assert (h % 2, w % 2) == ((1, 1) if odd else (0, 0))
    for k in (1, 2):
        raw = torch.from_numpy(_planes(frame)[k].copy())[None].float()
        ours = color.upsample(raw, h, w)[0].round().numpy()
        err = np.abs(ours - np.asarray(im)[..., k])
        assert err.max() <= 2 and err.mean() < 0.2, (err.max(), err.mean())
        nearest = raw.repeat_interleave(2, -1).repeat_interleave(2, -2)[0, :h, :w].numpy()
        assert np.abs(nearest - np.asarray(im)[..., k]).mean() > 2 * err.mean()


def _planes(frame):
    return [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width] for p in frame.planes]


# ---- round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("crange", RANGES)
@pytest.mark.parametrize("sub", ["420", "444"])
def test_conversion_round_trip_loses_under_half_a_db(images, matrix, crange, sub):
    """planes -> R'G'B' (clipped to [0,1]) -> planes, with no restoration, on JPEG-damaged real images:
    PSNR against the pristine planes drops by < 0.5 dB."""
    for img in images:
        pristine = to_planes(img, matrix, crange, sub)
        damaged = to_planes(jpeg(img, 30), matrix, crange, sub)
        h, w = damaged[0].shape[-2:]
        rgb = color.planes_to_rgb(*damaged, matrix, crange).clamp(0, 1)
        back = [
            color.quantize(p, 8, torch.uint8)
            for p in color.rgb_to_planes(rgb, damaged[1].shape[-2:], matrix, crange)
        ]
        loss = planes_psnr(pristine, damaged) - planes_psnr(pristine, back)
        assert loss < 0.5, f"{matrix} {crange} {sub}: round trip loses {loss:.3f} dB"
        if sub == "444":  # no chroma resampling: only rounding and gamut clipping remain
            assert planes_psnr(damaged, back) > 45


@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("crange", RANGES)
def test_restore_yuv_identity_is_bit_exact(images, matrix, crange):
    """With a model that leaves the picture alone, restore_yuv returns the planes unchanged: 4:2:0 and
    4:4:4, odd sizes, 10-bit, numpy and tensors, whole and tiled."""
    whole, tiled = identity_restorer(), identity_restorer(tile=64)
    for img in images[2:]:  # one even and one odd size
        for sub in ("420", "444"):
            y, u, v = (p[0].numpy() for p in to_planes(jpeg(img, 20), matrix, crange, sub))
            for r in (whole, tiled):
                res = r.restore_yuv(y, u, v, matrix=matrix, range=crange)
                for a, b in zip(res.image, (y, u, v)):
                    assert a.dtype == np.uint8 and a.shape == b.shape
                    np.testing.assert_array_equal(a, b)
                assert set(res.quality) == {"Q1", "Q2", "Q3"} and 0 < res.quality["Q2"] < 1
    y, u, v = (p[0].numpy().astype(np.uint16) for p in to_planes(images[0], matrix, crange, "420", bits=10))
    res = whole.restore_yuv(y, u, v, matrix=matrix, range=crange, bits=10)
    assert res.image[0].dtype == np.uint16
    for a, b in zip(res.image, (y, u, v)):
        np.testing.assert_array_equal(a, b)
    t = [torch.from_numpy(p) for p in to_planes_np(images[3])]
    res = whole.restore_yuv(*t, matrix=matrix, range=crange)
    assert all(isinstance(a, torch.Tensor) and torch.equal(a, b) for a, b in zip(res.image, t))


def to_planes_np(img):
    return [p[0].numpy() for p in to_planes(img, "bt709", "limited", "420")]


def test_restore_yuv_matches_rgb_restore(images):
    """restore_yuv on JPEG planes (bt601, full range, 4:4:4) agrees with Restorer.restore on the same
    picture converted to RGB by OpenCV, a conversion independent of ours."""
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    img = jpeg(images[0], 20)
    ycc = cv2.cvtColor(img, cv2.COLOR_RGB2YCrCb)  # JFIF: BT.601 full range
    y, cr, cb = (np.ascontiguousarray(ycc[..., i]) for i in range(3))
    res = r.restore_yuv(y, cb, cr, matrix="bt601", range="full")
    y2, cb2, cr2 = res.image
    ours = cv2.cvtColor(np.stack([y2, cr2, cb2], -1), cv2.COLOR_YCrCb2RGB)
    ref = r.restore(cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB))
    assert psnr(ours, ref.image) > 38
    assert psnr(ours, img) < 35  # the model really changed the picture
    assert abs(res.quality["Q2"] - ref.quality["Q2"]) < 2e-3


def test_batched_planes_and_errors(images):
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    planes = [to_planes_np(jpeg(img, 20)) for img in images[:3]]
    batch = [np.stack([p[i] for p in planes]) for i in range(3)]
    res = r.restore_yuv(*batch)
    assert res.image[0].shape == batch[0].shape and res.quality["Q2"].shape == (3,)
    for k, p in enumerate(planes):
        single = r.restore_yuv(*p)
        for a, b in zip(single.image, res.image):
            assert np.abs(a.astype(int) - b[k]).max() <= 1
        assert abs(single.quality["Q2"] - res.quality["Q2"][k]) < 1e-5
    # Tensors: (N,H,W) planes give (N,) scores and (N,1,h,w) maps; (H,W) planes lose that N throughout.
    tb = r.restore_yuv(*(torch.from_numpy(b) for b in batch), return_maps=True)
    assert tb.quality["Q2"].shape == (3,) and tb.maps[0].shape == (3, 1, *batch[0].shape[1:])
    one = r.restore_yuv(*(torch.from_numpy(p) for p in planes[1]), return_maps=True)
    assert one.image[0].shape == planes[1][0].shape
    assert one.quality["Q2"].shape == () and float(one.quality["Q2"]) == pytest.approx(
        float(tb.quality["Q2"][1])
    )
    assert [m.shape for m in one.maps] == [m.shape[1:] for m in tb.maps]
    y, u, v = planes[0]
    with pytest.raises(color.ColorError, match="unknown colour matrix"):
        r.restore_yuv(y, u, v, matrix="bt999")
    with pytest.raises(color.ColorError, match="range"):
        r.restore_yuv(y, u, v, range="studio")
    with pytest.raises(color.ColorError, match="do not fit"):
        r.restore_yuv(y, u[:-3], v[:-3])
    with pytest.raises(color.ColorError, match="bits="):
        r.restore_yuv(y.astype(np.uint16), u.astype(np.uint16), v.astype(np.uint16))
    with pytest.raises(color.ColorError, match="integer"):
        r.restore_yuv(y.astype(np.float32), u.astype(np.float32), v.astype(np.float32))
    # 16-bit codes do not fit int16 (they would read negative); 15-bit ones do.
    with pytest.raises(color.ColorError, match=r"^int16 planes hold 9..15-bit samples, not 16-bit$"):
        r.restore_yuv(*(q.astype(np.int16) for q in (y, u, v)), bits=16)
    assert r.restore_yuv(*(q.astype(np.int16) * 4 for q in (y, u, v)), bits=10).image[0].dtype == np.int16
    assert color.check_matrix("bt2020nc") == "bt2020"
    # One column wide, 4:2:0 chroma is (ceil(h/2), 1): not 4:4:0.
    assert r.restore_yuv(y[:, :1], u[:, :1], v[:, :1]).image[0].shape == y[:, :1].shape


def test_memmap_planes_of_a_raw_file(images, tmp_path):
    """A raw .yuv file mapped in place gives np.memmap planes: numpy arrays like any other."""
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    y, u, v = to_planes_np(jpeg(images[0], 20))
    mm = np.memmap(tmp_path / "f.yuv", np.uint8, "w+", shape=y.size + u.size + v.size)
    mm[:] = np.concatenate([y.ravel(), u.ravel(), v.ravel()])
    planes = (mm[: y.size].reshape(y.shape), mm[y.size : y.size + u.size].reshape(u.shape))
    planes += (mm[y.size + u.size :].reshape(v.shape),)
    got = r.restore_yuv(*planes)
    for a, b in zip(got.image, r.restore_yuv(y, u, v).image):
        np.testing.assert_array_equal(a, b)


def test_codes_beyond_the_sample_depth_are_refused():
    """P010-style 10-bit samples sit in the top bits of 16 (codes up to 65472): with bits=10 they were
    clamped to 1023 into a white picture without a word."""
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    rng = np.random.default_rng(0)
    y, u, v = (rng.integers(64, 940, s, dtype=np.uint16) for s in ((9, 7), (5, 4), (5, 4)))
    assert r.restore_yuv(y, u, v, bits=10).image[0].dtype == np.uint16  # true 10-bit codes pass
    top = y.copy()
    top[0, 0] = 1023  # the largest 10-bit code passes, one more is refused
    r.restore_yuv(top, u, v, bits=10)
    top[0, 0] = 1024
    with pytest.raises(color.ColorError, match=r"plane y holds codes \d+\.\.1024, outside"):
        r.restore_yuv(top, u, v, bits=10)
    says = re.escape("plane y holds codes") + ".*" + re.escape("outside the 10-bit range 0..1023")
    with pytest.raises(color.ColorError, match=says):
        r.restore_yuv(y << 6, u << 6, v << 6, bits=10)
    with pytest.raises(color.ColorError, match=says):
        r.restore_yuv(
            *(torch.from_numpy(p.astype(np.int32) << 6).to(torch.uint16) for p in (y, u, v)), bits=10
        )
    with pytest.raises(color.ColorError, match=says):
        list(r.restore_stream([(y << 6, u << 6, v << 6)], bits=10))
    negative = u.astype(np.int16)
    negative[0, 0] = -1
    with pytest.raises(color.ColorError, match=re.escape("plane u holds codes -1..")):
        r.restore_yuv(y.astype(np.int16), negative, v.astype(np.int16), bits=10)


def test_planes_of_different_batch_sizes_are_named_with_their_shapes():
    """An RGB image given as y (HxWx3, taken as 8 frames of 8x3) said only "y, u and v have different
    batch sizes", with no shape to see which plane was wrong or how."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    u = np.zeros((4, 4), np.uint8)
    with pytest.raises(color.ColorError) as e:
        r.restore_yuv(np.zeros((8, 8, 3), np.uint8), u, u)
    assert str(e.value) == "y, u and v have different batch sizes: shapes (8, 8, 3), (4, 4), (4, 4)"


def test_restore_yuv_image_false_gives_the_quality_only_without_making_the_planes(monkeypatch):
    """restore_yuv had no image=False (restore_stream and score have): a QC pass on planes made the
    restored planes only to drop them. Now the quality (and maps) are the same numbers, the image is
    None, and restore_tensor is asked for the quality only, as restore_stream(image=False) does."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    g = np.random.default_rng(0)
    planes = [g.integers(64, 960, s, dtype=np.uint16) for s in ((2, 16, 24), (2, 8, 12), (2, 8, 12))]
    calls, real = [], r.restore_tensor
    monkeypatch.setattr(r, "restore_tensor", lambda *a, **k: calls.append(k) or real(*a, **k))
    for y, u, v in (planes, [p[0] for p in planes], [torch.from_numpy(p.astype(np.int32)) for p in planes]):
        full = r.restore_yuv(y, u, v, bits=10, return_maps=True)
        calls.clear()
        res = r.restore_yuv(y, u, v, bits=10, return_maps=True, image=False)
        assert [k.get("image") for k in calls] == [False]
        assert res.image is None and res.info == full.info
        for k in full.quality:
            np.testing.assert_array_equal(np.asarray(res.quality[k]), np.asarray(full.quality[k]))
        for m, n in zip(res.maps, full.maps):
            np.testing.assert_array_equal(np.asarray(m), np.asarray(n))
    with pytest.raises(ValueError) as e:
        r.restore_yuv(*planes, bits=10, image="no")
    assert str(e.value) == "image must be True or False, not 'no'"


def test_pyav_colorspace_and_color_range_codes_are_taken_as_names():
    """PyAV frames give frame.colorspace and frame.color_range as ints (ITU-T H.273 codes; av 18's
    Colorspace and ColorRange enums are IntEnums of them): restore_yuv(..., matrix=frame.colorspace)
    was refused as "unknown colour matrix 1". Codes 1, 5/6, 9 and ranges 1, 2 are taken; another
    code is refused in one line naming it."""
    assert [color.check_matrix(c) for c in (1, 5, 6, 9, np.int64(1))] == [
        "bt709",
        "bt601",
        "bt601",
        "bt2020",
        "bt709",
    ]
    assert [color.check_range(c) for c in (1, 2, np.uint8(2))] == ["limited", "full", "full"]
    with pytest.raises(color.ColorError, match=r"^colour matrix code 2 \(unspecified\) .*: name the matrix"):
        color.check_matrix(2)
    with pytest.raises(color.ColorError, match=r"^colour matrix code 7 is not supported"):
        color.check_matrix(7)
    with pytest.raises(color.ColorError, match=r"^colour range code 0 \(unspecified\)"):
        color.check_range(0)
    with pytest.raises(color.ColorError, match=r"^unknown colour matrix True"):
        color.check_matrix(True)
    r = identity_restorer()
    rng = np.random.default_rng(5)
    y = rng.integers(16, 236, (16, 16), dtype=np.uint8)
    u, v = (rng.integers(16, 241, (8, 8), dtype=np.uint8) for _ in "uv")
    want = r.restore_yuv(y, u, v, matrix="bt601", range="full")
    got = r.restore_yuv(y, u, v, matrix=5, range=2)
    assert got.info == want.info == {"matrix": "bt601", "range": "full", "bits": 8, "caveat": None}
    assert all(np.array_equal(a, b) for a, b in zip(got.image, want.image))
    (frame,) = r.restore_stream([(y, u, v)], matrix=5, range=2)
    assert frame.info == want.info


def test_pyav_enum_values_are_taken_as_their_codes():
    av = pytest.importorskip("av", reason="PyAV is not installed")
    from av.video.reformatter import ColorRange, Colorspace

    assert (
        color.check_matrix(Colorspace.ITU709) == "bt709" and color.check_matrix(Colorspace.BT2020) == "bt2020"
    )
    assert color.check_range(ColorRange.JPEG) == "full" and color.check_range(ColorRange.MPEG) == "limited"
    frame = av.VideoFrame(16, 16, "yuv420p")
    frame.colorspace, frame.color_range = Colorspace.ITU601, ColorRange.MPEG
    assert (color.check_matrix(frame.colorspace), color.check_range(frame.color_range)) == (
        "bt601",
        "limited",
    )
    assert color.check_matrix("ITU709") == "bt709"  # the enum's name, as a string


def test_unspecified_matrix_and_range_codes_name_what_to_pass():
    """libx264 files made without colour tags decode (PyAV 18) with frame.colorspace 2 and
    frame.color_range 0: restore_yuv(..., matrix=frame.colorspace, range=frame.color_range) was refused
    with "name the matrix (codes 1 (bt709), ...)", not saying which one qairn video would take. The
    refusal now names it for the frame's height, and the range's refusal says to pass 'limited'."""
    r = identity_restorer()
    y = np.full((24, 32), 128, np.uint8)
    u = v = np.full((12, 16), 128, np.uint8)
    with pytest.raises(color.ColorError, match=r"^colour matrix code 2 .*matrix='bt601' for 24 lines"):
        r.restore_yuv(y, u, v, matrix=2, range=1)
    with pytest.raises(color.ColorError, match=r"matrix='bt709' for HD \(720 lines or more\), 'bt601' below"):
        r.restore_stream([(y, u, v)], matrix=2)
    with pytest.raises(
        color.ColorError, match=r"^colour range code 0 \(unspecified\).*pass range='limited'$"
    ):
        r.restore_yuv(y, u, v, matrix=1, range=0)
    assert color.guessed_matrix(720) == "bt709" and color.guessed_matrix(576) == "bt601"
