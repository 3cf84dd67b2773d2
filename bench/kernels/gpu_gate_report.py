"""One-shot GPU report for the fused gate (qairn/kernels/gate.py), written as JSON.

    python bench/kernels/gpu_gate_report.py [out.json] [--budget-s 40] [--device cuda:N]
    (default path $OUT/gate.json, else ./gate.json; default device: the current GPU)

On CUDA it records the GPU and the torch/triton versions; device copy bandwidth; on the 4K tile
batch (40 x C x 544 x 544, C = 16 and 64) the fused op's time, GB/s, fraction of copy bandwidth,
speedup over the eager sequence and the cost of pooling on top of the blend; the Triton forward's and
backward's largest errors against a float64 reference per dtype and layout, and whether pooling
repeats bit for bit; the backward's speed; a small sweep of tile sizes. Times are medians of
CUDA-event-timed calls after warm-up.

Most of the time goes to compiling kernel variants (about one per dtype, layout and option set), so
the work runs as a list of jobs, most wanted first, and stops starting new ones once --budget-s
seconds have passed since start; the JSON is rewritten after every job and names the jobs skipped.
Without CUDA (or with --device cpu) it prints a skip message and exits 0. --device cuda:N measures
that GPU (not only through CUDA_VISIBLE_DEVICES): it is made the current device for the run (raw
Triton launches, CUDA-graph replays and empty_cache follow the current one), and the properties,
events, streams and synchronizes name it too.
"""

import os
import time

START = time.monotonic()
os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: time compiled kernels only

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gate_workload  # noqa: E402
from gate_workload import TILE_CORE, TILES_4K, eager_sequence, gate_bytes, make_inputs  # noqa: E402

DEVICE = torch.device("cuda")  # main() sets the GPU measured, with its index
P = 2.0
TARGETS = {"frac_of_copy_min": 0.80, "speedup_vs_eager_min": 2.5, "pool_overhead_max": 0.02}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}  # relative to max(1, |reference|)
LAYOUTS = ("nchw", "channels_last")


def cuda_time_ms(fn):
    """gate_workload.cuda_time_ms on DEVICE's stream."""
    return gate_workload.cuda_time_ms(fn, device=DEVICE)


def paired_ratio(fn_a, fn_b):
    """gate_workload.paired_ratio, timed on DEVICE's stream."""
    return gate_workload.paired_ratio(fn_a, fn_b, device=DEVICE)


def environment():
    import triton

    props = torch.cuda.get_device_properties(DEVICE)
    return {
        "device": str(DEVICE),
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_GiB": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def copy_bandwidth():
    src = torch.empty(2**30, dtype=torch.float16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src))
    return {"bytes": 2 * src.nbytes, "ms": ms, "GBps": 2 * src.nbytes / ms / 1e6}


def graphed(fn):
    """fn captured in a CUDA graph, returned as its replay: the engine runs the gate inside
    torch.compile's CUDA graphs, where launch gaps and host work vanish and only GPU time is left."""
    with torch.cuda.device(DEVICE):  # torch.cuda.graph captures on the current device
        side = torch.cuda.Stream(DEVICE)
        side.wait_stream(torch.cuda.current_stream(DEVICE))
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs advises
            for _ in range(3):
                fn()
        torch.cuda.current_stream(DEVICE).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph.replay  # on the current stream of the current device: main() made that DEVICE


