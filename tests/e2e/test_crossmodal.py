"""Cross-modal distillation end to end (CRD's Lab protocol, scripts/run_crossmodal.sh): a teacher
on view L of a labelled set, students on view ab of an unlabelled split, linear probes of each."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_student
import train_teacher
import transfer_student

ROOT = Path(__file__).resolve().parents[2]
PARSERS = {"train_teacher.py": train_teacher.parse_option, "train_student.py": train_student.parse_option,
           "transfer_student.py": transfer_student.parse_option}


def crossmodal(*args: str, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", "scripts/run_crossmodal.sh", *args], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
                              "PYTHON": sys.executable, **env}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def printed(out: subprocess.CompletedProcess) -> list[tuple[str, list[str]]]:
    """(program, its arguments) of each printed command."""
    found = []
    for line in out.stdout.splitlines():
        argv = shlex.split(line)
        program = next((a for a in argv if a in PARSERS), None)
        if program:
            found.append((program, argv[argv.index(program) + 1:]))
    return found


def test_dry_run_commands_parse_and_chain_each_run_to_its_probe():
    out = crossmodal("--data_folder", "/data", DRY_RUN="1", TRIALS="2", DISTILL_FLAGS="--nce_k 4096")
    commands = printed(out)
    opts = [(program, PARSERS[program](argv)) for program, argv in commands]
    teacher = opts[0][1]
    assert (opts[0][0], teacher.model, teacher.dataset, teacher.view) == ("train_teacher.py", "wrn_40_2", "cifar100", "L")
    teacher_ckpt = Path(teacher.save_path) / "wrn_40_2_last.pth"
    assert opts[1][0] == "transfer_student.py" and Path(opts[1][1].path_s) == teacher_ckpt
    # per trial: crd, hint, attention (distilled) and alone, each followed by its probe
    per_trial = ["train_student.py", "transfer_student.py"] * 3 + ["train_teacher.py", "transfer_student.py"]
    assert [p for p, _ in commands[2:]] == per_trial * 2
    runs = opts[2:]
    trained = [o for p, o in runs if p != "transfer_student.py"]
    probes = [o for p, o in runs if p == "transfer_student.py"]
    assert len(trained) == len(probes) == 8
    assert all(o.data_folder == "/data" for _, o in opts)
    for run, probe in zip(trained, probes):
        assert probe.dataset == "stl10" and probe.trial == int(run.trial)
        if hasattr(run, "distill"):  # a distilled student: unlabelled ab images of STL-10, teacher on L
            assert (run.dataset, run.split, run.view_s, run.view_t, run.alpha, run.gamma) == (
                "stl10", "unlabeled", "ab", "L", 0, 0)
            assert Path(run.path_t) == teacher_ckpt and run.nce_k == 4096
            folder = Path(run.save_folder) / train_student.run_name(run, "wrn_40_2", ["L"])
            assert Path(probe.path_s) == folder / "wrn_16_2_last.pth"
        else:  # the student alone, with labels, on the ab view of the labelled set
            assert (run.model, run.dataset, run.view) == ("wrn_16_2", "cifar100", "ab")
            assert Path(probe.path_s) == Path(run.save_path) / "wrn_16_2_last.pth"
    assert sorted(o.distill for o in trained if hasattr(o, "distill")) == sorted(["crd", "hint", "attention"] * 2)


@pytest.mark.e2e
def test_synthetic_teacher_on_L_distils_a_student_on_ab_without_labels_then_probes(tmp_path):
    small = ["--synthetic_classes", "4", "--synthetic_train", "16", "--synthetic_test", "4", "--batch_size", "8",
             "--device", "cpu", "--epochs", "1"]
    out = crossmodal(*small, LABELLED="synthetic", TARGET="synthetic", TEACHER="resnet8", STUDENT="resnet8",
                     METHODS="crd alone", SAVE=str(tmp_path), DISTILL_FLAGS="--nce_k 8 --split unlabeled")
    probes = sorted((tmp_path / "transfer").glob("*/results.json"))
    assert len(probes) == 3, out.stdout[-2000:]  # the teacher, the CRD student, the student alone
    results = {p.parent.name: json.loads(p.read_text()) for p in probes}
    views = sorted(r["recipe"]["view"] for r in results.values())
    assert views == ["L", "ab", "ab"]
    for r in results.values():
        assert r["role"] == "transfer" and r["status"] == "finished" and 0 <= r["last_acc"] <= 100
    student = next(tmp_path.glob("student_model/*crd*/resnet8_last.pth"))
    state = torch.load(student, weights_only=True)
    assert state["view"] == "ab" and state["model"]["conv1.weight"].shape[1] == 2
    record = json.loads((student.parent / "results.json").read_text())
    assert record["args"]["split"] == "unlabeled" and "loss_ce" not in record["history"][-1]
