"""The Restorer as a library caller meets it: what comes back can be used like any tensor or array."""

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lively_model

import qairn


@pytest.mark.parametrize("tile", [None, 16])
def test_tensor_maps_are_ordinary_tensors_whole_or_tiled(tile):
    """The whole-image pass handed back views of the backend's gammas, made under inference_mode:
    maps[k].mul_(255) raised "Inplace update to inference tensor outside InferenceMode", while the
    tiled pass's maps took it. Both are ordinary tensors now."""
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=tile, overlap=0)
    x = torch.rand(2, 3, 20, 30, generator=torch.Generator().manual_seed(0))
    res = r.restore(x, return_maps=True)
    y, u, v = (torch.full(s, 128, dtype=torch.uint8) for s in ((20, 30), (10, 15), (10, 15)))
    for maps in (res.maps, r.restore_yuv(y, u, v, return_maps=True).maps):
        for m in maps:
            assert not m.is_inference()
            m.mul_(255)  # raised on the whole-image pass


@pytest.mark.parametrize("tile_batch", [2.5, 0, -3, "4", None, True])
def test_tile_batch_is_checked_when_the_restorer_is_made(tile_batch):
    """tile_batch=2.5 was kept and the first tiled image failed inside range() ("'float' object cannot
    be interpreted as an integer"), "4" and None failed on max(); 0 and -3 became 1 without a word."""
    with pytest.raises(ValueError) as e:
        qairn.Restorer(model=lively_model(), device="cpu", tile=16, overlap=0, tile_batch=tile_batch)
    assert str(e.value) == f"tile_batch must be an int >= 1 (tiles per batch), not {tile_batch!r}"
    assert qairn.Restorer(model=lively_model(), device="cpu", tile_batch=np.int64(3)).tile_batch == 3


@pytest.mark.parametrize(
    "bad, error, says",
    [
        (None, TypeError, "stream items are RGB images or (y, u, v) plane tuples, not NoneType"),
        ((np.zeros((8, 8), np.uint8),) * 2, ValueError, "a Y'CbCr frame is a (y, u, v) tuple, got 2 planes"),
    ],
)
def test_frames_read_before_an_item_that_is_no_frame_are_still_restored(bad, error, says):
    """A source that raises mid-stream has the frames it gave restored and handed out first; a source
    that gives something that is no frame (a decoder's None at the end) lost them: with batch=4, the
    5th and 6th frames never came out."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    frames = [np.full((9, 7, 3), 40 * i, np.uint8) for i in range(6)]
    got = []
    with pytest.raises(error) as e:
        for res in r.restore_stream([*frames, bad, frames[0]], batch=4):
            got.append(res)
    assert str(e.value) == f"frame 6: {says}"
    assert len(got) == 6
    for res, frame in zip(got, frames):
        np.testing.assert_array_equal(res.image, r.restore(frame).image)


def bad_in_the_middle(kind: str) -> tuple[list, str]:
    """Six frames of one kind and shape, the 6th (index 5) bad in a way only its pixels show."""
    rng = np.random.default_rng(0)
    if kind == "float":
        frames = [rng.random((9, 7, 3), dtype=np.float32) for _ in range(6)]
        frames[5] = frames[5] * 255
        return frames, "frame 5: float images are taken in [0, 1]"
    if kind == "tensor":
        frames = [torch.rand(3, 9, 7, generator=torch.Generator().manual_seed(k)) for k in range(6)]
        frames[5][0, 0, 0] = float("nan")
        return frames, "frame 5: float tensors are taken in [0, 1]"
    frames = [
        tuple(rng.integers(64, 941, s, dtype=np.uint16) for s in ((10, 8), (5, 4), (5, 4))) for _ in range(6)
    ]
    frames[5] = (frames[5][0] << 6, *frames[5][1:])  # MSB-aligned (P010) codes given as 10-bit
    return frames, "frame 5: plane y holds codes"


@pytest.mark.parametrize("kind", ["float", "tensor", "yuv"])
def test_a_bad_frame_in_a_batch_does_not_lose_the_good_frames_before_it(kind):
    """A frame whose pixels are refused (a float frame in 0..255, NaN, 16-bit codes given as 10-bit)
    failed its whole batch: with batch=4, frames 4 and 5 in one batch, frame 4 was never handed out
    (4 results of 5) and the error did not say which frame it was about."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    frames, says = bad_in_the_middle(kind)
    got = []
    with pytest.raises(ValueError) as e:
        for res in r.restore_stream(frames, batch=4, bits=10 if kind == "yuv" else None):
            got.append(res)
    assert len(got) == 5
    assert str(e.value).startswith(says) and "\n" not in str(e.value)
    for res, frame in zip(got, frames):
        if kind == "yuv":
            want = r.restore_yuv(*frame, bits=10).image
            assert all(np.array_equal(a, b) for a, b in zip(res.image, want))
        elif kind == "tensor":
            torch.testing.assert_close(res.image, r.restore(frame[None]).image[0], atol=1e-6, rtol=0)
        else:
            np.testing.assert_allclose(res.image, r.restore(frame).image, atol=1e-6, rtol=0)


def test_big_endian_arrays_are_restored_and_given_back_big_endian():
    """np.frombuffer(pipe, ">u2") of an rgb48be or yuv420p10be stream was refused as "unsupported image
    dtype >u2 (use uint8, uint16 ...)" (restore_yuv: "planes must be integer code values"): the same
    numbers in the other byte order. They are restored as the native ones and given back as they came."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 65536, (9, 7, 3)).astype(np.uint16)
    for given in (img, (img / 65535).astype(np.float32)):
        out = r.restore(given.astype(given.dtype.newbyteorder(">"))).image
        assert out.dtype == given.dtype.newbyteorder(">")
        np.testing.assert_array_equal(out, r.restore(given).image)
        stream = [res.image for res in r.restore_stream([given.astype(out.dtype)] * 2, batch=1)]
        np.testing.assert_array_equal(stream[1], out)
    planes = (rng.integers(64, 941, (9, 7)), rng.integers(64, 961, (5, 4)), rng.integers(64, 961, (5, 4)))
    planes = tuple(p.astype(np.uint16) for p in planes)
    big = tuple(p.astype(">u2") for p in planes)
    expect = r.restore_yuv(*planes, bits=10).image
    for got in (r.restore_yuv(*big, bits=10).image, next(r.restore_stream([big], bits=10)).image):
        for p, q in zip(got, expect):
            assert p.dtype == np.dtype(">u2")
            np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize(
    "change, says",
    [
        ({"rqa_div": 0}, "unreadable qairn config (integer division or modulo by zero)"),
        ({"residual": "false"}, "unreadable qairn config (residual must be true or false, not 'false')"),
        ({"identity_init": 1}, "unreadable qairn config (identity_init must be true or false, not 1)"),
    ],
)
def test_a_weights_file_whose_config_is_garbled_is_refused(tmp_path, change, says):
    """rqa_div 0 escaped load_model as a bare ZeroDivisionError traceback; residual "false" (a string)
    was loaded as the global residual switched on, a different network from the one the file names,
    which the tensor-shape check cannot see."""
    import json

    from safetensors.torch import save_file

    from qairn.weights_io import FORMAT, WeightsError

    model = lively_model()
    config = json.loads(model.config.to_json()) | change
    bad = tmp_path / "bad.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(bad),
        metadata={"format": FORMAT, "config": json.dumps(config)},
    )
    with pytest.raises(WeightsError) as e:
        qairn.load_model(bad)
    assert str(e.value) == f"{bad}: {says}"


def test_a_network_or_a_path_in_the_wrong_argument_is_refused_in_one_line():
    """Restorer(model="w.safetensors") failed with "'str' object has no attribute 'config'", a state
    dict likewise, and Restorer(net) (weights= is the first argument) with Path()'s "expected str,
    bytes or os.PathLike object, not QAIRN"."""
    net = lively_model()
    cases = [
        ({"model": "w.safetensors"}, "model= takes a QAIRN network (qairn.load_model(path)), not str; "),
        (
            {"model": net.state_dict()},
            "model= takes a QAIRN network (qairn.load_model(path)), not OrderedDict",
        ),
        ({"weights": net}, "weights= takes the path of a qairn .safetensors file, not QAIRN; give a network"),
        ({"weights": 3}, "weights= takes the path of a qairn .safetensors file, not int"),
    ]
    for options, says in cases:
        with pytest.raises(TypeError) as e:
            qairn.Restorer(device="cpu", **options)
        assert str(e.value).startswith(says) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "options, says",
    [
        ({"channel_order": "BGR"}, "channel_order must be 'rgb' or 'bgr', not 'BGR'"),
        ({"channel_order": "rbg"}, "channel_order must be 'rgb' or 'bgr', not 'rbg'"),
        ({"matrix": "bt709x"}, "unknown colour matrix 'bt709x'; choose one of bt601, bt709, bt2020"),
        # image="no" handed out images (taken by its truth) and image=0 quality only, unsaid.
        ({"image": "no"}, "image must be True or False, not 'no'"),
        ({"image": 0}, "image must be True or False, not 0"),
    ],
)
def test_stream_options_are_checked_when_the_stream_is_asked_for(options, says):
    """restore_stream(frames, channel_order="BGR") ran: anything but "bgr" was taken as RGB, so
    OpenCV frames were restored with red and blue swapped, where restore() refuses "BGR". Now refused,
    and when restore_stream is called, not at the first frame drawn from it."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    frames = [np.zeros((9, 7, 3), np.uint8)]
    with pytest.raises(ValueError) as e:
        r.restore_stream(frames, **options)  # not iterated
    assert str(e.value) == says


@pytest.mark.parametrize("batch", [None, 2.5, "4", 0, -3, True])
def test_stream_batch_is_checked_when_the_stream_is_asked_for(batch):
    """restore_stream(frames, batch=None) failed at the first frame drawn with int()'s "argument must
    be a string, a bytes-like object or a real number"; 2.5, "4", 0, -3 and True ran as 2, 4, 1, 1, 1."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    with pytest.raises(ValueError) as e:
        r.restore_stream([np.zeros((8, 8, 3), np.uint8)], batch=batch)  # not iterated
    assert str(e.value) == f"batch must be an int >= 1 (frames per batch), not {batch!r}"
    assert len(list(r.restore_stream([np.zeros((8, 8, 3), np.uint8)] * 3, batch=np.int64(2)))) == 3


