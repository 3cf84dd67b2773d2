"""The training loop (../shared/DESIGN.md section 2): JPEG QF 5..95, 96x96 crops, batch 16, L1 + (1 - SSIM),
Adam 2e-4 halved every 1e4 steps down to 1.25e-5. CPU, one GPU (AMP, channels_last) or many
through torchrun (DistributedDataParallel). Checkpoints hold model, optimiser, step and RNG."""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import io
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from qairn.engine.imageio import save_figure, write_atomic
from qairn.engine.progress import add_quiet, progress_bar
from qairn.messages import counted
from qairn.metrics import ssim_torch
from qairn.model import PRESETS, QAIRN, QAIRNConfig, preset
from qairn.train.data import JPEGPatches, list_images, load_cached, worker_init
from qairn.weights_io import load_model

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "train"


@dataclass
class TrainArgs:
    data: str = str(DEFAULT_DATA)
    out: str = "runs/train"
    preset: str = "small"
    widths: str = ""  # override the preset's widths, e.g. "32,64,128,256"
    nb: int = 0  # override the preset's residual blocks per level (0: the preset's)
    steps: int = 500_000
    batch: int = 16
    patch: int = 96
    qf_min: int = 5
    qf_max: int = 95
    shift_prob: float = 0.5
    lr: float = 2e-4
    lr_halve_every: int = 10_000
    lr_min: float = 1.25e-5
    ssim_weight: float = 1.0
    seed: int = 0
    workers: int = 2
    ckpt_every: int = 200
    log_every: int = 10
    val_holdout: int = 8  # images kept out of training, for validation and the p sweep
    val_data: str = ""  # a separate validation folder: then all of --data trains and nothing is held out
    # Every N steps: restored PSNR on the held-out images (QF 10 and 40, 256 px centre crops) into
    # val.csv and the loss plot, for the raw weights and the average; 0 = off. Never LIVE1.
    val_every: int = 1000
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA), bf16, fp16, none
    channels_last: bool = True
    threads: int = 0  # torch CPU threads (0: torch default)
    # DDP: how long a process waits in a collective for the others before it fails. torch's default
    # (10 min) kept the other ranks of a failed one started by hand waiting that long on NCCL.
    ddp_timeout: float = 300.0
    max_seconds: float = 0.0  # stop (with a checkpoint) after this much wall time; 0 = no limit
    resume: bool = False
    init: str = ""  # start from these weights (same architecture; fresh optimiser, step 0), e.g. shipped
    # Exponential moving average of the weights, updated every step (0 = off), e.g. 0.999: an average
    # over about 1/(1 - ema) steps. Checkpointed beside the raw weights; --export writes it when on.
    ema: float = 0.0
    export: str = ""  # write shipping weights here at the end (fp16 when that costs < 0.02 dB)
    overwrite: bool = False  # start a new run in an --out that holds one (deleting its checkpoint and logs)


# What a resumed run takes from its checkpoint unless given again: the run's data, model and schedule,
# and how often it logs, validates and checkpoints (else a bare resume thins its log.csv and val.csv).
# Given again, the new value wins and is said (fine-tuning with another loss or rate is a resume too).
RESUMED_ARGS = (
    "steps", "data", "preset", "widths", "nb", "batch", "patch", "qf_min", "qf_max", "shift_prob", "lr",
    "lr_halve_every", "lr_min", "ssim_weight", "seed", "val_holdout", "val_data", "ema", "channels_last",
    "amp", "log_every", "val_every", "ckpt_every",
)  # fmt: skip


