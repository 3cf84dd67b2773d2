"""Conv-trunk utilisation: how close the network's convolutions get to the measured matmul peak.

Every Conv2d / ConvTranspose2d call of one forward pass is replayed alone (at its recorded input
shape, in the given precision, channels_last on CUDA, cuDNN autotuned), timed with events as the
median of repeats; identical calls are timed once and counted as often as they occur. The trunk's
utilisation is (sum of conv FLOPs) / (sum of conv times) / (measured peak matmul rate). The whole
forward pass at the same shape is timed too (its FLOPs are all conv FLOPs, so the same ratio shows
what the elementwise work and launch gaps cost).

The roofline says what is physically possible: a layer cannot beat max(FLOPs / peak, bytes / copy
bandwidth), its bytes being one read of input and weights and one write of the output (measured
copy bandwidth of the device). Their sum over the trunk bounds its utilisation from above.
On CUDA, each conv and transposed conv the fused Triton kernels take (qairn/kernels/conv.py,
conv_transpose.py) also runs on them, over a few tilings (the best kept), and the whole forward runs
again with the model's thin convs fused (qairn/kernels/fuse.py).

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
from qairn.engine.imageio import save_figure, write_atomic
from qairn.kernels import conv as cv
from qairn.kernels import conv_transpose as ct
from qairn.kernels import fuse
from qairn.model import PRESETS, QAIRN
from qairn.weights_io import WeightsError, load_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def time_ms(fn, device, repeats: int) -> float:
    return statistics.median(qb.measure(fn, device, warmup=3, repeats=repeats, budget_s=5.0)["ms"])


def copy_bandwidth(device, dtype, repeats: int) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), or of 64 MiB on CPU."""
    numel = (2**30 if device.type == "cuda" else 2**26) // torch.finfo(dtype).bits * 8
    src = torch.empty(numel, device=device, dtype=dtype).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def min_bytes(module, shape, itemsize: int) -> int:
    """One read of the input and the weights, one write of the output."""
    n, cin, h, w = shape
    s = module.stride[0]
    if isinstance(module, torch.nn.ConvTranspose2d):
        oh, ow = h * s, w * s
    else:
        k, p = module.kernel_size[0], module.padding[0]
        oh, ow = cv.out_size(h, k, s, p), cv.out_size(w, k, s, p)
    return itemsize * (n * cin * h * w + n * module.out_channels * oh * ow + module.weight.numel())


TRITON_MAX_CHANNELS = 128  # wider convs are cuDNN's ground (and their tilings cost compile time here)
FUSE_WIDTHS = (16, 32, 64, 128)


def time_triton(conv, x, device, repeats: int) -> dict | None:
    """The fused kernel on this conv (bias, no epilogue): the best of a few tilings. On CPU only under
    TRITON_INTERPRET=1 (the dry run), with the default tiling: that proves the code, not the speed."""
    runs = device.type == "cuda" or cv.INTERPRETED
    if not (runs and cv.HAS_TRITON):
        return None
    if fuse.fusable_conv(conv, TRITON_MAX_CHANNELS):

        def call(c):
            return cv.conv_triton(x, conv.weight, conv.bias, conv.stride[0], conv.padding[0], config=c)

    elif fuse.fusable_conv_transpose(conv, TRITON_MAX_CHANNELS):

        def call(c):
            return ct.conv_transpose_triton(x, conv.weight, conv.bias, config=c)

    else:
        return None
    configs = cv.candidate_configs(conv.in_channels, conv.out_channels)
    best = None
    for config in configs if device.type == "cuda" else configs[:1]:
        try:
            ms = time_ms(lambda c=config: call(c), device, repeats)
        except Exception as e:  # a tiling this device cannot run (shared memory): try the next
            print(f"       triton {config}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        if best is None or ms < best["ms"]:
            best = {"ms": ms, "config": list(config)}
    return best


def conv_util(
    model: QAIRN,
    shape,
    dtype,
    device,
    peak_tflops: float,
    repeats: int,
    bandwidth: float | None = None,
    progress=None,
) -> dict:
    """The trunk's numbers: cuDNN per layer and the whole forward first (handed to progress(result),
    marked "complete": False), then the fused Triton kernels, which compile a kernel per tiling: on a
    slow compile the time box cut the whole model and kept none of its numbers, cuDNN's included."""
    n, _, h, w = shape
    cl = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    groups = {}  # identical calls (module config + input shape) are timed once
    for call in qb.conv_layers(model, h, w, batch=n):
        m = call["module"]
        key = (type(m).__name__, m.in_channels, m.out_channels, m.kernel_size, m.stride, call["shape"])
        groups.setdefault(key, {"names": [], "flops": call["flops"], "shape": call["shape"]})
        groups[key]["names"].append(call["name"])
    layers, operands = [], []
    with torch.inference_mode():
        for key, g in groups.items():
            conv = copy.deepcopy(model.get_submodule(g["names"][0]))  # the recorded module is on meta
            conv = conv.to(device=device, dtype=dtype, memory_format=cl)
            x = torch.randn(g["shape"], device=device, dtype=dtype).contiguous(memory_format=cl)
            ms = time_ms(lambda conv=conv, x=x: conv(x), device, repeats)
            nbytes = min_bytes(conv, g["shape"], x.element_size())
            roof_ms = max(g["flops"] / (peak_tflops * 1e12), nbytes / bandwidth if bandwidth else 0.0) * 1e3
            operands.append((conv, x))
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
                    "bytes": nbytes,
                    "roofline_ms": roof_ms,
                    "triton_ms": None,
                    "triton_config": None,
                }
            )
        net = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=cl).eval()
        x = torch.rand(shape, device=device, dtype=dtype).contiguous(memory_format=cl)
        forward_ms = time_ms(lambda: net(x), device, repeats)
        if progress is not None:
            progress(trunk_summary(shape, layers, forward_ms, {}, peak_tflops) | {"complete": False})
        for layer, (conv, layer_x) in zip(layers, operands, strict=True):
            fused = time_triton(conv, layer_x, device, repeats)
            if fused:
                layer["triton_ms"], layer["triton_config"] = fused["ms"], fused["config"]
        # The whole forward with the convs up to each width fused (which width pays is the question).
        fused_forward = {}
        if device.type == "cuda" and cv.HAS_TRITON:
            for width in FUSE_WIDTHS:
                fuse.fuse_convs(fuse.unfuse_convs(net), max_channels=width)
                fused_forward[str(width)] = time_ms(lambda: net(x), device, repeats)
    return trunk_summary(shape, layers, forward_ms, fused_forward, peak_tflops) | {"complete": True}