def test_a_misspelt_stream_option_is_named_with_the_ones_it_takes():
    """restore_stream(frames, chanel_order="rgb") raised Python's "restore_stream() got an unexpected
    keyword argument 'chanel_order'", naming neither Restorer nor the options it takes; as the
    Restorer's own misspelt option (tile_size=) is, it is now named with the valid ones."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    with pytest.raises(TypeError) as e:
        r.restore_stream([np.zeros((8, 8, 3), np.uint8)], chanel_order="rgb")  # not iterated
    assert str(e.value) == (
        "unknown option chanel_order: restore_stream takes batch, matrix, range, bits, channel_order, "
        "image, return_maps"
    )


def test_a_tensor_that_requires_grad_is_restored_without_a_warning():
    """The range check turned the input's min and max into floats, and torch warned "Converting a
    tensor with requires_grad=True to a scalar may lead to unexpected behavior" at every call."""
    import warnings

    r = qairn.Restorer(model=lively_model(), device="cpu")
    x = torch.rand(1, 3, 9, 7, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = r.restore(x)
    assert res.image.shape == (1, 3, 9, 7)


@pytest.mark.parametrize(
    "backend, option, listed",
    [
        ("eager", "tile_size", "channels_last"),
        ("onnxruntime", "onnx_path", "providers"),
        ("tensorrt", "engin", "engine"),
    ],
)
def test_a_misspelt_option_is_named_with_what_the_backend_takes(backend, option, listed):
    # It reached the backend's __init__ and surfaced as "TorchBackend.__init__() got an unexpected keyword
    # argument 'tile_size'" (or OrtBackend's, after ONNX Runtime was imported).
    with pytest.raises(
        TypeError, match=rf"unknown option {option}: neither a Restorer argument nor .*{listed}"
    ):
        qairn.Restorer(device="cpu", backend=backend, **{option: 1})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import (torch.jit)
def test_backend_options_the_bench_uses_are_still_taken():
    # compile + the Triton gate is a backend option pair (qairn bench's compile-triton-fp16), not a typo.
    for backend, options in [
        ("compile", {"triton": True}),
        ("eager", {"channels_last": True}),
        ("triton", {}),
    ]:
        qairn.Restorer(device="cpu", backend=backend, precision="fp32", model=lively_model(), **options)
    with pytest.raises(TypeError, match="unknown option triton: .*backend 'triton'"):
        qairn.Restorer(device="cpu", backend="triton", model=lively_model(), triton=True)


@pytest.mark.parametrize("index", [0, 1, np.int64(1)])
def test_an_int_device_is_that_cuda_device_as_in_torch(monkeypatch, index):
    """torch.device(0) and tensor.to(0) take an int as a GPU index; Restorer(device=0) was refused as
    "unknown device '0'". On a machine with two GPUs (faked here) it is cuda:N; with none it gets the
    same one line as device="cuda:0", and True, a float or None are refused in one line too."""
    from qairn.engine.restorer import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(index) == torch.device("cuda", int(index))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError) as e:
        qairn.Restorer(model=lively_model(), device=index)
    assert str(e.value) == f"device 'cuda:{index}' requested, but this machine has no CUDA device"
    for bad in (True, -1, 1.0, None):
        with pytest.raises(ValueError) as e:
            resolve_device(bad)
        assert str(e.value) == f"unknown device '{bad}': use cpu, cuda, cuda:N or auto"


def test_bits_is_the_sample_depth_of_rgb_frames_too():
    """restore_stream(frames, bits=10) took bits for Y'CbCr planes only: 10-bit RGB frames in uint16
    (gbrp10 unpacked) were scaled as 0..65535, a nearly black picture, and came back with codes up to
    1515 for a 10-bit stream. Now they are restored as codes 0..1023, like the same picture in floats;
    codes over 1023 and bits for frames that have no depth (float) or another one (uint8) are refused."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 1024, (16, 12, 3), dtype=np.uint16) for _ in range(3)]
    got = list(r.restore_stream(frames, batch=2, bits=10))
    for res, frame in zip(got, frames, strict=True):
        want = np.round(r.restore(frame / np.float32(1023)).image * 1023)
        assert res.image.dtype == np.uint16 and res.image.max() <= 1023
        np.testing.assert_allclose(res.image, want, atol=1, rtol=0)
        assert res.quality == pytest.approx(r.restore(frame / np.float32(1023)).quality, rel=1e-5)
    # bits=16 is what uint16 frames are taken as anyway; 8 is uint8's own depth.
    full = [f << 6 for f in frames[:1]]
    assert np.array_equal(next(r.restore_stream(full, bits=16)).image, next(r.restore_stream(full)).image)
    eight = np.zeros((8, 8, 3), np.uint8)
    assert next(r.restore_stream([eight], bits=8)).image.shape == (8, 8, 3)
    for frame, says in [
        (full[0], f"frame 0: plane rgb holds codes {full[0].min()}..{full[0].max()}, outside the 10-bit"),
        (np.zeros((8, 8, 3), np.float32), "frame 0: bits=10 is the sample depth of integer frames"),
        (torch.zeros(3, 8, 8), "frame 0: bits=10 is the sample depth of integer frames"),
        (eight, "frame 0: uint8 frames hold 8-bit samples, not 10-bit"),
    ]:
        with pytest.raises(ValueError) as e:
            list(r.restore_stream([frame], bits=10))
        assert str(e.value).startswith(says), str(e.value)


@pytest.mark.parametrize("channels", [3, 4])
def test_a_source_that_reuses_one_buffer_with_batch_1(channels):
    """A decoder that reads every frame into one buffer (readinto) yields the same array each time.
    With batch=1 each frame was still held until the next one had been read, into that buffer, so
    every result but the last was the restored next frame (3 wrong of 4)."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (16, 12, channels), dtype=np.uint8) for _ in range(4)]

    def reader():
        buf = np.empty_like(frames[0])
        for f in frames:
            buf[...] = f
            yield buf

    got = [res.image for res in r.restore_stream(reader(), batch=1)]
    wrong = [
        i
        for i, (a, f) in enumerate(zip(got, frames, strict=True))
        if not np.array_equal(a, r.restore(f).image)
    ]
    assert wrong == []


@pytest.mark.parametrize(
    "x", [torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.zeros(3, 16, 16), torch.zeros(1, 4, 16, 16)]
)
def test_restore_tensor_refuses_what_is_not_a_float_batch(x):
    """restore_tensor(uint8 batch) took 0..255 as floats: 90% of a random picture came back white
    (restore() of it: 2%); a (3,H,W) tensor failed with "not enough values to unpack", and 4 channels
    deep in the first conv."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    with pytest.raises(ValueError) as e:
        r.restore_tensor(x)
    assert str(e.value) == (
        f"restore_tensor takes (N,3,H,W) float in [0, 1], not {x.dtype} of shape {tuple(x.shape)} "
        "(restore() takes uint8 and uint16 tensors too)"
    )


def test_a_closed_restorer_frees_its_backend_and_refuses_more_work():
    # There was no close(): an engine's or session's memory waited for the garbage collector.
    closed = []

    class Backend:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, x):
            return self.inner(x)

        def close(self):
            closed.append(True)

    img = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    with qairn.Restorer(model=lively_model(), device="cpu") as r:
        r.backend = Backend(r.backend)
        assert r.restore(img).image.shape == img.shape
    assert closed == [True] and r.closed
    with pytest.raises(RuntimeError, match="^this Restorer was closed$"):
        r.restore(img)
    with pytest.raises(RuntimeError, match="^this Restorer was closed$"):
        list(r.restore_stream([img]))
    r.close()  # twice is harmless
    assert closed == [True, True]


@pytest.mark.parametrize("tile", [None, 16])
def test_images_and_maps_come_back_contiguous_whole_or_tiled(tile):
    """The whole-image pass handed back the network's own channels_last output (y.view(-1) raised
    "view size is not compatible with input tensor's size and stride"), the tiled pass crops of its
    padded map buffers; which one a caller got depended on the image size. Both are contiguous now."""
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=tile, overlap=0)
    x = torch.rand(2, 3, 20, 30, generator=torch.Generator().manual_seed(0))
    y, _, maps = r.restore_tensor(x, return_maps=True)
    res = r.restore((x * 255).round().to(torch.uint8), return_maps=True)
    for t in (y, *maps, res.image, *res.maps):
        assert t.is_contiguous()
    assert all(m.flags.c_contiguous for m in r.restore(np.zeros((20, 30, 3)), return_maps=True).maps)


def test_restore_takes_bits_for_one_image_as_restore_stream_does_for_frames():
    """restore_stream(frames, bits=10) took 10-bit RGB in uint16 as codes 0..1023, but restore(), the
    call for one image, had no bits=: the same frame was scaled as 0..65535 (a nearly black picture)
    and could only be given as floats. Now restore(img, bits=10) and score(img, bits=10) match the
    stream, and refuse the same things."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    frame = np.random.default_rng(0).integers(0, 1024, (16, 12, 3), dtype=np.uint16)
    streamed = next(r.restore_stream([frame], bits=10))
    res = r.restore(frame, bits=10)
    assert res.image.dtype == np.uint16
    np.testing.assert_array_equal(res.image, streamed.image)
    assert res.quality == pytest.approx(streamed.quality, rel=1e-6)
    assert r.score(frame, bits=10) == res.quality
    assert np.array_equal(r.restore(frame << 6, bits=16).image, r.restore(frame << 6).image)
    for img, says in [
        (frame << 6, "plane rgb holds codes"),
        (np.zeros((8, 8, 3), np.float32), "bits=10 is the sample depth of integer frames"),
        (torch.zeros(1, 3, 8, 8), "bits=10 is the sample depth of integer frames"),
        (np.zeros((8, 8, 3), np.uint8), "uint8 frames hold 8-bit samples, not 10-bit"),
    ]:
        with pytest.raises(ValueError, match=says):
            r.restore(img, bits=10)