def lr_at(step: int, a: TrainArgs) -> float:
    # The floor stops the halving; it never raises a --lr set below it (a fine-tuning rate, say).
    return max(a.lr * 0.5 ** (step // a.lr_halve_every), min(a.lr_min, a.lr))


def model_config(a: TrainArgs) -> QAIRNConfig:
    overrides = {}
    if a.widths:
        overrides["widths"] = tuple(int(c) for c in a.widths.split(","))
    if a.nb:
        overrides["nb"] = a.nb
    config = preset(a.preset, **overrides)
    if overrides:  # name the variant, e.g. "small-w32-nb3"
        config = preset(a.preset, **overrides, preset=f"{a.preset}-w{config.widths[0]}-nb{config.nb}")
    return config


def differences(have: QAIRNConfig, want: QAIRNConfig) -> str:
    """Where a file's architecture differs from the options', e.g. "widths 16,32,64,128 (not
    8,16,16,32), nb 2 (not 1)": the values to give with --preset, --widths and --nb."""

    def show(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

    return ", ".join(
        f"{k} {show(v)} (not {show(getattr(want, k))})"
        for k, v in asdict(have).items()
        if k not in ("p", "preset") and v != getattr(want, k)
    )


def train_val_files(a: TrainArgs) -> tuple[list[Path], list[Path]]:
    # Folders are searched recursively: --data ../shared/data or --data gpu_pack (instead of their
    # train/) takes in the LIVE1 test images, which the recipe never trains or validates on.
    for opt, folder in (("--data", a.data), ("--val-data", a.val_data)):
        test = [f for f in (list_images(folder) if folder else []) if f.parent.name.lower() == "live1"]
        if test:
            raise SystemExit(
                f"{opt} {folder}: holds {counted(len(test), 'LIVE1 test image')} "
                f"({test[0].parent}), never trained or validated on; give the training folder itself "
                "(its train/)"
            )
    if a.val_data:
        train, val = list_images(a.data), list_images(a.val_data)
        # --data is searched recursively: a --val-data inside it (or the same folder) would train on
        # the images that validate it and choose p.
        both = sorted({f.resolve() for f in train} & {f.resolve() for f in val})
        if both:
            raise SystemExit(
                f"--val-data {a.val_data}: {len(both)} of its images "
                + ("is also a training image" if len(both) == 1 else "are also training images")
                + f" in --data {a.data} (e.g. {both[0]}); "
                "keep the validation folder out of the training folder"
            )
        return train, val
    return split_files(a.data, a.val_holdout)


def held_out_names(files: list[Path], a: TrainArgs) -> list[str]:
    """The held-out images as checkpoints and exports record them: paths under their folder. Names
    alone lost subfolders (and two a/1.png, b/1.png were one name), so the p sweep could not find them."""
    return [f.relative_to(a.val_data or a.data).as_posix() for f in files]


def split_files(data: str, holdout: int) -> tuple[list[Path], list[Path]]:
    """Deterministic train/validation split: every k-th image (sorted by name) is held out."""
    files = list_images(data)
    if holdout <= 0:
        return files, []
    if holdout >= len(files):  # (8 by default: a folder of a few images is refused unasked; say the way out)
        raise SystemExit(
            f"--val-holdout {holdout}: {data} has only {counted(len(files), 'image')}, "
            "none would be left to train (--val-holdout 0: none held out)"
        )
    k = max(len(files) // holdout, 1)
    val = files[::k][:holdout]
    return [f for f in files if f not in val], val


def loss_fn(out: torch.Tensor, clean: torch.Tensor, ssim_weight: float):
    l1 = F.l1_loss(out, clean)
    s = ssim_torch(out.float(), clean.float())
    return l1 + ssim_weight * (1 - s), l1, s


def resolve_device(name: str, make_current: bool = True) -> torch.device:
    """--device as the engine takes it (a GPU that is not there refused in one line, a bare cuda
    pinned to the current GPU's index), made current: autocast, the GradScaler, pinned-memory copies
    and the Triton kernels work on the current CUDA device, so --device cuda:1 trained on cuda:0.
    (Not under torchrun, where each process takes its LOCAL_RANK's GPU instead: making cuda:0
    current first would give every process a context on it.)"""
    from qairn.engine.restorer import resolve_device as engine_device

    try:
        device = engine_device(name)
    except ValueError as e:
        raise SystemExit(f"--device {name}: {e}") from None
    if device.type == "cuda" and make_current:
        torch.cuda.set_device(device)
    return device


def check_args(a: TrainArgs) -> None:
    """Refuse arguments that cannot train, in one line, before any work."""
    problems = [
        (a.batch < 1, f"--batch {a.batch}: needs at least 1 patch"),
        (a.patch < 16, f"--patch {a.patch}: needs at least 16 px (the network's stride)"),
        (a.steps < 0, f"--steps {a.steps}: cannot be negative"),
        (
            not 0 <= a.qf_min <= a.qf_max <= 100,
            f"--qf-min {a.qf_min} --qf-max {a.qf_max}: need 0 <= min <= max <= 100",
        ),
        # Written `not x > 0`: a NaN compares False with everything and was taken.
        (not a.lr > 0 or not a.lr_min >= 0, f"--lr {a.lr} --lr-min {a.lr_min}: need a positive rate"),
        (not a.ssim_weight >= 0, f"--ssim-weight {a.ssim_weight}: cannot be negative (0: L1 loss only)"),
        (not 0 <= a.shift_prob <= 1, f"--shift-prob {a.shift_prob}: a probability, from 0 to 1"),
        (
            a.resume and bool(a.init),
            f"--init {a.init}: a resume continues its checkpoint's weights; --init starts a new run",
        ),
        (a.ckpt_every < 1 or a.log_every < 1, "--ckpt-every and --log-every need at least 1"),
        (a.val_every < 0 or a.val_holdout < 0, "--val-every and --val-holdout cannot be negative"),
        (a.lr_halve_every < 1, f"--lr-halve-every {a.lr_halve_every}: needs at least 1 step"),
        (a.max_seconds < 0, f"--max-seconds {a.max_seconds}: cannot be negative (0 = no limit)"),
        (a.amp not in ("auto", "bf16", "fp16", "none"), f"--amp {a.amp}: use auto, bf16, fp16 or none"),
        (
            bool(a.widths) and not re.fullmatch(r" *0*[1-9][0-9]* *(, *0*[1-9][0-9]* *){3}", a.widths),
            f"--widths {a.widths}: needs four comma-separated positive widths, e.g. 32,64,128,256",
        ),
        (a.nb < 0, f"--nb {a.nb}: needs at least 1 residual block per level (0: the preset's)"),
        (a.workers < 0, f"--workers {a.workers}: cannot be negative (0: load in the training process)"),
        (a.threads < 0, f"--threads {a.threads}: cannot be negative (0: torch's default)"),
        (
            not 0 < a.ddp_timeout < math.inf,
            f"--ddp-timeout {a.ddp_timeout}: needs a positive number of seconds",
        ),
        (a.seed < 0, f"--seed {a.seed}: cannot be negative (numpy's generators take none)"),
    ]
    for bad, says in problems:
        if bad:
            raise SystemExit(says)
    out = Path(a.out).resolve()
    for opt, folder in (("--data", a.data), ("--val-data", a.val_data)):
        # The image folders are searched recursively: the run's loss.png would train (or validate).
        if folder and (out == Path(folder).resolve() or Path(folder).resolve() in out.parents):
            raise SystemExit(f"--out {a.out}: is inside {opt} {folder}, whose images it would add to")
    if a.export:
        if Path(a.export).suffix != ".safetensors":
            raise SystemExit(f"--export {a.export}: weights are written as .safetensors")
        if a.init and Path(a.init).resolve() == Path(a.export).resolve():
            raise SystemExit(
                f"--export {a.export}: is the --init file, which it would replace; export elsewhere"
            )
        parent, out = Path(a.export).resolve().parent, Path(a.out).resolve()
        # Now, not after hours of training; --out's folder and its parents are made before the export.
        if not parent.is_dir() and parent != out and parent not in out.parents:
            raise SystemExit(f"--export {a.export}: output folder does not exist")
        if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):  # (its mode, a read-only mount)
            raise SystemExit(f"--export {a.export}: output folder is not writable")


def resumed_args(a: TrainArgs, saved: dict, explicit: set[str] | None = None, say=print) -> TrainArgs:
    """The arguments a resumed run trains with: the checkpoint's run's, except those given again.
    explicit: the options given on this command line (None: those that differ from the defaults)."""
    defaults = asdict(TrainArgs())
    given = explicit if explicit is not None else {k for k, v in asdict(a).items() if v != defaults[k]}
    changes = {}
    for k in RESUMED_ARGS:
        if k not in saved or saved[k] == getattr(a, k):
            continue
        if k in given:
            if say:
                say(f"resume: --{k.replace('_', '-')} {getattr(a, k)} replaces the run's {saved[k]}")
        else:
            changes[k] = saved[k]
    return replace(a, **changes)


def train(a: TrainArgs, explicit: set[str] | None = None, quiet: bool = False) -> Path:
    """Train (or resume, a.resume) into a.out. explicit: the options the user gave (the CLI passes
    them); on resume the others come from the checkpoint (resumed_args). The process-wide settings a
    run changes (--threads; on a GPU cudnn.benchmark and TF32, for speed) are put back afterwards: a
    library caller's own work after train() must not run in TF32, or on one thread, unasked.
    quiet (-q): no progress bar, nor validation, resume or closing lines; notes, warnings and errors
    still print. Not a TrainArgs field: how a run talks is no setting of the weights, which record
    their arguments."""
    flags = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    threads = torch.get_num_threads()
    try:
        return _train(a, explicit, quiet)
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ) = flags
        torch.set_num_threads(threads)


def killed_by(error: BaseException, signals) -> bool:
    """Is `error` torch's error for a DataLoader worker killed by one of `signals` (the stop signals
    this process received, which reach its workers too when sent to its whole process group)? torch
    names the signal as strsignal() does: 'DataLoader worker (pid 7) is killed by signal: Terminated.'
    When the loader has already seen the worker gone, it raises 'DataLoader worker (pid(s) 7, 8) exited
    unexpectedly' from that error instead: the whole chain is read (which one comes is a race)."""
    stops = [f"is killed by signal: {signal.strsignal(s)}." for s in signals]
    if signal.SIGINT in signals:
        # Ctrl-C reaches a worker still starting (before torch's loop, which catches it) as a
        # KeyboardInterrupt: multiprocessing ends that process with exit code 1.
        stops.append("exited unexpectedly with exit code 1.")
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        message = str(error)
        if message.startswith("DataLoader worker") and any(stop in message for stop in stops):
            return True
        error = error.__cause__ or error.__context__
    return False


def _train(a: TrainArgs, explicit: set[str] | None = None, quiet: bool = False) -> Path:
    if not a.resume:  # a resume is judged once its arguments are merged with the checkpoint's
        check_args(a)
    else:  # but --ddp-timeout is this run's own, and is used before the merge
        check_args(replace(TrainArgs(), ddp_timeout=a.ddp_timeout))
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A spawned DataLoader worker is importing the user's script, which calls train() again.
        raise RuntimeError(
            "qairn train() ran again inside a DataLoader worker (workers are spawned and import your "
            'script): call it under `if __name__ == "__main__":`, or use workers=0'
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(a.device, make_current=world == 1)
    if world > 1 and device.type == "cuda" and "LOCAL_RANK" not in os.environ:
        # Each rank's GPU is LOCAL_RANK (torchrun sets it): without it every rank took cuda:0.
        raise SystemExit(
            f"rank {rank} of {world}: LOCAL_RANK is not set, so every process would train on cuda:0; "
            "launch with torchrun, or set LOCAL_RANK (this process's GPU on its machine)"
        )
    timeout = datetime.timedelta(seconds=a.ddp_timeout)
    if world > 1:
        # A rank that fails (a bad image, a full disk) ends the others only through its exit: on gloo its
        # closed sockets fail their next all-reduce at once ("Connection closed by peer"), but on NCCL
        # they wait in it until the timeout (--ddp-timeout; torch's default: 10 min). torchrun ends them
        # at once; processes started by hand (RANK, WORLD_SIZE, MASTER_ADDR set) have nobody to do it.
        # The timeout must outlast what rank 0 does alone while the others wait: validation, checkpoints.
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
    # The stop check (Ctrl-C, SIGTERM, --max-seconds) is agreed every step, on a CPU (gloo) group: on
    # NCCL its .item() would wait for the GPU each step; on gloo it costs well under a millisecond.
    stop_group = (
        dist.new_group(backend="gloo", timeout=timeout) if world > 1 and device.type == "cuda" else None
    )
    if a.threads:
        torch.set_num_threads(a.threads)
    main = rank == 0
    out = Path(a.out)
    if out.exists() and not out.is_dir():  # (mkdir said "[Errno 17] File exists", naming no option)
        raise SystemExit(f"--out {out}: is a file, not a run folder")
    # The nearest folder that is there makes the rest: mkdir said "[Errno 13] Permission denied: 'runs'".
    there = next(p for p in (out, *out.parents) if p.exists())
    if not there.is_dir():
        raise SystemExit(f"--out {out}: {there} is a file, not a folder")
    if not os.access(there, os.W_OK | os.X_OK):
        raise SystemExit(f"--out {out}: {there} is not writable")
    ckpt_path = out / "checkpoint.pt"
    ck = None
    if a.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"{ckpt_path}: no checkpoint to resume (is --out right?)")
        try:  # tensors and plain data only: unpickling anything else could run code from the file
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception:  # torch's errors vary (pickle, zip) and suggest weights_only=False: not said
            raise SystemExit(
                f"{ckpt_path}: not a readable checkpoint (cut short, not a torch file, or holding more "
                "than tensors and plain data)"
            ) from None
        if not isinstance(ck, dict) or not {"model", "optim", "step", "config"} <= ck.keys():
            raise SystemExit(f"{ckpt_path}: not a qairn training checkpoint (no model, optimiser and step)")
        a = resumed_args(a, ck.get("args", {}), explicit, say=print if main else None)
        check_args(a)
    elif ckpt_path.exists() and not a.overwrite:
        raise SystemExit(
            f"{ckpt_path}: a run is already here; --resume continues it, --overwrite starts it again"
        )
    # Listed before --out is made: a missing or empty --data folder leaves no empty run folder behind.
    train_files, val_files = train_val_files(a)
    # The held-out images are first read at the first validation or at the export, after hours of
    # training: one that cannot be decoded is refused now instead.
    for f in val_files:
        if cv2.imread(str(f), cv2.IMREAD_COLOR) is None:
            raise SystemExit(f"{f}: cannot decode validation image (held out for validation and export)")
    if ck is not None and main and ck.get("val_files") not in (None, held_out_names(val_files, a)):
        # The split is every k-th image of the folder: images added or removed move it, so earlier
        # held-out images may now train and the validation curve jumps.
        was, now = set(ck["val_files"]), set(held_out_names(val_files, a))
        # Options given anew on resume move the split too: then the folder is not what changed.
        saved = ck.get("args", {})
        moved = [
            f"--{k.replace('_', '-')}"
            for k in ("data", "val_data", "val_holdout")
            if k in saved and saved[k] != getattr(a, k)
        ]
        why = f"{', '.join(moved)} changed" if moved else f"{a.data} changed since the run began"
        print(
            f"warning: the held-out images differ from the checkpoint's ({len(was - now)} left the "
            f"held-out set, {len(now - was)} joined it): {why}"
        )
    torch.manual_seed(a.seed)
    config = model_config(a)
    model = QAIRN(config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    step, seconds = 0, 0.0
    resumed = ck is not None
    trained_with = asdict(a)
    if resumed:
        saved_config = QAIRNConfig.from_json(ck["config"])
        # Not labels, nor p: a run begun with --init carries the p of its weights file (below).
        if replace(saved_config, p=config.p, preset="") != replace(config, preset=""):
            raise SystemExit(
                f"{ckpt_path}: checkpoint config differs from --preset {a.preset} (+ overrides): "
                + differences(saved_config, config)
            )
        model.config = config = replace(config, p=saved_config.p)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        step, seconds = ck["step"], ck["seconds"]
        torch.set_rng_state(ck["torch_rng"])
        trained_with = ck["args"]  # what the weights were last trained with, until this run trains
        if main and not quiet:
            print(f"resumed from {ckpt_path} at step {step} ({seconds / 3600:.2f} h trained)")
        if main and ck.get("world", 1) != world:  # a step is world x --batch patches, rank r's indices
            print(
                f"note: the checkpoint was trained with {ck.get('world', 1)} process(es), this run has "
                f"{world}: from step {step} each step takes {world} x {a.batch} patches, and the patches "
                "differ from those of an uninterrupted run"
            )
    elif a.init:
        start = load_model(a.init)
        # p is pooling only, chosen after training; the preset label ("small-w16-nb2") is only a name
        if replace(start.config, p=config.p, preset="") != replace(config, preset=""):
            raise SystemExit(
                f"{a.init}: its architecture differs from --preset {a.preset} (+ overrides): "
                + differences(start.config, config)
            )
        model.load_state_dict({k: v.float() for k, v in start.state_dict().items()})
        # p pools the quality maps only and was chosen for these weights (the p sweep, after training):
        # the export keeps it. It took the preset's (the shipped file's p is not), and so scored otherwise.
        model.config = config = replace(config, p=start.config.p)
        if main and not quiet:
            print(f"initialised from {a.init}")
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = None
    # A resume without --ema (an export-only run, say) keeps the checkpoint's average as it was.
    kept_ema = ck.get("ema") if resumed else None
    if a.ema:
        if not 0 < a.ema < 1:
            raise SystemExit(f"--ema {a.ema}: the decay must be in (0, 1), e.g. 0.999")
        ema = EMA(model, a.ema)
        if kept_ema is not None:
            ema.load_state_dict(kept_ema)
        elif main and step:
            print(f"ema: starting the average from the step-{step} weights")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    amp = a.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if resumed and ck.get("scaler"):  # fp16's loss scale: restarted, the first steps would overflow again
        scaler.load_state_dict(ck["scaler"])

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # Made (and old logs trimmed) once the arguments, the checkpoint and --init have passed: a run
    # refused before this leaves no empty run folder.
    made_out = main and not out.exists()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        # Not in an export-only resume: a trainer may still be logging here.
        if ck is not None and ck["step"] < a.steps:
            for name in ("log.csv", "val.csv"):
                drop_rows_after(out / name, ck["step"])
            # A run killed while it wrote a checkpoint (SIGKILL after a preemption's grace period) left
            # the hidden temp file, a whole checkpoint's size (the paper preset's: 0.6 GB), at each kill.
            for part in out.glob(f".{ckpt_path.name}.*.part"):
                part.unlink(missing_ok=True)

    # An export-only resume (its checkpoint's step already at --steps) trains nothing: decoding the whole
    # training set (255 MB, a minute or more) and starting DataLoader workers for it was wasted.
    export_only = ck is not None and step >= a.steps
    loader = ()
    if not export_only:
        try:
            images = load_cached(train_files, out / "cache")
        except ValueError:  # an undecodable training image: refused, and the run folder made for it goes too
            if made_out:
                shutil.rmtree(out, ignore_errors=True)
            raise
        # JPEGPatches leaves out images too small for one crop (patch + 8 for the grid shift): say which.
        small = [f.name for f, im in zip(train_files, images) if min(im.shape[:2]) < a.patch + 8]
        if main and small and len(small) < len(images):
            more = f" and {len(small) - 3} more" if len(small) > 3 else ""
            are = "is" if len(small) == 1 else "are"
            print(
                f"note: {len(small)} of {len(images)} training images {are} under {a.patch + 8} px on a "
                f"side (--patch {a.patch} + 8) and {are} not used: {', '.join(small[:3])}{more}"
            )
        try:
            # It takes the images over (the list is emptied): the pixels are held once, in ds.
            shared = a.workers > 0
            ds = JPEGPatches(
                images, a.batch, a.patch, (a.qf_min, a.qf_max), a.shift_prob, a.seed, shared=shared
            )
        except ValueError as e:  # no image large enough: say which folder, and leave no run folder (as above)
            if made_out:
                shutil.rmtree(out, ignore_errors=True)
            raise SystemExit(f"{a.data}: {e} (--patch {a.patch} + 8)") from None
        # Rank r takes batch indices step*world + r: every rank sees different, reproducible patches.
        indices = range(step * world + rank, a.steps * world, world)
        loader = DataLoader(
            torch.utils.data.Subset(ds, indices),
            batch_size=None,
            num_workers=a.workers,
            worker_init_fn=worker_init,
            # Its own generator: starting to iterate draws a seed, which from torch's global one moved
            # the RNG state that checkpoints save, so a resumed run's differed from an uninterrupted one.
            generator=torch.Generator().manual_seed(a.seed),
            persistent_workers=a.workers > 0,
            prefetch_factor=4 if a.workers > 0 else None,
            pin_memory=device.type == "cuda",
            # Spawned, not forked: a child forked while OpenCV's thread pool holds a lock can deadlock in
            # cv2.setNumThreads (seen once in the metric workers); spawning costs a second per worker.
            multiprocessing_context="spawn" if a.workers > 0 else None,
        )

    def save_checkpoint():
        if not main:
            return
        if not finite(model):
            # On CUDA the loss is checked every log_every steps only: a non-finite step may have reached
            # the weights before the check raised. Keep the last good checkpoint.
            tqdm.write(f"step {step}: the weights are not finite; the checkpoint is left as it was")
            return
        ck = {
            "model": model.state_dict(),
            "optim": opt.state_dict(),
            "step": step,
            "seconds": seconds,
            "config": config.to_json(),
            "args": asdict(a),
            "torch_rng": torch.get_rng_state(),
            "val_files": held_out_names(val_files, a),
            "ema": ema.state_dict() if ema is not None else kept_ema,
            "scaler": scaler.state_dict(),
            "world": world,
        }
        write_atomic(ckpt_path, lambda f: torch.save(ck, f))  # flushed to disk, then renamed in

    val_pairs: list = []

    def log_validation(at_step: int) -> None:
        if not val_pairs:
            val_pairs.extend(validation_pairs(val_files))
        row = {"step": at_step} | validate(model, val_pairs, device)
        if ema is not None:
            row |= {f"ema_{k}": v for k, v in validate(ema.averaged(model), val_pairs, device).items()}
        val_path = out / "val.csv"
        fields = ["step"] + [f"{pre}psnr_qf{qf}" for pre in ("", "ema_") for qf in VAL_QFS]
        new = not val_path.exists()
        with open(val_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="")
            if new:
                w.writeheader()
            w.writerow(row)
        if not quiet:
            tqdm.write(
                f"validation at step {at_step}: "
                + ", ".join(f"{k} {v}" for k, v in row.items() if k != "step")
            )

    stop = {"flag": False, "fetching": False, "signals": set()}

    def should_stop() -> bool:
        # --max-seconds limits this run, not the checkpoint's total: a resume always gets its time.
        want = stop["flag"] or bool(a.max_seconds and seconds - seconds_before >= a.max_seconds)
        if world == 1:
            return want
        # Ranks must leave the loop at the same step (else one waits forever in an all-reduce): agree
        # every step, so a rank's signal or time limit stops all of them at the next (not up to
        # --log-every steps later, long steps each on a large model).
        return any_rank(want, device, stop_group)

    def on_signal(signum, frame):
        stop["flag"] = True
        stop["signals"].add(signum)

    def batches(loader):
        """The loader's batches; after a stop signal, one None instead (the loop then stops, agreeing
        with the other ranks). A SIGTERM to the whole process group (Slurm's preemption, systemd's
        stop, kill -- -PGID) kills the workers too, and torch's SIGCHLD handler raised "DataLoader
        worker ... is killed by signal" wherever the loop was: a traceback and exit 1, or a last
        checkpoint cut short. Python runs the pending SIGTERM's handler before SIGCHLD's (by number),
        so the flag is set before any worker's exit is seen. A worker killed by that same signal is the
        stop's; one that crashed otherwise (a segfault, the OOM killer's SIGKILL) is still an error."""
        loaded = iter(loader)  # starts the workers, and torch's SIGCHLD handler (once per process)
        torch_on_child_exit = signal.getsignal(signal.SIGCHLD)
        if in_main_thread and a.workers > 0 and callable(torch_on_child_exit):

            def on_child_exit(signum, frame):
                # Raised only while waiting for a batch, which it ends (else up to 5 s, torch's check).
                if not stop["flag"] or stop["fetching"]:
                    torch_on_child_exit(signum, frame)

            old_handlers.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, on_child_exit))
        while not stop["flag"]:  # (a stop during the last step: its workers may be gone)
            stop["fetching"] = True
            try:
                batch = next(loaded)
            except StopIteration:
                return
            except RuntimeError as e:
                if not (stop["flag"] and killed_by(e, stop["signals"])):
                    raise
                break
            finally:
                stop["fetching"] = False
            yield batch
        yield None

    log_path = out / "log.csv"
    if main and ck is None:  # a new run (--overwrite): nothing of an older one is left to mix with it
        # Its checkpoint too, as its log.csv is emptied: else a new run that failed before its first
        # checkpoint left it beside that empty log, and --resume continued it without its curves.
        for name in ("val.csv", "checkpoint.pt", "loss.png"):
            (out / name).unlink(missing_ok=True)
    new_log = not log_path.exists() or not a.resume
    logf = open(log_path, "w" if new_log else "a", newline="") if main else None
    writer = csv.writer(logf) if logf else None
    if writer and new_log:
        writer.writerow(["step", "loss", "l1", "ssim", "lr", "patches_per_s", "seconds"])
    bar = progress_bar(
        total=a.steps, initial=step, disable=not main or quiet, dynamic_ncols=True, desc="train"
    )
    t_last, n_last = time.time(), 0
    model.train()
    # Wall time, data waits included: on a GPU the step's host time is only its kernel launches.
    seconds_before, t_run = seconds, time.time()
    # Host time spent waiting for the next batch: where it is most of the run, the DataLoader (JPEG
    # coding on the CPU) and not the device sets the pace (--workers).
    data_wait, t_ready, steps_run = 0.0, time.time(), 0
    val_time = 0.0  # rank 0's validations: left out of the closing line's steps/s
    # Python takes signal handlers in the main thread only: train() run from another (a thread pool, a
    # notebook's worker) failed there with a ValueError after making the run folder. It trains without
    # them: Ctrl-C and SIGTERM go to the main thread, the caller's; --max-seconds still stops the run.
    in_main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM) if in_main_thread else ()
    old_handlers = {s: signal.signal(s, on_signal) for s in signals}
    failed = False
    batch_iter = batches(loader)
    try:
        for batch in batch_iter:
            data_wait += time.time() - t_ready
            if step >= a.steps or should_stop() or batch is None:
                break
            jpeg_b, clean_b, _ = batch
            for g in opt.param_groups:
                g["lr"] = lr_at(step, a)
            mf = torch.channels_last if a.channels_last else torch.contiguous_format
            jpeg_b = jpeg_b.to(device, non_blocking=True).contiguous(memory_format=mf)
            clean_b = clean_b.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                restored, _ = net(jpeg_b)
            loss, l1, s = loss_fn(restored.float(), clean_b, a.ssim_weight)
            # On a GPU, checking every step would stall the pipeline: check when logging.
            if device.type != "cuda" or step % a.log_every == 0:
                bad = not torch.isfinite(loss)
                # All ranks stop together: a rank that went on alone would wait in backward's
                # all-reduce for one that left (a hang on NCCL, a crash of unclear cause on gloo).
                if any_rank(bad, device) if world > 1 else bad:
                    where = "" if world == 1 else f" (on rank {rank})" if bad else " (on another rank)"
                    # Batches are a function of (seed, step): a resume meets the same batch again.
                    raise FloatingPointError(
                        f"non-finite loss at step {step}{where}; resuming repeats the same batches: "
                        "resume with a lower --lr or another --seed"
                    )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update(model)
            step += 1
            steps_run += 1
            seconds = seconds_before + time.time() - t_run
            n_last += a.batch * world
            # The last step is logged too: a run shorter than --log-every would leave no loss curve.
            log_step = step % a.log_every == 0 or step == a.steps
            if log_step and world > 1:  # the step's loss is over every rank's patches, not rank 0's alone
                loss, l1, s = mean_over_ranks(torch.stack([loss.detach(), l1.detach(), s.detach()]), device)
            if main and log_step:
                rate = n_last / max(time.time() - t_last, 1e-9)
                t_last, n_last = time.time(), 0
                writer.writerow(
                    [
                        step,
                        f"{loss.item():.5f}",
                        f"{l1.item():.5f}",
                        f"{s.item():.5f}",
                        f"{lr_at(step - 1, a):.3g}",
                        f"{rate:.1f}",
                        f"{seconds:.1f}",
                    ]
                )
                logf.flush()
                # Shown at the bar's next redraw: a redraw now would put a line in a log every logged step.
                postfix = {
                    "loss": f"{loss.item():.4f}",
                    "lr": f"{lr_at(step - 1, a):.2g}",
                    "pps": f"{rate:.1f}",
                }
                bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if step % a.ckpt_every == 0:
                save_checkpoint()
            if main and a.val_every and step % a.val_every == 0 and val_files:
                t_val = time.time()
                log_validation(step)
                t_last += time.time() - t_val  # the logged patches/s are training's alone
                val_time += time.time() - t_val
            t_ready = time.time()
    except BaseException:
        failed = True
        raise
    finally:
        try:
            bar.close()
            if main and steps_run and not quiet:
                # Training's own rate: with validation inside, a run validating often showed a fraction
                # of its real steps/s.
                wall = time.time() - t_run - val_time
                validated = f"; validation {val_time:.1f} s" if val_time else ""
                print(
                    f"{steps_run} steps in {wall:.1f} s of training ({steps_run / max(wall, 1e-9):.2f} "
                    f"steps/s); waiting for data {data_wait:.1f} s ({100 * data_wait / max(wall, 1e-9):.0f}%)"
                    f"{validated}",
                    flush=True,
                )
            # A resume that trained nothing (an export-only run) leaves the checkpoint alone: a trainer
            # may still be writing it, and an older copy written over it would set that trainer's file back.
            # A new run that failed before its first step (a GPU out of memory, say) writes none: its
            # step-0 checkpoint would make the rerun "a run already here".
            if steps_run or not (resumed or failed):
                save_checkpoint()
        finally:  # also when that last checkpoint fails (a full disk): Ctrl-C must stop the caller again
            if logf:
                logf.close()
            for s_, h in old_handlers.items():
                signal.signal(s_, h)
            # Its persistent workers stop now, not when the loader is collected: a reference cycle
            # through this frame (torch makes one on its first Adam) kept them to the exit, where
            # multiprocessing killed them and printed "DataLoader worker ... killed by signal".
            del loader, batch_iter
    if not finite(model):  # an infinite gradient in the last steps, after their loss was checked
        raise FloatingPointError(
            f"the weights are not finite after step {step}: nothing exported; {ckpt_path} holds the last "
            "finite ones"
        )
    if main:
        plot_log(log_path, out / "loss.png")
        if a.export:
            export_weights(
                ema.averaged(model) if ema is not None else model,
                a,
                step,
                seconds,
                val_files,
                device,
                trained_with=asdict(a) if steps_run else trained_with,
                quiet=quiet,
            )
    if world > 1:
        dist.destroy_process_group()
    return ckpt_path