def trunk_summary(
    shape, layers: list[dict], forward_ms: float, fused_forward: dict, peak_tflops: float
) -> dict:
    flops = sum(layer["gflop"] * layer["count"] for layer in layers) * 1e9
    conv_ms = sum(layer["ms"] * layer["count"] for layer in layers)
    # Per layer the faster of cuDNN and the fused kernel: what a conv backend choosing per layer gets.
    best_ms = sum(min(layer["ms"], layer["triton_ms"] or layer["ms"]) * layer["count"] for layer in layers)
    roof_ms = sum(layer["roofline_ms"] * layer["count"] for layer in layers)
    return {
        "shape": list(shape),
        "gflop": flops / 1e9,
        "conv_ms": conv_ms,
        "forward_ms": forward_ms,
        "conv_tflops": flops / (conv_ms * 1e-3) / 1e12,
        "forward_tflops": flops / (forward_ms * 1e-3) / 1e12,
        "conv_util": flops / (conv_ms * 1e-3) / 1e12 / peak_tflops,
        "forward_util": flops / (forward_ms * 1e-3) / 1e12 / peak_tflops,
        "best_conv_ms": best_ms,
        "best_conv_util": flops / (best_ms * 1e-3) / 1e12 / peak_tflops,
        "fused_forward_ms": dict(fused_forward),  # {max_channels: ms}
        "fused_forward_util": (
            flops / (min(fused_forward.values()) * 1e-3) / 1e12 / peak_tflops if fused_forward else None
        ),
        "roofline_ms": roof_ms,
        "roofline_util": flops / (roof_ms * 1e-3) / 1e12 / peak_tflops,
        # the costliest first; copies, so a later update of the list does not change a saved report
        "layers": [dict(layer) for layer in sorted(layers, key=lambda layer: -layer["ms"] * layer["count"])],
    }


def write_plot(report: dict, path: str) -> None:
    """Per layer group of each model: time on cuDNN, on the fused Triton kernel (when timed) and the
    roofline floor, as bars (ms x count, log scale): where the trunk's time goes and what is left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(report["presets"].items())
    fig, axes = plt.subplots(
        1, len(presets), figsize=(7 * len(presets), 0.32 * max(len(r["layers"]) for _, r in presets) + 1.8)
    )
    axes = [axes] if len(presets) == 1 else list(axes)
    for ax, (name, r) in zip(axes, presets, strict=True):
        layers = r["layers"][::-1]  # the costliest on top
        ys = range(len(layers))
        cudnn = [layer["ms"] * layer["count"] for layer in layers]
        fused = [(layer["triton_ms"] or 0) * layer["count"] for layer in layers]
        roof = [layer["roofline_ms"] * layer["count"] for layer in layers]
        ax.barh([y + 0.27 for y in ys], cudnn, 0.27, label="cuDNN / ATen")
        if any(fused):
            ax.barh(list(ys), fused, 0.27, label="fused Triton kernel")
        ax.barh([y - 0.27 for y in ys], roof, 0.27, color="0.6", label="roofline floor")
        ax.set_yticks(
            list(ys),
            [
                f"{'T' if layer['layer'] == 'ConvTranspose2d' else ''}{layer['cin']}->{layer['cout']} "
                f"k{layer['kernel'][0]}s{layer['stride'][0]} {layer['input'][-2]}px x{layer['count']}"
                for layer in layers
            ],
            fontsize=7,
        )
        ax.set_xscale("log")
        ax.set_xlabel("ms per forward (all calls of the layer)")
        ax.set_title(
            f"{name} {'x'.join(map(str, r['shape']))} {report['precision']}: convs {r['conv_ms']:.2f} ms = "
            f"{100 * r['conv_util']:.1f}% of peak, roofline {100 * r['roofline_util']:.0f}%",
            fontsize=8,
        )
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"conv trunk on {report['env']['device']['name']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)  # atomic: rewritten after each model
    plt.close(fig)


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """NxCxHxW of the model's input: four positive numbers, C = 3 (RGB)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1 or shape[1] != 3:
        raise argparse.ArgumentTypeError(f"expected NxCxHxW with C = 3, like 4x3x512x512, got {text!r}")
    return shape


