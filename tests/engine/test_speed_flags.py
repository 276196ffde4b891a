"""The speed flags (--amp, --channels_last, --compile) through the real training scripts on tiny
synthetic runs: a bf16 or fp16 step close to the fp32 one, channels_last and compile matching the
default."""
from __future__ import annotations

import pytest

from tests.engine.test_resume import TEACHER, last_checkpoint, student_args
from tests.tolerance import AMP, FP32_DEEP, FP32_DEEP_GRAD, approx
import train_student
import train_teacher


@pytest.mark.parametrize("method", ["kd", "crd"])
def test_bf16_step_is_close_to_fp32(teacher, tmp_path, method):
    args = student_args(teacher, method) + ["--epochs", "1", "--max_steps", "1", "-a", "1", "-b", "0.8"]
    fp32 = train_student.main(args + ["--save_folder", str(tmp_path / "fp32")])["history"][0]
    bf16 = train_student.main(args + ["--save_folder", str(tmp_path / "bf16"), "--amp", "bf16"])
    assert bf16["amp"] == "bf16"
    for key in ("loss_ce", "loss_kd", f"loss_{method}"):
        assert bf16["history"][0][key] == approx(fp32[key], rtol=AMP), key
    fp16 = train_student.main(args + ["--save_folder", str(tmp_path / "fp16"), "--amp", "fp16"])  # loss scaling
    assert fp16["history"][0]["train_loss"] == approx(fp32["train_loss"], rtol=AMP)


def test_channels_last_and_compile_match_the_default(tmp_path):
    args = TEACHER + ["--epochs", "1", "--max_steps", "2"]
    plain = train_teacher.main(args + ["--save_folder", str(tmp_path / "plain")])["history"][0]
    for flag in ("--channels_last", "--compile"):
        run = train_teacher.main(args + ["--save_folder", str(tmp_path / flag.strip("-")), flag])["history"][0]
        assert run["train_loss"] == approx(plain["train_loss"], rtol=FP32_DEEP), flag
        assert run["test_loss"] == approx(plain["test_loss"], rtol=FP32_DEEP_GRAD), flag  # after SGD steps
    state = last_checkpoint(tmp_path / "compile")
    assert not any(key.startswith("_orig_mod.") for key in state["model"])
