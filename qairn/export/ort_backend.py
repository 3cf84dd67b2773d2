"""ONNX Runtime backend: `qairn.Restorer(backend="onnxruntime")`.

Runs the exported model (the in-memory model is exported once per weights into the cache folder, or
the file given as onnx=) with the CPU provider, or CUDA/TensorRT providers when the installed
onnxruntime has them and the engine device is CUDA. Tiling, padding and pooling stay in the Restorer,
so results match the eager backend (to 1e-4 in fp32). Inputs go through host numpy arrays: simple and
provider-agnostic; a CUDA deployment that wants zero-copy should use backend="tensorrt".

Options: onnx=PATH (an export with --maps outputs; without weights= or model=, the Restorer takes the
network's config, p included, from its metadata, and weights of another network are refused),
cache_dir=DIR, threads=N (intra-op threads; None or 0: ONNX Runtime's default, one per physical core;
a negative or fractional count is refused: ONNX Runtime takes a negative one as its default),
providers=[...] (ONNX Runtime provider names, or (name, options) pairs). precision="fp32" or "fp16"
picks the cached export (the fp16 one has fp32 islands; fp32 image I/O either way); with onnx= the
file's own precision runs, and another one asked for explicitly is refused.

GPU: the CUDA and TensorRT providers run on the engine's device. ONNX Runtime picks its GPU by the
provider option device_id (default 0), not by torch's current device, so a Restorer on cuda:N gives
both providers device_id=N, in providers= as well unless that entry sets its own device_id. A session
that was asked for a GPU provider but runs on the CPU alone (an onnxruntime without the provider, or
one whose CUDA libraries failed to load) is refused, as is a CUDA device with a CPU-only onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qairn.engine.backends import BackendError, Closing
from qairn.export.onnx_export import (
    INPUT,
    MAP_OUTPUTS,
    NP_DTYPES,
    cached_onnx,
    check_maps_export,
    read_metadata,
    static_shape,
)
from qairn.export.shapes import FixedShapeRunner
from qairn.messages import warn
from qairn.model import QAIRN, QAIRNConfig

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def default_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = [*GPU_PROVIDERS, "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    return [p for p in wanted if p in available]


def gpu_index(device: torch.device) -> int | None:
    """The CUDA ordinal of `device` (a bare "cuda": the current one), None off CUDA or without torch CUDA."""
    if device.type != "cuda":
        return None
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def check_names(providers) -> list:
    """providers= as a list, its names checked. A bare "CUDAExecutionProvider" was taken letter by
    letter, and a misspelt name ("cuda"): ONNX Runtime prints an "EP Error", drops them and runs on
    the CPU, which nothing after can tell from a CPU provider asked for. One (name, options) pair is a
    list of one too (it ended in a bare KeyError: 0)."""
    import onnxruntime as ort

    one_pair = isinstance(providers, tuple) and len(providers) == 2 and isinstance(providers[1], dict)
    providers = [providers] if isinstance(providers, str) or one_pair else list(providers)
    known = set(ort.get_all_providers()) | set(ort.get_available_providers())
    for entry in providers:
        pair = isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], dict)
        if not (isinstance(entry, str) or pair and isinstance(entry[0], str)):
            raise BackendError(
                f"providers= entry {entry!r}: expected a provider name or a (name, options dict) pair"
            )
        name = entry if isinstance(entry, str) else entry[0]
        if name not in known:
            raise BackendError(
                f"unknown ONNX Runtime provider {name!r} in providers=: use names such as "
                "CUDAExecutionProvider, TensorrtExecutionProvider or CPUExecutionProvider"
            )
    return providers


def on_device(providers, device: torch.device) -> list:
    """providers (names or (name, options) pairs; None: default_providers) with device_id set on the
    GPU ones to the engine's GPU: without it, ONNX Runtime runs them on GPU 0 whatever the Restorer's
    device. An entry that names its own device_id keeps it."""
    if providers is None:
        providers = default_providers(device)
        if device.type == "cuda" and not any(p in GPU_PROVIDERS for p in providers):
            import onnxruntime as ort

            raise BackendError(
                f"backend 'onnxruntime' on {device}: this onnxruntime has no CUDA or TensorRT provider "
                f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu, "
                "or pass device='cpu'"
            )
    index = gpu_index(device)
    out = []
    for entry in providers:
        name, options = (entry, {}) if isinstance(entry, str) else entry
        if name in GPU_PROVIDERS and index is not None:
            options = {"device_id": index, **options}
        out.append((name, dict(options)) if options else name)
    return out


def file_config(path: str | Path, metadata: dict | None = None) -> QAIRNConfig | None:
    """The config of the network an export holds (its qairn.config metadata, read from the file unless
    given), None where it has none."""
    text = (metadata if metadata is not None else read_metadata(path)).get("qairn.config")
    if text is None:
        return None
    try:
        return QAIRNConfig.from_json(text)
    except (ValueError, TypeError, KeyError) as e:
        raise BackendError(f"{path}: unreadable qairn.config metadata ({e})") from None


def check_providers(asked, running: list[str], device: torch.device) -> None:
    """Refuse a session that was asked for a GPU provider but runs without any. ONNX Runtime drops a
    provider it does not have with a warning, and one that fails to load (CUDA or cuDNN libraries
    missing) with a logged error and a retry on the CPU: the session then runs on the CPU while the
    caller believes it is on the GPU. A GPU provider missing beside one that runs is only warned of."""
    asked = [a if isinstance(a, str) else a[0] for a in asked]
    gpu_asked = [a for a in asked if a in GPU_PROVIDERS]
    gpu_running = [r for r in running if r in GPU_PROVIDERS]
    if gpu_asked and not gpu_running:
        instead = "pass device='cpu'" if device.type == "cuda" else "leave the GPU providers out"
        raise BackendError(
            f"backend 'onnxruntime' on {device}: ONNX Runtime was asked for {', '.join(gpu_asked)} but "
            f"runs on {', '.join(running)} only (provider missing or failed to load: see ONNX Runtime's "
            f"log above); install onnxruntime-gpu with the CUDA libraries it needs, or {instead}"
        )
    dropped = [a for a in gpu_asked if a not in running]
    if dropped:
        warn(f"ONNX Runtime runs on {', '.join(running)}: {', '.join(dropped)} missing or failed to load")


_FP16_CPU_WARNED = False


def warn_fp16_on_cpu() -> None:
    """Once per process: an fp16 export on the CPU provider buys no speed. The provider has no fp16
    kernels for this graph's layers and runs them in fp32 between inserted Casts (measured: the shipped
    weights, 256x256, 1 thread, 0.28 s a restore against 0.27 s for the fp32 export)."""
    global _FP16_CPU_WARNED
    if _FP16_CPU_WARNED:
        return
    _FP16_CPU_WARNED = True
    warn(
        "backend 'onnxruntime' fp16 on the CPU provider: its layers run in fp32 between casts, at fp32 "
        "speed or slower and with fp16 rounding; use precision='fp32' on the CPU"
    )


def check_threads(threads) -> None:
    """None, 0 (both ONNX Runtime's default) or a positive int, as the CLIs' --threads. ONNX Runtime
    runs any negative count with its default pool, so threads=-1 looked like a setting that worked;
    int() cut 1.5 to 1 and took True as 1."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
        raise BackendError(
            f"threads={threads!r}: expected 0 (ONNX Runtime's default) or a positive number of threads"
        )


class OrtBackend(Closing):
    fixed_tile = False

    def __init__(
        self,
        model: QAIRN | None,  # None with onnx=: the file's network runs
        device: torch.device,
        precision: str = "fp32",
        onnx: str | Path | None = None,
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        providers=None,
    ):
        import onnxruntime as ort

        if precision not in ("fp32", "fp16"):
            raise BackendError(f"backend 'onnxruntime' runs fp32 or fp16 exports, not {precision!r}")
        check_threads(threads)
        self.device = device
        providers = on_device(check_names(providers) if providers is not None else None, device)
        self.path = (
            Path(onnx)
            if onnx is not None
            else cached_onnx(model, cache_dir, outputs="maps", precision=precision)
        )
        metadata = read_metadata(self.path)  # one parse of the file for both
        # What runs is the file's precision, whatever was asked: the Restorer reports it, and refuses a
        # precision asked for explicitly that the file does not hold.
        self.precision = metadata.get("qairn.precision", precision)
        check_maps_export(self.path, metadata)
        # The Restorer pools quality with this network's p (and refuses weights of another network).
        self.network_config = file_config(self.path, metadata)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        check_providers(providers, self.session.get_providers(), device)
        if self.precision == "fp16" and not any(p in GPU_PROVIDERS for p in self.session.get_providers()):
            warn_fp16_on_cpu()
        self.in_dtype = NP_DTYPES[self.session.get_inputs()[0].type]
        self.static = static_shape(self.session)
        # tile="auto" takes a static file's own tile: its 512 fits no other export's shape. A non-square
        # file's is the largest square it holds; each tile is padded into the file's shape (shapes.py).
        self.static_tile = min(self.static[1:]) if self.static is not None else None
        self.run = self._run
        if self.static is not None:
            # A static file runs one shape only: fit calls into it (shapes.py), or say why not.
            self.fixed_tile = True
            self.run = FixedShapeRunner(self._static_runner, self.static)

    def _static_runner(self, shape):
        if shape != self.static:
            raise BackendError(
                f"{self.path} is static for N,H,W = {self.static} and cannot run {shape}: "
                "export with dynamic shapes or with the Restorer's tile size"
            )
        return self._run

    def close(self) -> None:
        """Free the session (its GPU memory with the CUDA provider) now, not when the garbage collector
        gets to it: a static file's runner refers back to this backend, so dropping the last reference
        frees nothing. Closing twice is harmless; calls after it are refused."""
        self.session = None

    def _run(self, x: torch.Tensor):
        if self.session is None:
            raise BackendError(f"this ONNX Runtime session ({self.path}) was closed")
        feed = {INPUT: x.detach().to("cpu").numpy().astype(self.in_dtype, copy=False)}
        outs = self.session.run(list(MAP_OUTPUTS), feed)
        y, *gammas = (torch.from_numpy(np.asarray(o, dtype=np.float32)).to(self.device) for o in outs)
        return y, gammas

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor):
        return self.run(x.float().contiguous())


def require_onnxruntime() -> None:
    """A BackendError saying what to install where onnxruntime is not (the command lines ask first)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BackendError("backend 'onnxruntime' needs ONNX Runtime: pip install 'qairn[export]'") from None


def make_backend(model: QAIRN, device: torch.device, precision: str = "fp32", **options) -> OrtBackend:
    require_onnxruntime()
    return OrtBackend(model, device, precision, **options)
