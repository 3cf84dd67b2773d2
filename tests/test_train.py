"""Training: the paper's defaults, deterministic data, resume, Ctrl-C, DDP (gloo, 2 processes),
the fp16 export check, and the GPU pack + entry script on the tiny preset (CPU)."""

import contextlib
import csv
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open

from qairn.model import QAIRN, preset
from qairn.train import trainer
from qairn.train.data import JPEGPatches, list_images, load_cached
from qairn.weights_io import WeightsError, load_model, read_metadata

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def synth_image(rng, h, w) -> np.ndarray:
    """A smooth, textured BGR test image: gradients, blurred noise, a few shapes."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([120 + 80 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], axis=2)
    img += cv2.GaussianBlur(rng.normal(0, 40, (h, w, 3)), (0, 0), 2.0)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(4):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, p0, int(rng.integers(4, max(5, h // 4))), c, -1)
    return img


def make_folder(path: Path, n: int, h: int, w: int, seed: int, ext=".png") -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(path / f"img{i:02d}{ext}"), synth_image(rng, h, w))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("train"), 6, 64, 80, seed=1)


def tiny_args(data: Path, out: Path, **kw) -> trainer.TrainArgs:
    a = trainer.TrainArgs(
        data=str(data),
        out=str(out),
        preset="tiny",
        steps=4,
        batch=2,
        patch=32,
        workers=0,
        ckpt_every=100,
        log_every=1,
        val_holdout=2,
        device="cpu",
        threads=1,
    )
    return replace(a, **kw)


def cli_args(a: trainer.TrainArgs) -> list[str]:
    out = []
    for k, v in asdict(a).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        elif v != "":
            out += [flag, str(v)]
    return out


def test_defaults_are_the_paper_recipe():
    a = trainer.TrainArgs()
    assert (a.batch, a.patch, a.qf_min, a.qf_max, a.ssim_weight) == (16, 96, 5, 95, 1.0)
    assert (a.lr, a.lr_halve_every, a.lr_min) == (2e-4, 10_000, 1.25e-5)
    assert 0 < a.shift_prob < 1
    assert [trainer.lr_at(s, a) for s in (0, 9_999, 10_000, 20_000, 30_000, 40_000, 10**6)] == [
        2e-4,
        2e-4,
        1e-4,
        5e-5,
        2.5e-5,
        1.25e-5,
        1.25e-5,
    ]
    # Every field is a flag with that default; --preset paper builds the paper's network.
    import argparse

    p = argparse.ArgumentParser()
    trainer.add_args(p)
    ns = p.parse_args(["--preset", "paper", "--widths", "32,64,128,256", "--nb", "3"])
    assert ns.batch == 16 and ns.lr == 2e-4 and ns.qf_max == 95
    assert trainer.model_config(trainer.TrainArgs(preset="paper")).widths == (64, 128, 256, 512)
    cfg = trainer.model_config(trainer.TrainArgs(**vars(ns)))
    assert (cfg.widths, cfg.nb, cfg.preset) == ((32, 64, 128, 256), 3, "paper-w32-nb3")


def test_patches_deterministic_and_in_range(data):
    images = load_cached(list_images(data))
    ds = JPEGPatches(list(images), batch=3, patch=32, qf_range=(5, 95), seed=7)
    j1, c1, q1 = ds[5]
    j2, c2, q2 = JPEGPatches(images, batch=3, patch=32, qf_range=(5, 95), seed=7)[5]
    assert torch.equal(j1, j2) and torch.equal(c1, c2) and torch.equal(q1, q2)
    assert j1.shape == c1.shape == (3, 3, 32, 32) and j1.dtype == torch.float32
    assert not torch.equal(ds[6][1], c1)  # another index, another batch
    assert ((q1 >= 5) & (q1 <= 95)).all()
    assert (j1 - c1).abs().mean() > 0  # compressed
    # Worker processes give the same batches as the main process.
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [5]), batch_size=None, num_workers=1)
    jw, cw, _ = next(iter(loader))
    assert torch.equal(jw, j1) and torch.equal(cw, c1)


@pytest.mark.parametrize("shared", [False, True])
def test_patches_take_the_images_over_and_keep_their_pixels(data, shared):
    # Training kept the decoded list beside the dataset's packed copy: every pixel twice in memory.
    images = load_cached(list_images(data))
    copies = [im.copy() for im in images]
    ds = JPEGPatches(images, batch=1, patch=32, shared=shared)
    assert images == [] and ds.pixels.is_shared() == shared
    for k, im in enumerate(copies):
        assert np.array_equal(ds.pixels[ds.offsets[k] : ds.offsets[k + 1]].numpy().reshape(ds.shapes[k]), im)
    # A tuple (or any other sequence) is taken as it was before: copied, not emptied.
    assert torch.equal(JPEGPatches(tuple(copies), batch=1, patch=32, shared=shared).pixels, ds.pixels)


def test_training_holds_the_decoded_images_once(data, tmp_path, monkeypatch):
    decoded, alive, loss_fn = [], [], trainer.loss_fn

    def load(*args, **kw):
        images = load_cached(*args, **kw)
        decoded.extend(weakref.ref(im) for im in images)
        return images

    def loss(*args, **kw):
        alive.append(sum(r() is not None for r in decoded))
        return loss_fn(*args, **kw)

    monkeypatch.setattr(trainer, "load_cached", load)
    monkeypatch.setattr(trainer, "loss_fn", loss)
    trainer.train(tiny_args(data, tmp_path, steps=1))
    assert len(decoded) == 4 and alive == [0]


def test_cache_roundtrip(data, tmp_path):
    files = list_images(data)
    a = load_cached(files, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob("*tmp*"))
    b = load_cached(files, tmp_path)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_train_is_deterministic_and_resumes_exactly(data, tmp_path):
    trainer.train(tiny_args(data, tmp_path / "a", steps=4))
    trainer.train(tiny_args(data, tmp_path / "b", steps=2))
    trainer.train(tiny_args(data, tmp_path / "b", steps=4, resume=True, lr_min=1e-5))
    a, b = state(tmp_path / "a" / "checkpoint.pt"), state(tmp_path / "b" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    assert set(a) >= {"model", "optim", "step", "seconds", "config", "args", "torch_rng", "val_files"}
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # The RNG state a checkpoint saves: each start of the DataLoader drew from it, so it differed.
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    init = QAIRN(preset("tiny")).state_dict()
    assert any(not torch.equal(a["model"][k], init[k]) for k in init)  # it did train
    rows = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000
    assert len(a["val_files"]) == 2
    # Export only: resume with --steps 0 trains nothing and writes the checkpoint's weights.
    # It leaves the checkpoint file alone: a trainer may still be writing it.
    w = tmp_path / "w.safetensors"
    before = (tmp_path / "b" / "checkpoint.pt").read_bytes()
    trainer.train(tiny_args(data, tmp_path / "b", steps=0, resume=True, export=str(w)))
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == before
    summary = json.loads(read_metadata(w)["training"])
    assert summary["steps"] == 4 and summary["val_files"] == a["val_files"]
    assert summary["args"]["lr_min"] == 1e-5  # the training run's arguments, not the export's
    exported = load_model(w).state_dict()
    half = summary["export"]["dtype"] == "fp16"
    for k, v in b["model"].items():
        assert torch.equal(exported[k], v.half().float() if half else v), k


def test_a_run_shorter_than_log_every_logs_its_last_step(data, tmp_path):
    trainer.train(tiny_args(data, tmp_path, steps=5, log_every=3))
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["3", "5"]
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_resume_with_another_process_count_says_so(data, tmp_path, capsys):
    # The batch per step is world x --batch and rank r takes indices step*world + r: resuming a 2-process
    # run with one process changed both without a word.
    trainer.train(tiny_args(data, tmp_path, steps=2))
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["world"] == 1
    ck["world"] = 2
    torch.save(ck, tmp_path / "checkpoint.pt")
    capsys.readouterr()
    trainer.train(tiny_args(data, tmp_path, steps=3, resume=True))
    assert "trained with 2 process(es), this run has 1" in capsys.readouterr().out


def test_train_puts_the_cuda_speed_settings_back(data, tmp_path, monkeypatch):
    # A CUDA run turns on cudnn.benchmark and TF32 for itself; they stayed on for whatever the caller ran
    # next (a validation, an evaluation in the same process). Faked here: the CPU run sets neither.
    def gpu_like_run(a, explicit=None, quiet=False):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        raise KeyboardInterrupt  # and even when it ends early

    before = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    monkeypatch.setattr(trainer, "_train", gpu_like_run)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(tiny_args(data, tmp_path))
    after = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    assert after == before


def test_resume_after_a_crash_logs_each_step_once(data, tmp_path, monkeypatch):
    """A run killed after its last checkpoint had logged steps that the resume trains again: those rows
    are dropped, not kept beside the new ones (log.csv held 1,2,1,2 and the plot doubled back)."""
    monkeypatch.setattr(trainer, "plot_log", lambda *a: None)  # the slow part, not tested here
    out = tmp_path / "b"
    trainer.train(tiny_args(data, out, steps=0))
    saved = (out / "checkpoint.pt").read_bytes()
    trainer.train(tiny_args(data, out, steps=2, val_every=1, val_holdout=1, resume=True))
    (out / "checkpoint.pt").write_bytes(saved)  # killed after step 2, last checkpoint at step 0
    with open(out / "log.csv", "a") as f:
        f.write("3,0.1")  # and torn in the middle of a row
    trainer.train(tiny_args(data, out, steps=2, val_every=1, val_holdout=1, resume=True))
    for name in ("log.csv", "val.csv"):
        rows = (out / name).read_text().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"], name


def test_export_only_resume_leaves_a_running_trainers_log_alone(data, tmp_path, monkeypatch):
    """An export-only resume (--steps 0) may run beside the trainer still writing the folder: the rows
    that trainer logged past its last checkpoint are its own, not a dead run's. Rewriting log.csv
    dropped them, and the trainer's later rows went to the replaced file."""
    monkeypatch.setattr(trainer, "plot_log", lambda *a: None)
    out = tmp_path / "r"
    trainer.train(tiny_args(data, out, steps=1))
    with open(out / "log.csv", "a") as live:  # still training: steps 2 and 3 logged past the checkpoint
        live.write("2,0.1,0.1,0.1,0.001,1.0,1.0\n3,0.1,0.1,0.1,0.001,1.0,1.0\n")
        live.flush()
        trainer.train(tiny_args(data, out, steps=0, resume=True, export=str(tmp_path / "w.safetensors")))
        live.write("4,0.1,0.1,0.1,0.001,1.0,1.0\n")
    rows = (out / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_fp16_on_the_cpu_scales_the_loss(data, tmp_path):
    # CUDA's GradScaler was made on every device: on the CPU it disabled itself (a warning), and fp16
    # gradients too small for fp16 went to zero unscaled.
    trainer.train(tiny_args(data, tmp_path, steps=1, amp="fp16"))
    assert state(tmp_path / "checkpoint.pt")["scaler"].get("scale", 0) > 1  # {} when disabled


def test_fp16_loss_scale_resumes(data, tmp_path, monkeypatch):
    """--amp fp16: the GradScaler's loss scale is part of the run's state. A resume that restarted it
    at its initial value skipped steps (overflows) that the uninterrupted run took. CUDA's scaler, run
    on the CPU, starting high enough (2**20) that its first step overflows and backs off."""
    cpu_scaler = torch.amp.GradScaler

    def scaler(device, enabled):
        return cpu_scaler("cpu", init_scale=2.0**20, enabled=enabled)

    monkeypatch.setattr(torch.amp, "GradScaler", scaler)
    trainer.train(tiny_args(data, tmp_path / "a", steps=4, amp="fp16"))
    trainer.train(tiny_args(data, tmp_path / "b", steps=2, amp="fp16"))
    trainer.train(tiny_args(data, tmp_path / "b", steps=4, amp="fp16", resume=True))
    a, b = state(tmp_path / "a" / "checkpoint.pt"), state(tmp_path / "b" / "checkpoint.pt")
    assert a["scaler"]["scale"] == 2.0**19  # it backed off once (a step skipped), then held
    assert a["scaler"] == b["scaler"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # A bare resume (`--out b --resume`, no --amp) keeps the run's fp16 and its loss scale: it fell
    # back to --amp auto (bf16 on CUDA, none here) and dropped the scale.
    trainer.train(tiny_args(data, tmp_path / "c", steps=2, amp="fp16"))
    trainer.train(tiny_args(data, tmp_path / "c", steps=4, resume=True), {"resume", "out", "steps"})
    c = state(tmp_path / "c" / "checkpoint.pt")
    assert c["args"]["amp"] == "fp16" and c["scaler"] == a["scaler"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], c["model"][k]), k


def infinite_gradient_at_step(n: int):
    """trainer.loss_fn, but step n's loss is finite with an infinite gradient (sqrt at 0)."""
    calls, loss_fn = [], trainer.loss_fn

    def poisoned(out, clean, w):
        calls.append(1)
        loss, l1, s = loss_fn(out, clean, w)
        if len(calls) == n:
            loss = loss + torch.sqrt(out - out.detach()).sum()
        return loss, l1, s

    return poisoned


def test_non_finite_weights_never_replace_the_checkpoint(data, tmp_path, monkeypatch):
    """On CUDA the loss is checked only every --log-every steps, so a step can put NaN into the weights
    before the check raises: that state must not be written over the last good checkpoint."""
    monkeypatch.setattr(trainer, "loss_fn", infinite_gradient_at_step(3))
    with pytest.raises(FloatingPointError):
        trainer.train(tiny_args(data, tmp_path / "r", steps=6, ckpt_every=1))
    ck = state(tmp_path / "r" / "checkpoint.pt")
    assert ck["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_qairn_train_of_a_non_finite_loss_says_so_in_one_line(data, tmp_path, monkeypatch, capsys):
    """`qairn train` whose loss went NaN ended in a whole FloatingPointError traceback: the CLI caught
    only OSError/ValueError. It is one line (exit 1), and the checkpoint keeps the last finite weights."""
    from qairn import cli

    monkeypatch.setattr(trainer, "loss_fn", infinite_gradient_at_step(3))
    rc = cli.main(["train", *cli_args(tiny_args(data, tmp_path / "r", steps=6, ckpt_every=1))])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("qairn train: error: ") and "Traceback" not in err, err
    assert "not finite" in err or "non-finite" in err, err
    assert state(tmp_path / "r" / "checkpoint.pt")["step"] == 2


def test_a_non_finite_loss_says_a_resume_repeats_it_and_another_seed_does_not(data, tmp_path, monkeypatch):
    """Batches are a function of (seed, step): a resume after a NaN loss met the same batch and the
    same NaN at the same step, and the error said nothing of it. It now says what to change."""
    from qairn.train.trainer import loss_fn

    keys = []

    def nan_on_the_third_batch(out, clean, w):
        keys.append(round(float(clean.sum()), 2))
        loss, l1, s = loss_fn(out, clean, w)
        return (loss * float("nan") if len(keys) > 2 and keys[-1] == keys[2] else loss), l1, s

    monkeypatch.setattr(trainer, "loss_fn", nan_on_the_third_batch)
    hint = "resuming repeats the same batches: resume with a lower --lr or another --seed"
    with pytest.raises(FloatingPointError, match=f"non-finite loss at step 2; {hint}"):
        trainer.train(tiny_args(data, tmp_path, steps=4))
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2;"):
        trainer.train(tiny_args(data, tmp_path, steps=4, resume=True))
    trainer.train(tiny_args(data, tmp_path, steps=4, resume=True, seed=1))
    assert state(tmp_path / "checkpoint.pt")["step"] == 4


def test_a_checkpoint_write_that_fails_leaves_the_last_one_and_no_partial_file(data, tmp_path, monkeypatch):
    # A full disk mid-write left a partial checkpoint.tmp beside the good checkpoint.pt, holding the space.
    saves, torch_save = [], torch.save

    def disk_full_after_the_first_save(obj, f):
        saves.append(1)
        if len(saves) == 1:
            return torch_save(obj, f)
        with contextlib.nullcontext(f) if hasattr(f, "write") else open(f, "wb") as out:  # a file or a path
            out.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_after_the_first_save)
    ctrl_c = signal.getsignal(signal.SIGINT)
    with pytest.raises(OSError, match="No space left"):
        trainer.train(tiny_args(data, tmp_path, steps=4, ckpt_every=2))
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint.pt"]
    assert state(tmp_path / "checkpoint.pt")["step"] == 2
    # The failed last checkpoint skipped the rest of the clean-up: the trainer's Ctrl-C handler stayed,
    # so Ctrl-C only set a flag of the finished run and no longer stopped the calling program.
    assert signal.getsignal(signal.SIGINT) is ctrl_c


def test_weights_made_non_finite_by_the_last_step_are_not_exported(data, tmp_path, monkeypatch):
    """The loss is checked before its step: an infinite gradient in the last step left NaN weights that
    the run exported (over --export, an unloadable file) and returned as if it had succeeded."""
    monkeypatch.setattr(trainer, "plot_log", lambda *a: None)
    monkeypatch.setattr(trainer, "loss_fn", infinite_gradient_at_step(3))  # the last step
    w = tmp_path / "w.safetensors"
    with pytest.raises(FloatingPointError, match="not finite after step 3: nothing exported"):
        trainer.train(tiny_args(data, tmp_path / "r", steps=3, ckpt_every=1, export=str(w)))
    assert not w.exists() and state(tmp_path / "r" / "checkpoint.pt")["step"] == 2


def test_validation_psnr_is_logged_and_leaves_training_alone(data, tmp_path):
    """--val-every N: held-out PSNR at QF 10 and 40, raw and averaged, into val.csv and the plot;
    the weights trained are the same as without it (validation runs on a copy)."""
    import csv

    trainer.train(tiny_args(data, tmp_path / "v", val_every=2, ema=0.5))
    trainer.train(tiny_args(data, tmp_path / "n", val_every=0, ema=0.5))
    with open(tmp_path / "v" / "val.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "4"]
    cols = ["psnr_qf10", "psnr_qf40", "ema_psnr_qf10", "ema_psnr_qf40"]
    assert all(15 < float(r[c]) < 60 for r in rows for c in cols)
    assert float(rows[-1]["psnr_qf40"]) > float(rows[-1]["psnr_qf10"])  # less to undo at QF 40
    assert not (tmp_path / "n" / "val.csv").exists()
    v, n = state(tmp_path / "v" / "checkpoint.pt"), state(tmp_path / "n" / "checkpoint.pt")
    assert all(torch.equal(v["model"][k], n["model"][k]) for k in n["model"])
    # The same numbers as validating the checkpoint's weights afresh.
    m = QAIRN(preset("tiny"))
    m.load_state_dict(v["model"])
    files = trainer.train_val_files(tiny_args(data, tmp_path / "v"))[1]
    fresh = trainer.validate(m, trainer.validation_pairs(files), "cpu")
    assert fresh == {k: float(rows[-1][k]) for k in ("psnr_qf10", "psnr_qf40")}
    # Resumed, it appends.
    trainer.train(tiny_args(data, tmp_path / "v", steps=6, val_every=2, resume=True))
    with open(tmp_path / "v" / "val.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["2", "4", "6"]


def test_ema_weights_average_resume_and_export(data, tmp_path):
    """--ema keeps an exponential moving average of the weights: checkpointed, resumed exactly (3+2
    steps equal 5), started from the current weights when an older checkpoint has none, and what
    --export writes; without --ema the raw weights are exported from the same checkpoint."""
    trainer.train(tiny_args(data, tmp_path / "a", steps=5, ema=0.5))
    trainer.train(tiny_args(data, tmp_path / "b", steps=3, ema=0.5))
    trainer.train(tiny_args(data, tmp_path / "b", steps=5, ema=0.5, resume=True))
    a, b = state(tmp_path / "a" / "checkpoint.pt"), state(tmp_path / "b" / "checkpoint.pt")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 5 and a["ema"]["decay"] == 0.5
    for k in a["model"]:
        assert torch.equal(a["ema"]["avg"][k], b["ema"]["avg"][k]), k
    assert any(not torch.equal(a["ema"]["avg"][k], a["model"][k].float()) for k in a["model"])

    # The recurrence itself: avg <- d * avg + (1 - d) * weights.
    m = QAIRN(preset("tiny"))
    ema = trainer.EMA(m, 0.75)
    before = {k: v.clone() for k, v in ema.avg.items()}
    with torch.no_grad():
        for prm in m.parameters():
            prm.add_(1.0)
    ema.update(m)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(ema.avg[k], 0.75 * before[k] + 0.25 * v, atol=1e-6, rtol=0)
    assert all(torch.equal(x, y) for x, y in zip(ema.averaged(m).state_dict().values(), ema.avg.values()))

    # An older checkpoint without an average: --ema starts it from the checkpoint's weights.
    trainer.train(tiny_args(data, tmp_path / "c", steps=2))
    start = state(tmp_path / "c" / "checkpoint.pt")["model"]
    trainer.train(tiny_args(data, tmp_path / "c", steps=3, ema=0.9, resume=True))
    c = state(tmp_path / "c" / "checkpoint.pt")
    assert c["ema"]["updates"] == 1
    for k, v in c["model"].items():
        torch.testing.assert_close(
            c["ema"]["avg"][k], 0.9 * start[k].float() + 0.1 * v.float(), atol=1e-6, rtol=0
        )

    # Export: the average with --ema, the raw weights without; neither drops the checkpoint's average.
    # Not given again, --ema is the run's own (0.5): an export-only resume writes the average it trained.
    for name, flag, given, want in (
        ("raw", 0.0, {"ema"}, a["model"]),  # `--ema 0` given: the raw weights
        ("kept", 0.0, None, a["ema"]["avg"]),  # nothing said: the run's average
        ("avg", 0.5, None, a["ema"]["avg"]),
    ):
        w = tmp_path / f"w{name}.safetensors"
        trainer.train(tiny_args(data, tmp_path / "a", steps=0, resume=True, ema=flag, export=str(w)), given)
        exported, half = load_model(w).state_dict(), json.loads(read_metadata(w)["training"])
        half = half["export"]["dtype"] == "fp16"
        for k, v in want.items():
            assert torch.equal(exported[k], v.half().float() if half else v.float()), k
        kept = state(tmp_path / "a" / "checkpoint.pt")["ema"]
        assert kept["updates"] == 5 and all(
            torch.equal(kept["avg"][k], a["ema"]["avg"][k]) for k in kept["avg"]
        )
    with pytest.raises(SystemExit, match="decay must be in"):
        trainer.train(tiny_args(data, tmp_path / "d", steps=1, ema=1.5))


def run_until_logged(cmd, log: Path, timeout=120) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.time()
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        if proc.poll() is not None or time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"training did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.2)
    return proc


def test_ctrl_c_saves_a_checkpoint(data, tmp_path):
    a = tiny_args(data, tmp_path, steps=100_000, ckpt_every=10_000)
    proc = run_until_logged([sys.executable, "-m", "qairn.train.trainer", *cli_args(a)], tmp_path / "log.csv")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-2000:]
    ck = state(tmp_path / "checkpoint.pt")
    assert 2 <= ck["step"] < 100_000
    assert (tmp_path / "loss.png").exists()


def test_a_worker_killed_by_the_stop_signal_is_seen_through_torchs_wrapper():
    """test_sigterm_to_the_process_group... failed 1 run in a few (a clean clone, 2 cores): when the
    loader had already reaped the killed worker, torch raised 'DataLoader worker (pid(s) 8005, 8006)
    exited unexpectedly' from the SIGCHLD handler's 'is killed by signal: Terminated.', and only the outer
    message was read: a traceback and exit 1 after a SIGTERM to the process group."""
    killed = RuntimeError("DataLoader worker (pid 8005) is killed by signal: Terminated. ")
    try:
        try:
            raise killed
        except RuntimeError as e:
            raise RuntimeError("DataLoader worker (pid(s) 8005, 8006) exited unexpectedly") from e
    except RuntimeError as wrapped:
        assert trainer.killed_by(wrapped, {signal.SIGTERM})
        assert not trainer.killed_by(wrapped, {signal.SIGINT})  # a worker killed otherwise: an error
    assert trainer.killed_by(killed, {signal.SIGTERM})
    assert not trainer.killed_by(RuntimeError("DataLoader worker (pid(s) 7) exited unexpectedly"), {15})
    assert not trainer.killed_by(ValueError("is killed by signal: Terminated."), {signal.SIGTERM})


def test_sigterm_to_the_process_group_stops_cleanly_with_workers(data, tmp_path):
    # Slurm's preemption, systemd's stop and `kill -- -PGID` signal the DataLoader workers too: the run
    # saved its checkpoint, then ended in "DataLoader worker (pid N) is killed by signal: Terminated",
    # a traceback and exit 1. It must end as a SIGTERM to the training process alone does.
    a = tiny_args(data, tmp_path, steps=100_000, ckpt_every=1, workers=2, val_every=0)
    cmd = [sys.executable, "-m", "qairn.train.trainer", *cli_args(a)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    t0 = time.time()
    while not (tmp_path / "checkpoint.pt").exists():
        if proc.poll() is not None or time.time() - t0 > 120:
            proc.kill()
            raise AssertionError(f"training did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    lines = out.decode().strip().splitlines()
    assert proc.returncode == 0, out.decode()[-2000:]
    assert len(lines) == 1 and re.fullmatch(r"\d+ steps in .* of training .*", lines[0]), lines
    assert state(tmp_path / "checkpoint.pt")["step"] >= 1


def torchrun_cmd(a: trainer.TrainArgs, nproc: int = 2, script: Path | None = None) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m qairn.train.trainer` with a's options (or the
    script given in place of the trainer: one that patches it, then calls trainer.main)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [*run, *(["-m", "qairn.train.trainer"] if script is None else [str(script)]), *cli_args(a)]


OUT_OF_TIME_ON_RANK_0 = """
import os, sys, time
from qairn.train import trainer
loss_fn, calls, clock = trainer.loss_fn, [], time.time
def counted(out, clean, w):
    calls.append(1)
    return loss_fn(out, clean, w)
trainer.loss_fn = counted
# Rank 0's clock jumps 1000 s ahead in its step 3; rank 1's keeps the real time.
time.time = lambda: clock() + (1000.0 if os.environ["RANK"] == "0" and len(calls) >= 3 else 0.0)
trainer.main(sys.argv[1:])
"""


def test_ddp_gloo_two_processes_average_gradients(data, tmp_path):
    """torchrun, 2 CPU processes: each rank trains on its own batches, DDP averages the gradients,
    and a time limit reached on one rank stops both at the same step (a hang fails the test).
    The result must equal one process that averages the two ranks' gradients by hand.
    The limit was real time (--max-seconds 1, at least 2 steps wanted): on a busy machine the first step
    took over 1 s and the run stopped after it. Rank 0's clock is faked: it passes --max-seconds in
    step 3; rank 1's real one cannot within the test's 240 s."""
    a = tiny_args(data, tmp_path / "run", steps=10_000, max_seconds=300.0, log_every=2, ckpt_every=10_000)
    script = tmp_path / "out_of_time_on_rank_0.py"
    script.write_text(OUT_OF_TIME_ON_RANK_0)
    r = subprocess.run(
        torchrun_cmd(a, script=script), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ck = state(tmp_path / "run" / "checkpoint.pt")
    steps = ck["step"]
    assert steps == 3  # rank 0's time limit, agreed by rank 1

    train_files, _ = trainer.split_files(str(data), a.val_holdout)
    ds = JPEGPatches(load_cached(train_files), a.batch, a.patch, (a.qf_min, a.qf_max), a.shift_prob, a.seed)
    torch.manual_seed(a.seed)
    model = QAIRN(preset("tiny")).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    for s in range(steps):
        grads = []
        for rank in range(2):
            jp, clean, _ = ds[2 * s + rank]
            out, _ = model(jp.contiguous(memory_format=torch.channels_last))
            loss = trainer.loss_fn(out, clean, a.ssim_weight)[0]
            model.zero_grad()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads, strict=True):
            p.grad = (g0 + g1) / 2
        for g in opt.param_groups:
            g["lr"] = trainer.lr_at(s, a)
        opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ck["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def ranks_by_hand(script_text: str, a: trainer.TrainArgs, tmp_path: Path, world: int = 2, others=True):
    """Start `world` gloo processes by hand (RANK, WORLD_SIZE, MASTER_ADDR: no torchrun to end the
    others when one fails), each running script_text with a's options: their exit codes and outputs.
    others=False: wait for rank 0 only, and kill the others (code None, output '')."""
    script = tmp_path / "ranks_by_hand.py"
    script.write_text(script_text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = ENV | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, str(script), *cli_args(a)]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    try:
        outs = [p.communicate(timeout=120)[0].decode() for p in (procs if others else procs[:1])]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outs + [""] * (world - len(outs))


NAN_ON_RANK_1 = """
import os, sys
from qairn.train import trainer
loss_fn, calls = trainer.loss_fn, []
def nan_on_rank_1(out, clean, w):  # the loss of step 1 is NaN on rank 1 only
    calls.append(1)
    loss, l1, s = loss_fn(out, clean, w)
    return (loss * float("nan") if os.environ["RANK"] == "1" and len(calls) == 2 else loss), l1, s
trainer.loss_fn = nan_on_rank_1
trainer.main(sys.argv[1:])
"""


def test_ddp_a_non_finite_loss_on_one_rank_stops_every_rank(data, tmp_path):
    """Two gloo processes started by hand (no torchrun to end the others when one fails); rank 1's
    loss is NaN at step 1. Rank 0 went on alone into backward's all-reduce, whose peer had left: it
    died of 'Connection closed by peer' (on NCCL: hung). Both must stop at step 1 and say why."""
    codes, outs = ranks_by_hand(NAN_ON_RANK_1, tiny_args(data, tmp_path / "run", steps=4), tmp_path)
    assert [c != 0 for c in codes] == [True, True]
    assert "FloatingPointError: non-finite loss at step 1 (on another rank)" in outs[0], outs[0][-2000:]
    assert "FloatingPointError: non-finite loss at step 1 (on rank 1)" in outs[1], outs[1][-2000:]
    assert state(tmp_path / "run" / "checkpoint.pt")["step"] == 1  # the last finite weights


def scrambled_model(seed=0) -> QAIRN:
    """A tiny QAIRN with random weights everywhere (the tail and gates too), so it changes images."""
    torch.manual_seed(seed)
    m = QAIRN(preset("tiny"))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "tail" in name or ".out." in name:
                p.normal_(0, 0.01)
    return m


def test_export_keeps_fp16_when_harmless(data, tmp_path):
    m = scrambled_model()
    _, val = trainer.split_files(str(data), 2)
    a = tiny_args(data, tmp_path, export=str(tmp_path / "w.safetensors"))
    trainer.export_weights(m, a, step=4, seconds=1.0, val_files=val)
    meta = read_metadata(tmp_path / "w.safetensors")
    dec = json.loads(meta["training"])["export"]
    assert dec["dtype"] == "fp16" and abs(dec["loss_db"]) < 0.02 and dec["images"] == [f.name for f in val]
    assert dec["psnr_fp32"] > 10
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert json.loads(meta["training"])["val_files"] == [f.name for f in val]
    assert load_model(tmp_path / "w.safetensors").config == m.config


def test_export_keeps_fp32_when_the_check_fails(data, tmp_path, monkeypatch):
    # A threshold no rounding can meet: the check must say fp32, and the file must follow it.
    from qairn.train import evaluate

    check = evaluate.fp16_check
    monkeypatch.setattr(evaluate, "fp16_check", lambda *a, **k: check(*a, **k, max_loss_db=-1.0))
    m = scrambled_model()
    _, val = trainer.split_files(str(data), 2)
    a = tiny_args(data, tmp_path, export=str(tmp_path / "w.safetensors"))
    trainer.export_weights(m, a, step=4, seconds=1.0, val_files=val)
    dec = json.loads(read_metadata(tmp_path / "w.safetensors")["training"])["export"]
    assert dec["dtype"] == "fp32" and dec["max_loss_db"] == -1.0 and dec["loss_db"] >= -1.0
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert torch.equal(load_model(tmp_path / "w.safetensors").tail.weight, m.tail.weight)


def test_an_image_restored_exactly_leaves_the_metadata_finite(tmp_path):
    """A flat gray image (its JPEGs decode to it exactly) through a model that changes nothing: PSNR inf
    for fp32 and fp16, and the fp16 loss inf - inf = NaN went into the weights' metadata ("NaN",
    "Infinity": not JSON) and turned the export fp32. Identical images now count as 100 dB."""
    cv2.imwrite(str(tmp_path / "flat.png"), np.full((32, 32, 3), 128, np.uint8))
    m = QAIRN(preset("tiny"))
    torch.nn.init.zeros_(m.tail.weight)  # the output is the input
    torch.nn.init.zeros_(m.tail.bias)
    val = [tmp_path / "flat.png"]
    assert trainer.validate(m, trainer.validation_pairs(val), "cpu") == {
        "psnr_qf10": 100.0,
        "psnr_qf40": 100.0,
    }
    a = tiny_args(tmp_path, tmp_path / "run", export=str(tmp_path / "w.safetensors"))
    trainer.export_weights(m, a, step=1, seconds=1.0, val_files=val)
    text = read_metadata(tmp_path / "w.safetensors")["training"]
    dec = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the metadata"))["export"]
    assert dec["psnr_fp32"] == dec["psnr_fp16"] == 100.0 and dec["loss_db"] == 0.0
    assert dec["dtype"] == "fp16"


def test_loss_plot_of_one_logged_step_shows_its_point(tmp_path):
    """--steps under --log-every logs the last step alone: a line through one point draws nothing, and
    loss.png showed empty axes (blue in its legend only: 35 pixels)."""
    (tmp_path / "log.csv").write_text(
        "step,loss,l1,ssim,lr,patches_per_s,seconds\n3,0.72,0.2,0.48,2e-4,1.1,5.3\n"
    )
    trainer.plot_log(tmp_path / "log.csv", tmp_path / "loss.png")
    png = cv2.imread(str(tmp_path / "loss.png"))[..., ::-1].astype(int)
    blue = np.abs(png - (31, 119, 180)).sum(-1) < 30  # matplotlib's first line colour
    assert blue.sum() > 60


def test_gpu_pack_and_entry_on_cpu(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_train_pack

    src = make_folder(tmp_path / "src", 10, 72, 96, seed=2, ext=".webp")
    live1 = make_folder(tmp_path / "live1", 2, 48, 64, seed=3)
    pack = tmp_path / "pack"
    budget = 0.25  # MiB
    man = build_train_pack.build(src, live1, pack, budget_mib=budget, crop=56, holdout=2, log=lambda *a: None)
    total = sum(p.stat().st_size for p in pack.rglob("*") if p.is_file())
    assert total <= budget * 2**20
    assert man["train_crops"] == len(list((pack / "train").glob("*.webp"))) > 0
    _, val = trainer.split_files(str(src), 2)
    assert sorted(p.name for p in (pack / "val").iterdir()) == sorted(f.name for f in val)
    assert not any(p.name.startswith(tuple(f.stem + "_" for f in val)) for p in (pack / "train").iterdir())
    for f in live1.iterdir():  # lossless
        packed = cv2.imread(str(pack / "live1" / f"{f.stem}.webp"))
        assert np.array_equal(packed, cv2.imread(str(f)))
    # A rebuild replaces the earlier pack; any other folder (or one holding the sources) is refused.
    build_train_pack.build(src, live1, pack, budget_mib=budget, crop=56, holdout=2, log=lambda *a: None)
    for bad in (tmp_path, tmp_path / "src"):
        with pytest.raises(SystemExit, match="source images|not a training pack"):
            build_train_pack.build(
                src, live1, bad, budget_mib=budget, crop=56, holdout=2, log=lambda *a: None
            )
    other = tmp_path / "other"
    (other / "train").mkdir(parents=True)
    (other / "train" / "keep.png").write_bytes(b"data")
    with pytest.raises(SystemExit, match="not a training pack"):
        build_train_pack.build(src, live1, other, budget_mib=budget, crop=56, holdout=2, log=lambda *a: None)
    assert (other / "train" / "keep.png").read_bytes() == b"data" and len(list(src.iterdir())) == 10

    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "scripts/gpu_train.py",
        "--pack",
        str(pack),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--batch",
        "2",
        "--patch",
        "32",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    files = {p.name for p in out.iterdir() if p.is_file()}
    assert {
        "weights.safetensors",
        "report.txt",
        "results.json",
        "eval.json",
        "train_log.csv",
        "loss.png",
    } <= files
    res = json.loads((out / "results.json").read_text())
    assert res["train"]["steps"] == 3 and res["train"]["export"]["dtype"] in ("fp16", "fp32")
    assert set(res["eval"]["qfs"]) == {"10", "20", "30", "40"} and "quality" in res
    model = load_model(out / "weights.safetensors")
    assert model.config.p == res["p_sweep"]["p"] and model.config.preset == "tiny"
    assert "Q against SSIM" in (out / "report.txt").read_text()


def test_a_training_pack_keeps_same_named_images_of_two_subfolders_apart(tmp_path):
    # val/ and train/ were flat: a/img00.png and b/img00.png, both held out, were copied to one
    # val/img00.png (the second over the first), and their crops of an image the crop's size (at y 0,
    # x 0 each round) to one train/img01_r0_y0_x0.webp, each still counted in the manifest.
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_train_pack

    src = tmp_path / "src"
    make_folder(src / "a", 4, 56, 56, seed=2)
    make_folder(src / "b", 4, 56, 56, seed=3)
    live1 = make_folder(tmp_path / "live1", 1, 48, 64, seed=4)
    pack = tmp_path / "pack"
    man = build_train_pack.build(src, live1, pack, budget_mib=1, crop=56, holdout=2, log=lambda *a: None)
    assert man["val_files"] == ["a/img00.png", "b/img00.png"]
    assert [f.relative_to(pack / "val").as_posix() for f in list_images(pack / "val")] == man["val_files"]
    crops = list_images(pack / "train")
    assert len(crops) == man["train_crops"] and {f.parent.name for f in crops} == {"a", "b"}


def test_gpu_train_writes_strict_json_when_a_score_is_not_finite(tmp_path):
    # A LIVE1 image its JPEG leaves unchanged (flat: PSNR infinite) and scores that rank nothing (SSIM 1
    # at every level: correlations NaN, as the H200 run's constant Q2 gave) were written as the bare
    # words Infinity and NaN, which jq, JavaScript and strict parsers refuse: the whole file is lost.
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_train_pack

    src = make_folder(tmp_path / "src", 4, 72, 96, seed=2)
    live1 = tmp_path / "live1"
    live1.mkdir()
    cv2.imwrite(str(live1 / "flat.png"), np.full((48, 64, 3), 128, np.uint8))
    pack = tmp_path / "pack"
    build_train_pack.build(src, live1, pack, budget_mib=0.25, crop=56, holdout=1, log=lambda *a: None)
    out = tmp_path / "out"
    cmd = [sys.executable, "scripts/gpu_train.py", "--pack", str(pack), "--out", str(out), "--preset"]
    cmd += ["tiny", "--steps", "1", "--batch", "1", "--patch", "32", "--workers", "0", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

    def refuse(word):
        raise ValueError(f"not JSON: {word}")

    results = json.loads((out / "results.json").read_text(), parse_constant=refuse)
    evaluation = json.loads((out / "eval.json").read_text(), parse_constant=refuse)
    assert results["quality"]["tables"]["ssim"]["jpeg"]["Q2"]["srcc"] is None
    assert evaluation["images"][0]["jpeg"]["psnr"] is None


def test_gpu_train_refuses_a_pack_image_too_small_for_the_quality_steps_before_training(tmp_path):
    # A LIVE1 (or held-out) image under 32 px in the pack (an older build, a --live1 of one's own)
    # ended the quality study in a ValueError traceback after the training's minutes.
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_train_pack
    import gpu_train

    src = make_folder(tmp_path / "src", 4, 72, 96, seed=2)
    live1 = make_folder(tmp_path / "live1", 1, 48, 64, seed=3)
    pack = tmp_path / "pack"
    build_train_pack.build(src, live1, pack, budget_mib=0.3, crop=56, holdout=1, log=lambda *a: None)
    cv2.imwrite(str(pack / "live1" / "tiny.webp"), np.full((24, 40, 3), 90, np.uint8))  # an older pack's
    argv = ["--pack", str(pack), "--out", str(tmp_path / "out"), "--preset", "tiny", "--steps", "1"]
    argv += ["--batch", "1", "--patch", "32", "--workers", "0", "--device", "cpu"]
    with pytest.raises(SystemExit, match="tiny.webp: 40x24 pixels; the JPEG 2000 distortion"):
        gpu_train.main(argv)
    assert not (tmp_path / "out" / "work").exists()


def test_gpu_train_refuses_a_pack_of_crops_too_small_for_its_patch_before_training(tmp_path):
    # build_train_pack.py --crop 56 (anything under 104) and gpu_train.py's default --patch 96: each
    # patch needs a crop of 96 + 8, so the trainer found no training image only once it had started.
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_train_pack
    import gpu_train

    src = make_folder(tmp_path / "src", 4, 72, 96, seed=2)
    live1 = make_folder(tmp_path / "live1", 1, 48, 64, seed=3)
    pack = tmp_path / "pack"
    build_train_pack.build(src, live1, pack, budget_mib=0.3, crop=56, holdout=1, log=lambda *a: None)
    argv = ["--pack", str(pack), "--out", str(tmp_path / "out"), "--preset", "tiny", "--steps", "1"]
    argv += ["--batch", "1", "--workers", "0", "--device", "cpu"]
    says = "its training crops are 56 px, too small for --patch 96 (needs 104: "
    with pytest.raises(SystemExit, match=re.escape(says)):
        gpu_train.main(argv)
    assert not (tmp_path / "out" / "work").exists()


def test_largest_config_under_20mb():
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_train

    n, c, nb = gpu_train.largest_config(20e6)
    assert 2 * n <= 20e6
    assert gpu_train.n_params(preset("tiny")) == sum(p.numel() for p in QAIRN(preset("tiny")).parameters())
    # Any larger candidate (one more block, or the next width) is over the limit.
    for c2, nb2 in ((c, nb + 1), (c + 8, nb)):
        assert 2 * gpu_train.n_params(preset("small", widths=(c2, 2 * c2, 4 * c2, 8 * c2), nb=nb2)) > 20e6


def test_paper_preset_trains_and_exports(data, tmp_path):
    # The paper's 52 M-parameter network goes through the same loop (two steps of one 32 px patch
    # here) and comes back from its weights file as the paper's architecture.
    w = tmp_path / "paper.safetensors"
    a = tiny_args(data, tmp_path, preset="paper", steps=2, batch=1, export=str(w))
    trainer.train(a)
    ck = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 2
    model = load_model(w)
    assert (model.config.widths, model.config.nb, model.config.preset) == ((64, 128, 256, 512), 4, "paper")
    assert sum(p.numel() for p in model.parameters()) > 50e6


def test_init_from_weights(data, tmp_path):
    # --init starts from a weights file (e.g. the shipped one): step 0, those weights, fresh optimiser.
    first = tmp_path / "a"
    trainer.train(tiny_args(data, first, steps=2, export=str(first / "w.safetensors")))
    start = load_model(first / "w.safetensors")
    second = tmp_path / "b"
    a = tiny_args(data, second, steps=0, init=str(first / "w.safetensors"))
    trainer.train(a)
    ck = torch.load(second / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 0
    for k, v in start.state_dict().items():
        torch.testing.assert_close(ck["model"][k], v.float())
    with pytest.raises(SystemExit, match="architecture differs"):
        trainer.train(tiny_args(data, tmp_path / "c", steps=0, nb=2, init=str(first / "w.safetensors")))


def test_unguarded_script_gets_a_clear_error(data, tmp_path):
    """DataLoader workers are spawned and import the user's script: one that calls train() without
    the __main__ guard must stop with a message saying so, not hang or fail obscurely."""
    script = tmp_path / "unguarded.py"
    a = tiny_args(data, tmp_path / "run", steps=1, workers=1)
    script.write_text(
        f"from qairn.train.trainer import TrainArgs, train\ntrain(TrainArgs(**{asdict(a)!r}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode != 0
    assert 'call it under `if __name__ == "__main__":`' in result.stderr, result.stderr[-2000:]


def test_resume_keeps_the_runs_settings_and_refuses_mistakes(data, tmp_path, capsys):
    """A resume trains on with the run's own schedule and data unless told otherwise; a typo in --out
    or a forgotten --resume is refused instead of starting afresh or replacing the checkpoint."""
    trainer.train(tiny_args(data, tmp_path / "r", steps=2, lr=1e-3, lr_halve_every=2, val_every=2))
    with pytest.raises(SystemExit, match="no checkpoint to resume"):
        trainer.train(
            tiny_args(data, tmp_path / "typo", steps=0, resume=True, export=str(tmp_path / "w.safetensors"))
        )
    assert not (tmp_path / "w.safetensors").exists()
    with pytest.raises(SystemExit, match="a run is already here; --resume continues it, --overwrite"):
        trainer.train(tiny_args(data, tmp_path / "r", steps=2))
    assert state(tmp_path / "r" / "checkpoint.pt")["step"] == 2
    # Resumed with the defaults: lr 1e-3 halved every 2 steps goes on (5e-4 at steps 3-4), not 2e-4.
    trainer.train(tiny_args(data, tmp_path / "r", steps=4, resume=True, val_every=2))
    rows = (tmp_path / "r" / "log.csv").read_text().splitlines()[1:]
    assert [float(r.split(",")[4]) for r in rows] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert state(tmp_path / "r" / "checkpoint.pt")["args"]["lr_halve_every"] == 2
    # The run's length is one of its settings: a bare resume of a finished 4-step run trains nothing.
    trainer.train(tiny_args(data, tmp_path / "r", steps=0, resume=True), {"resume"})
    assert state(tmp_path / "r" / "checkpoint.pt")["step"] == 4
    # Given again, a setting wins and is said.
    trainer.train(tiny_args(data, tmp_path / "r", steps=5, resume=True, lr=2e-5, val_every=0), {"lr"})
    assert "resume: --lr 2e-05 replaces the run's 0.001" in capsys.readouterr().out
    # --overwrite starts again, and the old run's validation rows go with it.
    trainer.train(tiny_args(data, tmp_path / "r", steps=2, overwrite=True, val_every=2))
    assert (tmp_path / "r" / "val.csv").read_text().count("\n") == 2  # header and step 2
    # --max-seconds limits this run: a resume of a run that took longer still trains.
    trainer.train(tiny_args(data, tmp_path / "r", steps=3, resume=True, max_seconds=1e-6))
    assert state(tmp_path / "r" / "checkpoint.pt")["step"] == 3


def test_a_bare_resume_keeps_the_runs_log_validation_and_checkpoint_intervals(data, tmp_path):
    # They fell back to the defaults (10, 1000, 200): the resumed half of this log had only its last step.
    trainer.train(tiny_args(data, tmp_path, steps=2, log_every=1, val_every=2, ckpt_every=1))
    trainer.main(["--out", str(tmp_path), "--resume", "--steps", "4", "--workers", "0", "--threads", "1"])
    assert [r.split(",")[0] for r in (tmp_path / "log.csv").read_text().splitlines()[1:]] == [
        "1",
        "2",
        "3",
        "4",
    ]
    assert [r.split(",")[0] for r in (tmp_path / "val.csv").read_text().splitlines()[1:]] == ["2", "4"]
    assert state(tmp_path / "checkpoint.pt")["args"]["ckpt_every"] == 1


def test_a_checkpoint_that_is_not_one_is_refused_in_one_line(data, tmp_path):
    # Garbage gave "invalid literal for int() with base 10: 'arbage'" (no file named); another torch
    # file a KeyError: 'step' traceback.
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_text("garbage")
    with pytest.raises(SystemExit, match=f"{ckpt}: not a readable checkpoint"):
        trainer.train(tiny_args(data, tmp_path, resume=True))
    torch.save({"x": 1}, ckpt)
    with pytest.raises(SystemExit, match=f"{ckpt}: not a qairn training checkpoint"):
        trainer.train(tiny_args(data, tmp_path, resume=True))


def test_an_out_that_is_a_file_is_refused_in_one_line_naming_it(data, tmp_path, capsys):
    """`qairn train --out notes.txt` said "qairn train: error: [Errno 17] File exists: 'notes.txt'",
    from the run folder's mkdir: neither the option nor the problem. The file is left as it was."""
    from qairn import cli

    out = tmp_path / "notes.txt"
    out.write_text("mine")
    argv = ["train", *cli_args(tiny_args(data, out)), "-q"]
    assert cli.main(argv) == 2
    assert capsys.readouterr() == ("", f"qairn train: error: --out {out}: is a file, not a run folder\n")
    assert out.read_text() == "mine"


@pytest.mark.parametrize(
    "kw, says",
    [
        ({"lr_halve_every": 0}, "--lr-halve-every 0: needs at least 1"),
        ({"max_seconds": -5.0}, "--max-seconds -5.0: cannot be negative"),
        ({"amp": "fp8"}, "--amp fp8: use auto"),
        ({"widths": "8,16"}, "--widths 8,16: needs four"),
        # A RuntimeError traceback (negative dimension), an int() error naming no option, and a
        # network without residual blocks trained without a word.
        ({"widths": "-8,16,16,32"}, "--widths -8,16,16,32: needs four comma-separated positive"),
        ({"widths": "8,x,16,32"}, "--widths 8,x,16,32: needs four"),
        ({"nb": -1}, "--nb -1: needs at least 1"),
        # DataLoader's "num_workers option should be non-negative" after --out was made; a RuntimeError.
        ({"workers": -1}, "--workers -1: cannot be negative"),
        ({"threads": -1}, "--threads -1: cannot be negative"),
        ({"ddp_timeout": 0.0}, "--ddp-timeout 0.0: needs a positive number of seconds"),
        # timedelta's OverflowError traceback, when the process group was made
        ({"ddp_timeout": float("inf")}, "--ddp-timeout inf: needs a positive number of seconds"),
        # "expected non-negative integer" from the first batch, after a step-0 checkpoint was written.
        ({"seed": -1}, "--seed -1: cannot be negative"),
        # Taken without a word: a negative SSIM weight trains toward a worse SSIM, a NaN rate on NaNs.
        ({"ssim_weight": -1.0}, "--ssim-weight -1.0: cannot be negative"),
        ({"ssim_weight": float("nan")}, "--ssim-weight nan: cannot be negative"),
        ({"shift_prob": 1.5}, "--shift-prob 1.5: a probability"),
        ({"lr": float("nan")}, "--lr nan --lr-min .*: need a positive rate"),
        ({"export": "/no/such/dir/w.safetensors"}, "output folder does not exist"),
        ({"export": "w.onnx"}, "weights are written as .safetensors"),
        ({"init": "w.safetensors", "export": "./w.safetensors"}, "is the --init file"),
        ({"device": "cuda:99"}, "--device cuda:99: device 'cuda:99' requested, but this machine has"),
        ({"device": "gpu"}, "--device gpu: unknown device 'gpu': use cpu, cuda, cuda:N or auto"),
    ],
)
def test_bad_training_arguments_are_refused_before_any_work(data, tmp_path, kw, says):
    with pytest.raises(SystemExit, match=says):
        trainer.train(tiny_args(data, tmp_path / "x", **kw))
    assert not (tmp_path / "x").exists()


def test_an_out_that_cannot_be_made_is_refused_in_one_line(data, tmp_path, monkeypatch):
    # mkdir's words: "[Errno 20] Not a directory: 'notes.txt/run'" and, in a user's read-only folder
    # (root writes anyway: faked here), "[Errno 13] Permission denied: 'ro/run'".
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(SystemExit, match=f"^--out {notes / 'run'}: {notes} is a file, not a folder$"):
        trainer.train(tiny_args(data, notes / "run"))
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != ro and real_access(path, mode))
    with pytest.raises(SystemExit, match=f"^--out {ro / 'runs' / 'a'}: {ro} is not writable$"):
        trainer.train(tiny_args(data, ro / "runs" / "a"))
    assert notes.read_text() == "mine" and list(ro.iterdir()) == []


def test_an_export_into_a_read_only_folder_is_refused_before_training(data, tmp_path, monkeypatch):
    # Checked only for being there: hours of training ended in "[Errno 13] Permission denied:
    # '/ro/.w.safetensors.XXXXXXXX.part'". A user's read-only folder (root writes anyway: faked here).
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != ro and real_access(path, mode))
    with pytest.raises(SystemExit, match=f"--export {ro / 'w.safetensors'}: output folder is not writable"):
        trainer.train(tiny_args(data, tmp_path / "x", export=str(ro / "w.safetensors")))
    assert not (tmp_path / "x").exists() and list(ro.iterdir()) == []


def test_a_resume_refuses_a_bad_ddp_timeout_before_the_process_group(data, tmp_path):
    # A resume's arguments are checked once merged with the checkpoint's, after the process group is
    # made: --ddp-timeout (this run's own) reached timedelta() unchecked, a ValueError traceback.
    trainer.train(tiny_args(data, tmp_path / "r", steps=1))
    with pytest.raises(SystemExit, match="--ddp-timeout nan: needs a positive number of seconds"):
        trainer.train(tiny_args(data, tmp_path / "r", steps=2, resume=True, ddp_timeout=float("nan")))
    assert state(tmp_path / "r" / "checkpoint.pt")["step"] == 1


def test_ddp_on_gpus_without_local_rank_is_refused(data, tmp_path, monkeypatch):
    # Started by hand with RANK and WORLD_SIZE only, every rank took cuda:0 (LOCAL_RANK's default).
    # No GPU here: the device is faked; the refusal comes before any process group or CUDA call.
    monkeypatch.setattr(trainer, "resolve_device", lambda name, make_current=True: torch.device("cuda", 0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit, match="^rank 1 of 2: LOCAL_RANK is not set, so every process would train"):
        trainer.train(tiny_args(data, tmp_path / "x", device="cuda"))
    assert not (tmp_path / "x").exists()


def test_init_with_resume_is_refused_not_ignored(data, tmp_path):
    # --resume continued the checkpoint's weights and dropped --init without a word.
    run = tmp_path / "run"
    trainer.train(tiny_args(data, run, steps=1, val_every=0))
    with pytest.raises(SystemExit, match="--init w.safetensors: a resume continues its checkpoint's weights"):
        trainer.train(tiny_args(data, run, steps=2, val_every=0, resume=True, init="w.safetensors"))


def test_export_may_go_into_a_folder_that_out_creates(data, tmp_path):
    """`--out runs/small --export runs/small.safetensors` in a fresh folder: runs/ does not exist yet,
    but --out makes it (with its parents) before anything is exported; only a folder that nothing
    creates is refused."""
    w = tmp_path / "runs" / "w.safetensors"
    trainer.train(tiny_args(data, tmp_path / "runs" / "small", steps=1, val_every=0, export=str(w)))
    assert w.is_file()


def test_missing_data_leaves_no_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        trainer.train(tiny_args(tmp_path / "nothing", tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_the_torchrun_entry_refuses_an_empty_data_folder_in_one_line(tmp_path):
    # `python -m qairn.train.trainer` (what torchrun starts, once per rank) called main() bare: an empty
    # or unreadable --data ended in a FileNotFoundError or ValueError traceback where `qairn train` says
    # one line.
    (tmp_path / "empty").mkdir()
    a = tiny_args(tmp_path / "empty", tmp_path / "run")
    cmd = [sys.executable, "-m", "qairn.train.trainer", *cli_args(a)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    [line] = r.stderr.splitlines()
    assert line.startswith(f"qairn train: error: {tmp_path / 'empty'}: no images found (looked for .bmp")
    assert not (tmp_path / "run").exists()


def test_a_corrupt_training_image_leaves_no_run_folder(tmp_path):
    # The refusal ("cannot decode training image") came after --out was made: an empty run folder stayed.
    folder = make_folder(tmp_path / "d", 5, 48, 48, seed=3)
    bad = sorted(folder.glob("*.png"))[-1]
    bad.write_bytes(b"not a png")
    a = tiny_args(folder, tmp_path / "run", val_holdout=0)
    with pytest.raises(ValueError, match="cannot decode training image"):
        trainer.train(a)
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made is theirs: left in place
    with pytest.raises(ValueError, match="cannot decode training image"):
        trainer.train(replace(a, out=str(tmp_path / "kept")))
    assert (tmp_path / "kept").is_dir()


def test_a_new_run_that_fails_at_its_first_step_leaves_no_checkpoint(data, tmp_path, monkeypatch):
    # It wrote a step-0 checkpoint on the way out, so the rerun (a smaller --batch, say) was refused:
    # "a run is already here; --resume continues it, --overwrite starts it again".
    def out_of_memory(*args, **kw):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(trainer, "loss_fn", out_of_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            trainer.train(tiny_args(data, tmp_path, steps=2))
    assert not (tmp_path / "checkpoint.pt").exists()
    trainer.train(tiny_args(data, tmp_path, steps=2, batch=1))
    assert state(tmp_path / "checkpoint.pt")["step"] == 2


def test_a_bad_init_or_ema_leaves_no_run_folder(data, tmp_path):
    # Refused in one line, but after --out was made: an empty run folder stayed.
    with pytest.raises(WeightsError, match="no such weights file"):
        trainer.train(tiny_args(data, tmp_path / "a", init=str(tmp_path / "missing.safetensors")))
    with pytest.raises(SystemExit, match="decay must be in"):
        trainer.train(tiny_args(data, tmp_path / "b", ema=2.0))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_images_all_too_small_leave_no_run_folder(tmp_path):
    # Refused ("no training image is at least 40 px"), but --out stayed, holding the decoded-image cache.
    folder = make_folder(tmp_path / "d", 3, 30, 30, seed=3)
    with pytest.raises(SystemExit, match="no training image is at least 40 px"):
        trainer.train(tiny_args(folder, tmp_path / "run", val_holdout=0))
    assert not (tmp_path / "run").exists()


def test_images_all_too_small_say_which_option_sets_the_size(tmp_path):
    """A folder of 64x64 images at the default --patch 96 was refused with 'no training image is at least
    104 px on its short side', naming no option (the note on some small images names --patch)."""
    folder = make_folder(tmp_path / "d", 3, 30, 30, seed=3)
    with pytest.raises(SystemExit, match=r"at least 40 px on its short side \(--patch 32 \+ 8\)$"):
        trainer.train(tiny_args(folder, tmp_path / "run", val_holdout=0))


def test_a_folder_too_small_for_the_held_out_images_says_how_to_train_on_it(tmp_path):
    """--val-holdout is 8 by default: a folder of 1 to 8 images was refused ("--val-holdout 8: ... none
    would be left to train") with no word of how to train on it at all."""
    folder = make_folder(tmp_path / "d", 1, 64, 80, seed=3)
    says = f"--val-holdout 8: {folder} has only 1 image, none would be left to train (--val-holdout 0: none"
    with pytest.raises(SystemExit, match=re.escape(says)):
        trainer.train(tiny_args(folder, tmp_path / "run", val_holdout=8))
    assert not (tmp_path / "run").exists()
    trainer.train(tiny_args(folder, tmp_path / "run", val_holdout=0, steps=1))


def test_resume_says_when_the_held_out_images_changed(tmp_path, capsys):
    data = make_folder(tmp_path / "data", 6, 64, 80, seed=2)
    trainer.train(tiny_args(data, tmp_path / "r", steps=1))
    capsys.readouterr()
    trainer.train(tiny_args(data, tmp_path / "r", steps=2, resume=True))
    assert "held-out images differ" not in capsys.readouterr().out
    make_folder(tmp_path / "more", 3, 64, 80, seed=3)
    for f in (tmp_path / "more").iterdir():
        f.rename(data / f"zz_{f.name}")  # 9 images: every 4th is held out now, not every 3rd
    trainer.train(tiny_args(data, tmp_path / "r", steps=3, resume=True))
    said = capsys.readouterr().out
    assert "held-out images differ from the checkpoint's" in said and "changed since the run began" in said
    # A --val-holdout given anew moves the split too: the folder did not change, and is not blamed.
    trainer.train(tiny_args(data, tmp_path / "r", steps=4, resume=True, val_holdout=3))
    said = capsys.readouterr().out
    assert "held-out images differ" in said and ": --val-holdout changed" in said
    assert "since the run began" not in said


def test_an_override_equal_to_the_preset_is_the_same_architecture(data, tmp_path, tiny_weights):
    """--nb or --widths equal to the preset's own rename the preset ("tiny-w8-nb1") but build the same
    network: --init and --resume must accept it."""
    nb = preset("tiny").nb
    trainer.train(tiny_args(data, tmp_path / "i", steps=1, nb=nb, init=str(tiny_weights)))
    trainer.train(tiny_args(data, tmp_path / "i", steps=2, resume=True))  # resumed without the override
    assert state(tmp_path / "i" / "checkpoint.pt")["step"] == 2


def test_a_torn_cache_is_decoded_again(data, tmp_path):
    # A cache cut short (a crash just after it was written) stopped every later start with
    # "BadZipFile: File is not a zip file", naming no file.
    files = list_images(data)
    images = load_cached(files, tmp_path)
    (cache,) = tmp_path.glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:1000])
    again = load_cached(files, tmp_path)
    assert all(np.array_equal(x, y) for x, y in zip(images, again, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(images, load_cached(files, tmp_path), strict=True))
    assert cache.stat().st_size > 1000  # written anew


def test_a_cache_that_cannot_be_written_leaves_no_partial_file(data, tmp_path, monkeypatch):
    def disk_full(path, **arrays):
        Path(path).write_bytes(b"part of the training set")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        load_cached(list_images(data), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_sees_an_image_edited_in_place(tmp_path):
    # A PPM (or BMP) of the same shape has the same byte size: a cache keyed on names and sizes
    # alone gave the old pixels back.
    img = synth_image(np.random.default_rng(0), 24, 32)
    folder = tmp_path / "data"
    folder.mkdir()
    cv2.imwrite(str(folder / "x.ppm"), img)
    assert np.array_equal(load_cached(list_images(folder), tmp_path / "cache")[0], img)
    cv2.imwrite(str(folder / "x.ppm"), 255 - img)
    st = (folder / "x.ppm").stat()
    os.utime(folder / "x.ppm", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse file-system clocks
    assert np.array_equal(load_cached(list_images(folder), tmp_path / "cache")[0], 255 - img)
    # The copy of the old pixels goes: each edit of --data left another whole decoded training set in
    # the run's cache/ (255 MB for shared/data/train), never read again.
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_images_too_small_for_a_patch_are_named(data, tmp_path, capsys):
    # They were left out of training without a word: a folder of mixed sizes trained on part of itself.
    folder = make_folder(tmp_path / "mixed", 4, 64, 80, seed=3)
    cv2.imwrite(str(folder / "small.png"), synth_image(np.random.default_rng(4), 36, 80))
    trainer.train(tiny_args(folder, tmp_path / "out", steps=1, val_holdout=0))
    out = capsys.readouterr().out
    assert "note: 1 of 5 training images is under 40 px on a side (--patch 32 + 8) and is not used" in out
    assert "not used: small.png\n" in out


def test_an_unreadable_held_out_image_is_refused_before_training(data, tmp_path):
    # It was first read at the export (or at step --val-every): the whole run trained, then failed.
    folder = make_folder(tmp_path / "data", 4, 64, 80, seed=3)
    (folder / "aaa.png").write_bytes(b"not a png")  # first by name: always held out
    w = tmp_path / "w.safetensors"
    with pytest.raises(SystemExit, match=r"aaa\.png: cannot decode validation image"):
        trainer.train(tiny_args(folder, tmp_path / "out", steps=2, val_every=0, export=str(w)))
    assert not (tmp_path / "out").exists()


def test_validation_and_export_check_run_without_tf32(data, tmp_path, monkeypatch):
    # On CUDA the trainer turns TF32 on for speed, and validation and the export's fp16-vs-fp32 check
    # then ran with TF32 convolutions: the "fp32" PSNR they compare against was not fp32's.
    from qairn.train import evaluate

    seen = []
    tf32 = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    for name in ("fp16_check", "restored_psnrs"):
        real = getattr(evaluate, name)
        monkeypatch.setattr(evaluate, name, lambda *x, real=real, **k: seen.append(tf32()) or real(*x, **k))
    saved = tf32()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # as on a GPU
    try:
        w = tmp_path / "w.safetensors"
        trainer.train(tiny_args(data, tmp_path / "out", steps=2, val_every=2, export=str(w)))
        assert tf32() == (True, True)  # put back afterwards
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert len(seen) >= 2 and set(seen) == {(False, False)}


def test_val_data_inside_the_training_folder_is_refused(tmp_path):
    # --data is searched recursively, so --val-data DATA/val trained on its own validation images.
    folder = make_folder(tmp_path / "data", 4, 64, 80, seed=3)
    make_folder(folder / "val", 2, 64, 80, seed=4)
    for val, n in ((folder / "val", 2), (folder, 6)):
        with pytest.raises(SystemExit, match=rf"--val-data .*: {n} of its images are also training images"):
            trainer.train(tiny_args(folder, tmp_path / "out", val_data=str(val)))
        assert not (tmp_path / "out").exists()


def test_a_data_folder_holding_live1_is_refused(tmp_path):
    # --data ../shared/data (or the GPU pack's root) took in its live1/ test images too, silently.
    root = tmp_path / "data"
    make_folder(root / "train", 4, 64, 80, seed=3)
    make_folder(root / "live1", 2, 64, 80, seed=4)
    with pytest.raises(SystemExit, match=r"--data .*data: holds 2 LIVE1 test images \(.*live1\)"):
        trainer.train(tiny_args(root, tmp_path / "out"))
    with pytest.raises(SystemExit, match=r"--val-data .*live1: holds 2 LIVE1 test images"):
        trainer.train(tiny_args(root / "train", tmp_path / "out", val_data=str(root / "live1")))
    assert not (tmp_path / "out").exists()


def test_out_inside_the_data_folder_is_refused(tmp_path):
    # The run's loss.png was found by the recursive search and trained on from the first resume.
    folder = make_folder(tmp_path / "data", 4, 64, 80, seed=3)
    with pytest.raises(SystemExit, match=r"--out .*run: is inside --data .*data, whose images"):
        trainer.train(tiny_args(folder, folder / "run"))
    assert not (folder / "run").exists()


def test_lr_schedule_ends_and_a_low_lr_is_kept():
    a = trainer.TrainArgs()  # the recipe: 2e-4 halved every 1e4 steps, down to 1.25e-5
    assert [trainer.lr_at(s, a) for s in (0, 9999, 10000, 39999, 40000, 499_999)] == [
        2e-4, 2e-4, 1e-4, 2.5e-5, 1.25e-5, 1.25e-5,
    ]  # fmt: skip
    # --lr below --lr-min (fine-tuning at 1e-5) trained at the floor, 1.25e-5, from step 0.
    low = replace(a, lr=1e-5)
    assert trainer.lr_at(0, low) == trainer.lr_at(10**5, low) == 1e-5


def test_hidden_files_and_folders_are_not_training_images(tmp_path):
    # macOS's AppleDouble "._img00.png" (not an image) stopped the run: "cannot decode training image".
    data = make_folder(tmp_path / ".runs" / "data", 2, 64, 80, seed=3)  # a hidden parent is the user's
    (data / "._img00.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    make_folder(data / ".thumbnails", 1, 64, 80, seed=4)
    assert [f.name for f in list_images(data)] == ["img00.png", "img01.png"]


def test_held_out_images_in_subfolders_are_recorded_where_they_are(tmp_path):
    # Recorded by name only ("img00.png"), the held-out images of a folder of folders were not found
    # by the p sweep, which looks for them in the training folder (FileNotFoundError).
    from qairn.train.evaluate import validation_files

    data = tmp_path / "data"
    for sub, seed in (("a", 3), ("b", 4)):
        make_folder(data / sub, 3, 64, 80, seed=seed)
    w = tmp_path / "w.safetensors"
    trainer.train(tiny_args(data, tmp_path / "run", steps=1, export=str(w)))
    held_out = trainer.split_files(str(data), 2)[1]
    assert validation_files(w, str(data), 2, None) == held_out
    assert state(tmp_path / "run" / "checkpoint.pt")["val_files"] == ["a/img00.png", "b/img00.png"]


def test_a_subfolder_named_like_an_image_is_searched_not_read(tmp_path):
    # "set.png/" was listed as an image itself and stopped the run: "set.png: cannot decode training image".
    make_folder(tmp_path / "data" / "set.png", 2, 64, 80, seed=3)
    files = list_images(tmp_path / "data")
    assert [f.name for f in files] == ["img00.png", "img01.png"]
    assert len(load_cached(files)) == 2


def window_in(patch: np.ndarray, img: np.ndarray) -> tuple[int, int, int] | None:
    """(k, y, x) where `patch` is the window at (y, x) of img turned as the dataset turns a crop
    (rot90 k % 4, then a flip for k >= 4), or None. Random pixels: the first pixel finds the candidates."""
    p = patch.shape[0]
    for k in range(8):
        t = np.rot90(img, k % 4)
        t = t[:, ::-1] if k >= 4 else t
        for y, x in zip(*np.nonzero((t == patch[0, 0]).all(axis=2)), strict=True):
            if np.array_equal(t[y : y + p, x : x + p], patch):
                return k, int(y), int(x)
    return None


def test_patches_are_windows_of_the_images_in_rgb_at_every_qf_and_shift():
    # Only ranges and determinism were tested: an upper QF never drawn, crops that could not reach the
    # last row, unshifted grids, uniform picks of images and BGR patches all passed.
    rng = np.random.default_rng(3)
    small, large = (rng.integers(0, 256, (40, w, 3), dtype=np.uint8) for w in (40, 360))  # p + 8 = 40 high
    ds = JPEGPatches([small, large], batch=64, patch=32, qf_range=(7, 8), shift_prob=0.0, seed=1)
    _, clean, qf = ds[0]
    assert set(qf.tolist()) == {7, 8}
    bgr = (clean.permute(0, 2, 3, 1).numpy()[..., ::-1] * 255).round().astype(np.uint8)
    found = [(window_in(c, small), window_in(c, large)) for c in bgr]
    assert all((a is None) != (b is None) for a, b in found)
    from_small = [a for a, _ in found if a is not None]
    assert 0 < len(from_small) < 64 / 4  # picked by area: 1 in 10 expected, not 1 in 2
    assert len({b for _, b in found if b is not None}) > 8  # crops along the whole width, not one
    # The small image is one crop: unshifted, each patch is the top-left corner of the turned crop.
    assert all((y, x) == (0, 0) for _, y, x in from_small)
    shifted = JPEGPatches([small], batch=64, patch=32, shift_prob=1.0, seed=1)[0][1]
    shifts = [window_in(c, small)[1:] for c in (shifted.permute(0, 2, 3, 1).numpy()[..., ::-1] * 255).round()]
    assert {y for y, _ in shifts} == {x for _, x in shifts} == set(range(8))
    assert any(y != x for y, x in shifts)  # each axis shifted on its own


def test_the_loss_is_l1_plus_weighted_one_minus_ssim():
    # loss = L1 + --ssim-weight * (1 - SSIM): the weight ignored (always 1) passed every training test.
    from qairn.metrics import ssim_torch

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 24, 24, generator=g)
    out = (clean + 0.1 * torch.randn(2, 3, 24, 24, generator=g)).clamp(0, 1)
    l1, s = (out - clean).abs().mean(), ssim_torch(out, clean)
    assert 0.01 < float(1 - s) < 0.99
    for w in (0.0, 0.5, 2.0):
        loss, got_l1, got_s = trainer.loss_fn(out, clean, w)
        torch.testing.assert_close(got_l1, l1)
        torch.testing.assert_close(got_s, s)
        torch.testing.assert_close(loss, l1 + w * (1 - s))


def test_log_csv_columns_hold_what_their_header_says(data, tmp_path, monkeypatch):
    # log.csv's l1 and ssim columns swapped (or the loss written from another weight) passed: each row's
    # loss is now checked to be its l1 + --ssim-weight * (1 - ssim), and the lr its step's. So did the
    # optimiser stepping with the next step's rate (the log said the right one): its rates are recorded.
    rates = []

    class Adam(torch.optim.Adam):
        def step(self, *args, **kw):
            rates.append(self.param_groups[0]["lr"])
            return super().step(*args, **kw)

    monkeypatch.setattr(torch.optim, "Adam", Adam)
    a = tiny_args(data, tmp_path, steps=2, ssim_weight=0.5, lr_halve_every=1)
    trainer.train(a)
    assert rates == [2e-4, 1e-4]
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "l1", "ssim", "lr", "patches_per_s", "seconds"]
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:
        l1, s = float(r["l1"]), float(r["ssim"])
        assert 0 < l1 < 0.5 and 0 < s < 1 and l1 != s
        assert abs(float(r["loss"]) - (l1 + 0.5 * (1 - s))) < 2e-5
        assert float(r["lr"]) == pytest.approx(trainer.lr_at(int(r["step"]) - 1, a), rel=1e-3)
    assert [float(r["lr"]) for r in rows] == [2e-4, 1e-4]


def test_a_resume_adds_its_time_to_the_checkpoints(data, tmp_path):
    # The trained time a resume records is the checkpoint's plus its own: counting only its own (the
    # log's seconds and the checkpoint's starting from 0 again) passed every test.
    trainer.train(tiny_args(data, tmp_path, steps=1))
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    ck["seconds"] = 5000.0
    torch.save(ck, tmp_path / "checkpoint.pt")
    trainer.train(tiny_args(data, tmp_path, steps=2, resume=True))
    seconds = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["seconds"]
    assert 5000 < seconds < 5000 + 120
    last = (tmp_path / "log.csv").read_text().splitlines()[-1].split(",")
    assert last[0] == "2" and 5000 <= float(last[-1]) <= seconds + 0.1


def test_a_resume_that_trains_without_ema_keeps_the_checkpoints_average(data, tmp_path):
    # A resume given --ema 0 trains the raw weights alone; its checkpoints must still hold the run's
    # average as it was (a later --ema resume or export goes on from it). Written as None, it passed.
    trainer.train(tiny_args(data, tmp_path, steps=1, ema=0.5))
    before = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["ema"]
    trainer.train(tiny_args(data, tmp_path, steps=2, ema=0.0, resume=True), {"ema", "steps", "resume"})
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert after["step"] == 2 and after["ema"]["updates"] == before["updates"] == 1
    assert all(torch.equal(after["ema"]["avg"][k], v) for k, v in before["avg"].items())


def test_validation_averages_each_qfs_psnrs(monkeypatch):
    # val.csv's psnr_qf10 and psnr_qf40 are the mean restored PSNR of that QF's pairs: a wrong mean
    # (or the QFs' values mixed) passed, as no test knew the PSNRs it averaged.
    from qairn.train import evaluate

    pairs = [(10, "a", None), (40, "a", None), (10, "b", None), (40, "b", None), (10, "c", None)]
    monkeypatch.setattr(evaluate, "make_restorer", lambda **kw: None)
    monkeypatch.setattr(evaluate, "restored_psnrs", lambda r, p: [30.0, 40.0, 32.0, 44.0, 34.0][: len(p)])
    got = trainer.validate(QAIRN(preset("tiny")), pairs, "cpu")
    assert got == {"psnr_qf10": 32.0, "psnr_qf40": 42.0}


def test_val_csv_ema_columns_are_the_averages(data, tmp_path, monkeypatch):
    # val.csv's ema_ columns validated the raw weights a second time, and passed: each validated model is
    # now told apart by a checksum of its weights, compared with the checkpoint's raw and average.
    def checksum(state):
        return sum(float(v.double().sum()) for v in state.values() if v.is_floating_point())

    monkeypatch.setattr(
        trainer,
        "validate",
        lambda model, pairs, device: {f"psnr_qf{q}": checksum(model.state_dict()) for q in (10, 40)},
    )
    trainer.train(tiny_args(data, tmp_path, steps=2, val_every=2, ema=0.75))
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["ema"]["decay"] == 0.75 and ck["ema"]["updates"] == 2
    with open(tmp_path / "val.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    raw, avg = checksum(ck["model"]), checksum(ck["ema"]["avg"])
    assert abs(raw - avg) > 1e-2
    assert float(row["psnr_qf10"]) == pytest.approx(raw, abs=1e-4)
    assert float(row["ema_psnr_qf10"]) == pytest.approx(avg, abs=1e-4)


def test_train_runs_from_a_thread_other_than_the_main_one(data, tmp_path, monkeypatch):
    # Signal handlers can only be set in the main thread: train() from a thread pool failed with
    # "signal only works in main thread" after making the run folder, and wrote no checkpoint.
    monkeypatch.setattr(trainer, "plot_log", lambda *a: None)  # the slow part, not tested here
    errors = []

    def run():
        try:
            trainer.train(tiny_args(data, tmp_path, steps=2))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive() and not errors, errors
    assert state(tmp_path / "checkpoint.pt")["step"] == 2


def test_train_puts_the_callers_thread_count_back(data, tmp_path, monkeypatch):
    # --threads 1 stayed in force after train() returned: the caller's own work ran on one thread.
    monkeypatch.setattr(trainer, "plot_log", lambda *a: None)  # the slow part, not tested here
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer.train(tiny_args(data, tmp_path, steps=1, threads=1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_init_keeps_the_p_chosen_for_its_weights(data, tmp_path, monkeypatch):
    # --init from weights whose p was chosen by the sweep (the shipped file's is not the preset's) trained
    # and exported them with the preset's p instead, and the resume of such a run must keep it too.
    from qairn.train import evaluate

    monkeypatch.setattr(trainer, "plot_log", lambda *a: None)  # the slow part, not tested here
    monkeypatch.setattr(
        evaluate, "fp16_check", lambda *a, **k: {"dtype": "fp32", "reason": "not checked here"}
    )
    start = tmp_path / "start.safetensors"
    trainer.train(tiny_args(data, tmp_path / "a", steps=0, export=str(start)))
    chosen = 2 * preset("tiny").p + 1
    evaluate.write_p(start, chosen, {"p": chosen})
    out, w = tmp_path / "b", tmp_path / "w.safetensors"
    trainer.train(tiny_args(data, out, steps=1, init=str(start)))
    trainer.train(tiny_args(data, out, steps=2, resume=True, export=str(w)))
    assert load_model(w).config.p == chosen


def test_an_init_of_another_architecture_says_which(data, tmp_path, monkeypatch):
    # "its architecture differs from --preset tiny (+ overrides)" left the user to guess the --widths
    # and --nb of a file made with --preset auto (gpu_train): the differing values are now named.
    from qairn.train import evaluate

    monkeypatch.setattr(trainer, "plot_log", lambda *a: None)  # the slow part, not tested here
    monkeypatch.setattr(
        evaluate, "fp16_check", lambda *a, **k: {"dtype": "fp32", "reason": "not checked here"}
    )
    start = tmp_path / "start.safetensors"
    trainer.train(tiny_args(data, tmp_path / "a", steps=0, widths="8,16,24,32", export=str(start)))
    with pytest.raises(
        SystemExit, match=r"differs .*: widths 8,16,24,32 \(not 8,16,16,32\), nb 1 \(not 2\)$"
    ):
        trainer.train(tiny_args(data, tmp_path / "b", steps=0, nb=2, init=str(start)))


def test_the_data_loader_is_let_go_when_train_returns(data, tmp_path, monkeypatch):
    # A reference cycle through train's frame (torch makes one on its first Adam) kept the DataLoader, and
    # its worker processes, to the interpreter's exit: `qairn train --resume --steps 0 --export` then
    # ended with "DataLoader worker ... is killed by signal: Terminated". Made here by a cycle of our own.
    loaders = []

    class Recorded(trainer.DataLoader):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            loaders.append(weakref.ref(self))

    def plot_in_a_cycle(*args):
        cycle = [sys._getframe(1)]
        cycle.append(cycle)

    monkeypatch.setattr(trainer, "DataLoader", Recorded)
    monkeypatch.setattr(trainer, "plot_log", plot_in_a_cycle)
    enabled = gc.isenabled()
    gc.disable()
    try:
        trainer.train(tiny_args(data, tmp_path, steps=1))
        assert len(loaders) == 1 and loaders[0]() is None
    finally:
        if enabled:
            gc.enable()


def test_a_failed_overwrite_leaves_no_half_of_the_old_run(data, tmp_path, monkeypatch):
    # --overwrite truncated the old run's log.csv and deleted its val.csv at once, but its checkpoint
    # stayed until the new run's first one: a new run that failed at its first step left the old
    # checkpoint beside an empty log, and --resume continued it with its loss curve gone.
    monkeypatch.setattr(trainer, "plot_log", lambda *a: None)  # the slow part, not tested here
    trainer.train(tiny_args(data, tmp_path, steps=2))

    def out_of_memory(*args, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(trainer, "loss_fn", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train(tiny_args(data, tmp_path, steps=2, batch=1, overwrite=True))
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert len(rows) == 3 or not (tmp_path / "checkpoint.pt").exists(), rows


def test_an_export_without_held_out_images_says_why_it_is_fp32(data, tmp_path, capsys):
    # --val-holdout 0 leaves nothing to check fp16 on: the export said "fp32 (nan dB fp16 loss on 0
    # held-out images)"; it now gives the check's reason.
    trainer.export_weights(
        scrambled_model(), tiny_args(data, tmp_path, export=str(tmp_path / "w.safetensors")), 1, 1.0, []
    )
    assert "export: fp32 (no validation images to check fp16 on) ->" in capsys.readouterr().out


def test_a_resume_removes_checkpoints_torn_by_a_kill(data, tmp_path, monkeypatch):
    # A checkpoint is written to a hidden temp file, renamed in when whole: a run killed while writing it
    # (SIGKILL) left the temp file, a whole checkpoint's size, at every kill; the resume removes them.
    monkeypatch.setattr(trainer, "plot_log", lambda *a: None)  # the slow part, not tested here
    trainer.train(tiny_args(data, tmp_path, steps=1))
    torn = tmp_path / ".checkpoint.pt.k2x9_a.part"
    torn.write_bytes(b"cut short")
    trainer.train(tiny_args(data, tmp_path, steps=2, resume=True))
    assert not torn.exists() and state(tmp_path / "checkpoint.pt")["step"] == 2


def test_ddp_logs_the_loss_over_every_ranks_patches(data, tmp_path):
    # Each DDP rank trains on its own patches and the gradients are averaged over all of them, but
    # log.csv held rank 0's loss alone: half the step's patches with 2 processes, 1/8 with 8.
    a = tiny_args(data, tmp_path, steps=1)
    r = subprocess.run(torchrun_cmd(a), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    train_files, _ = trainer.split_files(str(data), a.val_holdout)
    ds = JPEGPatches(load_cached(train_files), a.batch, a.patch, (a.qf_min, a.qf_max), a.shift_prob, a.seed)
    torch.manual_seed(a.seed)
    model = QAIRN(preset("tiny")).to(memory_format=torch.channels_last)
    losses = []  # step 1's loss on each rank: batch indices 0 and 1, the initial weights
    with torch.no_grad():
        for rank in range(2):
            jp, clean, _ = ds[rank]
            out, _ = model(jp.contiguous(memory_format=torch.channels_last))
            losses.append(trainer.loss_fn(out, clean, a.ssim_weight)[0].item())
    with open(tmp_path / "log.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert abs(losses[0] - losses[1]) > 1e-3  # else rank 0's loss alone would pass
    assert float(row["loss"]) == pytest.approx(sum(losses) / 2, abs=2e-5)


def test_the_progress_bar_in_a_log_is_a_line_per_redraw_with_the_loss(data, tmp_path, monkeypatch, capsys):
    # `nohup qairn train ... > log 2>&1`: tqdm redrew the 500000-step bar with '\r' ten times a second
    # and once more at every logged step (set_postfix), one enormous line. Off a terminal it is a line
    # every LOG_EVERY_S seconds (0 here: every step), each with the last loss, lr and patches/s.
    import qairn.engine.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0)
    monkeypatch.setattr(trainer, "plot_log", lambda *a: None)  # the slow part, not tested here
    trainer.train(tiny_args(data, tmp_path, steps=6, log_every=2, export=False))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("train:")]
    steps = [int(ln.split("/6")[0].split()[-1]) for ln in lines]
    assert steps[:-1] == sorted(set(steps[:-1])), lines  # no extra line for a new loss; the last closes
    assert steps[-1] == 6 and all(f"{k}=" in lines[-1] for k in ("loss", "lr", "pps")), lines


def test_gpu_train_publishes_the_weights_whole_or_not_at_all(tmp_path, monkeypatch):
    # scripts/gpu_train.py copies the weights into $OUT in parts (files from $OUT are limited in size),
    # and again after the p sweep. It removed the earlier copy, then wrote each part in place: a run that
    # stopped there (the device's time limit, a full disk) left parts missing or cut short.
    import errno
    import io

    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_train

    def disk_full_at_the_second_file(real_open=io.open):
        opened = []

        def open_(file, mode="r", *args, **kwargs):
            if "w" in mode:
                opened.append(file)
                if len(opened) == 2:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(file, mode, *args, **kwargs)

        return open_

    monkeypatch.setattr(gpu_train, "PART", 8)
    weights, out = tmp_path / "weights.safetensors", tmp_path / "out"
    out.mkdir()
    weights.write_bytes(b"the first weights")  # 17 bytes: 3 parts
    gpu_train.publish(weights, out)
    weights.write_bytes(b"the second weights")
    with monkeypatch.context() as m:
        m.setattr(io, "open", disk_full_at_the_second_file())
        with pytest.raises(OSError, match="No space"):
            gpu_train.publish(weights, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"weights.safetensors.part{i}" for i in range(3)]  # nothing else left behind
    assert b"".join((out / n).read_bytes() for n in names) == b"the first weights"
    gpu_train.publish(weights, out)
    assert b"".join((out / n).read_bytes() for n in names) == b"the second weights"


def test_a_training_pack_build_cut_short_leaves_no_pack(tmp_path):
    # build_train_pack wrote straight into --out and its MANIFEST.json last: a build stopped in between
    # (Ctrl-C in the crop loop) left a pack that gpu_train took as whole, and that a rebuild refused
    # ('not a training pack'), where an earlier pack had been.
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_train_pack

    src = make_folder(tmp_path / "src", 4, 72, 96, seed=2)
    live1 = make_folder(tmp_path / "live1", 1, 48, 64, seed=3)
    pack = tmp_path / "pack"
    build = dict(budget_mib=0.2, crop=56, holdout=2)
    first = build_train_pack.build(src, live1, pack, **build, log=lambda *a: None)

    def interrupted(*a):  # called once LIVE1 and the held-out images are in, before the crops
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_train_pack.build(src, live1, pack, **build, seed=1, log=interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live1", "pack", "src"]  # nothing half-built
    assert json.loads((pack / "MANIFEST.json").read_text()) == first  # the earlier pack, whole
    assert build_train_pack.build(src, live1, pack, **build, seed=1, log=lambda *a: None)["seed"] == 1


def test_gpu_train_publish_removes_the_parts_of_an_earlier_larger_copy(tmp_path, monkeypatch):
    # A smaller copy after a larger one (or a whole file after parts, and back) must leave only its own
    # files: a stale weights.safetensors.part2 is joined by `cat weights.safetensors.part*` unsaid.
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_train

    monkeypatch.setattr(gpu_train, "PART", 8)
    weights, out = tmp_path / "weights.safetensors", tmp_path / "out"
    out.mkdir()
    weights.write_bytes(b"the first weights")  # 17 bytes: 3 parts
    gpu_train.publish(weights, out)
    weights.write_bytes(b"smaller!!")  # 9 bytes: 2 parts
    gpu_train.publish(weights, out)
    assert sorted(p.name for p in out.iterdir()) == [f"weights.safetensors.part{i}" for i in range(2)]
    weights.write_bytes(b"whole")
    assert gpu_train.publish(weights, out) == [out / "weights.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["weights.safetensors"]
    assert (out / "weights.safetensors").read_bytes() == b"whole"


def test_a_training_pack_into_the_current_folder_is_refused_in_one_line(tmp_path, monkeypatch):
    # `build_train_pack.py --out .` in an empty folder passed the 'not a training pack' check and then
    # failed with a ValueError traceback ("PosixPath('.') has an empty name") from Path.with_name.
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_train_pack

    src = make_folder(tmp_path / "src", 3, 72, 96, seed=2)
    live1 = make_folder(tmp_path / "live1", 1, 48, 64, seed=3)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", str(here), ".."):
        with pytest.raises(SystemExit, match="is the current folder"):
            build_train_pack.build(src, live1, out, budget_mib=0.2, crop=56, holdout=1, log=lambda *a: None)
    assert list(here.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "here",
        "live1",
        "src",
    ]


def test_the_closing_steps_per_second_leave_validation_out(data, tmp_path, monkeypatch, capsys):
    # The closing line divided the steps by the run's wall time, validations included: a run that
    # validated often showed a fraction of its training rate. A clock that jumps 1000 s in each
    # validation shows it: "4 steps in 1000.x s (0.00 steps/s)".
    import re

    real_time, late = time.time, [0.0]
    monkeypatch.setattr(time, "time", lambda: real_time() + late[0])
    validate = trainer.validate

    def slow_validate(*args):
        late[0] += 1000.0
        return validate(*args)

    monkeypatch.setattr(trainer, "validate", slow_validate)
    trainer.train(tiny_args(data, tmp_path / "r", val_every=2))
    said = capsys.readouterr().out
    m = re.search(r"4 steps in ([\d.]+) s of training \(([\d.]+) steps/s\).*; validation ([\d.]+) s", said)
    assert m, said
    training, rate, validation = map(float, m.groups())
    assert validation >= 2000 and training < 1000 and rate > 4 / 1000


def test_an_export_only_resume_decodes_no_training_image(data, tmp_path, monkeypatch):
    # --resume --steps 0 --export decoded the whole training set (load_cached) and made its patches
    # and DataLoader, then trained nothing.
    out = tmp_path / "r"
    trainer.train(tiny_args(data, out, steps=2))

    def no_decoding(*args, **kw):
        raise AssertionError("an export-only run decoded the training images")

    monkeypatch.setattr(trainer, "load_cached", no_decoding)
    trainer.train(tiny_args(data, out, steps=0, resume=True, export=str(tmp_path / "w.safetensors")))
    assert read_metadata(tmp_path / "w.safetensors") and state(out / "checkpoint.pt")["step"] == 2


CTRL_C_ON_RANK_1 = """
import os, signal, sys
from qairn.train import trainer
loss_fn, calls = trainer.loss_fn, []
def ctrl_c_on_rank_1(out, clean, w):  # rank 1 alone gets Ctrl-C during step 1
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return loss_fn(out, clean, w)
trainer.loss_fn = ctrl_c_on_rank_1
trainer.main(sys.argv[1:])
"""


def test_ddp_ctrl_c_on_one_rank_stops_every_rank_at_the_next_step(data, tmp_path):
    # The ranks agreed on stopping every --log-every steps only: with --log-every 100, a Ctrl-C at
    # step 1 was seen at step 100 (here the end, step 6; on a large model, minutes later).
    a = tiny_args(data, tmp_path / "run", steps=6, log_every=100)
    codes, outs = ranks_by_hand(CTRL_C_ON_RANK_1, a, tmp_path)
    assert codes == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert state(tmp_path / "run" / "checkpoint.pt")["step"] == 2


HANG_ON_RANK_1 = """
import os, sys, time
from qairn.train import trainer
loss_fn, calls = trainer.loss_fn, []
def hang_on_rank_1(out, clean, w):  # rank 1 stops answering at step 1 (a stuck GPU, a lost node)
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        time.sleep(3600)
    return loss_fn(out, clean, w)
trainer.loss_fn = hang_on_rank_1
trainer.main(sys.argv[1:])
"""


def test_ddp_a_rank_that_stops_answering_fails_the_others_after_ddp_timeout(data, tmp_path):
    # The process group had torch's default timeout (10 min): rank 0 waited that long in its all-reduce
    # for a rank that hung (here past the test's 120 s). --ddp-timeout 3 ends it after 3 s.
    a = tiny_args(data, tmp_path / "run", steps=4, ddp_timeout=3.0)
    codes, outs = ranks_by_hand(HANG_ON_RANK_1, a, tmp_path, others=False)
    assert codes[0] not in (0, None) and "timed out" in outs[0].lower(), outs[0][-2000:]


@pytest.mark.parametrize(
    "crop, says",
    [
        (0, "--crop 0: needs at least 24 px"),  # a cv2.error traceback (an empty image to encode)
        (-5, "--crop -5: needs at least 24 px"),
        (1000, "no training image is at least 1000 px on a side"),  # a pack of 0 training crops
        (64, "--budget-mib 0.07: no room for one 64x64 crop"),  # likewise
    ],
)
def test_a_training_pack_crop_that_gives_no_crops_is_refused(tmp_path, crop, says):
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_train_pack

    src = make_folder(tmp_path / "src", 3, 72, 96, seed=2)
    live1 = make_folder(tmp_path / "live1", 1, 48, 64, seed=3)
    with pytest.raises(SystemExit, match=says):
        budget = (
            0.07 if crop == 64 else 0.2
        )  # 0.07 MiB: less than a crop over the 64 KiB kept for the manifest
        build_train_pack.build(
            src, live1, tmp_path / "pack", budget_mib=budget, crop=crop, holdout=1, log=print
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live1", "src"]


@pytest.mark.parametrize("holdout", [0, -1])
def test_a_training_pack_without_held_out_images_is_refused(tmp_path, holdout):
    # --val-holdout 0 built a pack with an empty val/, which gpu_train takes as --val-data (validation,
    # the export's fp16 check, the p sweep): on the GPU machine it then ended in a FileNotFoundError
    # traceback ('pack/val: no images found') before training.
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_train_pack

    src = make_folder(tmp_path / "src", 3, 72, 96, seed=2)
    live1 = make_folder(tmp_path / "live1", 1, 48, 64, seed=3)
    with pytest.raises(SystemExit, match=f"--val-holdout {holdout}: gpu_train validates"):
        build_train_pack.build(src, live1, tmp_path / "pack", budget_mib=0.2, crop=56, holdout=holdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live1", "src"]


def test_a_training_pack_leaves_out_held_out_images_too_small_for_the_p_sweep(tmp_path):
    # A held-out image under 32 px was copied into val/, and gpu_train's p sweep (JPEG 2000, 5 wavelet
    # levels) then failed on it after the whole training: it is left out with a note, as the trainer
    # leaves out training images too small for a patch; with none left, the pack is refused.
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_train_pack

    src = make_folder(tmp_path / "src", 4, 72, 96, seed=2)
    cv2.imwrite(str(src / "img00.png"), np.full((24, 40, 3), 90, np.uint8))  # held out (every 2nd)
    live1 = make_folder(tmp_path / "live1", 1, 48, 64, seed=3)
    said = []
    man = build_train_pack.build(
        src, live1, tmp_path / "pack", budget_mib=0.3, crop=56, holdout=2, log=said.append
    )
    assert man["val_files"] == ["img02.png"]
    assert [f.name for f in list_images(tmp_path / "pack" / "val")] == ["img02.png"]
    assert any("img00.png" in s and "40x24" in s and "32" in s for s in said), said
    with pytest.raises(SystemExit, match="every held-out image is under 32 px"):
        build_train_pack.build(src, live1, tmp_path / "none", budget_mib=0.3, crop=56, holdout=1)
    assert not (tmp_path / "none").exists() and not (tmp_path / ".none.building").exists()


def test_a_training_pack_with_a_live1_image_too_small_for_the_quality_study_is_refused(tmp_path):
    # A --live1 image under 32 px was packed; gpu_train refuses the pack, but on the GPU machine.
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_train_pack

    src = make_folder(tmp_path / "src", 4, 72, 96, seed=2)
    live1 = make_folder(tmp_path / "live1", 1, 48, 64, seed=3)
    cv2.imwrite(str(live1 / "tiny.png"), np.full((24, 40, 3), 90, np.uint8))
    with pytest.raises(SystemExit, match="tiny.png: 40x24 pixels; the JPEG 2000 distortion"):
        build_train_pack.build(src, live1, tmp_path / "pack", budget_mib=0.3, crop=56, holdout=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live1", "src"]


@pytest.mark.parametrize("crop", [20, -5])
def test_gpu_train_refuses_a_quality_crop_too_small_before_training(tmp_path, crop):
    # The quality steps come after the training: --quality-crop 20 (under JPEG 2000's 32 px) or -5 ended
    # the p sweep in a ValueError traceback ('20x20 pixels after --crop', '0x0 pixels') once the
    # training's minutes were spent, and the LIVE1 evaluation never ran.
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_train

    argv = ["--pack", str(tmp_path / "pack"), "--out", str(tmp_path / "out"), "--quality-crop", str(crop)]
    with pytest.raises(SystemExit, match=f"--quality-crop {crop}: 0 .whole images. or at least 32 px"):
        gpu_train.main(argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "stop, died, stops",
    [
        (signal.SIGTERM, "is killed by signal: Terminated", True),
        (signal.SIGTERM, "is killed by signal: Segmentation fault", False),
        (signal.SIGTERM, "exited unexpectedly with exit code 1", False),
        # Ctrl-C to a worker still starting: its KeyboardInterrupt, outside torch's loop, is exit code 1.
        (signal.SIGINT, "exited unexpectedly with exit code 1", True),
        (signal.SIGINT, "is killed by signal: Killed", False),
    ],
)
def test_a_worker_crash_after_a_stop_signal_is_still_an_error(data, tmp_path, monkeypatch, stop, died, stops):
    # Since c977582 a "DataLoader worker ... killed by signal" error after a stop signal was taken as
    # the stop's (a SIGTERM to the process group kills the workers too), whatever had killed the
    # worker: a segfault or the OOM killer's SIGKILL met during a stop ended the run as a clean stop.
    # Only a worker killed by the signal this process received is the stop's now.
    class CrashingPatches(trainer.JPEGPatches):
        def __getitem__(self, i):
            if i == 2:
                signal.raise_signal(stop)  # the stop; its handler runs before this returns
                raise RuntimeError(f"DataLoader worker (pid 7) {died}. ")
            return super().__getitem__(i)

    monkeypatch.setattr(trainer, "JPEGPatches", CrashingPatches)
    a = tiny_args(data, tmp_path, steps=100, val_every=0)
    if stops:
        trainer.train(a)
        assert state(tmp_path / "checkpoint.pt")["step"] == 2
    else:
        with pytest.raises(RuntimeError, match=re.escape(died)):
            trainer.train(a)


def test_quiet_training_prints_its_notes_and_errors_alone(data, tmp_path, capsys, monkeypatch):
    """-q, which video takes, was refused by train ('unrecognized arguments: -q'). It drops the progress
    bar (stderr plays a terminal here, where it draws at once), the validation lines, 'resumed from',
    the closing steps/s line and the export's; a note and an error still print."""
    from qairn import cli

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(trainer, "plot_log", lambda *a: None)  # (a second a run: matplotlib)
    out, w, small = tmp_path / "r", tmp_path / "w.safetensors", make_folder(tmp_path / "d", 5, 64, 80, 1)
    cv2.imwrite(str(small / "tiny.png"), np.zeros((30, 30, 3), np.uint8))  # (a note: too small to train)
    run = cli_args(tiny_args(small, out, steps=2, val_every=1, export=str(w)))
    assert cli.main(["train", *run, "-q"]) == 0
    said, err = capsys.readouterr()
    assert said.startswith("note: ") and len(said.splitlines()) == 1 and err == "", (said, err)
    assert w.is_file() and len((out / "val.csv").read_text().splitlines()) == 3
    again = ["train", "--out", str(out), "--resume", "--workers", "0", "--threads", "1"]
    assert cli.main([*again, "--steps", "3", "--quiet"]) == 0
    said, err = capsys.readouterr()
    assert err == "" and all(line.startswith(("resume: ", "note: ")) for line in said.splitlines()), said
    assert cli.main([*again, "--steps", "4"]) == 0
    said, err = capsys.readouterr()
    assert "\nresumed from " in said and "\nvalidation at step 4: " in said and "steps/s" in said, said
    assert "train:" in err, err
    assert cli.main(["train", "--out", str(tmp_path / "none"), "--resume", "-q"]) == 2
    none = tmp_path / "none" / "checkpoint.pt"
    assert capsys.readouterr() == (
        "",
        f"qairn train: error: {none}: no checkpoint to resume (is --out right?)\n",
    )
