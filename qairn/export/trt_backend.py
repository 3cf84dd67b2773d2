"""TensorRT backend: `qairn.Restorer(backend="tensorrt", precision="fp16")`.

No pycuda: torch CUDA tensors are the bindings (set_tensor_address with their data_ptr) and the
engine is enqueued with execute_async_v3 on the current torch stream, so it orders with the torch
work around it and torch's caching allocator owns all memory. Threads: an execution context takes
one call at a time (TensorRT's rule), and a call on another stream than the last waits for that one.

GPUs: an engine and its execution contexts are bound to the GPU that was current when it was built
or deserialized, and TensorRT enqueues on the calling thread's current GPU; so on cuda:N every build,
deserialization and call runs with cuda:N current (whatever GPU the caller has current), its buffers
live on cuda:N, and the engine cache key holds cuda:N's name and compute capability.

Shapes: static engines by default (the fastest), one per tile shape, built lazily on first use (or
at construction for shape=(N,H,W)) and cached on disk; see shapes.py for how calls are fitted to them.
Build your engine for the Restorer's tiles: tile=512, tile_batch=4 -> shape=(4, 512, 512); with
tile="auto" the Restorer takes a static engine's square tile (shape=, or the engine= file's). An image
smaller than the tile arrives whole and runs padded in a larger engine, or gets its own engine.
dynamic=True builds one engine for any batch up to max_shape's (larger ones run in chunks) and any size
16..max_shape (tuned for `shape`, default (4, 512, 512) capped at max_shape; max default 2048x2048).

Teardown: `restorer.backend.close()` (or `with TrtBackend(...)`) frees the engines' GPU memory at once;
dropping the Restorer leaves it to the garbage collector's next full pass (the backend and its shape
runner refer to each other).

Options: engine=PATH (from `qairn export tensorrt`; validated, rebuilt in place if stale or foreign;
one without a readable sidecar, as trtexec writes them, is refused, not rebuilt over, and so is a
folder; a path with no file yet is built there now, for shape= or, as `qairn export tensorrt -o PATH`
builds, 4,512,512), rebuild=True (False: a stale or foreign engine= file is refused, not rebuilt over:
the command line's --engine, a file given to run as it is),
onnx=PATH (a --maps export to build from), cache_dir=DIR, shape=(N,H,W), dynamic=False,
max_shape=(N,H,W), workspace_gb=4, strongly_typed=None (auto: TensorRT >= 11 always).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from qairn.engine.backends import BackendError, Closing
from qairn.export import trt_engine
from qairn.export.cache import cache_dir as resolve_cache_dir
from qairn.export.onnx_export import (
    INPUT,
    MAP_OUTPUTS,
    cached_onnx,
    check_maps_export,
    check_shape,
    load_proto,
    network_sha256,
    read_metadata,
    static_input_shape,
)
from qairn.export.ort_backend import file_config
from qairn.export.shapes import FixedShapeRunner, fits, profile_shapes
from qairn.messages import warn
from qairn.model import QAIRN

INSTALL_HINT = (
    "backend 'tensorrt' needs TensorRT 10+ and a CUDA GPU: pip install tensorrt "
    "(or use backend='onnxruntime' / 'compile')"
)
DEFAULT_SHAPE = (4, 512, 512)  # the Restorer's defaults: tile=512, tile_batch=4


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(f"{INSTALL_HINT} [import tensorrt: {e}]") from None
    return trt


def torch_dtype(trt_dtype) -> torch.dtype:
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
        "UINT8": torch.uint8,
        "INT8": torch.int8,
    }
    return table[trt_dtype.name]


class TrtRuntimeError(BackendError):
    """TensorRT failing on an engine it built or validated (cannot deserialize it, cannot execute it):
    a failure, as a missed verification is, not a problem with the user's input."""


