"""`qairn bench`: how fast each backend restores, how close it stays to eager fp32, and how far it is
from what the device can physically do.

Each case is one (backend, image size, tile size): warm-up excluded, CUDA-event timing (host clock on
CPU), median of repeats, peak device memory reserved in one more call after them, megapixels and
frames per second, speedup over eager fp32, and the PSNR of the output against the eager fp32
output (a fast backend that changes the picture is wrong, not faster). The model's FLOPs per
megapixel over the device's measured peak matmul rate give a compute floor; every timing is also
shown as a fraction of it. `--ensemble N` times N passes per image (Restorer(ensemble=N)) in every
backend, eager fp32 included: the FLOPs and the floor are N passes', PSNR and speedup are against
eager fp32 with the same ensemble.
`--video N` streams N frames through one Restorer instead (steady-state throughput, pinned memory
and overlapped copies on CUDA). `--env` prints the device and versions only.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qairn.engine.backends import BackendError
from qairn.engine.cli import ensemble_arg
from qairn.engine.imageio import (
    check_distinct,
    check_figure,
    check_writable,
    path_arg,
    save_figure,
    write_atomic,
)
from qairn.engine.progress import add_quiet
from qairn.engine.restorer import DEFAULT_WEIGHTS, Restorer, check_tiling, default_overlap, resolve_device
from qairn.engine.tiling import plan_tiles
from qairn.model import PRESETS, QAIRN
from qairn.weights_io import WeightsError, load_model

# label -> (backend, precision, backend options). eager-fp32 (NCHW) is the baseline of every table.
SPECS = {
    "eager-fp32": ("eager", "fp32", {"channels_last": False}),
    "eager-fp16-cl": ("eager", "fp16", {"channels_last": True}),
    "eager-bf16-cl": ("eager", "bf16", {"channels_last": True}),
    "compile-fp32": ("compile", "fp32", {}),
    "compile-fp16": ("compile", "fp16", {}),
    "triton-fp16": ("triton", "fp16", {}),
    "compile-triton-fp16": ("compile", "fp16", {"triton": True}),
    "compile-triton-fp16-b4": ("compile", "fp16", {"triton": True, "tile_batch": 4}),
    # + the fused conv kernels for the thin layers (qairn/kernels/fuse.py)
    "triton-conv-fp16": ("triton", "fp16", {"fused_conv": True}),
    "compile-tconv-fp16": ("compile", "fp16", {"triton": True, "fused_conv": True}),
    "compile-tconv-fp16-b4": ("compile", "fp16", {"triton": True, "fused_conv": True, "tile_batch": 4}),
    # Each frame size's whole tiled restore in one CUDA graph (Restorer(cuda_graph=True)): no host work
    # per tile. Without torch.compile: eager kernels, the Triton gate (and the fused convs).
    "graph-triton-fp16": ("triton", "fp16", {"cuda_graph": True}),
    "graph-tconv-fp16": ("triton", "fp16", {"cuda_graph": True, "fused_conv": True}),
    # torch.compile's kernels (its per-batch graphs off) inside the frame graph, 4 tiles a batch
    "graph-compile-triton-fp16": ("compile", "fp16", {"triton": True, "cuda_graph": True, "tile_batch": 4}),
    "tensorrt-fp16": ("tensorrt", "fp16", {}),
    "onnxruntime-fp32": ("onnxruntime", "fp32", {}),
}
BASELINE = "eager-fp32"
CUDA_ONLY = ("triton", "tensorrt")  # backend names (or options) that need a CUDA device
# Engines with device memory of their own (ONNX Runtime's arena, TensorRT's activations and workspace),
# which torch's allocator statistics do not see: their peak is only the inputs and outputs torch holds.
OWN_MEMORY = ("onnxruntime", "tensorrt")
PARTIAL_MEMORY = "torch allocator only"  # the peak_mem_scope of those: a lower bound


# TensorRT reports its own share (TrtBackend.own_memory_bytes: context activations + engine), which
# is added to torch's peak: then the figure is the whole footprint and can decide the 8K target.
ENGINE_MEMORY = "torch allocator + TensorRT's own"


def memory_scope(label: str) -> str:
    return PARTIAL_MEMORY if SPECS[label][0] in OWN_MEMORY else "torch allocator"


def peak_with_engine(restorer, label: str, peak_mib: float) -> tuple[float, str]:
    """torch's peak plus the memory an engine reports holding outside torch's allocator, and the
    scope of the sum; a backend that cannot say stays a lower bound (PARTIAL_MEMORY)."""
    own = getattr(getattr(restorer, "backend", None), "own_memory_bytes", None)
    if callable(own):
        return peak_mib + own() / 2**20, ENGINE_MEMORY
    return peak_mib, memory_scope(label)


def peak_call(fn, device: torch.device) -> tuple:
    """fn() once more after emptying the cache and resetting the peaks (warm-up excluded): its output
    and the peak MiB reserved and allocated. Reserved is what counts: a CUDA-graph replay allocates
    nothing, its working memory sits in the graph's private pool, which only the reserved count sees
    (the allocated peak would show just inputs, outputs and weights). The callers drop the Restorer's
    graphs of earlier cases first (Restorer.drop_caches): each peak is its own case's alone."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return (
        out,
        torch.cuda.max_memory_reserved(device) / 2**20,
        torch.cuda.max_memory_allocated(device) / 2**20,
    )


