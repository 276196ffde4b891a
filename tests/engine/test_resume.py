"""Exact resume, stop signals and non-finite losses, through the real training scripts on tiny
synthetic runs (the speed flags: test_speed_flags.py)."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import guards, stage
from engine.optim import set_lr
from models import model_dict
from tests.datagen import SYNTHETIC
from tests.tolerance import FP64, approx
import train_student
import train_teacher

ROOT = Path(__file__).resolve().parents[2]
DATA = SYNTHETIC
TEACHER = ["--model", "resnet8", *DATA]
STEPS_PER_EPOCH = 8  # 64 images, batch 8


def student_args(teacher: Path, method: str = "crd") -> list[str]:
    return ["--path_t", str(teacher), "--model_s", "resnet8", "--distill", method, "--nce_k", "16", *DATA]


def last_checkpoint(folder: Path) -> dict:
    (path,) = folder.glob("*/*_last.pth")
    return torch.load(path)  # plain: what we write holds tensors and plain types only


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def interrupt_after(calls: int, monkeypatch) -> None:
    """Make the loop see a SIGTERM after its ``calls``-th training step."""
    seen = {"n": 0}
    original = guards.StopSignals.requested

    def requested(self, device):
        seen["n"] += 1
        if seen["n"] == calls:
            self.signum = signal.SIGTERM
        return original(self, device)

    monkeypatch.setattr(guards.StopSignals, "requested", requested)


def test_teacher_resumed_after_epoch_one_ends_identical(tmp_path):
    args = TEACHER + ["--epochs", "3", "--deterministic", "--lr_schedule", "cosine"]
    whole = train_teacher.main(args + ["--save_folder", str(tmp_path / "whole")])
    first = train_teacher.main(args + ["--save_folder", str(tmp_path / "cut"), "--max_steps", str(STEPS_PER_EPOCH)])
    assert first["epochs_run"] == 1
    resumed = train_teacher.main(args + ["--save_folder", str(tmp_path / "cut"), "--resume", "auto"])
    a, b = last_checkpoint(tmp_path / "whole"), last_checkpoint(tmp_path / "cut")
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    assert [h["test_acc"] for h in resumed["history"]] == [h["test_acc"] for h in whole["history"]]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in whole["history"]]
    assert resumed["best_acc"] == whole["best_acc"] and resumed["steps"] == whole["steps"] == 3 * STEPS_PER_EPOCH
    assert resumed["resumed"] == 1 and b["epoch"] == 3


def test_student_crd_resumed_mid_epoch_ends_identical(teacher, tmp_path, monkeypatch):
    args = student_args(teacher) + ["--epochs", "2", "--deterministic"]
    whole = train_student.main(args + ["--save_folder", str(tmp_path / "whole")])
    # a SIGTERM after step 3 of epoch 2 (step 11 in all): resnet8_last.pth holds the middle of the epoch
    interrupt_after(STEPS_PER_EPOCH + 3, monkeypatch)
    with pytest.raises(SystemExit) as stop:
        train_student.main(args + ["--save_folder", str(tmp_path / "cut")])
    assert stop.value.code == 128 + signal.SIGTERM
    saved = last_checkpoint(tmp_path / "cut")
    assert saved["epoch"] == 1 and saved["resume"]["batches_done"] == 3 and saved["resume"]["steps"] == 11
    monkeypatch.undo()
    resumed = train_student.main(args + ["--save_folder", str(tmp_path / "cut"), "--resume", "auto"])
    a, b = last_checkpoint(tmp_path / "whole"), last_checkpoint(tmp_path / "cut")
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["distiller"], b["distiller"])  # heads, memory banks and Z
    assert [h["test_acc"] for h in resumed["history"]] == [h["test_acc"] for h in whole["history"]]
    # float64 epoch means of the same float32 losses (any float32 difference would be ~1e-7)
    assert [h["loss_crd"] for h in resumed["history"]] == approx([h["loss_crd"] for h in whole["history"]], rtol=FP64)
    assert resumed["last_acc"] == whole["last_acc"] and resumed["steps"] == whole["steps"]


def test_resume_refuses_what_it_cannot_continue(teacher, tmp_path, capsys):
    with pytest.raises(SystemExit) as missing:
        train_teacher.main(TEACHER + ["--epochs", "1", "--save_folder", str(tmp_path), "--resume", "nope.pth"])
    assert missing.value.code == 2 and "--resume nope.pth: no such file" in capsys.readouterr().err
    bare = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"  # RepDistiller's layout: weights only
    bare.parent.mkdir()
    torch.save({"model": torch.load(teacher, weights_only=True)["model"]}, bare)
    with pytest.raises(SystemExit) as no_state:
        train_teacher.main(TEACHER + ["--epochs", "1", "--save_folder", str(tmp_path), "--resume", str(bare)])
    assert no_state.value.code == 2 and "has no resume state" in capsys.readouterr().err
    # auto with nothing saved yet: a fresh start
    fresh = train_teacher.main(TEACHER + ["--epochs", "1", "--save_folder", str(tmp_path / "new"), "--resume", "auto"])
    assert fresh["status"] == "finished" and "resumed" not in fresh


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_blow_up_stops_and_leaves_checkpoints_as_they_were(tmp_path, capsys, monkeypatch):
    args = TEACHER + ["--epochs", "3", "--save_folder", str(tmp_path)]
    train_teacher.main(args + ["--max_steps", str(STEPS_PER_EPOCH)])
    (folder,) = tmp_path.iterdir()
    before = {name: digest(folder / name) for name in ("resnet8_last.pth", "resnet8_best.pth")}
    monkeypatch.setattr(stage, "adjust_learning_rate", lambda epoch, opt, optimizer: set_lr(optimizer, 1e20))
    with pytest.raises(SystemExit) as stop:
        train_teacher.main(args + ["--resume", str(folder / "resnet8_last.pth")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "non-finite" in err and "epoch 2" in err and "ce=" in err
    assert {name: digest(folder / name) for name in before} == before


def test_sigterm_mid_epoch_leaves_a_loadable_last_pth(tmp_path):
    save = tmp_path / "runs"
    cmd = [sys.executable, "train_teacher.py", "--model", "resnet8", "--dataset", "synthetic",
           "--synthetic_classes", "4", "--synthetic_train", "1000", "--synthetic_test", "4", "--batch_size", "8",
           "--epochs", "3", "--num_workers", "0", "--device", "cpu", "--save_folder", str(save)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # the line printed just before training starts
        if line.startswith("training resnet8"):
            break
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received at epoch" in err and "--resume auto" in err and "Traceback" not in err
    state = last_checkpoint(save)
    assert state["resume"]["batches_done"] > 0 or state["epoch"] >= 1
    assert set(state["model"]) == set(model_dict["resnet8"](num_classes=4).state_dict())
    assert not list(save.glob("*/.*.tmp")), "no temporary file left behind"
