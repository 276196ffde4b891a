"""Checkpoints that cannot run code, files written with the user's umask, and the ways writing a
run can fail (full disk, unwritable folder, stale temporary files): each one line, nothing lost."""
from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import checkpoint as ckpt
from common.errors import UserError
from engine import logger
from models import model_dict
from tests.datagen import SYNTHETIC
import train_student
import train_teacher

ROOT = Path(__file__).resolve().parents[2]
DATA = SYNTHETIC
TEACHER = ["--model", "resnet8", *DATA, "--epochs", "1"]


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_payload(path: Path, marker: Path, kind: str) -> Path:
    """A checkpoint-looking file whose pickle runs code: torch's zip format, its legacy format, or
    a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": Payload(marker), "epoch": 1}
    if kind == "zip":
        torch.save(state, path)
    elif kind == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state))
    return path


def run_script(script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_payload_teacher_is_refused_and_its_code_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = write_payload(tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth", marker, kind)
    out = run_script("train_student.py", ["--path_t", str(path), "--model_s", "resnet8", "--distill", "kd", *DATA,
                                          "--max_steps", "1", "--save_folder", str(tmp_path / "runs")])
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "was refused" in lines[0] and "could run code" in lines[0]
    if kind != "pickle":  # torch's own formats name the callable; a bare protocol-4 pickle is refused earlier
        assert "posix.system" in lines[0]
    assert not marker.exists(), "the payload ran"


def test_payload_resume_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = write_payload(tmp_path / "evil_last.pth", marker, "legacy")
    out = run_script("train_teacher.py", TEACHER + ["--save_folder", str(tmp_path / "runs"), "--resume", str(path)])
    assert out.returncode == 2 and "was refused" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not marker.exists(), "the payload ran"


def test_everything_we_write_loads_with_weights_only(teacher, tmp_path):
    train_student.main(["--path_t", str(teacher), "--model_s", "resnet8", "--distill", "crd", "--nce_k", "16",
                        *DATA, "--epochs", "1", "--save_freq", "1", "--save_folder", str(tmp_path)])
    files = sorted({*tmp_path.glob("*/*.pth"), teacher, *teacher.parent.glob("*.pth")})
    assert {p.name for p in files} >= {"resnet8_last.pth", "resnet8_best.pth", "ckpt_epoch_1.pth"}
    for path in files:
        state = torch.load(path)  # torch's default: weights_only=True
        rng = state["resume"]["per_rank"][0]["rng"]
        assert isinstance(rng["numpy"]["keys"], torch.Tensor) and isinstance(rng["python"]["words"], torch.Tensor)


def test_repdistiller_last_pth_with_its_argparse_options_loads(teacher, tmp_path):
    """RepDistiller's ``<model>_last.pth`` holds ``'opt'``, an argparse Namespace: allowed, as a teacher."""
    opt = argparse.Namespace(model="resnet8", lr_decay_epochs=[150, 180, 210], learning_rate=0.05, trial=0)
    weights = torch.load(teacher)["model"]
    path = tmp_path / "resnet8_vanilla" / "resnet8_last.pth"
    path.parent.mkdir()
    torch.save({"opt": opt, "model": weights, "optimizer": {"state": {}, "param_groups": []}}, path)
    state = ckpt.load_checkpoint(path)
    assert state["opt"].lr_decay_epochs == [150, 180, 210]
    results = train_student.main(["--path_t", str(path), "--model_s", "resnet8", "--distill", "kd", *DATA,
                                  "--max_steps", "1", "--epochs", "1", "--save_folder", str(tmp_path / "runs")])
    assert results["model_t"] == "resnet8"
    # but nothing else besides tensors and plain types: another class is refused
    torch.save({"opt": Path("elsewhere"), "model": weights}, path)
    with pytest.raises(UserError, match="refused: it holds pathlib.PosixPath"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("model, words", [
    ([1, 2], "'model' entry of .* is a list, not a state dict"),
    ({"conv.weight": [1.0]}, "1 entries that are not named tensors"),
])
def test_checkpoint_whose_model_is_not_a_state_dict(tmp_path, capsys, model, words):
    path = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"model": model}, path)
    with pytest.raises(UserError, match=words):
        ckpt.load_checkpoint(path)
    with pytest.raises(SystemExit) as stop:
        train_student.main(["--path_t", str(path), *DATA, "--save_folder", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "not a state dict" in err or "not named tensors" in err


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_checkpoints_take_the_umask_like_every_other_file(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = tmp_path / "resnet8_last.pth"
        ckpt.save_checkpoint({"model": {"w": torch.ones(1)}}, path)
        (tmp_path / "other").write_text("x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode == (tmp_path / "other").stat().st_mode & 0o777


def test_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """A real ENOSPC: the checkpoint's temporary file is /dev/full (torch reports 'unexpected pos')."""
    args = TEACHER + ["--epochs", "2", "--save_folder", str(tmp_path)]
    train_teacher.main(args + ["--max_steps", "8"])  # epoch 1 of 2 (8 steps an epoch)
    (folder,) = tmp_path.iterdir()
    good = (folder / "resnet8_last.pth").read_bytes()
    real_fdopen = os.fdopen

    def full_disk(fd, *a, **k):
        if ".pth." not in os.readlink(f"/proc/self/fd/{fd}"):  # the checkpoints' disk only
            return real_fdopen(fd, *a, **k)
        os.close(fd)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), *a, **k)

    monkeypatch.setattr(os, "fdopen", full_disk)
    with pytest.raises(SystemExit) as stop:
        train_teacher.main(args + ["--resume", "auto"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "could not write the checkpoint" in err and "disk full" in err and "previous one was kept" in err
    assert (folder / "resnet8_last.pth").read_bytes() == good
    assert not list(folder.glob(".*.tmp")), "no temporary file left behind"


def test_save_folder_that_is_a_file_or_unwritable(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "save"
    blocker.write_text("a file, not a folder")
    with pytest.raises(SystemExit) as stop:
        train_teacher.main(TEACHER + ["--save_folder", str(blocker)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{blocker} is a file, not a folder" in err, err

    def read_only(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", read_only)  # as a read-only folder answers (root is never refused)
    with pytest.raises(SystemExit) as stop:
        train_teacher.main(TEACHER + ["--save_folder", str(tmp_path / "ro")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "cannot write into the run folder" in err and "Permission denied" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_save_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as stop:
            train_teacher.main(TEACHER + ["--save_folder", str(folder)])
    finally:
        folder.chmod(0o755)
    assert stop.value.code == 2 and "cannot write into the run folder" in capsys.readouterr().err


def test_unwritable_results_json_is_one_line(tmp_path, capsys, monkeypatch):
    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(logger, "write_json", refuse)
    with pytest.raises(SystemExit) as stop:
        train_teacher.main(TEACHER + ["--save_folder", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and "Permission denied" in err, err


def test_temporary_files_of_a_crash_are_removed_at_the_next_start(tmp_path):
    args = TEACHER + ["--save_folder", str(tmp_path), "--max_steps", "8"]
    train_teacher.main(args)
    (folder,) = tmp_path.iterdir()
    stale = [folder / ".resnet8_last.pth.abc123.tmp", folder / ".results.json.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    keep = folder / "notes.txt"
    keep.write_text("mine")
    train_teacher.main(args + ["--resume", "auto", "--epochs", "2", "--max_steps", "0"])
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


def test_weights_digest_is_the_weights_not_the_file(tmp_path):
    a, b = model_dict["resnet8"](num_classes=4), model_dict["resnet8"](num_classes=4)
    b.load_state_dict(a.state_dict())
    assert ckpt.weights_digest(a) == ckpt.weights_digest(b)
    with torch.no_grad():
        b.fc.bias[0] += 1e-6
    assert ckpt.weights_digest(a) != ckpt.weights_digest(b)


def test_an_older_checkpoint_with_numpy_random_states_is_refused_then_upgraded(tmp_path, capsys):
    import random

    import numpy as np

    from scripts import upgrade_checkpoint

    args = TEACHER + ["--epochs", "2", "--save_folder", str(tmp_path)]
    train_teacher.main(args + ["--max_steps", "8"])
    (path,) = tmp_path.glob("*/resnet8_last.pth")
    state = torch.load(path)
    for rank in state["resume"]["per_rank"]:  # as versions before this one wrote them
        rank["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(state, path)
    with pytest.raises(UserError, match="numpy.* convert it once with python scripts/upgrade_checkpoint.py"):
        ckpt.load_checkpoint(path)
    assert upgrade_checkpoint.main([str(path)]) == 0
    assert "upgraded" in capsys.readouterr().out and path.with_name(path.name + ".orig").is_file()
    results = train_teacher.main(args + ["--resume", "auto"])
    assert results["status"] == "finished" and [h["epoch"] for h in results["history"]] == [1, 2]
    assert upgrade_checkpoint.main([str(path)]) == 0 and "already current" in capsys.readouterr().out