def throughput(gate, c, dtype_name, layout, copy_gbps):
    n, h, w = TILES_4K
    logit, skip, dec = make_inputs(n, c, h, w, DTYPES[dtype_name], DEVICE, layout == "channels_last")
    cores = gate.as_cores(torch.tensor(TILE_CORE), logit)
    fused = gate.gated_blend_triton
    ms = {
        "blend": cuda_time_ms(lambda: fused(logit, skip, dec, write_gamma=False)),
        "blend_pool": cuda_time_ms(lambda: fused(logit, skip, dec, P, cores, write_gamma=False)),
        "blend_pool_gamma": cuda_time_ms(lambda: fused(logit, skip, dec, P, cores)),
        "op_blend_pool_gamma": cuda_time_ms(lambda: gate.gated_blend(logit, skip, dec, P, cores)),
        "eager": cuda_time_ms(lambda: eager_sequence(logit, skip, dec, P)),
    }
    # The pooling's cost is a difference of a few percent: measure it paired (see paired_ratio).
    pool = paired_ratio(
        lambda: fused(logit, skip, dec, write_gamma=False),
        lambda: fused(logit, skip, dec, P, cores, write_gamma=False),
    )
    try:  # the same pair replayed from CUDA graphs (the engine's case); report it beside the eager one
        pool_graph = paired_ratio(
            graphed(lambda: fused(logit, skip, dec, write_gamma=False)),
            graphed(lambda: fused(logit, skip, dec, P, cores, write_gamma=False)),
        )
    except Exception as e:  # noqa: BLE001 - a capture failure must not cost the eager numbers
        pool_graph = {"error": f"{type(e).__name__}: {e}"[:300]}
    moved = gate_bytes(logit, skip)
    gbps = moved / ms["blend_pool"] / 1e6
    return {
        "shape": [n, c, h, w],
        "dtype": dtype_name,
        "layout": layout,
        "ms": ms,
        "bytes_blend": moved,
        "GBps_blend": moved / ms["blend"] / 1e6,
        "GBps_blend_pool": gbps,
        "GBps_blend_pool_gamma": gate_bytes(logit, skip, True) / ms["blend_pool_gamma"] / 1e6,
        "frac_of_copy": gbps / copy_gbps,
        # The eager sequence also writes gamma: compare it with the fused op that does.
        "speedup_vs_eager": ms["eager"] / ms["blend_pool_gamma"],
        "pool_overhead": pool["median"] - 1,
        "pool_overhead_quartiles": [pool["q1"] - 1, pool["q3"] - 1],
        "pool_overhead_unpaired": ms["blend_pool"] / ms["blend"] - 1,
        "pool_overhead_graph": pool_graph["median"] - 1 if "median" in pool_graph else None,
        "pool_overhead_graph_quartiles": [pool_graph["q1"] - 1, pool_graph["q3"] - 1]
        if "q1" in pool_graph
        else None,
        "pool_overhead_graph_error": pool_graph.get("error"),
    }


def max_err(got, want):
    """Largest |got - want| / max(1, |want|)."""
    return ((got.double() - want) / want.abs().clamp_min(1)).abs().max().item()


def correctness(gate, dtype_name, layout):
    cores = torch.tensor([[1, 60, 3, 131], [-2, 80, 0, 70], [10, 10, 0, 5]], device=DEVICE)
    logit, skip, dec = make_inputs(3, 24, 67, 131, DTYPES[dtype_name], DEVICE, layout == "channels_last")
    out, gamma, pool_sum, pool_count = gate.gated_blend_triton(logit, skip, dec, p=P, cores=cores)
    leaves = [t.double().requires_grad_() for t in (logit, skip, dec)]
    ref_out, ref_gamma, ref_sum, ref_count = gate.gated_blend_reference(*leaves, p=P, cores=cores)
    grad_out, grad_gamma, grad_sum = (
        torch.randn_like(skip),
        torch.randn_like(logit),
        torch.randn(3, device=DEVICE) * 2.0**-gate.POOL_SCALE_LOG2,  # sums are scaled by 2**96
    )
    grads = gate.gated_blend_backward_triton(grad_out, grad_gamma, grad_sum, logit, skip, dec, P, cores)
    loss = (ref_out * grad_out).sum() + (ref_gamma * grad_gamma).sum() + (ref_sum * grad_sum).sum()
    ref_grads = torch.autograd.grad(loss, leaves)
    errors = {
        "out": max_err(out, ref_out.detach()),
        "gamma": max_err(gamma, ref_gamma.detach()),
        "grad_logit": max_err(grads[0], ref_grads[0]),
        "grad_skip": max_err(grads[1], ref_grads[1]),
        "grad_dec": max_err(grads[2], ref_grads[2]),
    }
    pool_err = ((pool_sum.double() - ref_sum) / ref_sum.clamp_min(1e-12)).abs().max().item()
    count_exact = pool_count.tolist() == ref_count.tolist()
    return {
        "dtype": dtype_name,
        "layout": layout,
        "max_err": errors,
        "pool_sum_rel_err": pool_err,
        "pool_count_exact": count_exact,
        # Through torch.ops dispatch: bit-equal to the launcher iff CUDA reaches the Triton kernel.
        "op_is_triton": torch.equal(gate.gated_blend(logit, skip, dec, p=P, cores=cores)[0], out),
        "pass": all(v <= TOL[dtype_name] for v in errors.values()) and pool_err <= 2e-5 and count_exact,
    }


def determinism(gate):
    n, h, w = TILES_4K
    logit, skip, dec = make_inputs(n, 64, h, w, torch.float16, DEVICE)
    cores = gate.as_cores(torch.tensor(TILE_CORE), logit)
    sums = [gate.gated_blend_triton(logit, skip, dec, P, cores)[2] for _ in range(5)]
    return {"pool_bitwise_repeatable": all(torch.equal(s, sums[0]) for s in sums)}