def any_rank(flag: bool, device: torch.device, group=None) -> bool:
    """Whether flag is set on any DDP process: every process calls it at the same step, and all get
    the same answer. group: a gloo group to agree on the CPU (None: the default group)."""
    on_device = group is None and dist.get_backend() == "nccl"
    t = torch.tensor([float(flag)], device=device if on_device else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def mean_over_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The mean of t over the DDP processes (every process calls it at the same step)."""
    t = t.float().to(device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)  # a sum: gloo has no average
    return t / dist.get_world_size()


def finite(model: torch.nn.Module) -> bool:
    return all(bool(t.isfinite().all()) for t in model.state_dict().values() if t.is_floating_point())


def drop_rows_after(path: Path, step: int) -> None:
    """Keep a log's rows up to `step`: a run killed after its last checkpoint logged steps that the
    resume trains again (and may have torn its last row); kept, they would each appear twice."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if len(r) == len(rows[0]) and int(r[0]) <= step]
    if kept != rows:
        text = io.StringIO(newline="")
        csv.writer(text).writerows(kept)
        write_atomic(path, text.getvalue().encode())


class EMA:
    """Exponential moving average of a model's weights: after each optimiser step,
    avg <- ema * avg + (1 - ema) * weights. Kept in fp32 beside the model; never trained."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        state = model.state_dict()
        self.avg = {k: v.detach().float().clone() for k, v in state.items()}
        self.names = [k for k, v in state.items() if v.is_floating_point()]  # what averages
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = model.state_dict()
        torch._foreach_lerp_(
            [self.avg[k] for k in self.names], [current[k].float() for k in self.names], 1 - self.decay
        )
        self.updates += 1

    def averaged(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of model holding the averaged weights."""
        out = copy.deepcopy(model)
        out.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.avg.items()})
        return out

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "avg": self.avg}

    def load_state_dict(self, state: dict) -> None:
        if state["avg"].keys() != self.avg.keys():
            raise SystemExit("the checkpoint's EMA weights do not match the model")
        self.avg = {k: v.float() for k, v in state["avg"].items()}
        self.updates = state["updates"]


