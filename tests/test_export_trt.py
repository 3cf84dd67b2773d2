"""TensorRT path: everything that does not need TensorRT (cache keys and validation, shape plans,
build choice, island pinning, the missing-TensorRT message), then build/run tests that need it."""

import contextlib
import json
import os
import re
import sys
import threading
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import lively_model, run_in_threads

import qairn
from qairn.engine.backends import BackendError
from qairn.engine.restorer import default_weights
from qairn.export import cache as qcache
from qairn.export import trt_engine
from qairn.export.cli import main as export_main
from qairn.export.onnx_export import ISLAND_TAG
from qairn.export.shapes import FixedShapeRunner, fits, profile_shapes

try:
    import tensorrt  # noqa: F401

    TRT_ERROR = None
except ImportError as e:  # the PyPI wheels are stubs that download from a host we cannot reach
    TRT_ERROR = f"tensorrt not installed: {e}"
needs_trt = pytest.mark.skipif(
    TRT_ERROR is not None or not torch.cuda.is_available(),
    reason=TRT_ERROR or "TensorRT needs a CUDA GPU; none found",
)


def spec(**changes) -> trt_engine.EngineSpec:
    fields = dict(
        onnx_sha256="ab" * 32,
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        trt_version="10.3.0",
        min_shape=(4, 3, 512, 512),
        opt_shape=(4, 3, 512, 512),
        max_shape=(4, 3, 512, 512),
        precision="fp16",
        typing="fp16-flag",
    )
    return trt_engine.EngineSpec(**(fields | changes))


GPU0 = torch.device("cuda", 0)  # what the Restorer passes for "cuda" (no GPU needed to name one)


def fake_tensorrt(monkeypatch) -> SimpleNamespace:
    """A stand-in tensorrt module (10.9, with the FP16 builder flag) and GPU identity: enough for
    TrtBackend up to the engine build, which the tests replace."""
    from qairn.export import trt_backend

    fake = SimpleNamespace(__version__="10.9.0", BuilderFlag=SimpleNamespace(FP16=1))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_engine, "gpu_identity", lambda device: ("Fake GPU", "9.0"))
    return fake