def backward(gate, layout):
    n, h, w = TILES_4K
    logit, skip, dec = make_inputs(n, 64, h, w, torch.float16, DEVICE, layout == "channels_last")
    grad_out = torch.randn_like(skip)
    leaves = [t.detach().requires_grad_() for t in (logit, skip, dec)]

    def eager_train():
        gamma = torch.sigmoid(leaves[0])
        return torch.autograd.grad(gamma * leaves[1] + (1 - gamma) * leaves[2], leaves, grad_out)

    def fused_train():
        return torch.autograd.grad(gate.gated_blend(*leaves, write_gamma=False)[0], leaves, grad_out)

    ms = {
        "fused_backward": cuda_time_ms(
            lambda: gate.gated_blend_backward_triton(grad_out, None, None, logit, skip, dec, None, None)
        ),
        "fused_forward_backward": cuda_time_ms(fused_train),
        "eager_forward_backward": cuda_time_ms(eager_train),
    }
    moved = 2 * logit.nbytes + 5 * skip.nbytes  # read grad_out, skip, dec, logit; write three grads
    return {
        "shape": [n, 64, h, w],
        "dtype": "float16",
        "layout": layout,
        "ms": ms,
        "GBps_backward": moved / ms["fused_backward"] / 1e6,
        "speedup_train_vs_eager": ms["eager_forward_backward"] / ms["fused_forward_backward"],
    }


SWEEP = {
    "nchw": [(1, 1024, 4), (2, 1024, 4), (4, 1024, 4), (8, 512, 4), (4, 2048, 8), (8, 1024, 8), (16, 256, 4)],
    "channels_last": [(64, 64, 4), (64, 32, 4), (64, 128, 8), (32, 128, 4), (16, 256, 4), (64, 64, 8)],
}


def sweep(gate, c, layout, copy_gbps, deadline):
    """Each tile config of SWEEP (block_c capped at C) at fp16: its time with pooling, and the
    pooling's cost on top of its own blend, paired and replayed from CUDA graphs. A config that beats
    the default on both is the candidate for tile_config."""
    n, h, w = TILES_4K
    logit, skip, dec = make_inputs(n, c, h, w, torch.float16, DEVICE, layout == "channels_last")
    cores = gate.as_cores(torch.tensor(TILE_CORE), logit)
    import triton

    default = gate.tile_config(c, layout == "channels_last")
    fused = gate.gated_blend_triton
    rows, seen = [], set()
    for block_c, block_p, num_warps in [default] + SWEEP[layout]:
        block_c = min(block_c, triton.next_power_of_2(c))
        if (block_c, block_p, num_warps) in seen:
            continue
        seen.add((block_c, block_p, num_warps))
        if time.monotonic() > deadline:
            break
        tile = dict(block_c=block_c, block_p=block_p, num_warps=num_warps)
        ms = cuda_time_ms(lambda tile=tile: fused(logit, skip, dec, P, cores, False, **tile))
        pool = paired_ratio(
            graphed(lambda tile=tile: fused(logit, skip, dec, None, None, False, **tile)),
            graphed(lambda tile=tile: fused(logit, skip, dec, P, cores, False, **tile)),
        )
        gbps = gate_bytes(logit, skip) / ms / 1e6
        rows.append(
            dict(
                c=c,
                layout=layout,
                **tile,
                default=(block_c, block_p, num_warps) == default,
                ms=ms,
                GBps=gbps,
                frac_of_copy=gbps / copy_gbps,
                pool_overhead_graph=pool["median"] - 1,
                pool_overhead_graph_quartiles=[pool["q1"] - 1, pool["q3"] - 1],
            )
        )
    return rows


