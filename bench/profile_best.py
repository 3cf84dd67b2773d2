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
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from qairn.engine import bench as qb


def best_backend(report_path: str | None, device: torch.device) -> str:
    fallback = "eager-fp16-cl" if device.type == "cuda" else "eager-fp32"
    if not report_path or not Path(report_path).is_file():
        return fallback
    best = json.loads(Path(report_path).read_text()).get("best") or {}
    area = lambda size: int(size.split("x")[0]) * int(size.split("x")[1])
    size = "3840x2160" if "3840x2160" in best else max(best, key=area, default=None)
    return best[size]["backend"] if size else fallback


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=list(qb.SPECS))
    p.add_argument("--from", dest="report", help="a `qairn bench --json` report: profile its best backend")
    p.add_argument("--size", default="3840x2160")
    p.add_argument("--tile", type=int, default=512, help="0 = whole image")
    p.add_argument("--preset", choices=sorted(qb.PRESETS))
    p.add_argument("--weights", help="qairn safetensors (default: the shipped weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--out", help="write the profiler table here")
    p.add_argument("--json", help="write the top ops here")
    args = p.parse_args(argv)
    device = qb.resolve(args.device)
    label = args.backend or best_backend(args.report, device)
    if qb.skip_reason(label, device):
        raise SystemExit(f"{label}: {qb.skip_reason(label, device)}")
    (w, h), tile = qb.parse_sizes(args.size)[0], args.tile or None
    model, source = qb.bench_model(args.weights, args.preset)
    opts = argparse.Namespace(tile_batch=0, overlap=32)
    restorer = qb.make_restorer(model, label, device, tile, opts)
    x = qb.synthetic_frame(h, w, device)
    cuda = device.type == "cuda"
    for _ in range(3):
        restorer.restore_tensor(x)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.iters):
            restorer.restore_tensor(x)
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events) or 1.0
    top = [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": getattr(e, key) / 1e3 / args.iters,
            "share": getattr(e, key) / total,
        }
        for e in events[: args.rows]
    ]
    title = (
        f"{label} on {qb.environment(device)['device']['name']}, {args.size} tile {tile}, {source}, "
        f"per call (of {args.iters})"
    )
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows)
    print(title)
    for t in top:
        print(f"  {100 * t['share']:5.1f}%  {t['self_ms']:9.3f} ms  {t['calls']:>6}  {t['op'][:90]}")
    if args.out:
        Path(args.out).write_text(title + "\n" + table + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "backend": label,
                    "size": [w, h],
                    "tile": tile,
                    "model": source,
                    "sort": key,
                    "iters": args.iters,
                    "top": top,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
