"""Conv-trunk utilisation: how close the network's convolutions get to the measured matmul peak.

Every Conv2d / ConvTranspose2d call of one forward pass is replayed alone (at its recorded input
shape, in the given precision, channels_last on CUDA, cuDNN autotuned), timed with events as the
median of repeats; identical calls are timed once and counted as often as they occur. The trunk's
utilisation is (sum of conv FLOPs) / (sum of conv times) / (measured peak matmul rate). The whole
forward pass at the same shape is timed too (its FLOPs are all conv FLOPs, so the same ratio shows
what the elementwise work and launch gaps cost).

    python bench/conv_util.py --presets small,paper --shape 4x3x512x512 --json convutil.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from qairn.engine import bench as qb
from qairn.model import PRESETS, QAIRN
from qairn.weights_io import load_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def time_ms(fn, device, repeats: int) -> float:
    return statistics.median(qb.measure(fn, device, warmup=3, repeats=repeats, budget_s=5.0)["ms"])


def conv_util(model: QAIRN, shape, dtype, device, peak_tflops: float, repeats: int) -> dict:
    n, _, h, w = shape
    cl = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    groups = {}  # identical calls (module config + input shape) are timed once
    for call in qb.conv_layers(model, h, w, batch=n):
        m = call["module"]
        key = (type(m).__name__, m.in_channels, m.out_channels, m.kernel_size, m.stride, call["shape"])
        groups.setdefault(key, {"names": [], "flops": call["flops"], "shape": call["shape"]})
        groups[key]["names"].append(call["name"])
    layers = []
    with torch.inference_mode():
        for key, g in groups.items():
            conv = copy.deepcopy(model.get_submodule(g["names"][0]))  # the recorded module is on meta
            conv = conv.to(device=device, dtype=dtype, memory_format=cl)
            x = torch.randn(g["shape"], device=device, dtype=dtype).contiguous(memory_format=cl)
            ms = time_ms(lambda conv=conv, x=x: conv(x), device, repeats)
            layers.append(
                {
                    "layer": key[0],
                    "cin": key[1],
                    "cout": key[2],
                    "kernel": list(key[3]),
                    "stride": list(key[4]),
                    "input": list(key[5]),
                    "count": len(g["names"]),
                    "names": g["names"],
                    "gflop": g["flops"] / 1e9,
                    "ms": ms,
                    "tflops": g["flops"] / (ms * 1e-3) / 1e12,
                }
            )
        net = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=cl).eval()
        x = torch.rand(shape, device=device, dtype=dtype).contiguous(memory_format=cl)
        forward_ms = time_ms(lambda: net(x), device, repeats)
    flops = sum(layer["gflop"] * layer["count"] for layer in layers) * 1e9
    conv_ms = sum(layer["ms"] * layer["count"] for layer in layers)
    layers.sort(key=lambda layer: -layer["ms"] * layer["count"])
    return {
        "shape": list(shape),
        "gflop": flops / 1e9,
        "conv_ms": conv_ms,
        "forward_ms": forward_ms,
        "conv_tflops": flops / (conv_ms * 1e-3) / 1e12,
        "forward_tflops": flops / (forward_ms * 1e-3) / 1e12,
        "conv_util": flops / (conv_ms * 1e-3) / 1e12 / peak_tflops,
        "forward_util": flops / (forward_ms * 1e-3) / 1e12 / peak_tflops,
        "layers": layers,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="small,paper", help="presets to measure (random weights: speed only)")
    p.add_argument("--weights", action="append", default=[], help="also measure this weights file's model")
    p.add_argument("--shape", default="4x3x512x512", help="NxCxHxW input (default: a batch of 4 tiles)")
    p.add_argument("--precision", choices=sorted(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = qb.resolve(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    peaks = qb.peak_matmul(device)
    peak = peaks.get(precision, max(peaks.values()))
    report = {
        "env": qb.environment(device),
        "precision": precision,
        "peak_tflops": peaks,
        "peak_used": {"dtype": precision if precision in peaks else "max", "tflops": peak},
        "presets": {},
    }
    print(f"{report['env']['device']['name']}: measured {precision} matmul peak {peak:.3g} TFLOP/s")
    models = [
        (name, lambda name=name: QAIRN(PRESETS[name]).eval()) for name in args.presets.split(",") if name
    ]
    models += [(Path(w).stem, lambda w=w: load_model(w)) for w in args.weights]
    for name, build in models:
        model = build()
        r = conv_util(model, shape, DTYPES[precision], device, peak, args.repeats)
        r["config"] = asdict(model.config)
        report["presets"][name] = r
        print(
            f"{name:>6} {args.shape}: {r['gflop']:.1f} GFLOP; convs alone {r['conv_ms']:.3f} ms = "
            f"{r['conv_tflops']:.3g} TFLOP/s = {100 * r['conv_util']:.1f}% of peak; whole forward "
            f"{r['forward_ms']:.3f} ms = {100 * r['forward_util']:.1f}% of peak"
        )
        for layer in r["layers"][:6]:
            print(
                f"       {layer['layer']:<15} {layer['cin']:>4}->{layer['cout']:<4} k{layer['kernel'][0]} "
                f"s{layer['stride'][0]} in {'x'.join(map(str, layer['input'])):<18} x{layer['count']:<2} "
                f"{layer['ms']:8.3f} ms {layer['tflops']:8.3g} TFLOP/s"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