@pytest.mark.parametrize("shape", [(0, 3, 16, 16), (1, 3, 0, 16), (1, 3, 16, 0)])
def test_restore_tensor_refuses_an_empty_batch_in_one_line(shape):
    """restore() refused empty tensors, restore_tensor let them through to fail deep inside: "The
    expanded size of the tensor (4) must match the existing size (0)" for no images, "Kernel size
    can't be greater than actual input size" for no rows or columns."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    with pytest.raises(ValueError) as e:
        r.restore_tensor(torch.zeros(shape))
    assert str(e.value) == f"empty image tensor of shape {shape}"


@pytest.mark.parametrize("bits", ["10", 10.5, 7, 17, True])
def test_bits_is_checked_when_called_in_one_line(bits):
    """bits="10" failed with "'<=' not supported between instances of 'int' and 'str'" (from
    restore_stream, at the first frame, though its options are checked when it is called); 10.5 was
    taken, scaling uint16 codes by 2**10.5 - 1; True passed as 1 and was then said to need 9..16."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    img = np.zeros((8, 8, 3), np.uint16)
    y, u, v = (np.zeros(s, np.uint16) for s in ((8, 8), (4, 4), (4, 4)))
    for call in (
        lambda: r.restore(img, bits=bits),
        lambda: r.score(img, bits=bits),
        lambda: r.restore_yuv(y, u, v, bits=bits),
        lambda: r.restore_stream([img], bits=bits),  # not iterated: checked when called
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == f"bits must be an int from 8 to 16 (the sample depth), not {bits!r}"


@pytest.mark.parametrize(
    "backend, option", [("eager", "compile"), ("triton", "compile"), ("eager", "triton")]
)
def test_compile_and_triton_are_backends_not_options_of_the_others(backend, option):
    """Restorer(backend="eager", compile=True), offered by the unknown-option message itself ("one of
    backend 'eager''s (compile, triton, ...)"), ran a torch.compile'd network reported as eager, cut
    512 tiles where eager restores small images whole, and kept torch.compile's own CUDA graphs that
    cuda_graph=True turns off for backend="compile" alone. Refused now, naming the backend to ask for."""
    with pytest.raises(TypeError) as e:
        qairn.Restorer(
            device="cpu", backend=backend, precision="fp32", model=lively_model(), **{option: True}
        )
    assert str(e.value).startswith(f"unknown option {option}: ")
    assert str(e.value).endswith(f"; for {option}, give backend={option!r}")
    assert "compile" not in str(e.value).split("(")[1].split(")")[0]  # not listed as one of eager's


def test_close_lets_go_of_the_torch_backends_network():
    """close() promises the device memory back now, not when the Restorer is collected; the eager,
    triton and compile backends (no close() of their own) kept their device copy of the network."""
    import gc
    import weakref

    r = qairn.Restorer(model=lively_model(), device="cpu")
    weight = weakref.ref(next(r.backend.model.parameters()))
    r.close()
    gc.collect()
    assert weight() is None
    with pytest.raises(RuntimeError, match="^this Restorer was closed$"):
        r.restore(np.zeros((8, 8, 3), np.uint8))
    r.close()  # twice is harmless


def test_a_closed_restorer_refuses_a_stream_when_it_is_asked_for():
    """restore_stream checks its options when called, but a closed Restorer handed out a generator that
    failed only at its first frame, far from the call that was wrong (and never, for no frames)."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    r.close()
    with pytest.raises(RuntimeError, match="^this Restorer was closed$"):
        r.restore_stream([])


def test_a_closed_torch_backend_says_so_as_the_engines_do():
    """A torch backend used after close() (a thread still holding it, or a caller of the backend
    itself) failed with "'NoneType' object is not callable"; ONNX Runtime and TensorRT say they were
    closed, and so does it now."""
    from qairn.engine.backends import BackendError

    r = qairn.Restorer(model=lively_model(), device="cpu")
    backend = r.backend
    r.close()
    x = torch.zeros(1, 3, 16, 16)
    for call in (
        lambda: backend(x),
        lambda: backend.forward_pooled(x, 2.0, torch.zeros(1, 4, dtype=torch.int64)),
    ):
        with pytest.raises(BackendError, match="^this torch backend was closed$"):
            call()


def test_restore_tensor_refuses_floats_out_of_range_on_the_cpu_as_restore_does():
    """restore() refused a CPU tensor in 0..255 or with NaN; restore_tensor, the call for float batches,
    clamped 0..255 into a picture 90% white and turned NaN into NaN outputs scored Q = 0, unsaid.
    (On a GPU neither reads the range: that would cost a device sync per call.)"""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    x = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"^float tensors are taken in \[0, 1\], this one spans \[0.02032, 255\]"
    ):
        r.restore_tensor(x * 255)
    # One NaN was said as "spans [nan, nan] (divide 0..255 data by 255, or pass uint8)".
    with pytest.raises(ValueError, match=r"^float tensors are taken in \[0, 1\], this one holds NaN$"):
        r.restore_tensor(nan)
    r.restore_tensor(x * (1 + 1 / 255))  # rounding overshoot is fine, as for restore()


@pytest.mark.parametrize("fused_conv", ["yes", 2.5, -1])
def test_fused_conv_is_checked_when_the_restorer_is_made(fused_conv):
    """fused_conv="yes" failed with "invalid literal for int() with base 10: 'yes'", 2.5 fused the
    convs up to 2 channels wide and -1 none, without a word."""
    with pytest.raises(ValueError) as e:
        qairn.Restorer(model=lively_model(), device="cpu", fused_conv=fused_conv)
    assert str(e.value) == (
        f"fused_conv takes True, False or the widest conv to fuse (an int >= 1), not {fused_conv!r}"
    )


@pytest.mark.parametrize("tile", [None, 32])
def test_score_gives_restores_quality_exactly_without_making_the_image(tile):
    """score() skips the network's tail, the tiles' blend and the copy back: the quality it gives is
    still restore()'s to the bit, for arrays and tensors, whole or tiled."""
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=tile, overlap=16)
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    assert r.score(img) == r.restore(img).quality
    batch = torch.from_numpy(np.stack([img, img[::-1].copy()])).permute(0, 3, 1, 2)
    q, restored = r.score(batch), r.restore(batch).quality
    assert all(torch.equal(q[k], restored[k]) for k in restored)
    y, q, maps = r.restore_tensor(batch.float() / 255, return_maps=True, image=False)
    assert y is None and all(torch.equal(q[k], restored[k]) for k in restored)
    assert all(torch.equal(m, n) for m, n in zip(maps, r.restore(batch, return_maps=True).maps))


SWITCHES = ["cuda_graph", "channels_last", "triton"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import (torch.jit)
@pytest.mark.parametrize(
    "option, value",
    [(o, v) for o in SWITCHES for v in ["no", 1, 0, 2.0]] + [("cuda_graph", None), ("triton", None)],
)
def test_switches_take_true_or_false_only(option, value):
    """cuda_graph="no" and channels_last="no" were taken as true (any truthy value turned them on; on
    the CPU, cuda_graph="no" was refused as "cuda_graph=True needs a CUDA device"). Refused now, as
    tile_batch and overlap are. (channels_last=None is its default: on.)"""
    backend = "compile" if option == "triton" else "eager"
    with pytest.raises(ValueError) as e:
        qairn.Restorer(model=lively_model(), device="cpu", backend=backend, **{option: value})
    assert str(e.value) == f"{option} must be True or False, not {value!r}"


def test_switches_take_numpy_bools():
    r = qairn.Restorer(model=lively_model(), device="cpu", cuda_graph=np.False_, channels_last=np.False_)
    assert r.cuda_graph is False and r.backend.channels_last is False


def test_close_waits_for_a_restore_running_in_another_thread():
    """close() freed the backend (an ORT session, an engine) at once, while another thread's restore()
    was still inside it: that call went on with a closed backend. close() now waits for calls of
    other threads to end, and only then closes the backend."""
    import threading

    events = []
    inside, release, settled = threading.Event(), threading.Event(), threading.Event()

    class Backend:  # the real network, held inside its call until released
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, x):
            inside.set()
            release.wait()
            events.append("call ended")
            return self.inner(x)

        def close(self):
            events.append("backend closed")

    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    r.backend = Backend(r.backend)

    class Watched(threading.Condition):  # says when close() has begun to wait
        def wait(self, timeout=None):
            settled.set()
            return super().wait(timeout)

    r._calls_changed = Watched(threading.Lock())
    img = np.random.default_rng(0).integers(0, 256, (9, 17, 3), dtype=np.uint8)
    results = []
    # Daemon threads, every wait limited: a close() that deadlocks fails this test, not the whole run
    # (pytest-timeout's thread method ends the process; a thread left waiting would hold its exit).
    worker = threading.Thread(target=lambda: results.append(r.restore(img)), daemon=True)
    worker.start()
    assert inside.wait(60), "restore() never reached the backend"

    def close():
        r.close()
        settled.set()  # the old close() returned without waiting

    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    assert settled.wait(60), "close() neither waited nor returned"
    release.set()
    worker.join(60)
    closer.join(60)
    assert not worker.is_alive() and not closer.is_alive(), "restore() and close() hung"
    assert events == ["call ended", "backend closed"]
    assert results[0].image.shape == img.shape