def parse_presets(text: str) -> list[str]:
    """Comma list of model presets, checked before the peaks are measured."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        # As qairn.model.preset says it: a Python list (['smal']) is no option value.
        raise argparse.ArgumentTypeError(
            f"unknown preset{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
            f"choose one of {', '.join(sorted(PRESETS))}"
        )
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--presets",
        type=parse_presets,
        default="small,paper",
        help="presets to measure (random weights: speed only)",
    )
    p.add_argument(
        "--weights",
        type=qb.path_arg,
        action="append",
        default=[],
        help="also measure this weights file's model",
    )
    p.add_argument(
        "--shape", type=parse_shape, default="4x3x512x512", help="NxCxHxW input (default: a batch of 4 tiles)"
    )
    p.add_argument("--precision", choices=sorted(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (made the current CUDA device)"
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=qb.path_arg, help="write the results here")
    p.add_argument("--plot", type=qb.path_arg, help="write a PNG of the per-layer times against the roofline")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if not args.presets and not args.weights:
        raise SystemExit("--presets names none and no --weights given: nothing to measure")
    qb.check_outputs(args.json, args.plot)  # before the measuring, not after the first model
    qb.check_plot(args.plot)  # a PNG, named so
    for w in args.weights:  # and a bad weights file before the peaks and the presets are measured
        try:
            load_model(w)
        except WeightsError as e:
            raise SystemExit(str(e)) from None
    device = qb.resolve(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    shape = args.shape
    peaks = qb.peak_matmul(device)
    peak = peaks.get(precision, max(peaks.values()))
    bandwidth = copy_bandwidth(device, DTYPES[precision], args.repeats)
    report = {
        "env": qb.environment(device),
        "precision": precision,
        "peak_tflops": peaks,
        "peak_used": {"dtype": precision if precision in peaks else "max", "tflops": peak},
        "copy_gbps": bandwidth / 1e9,
        "presets": {},
    }
    print(
        f"{report['env']['device']['name']}: measured {precision} matmul peak {peak:.3g} TFLOP/s, "
        f"copy {bandwidth / 1e9:.0f} GB/s"
    )
    models = [(name, lambda name=name: QAIRN(PRESETS[name]).eval()) for name in args.presets]
    models += [(Path(w).stem, lambda w=w: load_model(w)) for w in args.weights]

    def save(name, model, r):
        # Written after each model, and after its cuDNN part: a run cut short by its time box keeps
        # what it finished.
        report["presets"][name] = r | {"config": asdict(model.config)}
        if args.json:
            write_atomic(args.json, (json.dumps(report, indent=1) + "\n").encode())
        if args.plot:
            write_plot(report, args.plot)

    for name, build in models:
        model = build()
        r = conv_util(
            model,
            shape,
            DTYPES[precision],
            device,
            peak,
            args.repeats,
            bandwidth,
            progress=lambda partial, name=name, model=model: save(name, model, partial),
        )
        save(name, model, r)
        print(
            f"{name:>6} {'x'.join(map(str, shape))}: {r['gflop']:.1f} GFLOP; "
            f"convs alone {r['conv_ms']:.3f} ms = "
            f"{r['conv_tflops']:.3g} TFLOP/s = {100 * r['conv_util']:.1f}% of peak; whole forward "
            f"{r['forward_ms']:.3f} ms = {100 * r['forward_util']:.1f}% of peak; "
            f"roofline {r['roofline_ms']:.3f} ms = {100 * r['roofline_util']:.1f}% of peak"
        )
        if r["fused_forward_ms"]:
            widths = ", ".join(f"<= {w}: {ms:.3f} ms" for w, ms in r["fused_forward_ms"].items())
            print(
                f"       fused Triton convs: best per layer {r['best_conv_ms']:.3f} ms = "
                f"{100 * r['best_conv_util']:.1f}% of peak; whole forward with convs fused up to {widths} "
                f"(best {100 * r['fused_forward_util']:.1f}% of peak)"
            )
        for layer in r["layers"][:8]:
            print(
                f"       {layer['layer']:<15} {layer['cin']:>4}->{layer['cout']:<4} k{layer['kernel'][0]} "
                f"s{layer['stride'][0]} in {'x'.join(map(str, layer['input'])):<18} x{layer['count']:<2} "
                f"{layer['ms']:8.3f} ms {layer['tflops']:8.3g} TFLOP/s roof {layer['roofline_ms']:7.3f} ms"
                + (
                    f" triton {layer['triton_ms']:7.3f} ms {layer['triton_config']}"
                    if layer["triton_ms"]
                    else ""
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
