"""The gate's benchmark workload, shared by bench_gate.py (pytest-benchmark) and gpu_gate_report.py."""

from __future__ import annotations

import statistics
import time

import torch

# A 3840x2160 frame cut into 8 x 5 tiles of 512 + 2 x 16 overlap, batched: the full-resolution
# merge sees (40, c0, 544, 544). c0 = 16 is the small preset, 64 the paper's.
TILES_4K = (40, 544, 544)
TILE_CORE = (16, 528, 16, 528)  # each tile pools its 512 x 512 core


def make_inputs(n, c, h, w, dtype, device, channels_last=False, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    logit = torch.randn(n, 1, h, w, generator=gen, device=device, dtype=dtype).mul_(3)
    skip = torch.randn(n, c, h, w, generator=gen, device=device, dtype=dtype)
    dec = torch.randn(n, c, h, w, generator=gen, device=device, dtype=dtype)
    if channels_last:
        logit, skip, dec = (t.contiguous(memory_format=torch.channels_last) for t in (logit, skip, dec))
    return logit, skip, dec


def eager_sequence(logit, skip, dec, p):
    """What the fused op replaces, op by op: sigmoid, mul, sub, mul, add, pow, mean."""
    gamma = torch.sigmoid(logit)
    out = gamma * skip + (1 - gamma) * dec
    q = gamma.float().pow(p).mean(dim=(1, 2, 3))
    return out, gamma, q


def gate_bytes(logit, skip, write_gamma=False):
    """Bytes the fused forward must move: logit, skip and dec read once, out (and gamma) written once."""
    return logit.nbytes * (1 + write_gamma) + 3 * skip.nbytes


def cuda_time_ms(fn, warmup=10, iters=50, device=None):
    """Median milliseconds of fn() over iters CUDA-event-timed calls, after warmup calls. The events
    go on `device`'s current stream (default: the current GPU's), where fn's work on that GPU runs:
    recorded with no stream, they would time the current GPU's stream whatever GPU fn uses."""
    for _ in range(warmup):
        fn()
    stream = torch.cuda.current_stream(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
        start.record(stream)
        fn()
        end.record(stream)
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def block_seconds(fn, calls: int, device="cuda") -> float:
    """Seconds for `calls` back-to-back fn() calls: CUDA events on `device`'s current stream on a GPU
    ("cuda": the current one, or "cuda:N"), else the host clock."""
    device = torch.device(device)
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(calls):
            fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - t0


def paired_ratio(
    fn_a, fn_b, rounds: int = 40, calls: int = 5, warmup: int = 5, timer=None, device="cuda"
) -> dict:
    """time(fn_b) / time(fn_a) as the median over rounds that time A and B back to back, alternating
    which goes first, with the quartiles as the spread. Clock and thermal drift between two separate
    medians can exceed a 2% difference; within a round both see the same state, so it cancels.
    The default timer is block_seconds on `device`."""
    timer = timer or (lambda fn, n: block_seconds(fn, n, device))
    for _ in range(warmup):
        fn_a()
        fn_b()
    ratios = []
    for r in range(rounds):
        if r % 2 == 0:
            a, b = timer(fn_a, calls), timer(fn_b, calls)
        else:
            b, a = timer(fn_b, calls), timer(fn_a, calls)
        ratios.append(b / a)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "rounds": rounds, "calls": calls}
