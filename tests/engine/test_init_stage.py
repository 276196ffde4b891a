"""The init stage of abound, factor and fsp is a stage of engine.fit.Fit: a stop signal inside it
saves ``<model>_last.pth`` and ``--resume auto`` continues it exactly; ``--max_steps`` counts its
steps apart from the main stage's and stops the run inside it; a resume after it never reruns it.
All through train_student.py on tiny synthetic runs, on the CPU with --deterministic."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distiller_zoo.step import InitStep
from engine.fit import Fit
from tests.engine.test_resume import assert_same_state, interrupt_after
import train_student
import train_teacher

DATA = ["--dataset", "synthetic", "--synthetic_classes", "4", "--synthetic_train", "8", "--synthetic_test", "4",
        "--batch_size", "8", "--num_workers", "0", "--device", "cpu"]
STEPS_PER_EPOCH = 4  # 32 images, batch 8
ROOT = Path(__file__).resolve().parents[2]
TIMING = ("epoch_time_s", "images_per_s", "session")  # what may differ between two identical runs


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> list[Path]:
    """Two resnet8 teachers trained one epoch each (other seeds: other weights)."""
    paths = []
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"teacher{seed}")
        train_teacher.main(["--model", "resnet8", *DATA, "--epochs", "1", "--seed", str(seed),
                            "--save_folder", str(folder)])
        paths.append(next(folder.glob("*/*_last.pth")))
    return paths


def student_args(teachers: list[Path], method: str, init_epochs: int, epochs: int) -> list[str]:
    return ["--path_t", ",".join(map(str, teachers)), "--model_s", "resnet8", "--distill", method, *DATA,
            "--init_epochs", str(init_epochs), "--epochs", str(epochs), "--deterministic"]


@pytest.fixture(scope="module")
def whole(teachers, tmp_path_factory):
    """``whole(method, n_teachers, init_epochs, epochs)``: (results, last.pth) of an uninterrupted
    run, made once per module."""
    made = {}

    def get(method: str, n_teachers: int, init_epochs: int, epochs: int) -> tuple[dict, dict]:
        key = (method, n_teachers, init_epochs, epochs)
        if key not in made:
            folder = tmp_path_factory.mktemp("whole")
            args = student_args(teachers[:n_teachers], method, init_epochs, epochs)
            made[key] = train_student.main(args + ["--save_folder", str(folder)]), last_checkpoint(folder)
        return made[key]

    return get


def last_checkpoint(folder: Path) -> dict:
    (path,) = folder.glob("*/*_last.pth")
    return torch.load(path, weights_only=True)


def results_file(folder: Path) -> dict:
    (path,) = folder.glob("*/results.json")
    return json.loads(path.read_text())


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def assert_same_run(results: dict, state: dict, expected_results: dict, expected_state: dict) -> None:
    """Bit-identical weights, Distiller state (heads, paraphraser, connectors) and main
    optimiser state, and the same records (up to timings)."""
    assert_same_state(state["model"], expected_state["model"])
    assert_same_state(state["distiller"], expected_state["distiller"])
    momentum, expected_momentum = state["optimizer"]["state"], expected_state["optimizer"]["state"]
    assert momentum.keys() == expected_momentum.keys() and momentum
    for key in momentum:
        assert_same_state(momentum[key], expected_momentum[key])
    assert without_timing(results["history"]) == without_timing(expected_results["history"])
    assert results["init_history"] == expected_results["init_history"]
    assert results["status"] == expected_results["status"] == "finished"
    assert results["steps"] == expected_results["steps"] and results["stages"] == expected_results["stages"]


@pytest.mark.parametrize("method, n_teachers, init_epochs, calls, stage, epochs_done", [
    ("factor", 1, 2, STEPS_PER_EPOCH + 3, 0, 1),  # init epoch 2, after step 3
    ("abound", 2, 1, STEPS_PER_EPOCH + 3, 1, 0),  # the second teacher's init stage: epoch 1, after step 3
])
def test_sigterm_in_the_init_stage_then_resume_ends_identical(method, n_teachers, init_epochs, calls, stage,
                                                              epochs_done, teachers, whole, tmp_path, monkeypatch,
                                                              capsys):
    expected_results, expected_state = whole(method, n_teachers, init_epochs, 1)
    assert len(expected_results["init_history"]) == init_epochs * n_teachers
    args = student_args(teachers[:n_teachers], method, init_epochs, 1) + ["--save_folder", str(tmp_path)]
    batches = 3
    interrupt_after(calls, monkeypatch)
    with pytest.raises(SystemExit) as stop:
        train_student.main(args)
    assert stop.value.code == 128 + signal.SIGTERM
    where = f"init epoch {epochs_done + 1}, step {batches}"
    assert f"SIGTERM received at {where}" in capsys.readouterr().err
    saved = last_checkpoint(tmp_path)  # tensors and plain types only
    assert saved["epoch"] == 0 and saved["resume"]["stage"] == stage and saved["resume"]["batches_done"] == batches
    progress = saved["resume"]["stages"][stage]
    assert progress["epochs_done"] == epochs_done and progress["steps"] == epochs_done * STEPS_PER_EPOCH + batches
    assert progress["optimizer"]["state"], "the init stage's momentum is kept"
    assert results_file(tmp_path)["status"] == "interrupted"
    monkeypatch.undo()

    resumed = train_student.main(args + ["--resume", "auto"])
    assert resumed["resumed"] == 1 and resumed["sessions"][-1]["start_stage"] == "init"
    assert_same_run(resumed, last_checkpoint(tmp_path), expected_results, expected_state)


def test_max_steps_stops_inside_the_init_stage_and_a_resume_continues_it(teachers, whole, tmp_path):
    expected_results, expected_state = whole("factor", 1, 2, 1)
    args = student_args(teachers[:1], "factor", 2, 1) + ["--save_folder", str(tmp_path)]
    first = train_student.main(args + ["--max_steps", "3"])
    assert first["status"] == "stopped" and first["stopped_by"] == "--max_steps 3 in the init stage"
    assert first["history"] == [] and first["last_acc"] is None and first["steps"] == 0
    assert first["stages"][0] == {"name": "init", "epochs": 2, "epochs_done": 0, "steps": 3}
    (record,) = first["init_history"]
    assert record["init_epoch"] == 1 and record["partial"] and record["batches"] == 3
    saved = last_checkpoint(tmp_path)
    assert saved["resume"]["stage"] == 0 and saved["resume"]["batches_done"] == 3
    assert not list(tmp_path.glob("*/*_best.pth")), "nothing is validated in the init stage"

    # each stage has its own 10 steps: the init stage's 5 left, then the main stage's 4 (a budget
    # over both stages would stop the main stage after 2)
    resumed = train_student.main(args + ["--resume", "auto", "--max_steps", "10"])
    assert resumed["stages"] == [{"name": "init", "epochs": 2, "epochs_done": 2, "steps": 2 * STEPS_PER_EPOCH},
                                 {"name": "main", "epochs": 1, "epochs_done": 1, "steps": STEPS_PER_EPOCH}]
    assert_same_run(resumed, last_checkpoint(tmp_path), expected_results, expected_state)


def frozen_paraphraser_and_no_init_step(monkeypatch) -> dict:
    """Count InitStep's forwards and keep what build_run builds, for a look after the run."""
    seen = {"init_steps": 0, "parts": None}
    forward, build_run = InitStep.forward, train_student.build_run

    def counting_forward(self, raw):
        seen["init_steps"] += 1
        return forward(self, raw)

    def keeping_build_run(opt, runtime):
        seen["parts"] = build_run(opt, runtime)
        return seen["parts"]

    monkeypatch.setattr(InitStep, "forward", counting_forward)
    monkeypatch.setattr(train_student, "build_run", keeping_build_run)
    return seen