DEFAULTS = {
    "cuda": {
        "backends": [
            "eager-fp32",  # most wanted first: a --budget-s run cut short keeps these
            "eager-fp16-cl",
            "compile-triton-fp16",
            "graph-triton-fp16",  # the whole frame in one CUDA graph: is the host the bottleneck?
            "graph-tconv-fp16",
            "graph-compile-triton-fp16",
            "compile-tconv-fp16",  # + the fused thin-conv kernels
            "triton-conv-fp16",  # the same kernels without torch.compile and CUDA graphs
            "compile-tconv-fp16-b4",  # 4 tiles per graph replay (last batch padded)
            "compile-triton-fp16-b4",
            "triton-fp16",
            "compile-fp16",
            "eager-bf16-cl",
            "tensorrt-fp16",
            "onnxruntime-fp32",
        ],
        "sizes": [(1920, 1080), (3840, 2160), (7680, 4320)],
        "tiles": [512],
        "warmup": 3,
        "repeats": 10,
        "case_budget_s": 20.0,
    },
    "cpu": {  # this is 2 busy cores here: keep the defaults small
        "backends": ["eager-fp32", "eager-bf16-cl", "onnxruntime-fp32"],  # compile-fp32: minutes to build
        "sizes": [(256, 256), (512, 512)],
        "tiles": [512],
        "warmup": 2,
        "repeats": 3,
        "case_budget_s": 30.0,
    },
}
FBCNN_GFLOP_PER_MP = 1420 / (512 * 512 / 1e6)  # ../shared/DESIGN.md section 5: 1420 GFLOPs per 512x512 frame


# ---- the model and its arithmetic ------------------------------------------------------------------
def bench_model(weights: str | None = None, preset: str | None = None) -> tuple[QAIRN, str]:
    """The model to time: --weights, else the shipped weights, else a random-initialised preset."""
    if weights is None and preset is None and DEFAULT_WEIGHTS.is_file():
        weights = str(DEFAULT_WEIGHTS)
    if weights is not None:
        model = load_model(weights)
        return model, f"weights {Path(weights).name} (preset {model.config.preset})"
    name = preset or "small"
    torch.manual_seed(0)
    model = QAIRN(PRESETS[name]).eval()
    # The zero-initialised layers (tail, gate logits) would make the output the input and every gamma
    # 0.5, so precision errors could not show: give them ordinary random weights too.
    for m in [model.tail, model.rqa1.out, model.rqa2.out, model.rqa3.out]:
        m.reset_parameters()
    why = "" if preset else f" (no shipped weights at {DEFAULT_WEIGHTS})"
    return model, f"preset {name}, random init{why}"


def conv_layers(model: QAIRN, height: int = 512, width: int = 512, batch: int = 1) -> list[dict]:
    """Every Conv2d / ConvTranspose2d call of one forward pass: name, module, input shape and FLOPs
    (2 per multiply-accumulate, bias not counted, as torch.utils.flop_counter counts)."""
    calls = []

    def hook(name):
        def record(mod, inputs, out):
            x = inputs[0]
            if isinstance(mod, nn.ConvTranspose2d):  # every input pixel scatters a kh x kw x cout patch
                macs = x.numel() * mod.out_channels // mod.groups * math.prod(mod.kernel_size)
            else:  # every output pixel gathers a kh x kw x cin patch
                macs = out.numel() * mod.in_channels // mod.groups * math.prod(mod.kernel_size)
            calls.append(
                {"name": name, "module": mod, "shape": tuple(x.shape), "flops": 2 * macs}
            )  # mod: meta

        return record

    meta = copy.deepcopy(model).to("meta")
    handles = [
        m.register_forward_hook(hook(n))
        for n, m in meta.named_modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
    ]
    with torch.no_grad():
        meta(torch.empty(batch, 3, height, width, device="meta"))
    for h in handles:
        h.remove()
    return calls


def gflop_per_mp(model: QAIRN) -> float:
    """Model GFLOPs per megapixel (at 512x512, a multiple of the network stride: no padding)."""
    return sum(c["flops"] for c in conv_layers(model)) / 1e9 / (512 * 512 / 1e6)


def timed_gflop_per_mp(report: dict) -> float:
    """GFLOPs per megapixel of what each case times: the model's, once per --ensemble pass. A report
    written before --ensemble has no such entry: its runs were one pass."""
    return report["model"].get("gflop_per_mp_timed", report["model"]["gflop_per_mp"])


def ensemble_note(report: dict) -> str:
    """', --ensemble N (N passes per image)' for an ensemble run, so its table and plot are never read
    as one pass's numbers; '' for one pass (and for reports written before --ensemble)."""
    passes = report["settings"].get("ensemble", 1)
    return f", --ensemble {passes} ({passes} passes per image)" if passes > 1 else ""


def preset_gflop_per_mp(name: str) -> float:
    with torch.device("meta"):
        return gflop_per_mp(QAIRN(PRESETS[name]))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- the device -----------------------------------------------------------------------------------------
def resolve(device: str) -> torch.device:
    """--device as a torch.device with its index ("cuda" is the current GPU), refused in one line when
    that GPU is not there. A CUDA device is also made the current one, for the rest of the process:
    CUDA events record on the current device's stream, and torch.cuda calls without a device
    (synchronize, memory stats, a Triton launch) mean the current device; left at cuda:0, a run on
    --device cuda:1 would time and measure the wrong GPU."""
    try:
        device = resolve_device(device)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or a stub that fails on import
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "versions": {
            m: _version(m) for m in ("qairn", "torch", "triton", "tensorrt", "onnxruntime", "onnx", "numpy")
        },
        "cpu": {"model": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"] = {
            "type": "cuda",
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 2),
            "driver": _driver(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        env["device"] = {"type": "cpu", "name": env["cpu"]["model"]}
    # fp32 convolutions and matmuls may run as TF32 (cuDNN convs do by default): the baseline's terms.
    env["fp32_precision"] = {
        "cudnn_conv": _fp32_precision(torch.backends.cudnn, "conv", torch.backends.cudnn.allow_tf32),
        "matmul": _fp32_precision(torch.backends.cuda, "matmul", torch.backends.cuda.matmul.allow_tf32),
    }
    return env


def _fp32_precision(backend, op: str, legacy_allow_tf32: bool) -> str:
    """torch >= 2.9 says "tf32"/"ieee"/"none" per op; older torch has allow_tf32 flags."""
    value = getattr(getattr(backend, op, None), "fp32_precision", None)
    return str(value) if value is not None else ("tf32" if legacy_allow_tf32 else "ieee")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_matmul(device: torch.device) -> dict:
    """Measured dense matmul rate in TFLOP/s per dtype: the best of the repeats (a ceiling; random
    operands, never zeros)."""
    if device.type == "cuda":
        n, dtypes, reps = 8192, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}, 10
    else:
        n, dtypes, reps = 1024, {"fp32": torch.float32}, 10
    peaks = {}
    for name, dtype in dtypes.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        times = measure(lambda a=a, b=b: a @ b, device, warmup=3, repeats=reps, budget_s=10.0)["ms"]
        peaks[name] = 2 * n**3 / (min(times) * 1e-3) / 1e12
        del a, b
    return peaks