VAL_QFS, VAL_CROP = (10, 40), 256


def validation_pairs(files: list[Path]) -> list[tuple[int, object, object]]:
    """(qf, reference, JPEG) for each held-out image at each of VAL_QFS: made once per run."""
    from qairn.train.evaluate import jpeg_pairs

    return jpeg_pairs(files, VAL_QFS, VAL_CROP)


@contextlib.contextmanager
def fp32_reference():
    """TF32 off for a while: training turns it on (and cuDNN has it on by default), but validation and
    the export's fp16 check compare restored PSNRs against the fp32 model, as the evaluation does."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@fp32_reference()
def validate(model: QAIRN, pairs: list, device) -> dict:
    """Mean restored PSNR per QF on the validation pairs, from a copy (the Restorer moves its model
    to its own layout and precision; the training model must not change)."""
    from qairn.train.evaluate import make_restorer, restored_psnrs

    values = restored_psnrs(make_restorer(model=copy.deepcopy(model).float().eval(), device=device), pairs)
    by_qf = {qf: [v for (q, _, _), v in zip(pairs, values) if q == qf] for qf in VAL_QFS}
    return {f"psnr_qf{qf}": round(sum(v) / len(v), 4) for qf, v in by_qf.items()}


def plot_log(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    val_path = log_path.with_name("val.csv")
    val = []
    if val_path.exists():
        with open(val_path, newline="") as f:
            val = list(csv.DictReader(f))
    fig, axes = plt.subplots(
        1, 1 + len(VAL_QFS) * bool(val), figsize=(5 + 4 * bool(val) * 2, 4), squeeze=False
    )
    ax = axes[0, 0]
    # One logged step (--steps under --log-every) is a line through one point, which draws nothing.
    dot = "o" if len(rows) == 1 else None
    ax.plot(steps, [float(r["loss"]) for r in rows], lw=0.6, marker=dot, ms=4, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    for ax, qf in zip(axes[0, 1:], VAL_QFS if val else ()):  # one panel per QF: their scales differ
        for key, label in ((f"psnr_qf{qf}", "weights"), (f"ema_psnr_qf{qf}", "average (--ema)")):
            pts = [(int(r["step"]), float(r[key])) for r in val if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"held-out {VAL_CROP}px crops at QF {qf} (not LIVE1)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


def export_weights(
    model: QAIRN,
    a: TrainArgs,
    step: int,
    seconds: float,
    val_files: list[Path],
    device: str | torch.device = "cpu",
    trained_with: dict | None = None,
    quiet: bool = False,
) -> Path:
    """Write the shipping file: fp16 when fp16-rounded weights lose < 0.02 dB of restored PSNR on the
    held-out images (QF 10..40), else fp32; the check's numbers go into the metadata."""
    from qairn.train.evaluate import fp16_check
    from qairn.weights_io import save_weights

    with fp32_reference():
        decision = fp16_check(model, val_files, device=device)
    # No held-out image (--val-holdout 0), no loss to show ("nan dB ... on 0 images"): the reason instead.
    held_out = counted(len(val_files), "held-out image")
    why = decision.get("reason") or f"{decision['loss_db']:.4f} dB fp16 loss on {held_out}"
    if not quiet:
        print(f"export: {decision['dtype']} ({why}) -> {a.export}")
    summary = {
        "steps": step,
        "seconds": round(seconds, 1),
        # The arguments of the run that last trained these weights: an export-only run's own
        # arguments (defaults, mostly) would misreport, e.g., the loss of a fine-tuning phase.
        "args": trained_with or asdict(a),
        "val_files": held_out_names(val_files, a),
        "export": decision,
    }
    dtype = torch.float16 if decision["dtype"] == "fp16" else None
    return save_weights(model, a.export, training=summary, dtype=dtype)