# ---- cache folder -------------------------------------------------------------------------------
def test_cache_dir_explicit_env_package_and_user_fallback(tmp_path, monkeypatch):
    monkeypatch.delenv("QAIRN_CACHE_DIR", raising=False)
    assert qcache.cache_dir(tmp_path / "a") == tmp_path / "a" and (tmp_path / "a").is_dir()
    monkeypatch.setenv("QAIRN_CACHE_DIR", str(tmp_path / "env"))
    assert qcache.cache_dir() == tmp_path / "env"
    monkeypatch.delenv("QAIRN_CACHE_DIR")
    monkeypatch.setattr(qcache, "PACKAGE_CACHE", tmp_path / "pkg")
    assert qcache.cache_dir() == tmp_path / "pkg"
    # A read-only package dir (simulated: a path under a file, which even root cannot create).
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(qcache, "PACKAGE_CACHE", tmp_path / "file" / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    assert qcache.cache_dir() == tmp_path / "user" / "qairn"
    with pytest.raises(OSError, match="not writable"):
        qcache.cache_dir(tmp_path / "file" / "x")


# ---- engine cache ---------------------------------------------------------------------------------
def test_engine_key_covers_every_field():
    base = spec()
    assert base.key() == spec().key()
    changes = dict(
        onnx_sha256="cd" * 32,
        gpu_name="NVIDIA A100",
        compute_capability="8.0",
        trt_version="10.4.0",
        min_shape=(1, 3, 16, 16),
        opt_shape=(2, 3, 512, 512),
        max_shape=(8, 3, 512, 512),
        precision="fp32",
        typing="strong",
    )
    keys = {base.key()} | {spec(**{k: v}).key() for k, v in changes.items()}
    assert len(keys) == len(changes) + 1
    assert not base.dynamic and spec(min_shape=(1, 3, 16, 16)).dynamic
    folder = trt_engine.Path("/c")
    assert trt_engine.engine_path(folder, base) != trt_engine.engine_path(folder, spec(trt_version="11.0.0"))
    assert (
        trt_engine.timing_cache_path(folder, base).name
        == "timing-nvidia-h100-80gb-hbm3-sm9.0-trt10.3.0-fp16-flag.cache"
    )


def test_builds_with_other_builder_flags_keep_separate_timing_caches():
    """TensorRT's timing cache holds, per layer, the tactic that won under the build's flags, and its
    documentation says a cache is specific to flags that change the layer implementation, such as
    TF32. fp32 builds clear TF32 and fp16 builds keep it: one shared file let an fp32 engine take the
    TF32 tactic an fp16 build timed for the same fp32 layer (an fp32 island), about 3 digits lost."""
    folder = trt_engine.Path("/c")
    names = {
        trt_engine.timing_cache_path(folder, spec(typing=t)).name for t in ("fp32", "fp16-flag", "strong")
    }
    assert len(names) == 3


def test_stale_foreign_or_tampered_engines_are_not_loaded(tmp_path):
    s = spec()
    engine = trt_engine.engine_path(tmp_path, s)
    assert trt_engine.load_cached(engine, s) == (None, "no engine yet")
    trt_engine.store(engine, s, b"engine-bytes")
    assert trt_engine.load_cached(engine, s) == (b"engine-bytes", "cached")
    assert json.loads(trt_engine.sidecar_path(engine).read_text())["key"] == s.key()
    for other, field in [
        (spec(onnx_sha256="cd" * 32), "onnx_sha256"),
        (spec(gpu_name="NVIDIA L4"), "gpu_name"),
        (spec(trt_version="10.4.0"), "trt_version"),
        (spec(compute_capability="8.9"), "compute_capability"),
    ]:
        data, why = trt_engine.load_cached(engine, other)
        assert data is None and field in why
    engine.write_bytes(b"engine-bytez")  # same size, other bytes
    assert trt_engine.load_cached(engine, s)[0] is None
    trt_engine.sidecar_path(engine).unlink()
    assert "sidecar" in trt_engine.load_cached(engine, s)[1]


def test_engines_built_by_older_build_code_are_stale(tmp_path, monkeypatch):
    # The key had no version of the build code: pinning other fp32 islands (or other flags) would have
    # reused the engines built before the change.
    s = spec()
    engine = trt_engine.engine_path(tmp_path, s)
    trt_engine.store(engine, s, b"engine-bytes")
    side = json.loads(trt_engine.sidecar_path(engine).read_text())
    del side["spec"]["build_version"]  # a sidecar written before build versions
    trt_engine.sidecar_path(engine).write_text(json.dumps(side))
    data, why = trt_engine.load_cached(engine, s)
    assert data is None and "build_version" in why
    newer = spec(build_version=trt_engine.BUILD_VERSION + 1)
    assert newer.key() != s.key() and trt_engine.engine_path(tmp_path, newer) != engine


@pytest.mark.parametrize("text", ["[1, 2]", '"spec"', '{"spec": [1]}', "null"])
def test_a_sidecar_of_foreign_json_is_no_sidecar(tmp_path, text):
    s = spec()
    engine = trt_engine.engine_path(tmp_path, s)
    trt_engine.store(engine, s, b"engine-bytes")
    trt_engine.sidecar_path(engine).write_text(text)
    assert "sidecar" in trt_engine.load_cached(engine, s)[1]
    assert trt_engine.read_spec(engine) is None


def test_a_killed_builds_engine_part_file_is_removed_by_the_next_build(tmp_path, monkeypatch):
    """kill -9 while an engine was stored left its write_atomic temp file in the cache folder forever;
    the next build removes it once over an hour old (a fresh one may be another build's, in progress)."""
    monkeypatch.setattr(trt_engine, "build_engine", lambda *a: b"engine")
    stale, fresh = tmp_path / ".e.engine.k3j2h1g0.part", tmp_path / ".f.engine.a1b2c3d4.part"
    for f in (stale, fresh):
        f.write_bytes(b"half an engine")
    os.utime(stale, (time.time() - 3700,) * 2)
    assert trt_engine.get_engine(tmp_path / "m.onnx", spec(), tmp_path / "e.engine", 1 << 30)[1]
    assert not stale.exists() and fresh.exists()


def test_get_engine_builds_once_and_rebuilds_stale(tmp_path, monkeypatch):
    builds = []

    def fake_build(onnx_path, spec_, workspace, timing_cache):
        builds.append(spec_)
        timing_cache.write_bytes(b"timing")
        return f"engine for {spec_.key()}".encode()

    monkeypatch.setattr(trt_engine, "build_engine", fake_build)
    s = spec()
    engine = tmp_path / "e.engine"
    first, built = trt_engine.get_engine(tmp_path / "m.onnx", s, engine, 1 << 30)
    assert built and len(builds) == 1
    assert (
        trt_engine.get_engine(tmp_path / "m.onnx", s, engine, 1 << 30) == (first, False) and len(builds) == 1
    )
    assert trt_engine.timing_cache_path(tmp_path, s).read_bytes() == b"timing"  # no folder: the engine's
    newer = spec(trt_version="10.4.0")  # the same file, found after a TensorRT upgrade
    with pytest.warns(UserWarning, match="rebuilding TensorRT engine.*trt_version"):
        fresh, built = trt_engine.get_engine(tmp_path / "m.onnx", newer, engine, 1 << 30)
    assert built
    assert fresh != first and len(builds) == 2 and trt_engine.load_cached(engine, newer)[0] == fresh


def test_build_typing():
    assert trt_engine.build_typing("fp16", "10.3.0", True) == "fp16-flag"
    assert trt_engine.build_typing("fp16", "10.3.0", True, strongly_typed=True) == "strong"
    assert trt_engine.build_typing("fp16", "11.1.0", False) == "strong"
    assert trt_engine.build_typing("fp16", "11.1.0", True) == "strong"
    assert trt_engine.build_typing("fp32", "11.1.0", False) == "fp32"
    assert trt_engine.onnx_precision("strong") == "fp16" and trt_engine.onnx_precision("fp16-flag") == "fp32"
    with pytest.raises(trt_engine.EngineError, match="strongly typed"):
        trt_engine.build_typing("fp16", "11.0.0", False, strongly_typed=False)
    with pytest.raises(trt_engine.EngineError, match="bf16"):
        trt_engine.build_typing("bf16", "10.3.0", True)


def test_pin_fp32_islands_by_onnx_node_name():
    # A stand-in for a parsed INetworkDefinition: layers named after ONNX nodes, as the parser names them.
    f32, i64 = "float32", "int64"
    fake_trt = SimpleNamespace(float32=f32, LayerType=SimpleNamespace(CONSTANT="constant", SHAPE="shape"))

    class Layer:
        def __init__(self, name, type_="other", out=f32):
            self.name, self.type, self.precision, self.out, self.set = name, type_, None, out, {}
            self.num_outputs = 1

        def get_output(self, j):
            return SimpleNamespace(dtype=self.out)

        def set_output_type(self, j, dtype):
            self.set[j] = dtype

    layers = [
        Layer("/net/down1/Conv"),
        Layer(ISLAND_TAG + "/net/Sigmoid"),
        Layer(ISLAND_TAG + "Constant", "constant"),
        Layer(ISLAND_TAG + "/net/Slice", out=i64),
    ]
    network = SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert trt_engine.pin_fp32_islands(fake_trt, network) == 2
    assert layers[0].precision is None and layers[2].precision is None
    assert layers[1].precision == f32 and layers[1].set == {0: f32}
    assert layers[3].precision == f32 and layers[3].set == {}  # int outputs keep their type


# ---- shape plans ----------------------------------------------------------------------------------
def test_profile_shapes():
    assert profile_shapes((4, 512, 512)) == ((4, 3, 512, 512),) * 3
    lo, opt, hi = profile_shapes((4, 512, 512), dynamic=True)
    assert lo == (1, 3, 16, 16) and opt == (4, 3, 512, 512) and hi == (4, 3, 2048, 2048)
    assert profile_shapes((2, 256, 256), True, (8, 1024, 768))[2] == (8, 3, 1024, 768)
    assert fits((3, 3, 640, 480), (lo, opt, hi)) and not fits((5, 3, 64, 64), (lo, opt, hi))
    with pytest.raises(ValueError, match="smaller"):
        profile_shapes((4, 512, 512), True, (4, 256, 256))


def test_profile_shapes_of_a_wide_tile_and_unaligned_max_shapes():
    # Square tiles hid the width taking the height's bound, and only H was checked for alignment.
    assert profile_shapes((2, 256, 4096), dynamic=True)[2] == (2, 3, 2048, 4096)
    assert profile_shapes((2, 4096, 256), dynamic=True)[2] == (2, 3, 4096, 2048)
    for max_shape in [(4, 1000, 1024), (4, 1024, 1000)]:
        with pytest.raises(ValueError, match="multiples of 16"):
            profile_shapes((4, 512, 512), True, max_shape)


def test_fixed_shape_runner_picks_the_largest_exact_batch_else_the_smallest_fitting_engine():
    calls, inputs = [], []

    def build(shape):
        def run(x):
            calls.append(shape)
            inputs.append(x)
            n, _, h, w = x.shape
            return x.clone(), [torch.zeros(n, 1, h // s, w // s) for s in (1, 2, 4)]

        return run

    runner = FixedShapeRunner(build)
    for shape in [(2, 64, 64), (4, 64, 64), (1, 128, 128), (1, 96, 96)]:
        runner.runner_for(shape)
    x = torch.rand(4, 3, 64, 64)
    y, _ = runner(x)
    assert calls == [(4, 64, 64)] and torch.equal(y, x)  # one call of the 4-batch, not two of the 2
    calls.clear()
    x = torch.rand(1, 3, 80, 48)
    y, _ = runner(x)
    assert calls == [(1, 96, 96)] and torch.equal(y, x)  # the least padding of those that fit
    padded = inputs[-1]  # replicated edges, not zeros: the border's outputs stay near the image's own
    assert torch.equal(padded[..., 80:, :], padded[..., 79:80, :].expand(-1, -1, 16, -1))
    assert torch.equal(padded[..., :, 48:], padded[..., :, 47:48].expand(-1, -1, -1, 48))


def test_fixed_shape_runner_feeds_engines_exact_shapes():
    model = lively_model("tiny", seed=5)
    built = []

    def build(shape):  # a fake static engine: eager, but only for exactly this shape
        built.append(shape)

        def run(x):
            assert tuple(x.shape) == (shape[0], 3, shape[1], shape[2])
            with torch.inference_mode():
                return model(x)

        return run

    runner = FixedShapeRunner(build, (4, 64, 64))
    x = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y, gammas = runner(x)  # 6 tiles: a batch of 4 and a batch of 2 filled up to 4
    with torch.inference_mode():
        y_ref, g_ref = model(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    for g, r in zip(gammas, g_ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0)
    small = torch.rand(1, 3, 48, 32, generator=torch.Generator().manual_seed(1))
    y, gammas = runner(small)  # fits the 64x64 engine: padded, then cropped back
    assert built == [(4, 64, 64)]
    assert y.shape == (1, 3, 48, 32) and [g.shape[-2:] for g in gammas] == [(48, 32), (24, 16), (12, 8)]
    with torch.inference_mode():
        y_ref = model(small)[0]
    # Away from the padded border the receptive field sees the same pixels (tiling-sized error).
    assert (y - y_ref)[..., :16, :16].abs().max() < 1e-3
    runner(torch.rand(2, 3, 96, 64))  # fits no engine: gets its own
    assert built == [(4, 64, 64), (2, 96, 64)]


def test_two_threads_asking_for_a_new_engine_shape_get_one_engine():
    """Two threads whose tiles need the same new engine shape at once (a static TensorRT backend
    serving two streams) both built it: two engines deserialized, the first dropped from the
    runner's table but never closed, its GPU memory held until the garbage collector's next pass.
    The second now waits for the first one's engine."""
    built = []
    second = None

    def build(shape):
        built.append(shape)
        if len(built) == 1:  # the other thread arrives while this one builds
            second.start()
            second.join(timeout=0.5)
        return lambda x: (x, [x[:, :1], x[:, :1, ::2, ::2], x[:, :1, ::4, ::4]])

    runner = FixedShapeRunner(build)
    second = threading.Thread(target=runner.runner_for, args=((1, 64, 64),))
    first = runner.runner_for((1, 64, 64))
    second.join()
    assert built == [(1, 64, 64)] and runner.runners == {(1, 64, 64): first}


# ---- without TensorRT -----------------------------------------------------------------------------
@pytest.mark.skipif(
    TRT_ERROR is None, reason="tensorrt is installed: the missing-TensorRT message is not shown"
)
def test_missing_tensorrt_is_one_clear_line(tiny_weights, capsys):
    with pytest.raises(BackendError) as e:
        qairn.Restorer(model=lively_model(), device="cpu", backend="tensorrt")
    message = str(e.value)
    assert "\n" not in message and "pip install tensorrt" in message
    assert export_main(["tensorrt", str(tiny_weights)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install tensorrt" in err


def test_cli_never_replaces_an_engine_file_by_accident(tiny_weights, tmp_path, capsys):
    """Checked before TensorRT is even imported: an existing -o needs --overwrite, and -o is an .engine."""
    out = tmp_path / "mine.engine"
    out.write_bytes(b"a user's engine")
    assert export_main(["tensorrt", str(tiny_weights), "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"qairn export: error: {out}: exists (use --overwrite)"
    assert export_main(["tensorrt", str(tiny_weights), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "engine files end in .engine" in capsys.readouterr().err
    assert out.read_bytes() == b"a user's engine"
    # Case aside, as .onnx is checked: M.ENGINE was refused as not ending in .engine.
    export_main(["tensorrt", str(tiny_weights), "-o", str(tmp_path / "M.ENGINE")])
    assert "end in .engine" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "device, says",
    [
        ("cuda:3", "--device: device 'cuda:3' requested, but this machine has 1 CUDA device (cuda:0)"),
        ("gpu", "--device: unknown device 'gpu': use cpu, cuda, cuda:N or auto"),
        ("cpu", "--device: engines are built on a CUDA device, not cpu"),
    ],
)
def test_cli_device_is_checked_first_in_one_line(tiny_weights, monkeypatch, capsys, device, says):
    """qairn export tensorrt --device goes through the Restorer's resolve_device: a GPU that is not
    there is one line before anything is exported (it was a torch error, deep in the build)."""
    from qairn.export import trt_backend

    fake = SimpleNamespace(__version__="10.9.0", BuilderFlag=SimpleNamespace(FP16=1))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("qairn.weights_io.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert export_main(["tensorrt", str(tiny_weights), "--device", device]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"qairn export: error: {says}"]


def test_backend_takes_a_user_engines_shape_and_refuses_mismatches(tmp_path, monkeypatch):
    """With a stand-in for the tensorrt module: an --onnx graph of the other precision is refused
    (the engine would be labelled fp16 from an fp32 graph), a user's engine of another precision is
    refused rather than rebuilt over, and a dynamic engine stays dynamic."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    model = lively_model()
    fp32 = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    cuda = torch.device("cuda", 0)  # as the Restorer passes it (a bare "cuda" asks torch for the current GPU)
    with pytest.raises(BackendError, match="a fp32 graph, but a fp16 .strong. build reads the fp16 export"):
        trt_backend.TrtBackend(model, cuda, "fp16", onnx=fp32, strongly_typed=True, cache_dir=tmp_path)
    engine = tmp_path / "dyn.engine"
    engine.write_bytes(b"engine")
    spec = {"precision": "fp16", "min_shape": [1, 3, 64, 64], "opt_shape": [2, 3, 256, 256]}
    spec["max_shape"] = [4, 3, 512, 512]
    trt_engine.sidecar_path(engine).write_text(json.dumps({"spec": spec}))
    with pytest.raises(BackendError, match="dyn.engine: a fp16 engine; asked for fp32"):
        trt_backend.TrtBackend(model, cuda, "fp32", engine=engine, onnx=fp32, cache_dir=tmp_path)
    built = []
    monkeypatch.setattr(
        trt_backend.TrtBackend, "_runner", lambda self, shape: built.append(shape) or "runner"
    )
    b = trt_backend.TrtBackend(model, cuda, "fp16", engine=engine, onnx=fp32, cache_dir=tmp_path)
    assert b.dynamic and not b.fixed_tile and b.max_shape == (4, 512, 512) and built == [(2, 256, 256)]


class FakeGpus:
    """cuda:0 current, and a stand-in tensorrt whose engine, context and execution each note the
    device current when TensorRT would bind to it; torch.cuda's device and stream faked to match."""

    def __init__(self, monkeypatch):
        self.current = torch.device("cuda", 0)
        self.seen = []  # (what, current device)
        self.specs = []  # the EngineSpec of each engine asked for
        self.execute_ok = True  # what execute_async_v3 returns
        self.unloadable = set()  # engine bytes deserialize_cuda_engine refuses (returns None)
        self.after_input_address = None  # called by the context once the input's address is set
        self.executed = []  # (thread, {tensor: thread that set its address}) per execution
        fake = self

        @contextlib.contextmanager
        def device(d):
            before = fake.current
            fake.current = torch.device(d) if torch.device(d).index is not None else before
            try:
                yield
            finally:
                fake.current = before

        def current_stream(d=None):
            d = torch.device(d) if d is not None else fake.current
            return SimpleNamespace(device=d, cuda_stream=f"stream of {d}")

        def synchronize(d=None):
            fake.seen.append(("synchronize", fake.current))

        for name, value in dict(
            device=device,
            current_stream=current_stream,
            current_device=lambda: fake.current.index,
            synchronize=synchronize,
        ).items():
            monkeypatch.setattr(torch.cuda, name, value)

        io = ["input", "restored", "gamma1", "gamma2", "gamma3"]
        shape = (1, 3, 64, 64)

        class Context:
            def __init__(self):
                self.addresses = {}  # tensor name -> the thread that set its address

            def set_input_shape(self, name, s):
                return True

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = threading.get_ident()
                if name == "input" and fake.after_input_address is not None:
                    fake.after_input_address()

            def get_tensor_shape(self, name):
                return shape

            def execute_async_v3(self, stream):
                fake.seen.append((f"execute on {stream}", fake.current))
                # Whose buffers this execution reads and writes: every one should be the caller's.
                fake.executed.append((threading.get_ident(), dict(self.addresses)))
                return fake.execute_ok

            def __del__(self):
                fake.seen.append(("free context", fake.current))

        class Engine:
            num_io_tensors = len(io)
            device_memory_size_v2 = 5 << 20  # activation memory each execution context allocates

            def get_tensor_name(self, i):
                return io[i]

            def get_tensor_mode(self, name):
                return "in" if name == "input" else "out"

            def get_tensor_dtype(self, name):
                return SimpleNamespace(name="FLOAT")

            def get_tensor_profile_shape(self, name, profile):
                return [(1, 3, 16, 16), shape, (1, 3, 512, 512)]

            def create_execution_context(self):
                fake.seen.append(("context", fake.current))
                return Context()

            def __del__(self):
                fake.seen.append(("free engine", fake.current))

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                fake.seen.append(("deserialize", fake.current))
                return None if data in fake.unloadable else Engine()

            def __del__(self):
                fake.seen.append(("free runtime", fake.current))

        self.trt = SimpleNamespace(
            __version__="10.9.0",
            BuilderFlag=SimpleNamespace(FP16=1),
            Runtime=Runtime,
            Logger=SimpleNamespace(WARNING=2),
            TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"),
        )

        def get_engine(onnx, spec, path, workspace, folder, **options):  # rebuild=, unusable=
            fake.seen.append(("build", fake.current))
            fake.specs.append(spec)
            return b"engine", True

        def gpu_identity(device):
            fake.seen.append(("identity", torch.device(device)))
            return "Fake GPU", "9.0"

        monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        monkeypatch.setattr(trt_engine, "_LOGGER", "a logger")
        monkeypatch.setattr(trt_engine, "get_engine", get_engine)
        monkeypatch.setattr(trt_engine, "gpu_identity", gpu_identity)


class FakeTensor:
    """Enough of a CUDA tensor for TrtRunner: where it was put or made."""

    def __init__(self, shape, device):
        self.shape, self.device = tuple(shape), torch.device(device)

    def to(self, device, dtype=None):
        return FakeTensor(self.shape, device)

    def contiguous(self):
        return self

    def data_ptr(self):
        return id(self)

    def float(self):
        return self


@pytest.mark.parametrize("asked", ["cuda:1", "cuda"])
def test_engines_are_built_loaded_and_run_on_their_own_gpu(tmp_path, monkeypatch, asked):
    """A TensorRT backend on cuda:1 while cuda:0 is current (a thread of a process serving several
    GPUs): the engine is built, deserialized and given its context with cuda:1 current, its cache key
    names cuda:1's model, and each call executes with cuda:1 current, on cuda:1's stream, into
    buffers on cuda:1 (it ran with cuda:0 current before). A bare "cuda" is the GPU current at
    construction, kept when another is current at the call."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    gpus = FakeGpus(monkeypatch)
    gpu1 = torch.device("cuda", 1)
    if asked == "cuda":
        gpus.current = gpu1
    b = trt_backend.TrtBackend(
        model, torch.device(asked), "fp32", onnx=onnx, dynamic=True, cache_dir=tmp_path
    )
    gpus.current = torch.device("cuda", 0)
    assert b.device == gpu1
    assert gpus.seen == [("identity", gpu1), ("build", gpu1), ("deserialize", gpu1), ("context", gpu1)]
    [spec] = gpus.specs  # the key names this GPU, this TensorRT and this ONNX file
    assert (spec.gpu_name, spec.compute_capability, spec.trt_version) == ("Fake GPU", "9.0", "10.9.0")
    assert spec.onnx_sha256 == qcache.sha256_file(onnx) and (spec.precision, spec.typing) == ("fp32", "fp32")
    gpus.seen.clear()
    made = []
    monkeypatch.setattr(
        torch, "empty", lambda shape, dtype, device: made.append(FakeTensor(shape, device)) or made[-1]
    )
    y, gammas = b(FakeTensor((1, 3, 64, 64), "cpu"))
    assert gpus.seen == [("execute on stream of cuda:1", gpu1)]
    assert len(made) == 4 and all(t.device == gpu1 for t in made) and y.device == gpu1
    assert gpus.current == torch.device("cuda", 0)  # and the caller's GPU is current again


def test_close_frees_the_engines_now_on_their_own_gpu(tmp_path, monkeypatch):
    """TrtRunner and TrtBackend had no teardown: an engine's GPU memory went only when the garbage
    collector found it, and a static-shape backend and its runners refer to each other, so dropping
    the Restorer freed nothing before the collector's next full pass. close() (or `with`) frees the
    context, then the engine, then the runtime, with the engine's GPU current and its queued work
    finished first; calls after it are refused in one line."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    gpus = FakeGpus(monkeypatch)
    gpu1 = torch.device("cuda", 1)
    with trt_backend.TrtBackend(model, gpu1, "fp32", onnx=onnx, shape=(1, 64, 64), cache_dir=tmp_path) as b:
        assert ("free engine", gpu1) not in gpus.seen
        gpus.seen.clear()
    assert gpus.seen == [
        ("synchronize", gpu1),
        ("free context", gpu1),
        ("free engine", gpu1),
        ("free runtime", gpu1),
    ]
    assert gpus.current == torch.device("cuda", 0)
    b.close()  # twice: nothing more to free
    assert len(gpus.seen) == 4
    with pytest.raises(BackendError, match="^this TensorRT backend was closed$"):
        b(FakeTensor((1, 3, 64, 64), "cpu"))
    with pytest.raises(BackendError, match="^this TensorRT engine was closed$"):
        b.run.runners[(1, 64, 64)](FakeTensor((1, 3, 64, 64), "cpu"))


def test_an_engine_that_fails_to_execute_is_one_line_naming_it(tmp_path, monkeypatch):
    """execute_async_v3 returning False (TensorRT refused to enqueue: see its log) is a TrtRuntimeError,
    a failure of TensorRT rather than of the caller's input, in one line naming the engine file and
    the input shape; the caller's GPU is current again after it, and the backend still runs."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    gpus = FakeGpus(monkeypatch)
    gpu1 = torch.device("cuda", 1)
    b = trt_backend.TrtBackend(model, gpu1, "fp32", onnx=onnx, dynamic=True, cache_dir=tmp_path)
    monkeypatch.setattr(torch, "empty", lambda shape, dtype, device: FakeTensor(shape, device))
    engine = b.run.path
    gpus.execute_ok = False
    with pytest.raises(trt_backend.TrtRuntimeError) as e:
        b(FakeTensor((1, 3, 64, 64), "cpu"))
    assert str(e.value) == (
        f"{engine}: TensorRT failed to execute the engine on input (1, 3, 64, 64) (see the TensorRT log)"
    )
    assert gpus.current == torch.device("cuda", 0)
    gpus.execute_ok = True
    y, gammas = b(FakeTensor((1, 3, 64, 64), "cpu"))
    assert y.shape == (1, 3, 64, 64) and y.device == gpu1


def test_a_cached_engine_tensorrt_cannot_load_is_rebuilt_once(tmp_path, monkeypatch):
    """An engine whose bytes match its sidecar but which this TensorRT cannot deserialize (a cache
    shared with another TensorRT build of the same version string, a plan TensorRT itself calls
    corrupt) failed every Restorer start with 'could not deserialize' until the user found and
    deleted the file. It is rebuilt once, with a warning; an engine built just now that fails is
    still an error, not a loop."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    real_get_engine = trt_engine.get_engine
    gpus = FakeGpus(monkeypatch)
    monkeypatch.setattr(trt_engine, "get_engine", real_get_engine)
    builds = []
    monkeypatch.setattr(
        trt_engine, "build_engine", lambda *a: builds.append(a) or f"plan {len(builds)}".encode()
    )
    options = dict(onnx=onnx, shape=(1, 64, 64), cache_dir=tmp_path)
    first = trt_backend.TrtBackend(model, GPU0, "fp32", **options).run.runners[(1, 64, 64)]
    assert first.built and len(builds) == 1
    gpus.unloadable.add(b"plan 1")
    with pytest.warns(UserWarning, match="rebuilding TensorRT engine: .*could not deserialize"):
        again = trt_backend.TrtBackend(model, GPU0, "fp32", **options).run.runners[(1, 64, 64)]
    assert again.built and again.path == first.path and len(builds) == 2
    assert trt_engine.load_cached(first.path, first.spec) == (b"plan 2", "cached")
    gpus.unloadable.add(b"plan 3")  # built now and refused: the error, once
    trt_engine.sidecar_path(first.path).unlink()
    with pytest.warns(UserWarning, match="no readable sidecar"):
        with pytest.raises(trt_backend.TrtRuntimeError, match="could not deserialize"):
            trt_backend.TrtBackend(model, GPU0, "fp32", **options)
    assert len(builds) == 3


def test_two_threads_never_share_the_execution_context_at_once(tmp_path, monkeypatch):
    """One Restorer may serve several threads, but a TensorRT execution context may not be used by
    two at once (its input shape and tensor addresses are the context's state): a second thread that
    set its own between the first one's input address and its execute_async_v3 made the first run
    read the second one's input. Calls now take the context one at a time; one on another CUDA stream
    than the last first waits for that stream (the context's activation memory is shared)."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    gpus = FakeGpus(monkeypatch)
    b = trt_backend.TrtBackend(model, GPU0, "fp32", onnx=onnx, dynamic=True, cache_dir=tmp_path)
    monkeypatch.setattr(torch, "empty", lambda shape, dtype, device: FakeTensor(shape, device))
    other = threading.Thread(target=b, args=(FakeTensor((1, 3, 64, 64), "cpu"),))

    def second_caller_arrives():
        gpus.after_input_address = None
        other.start()
        other.join(timeout=0.5)  # with the context taken, it waits (its result is checked below)

    gpus.after_input_address = second_caller_arrives
    b(FakeTensor((1, 3, 64, 64), "cpu"))
    other.join()
    assert len(gpus.executed) == 2
    for caller, setters in gpus.executed:
        assert set(setters.values()) == {caller}

    waited = []
    streams = iter(
        [
            SimpleNamespace(name=n, cuda_stream=n, wait_stream=lambda s, n=n: waited.append((n, s.name)))
            for n in "ab"
        ]
    )
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: next(streams))
    b.run.last_stream = None
    b(FakeTensor((1, 3, 64, 64), "cpu"))
    b(FakeTensor((1, 3, 64, 64), "cpu"))
    assert waited == [("b", "a")]


# ---- with TensorRT (skipped here: it cannot be installed on these machines) --------------------
@needs_trt
@pytest.mark.parametrize("strongly_typed", [None, True])
def test_tensorrt_build_run_and_cache(tmp_path, strongly_typed):
    model = lively_model("tiny", seed=6)
    options = dict(cache_dir=tmp_path, shape=(2, 64, 64), strongly_typed=strongly_typed)
    kw = dict(model=model, device="cuda", tile=64, overlap=16, tile_batch=2)
    r_trt = qairn.Restorer(backend="tensorrt", precision="fp16", **kw, **options)
    r_eager = qairn.Restorer(backend="eager", precision="fp32", **kw)  # the fp32 reference
    x = torch.rand(1, 3, 150, 200, generator=torch.Generator().manual_seed(0)).cuda()
    (y, q, _), (y_ref, q_ref, _) = r_trt.restore_tensor(x), r_eager.restore_tensor(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, atol=2e-3, rtol=0)
    for k in q_ref:
        torch.testing.assert_close(q[k], q_ref[k], atol=2e-3, rtol=0)
    engines = sorted((tmp_path / "engines").glob("*.engine"))
    assert len(engines) == 1 and list((tmp_path / "engines").glob("timing-*.cache"))
    stamp = engines[0].stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cached, valid engine: no rebuild warning
        qairn.Restorer(backend="tensorrt", precision="fp16", **kw, **options).restore_tensor(x)
    assert engines[0].stat().st_mtime_ns == stamp


@needs_trt
def test_tensorrt_cli_engine_file(tiny_weights, tmp_path):
    out = tmp_path / "tiny.engine"
    argv = ["tensorrt", str(tiny_weights), "-o", str(out), "--shape", "2,64,64", "--cache-dir", str(tmp_path)]
    assert export_main(argv + ["--verify-crop", "64", "--verify-limit", "1"]) == 0
    assert out.is_file() and trt_engine.sidecar_path(out).is_file()
    assert list((tmp_path / "engines").glob("timing-*.cache"))
    r = qairn.Restorer(
        weights=tiny_weights,
        device="cuda",
        backend="tensorrt",
        precision="fp16",
        engine=out,
        cache_dir=tmp_path,
        tile=64,
        tile_batch=2,
    )
    assert r.backend.run.runners[(2, 64, 64)].path == out


def test_cli_onnx_that_is_not_onnx_is_one_line(tiny_weights, tmp_path, monkeypatch, capsys):
    """`qairn export tensorrt W --onnx F` with F the weights (or a truncated copy of an export): the
    metadata read raised protobuf's DecodeError, a traceback, before anything said which file."""
    from qairn.export import trt_backend

    fake = SimpleNamespace(__version__="10.9.0", BuilderFlag=SimpleNamespace(FP16=1))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = ["tensorrt", str(tiny_weights), "--onnx", str(tiny_weights), "--device", "cuda:0"]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qairn export: error: {tiny_weights}: not an ONNX file ("), (
        err
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter
def test_cli_onnx_of_another_network_is_one_line(tiny_weights, tmp_path, monkeypatch, capsys):
    """`qairn export tensorrt W --onnx F` with F another network's ONNX: its static shape was read
    from its first input, so a 2-d input ended in 'not enough values to unpack (expected 4, got 2)'
    (no file named) and a graph without inputs in an IndexError traceback."""
    import onnx

    from qairn.export import trt_backend

    fake = SimpleNamespace(__version__="10.9.0", BuilderFlag=SimpleNamespace(FP16=1))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    linear, empty = tmp_path / "linear.onnx", tmp_path / "empty.onnx"
    torch.onnx.export(
        torch.nn.Linear(4, 2), (torch.rand(1, 4),), str(linear), dynamo=False, input_names=["input"]
    )
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(empty))
    for foreign in (linear, empty):
        argv = ["tensorrt", str(tiny_weights), "--onnx", str(foreign), "--device", "cuda:0"]
        assert export_main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"qairn export: error: {foreign}: not an ONNX file exported by qairn (no 4-d input named 'input')"
        ]


@pytest.mark.parametrize("size", ["inf", "0", "-1", "nan"])
def test_workspace_size_must_be_a_positive_number(tiny_weights, tmp_path, monkeypatch, capsys, size):
    """workspace_gb=inf raised OverflowError ('cannot convert float infinity to integer') after the
    ONNX export, a traceback from `qairn export tensorrt --workspace-gb inf`; 0 and -1 went on to the
    TensorRT builder. The backend and the CLI now refuse them first, in one line."""
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(trt_backend, "cached_onnx", lambda *a, **k: pytest.fail("exported first"))
    with pytest.raises(
        BackendError, match=f"^workspace_gb must be a positive number of GiB, not {float(size)!r}$"
    ):
        trt_backend.TrtBackend(lively_model(), torch.device("cuda", 0), "fp16", workspace_gb=float(size))
    with pytest.raises(SystemExit) as e:
        export_main(["tensorrt", str(tiny_weights), "--workspace-gb", size])
    assert (
        e.value.code == 2
        and f"--workspace-gb: {size!r}: expected a size in GiB above 0" in capsys.readouterr().err
    )


def test_two_builders_of_one_engine_build_it_once(tmp_path, monkeypatch):
    """Two processes (or threads) asking for the same engine at once both built it, and their
    engine and sidecar writes could interleave into an engine that fails its sidecar's sha256 on the
    next start (a rebuild of minutes). Now the second waits for the first and loads its engine."""
    import threading
    import time

    builds = []

    def fake_build(onnx_path, spec_, workspace, timing_cache):
        builds.append(threading.get_ident())
        time.sleep(0.3)  # a build takes minutes: the other caller arrives meanwhile
        return f"engine {len(builds)}".encode()

    monkeypatch.setattr(trt_engine, "build_engine", fake_build)
    s, engine = spec(), tmp_path / "e.engine"
    start, got = threading.Barrier(2, timeout=60), []

    def get():
        start.wait()
        got.append(trt_engine.get_engine(tmp_path / "m.onnx", s, engine, 1 << 30)[0])

    run_in_threads(get, get)
    assert len(builds) == 1 and got == [b"engine 1"] * 2
    assert trt_engine.load_cached(engine, s) == (b"engine 1", "cached")


def test_backend_builds_a_static_onnx_at_its_own_shape(tmp_path, monkeypatch):
    """An --onnx exported with --static 1,64,64 was given the default (4,512,512) profile (the CLI's
    --shape default), a TensorRT build that fails deep in the builder; now its shape is taken, and
    other shapes (or dynamic=True) are refused in one line."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    built = []
    monkeypatch.setattr(trt_backend.TrtBackend, "_runner", lambda self, shape: built.append(self.spec(shape)))
    model = lively_model()
    static = ox.export_onnx(model, tmp_path / "s.onnx", outputs="maps", shape=(1, 64, 64))
    assert ox.static_input_shape(static) == (1, 64, 64)
    cuda = torch.device("cuda", 0)
    b = trt_backend.TrtBackend(model, cuda, "fp16", onnx=static, cache_dir=tmp_path)
    assert [s.opt_shape for s in built] == [(1, 3, 64, 64)] and not b.dynamic
    assert b.static_tile == 64  # what a Restorer's tile="auto" takes, not 512
    with pytest.raises(
        BackendError, match=r"static for N,H,W = \(1, 64, 64\) and cannot run \(4, 512, 512\)"
    ):
        b.run.runner_for((4, 512, 512))
    with pytest.raises(BackendError, match="dynamic engines need an export without --static"):
        trt_backend.TrtBackend(model, cuda, "fp16", onnx=static, cache_dir=tmp_path, dynamic=True)


def test_cli_max_shape_without_dynamic_is_refused(tiny_weights, capsys):
    """--max-shape 4,2048,2048 without --dynamic was dropped without a word: the engine was static at
    --shape, not the 2048x2048 the user asked for. Refused before TensorRT is even imported."""
    assert export_main(["tensorrt", str(tiny_weights), "--max-shape", "4,2048,2048"]) == 2
    assert capsys.readouterr().err.strip() == "qairn export: error: --max-shape is for --dynamic engines"


def test_cli_overwrite_keeps_the_old_engine_until_the_new_one_is_built(tiny_weights, tmp_path, monkeypatch):
    """--overwrite deleted the old engine's sidecar before the build: a refused --onnx or a failed
    build left an engine that no longer validates (the next run rebuilds over it). Now the new
    engine is built in the cache folder and copied over -o, with its sidecar, only once built."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake = SimpleNamespace(__version__="10.9.0", BuilderFlag=SimpleNamespace(FP16=1))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    old, new = spec(), spec(onnx_sha256="cd" * 32)
    out = trt_engine.store(tmp_path / "mine.engine", old, b"old engine")
    onnx = ox.cached_onnx(lively_model(), tmp_path, outputs="maps", precision="fp32")  # tiny_weights' network
    argv = ["tensorrt", str(tiny_weights), "-o", str(out), "--overwrite", "--onnx", str(onnx)]
    argv += ["--shape", "4,512,512", "--device", "cuda:0", "--cache-dir", str(tmp_path / "cache")]

    def refused(*a, **k):
        raise BackendError("m.onnx: refused")

    monkeypatch.setattr(trt_backend, "TrtBackend", refused)
    assert export_main(argv) == 2
    assert trt_engine.load_cached(out, old) == (b"old engine", "cached")

    def built(model, device, precision, engine=None, cache_dir=None, **k):
        path = trt_engine.store(cache_dir / "engines" / "new.engine", new, b"new engine")
        runner = SimpleNamespace(spec=new, path=path)
        run = SimpleNamespace(runner_for=lambda shape: runner)
        return SimpleNamespace(dynamic=False, run=run, folder=cache_dir / "engines")

    monkeypatch.setattr(trt_backend, "TrtBackend", built)
    assert export_main(argv) == 0
    assert trt_engine.load_cached(out, new) == (b"new engine", "cached")


def test_an_engine_written_to_a_users_folder_leaves_nothing_else_there(tiny_weights, tmp_path, monkeypatch):
    """`qairn export tensorrt -o out/model.engine` left the build's lock file (.model.engine.lock) and
    the timing cache (timing-*.cache) in out/ beside the engine: they belong to the cache folder,
    where the next engine's build finds the timing cache."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())

    def fake_build(onnx_path, spec_, workspace, timing_cache):
        timing_cache.write_bytes(b"timing")
        return b"engine"

    monkeypatch.setattr(trt_engine, "build_engine", fake_build)
    monkeypatch.setattr(trt_backend, "TrtRunner", lambda data, device, path: SimpleNamespace(path=path))
    model = lively_model()
    cache = tmp_path / "cache"
    onnx = ox.cached_onnx(model, cache, outputs="maps", precision="fp32")
    out = tmp_path / "out" / "model.engine"
    b = trt_backend.TrtBackend(
        model, torch.device("cuda", 0), "fp16", engine=out, onnx=onnx, shape=(1, 64, 64), cache_dir=cache
    )
    assert b.run.runners[(1, 64, 64)].path == out
    assert sorted(f.name for f in out.parent.iterdir()) == ["model.engine", "model.engine.json"]
    assert [f.name for f in (cache / "engines").glob("timing-*.cache")] == [
        trt_engine.timing_cache_path(cache / "engines", b.run.runners[(1, 64, 64)].spec).name
    ]


def test_backend_parses_a_users_onnx_once(tmp_path, monkeypatch):
    """TrtBackend(onnx=F) parsed F with onnx.load three times before the TensorRT parser's own read
    (metadata for its outputs, again for its precision, again for its input shape): seconds each for
    a large export. One parse now serves every check."""
    import onnx

    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(trt_backend.TrtBackend, "_runner", lambda self, shape: "runner")
    model = lively_model()
    static = ox.export_onnx(model, tmp_path / "s.onnx", outputs="maps", shape=(1, 64, 64))
    loads = []
    real_load = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    b = trt_backend.TrtBackend(model, torch.device("cuda", 0), "fp16", onnx=static, cache_dir=tmp_path)
    assert b.static_onnx == (1, 64, 64) and loads == [str(static)]


class FakeBuilderTrt:
    """Enough of the tensorrt module for build_engine: a timing cache is a set of entries, serialized
    as b"TC:a,b"; other bytes are rejected as TensorRT rejects a corrupt cache. `during_build` runs
    while the engine builds (another process finishing its own build meanwhile)."""

    def __init__(self, entry: str, during_build=lambda: None):
        fake = self
        self.BuilderFlag = SimpleNamespace()
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
        self.NetworkDefinitionCreationFlag = SimpleNamespace()

        class Cache:
            def __init__(self, entries):
                self.entries = set(entries)

            def combine(self, other, ignore_mismatch):
                self.entries |= other.entries
                return True

            def serialize(self):
                return b"TC:" + ",".join(sorted(self.entries)).encode()

        class Config:
            cache = None

            def set_memory_pool_limit(self, pool, size):
                pass

            def add_optimization_profile(self, profile):
                pass

            def create_timing_cache(self, data):
                if data and not data.startswith(b"TC:"):
                    raise RuntimeError("Serialization assertion failed: corrupt timing cache")
                return Cache(e for e in data[3:].decode().split(",") if e)

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return SimpleNamespace(set_shape=lambda *a: None)

            def build_serialized_network(self, network, config):
                during_build()
                config.cache.entries.add(entry)
                return b"engine"

        self.Builder = Builder
        self.OnnxParser = lambda network, logger: SimpleNamespace(parse_from_file=lambda path: True)
        fake.entry = entry


def test_timing_cache_keeps_other_builds_entries_and_survives_a_corrupt_file(tmp_path, monkeypatch):
    """Two processes building different engines both read the timing cache, build, and wrote their
    own cache over it: the last writer dropped the other's timings (measured: 1 of 2 entries kept).
    A cache file TensorRT rejects (a copy cut short) made every build fail. Now the file is merged
    under a lock before it is replaced, and a corrupt one is warned of and started afresh."""
    monkeypatch.setattr(trt_engine, "_LOGGER", "a logger")
    timing = tmp_path / "timing.cache"
    s = spec(typing="fp32", precision="fp32")

    def other_process_finishes():
        timing.write_bytes(b"TC:theirs")

    monkeypatch.setitem(sys.modules, "tensorrt", FakeBuilderTrt("ours", other_process_finishes))
    assert trt_engine.build_engine(tmp_path / "m.onnx", s, 1 << 30, timing) == b"engine"
    assert timing.read_bytes() == b"TC:ours,theirs"
    timing.write_bytes(b"\x00garbage")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeBuilderTrt("again"))
    with pytest.warns(UserWarning, match=f"timing cache {timing}: unusable .*starting a fresh one"):
        assert trt_engine.build_engine(tmp_path / "m.onnx", s, 1 << 30, timing) == b"engine"
    assert timing.read_bytes() == b"TC:again"
    assert sorted(f.name for f in tmp_path.iterdir()) == [".timing.cache.lock", "timing.cache"]


@pytest.mark.parametrize(
    "recorded",
    [{"precision": "fp16"}, {"precision": "fp16", "opt_shape": [1, 3, 64]}, {"min_shape": "4,3,64,64"}],
)
def test_a_sidecar_without_usable_shapes_is_no_sidecar(tmp_path, monkeypatch, recorded):
    """engine=F whose sidecar's spec lacked a shape, or held a 3-long one, ended TrtBackend in a bare
    KeyError('opt_shape') or IndexError traceback naming no file. Such a sidecar is now unreadable,
    as foreign JSON already was: the engine is refused like one without a sidecar."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    built = []
    monkeypatch.setattr(trt_backend.TrtBackend, "_runner", lambda self, shape: built.append(shape))
    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    engine = tmp_path / "mine.engine"
    engine.write_bytes(b"engine")
    trt_engine.sidecar_path(engine).write_text(json.dumps({"spec": recorded}))
    assert trt_engine.read_spec(engine) is None
    with pytest.raises(BackendError, match=f"^{engine}: no readable sidecar mine.engine.json"):
        trt_backend.TrtBackend(
            model, GPU0, "fp16", engine=engine, onnx=onnx, shape=(1, 64, 64), cache_dir=tmp_path
        )
    assert built == []


def test_own_memory_counts_what_tensorrt_allocates_outside_torch(tmp_path, monkeypatch):
    """TensorRT's execution contexts allocate their activation memory themselves (and the engine its
    weights), so torch's peak statistics missed it: bench could only label TensorRT's peak a lower
    bound. own_memory_bytes() adds up each engine's documented context memory and engine size."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    FakeGpus(monkeypatch)
    gpu = torch.device("cuda", 0)
    b = trt_backend.TrtBackend(model, gpu, "fp32", onnx=onnx, shape=(1, 64, 64), cache_dir=tmp_path)
    one = (5 << 20) + len(b"engine")  # the fake context's memory and the fake engine's bytes
    assert b.own_memory_bytes() == one
    b.run.runner_for((2, 64, 64))  # a second tile shape: a second engine and context
    assert b.own_memory_bytes() == 2 * one


def test_tile_auto_takes_the_static_engines_tile(tmp_path, monkeypatch):
    """Restorer(backend="tensorrt", engine=F) with F built for 2,256,256 (or shape=(1,64,64)) and the
    default tile="auto" cut images into 512 tiles, which fit no engine but a new one: minutes of
    build beside the user's unused engine. A static backend's tile is now its static_tile, as a
    --static ONNX file's already was; a dynamic one runs any tile and has none."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(trt_backend.TrtBackend, "_runner", lambda self, shape: "runner")
    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    tile256 = {k: (2, 3, 256, 256) for k in ("min_shape", "opt_shape", "max_shape")}
    engine = trt_engine.store(tmp_path / "mine.engine", spec(**tile256), b"engine")
    gpu, kw = torch.device("cuda", 0), dict(onnx=onnx, cache_dir=tmp_path)
    assert trt_backend.TrtBackend(model, gpu, "fp16", engine=engine, **kw).static_tile == 256
    assert trt_backend.TrtBackend(model, gpu, "fp16", shape=(1, 64, 64), **kw).static_tile == 64
    # A non-square engine: the largest square it holds, each tile padded into the engine's 64x128.
    assert trt_backend.TrtBackend(model, gpu, "fp16", shape=(1, 64, 128), **kw).static_tile == 64
    assert trt_backend.TrtBackend(model, gpu, "fp16", dynamic=True, **kw).static_tile is None
    assert trt_backend.TrtBackend(model, gpu, "fp16", **kw).static_tile is None  # no shape: 512 tiles


@pytest.mark.parametrize("option", ["shape", "max_shape"])
def test_a_shape_of_two_numbers_is_one_clear_line(tmp_path, monkeypatch, option):
    """Restorer(backend="tensorrt", shape=(512, 512)) (tile, tile: the batch forgotten) failed with
    'not enough values to unpack (expected 3, got 2)' or an IndexError, naming no option."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(trt_backend.TrtBackend, "_runner", lambda self, shape: "runner")
    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    with pytest.raises(ValueError, match=rf"^{option}=\(512, 512\): expected \(N, H, W\)"):
        trt_backend.TrtBackend(
            model, GPU0, "fp16", onnx=onnx, cache_dir=tmp_path, dynamic=True, **{option: (512, 512)}
        )


def test_dynamic_engine_with_a_small_max_shape_needs_no_tile_shape(tiny_weights, tmp_path, monkeypatch):
    """`qairn export tensorrt W --dynamic --max-shape 1,1024,1024` (or dynamic=True, max_shape=...)
    failed: 'max shape (1, 1024, 1024) is smaller than the tile shape (4, 512, 512)', a tile shape the
    user never gave (the default). The default is now capped at max_shape: tuned for 1,512,512."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    built = []
    monkeypatch.setattr(trt_backend.TrtBackend, "_runner", lambda self, shape: built.append(self.spec(shape)))
    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    trt_backend.TrtBackend(
        model, GPU0, "fp16", onnx=onnx, cache_dir=tmp_path, dynamic=True, max_shape=(1, 1024, 1024)
    )
    assert [(s.min_shape, s.opt_shape, s.max_shape) for s in built] == [
        ((1, 3, 16, 16), (1, 3, 512, 512), (1, 3, 1024, 1024))
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    asked = []

    def backend(model, device, precision, shape=None, **k):
        asked.append(shape)
        raise BackendError("stop here")

    monkeypatch.setattr(trt_backend, "TrtBackend", backend)
    argv = ["tensorrt", str(tiny_weights), "--onnx", str(onnx), "--dynamic", "--max-shape", "1,1024,1024"]
    assert export_main(argv + ["--device", "cuda:0"]) == 2 and asked == [None]


def test_dynamic_engine_runs_batches_larger_than_its_own_in_chunks(tmp_path, monkeypatch):
    """A dynamic engine for batches up to 2 refused a Restorer's batch of 5 tiles (tile_batch=5):
    'outside the dynamic engine's profile: pass max_shape= or use tiles', though tiles were in use.
    A larger batch now runs in engine-sized chunks, as static engines' batches already did."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    calls = []

    class Runner:  # a dynamic engine for 1..2 x 16..512 x 16..512
        profile = [(1, 3, 16, 16), (2, 3, 64, 64), (2, 3, 512, 512)]

        def __call__(self, x):
            calls.append(len(x))
            n, _, h, w = x.shape
            return x + 1, [torch.full((n, 1, h // s, w // s), float(s)) for s in (1, 2, 4)]

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(trt_backend.TrtBackend, "_runner", lambda self, shape: Runner())
    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    b = trt_backend.TrtBackend(
        model, torch.device("cuda", 0), "fp32", onnx=onnx, cache_dir=tmp_path, dynamic=True
    )
    b.device = torch.device("cpu")  # no GPU here: the fake engine runs on the CPU
    x = torch.rand(5, 3, 64, 32)
    y, gammas = b(x)
    assert calls == [2, 2, 1] and torch.equal(y, x + 1)
    assert [g.shape for g in gammas] == [(5, 1, 64, 32), (5, 1, 32, 16), (5, 1, 16, 8)]
    with pytest.raises(BackendError, match="outside the dynamic engine's profile"):
        b(torch.rand(1, 3, 1024, 64))  # larger than max_shape: no chunking helps


def test_cli_overwrite_replaces_engine_and_sidecar_under_the_loaders_lock(
    tiny_weights, tmp_path, monkeypatch
):
    """--overwrite copied the new engine, then its sidecar, over -o without the build lock that a
    loader (a server's TrtBackend(engine=-o), same cache folder) holds while it validates the pair: one
    reading in between saw the new engine beside the old sidecar, failed its sha256 and rebuilt over
    the file. The copy now runs under that lock: a loader waits for the whole pair."""
    import fcntl

    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake = SimpleNamespace(__version__="10.9.0", BuilderFlag=SimpleNamespace(FP16=1))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    old, new, cache = spec(), spec(onnx_sha256="cd" * 32), tmp_path / "cache"
    out = trt_engine.store(tmp_path / "mine.engine", old, b"old engine")

    def built(model, device, precision, engine=None, cache_dir=None, **k):
        path = trt_engine.store(cache_dir / "engines" / "new.engine", new, b"new engine")
        run = SimpleNamespace(runner_for=lambda shape: SimpleNamespace(spec=new, path=path))
        return SimpleNamespace(dynamic=False, run=run, folder=cache_dir / "engines")

    locked = []
    real_store = trt_engine.store

    def store(engine, spec_, data):
        if engine == out:  # is the lock a loader of `out` takes held now? (flock: per open file)
            for lock in (cache / "engines").glob(f".{out.name}.*.lock"):
                with open(lock) as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        fcntl.flock(f, fcntl.LOCK_UN)
                    except BlockingIOError:
                        locked.append(lock)
            assert locked, f"{out} replaced without its build lock"
        return real_store(engine, spec_, data)

    monkeypatch.setattr(trt_backend, "TrtBackend", built)
    monkeypatch.setattr(trt_engine, "store", store)
    onnx = ox.cached_onnx(lively_model(), tmp_path, outputs="maps", precision="fp32")  # tiny_weights' network
    argv = ["tensorrt", str(tiny_weights), "-o", str(out), "--overwrite", "--onnx", str(onnx)]
    assert export_main(argv + ["--shape", "4,512,512", "--device", "cuda:0", "--cache-dir", str(cache)]) == 0
    assert len(locked) == 1 and trt_engine.load_cached(out, new) == (b"new engine", "cached")
    with trt_engine.build_lock(out, cache / "engines"):  # the very lock a loader takes (no wait: free)
        assert [f for f in (cache / "engines").glob(f".{out.name}.*.lock")] == locked


def test_cli_says_when_the_engine_came_from_the_cache(tiny_weights, tmp_path, monkeypatch, capsys):
    """`qairn export tensorrt` printed "wrote <engine>" when it had found a valid engine in the cache
    and written nothing. The second run of the same export now says "reused cached engine"."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    builds = []
    monkeypatch.setattr(trt_engine, "build_engine", lambda *a: builds.append(a) or b"engine")
    monkeypatch.setattr(trt_backend, "TrtRunner", lambda data, device, path: SimpleNamespace(path=path))
    cache = tmp_path / "cache"
    onnx = ox.cached_onnx(lively_model(), cache, outputs="maps", precision="fp32")
    argv = ["tensorrt", str(tiny_weights), "--onnx", str(onnx), "--shape", "1,64,64", "--device", "cuda:0"]
    argv += ["--cache-dir", str(cache)]
    assert export_main(argv) == 0 and len(builds) == 1
    assert capsys.readouterr().out.startswith(f"wrote {cache / 'engines'}")
    assert export_main(argv) == 0 and len(builds) == 1
    assert capsys.readouterr().out.startswith(f"reused cached engine {cache / 'engines'}")


def test_cli_exits_1_when_tensorrt_cannot_load_the_engine_it_built(
    tiny_weights, tmp_path, monkeypatch, capsys
):
    """TensorRT failing to deserialize (or execute) an engine is a runtime failure, as a missed
    verification is: `qairn export tensorrt` exited 2, the code of a usage error."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake = fake_tensorrt(monkeypatch)
    fake.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: None)
    monkeypatch.setattr(trt_engine, "trt_logger", lambda trt: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(trt_engine, "build_engine", lambda *a: b"engine")
    cache = tmp_path / "cache"
    onnx = ox.cached_onnx(lively_model(), cache, outputs="maps", precision="fp32")
    argv = ["tensorrt", str(tiny_weights), "--onnx", str(onnx), "--shape", "1,64,64", "--device", "cuda:0"]
    assert export_main(argv + ["--cache-dir", str(cache)]) == 1
    err = capsys.readouterr().err
    assert "engines/qairn-fp16-" in err and ".engine: TensorRT could not deserialize the engine" in err
    assert issubclass(trt_backend.TrtRuntimeError, BackendError)  # Restorer callers catch it as before


def test_a_users_engine_without_a_sidecar_is_refused_not_rebuilt_over(tmp_path, monkeypatch):
    """Restorer(backend="tensorrt", engine=F) with F built by trtexec (no sidecar): qairn could not
    validate it, so it rebuilt its own engine over the user's file, minutes later and without asking.
    Now it refuses in one line, before the ONNX export, and says how to go on; F is left as it was."""
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(trt_backend, "cached_onnx", lambda *a, **k: pytest.fail("exported first"))
    monkeypatch.setattr(trt_engine, "build_engine", lambda *a: pytest.fail("built over the user's engine"))
    engine = tmp_path / "trtexec.engine"
    engine.write_bytes(b"trtexec's engine")
    with pytest.raises(BackendError) as e:
        trt_backend.TrtBackend(lively_model(), GPU0, "fp16", engine=engine, cache_dir=tmp_path)
    assert str(e.value).splitlines() == [
        f"{engine}: no readable sidecar trtexec.engine.json, so not an engine qairn can validate "
        "(trtexec's?); pass another engine= path for qairn to build there, or replace it: "
        f"qairn export tensorrt WEIGHTS -o {engine} --overwrite"
    ]
    assert engine.read_bytes() == b"trtexec's engine" and not trt_engine.sidecar_path(engine).exists()


def test_an_fp16_onnx_on_tensorrt_10_names_the_strongly_typed_build(
    tiny_weights, tmp_path, monkeypatch, capsys
):
    """`qairn export tensorrt W --onnx fp16.onnx` on TensorRT 10 (FP16 flag: reads the fp32 graph)
    was told only to export again without --fp16; TensorRT 10 builds that very file strongly typed,
    with --strongly-typed, which the message now names too (and which then takes the file)."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    taken = []
    monkeypatch.setattr(trt_backend.TrtBackend, "_runner", lambda self, shape: taken.append(self.typing))
    fp16 = ox.cached_onnx(lively_model(), tmp_path, outputs="maps", precision="fp16")
    argv = [
        "tensorrt",
        str(tiny_weights),
        "--onnx",
        str(fp16),
        "--device",
        "cuda:0",
        "--cache-dir",
        str(tmp_path),
    ]
    assert export_main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qairn export: error: {fp16}: a fp16 graph, but a fp16 (fp16-flag) build reads the fp32 export "
        "(qairn export onnx, without --fp16; or build this one strongly typed: --strongly-typed, "
        "strongly_typed=True)"
    ]
    kw = dict(onnx=fp16, cache_dir=tmp_path, shape=(1, 64, 64), strongly_typed=True)
    trt_backend.TrtBackend(lively_model(), GPU0, "fp16", **kw)
    assert taken == ["strong"]


def trt_restorer_of_a_p2_export(tmp_path, monkeypatch):
    """A p = 2 network, its --maps ONNX export, and the Restorer options that run it on a stand-in
    TensorRT (no engine is built)."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(trt_backend.TrtBackend, "_runner", lambda self, shape: "runner")
    model = lively_model(p=2.0)
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    return (
        model,
        onnx,
        dict(device="cuda:0", backend="tensorrt", precision="fp16", onnx=onnx, cache_dir=tmp_path),
    )


def test_a_restorer_refuses_an_onnx_file_of_another_network(tmp_path, monkeypatch):
    """Restorer(backend="tensorrt", onnx=F) with F exported from a p = 2 network ran F's network but
    pooled its gates with the p = 64 of the shipped weights it loaded (no weights= given): every Q
    silently wrong. The TensorRT backend now reports F's network, as the ONNX Runtime one does, and
    the Restorer refuses the mismatch in one line naming F; F's own weights run."""
    model, onnx, kw = trt_restorer_of_a_p2_export(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match=f"^{onnx} holds another network than the one given .*p 2.0 there"):
        qairn.Restorer(weights=default_weights(), **kw)  # the shipped weights: p = 64
    r = qairn.Restorer(model=model, **kw)
    assert r.p == 2.0 and r.backend.network_config == model.config


def test_cli_refuses_an_onnx_of_another_network_than_its_weights(tiny_weights, tmp_path, monkeypatch, capsys):
    """`qairn export tensorrt W --onnx F` built F's engine whatever network F held: W was loaded and
    then ignored, and nothing said the engine was not W's. Now F's network must be W's."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(trt_backend, "TrtBackend", lambda *a, **k: pytest.fail("built another network"))
    other = ox.cached_onnx(lively_model(p=3.0, seed=3), tmp_path, outputs="maps", precision="fp32")
    argv = ["tensorrt", str(tiny_weights), "--onnx", str(other), "--device", "cuda:0"]
    assert export_main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qairn export: error: --onnx {other} holds another network than {tiny_weights} (its p differ): "
        "give the weights it was exported from"
    ]


def test_a_tensorrt_restorer_without_weights_runs_the_onnx_files_own_network(tmp_path, monkeypatch):
    """Restorer(backend="tensorrt", onnx=F) with neither weights= nor model= loaded the shipped
    weights, then refused F's network as "another network than the one given ... or neither weights=
    nor model= to use its own", which is what the user had done. As with ONNX Runtime, the file's
    own config (and p) now runs; given weights of another network are still refused."""
    model, onnx, kw = trt_restorer_of_a_p2_export(tmp_path, monkeypatch)
    r = qairn.Restorer(**kw)
    assert r.p == 2.0 and r.config == model.config
    with pytest.raises(ValueError, match="holds another network than the one given"):
        qairn.Restorer(model=lively_model(p=3.0), **kw)


def test_a_dynamic_engine_tuned_for_a_square_shape_has_no_static_tile(tmp_path, monkeypatch):
    """dynamic=True with shape=(1, 64, 64) (the shape it is tuned for) runs any tile: tile="auto" must
    not take 64 from it and cut every image into 64-pixel tiles, as it does for a static engine."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(trt_backend.TrtBackend, "_runner", lambda self, shape: "runner")
    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    gpu, kw = torch.device("cuda", 0), dict(onnx=onnx, cache_dir=tmp_path)
    b = trt_backend.TrtBackend(model, gpu, "fp16", dynamic=True, shape=(1, 64, 64), **kw)
    assert b.dynamic and b.static_tile is None


def test_tile_auto_runs_no_image_whole_that_a_dynamic_engine_cannot_take(tmp_path, monkeypatch):
    """tile="auto" ran images of up to a batch of tiles' pixels whole: a 4000x200 picture (0.8 MP)
    went whole to a dynamic engine whose profile stops at 2048x2048, which refused it ("outside the
    dynamic engine's profile ... pass max_shape= or use tiles"). The backend now says its largest
    H, W (max_hw); larger images get tiles, no larger than that."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(trt_backend.TrtBackend, "_runner", lambda self, shape: "runner")
    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    gpu, kw = torch.device("cuda", 0), dict(onnx=onnx, cache_dir=tmp_path)
    assert trt_backend.TrtBackend(model, gpu, "fp16", dynamic=True, **kw).max_hw == (2048, 2048)
    small = trt_backend.TrtBackend(model, gpu, "fp16", dynamic=True, max_shape=(2, 256, 384), **kw)
    assert small.max_hw == (256, 384)
    assert trt_backend.TrtBackend(model, gpu, "fp16", shape=(1, 64, 64), **kw).max_hw is None  # static

    r = qairn.Restorer(model=model, device="cpu")  # tile="auto"; its backend stands in for the engine
    r.backend.max_hw = (2048, 2048)
    assert r.tile_for(200, 1000) is None  # whole, as before
    assert r.tile_for(200, 4000) == 512
    r.backend.max_hw = small.max_hw
    assert r.tile_for(200, 300) is None
    assert r.tile_for(200, 400) == 256  # tiles no larger than the engine runs


@pytest.mark.parametrize("dims", [[1, 3, 64.0, 64], [1, 3, "64", 64], [1, 3, True, 64]])
def test_a_sidecar_whose_shapes_are_not_whole_numbers_is_no_sidecar(tmp_path, dims):
    """A hand-edited sidecar with 64.0, "64" or true in a shape went on to the backend as its shapes;
    such a spec is unreadable, as one with a shape missing is."""
    engine = tmp_path / "mine.engine"
    engine.write_bytes(b"engine")
    good = [1, 3, 64, 64]
    recorded = {"precision": "fp16", "min_shape": good, "opt_shape": dims, "max_shape": good}
    trt_engine.sidecar_path(engine).write_text(json.dumps({"spec": recorded}))
    assert trt_engine.read_spec(engine) is None
    recorded["opt_shape"] = good
    trt_engine.sidecar_path(engine).write_text(json.dumps({"spec": recorded}))
    assert trt_engine.read_spec(engine) == recorded


def test_cli_verifies_a_given_onnx_only_when_asked(tiny_weights, tmp_path, monkeypatch, capsys):
    """`qairn export tensorrt W --onnx F --verify-qf 10` ignored --verify-*: F, exported from other
    weights of W's network, was built as W's engine. Now --verify-* checks F against W before the
    build; without them F is built as it is (it was verified when it was exported)."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    built = []

    class Built(Exception):
        pass

    def backend(*a, **k):
        built.append(k["onnx"])
        raise Built

    monkeypatch.setattr(trt_backend, "TrtBackend", backend)
    other = ox.cached_onnx(lively_model(seed=5), tmp_path, outputs="maps", precision="fp32")
    card = tmp_path / "card.png"
    import cv2

    cv2.imwrite(str(card), ox.synthetic_image(64, 64))
    argv = ["tensorrt", str(tiny_weights), "--onnx", str(other), "--device", "cuda:0"]
    with pytest.raises(Built):
        export_main(argv)
    assert built == [other]
    verify = ["--verify-images", str(card), "--verify-qf", "20"]
    assert export_main([*argv, *verify]) == 1
    assert "verification failed: fp32 ONNX output 'restored' differs" in capsys.readouterr().err
    assert built == [other]
    mine = ox.cached_onnx(lively_model(), tmp_path, outputs="maps", precision="fp32")
    with pytest.raises(Built):
        export_main(["tensorrt", str(tiny_weights), "--onnx", str(mine), "--device", "cuda:0", *verify])
    assert built == [other, mine] and f"on 1 image at QF 20 from {card}: " in capsys.readouterr().out


def test_onnx_files_with_external_weights_of_their_own_get_their_own_engines(tmp_path, monkeypatch):
    """The engine key held the sha256 of the .onnx file alone. Saved with external data (weights in
    model.onnx.data beside it, as onnx does for files past 2 GB), two exports of one network with
    different weights are the same .onnx bytes: both got one key, and the second ran the first's
    cached engine. The key now covers the external data files too (a single file keeps its sha256)."""
    import onnx

    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(trt_backend.TrtBackend, "_runner", lambda self, shape: "runner")
    keys, files = [], []
    for seed in (0, 1):
        one = ox.export_onnx(lively_model(seed=seed), tmp_path / f"one{seed}.onnx", outputs="maps")
        folder = tmp_path / f"w{seed}"
        folder.mkdir()
        proto = onnx.load(str(one))
        onnx.save(
            proto, str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0
        )
        files.append((folder / "m.onnx").read_bytes())
        b = trt_backend.TrtBackend(None, GPU0, "fp16", onnx=folder / "m.onnx", cache_dir=tmp_path)
        keys.append(b.spec((1, 64, 64)).key())
        single = trt_backend.TrtBackend(None, GPU0, "fp16", onnx=one, cache_dir=tmp_path)
        assert single.onnx_sha256 == qcache.sha256_file(one)
    assert files[0] == files[1] and keys[0] != keys[1]
    (tmp_path / "w1" / "m.data").unlink()
    with pytest.raises(ox.ExportError, match=r"m.onnx: its external data file .*m.data is missing"):
        trt_backend.TrtBackend(None, GPU0, "fp16", onnx=tmp_path / "w1" / "m.onnx", cache_dir=tmp_path)


def test_max_shape_help_says_its_default_and_matches_the_profile(capsys):
    """`qairn export tensorrt --help` gave --max-shape as "dynamic: largest input" with no default, so
    a user could not tell which images a dynamic engine takes whole; it now says the profile's own."""
    with pytest.raises(SystemExit):
        export_main(["tensorrt", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: --shape's N, 2048x2048 or --shape's H, W if larger" in help_text
    assert profile_shapes((4, 512, 512), True)[2] == (4, 3, 2048, 2048)
    assert profile_shapes((4, 512, 4096), True)[2] == (4, 3, 2048, 4096)


def test_a_new_engine_file_gets_the_export_clis_default_shape_at_once(tmp_path, monkeypatch):
    """Restorer(backend="tensorrt", engine=F) with no F yet and no shape built F lazily for the first
    call's shape (one 256x384 image whole: a (1,256,384) engine), which the next process took as its
    static tile while 512 tiles went to engines in the cache. F is now built at once for the shape
    `qairn export tensorrt -o F` builds by default, 4,512,512; a static export keeps its own."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    built = []
    monkeypatch.setattr(
        trt_backend.TrtBackend, "_runner", lambda self, shape: built.append(shape) or "runner"
    )
    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    gpu, kw = torch.device("cuda", 0), dict(onnx=onnx, cache_dir=tmp_path)
    b = trt_backend.TrtBackend(model, gpu, "fp16", engine=tmp_path / "new.engine", **kw)
    assert built == [(4, 512, 512)] and b.static_tile == 512
    trt_backend.TrtBackend(model, gpu, "fp16", engine=tmp_path / "new.engine", shape=(1, 64, 64), **kw)
    assert built[-1] == (1, 64, 64)
    trt_backend.TrtBackend(model, gpu, "fp16", **kw)  # no engine= file: built lazily, as before
    assert len(built) == 2


def test_an_engine_path_that_is_a_folder_is_refused_before_the_build(tmp_path, monkeypatch):
    """Restorer(backend="tensorrt", engine="runs") with runs/ a folder exported, built the engine
    (minutes on a GPU) and only then failed to rename it onto the folder; `qairn export tensorrt -o`
    refuses it first. So does the backend now, in one line."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(trt_engine, "build_engine", lambda *a: pytest.fail("built the engine"))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # no GPU here
    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    runs = tmp_path / "runs"
    runs.mkdir()
    says = f"{runs}: is a directory; give the engine's file name, e.g. {runs / 'qairn.engine'}"
    with pytest.raises(BackendError, match=f"^{re.escape(says)}$"):
        trt_backend.TrtBackend(model, GPU0, "fp16", engine=runs, onnx=onnx, cache_dir=tmp_path)
    assert list(runs.iterdir()) == []


def test_an_engine_given_to_run_is_refused_not_rebuilt_over_when_stale(tmp_path, monkeypatch):
    """get_engine(rebuild=False), as `qairn score --backend tensorrt --engine F` runs F: an F built
    for another ONNX (other weights) or TensorRT was rebuilt in place, minutes later, over the user's
    input. It is refused now in one line, in the sidecar check's words, with the command that rebuilds
    it, before any build, and F is left as it was; rebuild=True (the library's default) rebuilds."""
    monkeypatch.setattr(trt_engine, "build_engine", lambda *a: pytest.fail("built over the user's engine"))
    engine = tmp_path / "given.engine"
    trt_engine.store(engine, spec(trt_version="10.3.0", onnx_sha256="cd" * 32), b"theirs")
    sidecar = trt_engine.sidecar_path(engine).read_bytes()
    with pytest.raises(trt_engine.EngineError) as e:
        trt_engine.get_engine(tmp_path / "m.onnx", spec(trt_version="10.9.0"), engine, 1 << 30, rebuild=False)
    assert str(e.value).splitlines() == [
        f"{engine}: built for another onnx_sha256, trt_version; an engine given to run is not rebuilt "
        f"over: rebuild it with qairn export tensorrt WEIGHTS --shape 4,512,512 -o {engine} --overwrite"
    ]
    assert engine.read_bytes() == b"theirs" and trt_engine.sidecar_path(engine).read_bytes() == sidecar
    dynamic = spec(min_shape=(1, 3, 16, 16), max_shape=(4, 3, 2048, 2048), precision="fp32", typing="fp32")
    assert trt_engine.export_command(engine, dynamic.as_json()) == (
        "qairn export tensorrt WEIGHTS --precision fp32 --shape 4,512,512 --dynamic --max-shape 4,2048,2048 "
        f"-o {engine} --overwrite"
    )
    monkeypatch.setattr(trt_engine, "build_engine", lambda *a: b"rebuilt")
    with pytest.warns(UserWarning, match="rebuilding TensorRT engine"):
        assert trt_engine.get_engine(tmp_path / "m.onnx", spec(), engine, 1 << 30) == (b"rebuilt", True)


def test_a_foreign_engine_given_to_run_is_refused_before_the_export(tmp_path, monkeypatch):
    """TrtBackend(engine=F, rebuild=False) with F built by another TensorRT: the sidecar alone says so,
    and F is refused before the ONNX export (seconds) and the build (minutes) that would replace it."""
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)  # TensorRT 10.9 on a "Fake GPU" 9.0
    monkeypatch.setattr(trt_backend, "cached_onnx", lambda *a, **k: pytest.fail("exported first"))
    engine = tmp_path / "old.engine"
    trt_engine.store(engine, spec(gpu_name="Fake GPU", trt_version="10.3.0"), b"theirs")
    with pytest.raises(trt_engine.EngineError) as e:
        trt_backend.TrtBackend(lively_model(), GPU0, "fp16", engine=engine, cache_dir=tmp_path, rebuild=False)
    assert str(e.value).splitlines() == [
        f"{engine}: built for another trt_version; an engine given to run is not rebuilt over: rebuild it "
        f"with qairn export tensorrt WEIGHTS --shape 4,512,512 -o {engine} --overwrite"
    ]
    assert engine.read_bytes() == b"theirs"


def test_an_engine_given_to_run_that_tensorrt_cannot_load_is_refused_not_rebuilt(tmp_path, monkeypatch):
    """rebuild=False: an engine= file that matches its sidecar but which TensorRT cannot deserialize
    was warned of as "rebuilding" and rebuilt over; it is refused in one line, no warning, no build."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    model = lively_model()
    onnx = ox.cached_onnx(model, tmp_path, outputs="maps", precision="fp32")
    real_get_engine = trt_engine.get_engine
    gpus = FakeGpus(monkeypatch)
    monkeypatch.setattr(trt_engine, "get_engine", real_get_engine)
    builds = []
    monkeypatch.setattr(trt_engine, "build_engine", lambda *a: builds.append(a) or b"plan")
    engine = tmp_path / "given.engine"
    options = dict(engine=engine, onnx=onnx, shape=(1, 64, 64), cache_dir=tmp_path)
    trt_backend.TrtBackend(model, GPU0, "fp32", **options)  # built there: the library's engine=
    gpus.unloadable.add(b"plan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(trt_engine.EngineError) as e:
            trt_backend.TrtBackend(model, GPU0, "fp32", **options, rebuild=False)
    assert str(e.value).splitlines() == [
        f"{engine}: TensorRT could not deserialize it; an engine given to run is not rebuilt over: rebuild "
        f"it with qairn export tensorrt WEIGHTS --precision fp32 --shape 1,64,64 -o {engine} --overwrite"
    ]
    assert len(builds) == 1 and engine.read_bytes() == b"plan"


def test_a_strongly_typed_engine_given_to_run_keeps_its_typing(tmp_path, monkeypatch):
    """An engine built with `qairn export tensorrt --strongly-typed -o F`, then run as engine=F with
    rebuild=False (`--engine F`, which passes no typing), was refused as "built for another typing"
    (and with rebuild=True rebuilt as an FP16-flag build over F): its recorded typing is now taken, as
    its shapes are, so it passes the check and the strongly typed build's fp16 graph is exported."""
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)  # TensorRT 10.9 on a "Fake GPU" 9.0
    exported = []

    def reached_export(*args, **kwargs):
        exported.append(kwargs["precision"])
        raise RuntimeError("reached the export")

    monkeypatch.setattr(trt_backend, "cached_onnx", reached_export)
    engine = tmp_path / "strong.engine"
    strong = spec(gpu_name="Fake GPU", trt_version="10.9.0", typing="strong")
    trt_engine.store(engine, strong, b"theirs")
    with pytest.raises(RuntimeError, match="reached the export"):
        trt_backend.TrtBackend(lively_model(), GPU0, "fp16", engine=engine, cache_dir=tmp_path, rebuild=False)
    assert exported == ["fp16"] and engine.read_bytes() == b"theirs"


def test_quiet_tensorrt_export_says_nothing_of_its_engine(tiny_weights, tmp_path, monkeypatch, capsys):
    """-q was refused by `qairn export tensorrt`; it drops the verification figures and the closing
    'wrote ...' / 'reused cached engine ...' line."""
    from qairn.export import onnx_export as ox
    from qairn.export import trt_backend

    fake_tensorrt(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(trt_engine, "build_engine", lambda *a: b"engine")
    monkeypatch.setattr(trt_backend, "TrtRunner", lambda data, device, path: SimpleNamespace(path=path))
    cache = tmp_path / "cache"
    onnx = ox.cached_onnx(lively_model(), cache, outputs="maps", precision="fp32")
    argv = ["tensorrt", str(tiny_weights), "--onnx", str(onnx), "--shape", "1,64,64", "--device", "cuda:0"]
    argv += ["--cache-dir", str(cache), "--verify-crop", "32", "--verify-limit", "1", "--verify-qf", "10"]
    assert export_main([*argv, "-q"]) == 0 and capsys.readouterr() == ("", "")
    assert export_main([*argv, "--quiet"]) == 0 and capsys.readouterr() == ("", "")
    assert export_main(argv) == 0 and "reused cached engine" in capsys.readouterr().out