def peak_for_floor(peaks: dict) -> tuple[str, float]:
    """The physical limit every number is compared with: the fastest measured matmul rate."""
    name = max(peaks, key=peaks.get)
    return name, peaks[name]


# ---- timing -------------------------------------------------------------------------------------------
def measure(fn, device: torch.device, warmup: int, repeats: int, budget_s: float) -> dict:
    """Run fn `warmup` times untimed (at least once: the first call compiles and sizes the budget), then
    time up to `repeats` calls (CUDA events on CUDA). Slow cases are cut short: no more warm-up once
    the second call took over a quarter of the budget, and only as many repeats as fit in the budget
    (at least one). Returns {"ms": [...], "out": last output, "warmup": untimed calls made}."""
    cuda = device.type == "cuda"
    last = 0.0
    out = None
    done = 0
    for i in range(max(1, warmup)):
        done += 1
        # Here and below: the last output is let go before the next call, so that no call runs with two
        # outputs held (an 8K frame's fp32 output alone is 400 MB).
        out = None
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        last = time.perf_counter() - t0
        if i >= 1 and last > budget_s / 4:
            break
    n = max(1, min(repeats, int(budget_s / max(last, 1e-6))))
    times = []
    for _ in range(n):
        out = None
        if cuda:
            # On the device's own stream: record() with no stream means the *current* device's.
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            out = fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": times, "out": out, "warmup": done}


