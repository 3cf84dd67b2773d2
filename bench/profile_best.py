"""A short torch.profiler look at one backend: the top ops by device time (CPU time on CPU).

The backend is --backend, or the best one of a `qairn bench --json` report (--from), else
eager-fp16-cl on CUDA / eager-fp32 on CPU. Warm-up calls first (compilation stays out), then a few
profiled Restorer.restore_tensor calls on one synthetic frame.

    python bench/profile_best.py --from bench.json --size 3840x2160 --out profile.txt --json profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from qairn.engine import bench as qb
from qairn.engine.imageio import write_atomic
from qairn.weights_io import WeightsError


def best_backend(report_path: str | None, device: torch.device) -> str:
    """The report's best backend (at 4K, else its largest size); without a report the default one.
    A report that names none is refused: profiling the default would pass for its best."""
    if not report_path:
        return "eager-fp16-cl" if device.type == "cuda" else "eager-fp32"
    try:
        best = json.loads(Path(report_path).read_text()).get("best") or {}
    except (OSError, ValueError) as e:
        raise SystemExit(f"--from {report_path}: not a readable qairn bench report ({e})") from None
    if not best:
        raise SystemExit(f"--from {report_path}: names no best backend (a --video report, or no case ran)")
    area = lambda size: int(size.split("x")[0]) * int(size.split("x")[1])
    size = "3840x2160" if "3840x2160" in best else max(best, key=area)
    label = best[size]["backend"]
    if label not in qb.SPECS:  # a report of another qairn version: a KeyError traceback further on
        raise SystemExit(
            f"--from {report_path}: its best backend {label!r} is unknown here; "
            f"give --backend, one of {', '.join(qb.SPECS)}"
        )
    return label


# Host calls that make the host wait for the device (or copy from pageable memory, which can): when
# the host is the bottleneck, these are where it stalls. Their Python stacks say which line issued them.
STALLS = (
    "cudaMemcpy",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::item",
)


def stack_profile(activities):
    """A profiler that records each op's Python stack. Since torch 2.4 the stacks reach
    key_averages(group_by_stack_n=...) only with the (private) verbose experimental config."""
    try:
        from torch._C._profiler import _ExperimentalConfig

        return profile(
            activities=activities, with_stack=True, experimental_config=_ExperimentalConfig(verbose=True)
        )
    except (ImportError, TypeError):
        return profile(activities=activities, with_stack=True)


def busy_ms(spans) -> float:
    """Milliseconds covered by the union of (start_us, end_us) spans: overlapping kernels (streams)
    and nested ranges count once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def is_annotation(event) -> bool:
    """A range someone named (torch.compile's "## Call CompiledFxGraph ...", record_function), not
    work: on the device it spans its kernels, so its time counts them a second time."""
    return bool(getattr(event, "is_user_annotation", False)) or event.key.startswith("## ")


def device_spans(prof) -> list[tuple[float, float]]:
    """(start, end) in us of what ran on the GPU: kernels, copies, memsets. Not the annotation
    ranges, which would count their kernels twice if summed (the H200 profile's self CUDA column
    added up to over 100%)."""
    from torch.autograd import DeviceType

    return [
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not is_annotation(e)
    ]


def calls(n: int, what: str = "call") -> str:
    """'1 call', '3 calls': the dry run profiles one."""
    return f"{n} {what}{'' if n == 1 else 's'}"


def top_ops(events, key: str, iters: int, rows: int) -> list[dict]:
    """The `rows` ops with the most self time (`key`) per call, with their share of the total. On the
    device the annotation ranges are left out of both: counted, they took the first row and halved
    every kernel's share (the H200 profile of 2026-11-27: "## Call CompiledFxGraph" 46%, its kernels
    the rest). On the CPU a range's self time is its own host work, and stays."""
    if key == "self_device_time_total":
        events = [e for e in events if not is_annotation(e)]
    events = sorted(events, key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events) or 1.0
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": getattr(e, key) / 1e3 / iters,
            "share": getattr(e, key) / total,
        }
        for e in events[:rows]
    ]


def host_device_balance(prof, stacked, wall_ms: float, iters: int, cuda: bool) -> dict:
    """Per call: wall time (unprofiled), host time (self CPU of every op), device busy time (the
    union of kernel and copy spans), and the stalls with their stacks. Device time well under the wall
    time means the device waits for the host: faster kernels would not help, less host work would.
    prof: `iters` calls; stacked: one call profiled with_stack (Python frames would crowd prof's table)."""
    events = prof.key_averages()
    host_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / iters
    device_ms = busy_ms(device_spans(prof)) / iters if cuda else None
    stalls = [
        {
            "op": e.key,
            "calls_per_call": e.count,
            "cpu_ms": e.cpu_time_total / 1e3,
            "stack": [line for line in (e.stack or []) if "site-packages" not in line][:6],
        }
        for e in stacked.key_averages(group_by_stack_n=12)
        if any(e.key.startswith(name) for name in STALLS)
    ]
    stalls.sort(key=lambda s: -s["cpu_ms"])
    copies = [e for e in events if "Memcpy HtoD" in e.key or "Memcpy DtoH" in e.key]
    return {
        "wall_ms": wall_ms,
        "host_ms_profiled": host_ms,
        "device_ms": device_ms,
        "device_busy": device_ms / wall_ms if cuda and wall_ms > 0 else None,
        "host_copies_per_call": {e.key: e.count / iters for e in copies},
        "stalls": stalls[:8],
    }


