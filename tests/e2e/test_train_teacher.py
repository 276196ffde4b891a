"""train_teacher.py end to end on tiny data: run folder, checkpoints, records, errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import build_model
from tests.datagen import SYNTHETIC, write_fake_cifar100
import train_teacher

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_teacher.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_synthetic_run_writes_run_folder(tmp_path):
    results = train_teacher.main(["--model", "resnet8", "--dataset", "synthetic", "--epochs", "2",
                                  "--subset", "400", "--batch_size", "32", "--num_workers", "0",
                                  "--save_freq", "1", "--save_folder", str(tmp_path)])
    run = tmp_path / "resnet8_synthetic_lr_0.05_decay_0.0005_trial_0"
    names = {p.name for p in run.iterdir()}
    # RepDistiller's names
    assert {"resnet8_last.pth", "resnet8_best.pth", "ckpt_epoch_1.pth", "ckpt_epoch_2.pth", "args.json",
            "results.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)

    state = torch.load(run / "resnet8_last.pth")
    assert {"model", "arch", "epoch", "best_acc", "optimizer", "accuracy"} <= set(state)
    assert state["arch"] == "resnet8" and state["epoch"] == 2
    model = build_model("resnet8", num_classes=100)
    model.load_state_dict(state["model"], strict=True)  # RepDistiller's layout, loadable as is

    saved = json.loads((run / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["status"] == "finished" and saved["epochs_run"] == 2
    assert [h["epoch"] for h in saved["history"]] == [1, 2]
    assert all(0 <= h["test_acc"] <= h["test_acc_top5"] <= 100 for h in saved["history"])
    assert saved["best_acc"] == max(h["test_acc"] for h in saved["history"])
    assert saved["steps"] == 2 * (400 // 32 + 1)
    args = json.loads((run / "args.json").read_text())
    assert args["model"] == "resnet8" and args["learning_rate"] == 0.05 and args["seed"] == 0


def test_resnet50_on_fake_cifar_folder_with_max_steps(tmp_path):
    data = write_fake_cifar100(tmp_path / "data")
    results = train_teacher.main(["--model", "ResNet50", "--dataset", "cifar100", "--data_folder", str(data),
                                  "--allow_modified_data",
                                  "--epochs", "1", "--max_steps", "2", "--batch_size", "8", "--num_workers", "0",
                                  "--save_folder", str(tmp_path / "save")])
    # stopped inside epoch 1: validated and saved there, the epoch left for a resume to finish
    assert results["steps"] == 2 and results["epochs_run"] == 0 and results["status"] == "stopped"
    assert results["history"][0]["partial"] and results["history"][0]["batches"] == 2
    run = tmp_path / "save" / "ResNet50_cifar100_lr_0.05_decay_0.0005_trial_0"
    assert (run / "ResNet50_last.pth").is_file() and (run / "ResNet50_best.pth").is_file()


def test_small_lr_models_default_to_0_01(tmp_path):
    opt = train_teacher.parse_option(["--model", "ShuffleV2", "--dataset", "synthetic"])
    assert opt.learning_rate == 0.01 and opt.model_name.startswith("ShuffleV2_synthetic_lr_0.01_")
    opt = train_teacher.parse_option(["--model", "ShuffleV2", "--learning_rate", "0.1"])
    assert opt.learning_rate == 0.1


def test_max_steps_stops_early_and_still_validates(tmp_path):
    results = train_teacher.main(["--model", "resnet8", "--dataset", "synthetic", "--epochs", "5",
                                  "--subset", "200", "--batch_size", "20", "--max_steps", "3", "--val_subset", "100",
                                  "--num_workers", "0", "--save_folder", str(tmp_path)])
    assert results["steps"] == 3 and results["last_acc"] is not None
    # 3 of epoch 1's 10 steps: not a finished run, and not a finished epoch
    assert results["status"] == "stopped" and results["stopped_by"] == "--max_steps 3"
    assert results["epochs_run"] == 0 and results["history"][0]["partial"] and results["history"][0]["batches"] == 3


@pytest.mark.parametrize("args, expected, in_process", [
    (["--model", "resnet9000"], "unknown model 'resnet9000'; choose one of: resnet8, ", False),
    (["--model", "resnet8", "--dataset", "mnist"], "unknown --dataset 'mnist'", True),
    (["--model", "resnet8", "--device", "cuda"], "no CUDA GPU", True),
])
def test_bad_input_is_one_clear_line(args, expected, in_process, tmp_path, capfd):
    """One line on stderr, exit status 2, no traceback: the first case through the real script (a
    process of its own), the others through the same ``main`` in this process."""
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    if in_process:
        with pytest.raises(SystemExit) as exit_:
            train_teacher.main([*args, "--save_folder", str(tmp_path)])
        returncode, stderr = exit_.value.code, capfd.readouterr().err
    else:
        out = run_script(*args, "--save_folder", str(tmp_path))
        returncode, stderr = out.returncode, out.stderr
    assert returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert "Traceback" not in stderr


def test_empty_cifar_folder_says_how_to_get_data(tmp_path):
    out = run_script("--model", "resnet8", "--data_folder", str(tmp_path / "empty"),
                     "--save_folder", str(tmp_path / "save"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--download" in lines[0], out.stderr
    assert not (tmp_path / "save").exists() or not any((tmp_path / "save").rglob("*.pth"))


@pytest.mark.parametrize("script", ["train_teacher", "train_student"])
def test_flag_reference_documents_every_flag(script):
    parser = __import__(script).build_parser()
    reference = (ROOT / "docs" / "usage.md").read_text()
    reference = reference[reference.index("## Flag reference"):]
    flags = [s for action in parser._actions for s in action.option_strings if s != "-h"]
    missing = [f for f in flags if f"`{f}" not in reference and f != "--help"]
    assert not missing, f"docs/usage.md's flag reference lacks {missing}"


def test_imagenet_folder_with_imagenet_resnet(tmp_path):
    from tests.datagen import write_fake_imagenet
    data = write_fake_imagenet(tmp_path / "imagenet")
    results = train_teacher.main(["--model", "ResNet18", "--dataset", "imagenet", "--data_folder", str(data),
                                  "--epochs", "1", "--max_steps", "1", "--batch_size", "4", "--num_workers", "0",
                                  "--save_folder", str(tmp_path / "save")])
    assert results["steps"] == 1
    state = torch.load(next((tmp_path / "save").glob("ResNet18_imagenet_*/ResNet18_last.pth")), weights_only=True)
    assert state["arch"] == "ResNet18" and state["num_classes"] == 3
    assert state["model"]["fc.weight"].shape == (3, 512)  # torchvision's layout


def test_print_freq_gives_progress_lines_in_a_log(tmp_path):
    """stdout is a pipe here, as in a cluster's log: a line every --print_freq steps."""
    out = run_script("--model", "resnet8", *SYNTHETIC, "--epochs", "1", "--print_freq", "3",
                     "--save_folder", str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("epoch 1 [")]
    assert [line.split("]")[0] for line in lines] == ["epoch 1 [3/8", "epoch 1 [6/8"]
    for line in lines:
        # the means over the epoch so far, then this step's loss (one term: no term list)
        assert re.search(r"\]  epoch mean: loss \d+\.\d{4} top-1 \d+\.\d\d  this step: loss \d[\d.e+-]*  ", line), line
        assert " ce " not in line and re.search(r"  \d+\.\d img/s  eta \d+:\d\d:\d\d$", line), line