def test_a_resume_after_the_init_stage_does_not_rerun_it(teachers, whole, tmp_path, monkeypatch, capsys):
    expected_results, expected_state = whole("factor", 1, 1, 2)
    args = student_args(teachers[:1], "factor", 1, 2) + ["--save_folder", str(tmp_path)]
    save = Fit._save

    def save_under_a_signal(self, names):  # a real SIGTERM while the init stage's end is saved
        os.kill(os.getpid(), signal.SIGTERM)
        save(self, names)

    monkeypatch.setattr(Fit, "_save", save_under_a_signal)
    with pytest.raises(SystemExit) as stop:
        train_student.main(args)
    assert stop.value.code == 128 + signal.SIGTERM
    assert "SIGTERM received at the end of init epoch 1" in capsys.readouterr().err
    saved = last_checkpoint(tmp_path)
    assert saved["resume"]["stage"] == 0 and saved["resume"]["batches_done"] == 0
    assert saved["resume"]["stages"][0]["epochs_done"] == 1 and saved["resume"]["stages"][0]["optimizer"] is None
    monkeypatch.undo()

    seen = frozen_paraphraser_and_no_init_step(monkeypatch)
    resumed = train_student.main(args + ["--resume", "auto"])
    assert seen["init_steps"] == 0 and len(resumed["init_history"]) == 1
    paraphraser = seen["parts"].distillers[0].paraphraser
    assert not any(p.requires_grad for p in paraphraser.parameters()), "after_init_stage ran again"
    assert_same_run(resumed, last_checkpoint(tmp_path), expected_results, expected_state)