def test_close_from_inside_a_call_does_not_wait_for_that_call():
    """A progress callback that closes the Restorer: close() must not wait for the call it is in (it
    would wait for ever); that call's next tiles are refused, as any call after close()."""
    from qairn.engine.backends import BackendError

    r = qairn.Restorer(model=lively_model(), device="cpu", tile=16, overlap=0, tile_batch=1)
    img = np.random.default_rng(0).integers(0, 256, (16, 40, 3), dtype=np.uint8)
    with pytest.raises(BackendError, match="^this torch backend was closed$"):
        r.restore(img, progress=lambda done, total: r.close())
    assert r.closed


def test_the_float_range_is_read_once_and_not_for_integer_input(monkeypatch):
    """restore() of a uint8 image read the min and max of the float batch it had made itself from the
    integers (in [0, 1] by construction: ~0.24 ms a call), and a float tensor had its range read twice
    (by restore() and again by restore_tensor). Checked only where the data came in as floats now."""
    from qairn.engine import restorer as restorer_module

    reads = []
    check = restorer_module.check_float_range
    monkeypatch.setattr(
        restorer_module, "check_float_range", lambda x, *a, **k: reads.append(1) or check(x, *a, **k)
    )
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    img = np.random.default_rng(0).integers(0, 256, (9, 17, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    calls = {
        "uint8 array": (lambda: r.restore(img), 0),
        "uint16 array": (lambda: r.restore(img.astype(np.uint16) * 257), 0),
        "uint8 tensor": (lambda: r.restore(x), 0),
        "float tensor": (lambda: r.restore(x / 255.0), 1),
        "restore_tensor": (lambda: r.restore_tensor(x / 255.0), 1),
        "restore_tensor in_range": (lambda: r.restore_tensor(x / 255.0, in_range=True), 0),
    }
    for name, (call, expected) in calls.items():
        reads.clear()
        call()
        assert len(reads) == expected, name


@pytest.mark.parametrize("entry", ["restore", "restore tensor", "restore_tensor", "restore_yuv"])
def test_return_maps_takes_true_or_false_only(entry):
    """return_maps="no" returned the maps (any truthy value asked for them), as cuda_graph="no" turned the
    graphs on. Refused now with the same line."""
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    img = np.zeros((8, 8, 3), np.uint8)
    plane = np.zeros((8, 8), np.uint8)
    calls = {
        "restore": lambda v: r.restore(img, return_maps=v),
        "restore tensor": lambda v: r.restore(torch.zeros(1, 3, 8, 8), return_maps=v),
        "restore_tensor": lambda v: r.restore_tensor(torch.zeros(1, 3, 8, 8), return_maps=v),
        "restore_yuv": lambda v: r.restore_yuv(plane, plane, plane, return_maps=v),
    }
    with pytest.raises(ValueError) as e:
        calls[entry]("no")
    assert str(e.value) == "return_maps must be True or False, not 'no'"
    calls[entry](np.True_)


def test_option_errors_list_their_choices_plainly():
    """The precision error read "choose one of ['bf16', 'fp16', 'fp32']", a Python list without "auto",
    which the Restorer takes; the preset, write-suffix, gate-backend and export-dtype errors were lists
    too."""
    from qairn.engine.backends import BackendError
    from qairn.engine.imageio import encode_image
    from qairn.export.onnx_export import ExportModel
    from qairn.kernels.gate import use_gate_backend
    from qairn.model import preset

    model = lively_model()
    with pytest.raises(
        BackendError, match=r"^unknown precision 'fp64'; choose one of auto, bf16, fp16, fp32$"
    ):
        qairn.Restorer(model=model, device="cpu", precision="fp64")
    with pytest.raises(BackendError, match=r"^unknown backend 'eagre'; choose one of auto, eager, compile, "):
        qairn.Restorer(model=model, device="cpu", backend="eagre")
    with pytest.raises(
        ValueError, match=r"^unknown preset 'huge'; choose one of paper, small, small-gated, tiny$"
    ):
        preset("huge")
    with pytest.raises(ValueError, match=r"; use one of \.bmp, \.jpeg, \.jpg, \.png, \.tif, \.tiff, \.webp$"):
        encode_image(np.zeros((4, 4, 3), np.uint8), ".gif")
    with pytest.raises(
        ValueError, match=r"^unknown gate backend 'fast'; choose one of eager, reference, triton$"
    ):
        use_gate_backend(model, "fast")
    with pytest.raises(ValueError, match=r"^precision and io must be one of fp16, fp32$"):
        ExportModel(model, "maps", "bf16", "fp32", True)


class SaysCuda(torch.Tensor):
    """A CPU tensor that says it lies on a GPU (there is none here), as a CUDA tensor given to a CPU
    Restorer would: its copy to the Restorer (.to) is a plain CPU tensor."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    def to(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).to(*args, **kwargs)


@pytest.mark.parametrize("entry", ["restore", "score", "restore_tensor"])
def test_a_gpu_tensor_given_to_a_cpu_restorer_has_its_range_checked_as_a_cpu_one(entry):
    """The range was read for CPU tensors only (on a GPU it costs a sync per call): a CUDA tensor in
    0..255 given to a CPU Restorer was clamped into a white picture, unsaid, though it was copied to
    the CPU anyway. Its range is read once it is there now."""
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    x = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    call = getattr(r, entry)
    assert (x * 255).as_subclass(SaysCuda).device.type == "cuda"
    with pytest.raises(
        ValueError, match=r"^float tensors are taken in \[0, 1\], this one spans \[0.02032, 255\]"
    ):
        call((x * 255).as_subclass(SaysCuda))
    if entry != "restore":  # (which would give the picture back to a GPU that is not there)
        call(x.as_subclass(SaysCuda))  # in range: runs


def test_a_triton_that_fails_to_import_runs_auto_eager_and_refuses_an_explicit_triton(monkeypatch):
    """triton is imported on the gate's first launch: a broken install (installed, import fails) on
    CUDA with backend="auto" failed every restore with an ImportError, where it had run eager. The
    GPU is faked: compute capability 9.0, triton installed."""
    import warnings

    from qairn.engine.restorer import resolve_auto
    from qairn.kernels import gate

    broken = "triton is installed but cannot be imported: ImportError: libcuda.so.1: cannot open"

    def load_triton():
        raise ImportError(broken)

    monkeypatch.setattr(gate, "device_capability", lambda index: (9, 0))
    monkeypatch.setattr(gate, "HAS_TRITON", True)
    monkeypatch.setattr(gate, "load_triton", load_triton)
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_auto("auto", "auto", cuda) == ("eager", "fp16")
    assert [str(w.message) for w in caught] == [f"backend auto runs eager: {broken}"]
    assert resolve_auto("triton", "auto", cuda) == ("triton", "fp16")  # asked for: refused when built
    # (by the gate swap a CUDA Restorer makes; a CPU one never imports triton: it runs the reference)
    with pytest.raises(RuntimeError, match=f"^gate backend 'triton': {broken}$"):
        gate.use_gate_backend(lively_model(), "triton")


def test_load_triton_says_in_one_line_that_triton_cannot_be_imported(monkeypatch):
    import sys

    from qairn.kernels import gate

    monkeypatch.setattr(gate, "tl", None)  # not loaded yet
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    with pytest.raises(ImportError) as e:
        gate.load_triton()
    assert str(e.value) == (
        "triton is installed but cannot be imported: ModuleNotFoundError: import of triton halted; "
        "None in sys.modules"
    )


@pytest.mark.parametrize("progress", [5, True, "bar"])
def test_a_progress_that_is_not_callable_is_refused_before_the_work(progress):
    """progress=5 ran the whole network first and then failed with "'int' object is not callable",
    from inside qairn, after the image was restored (whole images call progress once, at the end)."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    img = np.zeros((8, 8, 3), np.uint8)
    ran = []
    r.backend.net.register_forward_hook(lambda *_: ran.append(1))
    for call in (
        lambda: r.restore(img, progress=progress),
        lambda: r.score(img, progress=progress),
        lambda: r.restore_tensor(torch.zeros(1, 3, 8, 8), progress=progress),
    ):
        with pytest.raises(TypeError) as e:
            call()
        assert str(e.value) == f"progress must be a function progress(done, total) or None, not {progress!r}"
    assert not ran


@pytest.mark.parametrize("order", ["", 0, False])
def test_an_empty_or_false_channel_order_is_refused_not_taken_as_the_default(order):
    """channel_order="" (or 0, False) was taken as "not given": the Restorer's own order ran unsaid,
    where "BGR" or "xyz" were refused. Only None means the Restorer's order."""
    r = qairn.Restorer(model=lively_model(), device="cpu", channel_order="bgr")
    img = np.zeros((8, 8, 3), np.uint8)
    for call in (
        lambda: r.restore(img, channel_order=order),
        lambda: r.score(img, channel_order=order),
        lambda: r.restore_stream([img], channel_order=order),  # not iterated: checked when called
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == f"channel_order must be 'rgb' or 'bgr', not {order!r}"
    assert r.restore(img, channel_order=None).image.shape == img.shape


def test_a_bits_that_does_not_fit_an_rgb_image_says_so_in_its_own_words():
    """restore(uint16 image, bits=8) said "uint16 planes need bits= (9..16)": bits was given, and the
    image is no plane. uint8 images with bits=10 were "planes" too. Y'CbCr planes keep their words."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    y, u, v = (np.zeros(s, np.uint16) for s in ((8, 8), (4, 4), (4, 4)))
    for call, says in [
        (
            lambda: r.restore(np.zeros((8, 8, 3), np.uint16), bits=8),
            "uint16 frames hold 9..16-bit samples, not 8-bit",
        ),
        (
            lambda: r.restore(np.zeros((8, 8, 3), np.uint8), bits=10),
            "uint8 frames hold 8-bit samples, not 10-bit",
        ),
        (
            lambda: r.restore(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), bits=9),
            "uint8 frames hold 8-bit samples, not 9-bit",
        ),
        (lambda: r.restore_yuv(y, u, v, bits=8), "uint16 planes hold 9..16-bit samples, not 8-bit"),
        (lambda: r.restore_yuv(y, u, v), "uint16 planes need bits= (9..16), e.g. bits=10 for 10-bit video"),
    ]:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == says


@pytest.mark.parametrize(
    "shape, says",
    [
        ((2, 8, 9, 3), "; for a batch of frames, use restore_stream(frames) or an (N,3,H,W) tensor"),
        ((3, 8, 9), "; channels first? give HxWxC (img.transpose(1, 2, 0))"),
        ((8, 9, 5), ""),
    ],
)
def test_a_batch_or_channels_first_array_is_refused_with_what_to_do(shape, says):
    """np.stack(frames) (N,H,W,3), the batch a transcoder reaches for first, and a CHW array (what
    torchvision and PyAV's planar formats give) were refused only as "expected HxW, HxWx1, HxWx2,
    HxWx3 or HxWx4 image, got shape (2, 8, 9, 3)", with no word of the ways that do take them."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    with pytest.raises(ValueError) as e:
        r.restore(np.zeros(shape, np.uint8))
    assert str(e.value) == f"expected HxW, HxWx1, HxWx2, HxWx3 or HxWx4 image, got shape {shape}{says}"


def test_an_empty_weights_path_is_refused_as_such():
    """weights="" (an unset environment variable, say) was read as the current folder and refused as
    ".: is a folder; give the .safetensors file", naming a path the caller never gave."""
    with pytest.raises(qairn.WeightsError) as e:
        qairn.Restorer(weights="", device="cpu")
    assert str(e.value) == "weights path is empty: give a .safetensors file, or None for the shipped weights"
    with pytest.raises(qairn.WeightsError, match="^weights path is empty"):
        qairn.load_model("")


def test_restore_tensor_takes_image_true_or_false_only():
    """restore_tensor(x, image="no") made the image, as "no" is true; image=0 skipped it."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    for image in ("no", 0, None):
        with pytest.raises(ValueError) as e:
            r.restore_tensor(torch.zeros(1, 3, 8, 8), image=image)
        assert str(e.value) == f"image must be True or False, not {image!r}"


@pytest.mark.parametrize(
    "frame",
    [np.zeros((8, 6, 3), np.uint8), np.zeros((8, 6), np.uint8), torch.zeros(3, 8, 6, dtype=torch.uint8)],
    ids=["hwc", "gray", "chw-tensor"],
)
def test_one_frame_given_as_the_stream_is_refused_when_the_stream_is_called(frame):
    """restore_stream(frame) iterated the frame's rows: an 8x6 RGB image gave 8 "frames" of 6x3 gray,
    restored without a word; a gray image or a (3,H,W) tensor failed at the first row with a shape
    error about a frame that was never given. A stack of frames, (N,H,W,3), is still a stream."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    with pytest.raises(TypeError) as e:
        r.restore_stream(frame)  # not iterated
    assert str(e.value) == (
        f"restore_stream takes an iterable of frames, not one frame of shape {tuple(frame.shape)}: "
        "give [frame], or call restore(frame)"
    )
    stack = np.zeros((2, 8, 6, 3), np.uint8)
    assert [res.image.shape for res in r.restore_stream(stack)] == [(8, 6, 3)] * 2


def test_the_public_methods_hint_every_argument():
    """An editor or type checker saw restore(img, progress=...), score and restore_yuv(y, u, v, matrix,
    range, bits, return_maps) without types: img, progress and all of restore_yuv's were unhinted."""
    import inspect
    import typing

    for name in ("restore", "score", "restore_yuv", "restore_stream", "restore_tensor"):
        method = getattr(qairn.Restorer, name)
        hints = typing.get_type_hints(method)
        params = inspect.signature(method).parameters.values()
        named = [p.name for p in params if p.name != "self" and p.kind != p.VAR_KEYWORD]
        assert [n for n in named if n not in hints] == [], name
        assert "return" in hints, name


@pytest.mark.parametrize(
    "shape, says",
    [
        ((3, 8, 6), "; one image: give it as t[None]"),
        ((8, 6, 3), "; channels last? give t.permute(2, 0, 1)[None]"),
        ((2, 8, 6, 3), "; channels last? give t.permute(0, 3, 1, 2)"),
        ((8, 6), ""),
    ],
)
def test_a_tensor_of_another_layout_is_refused_with_what_to_do(shape, says):
    """torchvision.io.decode_image gives (3,H,W) uint8, the first tensor a transcoder has at hand; it
    was refused only as "tensor input must be (N,3,H,W), got (3, 8, 6)", as were channels-last ones."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    with pytest.raises(ValueError) as e:
        r.restore(torch.zeros(shape, dtype=torch.uint8))
    assert str(e.value) == f"tensor input must be (N,3,H,W), got {shape}{says}"


def test_a_pil_image_or_a_pyav_frame_is_refused_with_how_to_make_an_array():
    """A Pillow image or a PyAV VideoFrame, what a decoder hands over, was refused only as "expected a
    numpy array or torch tensor, got Image"; each now says the one call that makes the array."""
    from PIL import Image

    r = qairn.Restorer(model=lively_model(), device="cpu")
    with pytest.raises(TypeError) as e:
        r.restore(Image.new("RGB", (8, 6)))
    assert str(e.value) == "expected a numpy array or torch tensor, got Image; give np.asarray(img)"
    av = pytest.importorskip("av", reason="PyAV is not installed")
    frame = av.VideoFrame.from_ndarray(np.zeros((6, 8, 3), np.uint8), format="rgb24")
    with pytest.raises(TypeError) as e:
        r.restore(frame)
    assert str(e.value) == (
        "expected a numpy array or torch tensor, got VideoFrame; give frame.to_ndarray(format='rgb24'), "
        "or qairn.engine.video.frame_planes(frame) to restore_yuv"
    )
    with pytest.raises(TypeError) as e:
        r.restore([[1, 2]])
    assert str(e.value) == "expected a numpy array or torch tensor, got list"


@pytest.mark.parametrize("path", ["in.jpg", Path("in.jpg")], ids=["str", "Path"])
def test_a_file_path_given_as_the_image_is_refused_with_how_to_read_it(path):
    """restore("in.jpg") said "expected a numpy array or torch tensor, got str", and nothing of the
    reader qairn has, which keeps 16 bits, alpha and EXIF orientation as `qairn restore` does."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    with pytest.raises(TypeError) as e:
        r.restore(path)
    assert str(e.value) == (
        f"expected a numpy array or torch tensor, got {type(path).__name__}; "
        "read the file first: qairn.engine.imageio.read_image(path)"
    )


def test_restore_streams_docstring_names_every_option_it_takes():
    """help(Restorer.restore_stream) listed "matrix, range, bits, channel_order": image=False (quality
    only, what a QC pass wants) was not among them, though README names it."""
    import inspect

    from qairn.engine.video import restore_stream

    options = [
        p for p in inspect.signature(restore_stream).parameters if p not in ("restorer", "frames", "batch")
    ]
    doc = qairn.Restorer.restore_stream.__doc__
    assert [o for o in options if not re.search(rf"\b{o}\b", doc)] == []  # "images" is not image


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_an_infinite_float_tensor_is_refused_as_such(bad):
    """A tensor holding infinity was refused as "spans [inf, inf] (divide 0..255 data by 255, or pass
    uint8)", advice for another mistake; the same numpy image says "NaN or infinity"."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    x = torch.zeros(1, 3, 8, 8).index_fill_(2, torch.tensor([0]), bad)
    for call in (lambda: r.restore(x), lambda: r.restore_tensor(x)):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == "float tensors are taken in [0, 1], this one holds infinity"


def test_floats_just_out_of_range_are_not_told_to_divide_by_255():
    """RGB made from Y'CbCr in floats overshoots [0, 1] a little (out-of-gamut colours): such a frame
    was told "divide 0..255 data by 255, or pass uint8", which would make it black. Advice for 0..255
    data is kept for values over 2."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    img = np.linspace(-0.03, 1.04, 8 * 8 * 3, dtype=np.float32).reshape(8, 8, 3)
    clip = "(clip a colour conversion's overshoot to [0, 1] first)"
    for call, says in [
        (lambda: r.restore(img), f"float images are taken in [0, 1], this one spans [-0.03, 1.04] {clip}"),
        (
            lambda: r.restore(torch.from_numpy(img).permute(2, 0, 1)[None]),
            f"float tensors are taken in [0, 1], this one spans [-0.03, 1.04] {clip}",
        ),
        (
            lambda: r.restore(img * 255),
            "float images are taken in [0, 1], this one spans [-7.65, 265.2] "
            "(divide 0..255 data by 255, or pass uint8)",
        ),
    ]:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == says


@pytest.mark.parametrize("name", ["restore", "score", "restore_yuv", "restore_tensor"])
def test_each_public_methods_docstring_names_its_arguments(name):
    """help(r.restore) said nothing of return_maps (the per-region heat maps a QC report wants) or
    channel_order; restore_yuv's said nothing of bits or return_maps, score's nothing of bits."""
    import inspect

    method = getattr(qairn.Restorer, name)
    params = [p for p in inspect.signature(method).parameters if p != "self"]
    assert [p for p in params if not re.search(rf"\b{p}\b", method.__doc__)] == []


def test_pyav_frames_given_as_the_stream_are_refused_with_how_to_pass_them():
    """restore_stream(container.decode(video=0)), the first thing a PyAV user writes, failed with
    "frame 0: stream items are RGB images or (y, u, v) plane tuples, not VideoFrame", and no word of
    the two calls that turn a frame into one."""
    av = pytest.importorskip("av", reason="PyAV is not installed")
    r = qairn.Restorer(model=lively_model(), device="cpu")
    frame = av.VideoFrame.from_ndarray(np.zeros((6, 8, 3), np.uint8), format="rgb24")
    with pytest.raises(TypeError) as e:
        list(r.restore_stream([frame]))
    assert str(e.value) == (
        "frame 0: stream items are RGB images or (y, u, v) plane tuples, not VideoFrame; give "
        "frame.to_ndarray(format='rgb24'), or qairn.engine.video.frame_planes(frame)"
    )
    frame = av.VideoFrame.from_ndarray(np.zeros((8, 8), np.uint8), format="gray").reformat(format="yuv420p")
    with pytest.raises(ValueError, match=r"^y, u and v are PyAV VideoPlanes .*frame_planes\(frame\)"):
        r.restore_yuv(*frame.planes)  # what "or its planes" led to: "must all be numpy arrays or ..."
    with pytest.raises(TypeError, match=r"^frame 0: .* not VideoPlane; give qairn.engine.video.frame_planes"):
        list(r.restore_stream([tuple(frame.planes)]))  # was AttributeError: ... has no attribute 'shape'
    y, u, v = qairn.engine.video.frame_planes(frame)
    assert (y.shape, u.shape, r.restore_yuv(y, u, v).info["caveat"] is not None) == ((8, 8), (4, 4), True)


def test_ten_bit_samples_in_uint16_without_bits_are_warned_of():
    """10-bit RGB in uint16 given without bits=10 was taken as 16-bit without a word: a nearly black
    picture (codes 0..1023 of 65535) and its scores. restore and restore_stream now warn; bits=10, true
    16-bit data and an all-black frame do not."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    ten_bit = np.random.default_rng(0).integers(0, 1024, (16, 16, 3), dtype=np.uint16)
    with pytest.warns(UserWarning, match="uint16 pixels all under 1024 .* pass bits=10"):
        r.restore(ten_bit)
    with pytest.warns(UserWarning, match="uint16 pixels all under 1024"):
        list(r.restore_stream([ten_bit, ten_bit]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r.restore(ten_bit, bits=10)
        list(r.restore_stream([ten_bit], bits=10))
        r.restore(ten_bit * 64)  # 16-bit data
        r.restore(np.zeros((16, 16, 3), np.uint16))  # black is black at any depth


def test_the_errors_a_caller_catches_are_qairns_own_names():
    """BackendError, ColorError, ImageError and VideoError were reachable only from qairn's submodules;
    `except qairn.BackendError` failed with an AttributeError. They are exported, the image and video
    ones on first use (their modules import Pillow, OpenCV and PyAV helpers)."""
    from qairn.engine import backends, color, imageio, video

    assert (qairn.BackendError, qairn.ColorError) == (backends.BackendError, color.ColorError)
    assert (qairn.ImageError, qairn.VideoError) == (imageio.ImageError, video.VideoError)
    assert {"BackendError", "ColorError", "ImageError", "VideoError"} <= set(qairn.__all__)
    with pytest.raises(qairn.BackendError, match="unknown backend 'nope'"):
        qairn.Restorer(model=lively_model(), device="cpu", backend="nope")


@pytest.mark.parametrize("option", [{"backend": "nope"}, {"precision": "fp8"}])
def test_an_unknown_backend_or_precision_is_a_value_error_too(option):
    """An unknown backend or precision name raised BackendError, a RuntimeError, so `except ValueError`
    (which catches every other bad argument of the Restorer: tile, overlap, p, channel_order...) missed
    it. It is now both: a ValueError, and still a BackendError for callers that catch that."""
    for caught in (ValueError, qairn.BackendError):
        with pytest.raises(caught, match="unknown (backend 'nope'|precision 'fp8')"):
            qairn.Restorer(model=lively_model(), device="cpu", **option)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        getattr(qairn, "Nope")  # noqa: B009 (an attribute that is not there)


@pytest.mark.parametrize("batch", [1, 2])
def test_stream_gives_each_frame_its_maps_as_restore_does(batch):
    """restore_stream had no return_maps: a QC report of where each frame loses quality had to call
    restore() frame by frame, unbatched. Each Result now holds the maps restore() (RGB) or
    restore_yuv() (planes) gives for that frame: same shapes, dtypes and numbers."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    g = np.random.default_rng(0)
    rgb = [g.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(3)]
    yuv = [
        tuple(g.integers(16, 236, s, dtype=np.uint8) for s in ((16, 24), (8, 12), (8, 12))) for _ in range(3)
    ]
    tensors = [torch.from_numpy(f).permute(2, 0, 1).contiguous() for f in rgb]
    cases = [
        (rgb, [r.restore(f, return_maps=True).maps for f in rgb]),
        (yuv, [r.restore_yuv(*f, return_maps=True).maps for f in yuv]),
        (tensors, [[m[0] for m in r.restore(t[None], return_maps=True).maps] for t in tensors]),
    ]
    for frames, expected in cases:
        for image in (True, False):
            got = [res.maps for res in r.restore_stream(frames, batch, return_maps=True, image=image)]
            assert len(got) == len(expected)
            for maps, want in zip(got, expected):
                assert [(type(m), m.shape, m.dtype) for m in maps] == [
                    (type(m), m.shape, m.dtype) for m in want
                ]
                for m, w in zip(maps, want):
                    np.testing.assert_allclose(np.asarray(m), np.asarray(w), atol=1e-6)
        assert all(res.maps is None for res in r.restore_stream(frames, batch))
    with pytest.raises(ValueError) as e:
        r.restore_stream(rgb, return_maps="no")
    assert str(e.value) == "return_maps must be True or False, not 'no'"


def test_stream_yuv_results_say_the_matrix_range_and_bits_they_ran_with():
    """Result.info was {} for restore_stream's (y, u, v) items, while restore_yuv fills in the matrix,
    range and bits; a transcoder logging what it ran with got them from one call and not the other."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    planes = tuple(np.full(s, 512, np.uint16) for s in ((8, 12), (4, 6), (4, 6)))
    options = dict(matrix="bt2020", range="full", bits=10)
    want = r.restore_yuv(*planes, **options).info
    assert want == {"matrix": "bt2020", "range": "full", "bits": 10, "caveat": want["caveat"]}
    for image in (True, False):
        assert [res.info for res in r.restore_stream([planes] * 3, 2, image=image, **options)] == [want] * 3
    rgb = np.zeros((8, 12, 3), np.uint8)
    assert (
        [res.info for res in r.restore_stream([rgb])] == [r.restore(rgb).info] == [{"caveat": want["caveat"]}]
    )


@pytest.mark.parametrize("chroma", [(4, 6), (8, 6)], ids=["420", "422"])
@pytest.mark.parametrize("kind", [tuple, list, "tensors"])
def test_one_plane_frame_given_as_the_stream_is_refused_when_the_stream_is_called(chroma, kind):
    """restore_stream((y, u, v)) iterated the planes as three gray images: three Results, restored from
    a luma and two chroma planes taken as pictures, without a word. Planes of a 4:2:0 or 4:2:2 set
    (u and v of one size, smaller than y) are refused; equal sizes are three gray frames (4:4:4 cannot
    be told from them) and still run."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    planes = [np.full(s, 128, np.uint8) for s in ((8, 12), chroma, chroma)]
    frames = [torch.from_numpy(p) for p in planes] if kind == "tensors" else kind(planes)
    with pytest.raises(TypeError) as e:
        r.restore_stream(frames)  # not iterated
    assert str(e.value) == (
        f"restore_stream takes an iterable of frames, not one (y, u, v) frame of planes (8, 12), {chroma}, "
        f"{chroma}: give [(y, u, v)], or call restore_yuv(y, u, v)"
    )
    assert [res.image[0].shape for res in r.restore_stream([tuple(planes)])] == [(8, 12)]
    gray = tuple(np.full((8, 12), 128, np.uint8) for _ in range(3))
    assert [res.image.shape for res in r.restore_stream(gray)] == [(8, 12)] * 3


def test_uint16_tensors_are_taken_as_numpy_uint16_is_with_or_without_bits():
    """A 10-bit GPU pipeline's uint16 (N,3,H,W) batch was refused ("unsupported tensor dtype
    torch.uint16 (use uint8 or float in [0,1])"): it had to be converted to float first, though numpy
    uint16 (and bits=10) is taken. Now restore/score/restore_stream take it as the same numpy image:
    the same pixels back in uint16, the same quality, the same refusals and warning."""
    r = qairn.Restorer(model=lively_model(), device="cpu")
    img = np.random.default_rng(0).integers(0, 1024, (16, 12, 3), dtype=np.uint16)
    t = torch.from_numpy(img.astype(np.int32)).permute(2, 0, 1)[None].to(torch.uint16)
    for bits, pixels, tensor in [(10, img, t), (None, img << 6, t.to(torch.int32).mul(64).to(torch.uint16))]:
        want = r.restore(pixels, bits=bits)
        got = r.restore(tensor, bits=bits)
        assert got.image.dtype == torch.uint16 and got.image.shape == tensor.shape
        np.testing.assert_array_equal(got.image[0].permute(1, 2, 0).to(torch.int32).numpy(), want.image)
        assert {k: float(v[0]) for k, v in got.quality.items()} == pytest.approx(want.quality, rel=1e-6)
        assert {k: float(v[0]) for k, v in r.score(tensor, bits=bits).items()} == pytest.approx(want.quality)
        streamed = next(r.restore_stream([tensor[0]], bits=bits))
        assert streamed.image.dtype == torch.uint16 and torch.equal(streamed.image, got.image[0])
        flip = lambda x: x.to(torch.int32).flip(1)  # noqa: E731 (torch's uint16 has no flip)
        bgr = r.restore(flip(tensor).to(torch.uint16), bits=bits, channel_order="bgr").image
        assert torch.equal(flip(bgr), got.image.to(torch.int32))
    with pytest.raises(ValueError, match=r"plane rgb holds codes 0\.\.65344, outside the 10-bit range"):
        r.restore(t.to(torch.int32).mul(64).to(torch.uint16), bits=10)
    with pytest.warns(UserWarning, match="for 10-bit samples pass bits=10"):
        r.restore(t)


# ---- pickling: process pools ---------------------------------------------------------------------
def test_a_restorer_pickles_to_its_arguments_and_restores_bit_identically():
    """Transcoders hand work to process pools: pickle.dumps(Restorer(...)) raised "cannot pickle
    '_thread.RLock' object". It now travels as its arguments (an in-memory model as its weights,
    copied when the Restorer was made) and is rebuilt on arrival."""
    import pickle

    model = lively_model()
    r = qairn.Restorer(model=model, device="cpu", tile=32, overlap=8, tile_batch=2, channel_order="bgr", p=3)
    with torch.no_grad():  # changed after: the Restorer runs (and carries) the weights it was given
        next(model.parameters()).add_(1)
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    want = r.restore(img, return_maps=True)
    back = pickle.loads(pickle.dumps(r))
    assert (back.tile, back.overlap, back.tile_batch, back.channel_order, back.p) == (32, 8, 2, "bgr", 3.0)
    assert (back.backend_name, back.precision, back.device) == ("eager", "fp32", torch.device("cpu"))
    got = back.restore(img, return_maps=True)
    np.testing.assert_array_equal(got.image, want.image)
    assert got.quality == want.quality
    for g, w in zip(got.maps, want.maps):
        np.testing.assert_array_equal(g, w)
    r.close()
    with pytest.raises(TypeError, match="^cannot pickle a closed Restorer$"):
        pickle.dumps(r)


def test_a_restorer_pickled_from_a_weights_file_carries_the_path_not_the_weights(tmp_path):
    import pickle

    from qairn.weights_io import save_weights

    path = save_weights(lively_model(), tmp_path / "w.safetensors")
    r = qairn.Restorer(weights=path, device="cpu", tile=None)
    data = pickle.dumps(r)
    assert len(data) < 10_000  # the path, not the tensors
    img = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pickle.loads(data).restore(img).image, r.restore(img).image)


def test_a_restorer_from_a_relative_path_unpickles_in_another_folder(tmp_path, monkeypatch):
    """A Restorer(weights="w.safetensors") pickled as the relative path: unpickled where the working
    folder differs (a pool worker that changed folder, a pickle kept and loaded later) it raised
    WeightsError "w.safetensors: no such weights file". It now carries the absolute path."""
    import pickle

    from qairn.weights_io import save_weights

    save_weights(lively_model(), tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    r = qairn.Restorer(weights="w.safetensors", device="cpu", tile=None)
    data = pickle.dumps(r)
    monkeypatch.chdir(tmp_path.parent)
    back = pickle.loads(data)
    img = np.random.default_rng(3).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(back.restore(img).image, r.restore(img).image)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_restorer_goes_through_a_forked_process_pool():
    """multiprocessing.Pool() forks on Linux, and a forked child of a process that had run torch on
    several threads hung forever at its first parallel op (torch's OpenMP pool does not survive fork):
    pool.map(r.score, [img]) never returned, the Restorer rebuilt there stuck loading its weights.
    A Restorer now makes the processes forked after it run torch on one thread."""
    import multiprocessing

    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    img = np.random.default_rng(4).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # conftest runs tests on one; a transcoder's process runs on all
    try:
        torch.isfinite(torch.ones(1_000_000)).all()  # a parallel op, as the parent's own work would run
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.map_async(r.score, [img]).get(timeout=120)  # the old code: TimeoutError
            assert pool.apply_async(torch.get_num_threads).get(timeout=60) == 1
    finally:
        torch.set_num_threads(threads)
    assert got == [r.score(img)]


@pytest.mark.slow  # a spawned worker imports torch: 5 s on a busy 2-core machine
def test_a_restorer_goes_through_a_spawned_process_pool():
    import concurrent.futures
    import multiprocessing

    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    img = np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        got = pool.submit(r.restore, img).result(timeout=120)
    want = r.restore(img)
    np.testing.assert_array_equal(got.image, want.image)
    assert got.quality == want.quality


def test_a_gpu_uint16_plane_for_a_cpu_restorer_has_its_codes_read_on_the_cpu():
    """restore_yuv and restore_stream read uint16 plane codes on the CPU only (a GPU's would cost a sync
    per call), so a GPU's P010-style planes (16-bit codes) given bits=10 and a CPU Restorer were clamped
    into a wrong picture unsaid, though they were copied to the CPU anyway. The GPU is faked (SaysCuda)."""
    from qairn.engine.color import ColorError, checked_planes

    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    rng = np.random.default_rng(3)
    y, u, v = (
        torch.from_numpy(rng.integers(0, 65536, shape).astype(np.uint16)).as_subclass(SaysCuda)
        for shape in ((16, 24), (8, 12), (8, 12))
    )
    outside = r"^plane y holds codes \d+\.\.\d+, outside the 10-bit range 0\.\.1023"
    with pytest.raises(ColorError, match=outside):
        r.restore_yuv(y, u, v, bits=10, image=False)
    with pytest.raises(
        ValueError, match=r"^frame 0: plane y holds codes .*outside the 10-bit range 0\.\.1023"
    ):
        list(r.restore_stream([(y, u, v)], bits=10, image=False))
    # The helper: read where the planes go to the CPU; a GPU Restorer's planes stay unread (no sync).
    with pytest.raises(ColorError, match=outside):
        checked_planes([y, u, v], torch.device("cpu"), 10)
    assert checked_planes([y], torch.device("cuda", 0), 10)[0] is y
    codes = torch.arange(1024, dtype=torch.int32).reshape(32, 32).as_subclass(SaysCuda)
    assert type(checked_planes([codes], torch.device("cpu"), 10)[0]) is torch.Tensor  # on the CPU now


def test_a_cpu_restorer_on_the_triton_backend_leaves_triton_unimported(monkeypatch):
    """backend="triton" on the CPU imported triton when the Restorer was made (0.4 s), though CPU
    tensors never launch a Triton kernel: the gate op's Triton kernel is registered for CUDA, and the
    CPU runs its reference. It is imported at a CUDA launch only now. A missing triton is still refused
    up front, in one line."""
    from qairn.kernels import gate

    def load_triton():
        raise AssertionError("triton was imported")

    monkeypatch.setattr(gate, "HAS_TRITON", True)
    monkeypatch.setattr(gate, "load_triton", load_triton)
    img = np.random.default_rng(4).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    got = qairn.Restorer(model=lively_model(), device="cpu", backend="triton", tile=None).restore(img)
    want = qairn.Restorer(model=lively_model(), device="cpu", backend="eager", tile=None).restore(img)
    np.testing.assert_array_equal(got.image, want.image)
    monkeypatch.setattr(gate, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match=r"^gate backend 'triton' needs the triton package"):
        qairn.Restorer(model=lively_model(), device="cpu", backend="triton")


def test_restore_tensor_does_not_advise_uint8_which_it_refuses():
    """restore_tensor(0..255 floats) advised "divide 0..255 data by 255, or pass uint8", and refused
    the uint8 tensor passed then ("restore_tensor takes (N,3,H,W) float in [0, 1]"): restore() is the
    one that takes it."""
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    x = torch.linspace(0, 255, 3 * 16 * 16).reshape(1, 3, 16, 16)
    with pytest.raises(ValueError) as e:
        r.restore_tensor(x)
    assert str(e.value) == (
        "float tensors are taken in [0, 1], this one spans [0, 255] "
        "(divide 0..255 data by 255, or give uint8 to restore())"
    )
    with pytest.raises(ValueError, match=r"or pass uint8\)$"):  # restore() takes uint8: that advice stays
        r.restore(x)


def test_results_carry_a_caveat_for_a_flat_or_tiny_frame():
    """restore(), restore_yuv() and restore_stream() gave a flat frame's Q (shipped weights: flat black
    64x64 Q2 0.768, above every LIVE1 JPEG) and a tiny one's (mostly padding) as any other, while `qairn
    score` warned of both: a transcoder scoring a fade to black took it for a good frame. Each Result's
    info["caveat"] now says why (None when there is nothing to say), with no warning per frame."""
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    flat_says = (
        "flat (every channel's standard deviation at most 1/255 of full scale): it holds nothing to judge,"
        " its Q1..Q3 say nothing of it"
    )
    tiny_says = "12x8 pixels, under the network's 16 on a side: its Q1..Q3 mostly measure the padding"
    photo = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    black = np.zeros((16, 24, 4), np.uint8)
    black[..., 3] = np.arange(24, dtype=np.uint8)  # a varied alpha over one colour: still flat
    tiny = photo[:8, :12]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r.restore(f).info["caveat"] for f in (photo, black, tiny)] == [None, flat_says, tiny_says]
        stream = r.restore_stream([photo, black[..., :3], photo, tiny], batch=3, image=False)
        assert [res.info["caveat"] for res in stream] == [None, flat_says, None, tiny_says]
        t = torch.from_numpy(np.stack([photo, black[..., :3]])).permute(0, 3, 1, 2)
        assert [res.info["caveat"] for res in r.restore_stream(t)] == [None, flat_says]
        y, u, v = (
            np.full((16, 24), 16, np.uint8),
            np.full((8, 12), 128, np.uint8),
            np.full((8, 12), 128, np.uint8),
        )
        y_photo = photo[..., 0]
        assert r.restore_yuv(y, u, v).info["caveat"] == flat_says
        assert r.restore_yuv(y_photo, u, v).info["caveat"] is None
        assert r.restore_yuv(np.stack([y_photo, y]), np.stack([u, u]), np.stack([v, v])).info["caveat"] == [
            None,
            flat_says,
        ]
        stream = r.restore_stream([(y, u, v), (y_photo, u, v)], matrix="bt601", range="full")
        assert [res.info["caveat"] for res in stream] == [flat_says, None]


def test_a_nearly_flat_frame_has_the_caveat_and_a_dark_photo_has_none():
    """Only an exactly flat frame had a caveat: a black frame x264 coded after a photo (320x240) came back
    with 2 chroma samples one code off, and its Q2 0.760 (shipped weights; the photos' 0.68 and 0.71)
    carried none. Flat is now every channel's standard deviation at most 1/255 of full scale (coded
    black, grey and white frames: 0.31 codes or less); the darkest 64x64 crop of a LIVE1 photo (statue's:
    std 3.0 codes in RGB, 2.0 in Y'CbCr, the least of LIVE1's) has none, in 8, 10 and 16 bits."""
    import cv2
    from conftest import live1_files

    from qairn.engine.caveats import caveat, flat_frames, score_caveat

    r = qairn.Restorer(model=lively_model(), device="cpu", tile=None)
    says = caveat(32, 48, flat=True)
    y, u, v = (
        np.full((32, 48), 16, np.uint8),
        np.full((16, 24), 128, np.uint8),
        np.full((16, 24), 128, np.uint8),
    )
    u[3, 5], v[10, 20] = 129, 127  # the coded black frame's two stray chroma samples
    black = np.zeros((32, 48, 3), np.uint8)
    black[2, 3, 1] = black[20, 40, 2] = 1
    ten = [p.astype(np.uint16) * 4 for p in (y, u, v)]  # one 8-bit code is 4 at 10 bits
    assert r.restore_yuv(y, u, v).info["caveat"] == r.restore_yuv(*ten, bits=10).info["caveat"] == says
    assert (
        r.restore(black).info["caveat"] == score_caveat(black) == score_caveat(black.astype(np.uint16) * 257)
    )
    assert score_caveat(black) == says
    red = np.zeros((32, 48, 3), np.uint8)
    red[..., 0] = 255  # flat in each channel: it was judged over the three at once, so not flat
    assert r.restore(red).info["caveat"] == score_caveat(red) == says
    stream = r.restore_stream([black, black], image=False)
    assert [res.info["caveat"] for res in stream] == [says, says]
    assert [res.info["caveat"] for res in r.restore_stream([(y, u, v)])] == [says]

    statue = [f for f in live1_files() if f.stem == "statue"]
    if not statue:
        pytest.skip("statue.png not among the LIVE1 images")
    crop = cv2.imread(str(statue[0]))[4:68, 60:124, ::-1].copy()  # its darkest 64x64 (mean luma 11)
    i420 = cv2.cvtColor(crop, cv2.COLOR_RGB2YUV_I420)
    planes = i420[:64], i420[64:80].reshape(32, 32), i420[80:].reshape(32, 32)
    deep = [p.astype(np.uint16) * 4 for p in planes]
    assert r.restore(crop).info["caveat"] is None and score_caveat(crop) is None
    assert r.restore(crop.astype(np.uint16) * 4, bits=10).info["caveat"] is None
    assert (
        score_caveat(crop.astype(np.uint16) * 4, bits=10)
        is score_caveat(crop.astype(np.uint16) * 257)
        is None
    )
    assert r.restore_yuv(*planes, matrix="bt601", range="full").info["caveat"] is None
    assert r.restore_yuv(*deep, matrix="bt601", range="full", bits=10).info["caveat"] is None
    # The GPU's way (all frames in one reduction, no host sync), run here on the CPU: the same answers.
    both = [torch.from_numpy(np.stack([a, b[: a.shape[0], : a.shape[1]]])) for a, b in zip((y, u, v), planes)]
    assert flat_frames(*both, full=255, at_once=True).tolist() == [True, False]
    assert flat_frames(*both, full=255, at_once=False).tolist() == [True, False]


def test_scored_by_names_the_network_that_scores(tmp_path):
    """Restorer.scored_by() is what restore --json, score --json and the video trace record: p, the file
    that runs and its SHA-256. A network given as model= has no file; its tensors are hashed instead, so
    that two versions of a network being trained are still told apart."""
    import hashlib

    from qairn.weights_io import save_weights

    model = lively_model()
    path = tmp_path / "w.safetensors"
    save_weights(model, path, training={"steps": 0, "note": "test"})
    by_file = qairn.Restorer(weights=path, device="cpu", tile=None).scored_by()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert by_file == {"p": model.config.p, "weights": str(path.resolve()), "weights_sha256": sha}
    by_model = qairn.Restorer(model=model, device="cpu", tile=None, p=2.0).scored_by()
    assert by_model["p"] == 2.0 and by_model["weights"] is None
    assert by_model == qairn.Restorer(model=model, device="cpu", tile=None, p=2.0).scored_by()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3  # one step of training later
    assert (
        qairn.Restorer(model=model, device="cpu", tile=None, p=2.0).scored_by()["weights_sha256"]
        != by_model["weights_sha256"]
    )


def test_oriented_turns_each_of_the_eight_symmetries_back():
    from qairn.engine.restorer import ENSEMBLE_ORDER, oriented

    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    turned = [oriented(x, sym) for sym in ENSEMBLE_ORDER]
    assert len({tuple(t.flatten().tolist()) + tuple(t.shape) for t in turned}) == 8  # all different
    for sym, t in zip(ENSEMBLE_ORDER, turned):
        assert torch.equal(oriented(t, sym, back=True), x), sym


@pytest.mark.parametrize("tile", [None, 32])
@pytest.mark.parametrize("ensemble", [2, 4, 8])
def test_ensemble_averages_the_turned_restorations_and_keeps_the_plain_quality(tile, ensemble):
    """Restorer(ensemble=k): the picture is the mean of k restorations of the image turned and mirrored,
    each turned back; the quality and maps are the plain pass's, so scores compare with runs without it."""
    from qairn.engine.restorer import ENSEMBLE_ORDER, oriented

    model = lively_model()
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    plain = qairn.Restorer(model=model, device="cpu", tile=tile, overlap=8 if tile else None)
    ens = qairn.Restorer(model=model, device="cpu", tile=tile, overlap=8 if tile else None, ensemble=ensemble)
    y, q, maps = ens.restore_tensor(x, return_maps=True)
    y0, q0, maps0 = plain.restore_tensor(x, return_maps=True)
    by_hand = sum(
        oriented(plain.restore_tensor(oriented(x, s))[0], s, back=True) for s in ENSEMBLE_ORDER[:ensemble]
    )
    torch.testing.assert_close(y, by_hand / ensemble, rtol=0, atol=1e-6)
    assert (y - y0).abs().max() > 1e-3  # the passes differ: the network is not symmetric
    assert all(torch.equal(q[k], q0[k]) for k in q0) and all(torch.equal(a, b) for a, b in zip(maps, maps0))
    assert torch.equal(ens.restore_tensor(x, image=False)[1]["Q2"], q0["Q2"])  # quality only: one pass
    img = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    seen = []
    res = ens.restore(img, progress=lambda done, total: seen.append((done, total)))
    assert res.quality == plain.restore(img).quality
    assert seen == sorted(seen) and seen[-1][0] == seen[-1][1] and len({t for _, t in seen}) == 1, seen


@pytest.mark.parametrize("bad", [0, 3, 16, 2.0, True, "8", None])
def test_ensemble_takes_1_2_4_or_8(bad):
    with pytest.raises(ValueError, match=r"ensemble= takes 1, 2, 4, 8 \(passes per image\), not "):
        qairn.Restorer(model=lively_model(), device="cpu", ensemble=bad)


def test_an_ensemble_restorer_pickles_with_its_ensemble():
    import pickle

    r = pickle.loads(pickle.dumps(qairn.Restorer(model=lively_model(), device="cpu", ensemble=4)))
    assert r.ensemble == 4