def step_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's TensorBoard scalars tagged ``step/...``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag.startswith("step/")}


def test_tb_freq_logs_step_scalars(tmp_path):
    """--tb_freq 2 over 8 steps: 4 step records of the loss, its term, the learning rate and the
    batch's top-1 (x axis: the optimiser step); the default 500 writes none. Epoch scalars as before."""
    tiny = ["--model", "resnet8", "--dataset", "synthetic", "--synthetic_classes", "4", "--synthetic_train", "16",
            "--synthetic_test", "4", "--batch_size", "8", "--epochs", "1", "--device", "cpu",
            "--save_folder", str(tmp_path)]
    results = train_teacher.main([*tiny, "--tb_freq", "2"])
    assert results["steps"] == 8
    scalars = step_scalars(tmp_path / "resnet8_synthetic_lr_0.05_decay_0.0005_trial_0")
    assert set(scalars) == {"step/loss", "step/ce", "step/lr", "step/top1"}
    assert all([step for step, _ in records] == [2, 4, 6, 8] for records in scalars.values())
    assert [value for _, value in scalars["step/loss"]] == [value for _, value in scalars["step/ce"]]
    assert all(value == pytest.approx(0.05) for _, value in scalars["step/lr"])
    assert all(value in (0, 12.5, 25, 37.5, 50, 62.5, 75, 87.5, 100) for _, value in scalars["step/top1"])
    train_teacher.main([*tiny, "--trial", "1"])
    assert step_scalars(tmp_path / "resnet8_synthetic_lr_0.05_decay_0.0005_trial_1") == {}