def test_a_checkpoint_without_stages_continues_the_main_stage(teachers, whole, tmp_path, monkeypatch):
    """A ``<model>_last.pth`` of the version before stages (written in the main stage, with its
    ``init_history`` and no ``stage``) resumes in the main stage: the init stage is not rerun."""
    expected_results, expected_state = whole("factor", 1, 1, 2)
    args = student_args(teachers[:1], "factor", 1, 2) + ["--save_folder", str(tmp_path)]
    first = train_student.main(args + ["--max_steps", str(STEPS_PER_EPOCH)])  # each stage: one epoch
    assert first["epochs_run"] == 1 and first["stopped_by"] == f"--max_steps {STEPS_PER_EPOCH}"
    (path,) = tmp_path.glob("*/*_last.pth")
    state = torch.load(path, weights_only=True)
    for key in ("stage", "stages"):
        del state["resume"][key]
    torch.save(state, path)

    seen = frozen_paraphraser_and_no_init_step(monkeypatch)
    resumed = train_student.main(args + ["--resume", "auto"])
    assert seen["init_steps"] == 0 and resumed["init_history"] == first["init_history"]
    assert not any(p.requires_grad for p in seen["parts"].distillers[0].paraphraser.parameters())
    resumed["stages"] = expected_results["stages"]  # the old checkpoint did not count the init stage's steps
    assert_same_run(resumed, last_checkpoint(tmp_path), expected_results, expected_state)


def test_no_init_stage_with_beta_zero_or_no_init_epochs(teachers, tmp_path):
    for flags in (["-b", "0", "-a", "1"], ["--init_epochs", "0"]):
        args = student_args(teachers[:1], "factor", 1, 1)
        folder = tmp_path / flags[1]
        results = train_student.main(args + flags + ["--max_steps", "2", "--save_folder", str(folder)])
        assert "init_history" not in results and "stages" not in results and results["steps"] == 2


def test_torchrun_two_processes_stop_and_resume_inside_the_init_stage(teachers, tmp_path):
    """Under torchrun (gloo, CPU) the init stage's gradients are averaged by the loop, a
    ``--max_steps`` stop inside it saves every rank's random states, and ``--resume auto``
    finishes it, then the main stage."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_student.py",
           *student_args(teachers[:1], "factor", 2, 1), "--save_folder", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 32 images over 2 ranks of batch 8: 2 steps per epoch
    first = subprocess.run(cmd + ["--max_steps", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = last_checkpoint(tmp_path)
    assert saved["resume"]["stage"] == 0 and saved["resume"]["batches_done"] == 1
    assert len(saved["resume"]["per_rank"]) == 2
    second = subprocess.run(cmd + ["--resume", "auto"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("init_epoch 2 ") == 1  # rank 0 alone logs
    results = results_file(tmp_path)
    assert results["status"] == "finished" and results["world_size"] == 2 and results["resumed"] == 1
    assert [r["init_epoch"] for r in results["init_history"]] == [1, 2]
    assert results["stages"] == [{"name": "init", "epochs": 2, "epochs_done": 2, "steps": 4},
                                 {"name": "main", "epochs": 1, "epochs_done": 1, "steps": 2}]