def model_pool_overhead(gate, n: int = 4, size: int = 544, dtype=torch.float16):
    """What quality costs the whole restore: the shipped model's fp16 channels_last forward through
    the Triton gate on a batch of four 544x544 tiles, with pooling (pool_p, core boxes) against
    without, paired and replayed from CUDA graphs. Both write the gamma maps; only the sums differ."""
    from qairn.engine.restorer import default_weights
    from qairn.weights_io import load_model

    model = load_model(default_weights()).to(DEVICE, dtype).eval()
    model = gate.use_gate_backend(model.to(memory_format=torch.channels_last), "triton")
    torch.manual_seed(0)
    x = torch.rand(n, 3, size, size, device=DEVICE, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    margin = (size - 512) // 2 if size > 512 else size // 8  # the 4K tile batch's core: 512 of 544
    cores = torch.tensor([[margin, size - margin, margin, size - margin]] * n, device=DEVICE)
    p = float(model.config.p)
    with torch.inference_mode():
        plain = graphed(lambda: model(x))
        pooled = graphed(lambda: model(x, pool_p=p, cores=cores))
        ratio = paired_ratio(plain, pooled)
        ms = cuda_time_ms(plain)
    return {
        "shape": [n, 3, size, size],
        "p": p,
        "forward_ms": ms,
        "pool_overhead_graph": ratio["median"] - 1,
        "pool_overhead_graph_quartiles": [ratio["q1"] - 1, ratio["q3"] - 1],
    }


def pool_finish(gate):
    """What the second launch (the fixed-order sum of the partials) costs, alone, from a CUDA graph:
    if it is most of the pooling's overhead, folding it into the blend kernel is the fix; if not, the
    per-program reductions are."""
    n, h, w = TILES_4K
    rows = []
    gate.load_triton()  # _pool_finish_kernel is launched directly, not through a launcher
    for c, layout in ((64, "nchw"), (64, "channels_last"), (16, "channels_last")):
        logit, skip, dec = make_inputs(n, c, h, w, torch.float16, DEVICE, layout == "channels_last")
        block_c, block_p, num_warps = gate.tile_config(c, layout == "channels_last")
        num_blocks = -(-h * w // block_p)
        partial = torch.rand(n, num_blocks, device=DEVICE)
        cores = gate.as_cores(torch.tensor(TILE_CORE), logit).contiguous()
        pool_sum = torch.empty(n, device=DEVICE)
        pool_count = torch.empty(n, dtype=torch.int64, device=DEVICE)

        def finish(partial=partial, cores=cores, pool_sum=pool_sum, pool_count=pool_count, nb=num_blocks):
            gate._pool_finish_kernel[(n,)](
                partial, cores, pool_sum, pool_count, nb, h, w, BLOCK=512, HAS_CORES=True
            )

        replay = graphed(finish)
        blend = graphed(lambda a=(logit, skip, dec): gate.gated_blend_triton(*a, write_gamma=False))
        rows.append(
            {
                "c": c,
                "layout": layout,
                "num_blocks": num_blocks,
                "finish_ms": cuda_time_ms(replay),
                "blend_ms": cuda_time_ms(blend),
            }
        )
        rows[-1]["finish_share_of_blend"] = rows[-1]["finish_ms"] / rows[-1]["blend_ms"]
    return rows


def verdict(report):
    fp16 = [r for r in report["throughput"] if r["dtype"] == "float16"]
    if not fp16:
        return None
    return {
        "targets": TARGETS,
        "fp16_min_frac_of_copy": min(r["frac_of_copy"] for r in fp16),
        "fp16_min_speedup_vs_eager": min(r["speedup_vs_eager"] for r in fp16),
        "fp16_max_pool_overhead": max(r["pool_overhead"] for r in fp16),
        "fp16_max_pool_overhead_graph": max(
            (r["pool_overhead_graph"] for r in fp16 if r.get("pool_overhead_graph") is not None), default=None
        ),
        "met": all(
            r["frac_of_copy"] >= TARGETS["frac_of_copy_min"]
            and r["speedup_vs_eager"] >= TARGETS["speedup_vs_eager_min"]
            and r["pool_overhead"] <= TARGETS["pool_overhead_max"]
            for r in fp16
        ),
        "rows": len(fp16),
    }


def jobs(gate, report, deadline):
    """(section, name, run) in the order wanted: fp16 speed first, then correctness, then the rest."""

    def copy_gbps():
        return report["copy"]["GBps"]

    yield "copy", "copy", copy_bandwidth

    def throughput_job(dtype_name, c, layout):
        run = lambda a=(c, dtype_name, layout): throughput(gate, *a, copy_gbps())  # noqa: E731
        return "throughput", f"{dtype_name} C={c} {layout}", run

    for c in (64, 16):
        for layout in LAYOUTS:
            yield throughput_job("float16", c, layout)
    for name in DTYPES:
        for layout in LAYOUTS:
            yield "correctness", f"{name} {layout}", lambda a=(name, layout): correctness(gate, *a)
    yield "determinism", "determinism", lambda: determinism(gate)
    # Then what decides #4's pooling target: the finish launch's share and the tile sweep. (bf16's
    # speed, measured on the H200 already, and fp32's come after.)
    yield "model_pool", "model_pool", lambda: model_pool_overhead(gate)
    yield "pool_finish", "pool_finish", lambda: pool_finish(gate)
    for c, layout in ((16, "channels_last"), (64, "channels_last"), (64, "nchw"), (16, "nchw")):
        yield "sweep", f"C={c} {layout}", lambda a=(c, layout): sweep(gate, *a, copy_gbps(), deadline)
    for layout in LAYOUTS:
        yield "backward", layout, lambda layout=layout: backward(gate, layout)
    for dtype_name in ("bfloat16", "float32"):
        for c in (64, 16):
            for layout in LAYOUTS:
                yield throughput_job(dtype_name, c, layout)


def save(report, path):
    report["verdict"] = verdict(report)
    report["elapsed_s"] = round(time.monotonic() - START, 1)
    # The JSON is rewritten after every job and the run may be killed at its time limit at any
    # moment: write a temp file and rename it, so the last complete report always survives.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", help="JSON output (default $OUT/gate.json, else ./gate.json)")
    parser.add_argument("--budget-s", type=float, default=40.0, help="start no job after this many seconds")
    parser.add_argument(
        "--device",
        default="cuda",
        help="cuda (the current GPU) or cuda:N, made the current device; cpu skips",
    )
    args = parser.parse_args(argv[1:])
    global DEVICE
    if args.device == "cpu":
        print("SKIP gpu_gate_report: --device cpu; the report measures a GPU, nothing measured.")
        return 0
    if not torch.cuda.is_available():
        print("SKIP gpu_gate_report: no CUDA device (torch.cuda.is_available() is False); nothing measured.")
        return 0
    from qairn.engine import bench as qb

    DEVICE = qb.resolve(args.device)  # checked (one line if not there), with its index, made current
    if DEVICE.type != "cuda":
        print(f"SKIP gpu_gate_report: --device {args.device} is not a GPU; nothing measured.")
        return 0
    from qairn.kernels import gate

    if not gate.HAS_TRITON:
        print("gpu_gate_report: CUDA is present but triton is not installed; nothing measured.")
        return 1
    path = Path(args.path or Path(os.environ.get("OUT", ".")) / "gate.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = START + args.budget_s
    report = {
        "environment": environment(),
        "definitions": {
            "tile_batch": "3840x2160 frame as 8x5 tiles of 512+2*16 overlap: (40, C, 544, 544), core 512x512",
            "bytes_blend": "logit + skip + dec read once, out written once (gamma adds one N*H*W write)",
            "frac_of_copy": "GBps_blend_pool / device copy GB/s (copy counts its read and its write)",
            "eager": "sigmoid, mul, sub, mul, add, pow, mean (gate_workload.eager_sequence)",
            "pool_overhead": "median over 40 paired rounds (5 calls each, order alternating) of "
            "time(blend + pool) / time(blend) - 1, with its quartiles (gate_workload.paired_ratio)",
            "pool_overhead_graph": "the same, each side replayed from a CUDA graph (no launch gaps)",
            "timing": "median of 50 CUDA-event-timed calls after 10 warm-up calls",
            "units": "ms: milliseconds per call; GBps: 1e9 bytes a second (the bytes of bytes_blend)",
            "max_err": "per output and gradient: max |Triton - float64 reference| / max(1, |reference|), "
            "the reference computed on the same low-precision inputs; pass: all within tolerance",
            "tolerance": TOL,
            "p": P,
            "budget_s": args.budget_s,
        },
        "throughput": [],
        "correctness": [],
        "backward": [],
        "sweep": [],
        "pool_finish": [],
        "model_pool": None,
        "errors": [],
        "skipped": [],
    }
    for section, name, run in jobs(gate, report, deadline):
        if time.monotonic() > deadline:
            report["skipped"].append(f"{section}: {name}")
            continue
        print(f"gpu_gate_report: {section} {name} ({time.monotonic() - START:.0f} s)", flush=True)
        try:
            result = run()
            if isinstance(report.get(section), list):
                report[section] += result if isinstance(result, list) else [result]
            else:
                report[section] = result
        except Exception:  # record it and go on: a one-shot run should return what it can
            report["errors"].append({"job": f"{section}: {name}", "traceback": traceback.format_exc()})
            print(report["errors"][-1]["traceback"], file=sys.stderr)
        torch.cuda.empty_cache()
        save(report, path)
    save(report, path)
    elapsed, skipped = time.monotonic() - START, len(report["skipped"])
    print(f"gpu_gate_report: wrote {path} in {elapsed:.0f} s; skipped {skipped} jobs")
    print(json.dumps(report.get("verdict"), indent=1))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