def balance_text(b: dict) -> str:
    lines = [f"per call: wall {b['wall_ms']:.2f} ms unprofiled, host {b['host_ms_profiled']:.2f} ms profiled"]
    if b["device_ms"] is not None:
        lines[0] += f", device {b['device_ms']:.2f} ms ({100 * b['device_busy']:.0f}% of the wall time busy)"
    for name, n in b["host_copies_per_call"].items():
        lines.append(f"  {n:g} x {name} per call")
    for s in b["stalls"]:
        lines.append(f"  stall {s['op']}: {s['calls_per_call']:g} per call, {s['cpu_ms']:.3f} ms host")
        lines += [f"      {line}" for line in s["stack"]]
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    """One WxH (qairn bench's --sizes takes a list; the profile is of one frame size)."""
    sizes = qb.parse_sizes(text)
    if len(sizes) != 1:
        raise argparse.ArgumentTypeError(f"one WxH size, got {text!r}")
    return sizes[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=list(qb.SPECS))
    p.add_argument(
        "--from",
        dest="report",
        type=qb.path_arg,
        help="a `qairn bench --json` report: profile its best backend",
    )
    p.add_argument("--size", type=parse_size, default="3840x2160", help="WxH (default 3840x2160)")
    p.add_argument("--tile", type=int, default=512, help="0 = whole image")
    p.add_argument("--preset", choices=sorted(qb.PRESETS))
    p.add_argument("--weights", type=qb.path_arg, help="qairn safetensors (default: the shipped weights)")
    p.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (made the current CUDA device)"
    )
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--out", type=qb.path_arg, help="write the profiler table here")
    p.add_argument("--json", type=qb.path_arg, help="write the top ops here")
    args = p.parse_args(argv)
    if args.iters < 1:
        raise SystemExit(f"--iters must be at least 1, got {args.iters}")
    if args.tile < 0:
        raise SystemExit(f"--tile must not be negative, got {args.tile}")
    qb.check_outputs(args.out, args.json)  # before the profiling, not after it
    device = qb.resolve(args.device)
    label = args.backend or best_backend(args.report, device)
    if qb.skip_reason(label, device):
        raise SystemExit(f"{label}: {qb.skip_reason(label, device)}")
    (w, h), tile = args.size, args.tile or None
    try:
        model, source = qb.bench_model(args.weights, args.preset)
    except WeightsError as e:
        raise SystemExit(str(e)) from None
    restorer = qb.make_restorer(model, label, device, tile, qb.parser().parse_args([]))  # bench's defaults
    x = qb.synthetic_frame(h, w, device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(3):
        restorer.restore_tensor(x)
    sync()
    t0 = time.perf_counter()  # the wall clock without the profiler, to set host and device time against
    for _ in range(args.iters):
        restorer.restore_tensor(x)
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.iters
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.iters):
            restorer.restore_tensor(x)
        sync()
    with stack_profile(activities) as stacked:  # one more call, for the stalls' stacks
        restorer.restore_tensor(x)
        sync()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    top = top_ops(prof.key_averages(), key, args.iters, args.rows)
    balance = host_device_balance(prof, stacked, wall_ms, args.iters, cuda)
    title = (
        f"{label} on {qb.environment(device)['device']['name']}, {w}x{h} tile {tile or 'whole'}, {source}, "
        f"{calls(args.iters, 'profiled call')}"
    )
    where = "device" if cuda else "CPU"
    lines = [f"  share of {where} self time, self ms per call, count per call, op"]
    lines += [
        f"  {100 * t['share']:5.1f}%  {t['self_ms']:9.3f} ms  {t['calls'] / args.iters:>6g}  {t['op'][:90]}"
        for t in top
    ]
    # torch's own table sums the calls, and its Self CUDA column counts each annotation range on top of
    # the kernels inside it: kept below the per-call list for its other columns, labelled so.
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows)
    table_title = f"torch.profiler's table: totals over the {calls(args.iters)} (annotation ranges included)"
    print(title, *lines, balance_text(balance), sep="\n")
    # Atomic: gpu_run.sh's time box may interrupt the write, and a cut file would be copied out.
    if args.out:
        text = "\n".join([title, *lines, balance_text(balance), "", table_title, table])
        write_atomic(args.out, (text + "\n").encode())
    if args.json:
        report = {"backend": label, "size": [w, h], "tile": tile, "model": source, "sort": key}
        report |= {"iters": args.iters, "top": top, **balance}
        write_atomic(args.json, (json.dumps(report, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
