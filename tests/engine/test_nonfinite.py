"""Non-finite numbers that do not come from the learning rate: a teacher checkpoint whose weights
hold NaN/inf is refused when it is loaded, and a non-finite loss names its likely cause."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.guards import NonFiniteLoss, check_finite
from models import build_model
from tests.datagen import SYNTHETIC
import train_student

DATA = [*SYNTHETIC, "--epochs", "1"]


def save_teacher(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """A teacher checkpoint as train_teacher.py writes its weights: ``model``, ``arch``, ``num_classes``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state_dict, "arch": "resnet8", "num_classes": 4}, path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_teacher(tmp_path_factory.mktemp("teacher") / "resnet8_vanilla" / "last.pth",
                        build_model("resnet8", num_classes=4).state_dict())


def one_error_line(capsys, args: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train_student.main(args)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert stop.value.code == 2 and "Traceback" not in captured.err, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0], captured.out


def test_teacher_with_nan_weights_is_refused_when_loaded(teacher, tmp_path, capsys):
    weights = torch.load(teacher, weights_only=True)["model"]
    weights["conv1.weight"][0, 0, 0, 0] = float("nan")
    weights["fc.bias"][1] = float("inf")
    weights["bn1.running_var"][:] = float("nan")
    bad = save_teacher(tmp_path / "resnet8_diverged" / "last.pth", weights)
    total = sum(1 for t in weights.values() if t.is_floating_point())
    line, out = one_error_line(capsys, ["--path_t", str(bad), "--model_s", "resnet8", "--distill", "kd", *DATA,
                                        "--save_folder", str(tmp_path / "students")])
    assert str(bad) in line and f"3 of its {total} tensors hold NaN or inf" in line, line
    for name in ("conv1.weight", "bn1.running_var", "fc.bias"):
        assert name in line, line
    assert "--learning_rate" not in line and "teacher resnet8" not in out  # it never got to validate it


def test_first_step_non_finite_blames_the_weights_not_the_learning_rate(teacher, tmp_path, capsys):
    # -r 3e38 is a float32, but times the first step's cross-entropy (about ln 4 = 1.39 > 1.14)
    # it overflows float32 (max 3.4e38): the term is inf from the first step
    line, _ = one_error_line(capsys, ["--path_t", str(teacher), "--model_s", "resnet8", "--distill", "kd",
                                      "-r", "3e38", "-a", "1", "-b", "0", *DATA,
                                      "--save_folder", str(tmp_path / "students")])
    assert "non-finite at epoch 1, step 1 (ce=inf, kd=" in line, line
    assert "before any update, so the learning rate is not the cause" in line and "loss weights" in line, line
    assert "lower --learning_rate" not in line


TERMS_AT = "the loss became non-finite at epoch 3, step 7 ("


@pytest.mark.parametrize("values, options, words, absent", [
    ({"ce": float("inf"), "kd": 1.5}, dict(before_any_update=True),
     ["ce=inf, kd=1.5", "first step, before any update", "not the cause", "teacher", "loss weights"],
     ["lower --learning_rate", "fp16"]),
    ({"ce": float("nan")}, dict(before_any_update=True, fp16=True),
     ["ce=nan", "first step", "fp16 overflow", "--amp bf16"], ["lower --learning_rate"]),
    ({"ce": float("nan"), "kd": 0.5}, dict(fp16=True, lr=0.05),
     ["with --amp fp16 this is likely an fp16 overflow", "--amp bf16 or --amp off"], ["lower --learning_rate"]),
    ({"ce": 2.0, "kd": 0.5, "crd": float("nan")}, dict(lr=0.05),
     ["crd=nan", "only the method's term crd is non-finite", "-b", "temperature"], ["--learning_rate", "-a"]),
    ({"ce": 2.0, "kd": float("inf")}, dict(lr=0.05),
     ["only the kd term is non-finite", "-a", "--kd_T"], ["--learning_rate", "-b"]),
    ({"ce": 2.0, "kd": float("inf"), "crd": float("nan")}, dict(lr=0.05),
     ["only kd and the method's term crd are non-finite", "-a and -b"], ["--learning_rate"]),
    ({"ce": float("nan"), "crd": float("nan")}, dict(lr=0.05),
     ["learning rate is likely too high", "lower --learning_rate (this step ran at 0.05)"], ["fp16", "first step"]),
    ({"init": float("inf")}, dict(lr=0.1),
     ["init=inf", "lower --learning_rate (this step ran at 0.1)"], ["-b"]),
], ids=["first-step", "first-step-fp16", "fp16", "method-term", "kd-term", "kd-and-method", "learning-rate",
        "init-stage"])
def test_non_finite_message_names_the_likely_cause(values, options, words, absent):
    with pytest.raises(NonFiniteLoss) as info:
        check_finite(values, "epoch 3", 7, **options)
    message = str(info.value)
    assert "\n" not in message and message.startswith(TERMS_AT), message
    assert "its checkpoints were left as they were" in message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    for word in absent:
        assert word not in message, f"{word!r} in: {message}"


def test_finite_values_pass():
    check_finite({"ce": 1e30, "kd": 0.0}, "epoch 1", 1, before_any_update=True)
