"""eval_student.py: a checkpoint of ours (teacher or student) or of RepDistiller tested on a test
split gives the training run's own test numbers; bad input is one line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import eval_student
from models import build_model
import train_student
import train_teacher

ROOT = Path(__file__).resolve().parents[2]
# a 4-class synthetic set of 64 training and 32 test images; the same flags for training and testing
DATA = ["--dataset", "synthetic", "--synthetic_classes", "4", "--synthetic_train", "16", "--synthetic_test", "8",
        "--batch_size", "8", "--num_workers", "0", "--device", "cpu"]
RUN = [*DATA, "--epochs", "1", "--max_steps", "3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A resnet8 teacher and a kd student trained for 3 steps (their _last.pth) and the teacher's
    weights saved as RepDistiller saves them (``{'model': state_dict}`` in ``resnet8_vanilla/``)."""
    root = tmp_path_factory.mktemp("eval")
    train_teacher.main(["--model", "resnet8", *RUN, "--save_folder", str(root / "models")])
    teacher = next((root / "models").glob("resnet8_*/resnet8_last.pth"))
    train_student.main(["--path_t", str(teacher), "--model_s", "resnet8", "--distill", "kd", *RUN,
                        "--save_folder", str(root / "students")])
    student = next((root / "students").glob("S:*/resnet8_last.pth"))
    repdistiller = root / "save" / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    repdistiller.parent.mkdir(parents=True)
    torch.save({"model": torch.load(teacher, weights_only=True)["model"]}, repdistiller)
    return {"teacher": teacher, "student": student, "repdistiller": repdistiller, "root": root}


def last_test(checkpoint: Path) -> dict:
    """The last epoch's test numbers of the run that wrote ``checkpoint`` (its results.json)."""
    return json.loads((checkpoint.parent / "results.json").read_text())["history"][-1]


def evaluated(args: list[str], capsys) -> tuple[dict, str]:
    capsys.readouterr()
    results = eval_student.main(args)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return results, lines[0]


@pytest.mark.parametrize("who, flag", [("teacher", "--path"), ("student", "--path_s")])
def test_a_runs_last_checkpoint_gives_its_last_test_numbers(who, flag, runs, capsys, tmp_path):
    path = runs[who]
    results, line = evaluated([flag, str(path), *DATA, "--json", str(tmp_path / "out.json")], capsys)
    expected = last_test(path)
    assert results["test_acc"] == expected["test_acc"] and results["test_acc_top5"] == expected["test_acc_top5"]
    assert results["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-6)
    assert line == (f"resnet8 ({path}) on synthetic test: top-1 {expected['test_acc']:.2f}  "
                    f"top-5 {expected['test_acc_top5']:.2f}  loss {results['test_loss']:.4f}  (32 images)")
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(results))
    assert results["checkpoint"]["dataset"] == "synthetic" and results["num_classes"] == 4


def test_the_recorded_data_set_is_the_default(runs, capsys):
    no_dataset = [a for a in DATA if a not in ("--dataset", "synthetic")]
    results, line = evaluated(["--path", str(runs["student"]), *no_dataset], capsys)
    assert results["dataset"] == "synthetic" and " on synthetic test: " in line
    assert results["test_acc"] == last_test(runs["student"])["test_acc"]


def test_a_repdistiller_checkpoint_takes_its_arch_from_the_folder(runs, capsys):
    results, line = evaluated(["--path_t", str(runs["repdistiller"]), *DATA], capsys)
    assert results["arch"] == "resnet8" and line.startswith(f"resnet8 ({runs['repdistiller']}) on synthetic test: ")
    assert "dataset" not in results["checkpoint"]  # it records none: the numbers are the same weights' all the same
    assert results["test_acc"] == last_test(runs["teacher"])["test_acc"]


def error_line(args: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        eval_student.main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_is_one_line(runs, capsys, tmp_path):
    assert "--path is required" in error_line(DATA, capsys)
    assert "does not exist" in error_line(["--path", str(tmp_path / "none.pth"), *DATA], capsys)
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    assert "not a readable PyTorch checkpoint" in error_line(["--path", str(tmp_path / "notes.pth"), *DATA], capsys)
    line = error_line(["--path", str(runs["teacher"]), *DATA, "--synthetic_classes", "5"], capsys)
    assert re.search(r"has 4 classes but --dataset synthetic has 5: test it on the data set it was trained on", line)
    recorded = error_line(["--path", str(runs["teacher"]), "--synthetic_classes", "5"], capsys)
    assert "the data set it records, synthetic, has 5" in recorded
    # a RepDistiller file of another architecture than its folder names
    wrong = tmp_path / "resnet14_vanilla" / "ckpt_epoch_240.pth"
    wrong.parent.mkdir()
    torch.save({"model": build_model("resnet8", num_classes=4).state_dict()}, wrong)
    assert "do not fit resnet14" in error_line(["--path", str(wrong), *DATA], capsys)


def test_flag_reference_documents_every_flag():
    reference = (ROOT / "docs" / "usage.md").read_text()
    reference = reference[reference.index("`eval_student.py`"):]
    flags = [s for action in eval_student.build_parser()._actions for s in action.option_strings if s != "-h"]
    assert not [f for f in flags if f"`{f}" not in reference and f != "--help"]