def synthetic_frame(height: int, width: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A (1,3,H,W) picture in [0,1]: smooth structure plus fine texture and 8x8 block steps, so every
    part of the network sees realistic, non-constant input (never time on zeros)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 64), max(2, width // 64), generator=g)
    img = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    blocks = torch.rand(1, 3, -(-height // 8), -(-width // 8), generator=g) - 0.5
    img = img + 0.08 * blocks.repeat_interleave(8, 2).repeat_interleave(8, 3)[..., :height, :width]
    img = img + 0.03 * torch.randn(1, 3, height, width, generator=g)
    return img.clamp(0, 1).to(device)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# ---- the table ----------------------------------------------------------------------------------------
def skip_reason(label: str, device: torch.device) -> str | None:
    name, _, options = SPECS[label]
    if device.type != "cuda" and name in CUDA_ONLY:
        return f"{name} needs a CUDA device"
    if device.type != "cuda" and (options.get("triton") or options.get("fused_conv")):
        return "the Triton kernels need a CUDA device"
    if device.type != "cuda" and options.get("cuda_graph"):
        return "CUDA graphs need a CUDA device"
    if name == "onnxruntime" and device.type == "cuda":
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime not installed"
        if not set(ort.get_available_providers()) & {"CUDAExecutionProvider", "TensorrtExecutionProvider"}:
            # Its CPU provider would time the host's cores in a GPU table.
            return "this onnxruntime has no CUDA or TensorRT provider (install onnxruntime-gpu)"
    return None


def make_restorer(model: QAIRN, label: str, device: torch.device, tile: int | None, args) -> Restorer:
    name, precision, options = SPECS[label]
    options = dict(options)
    # Static-shape backends (torch.compile + CUDA graphs, engines) get one tile per batch unless the
    # label says otherwise (the Restorer pads their last batch, so any batch is one compiled shape);
    # the others batch tiles as the Restorer does by default.
    static = name in ("compile", "tensorrt")
    label_batch = options.pop("tile_batch", None)
    batch = args.tile_batch or label_batch or (1 if static else 4)
    if name == "onnxruntime" and device.type == "cpu":
        # The same cores as eager torch, or the speedup measures thread counts, not backends.
        options.setdefault("threads", torch.get_num_threads())
    return Restorer(
        model=copy.deepcopy(model),
        device=device,
        backend=name,
        precision=precision,
        tile=tile,
        overlap=args.overlap,
        tile_batch=batch,
        ensemble=args.ensemble,  # eager fp32's too: the reference is the same picture and the same work
        **options,
    )


def release(device: torch.device) -> None:
    gc.collect()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def case_row(label, size, tile, **fields) -> dict:
    name, precision, options = SPECS[label]
    return {
        "backend": label,
        "engine": name,
        "precision": precision,
        "options": options,
        "size": list(size),
        "tile": tile,
        **fields,
    }


def budget_spent(budget_s: float) -> str:
    """The reason of a case the --budget-s cut: as given (a budget of 0.5 s read "0 s")."""
    return f"time budget of {budget_s:g} s spent"


def run_table(args, model: QAIRN, device: torch.device, report: dict, save) -> None:
    refs = {}  # (size, tile) -> eager fp32 (output on the CPU, quality, median ms)
    frames = {size: synthetic_frame(size[1], size[0], torch.device("cpu"), args.seed) for size in args.sizes}
    deadline = time.monotonic() + args.budget_s if args.budget_s else math.inf
    for label in args.backends:
        reason = skip_reason(label, device)
        restorer = None
        for size in args.sizes:
            for tile in args.tiles:
                if reason is None and time.monotonic() > deadline:
                    reason = budget_spent(args.budget_s)
                if reason is not None:
                    row = case_row(label, size, tile, status="skipped", reason=reason)
                else:
                    try:
                        if restorer is None:
                            restorer = make_restorer(model, label, device, tile, args)
                        restorer.set_tiling(tile, args.overlap)  # and forget earlier cases' OOM retries
                        # Each case's peak memory its own: a frame graph kept from an earlier size
                        # (cuda_graph labels keep 2, each with its own pool) counted in the 8K peak.
                        restorer.drop_caches()
                        x = frames[size].to(device)
                        fields = time_case(restorer, label, x, tile, device, args, refs, report)
                        row = case_row(label, size, tile, status="ok", **fields)
                    except BackendError as e:
                        reason = str(e)
                        row = case_row(label, size, tile, status="skipped", reason=reason)
                    except Exception as e:  # report it and go on: one broken backend must not cost the run
                        row = case_row(
                            label, size, tile, status="failed", reason=f"{type(e).__name__}: {e}"[:500]
                        )
                        if restorer is None:
                            reason = f"failed to build ({type(e).__name__})"
                report["results"].append(row)
                save(report)
                print(format_row(row), flush=True)
        del restorer
        release(device)


def time_case(restorer, label, x, tile, device, args, refs, report) -> dict:
    h, w = x.shape[-2:]
    r = measure(lambda: restorer.restore_tensor(x), device, args.warmup, args.repeats, args.case_budget_s)
    peak_mib = peak_alloc_mib = None
    fields = {}
    if device.type == "cuda":
        r["out"] = None  # freed before the measured call
        r["out"], peak_mib, peak_alloc_mib = peak_call(lambda: restorer.restore_tensor(x), device)
        peak_mib, fields["peak_mem_scope"] = peak_with_engine(restorer, label, peak_mib)
    y, q, _ = r["out"]
    q = {k: float(v[0]) for k, v in q.items()}
    ms = statistics.median(r["ms"])
    mp = w * h / 1e6
    key = ((w, h), tile)
    if label == BASELINE:
        refs[key] = (y.float().cpu(), q, ms)  # host memory: not counted against later backends
    if key in refs:
        ref_y, ref_q, ref_ms = refs[key]
        fields["speedup"] = ref_ms / ms
        if label != BASELINE:
            fields["psnr_db"] = round(psnr(y, ref_y.to(y.device)), 2)
            fields["q_abs_err"] = max(abs(q[k] - ref_q[k]) for k in q)
    # As used: an out-of-memory retry runs this shape at a smaller tile and overlap from then on.
    tile_used, overlap_used = restorer.tiling_for(h, w)
    plan = plan_tiles(h, w, tile_used, overlap_used)
    _, peak = peak_for_floor(report["peak_tflops"])
    floor_ms = timed_gflop_per_mp(report) * mp / peak  # GFLOP / (TFLOP/s) = ms
    return dict(
        ms_median=ms,
        ms_min=min(r["ms"]),
        ms_all=[round(t, 4) for t in r["ms"]],
        warmup=r["warmup"],  # as run: at least one, fewer than asked when a call is slow
        repeats=len(r["ms"]),
        tile_batch=restorer.tile_batch,
        tile_used=tile_used,
        overlap_used=overlap_used,
        tiles=plan.count,
        work_ratio=plan.count * plan.rows.tile * plan.cols.tile / (w * h),
        mp_per_s=mp / (ms * 1e-3),
        fps=1e3 / ms,
        peak_mem_mib=peak_mib,
        peak_alloc_mib=peak_alloc_mib,
        floor_ms=floor_ms,
        frac_of_peak=floor_ms / ms,
        quality=q,
        **fields,
    )


def too_far(r: dict, min_psnr: float) -> bool:
    """Whether a compared backend's output is wrong: PSNR vs eager fp32 under min_psnr, or NaN (NaN
    pixels, e.g. an fp16 overflow, compare False with everything: written as `not >=` on purpose)."""
    return r.get("psnr_db") is not None and not r["psnr_db"] >= min_psnr


def choose_best(report: dict, min_psnr: float) -> dict:
    """Per size: the fastest backend (any tile) whose output stays within min_psnr dB of eager fp32,
    eager fp32 itself included (when nothing beats it, it is the best, at 1x, PSNR None: the reference).
    Its speedup is against the fastest eager fp32 run at that size, whatever tile that used: a ratio
    taken at one tile size would flatter a backend that only beat a badly tiled baseline."""
    baseline: dict = {}
    for r in report["results"]:
        if r["status"] == "ok" and r["backend"] == BASELINE:
            key = "x".join(map(str, r["size"]))
            baseline[key] = min(baseline.get(key, float("inf")), r["ms_median"])
    best = {}
    for r in report["results"]:
        if r["status"] != "ok" or r.get("speedup") is None:
            continue
        if r["backend"] != BASELINE and (r.get("psnr_db") is None or too_far(r, min_psnr)):
            continue
        key = "x".join(map(str, r["size"]))
        if key not in baseline:
            continue
        if key not in best or r["ms_median"] < best[key]["ms_median"]:
            best[key] = {
                k: r.get(k) for k in ("backend", "tile", "ms_median", "mp_per_s", "psnr_db", "peak_mem_mib")
            }
            best[key]["peak_mem_scope"] = r.get("peak_mem_scope")
            best[key]["speedup"] = baseline[key] / r["ms_median"]
            best[key]["speedup_same_tile"] = r["speedup"]
            best[key]["baseline_ms"] = baseline[key]
    return best


def targets(report: dict) -> dict:
    """The issue's targets, judged on this run's numbers (None where this run cannot tell)."""
    best = report.get("best", {})
    b4k = best.get("3840x2160")
    out = {"speedup_4k_ge_8": None, "mem_8k_le_4gib": None}
    if b4k:
        out["speedup_4k_ge_8"] = {
            "backend": b4k["backend"],
            "speedup": b4k["speedup"],
            "met": b4k["speedup"] >= 8,
        }
        rows = [
            r
            for r in report["results"]
            if r["status"] == "ok"
            and r["backend"] == b4k["backend"]
            and r["size"] == [7680, 4320]
            and r.get("peak_mem_mib") is not None
        ]
        if rows:
            mib = min(r["peak_mem_mib"] for r in rows)
            scope = rows[0].get("peak_mem_scope")
            out["mem_8k_le_4gib"] = {
                "backend": b4k["backend"],
                "peak_mem_mib": mib,
                "peak_mem_scope": scope,
                # torch's count of an engine with memory of its own is a lower bound: cannot tell
                "met": None if scope == PARTIAL_MEMORY else mib <= 4096,
            }
    return out


# ---- printing and plotting -------------------------------------------------------------------------------
LABEL_WIDTH = max(map(len, SPECS))  # the longest label (graph-compile-triton-fp16) keeps its row in line
COLUMNS = (
    f"{'backend':<{LABEL_WIDTH}} {'size':>9} {'tile':>5} {'ms':>9} {'MP/s':>8} {'fps':>7} {'speedup':>7} "
    f"{'PSNR dB':>7} {'peak MiB':>8} {'%peak':>6}"
)


def _fmt(v, spec) -> str:
    return "-" if v is None else format(v, spec)


def _rate(v: float) -> str:
    """3 significant digits (a small CPU case's 0.00123 MP/s, not 0.00), whole numbers from 100 up."""
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def format_row(r: dict) -> str:
    size = "x".join(map(str, r["size"]))
    tile = str(r["tile"] or "whole")
    if r["status"] != "ok":
        return f"{r['backend']:<{LABEL_WIDTH}} {size:>9} {tile:>5}   {r['status']}: {r.get('reason', '')}"
    psnr_txt = (
        "ref" if r["backend"] == BASELINE and r.get("psnr_db") is None else _fmt(r.get("psnr_db"), ".1f")
    )
    peak = _fmt(r["peak_mem_mib"], ".0f") + ("*" if r.get("peak_mem_scope") == PARTIAL_MEMORY else "")
    return (
        f"{r['backend']:<{LABEL_WIDTH}} {size:>9} {tile:>5} {r['ms_median']:>9.2f} {_rate(r['mp_per_s']):>8} "
        f"{_rate(r['fps']):>7} {_fmt(r.get('speedup'), '.2f'):>7} {psnr_txt:>7} "
        f"{peak:>8} {100 * r['frac_of_peak']:>6.2f}"
    )


def header(report: dict) -> str:
    dev, m = report["env"]["device"], report["model"]
    peaks = ", ".join(f"{k} {v:.3g}" for k, v in report["peak_tflops"].items())
    name, peak = peak_for_floor(report["peak_tflops"])
    gflop, timed = m["gflop_per_mp"], timed_gflop_per_mp(report)
    flops = f"{gflop:.1f} GFLOP/MP" + (f" a pass, {timed:.1f} timed" if timed != gflop else "")
    return "\n".join(
        [
            f"qairn bench on {dev['name']} ({dev['type']}){ensemble_note(report)}",
            f"model: {m['source']}; {m['params'] / 1e6:.2f} M params, {flops} "
            f"(presets: {', '.join(f'{k} {v:.1f}' for k, v in m['presets_gflop_per_mp'].items())}; "
            f"FBCNN {FBCNN_GFLOP_PER_MP:.0f})",
            f"measured matmul peak TFLOP/s: {peaks}; compute floor at {name}: "
            f"{timed / peak:.3g} ms/MP ({peak * 1e3 / timed:.3g} MP/s)",
        ]
    )


def format_table(report: dict) -> str:
    return "\n".join([header(report), COLUMNS, *map(format_row, report["results"]), footer(report)])


def footer(report: dict) -> str:
    passes = report["settings"].get("ensemble", 1)
    every, both = (f" (all {passes} passes)", f", both with --ensemble {passes}") if passes > 1 else ("", "")
    lines = []
    lines.append(
        f"%peak = model FLOPs of the image{every} / time / measured peak (tile overlap and padding count "
        f"against it); PSNR against eager fp32 at the same size and tile{both}."
    )
    for size, b in report.get("best", {}).items():
        lines.append(
            f"best at {size}: {b['backend']} (tile {b['tile'] or 'whole'}) {b['speedup']:.2f}x the fastest "
            f"eager fp32 run, PSNR {'ref' if b['psnr_db'] is None else format(b['psnr_db'], '.1f') + ' dB'}"
        )
    partial = sorted({r["backend"] for r in report["results"] if r.get("peak_mem_scope") == PARTIAL_MEMORY})
    if partial:
        lines.append(
            f"* peak MiB of {', '.join(partial)}: torch's allocator only (inputs and outputs); "
            "their engines' own device memory is not counted"
        )
    min_psnr = report["settings"]["min_psnr"]
    wrong = {r["backend"] for r in report["results"] if r["status"] == "ok" and too_far(r, min_psnr)}
    if wrong:
        lines.append(f"WRONG (PSNR < {min_psnr} dB vs eager fp32): {', '.join(sorted(wrong))}")
    return "\n".join(lines)


def write_plot(report: dict, path: str) -> None:
    """One panel per (size, tile), one horizontal bar per backend, named beside it: a legend of 15
    backends repeats matplotlib's 10 colours. Each bar says its MP/s and speedup; wrong ones (PSNR
    under --min-psnr) are red, hatched and say WRONG; the dashed line is the compute limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["status"] == "ok"]
    cases = list(dict.fromkeys((tuple(r["size"]), r["tile"]) for r in rows))
    labels = list(dict.fromkeys(r["backend"] for r in rows))
    min_psnr = report["settings"]["min_psnr"]
    name, peak = peak_for_floor(report["peak_tflops"])
    limit = peak * 1e3 / timed_gflop_per_mp(report)
    fig, axes = plt.subplots(
        1,
        max(1, len(cases)),
        sharey=True,
        squeeze=False,
        figsize=(max(6.0, 4.2 * len(cases)), 1.6 + 0.3 * max(1, len(labels))),
    )
    if not cases:  # every case skipped or failed (or cut short before the first): say so
        axes[0][0].set_title("no case timed", fontsize=9)
    for ax, (size, tile) in zip(axes[0], cases):
        low, top = limit, limit
        for i, label in enumerate(labels):
            r = next(
                (r for r in rows if r["backend"] == label and (tuple(r["size"]), r["tile"]) == (size, tile)),
                None,
            )
            if r is None:
                continue
            bad = too_far(r, min_psnr)
            color = "tab:red" if bad else "tab:gray" if label == BASELINE else "tab:blue"
            ax.barh(i, r["mp_per_s"], color=color, hatch="xx" if bad else None)
            speedup = "" if r.get("speedup") is None else f"  {r['speedup']:.2f}x"
            ax.text(
                r["mp_per_s"],
                i,
                f" {r['mp_per_s']:.3g}{speedup}{'  WRONG' if bad else ''}",
                va="center",
                fontsize=7,
            )
            low, top = min(low, r["mp_per_s"]), max(top, r["mp_per_s"])
        ax.axvline(limit, color="k", ls="--", lw=1)
        ax.set_xscale("log")
        # Log bars start at the left edge: put it well below the slowest, whose bar would vanish; and
        # leave room for the text after the longest one.
        ax.set_xlim(low / 4, top * 6)
        ax.set_xlabel("megapixels / s (log)", fontsize=8)
        ax.set_title(f"{'x'.join(map(str, size))}, tile {tile or 'whole'}", fontsize=9)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].set_ylim(max(1, len(labels)) - 0.5, -0.5)  # the first backend (eager fp32) on top
    fig.suptitle(
        f"qairn bench: {report['env']['device']['name']}, {report['model']['source']}"
        f"{ensemble_note(report)}\n"
        f"MP/s, speedup over eager fp32; dashed: compute limit at the {name} matmul peak ({limit:.3g} MP/s)",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ---- video-like stream ----------------------------------------------------------------------------------
def video_frames(w: int, h: int, count: int, seed: int) -> tuple[list[np.ndarray], list[tuple]]:
    """`count` moving uint8 RGB frames, and the same frames as 4:2:0 limited-range BT.709 planes."""
    base = (synthetic_frame(h, w, torch.device("cpu"), seed=seed)[0].permute(1, 2, 0) * 255).round()
    base = base.to(torch.uint8).numpy()
    r, g, b = (base[..., i].astype(np.float32) / 255 for i in range(3))
    luma = 0.2126 * r + 0.7152 * g + 0.0722 * b
    cb, cr = (b - luma) / 1.8556, (r - luma) / 1.5748
    planes = [np.round(16 + 219 * luma).astype(np.uint8)]
    planes += [np.round(128 + 224 * c[::2, ::2]).astype(np.uint8) for c in (cb, cr)]

    def roll(a, px):
        return np.ascontiguousarray(np.roll(a, px, axis=1))

    rgb = [roll(base, 8 * i) for i in range(count)]
    yuv = [(roll(planes[0], 8 * i), roll(planes[1], 4 * i), roll(planes[2], 4 * i)) for i in range(count)]
    return rgb, yuv


STREAM_BATCH = 4  # frames per restore_stream batch
VIDEO_PASSES = 3  # timed passes over the frames per mode (fewer with --repeats or a short case budget)


def frames_psnr(frames: list, refs: list) -> float:
    """PSNR in dB of uint8 frames (arrays, or tuples of planes) against the same frames of another run."""

    def flat(fs):
        return np.concatenate([np.ravel(p) for f in fs for p in (f if isinstance(f, tuple) else (f,))])

    mse = float(np.mean((flat(frames).astype(np.float64) - flat(refs)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run_video(args, model: QAIRN, device: torch.device, report: dict, save) -> None:
    """Per backend: a plain loop of Restorer.restore calls, then Restorer.restore_stream (batched, pinned
    host memory and copies overlapped with compute on CUDA) over RGB frames and over 4:2:0 planes.
    Each mode: one untimed pass, then the median of up to VIDEO_PASSES timed passes; on CUDA the peak
    device memory of one more pass; PSNR against eager fp32's frames of the same mode when it ran."""
    w, h = args.sizes[0]
    tile = args.tiles[0]
    rgb, yuv = video_frames(w, h, args.video, args.seed)
    modes = {
        "loop": lambda r, fr: [r.restore(f).image for f in fr],
        "stream-rgb": lambda r, fr: [res.image for res in r.restore_stream(fr, STREAM_BATCH)],
        "stream-yuv420": lambda r, fr: [
            res.image for res in r.restore_stream(fr, STREAM_BATCH, matrix="bt709", range="limited")
        ],
    }
    refs = {}  # mode -> eager fp32's frames
    deadline = time.monotonic() + args.budget_s if args.budget_s else math.inf  # as in the table
    for label in args.backends:
        reason = skip_reason(label, device)
        restorer = None
        outputs = {}
        for mode, fn in modes.items():
            frames = yuv if mode == "stream-yuv420" else rgb
            row = {"backend": label, "mode": mode, "size": [w, h], "tile": tile, "frames": args.video}
            if reason is None and time.monotonic() > deadline:
                reason = budget_spent(args.budget_s)
            if reason:
                row.update(status="skipped", reason=reason)
            else:
                try:
                    restorer = restorer or make_restorer(model, label, device, tile, args)
                    restorer.drop_caches()  # as in the table: each mode's peak its own (batch shapes)
                    run = functools.partial(fn, restorer, frames)
                    # The untimed pass meets every batch shape the timed ones do (the full batches and
                    # the last, short one): each compiled, autotuned and pinned before the clock starts.
                    r = measure(run, device, 1, min(args.repeats, VIDEO_PASSES), args.case_budget_s)
                    outputs[mode] = r["out"]
                    seconds = statistics.median(r["ms"]) / 1e3
                    row.update(
                        status="ok",
                        tile_batch=restorer.tile_batch,
                        passes=len(r["ms"]),
                        seconds=seconds,
                        seconds_all=[round(t / 1e3, 4) for t in r["ms"]],
                        fps=args.video / seconds,
                        mp_per_s=args.video * w * h / 1e6 / seconds,
                    )
                    if device.type == "cuda":  # as in the table: reserved, in one more pass after a reset
                        r = None
                        peak_mib = peak_call(run, device)[1]
                        row["peak_mem_mib"], row["peak_mem_scope"] = peak_with_engine(
                            restorer, label, peak_mib
                        )
                    if mode == "stream-rgb" and "loop" in outputs:  # the stream must give the loop's frames
                        diffs = [
                            np.abs(a.astype(np.int16) - b).max()
                            for a, b in zip(outputs[mode], outputs["loop"], strict=True)
                        ]
                        row["max_abs_diff_u8_vs_loop"] = int(max(diffs))
                    if label == BASELINE:
                        refs[mode] = outputs[mode]
                    elif mode in refs:  # a fast stream that changes the picture is wrong, not fast
                        row["psnr_db"] = round(frames_psnr(outputs[mode], refs[mode]), 2)
                except BackendError as e:
                    reason = str(e)
                    row.update(status="skipped", reason=reason)
                except Exception as e:
                    row.update(status="failed", reason=f"{type(e).__name__}: {e}"[:500])
                    if restorer is None:  # as in the table: not built again for each mode
                        reason = f"failed to build ({type(e).__name__})"
            report["results"].append(row)
            save(report)
            print(format_video_row(row), flush=True)
        del restorer, outputs
        release(device)


def format_video_row(r: dict) -> str:
    size, tile = "x".join(map(str, r["size"])), str(r["tile"] or "whole")
    head = f"{r['backend']:<{LABEL_WIDTH}} {r['mode']:<14} {size:>9} {tile:>5}"
    if r["status"] != "ok":
        return f"{head}   {r['status']}: {r.get('reason', '')}"
    tail = f"  PSNR {_fmt(r.get('psnr_db'), '.1f')}" if "psnr_db" in r else ""
    if r.get("peak_mem_mib") is not None:
        tail += f"  peak {r['peak_mem_mib']:.0f} MiB" + (
            "*" if r.get("peak_mem_scope") == PARTIAL_MEMORY else ""
        )
    return (
        f"{head} {r['frames']:>4} frames {_rate(r['fps']):>9} fps {_rate(r['mp_per_s']):>9} MP/s"
        f"  (median of {r.get('passes', 1)}){tail}"
    )


# ---- command line -------------------------------------------------------------------------------------
def strict(obj):
    """obj with its non-finite floats as the strings "Infinity", "-Infinity", "NaN" (float() reads them
    back): a PSNR of identical outputs is infinite, and json.dumps writes bare Infinity/NaN, which
    strict JSON readers (jq, JavaScript, Go) refuse."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def check_outputs(*paths: str | None) -> None:
    """check_writable, refused in one line (SystemExit) also where no qairn command turns its OSError
    into one: `python -m qairn.engine.bench` (as gpu_run.sh runs it) and the bench/ scripts. And a
    file is made and removed in each folder: a folder that exists but takes no file (read-only, /proc)
    failed only at the first report, after the first case was timed, naming the temp file."""
    try:
        check_writable(*paths)
    except OSError as e:
        raise SystemExit(str(e)) from None
    for path in filter(None, paths):
        try:
            with tempfile.NamedTemporaryFile(dir=Path(path).resolve().parent, prefix=".qairn-probe-"):
                pass
        except OSError as e:
            raise SystemExit(f"{path}: cannot write in its folder ({e.strerror or e})") from None


def check_plot(path: str | None) -> None:
    """check_figure (--plot names a .png), refused in one line (SystemExit) as check_outputs is."""
    try:
        check_figure(path)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def write_json(path: str, obj, indent: int = 1) -> None:
    """Strict JSON, written atomically (a temp file of its own, renamed in; removed if cut short)."""
    text = json.dumps(strict(obj), indent=indent, default=str, allow_nan=False)
    write_atomic(path, (text + "\n").encode())


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        w, _, h = part.lower().partition("x")
        try:
            size = (int(w), int(h))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected WxH sizes like 1920x1080, got {part!r}") from None
        if min(size) < 1:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {part!r}")
        out.append(size)
    return out


def parse_tiles(text: str) -> list[int | None]:
    tiles = []
    for t in text.split(","):
        if t.strip().lower() in ("whole", "none"):
            tiles.append(None)
            continue
        try:
            size = int(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected tile sizes (0 = whole), got {t!r}") from None
        if size < 0:
            raise argparse.ArgumentTypeError(f"tile sizes must not be negative, got {t!r}")
        # By value: "00" (or "+0") was tile 0, refused later as "must be a positive int" though 0 = whole
        tiles.append(None if size == 0 else size)
    return tiles


def backend_choices() -> str:
    return f"choose from {', '.join(SPECS)} (a comma list), or all"


def parse_backends(text: str) -> list[str]:
    # Each label once: a repeated one was timed twice and drawn as two bars of one name.
    names = dict.fromkeys(b.strip() for b in text.split(",") if b.strip())
    labels = list(SPECS) if list(names) == ["all"] else list(names)
    if not labels:
        raise argparse.ArgumentTypeError(f"no backend named; {backend_choices()}")
    unknown = [b for b in labels if b not in SPECS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown backend{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; {backend_choices()}"
        )
    return labels


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qairn bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--backends",
        type=parse_backends,
        help=f"comma list or 'all' ({', '.join(SPECS)}); "
        f"default: CUDA {','.join(DEFAULTS['cuda']['backends'])}; CPU "
        f"{','.join(DEFAULTS['cpu']['backends'])}. {BASELINE} runs first (in --video mode when listed)",
    )
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        help="WxH list (default CUDA 1920x1080,3840x2160,7680x4320; CPU 256x256,512x512)",
    )
    p.add_argument("--tiles", type=parse_tiles, help="tile sizes, 0 = whole image (default 512)")
    p.add_argument(
        "--tile-batch",
        type=int,
        default=0,
        help="tiles per backend call (default 4; 1 for compiled/static backends)",
    )
    p.add_argument(
        "--overlap",
        type=int,
        default=None,
        help="tile overlap in pixels (default 32; 0 for a tile under 48, as qairn restore gives)",
    )
    p.add_argument(
        "--weights", type=path_arg, help="qairn safetensors (default: the shipped weights if present)"
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="time a random-initialised preset instead")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N (default: auto)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--warmup", type=int, help="untimed calls per case, at least 1 (default CUDA 3, CPU 2)")
    p.add_argument(
        "--repeats", type=int, help="timed calls per case, median reported (default CUDA 10, CPU 3)"
    )
    p.add_argument(
        "--case-budget-s",
        type=float,
        help="seconds per case before repeats are cut (>= 1 kept; default CUDA 20, CPU 30)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="stop starting cases after this many seconds (default 0: no budget)",
    )
    p.add_argument(
        "--min-psnr",
        type=float,
        default=40.0,
        help="below this PSNR vs eager fp32 a backend is wrong (default 40)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic frames (default 0)")
    p.add_argument(
        "--json", type=path_arg, help="write the report (device, versions, settings, results) here"
    )
    p.add_argument("--plot", type=path_arg, help="write a PNG bar chart here")
    p.add_argument(
        "--video",
        type=int,
        default=0,
        metavar="FRAMES",
        help="stream FRAMES frames of one size (--sizes; default the first of the defaults) at one tile "
        "through one Restorer per backend (default 0: no stream)",
    )
    p.add_argument(
        "--env", type=path_arg, metavar="JSON", help="only write the device/versions JSON here ('-': print)"
    )
    ensemble_arg(p, "; every backend and the eager fp32 reference run it, FLOPs and floor count every pass")
    # As every qairn command takes it (scripts pass it to all): bench has no progress bar or closing line
    # to drop, as its table is its output.
    add_quiet(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("video", "threads", "tile_batch", "overlap", "budget_s"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.warmup is not None and args.warmup < 0:
        raise SystemExit(f"--warmup must not be negative, got {args.warmup}")
    for name in ("budget_s", "case_budget_s", "min_psnr"):  # NaN compares False: never cut, never wrong
        if getattr(args, name) is not None and not math.isfinite(getattr(args, name)):
            raise SystemExit(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if args.case_budget_s is not None and args.case_budget_s <= 0:
        raise SystemExit(f"--case-budget-s must be positive, got {args.case_budget_s}")
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if args.video and max(len(args.sizes or ()), len(args.tiles or ())) > 1:
        raise SystemExit("--video streams one size at one tile: give one --sizes and one --tiles")
    if args.video and args.plot:
        raise SystemExit("--plot draws the backend table; --video has no chart (use --json)")
    for flag in ("--json", "--plot"):
        if args.env and getattr(args, flag[2:]):
            raise SystemExit(f"--env writes the device and versions only: {flag} would not be written")
    outputs = {"--json": args.json, "--plot": args.plot, "--env": None if args.env == "-" else args.env}
    check_outputs(*outputs.values())
    check_distinct(outputs, {"the --weights file": args.weights, "the shipped weights": DEFAULT_WEIGHTS})
    check_plot(args.plot)
    device = resolve(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.env:
        if args.env == "-":
            print(json.dumps(strict(environment(device)), indent=2, allow_nan=False))
        else:
            write_json(args.env, environment(device), indent=2)
        return 0
    d = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    args.backends = args.backends or list(d["backends"])
    # The reference runs first: always in the table; in --video mode when asked for (the GPU run streams
    # its best backend alone), so that every backend after it gets its PSNR.
    if not args.video or BASELINE in args.backends:
        args.backends = [BASELINE] + [b for b in args.backends if b != BASELINE]
    args.sizes = args.sizes or list(d["sizes"][:1] if args.video else d["sizes"])  # --video: one size
    args.tiles = args.tiles or list(d["tiles"])
    for tile in args.tiles:  # before any work, not as a "failed" row for every case
        try:
            check_tiling(tile, default_overlap(tile) if args.overlap is None else args.overlap)
        except ValueError as e:
            raise SystemExit(f"--tiles {tile or 0} with --overlap {args.overlap}: {e}") from None
    args.warmup = d["warmup"] if args.warmup is None else args.warmup
    args.repeats = d["repeats"] if args.repeats is None else args.repeats
    args.case_budget_s = d["case_budget_s"] if args.case_budget_s is None else args.case_budget_s
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    try:  # one line also for `python -m qairn.engine.bench`, which no qairn command wraps
        model, source = bench_model(args.weights, args.preset)
    except WeightsError as e:
        raise SystemExit(str(e)) from None
    gflop = gflop_per_mp(model)
    report = {
        "kind": "video" if args.video else "table",
        "complete": False,
        "env": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "env", "quiet")}
        | {"cudnn_benchmark": torch.backends.cudnn.benchmark},
        "model": {
            "source": source,
            "config": json.loads(model.config.to_json()),
            "params": param_count(model),
            "gflop_per_mp": gflop,  # one pass
            "gflop_per_mp_timed": gflop * args.ensemble,  # what each case times
            "presets_gflop_per_mp": {k: preset_gflop_per_mp(k) for k in ("small", "paper")},
            "fbcnn_gflop_per_mp": FBCNN_GFLOP_PER_MP,
            "flop_convention": "2 per multiply-accumulate",
        },
        "peak_tflops": peak_matmul(device),
        "results": [],
    }

    def save(rep):
        if rep["kind"] == "table":  # kept current, so a run cut short still names its best backend
            rep["best"] = choose_best(rep, args.min_psnr)
            rep["targets"] = targets(rep)
        if args.json:
            write_json(args.json, rep)

    print(header(report), flush=True)
    try:
        if args.video:
            run_video(args, model, device, report, save)
        else:
            print(COLUMNS, flush=True)
            run_table(args, model, device, report, save)
            save(report)
            print(footer(report))
        report["complete"] = True
    finally:  # also when cut short (the GPU run's time box interrupts): the cases timed so far
        save(report)
        if args.plot and not args.video:
            write_plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