class TrtRunner(Closing):
    """One deserialized engine and its execution context; call with an (N,3,H,W) CUDA tensor. `path`
    (the engine's file) names it in TensorRT's failures: a backend may hold one engine per tile shape."""

    def __init__(self, engine_bytes: bytes, device: torch.device, path: str | Path | None = None):
        trt = import_tensorrt()
        self.device = device
        self.path = path
        self.label = f"{path}: " if path is not None else ""
        self.lock = threading.Lock()  # one call in the execution context at a time (see _execute)
        self.last_stream = None  # the stream of the last execution
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(trt_engine.trt_logger(trt))
            self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
            if self.engine is None:
                raise TrtRuntimeError(
                    f"{self.label}TensorRT could not deserialize the engine (see the TensorRT log)"
                )
            self.context = self.engine.create_execution_context()
        # What TensorRT allocates on the GPU itself, which torch's allocator statistics never see: the
        # context's activation memory (device_memory_size_v2 from TensorRT 10.1, device_memory_size
        # before) and the engine's weights and kernels, about the serialized engine's size.
        activations = getattr(self.engine, "device_memory_size_v2", None)
        activations = self.engine.device_memory_size if activations is None else activations
        self.own_memory_bytes = int(activations) + len(engine_bytes)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = {n: self.engine.get_tensor_mode(n) for n in names}
        self.inputs = [n for n in names if mode[n] == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if mode[n] == trt.TensorIOMode.OUTPUT]
        if self.inputs != [INPUT] or sorted(self.outputs) != sorted(MAP_OUTPUTS):
            raise BackendError(
                f"engine has inputs {self.inputs} and outputs {self.outputs}; the Restorer needs "
                f"{INPUT!r} -> {list(MAP_OUTPUTS)} (export with --maps)"
            )
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = [tuple(s) for s in self.engine.get_tensor_profile_shape(INPUT, 0)]

    def __call__(self, x: torch.Tensor):
        if self.context is None:
            raise BackendError("this TensorRT engine was closed")
        # With the engine's GPU current: an execution context is bound to the GPU its engine was
        # deserialized on, and TensorRT enqueues on (and allocates for) the calling thread's current
        # device, which is cuda:0 in a process that runs this Restorer on cuda:1.
        with torch.cuda.device(self.device):
            return self._execute(x)

    def close(self) -> None:
        """Free the context's and the engine's GPU memory now, not whenever the garbage collector
        gets to them (TensorRT frees an object when its last reference goes). Waits for the work
        already queued on the GPU, which still uses the context's memory. Closing twice is harmless."""
        if self.context is None:
            return
        with self.lock, torch.cuda.device(self.device):  # not while a call is enqueueing
            torch.cuda.synchronize(self.device)
            # The context before its engine, the engine before its runtime.
            self.context = None
            self.engine = None
            self.runtime = None

    def _execute(self, x: torch.Tensor):
        x = x.to(self.device, self.dtypes[INPUT]).contiguous()
        # One call at a time: the input shape and tensor addresses are the context's own state (a
        # second thread's, set before this one's execute, made it read that thread's input), and
        # TensorRT allows no two threads in one context's API at once.
        with self.lock:
            out = self._enqueue(self.context, x)
        y, *gammas = (out[n].float() for n in MAP_OUTPUTS)
        return y, gammas

    def _enqueue(self, ctx, x: torch.Tensor) -> dict:
        if not ctx.set_input_shape(INPUT, tuple(x.shape)):
            raise BackendError(f"input shape {tuple(x.shape)} is outside the engine's profile {self.profile}")
        ctx.set_tensor_address(INPUT, x.data_ptr())
        out = {}
        for name in self.outputs:
            out[name] = torch.empty(
                tuple(ctx.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device
            )
            ctx.set_tensor_address(name, out[name].data_ptr())
        # The current torch stream: TensorRT's kernels queue behind the torch ops that made `x`, and
        # torch's allocator (stream-ordered) will not reuse `x` or the outputs before they finish. A
        # stream other than the last call's first waits for it: the context's activation memory is
        # one, and the last run may still be using it there.
        stream = torch.cuda.current_stream(self.device)
        if self.last_stream is not None and self.last_stream != stream:
            stream.wait_stream(self.last_stream)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise TrtRuntimeError(
                f"{self.label}TensorRT failed to execute the engine on input {tuple(x.shape)} "
                "(see the TensorRT log)"
            )
        self.last_stream = stream
        return out


class TrtBackend(Closing):
    fixed_tile = True
    closed = False
    max_hw = None  # a dynamic engine's largest H, W: what tile="auto" may run whole

    def __init__(
        self,
        model: QAIRN,
        device: torch.device,
        precision: str = "fp16",
        engine: str | Path | None = None,
        onnx: str | Path | None = None,
        cache_dir: str | Path | None = None,
        shape=None,
        dynamic: bool = False,
        max_shape=None,
        workspace_gb: float = 4.0,
        strongly_typed: bool | None = None,
        rebuild: bool = True,
    ):
        trt = import_tensorrt()
        if device.type != "cuda":
            raise BackendError(f"backend 'tensorrt' runs on CUDA devices, not {device}")
        # Checked before the export: inf raised OverflowError at int(), and 0 or -1 reached the builder.
        if not 0 < float(workspace_gb) < float("inf"):
            raise BackendError(f"workspace_gb must be a positive number of GiB, not {workspace_gb!r}")
        # Checked first: the shapes are read below (and a bad max_shape failed only at the first build).
        shape = check_shape(shape, "shape") if shape is not None else None
        max_shape = check_shape(max_shape, "max_shape") if max_shape is not None else None
        if device.index is None:
            # A bare "cuda" is the GPU current now, kept: engines are built for, deserialized on and
            # run on one GPU, whichever is current at a later call (another thread's).
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.precision = device, precision
        self.engine_file = Path(engine) if engine is not None else None
        recorded = trt_engine.read_spec(self.engine_file) if self.engine_file is not None else None
        if strongly_typed is None and recorded is not None and recorded.get("typing") == "strong":
            # The user's engine says how it was built, as it says its shapes (below): a strongly typed
            # one was rebuilt as an FP16-flag build, or with rebuild=False refused as "another typing".
            strongly_typed = True
        self.typing = trt_engine.build_typing(
            precision, trt.__version__, hasattr(trt.BuilderFlag, "FP16"), strongly_typed
        )
        want = trt_engine.onnx_precision(self.typing)
        if self.engine_file is not None and self.engine_file.is_file() and recorded is None:
            # Not an engine qairn built (trtexec's), or one whose sidecar was lost: nothing says what it
            # was built for, and the user's file is not ours to rebuild over. Refused before the export.
            # (rebuild=False, the command line's --engine: a new path is no way on there, it is refused.)
            build = f"qairn export tensorrt WEIGHTS -o {self.engine_file} --overwrite"
            how = (
                f"pass another engine= path for qairn to build there, or replace it: {build}"
                if rebuild
                else f"an engine given to run needs one: replace it with {build}"
            )
            raise BackendError(
                f"{self.engine_file}: no readable sidecar {trt_engine.sidecar_path(self.engine_file).name}, "
                f"so not an engine qairn can validate (trtexec's?); {how}"
            )
        if self.engine_file is not None and self.engine_file.is_dir():
            # A new engine is written there only after its build (minutes), which then failed to rename
            # it onto the folder: refused now, as `qairn export tensorrt -o` refuses it.
            raise BackendError(
                f"{self.engine_file}: is a directory; give the engine's file name, e.g. "
                f"{self.engine_file / 'qairn.engine'}"
            )
        self.trt_version = trt.__version__
        self.gpu_name, self.capability = trt_engine.gpu_identity(device)
        self.rebuild = rebuild
        if recorded is not None:
            # The user's engine says what it was built as: a precision that differs is refused rather
            # than rebuilt over their file (before the export: the sidecar alone says so).
            if recorded.get("precision") not in (None, precision):
                raise BackendError(
                    f"{self.engine_file}: a {recorded['precision']} engine; asked for {precision} "
                    "(pass the matching precision, or another engine file)"
                )
            # So is one for another GPU, TensorRT or build code with rebuild=False; one of another ONNX
            # is known only once it is exported, and get_engine refuses it then, before the build.
            known = dict(
                gpu_name=self.gpu_name,
                compute_capability=self.capability,
                trt_version=self.trt_version,
                typing=self.typing,
                build_version=trt_engine.BUILD_VERSION,
            )
            foreign = trt_engine.changed_fields(recorded, known)
            if foreign and not rebuild:
                why = f"{self.engine_file}: built for another {', '.join(foreign)}"
                raise trt_engine.not_rebuilt(self.engine_file, why, recorded | known)
        if onnx is None:
            onnx = cached_onnx(model, cache_dir, outputs="maps", precision=want)
        # One parse serves every check below: a large export takes seconds to load.
        proto = load_proto(onnx)
        metadata = read_metadata(proto)
        check_maps_export(onnx, metadata)
        if metadata.get("qairn.precision") != want:
            # A strongly typed fp16 build reads the fp16 graph, every other build the fp32 one: the
            # engine's label must say what it was built from.
            how = "qairn export onnx --fp16" if want == "fp16" else "qairn export onnx, without --fp16"
            if precision == "fp16" and want == "fp32":  # TensorRT 10 builds the fp16 graph strongly typed
                how += "; or build this one strongly typed: --strongly-typed, strongly_typed=True"
            raise BackendError(
                f"{onnx}: a {metadata.get('qairn.precision')} graph, but a {precision} "
                f"({self.typing}) build reads the {want} export ({how})"
            )
        self.onnx = Path(onnx)
        # The network the engine runs is the file's: the Restorer refuses weights of another one, whose
        # p would pool its gates (onnx= a p = 2 export beside the shipped p = 64 weights).
        self.path, self.network_config = self.onnx, file_config(self.onnx, metadata)
        self.onnx_sha256 = network_sha256(self.onnx, proto)  # with its external weights, if any
        self.folder = resolve_cache_dir(cache_dir) / "engines"
        self.workspace = int(workspace_gb * (1 << 30))
        self.engine_file_used = False
        if recorded is not None:
            # The user's engine says what it was built as: its shapes are taken.
            if shape is None:
                shape = tuple(recorded["opt_shape"][i] for i in (0, 2, 3))
            if recorded["min_shape"] != recorded["max_shape"] and not dynamic:
                dynamic = True
                max_shape = max_shape or tuple(recorded["max_shape"][i] for i in (0, 2, 3))
        # A --static export builds engines of its own shape only (any other profile fails deep in the
        # TensorRT build): take that shape, and refuse others here in one line.
        self.static_onnx = static_input_shape(self.onnx, proto)
        if self.static_onnx is not None:
            if dynamic:
                raise BackendError(
                    f"{self.onnx}: a static export for N,H,W = {self.static_onnx}: dynamic engines need "
                    "an export without --static"
                )
            shape = shape if shape is not None else self.static_onnx
        if self.engine_file is not None and recorded is None and shape is None and not dynamic:
            # A new engine= file is built now for the shape `qairn export tensorrt -o F` builds: else it
            # held whatever the first call had (one small image whole, say), which the next process then
            # took as its static tile, while the Restorer's 512 tiles went to engines in the cache.
            shape = DEFAULT_SHAPE
        # What tile="auto" takes: the static engine's own tile, asked for or recorded beside the user's
        # engine; for a non-square one the largest square it holds, each tile padded into its shape.
        # Else the Restorer cuts 512 tiles, which fit no engine but a new one (none, for a --static file).
        self.static_tile = int(min(shape[1:])) if shape is not None and not dynamic else None
        self.dynamic, self.max_shape = dynamic, max_shape
        if dynamic:
            self.fixed_tile = False
            if shape is None:  # tuned for the Restorer's default tiles, within max_shape
                shape = DEFAULT_SHAPE if max_shape is None else tuple(map(min, DEFAULT_SHAPE, max_shape))
            shape = check_shape(shape)
            self.max_hw = tuple(profile_shapes(shape, True, max_shape)[2][2:])
            self.run = self._runner(shape)
        else:
            self.run = FixedShapeRunner(self._runner, check_shape(shape) if shape is not None else None)

    def spec(self, shape) -> trt_engine.EngineSpec:
        if self.static_onnx is not None and tuple(shape) != self.static_onnx:
            raise BackendError(
                f"{self.onnx} is static for N,H,W = {self.static_onnx} and cannot run {tuple(shape)}: "
                "export with dynamic shapes or with the Restorer's tile size"
            )
        lo, opt, hi = profile_shapes(shape, self.dynamic, self.max_shape)
        return trt_engine.EngineSpec(
            self.onnx_sha256,
            self.gpu_name,
            self.capability,
            self.trt_version,
            lo,
            opt,
            hi,
            self.precision,
            self.typing,
        )

    def _runner(self, shape) -> TrtRunner:
        spec = self.spec(shape)
        path, rebuild = trt_engine.engine_path(self.folder, spec), True
        if self.engine_file is not None and not self.engine_file_used:
            recorded = trt_engine.read_spec(self.engine_file)
            if recorded is None or recorded["opt_shape"] == list(spec.opt_shape):
                # The user's engine file is for this shape (or new): validate it, rebuild it there if stale.
                path, self.engine_file_used, rebuild = self.engine_file, True, self.rebuild
        with torch.cuda.device(self.device):  # TensorRT builds for the current CUDA device
            data, built = trt_engine.get_engine(
                self.onnx, spec, path, self.workspace, self.folder, rebuild=rebuild
            )
        try:
            runner = TrtRunner(data, self.device, path)
        except TrtRuntimeError as e:
            if built:  # built just now and still refused: TensorRT's own failure, not a stale file
                raise
            if not rebuild:  # a file given to run as it is: said here, not warned of as being rebuilt
                why = f"{path}: TensorRT could not deserialize it"
                raise trt_engine.not_rebuilt(path, why, spec.as_json()) from None
            # Bytes that match their sidecar yet this TensorRT cannot load (a cache shared with another
            # build of the same version string): else every start failed until the file was deleted.
            warn(f"rebuilding TensorRT engine: {e}")
            with torch.cuda.device(self.device):
                data, built = trt_engine.get_engine(
                    self.onnx, spec, path, self.workspace, self.folder, unusable=data, rebuild=rebuild
                )
            runner = TrtRunner(data, self.device, path)
        runner.spec, runner.built = spec, built
        return runner

    def close(self) -> None:
        """Free every engine's GPU memory now (see TrtRunner.close); the backend runs no more calls.
        Without it the memory stays until the garbage collector's next full pass: a static-shape
        backend and its runners refer to each other, so dropping the last reference frees nothing."""
        self.closed = True
        for runner in self.runners():
            runner.close()

    def runners(self) -> list[TrtRunner]:
        """The engines built so far: one for a dynamic backend, one per tile shape for a static one."""
        return [self.run] if self.dynamic else list(self.run.runners.values())

    def own_memory_bytes(self) -> int:
        """GPU memory TensorRT holds for these engines outside torch's allocator (see TrtRunner), so
        missing from torch.cuda.max_memory_reserved: add it for the backend's real footprint."""
        return sum(r.own_memory_bytes for r in self.runners())

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor):
        if self.closed:  # else a new tile shape would build (and keep) a new engine
            raise BackendError("this TensorRT backend was closed")
        x = x.to(self.device, torch.float32)
        if not self.dynamic:
            return self.run(x)
        # A batch larger than the engine's (tile_batch above max_shape's N) runs in engine-sized chunks.
        n, most = x.shape[0], self.run.profile[2][0]
        if not fits((min(n, most), *x.shape[1:]), self.run.profile):
            raise BackendError(
                f"input {tuple(x.shape)} is outside the dynamic engine's profile {self.run.profile}: "
                "pass max_shape= or use tiles"
            )
        if n <= most:
            return self.run(x)
        outs = [self.run(x[b : b + most]) for b in range(0, n, most)]
        return torch.cat([y for y, _ in outs]), [torch.cat(g) for g in zip(*(gs for _, gs in outs))]


def make_backend(model: QAIRN, device: torch.device, precision: str = "fp32", **options) -> TrtBackend:
    return TrtBackend(model, device, precision, **options)
