"""Gather the stages of bench/gpu_run.sh into one JSON (standard library only: runs in a blink).

python bench/gpu_summary.py --work WORK --out OUT [--final]   # OUT/gpu_run.json, logs.txt, copies
python bench/gpu_summary.py --best WORK/bench.json            # print the best backend's label
python bench/gpu_summary.py --choose WORK/train --shipped EVAL  # print the trained weights if better
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# With gpu_run.json and logs.txt: 6 files (gate.json and the other stages' JSON are inside gpu_run.json).
COPIED = ("bench.json", "bench.png", "profile.txt", "convutil.png")
TRAIN_COPIED = ("weights.safetensors", "train_log.csv")  # from WORK/train: 8 files, the device's limit
MAX_COPY = 15 * 2**20  # a file from $OUT may have 16 MiB
BASELINE = "eager-fp32"  # qairn bench's reference (qairn.engine.bench.BASELINE; importing it costs torch)
SIZE_4K = [3840, 2160]  # the size of issue #6's 8x target


def mean_restored_psnr(eval_json: dict | None) -> float | None:
    qfs = (eval_json or {}).get("qfs") or {}
    vals = [qfs[q]["restored"]["psnr"] for q in ("10", "20", "30", "40") if q in qfs]
    return sum(vals) / len(vals) if len(vals) == 4 else None


def choose(train: Path, shipped_eval: Path) -> dict:
    """Ship the better weights: the trained ones when their LIVE1 PSNR (mean over QF 10..40) beats
    the shipped weights' evaluation, and they beat JPEG on every metric at every QF."""
    trained, shipped = load(train / "eval.json"), load(shipped_eval)
    ours, theirs = mean_restored_psnr(trained), mean_restored_psnr(shipped)
    beats_jpeg = ours is not None and all(
        v["gain"][m] > 0 for v in trained["qfs"].values() for m in ("psnr", "ssim", "psnrb")
    )
    better = ours is not None and beats_jpeg and (theirs is None or ours > theirs)
    weights = train / "weights.safetensors"
    return {
        "trained_mean_psnr": ours,
        "shipped_mean_psnr": theirs,
        "trained_beats_jpeg_everywhere": beats_jpeg,
        "use_trained": bool(better and weights.is_file()),
        "weights": str(weights) if better and weights.is_file() else None,
    }


LOG_TAIL = 200_000  # characters kept of each stage's log


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def best_label(bench: dict | None, fallback: str = "eager-fp16-cl") -> str:
    best = (bench or {}).get("best") or {}
    for size in ("3840x2160", *best):
        if size in best:
            return best[size]["backend"]
    return fallback


def stages(work: Path) -> list[dict]:
    rows = []
    path = work / "stages.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        parts = line.split("\t")
        # A line cut short (the run killed mid-write) must not cost the summary of a scarce GPU run.
        if len(parts) != 4 or not (parts[2].isdigit() and parts[3].isdigit()):
            rows.append({"stage": parts[0], "rc": "unreadable", "line": line, "timed_out": False})
            continue
        name, rc, seconds, box = parts
        rows.append(
            {
                "stage": name,
                "rc": rc if not rc.lstrip("-").isdigit() else int(rc),
                "seconds": int(seconds),
                "time_box_s": int(box),
                "timed_out": rc in ("124", "137"),
            }
        )
    return rows