EXAMPLES = """examples:
  qairn train --out runs/small --preset small --max-seconds 3600     (Ctrl-C stops with a checkpoint)
  qairn train --out runs/small --resume                              (continue it, same settings)
  qairn train --out runs/small --preset small --resume --steps 0 --export w.safetensors  (export only)
  torchrun --nproc-per-node 2 -m qairn.train.trainer --out runs/ddp  (DDP; gloo on CPU, nccl on GPU)
    (on GPUs use torchrun: started by hand, the others wait out --ddp-timeout (300 s) when one fails)
"""


# One line per option of `qairn train --help` (the defaults are appended).
HELP = {
    "data": "folder of lossless training images, searched recursively",
    "out": "run folder: checkpoint.pt, log.csv, val.csv, loss.png",
    "preset": f"model size: {', '.join(PRESETS)}",
    "widths": "override the preset's four widths, e.g. 32,64,128,256 (empty: the preset's)",
    "nb": "override the preset's residual blocks per level (0: the preset's)",
    "steps": "stop after this many steps in all (a resume counts from its checkpoint's step)",
    "batch": "patches per step in each process (DDP: times the number of processes)",
    "patch": "patch side in pixels (at least 16)",
    "qf_min": "lowest JPEG quality of the training inputs",
    "qf_max": "highest JPEG quality of the training inputs",
    "shift_prob": "share of patches whose 8x8 JPEG grid is shifted against the crop",
    "lr": "Adam learning rate at step 0",
    "lr_halve_every": "halve the learning rate every N steps",
    "lr_min": "the learning rate never drops below this",
    "ssim_weight": "loss = L1 + W * (1 - SSIM); 0: L1 alone",
    "seed": "seed of the patches, crops and model initialisation",
    "workers": "DataLoader worker processes (0: load in the training process)",
    "ckpt_every": "write checkpoint.pt every N steps (and on Ctrl-C, SIGTERM and the end)",
    "log_every": "append the loss to log.csv every N steps",
    "val_holdout": "training images held out for validation and the p sweep (every k-th by name)",
    "val_data": "a separate validation folder: then all of --data trains and nothing is held out",
    "val_every": "restored PSNR of the held-out images (QF 10 and 40) into val.csv every N steps; 0: off",
    "device": "auto (CUDA if present, else CPU), cpu, cuda or cuda:N",
    "amp": "mixed precision: auto (bf16 on CUDA, none on CPU), bf16, fp16 or none",
    "channels_last": "channels_last memory format for the model and batches",
    "threads": "torch CPU threads (0: torch's default)",
    "ddp_timeout": "DDP: seconds a process waits for the others in a collective before failing "
    "(torch's default: 600; it must outlast a validation and a checkpoint)",
    "max_seconds": "stop with a checkpoint after this much wall time of this run; 0: no limit",
    "resume": "continue the run in --out with its own settings (an option given again replaces its value)",
    "init": "start from these weights (same architecture; fresh optimiser, step 0), e.g. the shipped file",
    "ema": "keep an exponential moving average of the weights, e.g. 0.999 (about 1000 steps); 0: off",
    "export": "at the end, write shipping weights (safetensors; the average with --ema) here",
    "overwrite": "start a new run in an --out that holds one (its checkpoint and logs are deleted first)",
}


def add_args(p: argparse.ArgumentParser) -> None:
    for f, default in asdict(TrainArgs()).items():
        flag = "--" + f.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=HELP[f] + " (default: %(default)s)",
            )
        else:
            p.add_argument(
                flag, type=type(default), default=default, help=HELP[f] + " (default: %(default)s)"
            )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="qairn train",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_args(p)
    add_quiet(p)
    options = vars(p.parse_args(argv))
    quiet = options.pop("quiet")
    # Which options were given: the same parser with every default suppressed parses only those.
    probe = argparse.ArgumentParser(add_help=False)
    add_args(probe)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(probe.parse_known_args(argv)[0]))
    train(TrainArgs(**options), explicit, quiet)


if __name__ == "__main__":
    # As `qairn train`: torchrun starts this module once per rank, and a bad --data (empty, unreadable)
    # was then a traceback per rank instead of the command's one line (and exit code).
    from qairn.cli import main as qairn_main

    sys.exit(qairn_main(["train", *sys.argv[1:]]))