def junit(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    bad = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    return {**counts, "not_passed": bad[:50]}


def _arch(config: dict | None):
    c = config or {}
    return (list(c.get("widths") or ()), c.get("nb"), c.get("residual"), c.get("rqa_div"))


def right(row: dict, min_psnr: float) -> bool:
    """Whether a row's output may count as fast: eager fp32 (the reference), or within min_psnr dB of
    it (as qairn bench's choose_best; "NaN" from NaN pixels compares False, so it is wrong)."""
    psnr = row.get("psnr_db")
    return row["backend"] == BASELINE or (psnr is not None and float(psnr) >= min_psnr)


def best_4k(reports: dict) -> dict | None:
    """The 8x target over every report with 4K rows (name -> report: bench.json at tile 512,
    bench1024.json at tile 1024 and on whole frames): the fastest right 4K row of them all, against
    the fastest eager fp32 4K run of them all (a backend gets no credit for beating a badly tiled
    baseline). None without an eager fp32 4K run."""
    rows = [
        (name, r, (rep.get("settings") or {}).get("min_psnr", 40.0))
        for name, rep in reports.items()
        for r in (rep or {}).get("results") or []
        if r.get("status") == "ok" and r.get("size") == SIZE_4K
    ]
    eager = [(name, r) for name, r, _ in rows if r["backend"] == BASELINE]
    if not eager:
        return None
    base_name, base = min(eager, key=lambda t: t[1]["ms_median"])
    name, r = min(((n, r) for n, r, m in rows if right(r, m)), key=lambda t: t[1]["ms_median"])
    speedup = base["ms_median"] / r["ms_median"]
    return {
        "backend": r["backend"],
        "speedup": speedup,
        "report": name,
        "tile": r.get("tile"),
        "tile_used": r.get("tile_used"),
        "overlap_used": r.get("overlap_used"),
        "tile_batch": r.get("tile_batch"),
        "ms_median": r["ms_median"],
        "psnr_db": r.get("psnr_db"),
        "baseline": {"report": base_name, "tile": base.get("tile"), "ms_median": base["ms_median"]},
        "met": speedup >= 8,
    }


def targets(bench: dict | None, convutil: dict | None, bench1024: dict | None = None) -> dict:
    out = dict((bench or {}).get("targets") or {})
    # qairn bench judged the 8x target on its own rows: the bench1024 stage's 4K runs count too.
    speedup = best_4k({"bench.json": bench, "bench1024.json": bench1024})
    if speedup is not None:
        out["speedup_4k_ge_8"] = speedup
    config = ((bench or {}).get("model") or {}).get("config") or {}
    preset = config.get("preset", "small")
    measured = (convutil or {}).get("presets") or {}
    # The entry with the benchmarked model's own config (trained weights), else its preset's.
    same = [k for k, v in measured.items() if config and _arch(v.get("config")) == _arch(config)]
    preset = same[-1] if same else preset
    r = measured.get(preset)
    out["conv_trunk_ge_50pct_fp16_peak"] = (
        None
        if r is None
        else {
            "preset": preset,
            "precision": convutil["precision"],
            "conv_util": r["conv_util"],  # cuDNN
            "forward_util": r["forward_util"],
            # per layer the faster of cuDNN and the fused Triton conv, and the whole forward with it
            "best_conv_util": r.get("best_conv_util"),
            "fused_forward_util": r.get("fused_forward_util"),
            "roofline_util": r.get("roofline_util"),  # the most this trunk can reach on this device
            # False: the time box cut the fused Triton part, best_conv_util is cuDNN's alone
            "triton_timed": r.get("complete", True),
            "met": max(r["conv_util"], r.get("best_conv_util") or 0.0) >= 0.5,
        }
    )
    return out


def strict(obj):
    """obj with non-finite floats as the strings "NaN", "Infinity", "-Infinity" (as qairn bench writes
    them): the stages' JSON may hold bare NaN (json.dumps' default), which strict readers refuse."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [strict(v) for v in obj]
    return obj


def summarise(work: Path, out: Path, dryrun: bool) -> dict:
    bench = load(work / "bench.json")
    convutil = load(work / "convutil.json")
    video = load(work / "video.json")
    bench1024 = load(work / "bench1024.json")
    # The env stage may have run out of its short box (CUDA start-up on a cold machine): the GPU and
    # the date are also in each report that ran after it.
    env = load(work / "env.json") or next(
        (r["env"] for r in (bench, video, convutil) if r and r.get("env")), {}
    )
    summary = {
        "gpu": (env.get("device") or {}).get("name"),
        "date": env.get("date") or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dryrun": dryrun,
        "stages": stages(work),
        "env": env,
        "tests": junit(work / "tests.xml"),
        "targets": targets(bench, convutil, bench1024),
        "best": (bench or {}).get("best"),
        "bench": bench,
        "bench_tile1024": bench1024,
        "video": video,
        "convutil": convutil,
        "profile": load(work / "profile.json"),
        "gate": load(work / "gate.json"),
        "train": load(work / "train" / "results.json"),
        "train_eval": load(work / "train" / "eval.json"),
        "weights_choice": load(work / "choice.json"),
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_run.json.tmp"
    tmp.write_text(json.dumps(strict(summary), indent=1, allow_nan=False) + "\n")
    tmp.replace(out / "gpu_run.json")
    for name in COPIED:
        if (work / name).is_file():
            shutil.copyfile(work / name, out / name)
    for name in TRAIN_COPIED:
        src = work / "train" / name
        if src.is_file() and src.stat().st_size <= MAX_COPY:
            shutil.copyfile(src, out / name)
    logs = []
    for row in summary["stages"]:
        log = work / f"{row['stage']}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        cut = f"[... first {len(text) - LOG_TAIL} characters cut ...]\n" if len(text) > LOG_TAIL else ""
        logs.append(
            f"===== {row['stage']}: rc {row['rc']}, "
            f"{row.get('seconds', '?')} s of {row.get('time_box_s', '?')} s\n"
            f"{cut}{text[-LOG_TAIL:]}"
        )
    (out / "logs.txt").write_text("\n".join(logs))
    return summary


def gate_lines(gate: dict) -> list[str]:
    """The gate report's verdict (#4) and what the pooling costs, in a few lines."""
    lines, v = [], gate.get("verdict")
    if v:
        graph = v.get("fp16_max_pool_overhead_graph")
        pooling = f"pooling <= {v['fp16_max_pool_overhead']:+.1%} paired"
        if graph is not None:
            pooling += f" ({graph:+.1%} from graphs)"
        verdict = "MET" if v["met"] else "missed"
        lines.append(
            f"  gate fp16: >= {v['fp16_min_frac_of_copy']:.0%} of copy, "
            f">= {v['fp16_min_speedup_vs_eager']:.1f}x eager, {pooling}: targets {verdict}"
        )
    model = gate.get("model_pool")
    if model:
        lines.append(
            f"  quality pooling in the whole fp16 forward ({model['forward_ms']:.2f} ms): "
            f"{model['pool_overhead_graph']:+.1%} from graphs"
        )
    for r in gate.get("pool_finish") or []:
        lines.append(
            f"  gate C={r['c']} {r['layout']}: the summing launch is "
            f"{r['finish_share_of_blend']:.1%} of the blend"
        )
    for r in gate.get("sweep") or []:
        if r.get("pool_overhead_graph") is not None:
            lines.append(
                f"  gate sweep C={r.get('c')} {r['layout']} {r['block_c']}x{r['block_p']}/{r['num_warps']}"
                f"{' (default)' if r.get('default') else ''}: {r['frac_of_copy']:.0%} of copy, "
                f"pooling {r['pool_overhead_graph']:+.1%}"
            )
    # #4's note asks for the GB/s against copy, the speedup and the max error per dtype: the verdict
    # above gives only the worst fractions.
    copy_gbps = (gate.get("copy") or {}).get("GBps")
    for r in gate.get("throughput") or []:
        if r["dtype"] == "float16":
            lines.append(
                f"  gate fp16 C={r['shape'][1]} {r['layout']}: {r['GBps_blend_pool']:.0f} GB/s blend+pool = "
                f"{r['frac_of_copy']:.0%} of copy ({copy_gbps or 0:.0f} GB/s), "
                f"{r['speedup_vs_eager']:.2f}x eager"
            )
    worst = {}  # dtype -> the largest error of any output or gradient, any layout
    for r in gate.get("correctness") or []:
        worst[r["dtype"]] = max(worst.get(r["dtype"], 0.0), *r["max_err"].values())
    if worst:
        failed = [f"{r['dtype']} {r['layout']}" for r in gate["correctness"] if not r.get("pass")]
        lines.append(
            "  gate max error vs the float64 reference (|err| / max(1, |ref|), out, gamma, grads): "
            + ", ".join(f"{dtype} {err:.2g}" for dtype, err in worst.items())
            + (f"; OVER TOLERANCE: {', '.join(failed)}" if failed else "; all within tolerance")
        )
    return lines


def profile_lines(prof: dict) -> list[str]:
    """Whether the host or the device set the pace of the profiled backend."""
    if not prof.get("wall_ms"):
        return []
    busy = prof.get("device_busy")
    return [
        f"  profile {prof.get('backend')}: {prof['wall_ms']:.1f} ms a frame, device busy "
        + ("-" if busy is None else f"{busy:.0%}")
        + f", host stalls: {', '.join(s['op'] for s in prof.get('stalls') or []) or 'none'}"
    ]


def speedups(b: dict) -> str:
    """Both ratios of a bench report's best entry (qairn.engine.bench.choose_best): "speedup" is
    against eager fp32 at its fastest tile of that run (any tile: a backend does not get credit for
    beating a badly tiled baseline), "speedup_same_tile" against eager fp32 at the best's own tile."""
    text = f"{b['speedup']:.2f}x eager fp32 at its fastest tile"
    if b.get("speedup_same_tile") is not None:
        text += f", {b['speedup_same_tile']:.2f}x eager fp32 {where(b.get('tile'))}"
    return text


def rate(v: float) -> str:
    """As qairn bench's table: 3 significant digits (a CPU dry run's 0.00123 MP/s, not 0), whole
    numbers from 100 up."""
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def target_fields(t: dict) -> str:
    """A target's numbers as the note will quote them: utilisations in percent, other numbers as
    rate() writes them, a missing one as '-'."""

    def value(k, v):
        if v is None:
            return "-"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return str(v)
        return f"{100 * v:.3g}%" if k.endswith("_util") else rate(v)

    return ", ".join(f"{k} {value(k, v)}" for k, v in t.items() if k != "met")


def where(tile) -> str:
    return f"at tile {tile}" if tile else "on whole frames"


def speedup_target(t: dict) -> str:
    """The 8x target's numbers, and which report and settings the best and the baseline came from."""
    b = t["baseline"]
    batch = f" (tile batch {t['tile_batch']})" if t.get("tile_batch") else ""
    return (
        f"{t['speedup']:.2f}x: {t['backend']} {where(t['tile'])}{batch}, {t['ms_median']:.2f} ms "
        f"({t['report']}), against eager fp32 {where(b['tile'])}, {b['ms_median']:.2f} ms ({b['report']})"
    )


def report(summary: dict) -> str:
    lines = [f"gpu_run on {summary['gpu']} at {summary['date']}{' (DRY RUN)' if summary['dryrun'] else ''}"]
    for s in summary["stages"]:
        flag = "TIMED OUT" if s["timed_out"] else ("ok" if s["rc"] == 0 else f"rc {s['rc']}")
        # A line cut short (stages() keeps it as rc 'unreadable') has no seconds nor time box: '?'.
        lines.append(
            f"  {s['stage']:<10} {flag:<10} {s.get('seconds', '?'):>4} s / {s.get('time_box_s', '?')} s"
        )
    if summary["tests"]:
        t = summary["tests"]
        lines.append(
            f"  tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
        )
    for size, b in (summary["best"] or {}).items():
        mem = "-" if b["peak_mem_mib"] is None else f"{b['peak_mem_mib']:.0f} MiB"
        if b.get("peak_mem_scope") == "torch allocator only":
            mem += " (torch allocator only)"
        psnr = "ref" if b.get("psnr_db") is None else f"{float(b['psnr_db']):.1f} dB"  # eager fp32 is the ref
        lines.append(f"  best at {size}: {b['backend']} {speedups(b)}, PSNR {psnr}, peak {mem}")
    for size, b in ((summary.get("bench_tile1024") or {}).get("best") or {}).items():
        lines.append(
            f"  tile {b.get('tile') or 'whole'}, best at {size}: {b['backend']} {speedups(b)}, "
            f"{rate(b.get('mp_per_s') or 0)} MP/s"
        )
    train = summary.get("train") or {}
    if train:
        t = train.get("train") or {}
        widths = train["config"]["widths"]
        lines.append(f"  train: {t.get('steps')} steps in {t.get('seconds') or 0:.0f} s, widths {widths}")
        for qf, v in (((train.get("eval") or {}).get("qfs")) or {}).items():
            r, j = v["restored"], v["jpeg"]
            lines.append(
                f"    LIVE1 QF{qf}: JPEG {j['psnr']:.2f}/{j['ssim']:.4f}/{j['psnrb']:.2f} -> "
                f"{r['psnr']:.2f}/{r['ssim']:.4f}/{r['psnrb']:.2f}"
            )
    if summary.get("weights_choice"):
        c = summary["weights_choice"]
        lines.append(f"  trained weights beat the shipped ones on LIVE1: {c['use_trained']} {c}")
    lines += gate_lines(summary.get("gate") or {}) + profile_lines(summary.get("profile") or {})
    for name, t in summary["targets"].items():
        if name == "speedup_4k_ge_8" and t and "baseline" in t:
            lines.append(f"  target {name}: {'MET' if t['met'] else 'missed'} {speedup_target(t)}")
            continue
        if t is None:
            verdict = "not measured"
        elif t["met"] is None:  # a number that cannot decide it (a peak torch's allocator only saw)
            verdict = f"not measured ({t.get('peak_mem_scope') or 'unknown'})"
        else:
            verdict = "MET" if t["met"] else "missed"
        lines.append(f"  target {name}: {verdict}{'' if t is None else ' ' + target_fields(t)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work")
    p.add_argument("--out")
    p.add_argument("--dryrun", action="store_true")
    p.add_argument("--final", action="store_true", help="also print the summary")
    p.add_argument("--best", metavar="BENCH_JSON", help="print the best backend of a bench report")
    p.add_argument("--fallback", default="eager-fp16-cl")
    p.add_argument("--choose", metavar="TRAIN_DIR", help="write TRAIN_DIR/../choice.json, print the weights")
    p.add_argument("--shipped", default="bench/results/eval_live1_small.json", help="shipped weights' eval")
    args = p.parse_args(argv)
    if args.choose:
        c = choose(Path(args.choose), Path(args.shipped))
        (Path(args.choose).parent / "choice.json").write_text(json.dumps(c, indent=1) + "\n")
        print(c["weights"] or "")
        return 0
    if args.best:
        print(best_label(load(Path(args.best)), args.fallback))
        return 0
    summary = summarise(Path(args.work), Path(args.out), args.dryrun)
    if args.final:
        print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
