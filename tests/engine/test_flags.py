"""Flag values outside their range, NaN and infinities are refused while the flags are read:
one ``error: argument <flag>: ...`` line, exit status 2, before any data or model is touched.
Names that become parts of the run folder's name (``--trial``) cannot hold path separators."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.argtypes import FLOAT32_MAX, FLOAT32_TINY, float_in, int_at_least, path_part, to_float32
from engine.options import Parser
import train_student
import train_teacher

ROOT = Path(__file__).resolve().parents[2]
STUDENT = ["--path_t", "teacher.pth", "--dataset", "synthetic"]
TEACHER = ["--model", "resnet8", "--dataset", "synthetic"]

# (flag, bad value) of train_student.py: shared flags, the student's and every method's own
STUDENT_BAD = [
    ("--learning_rate", "-1"), ("--learning_rate", "0"), ("--learning_rate", "nan"), ("--learning_rate", "abc"),
    ("--momentum", "-1"), ("--momentum", "1"), ("--momentum", "inf"),
    ("--weight_decay", "-1"), ("--weight_decay", "inf"), ("--lr_decay_rate", "0"), ("--lr_decay_rate", "-0.1"),
    ("--batch_size", "0"), ("--epochs", "0"), ("--save_freq", "0"), ("--print_freq", "0"), ("--tb_freq", "0"),
    ("--num_workers", "-1"), ("--subset", "-1"), ("--val_subset", "-5"), ("--max_steps", "-1"),
    ("--synthetic_classes", "1"), ("--synthetic_train", "0"), ("--synthetic_test", "0"),
    ("--synthetic_difficulty", "-0.5"), ("--synthetic_difficulty", "nan"),
    ("--dist_timeout", "0"), ("--dist_timeout", "inf"),
    ("--init_epochs", "-1"), ("-r", "-1"), ("--gamma", "inf"), ("-a", "-0.5"), ("-b", "-1"), ("-b", "nan"),
    ("--kd_T", "0"), ("--kd_T", "-inf"), ("--feat_dim", "0"), ("--nce_k", "0"), ("--nce_k", "-5"),
    ("--nce_t", "0"), ("--nce_t", "-0.07"), ("--nce_m", "-0.1"), ("--nce_m", "1.5"), ("--nce_m", "nan"),
    ("--nce_z_momentum", "1"), ("--nce_z_momentum", "-0.01"), ("--hint_layer", "-1"), ("--hint_layer", "5"),
    ("--dkd_alpha", "-1"), ("--dkd_beta", "inf"), ("--dkd_T", "0"), ("--dkd_warmup", "-1"),
    ("--dcd_alpha", "-1"), ("--dcd_max_tau", "0"), ("--dcd_init_tau", "nan"),
    ("--crcd_k", "0"), ("--crcd_t", "0"), ("--crcd_grad_weight", "-1"),
    ("--wcord_lambda_g", "-1"), ("--wcord_lambda_l", "nan"), ("--wcord_eps", "0"), ("--wcord_iters", "0"),
]
TEACHER_BAD = [("--learning_rate", "-1"), ("--momentum", "1.0"), ("--weight_decay", "nan"), ("--epochs", "-3"),
               ("--batch_size", "1e3"), ("-t", "../../x")]


def parse_error(parse, args: list[str], capsys) -> str:
    """Run a script's ``parse_option(args)``: it must exit with status 2 and print one
    ``error: argument ...`` line and nothing else; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        parse(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stop.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: argument "), err
    return lines[0]


def given(flag: str, value: str) -> list[str]:
    """``--flag=value`` (so that values such as ``-inf`` are not read as flags), ``-f value``."""
    return [f"{flag}={value}"] if flag.startswith("--") else [flag, value]


def flag_names(flag: str) -> str:
    """How argparse names the flag in its message (``-r/--gamma`` for ``-r`` or ``--gamma``)."""
    for parser in (train_student.build_parser(), train_teacher.build_parser()):
        action = parser._option_string_actions.get(flag)  # noqa: SLF001
        if action is not None:
            return "/".join(action.option_strings)
    raise KeyError(flag)


@pytest.mark.parametrize("flag, value", STUDENT_BAD, ids=[f"{f}={v}" for f, v in STUDENT_BAD])
def test_student_refuses_out_of_range_values_at_parsing(flag, value, capsys):
    line = parse_error(train_student.parse_option, STUDENT + given(flag, value), capsys)
    assert f"argument {flag_names(flag)}:" in line and value in line, line
    if value.lstrip("-") in ("nan", "inf"):
        assert "finite" in line, line


@pytest.mark.parametrize("flag, value", TEACHER_BAD, ids=[f"{f}={v}" for f, v in TEACHER_BAD])
def test_teacher_refuses_out_of_range_values_at_parsing(flag, value, capsys):
    line = parse_error(train_teacher.parse_option, TEACHER + given(flag, value), capsys)
    assert f"argument {flag_names(flag)}:" in line and value in line, line


def test_the_message_names_the_valid_range(capsys):
    line = parse_error(train_student.parse_option, STUDENT + ["--momentum", "1"], capsys)
    assert line == "error: argument --momentum: expected a finite number in [0, 1), got '1' (see --help)"
    line = parse_error(train_student.parse_option, STUDENT + ["--learning_rate", "-1"], capsys)
    assert "expected a finite number > 0, got '-1'" in line
    line = parse_error(train_student.parse_option, STUDENT + ["--nce_m", "2"], capsys)
    assert "expected a finite number in [0, 1], got '2'" in line
    line = parse_error(train_student.parse_option, STUDENT + ["--nce_k", "0"], capsys)
    assert "expected an integer >= 1, got '0'" in line


def test_boundary_values_that_mean_something_still_parse():
    opt = train_student.parse_option(STUDENT + [
        "-r", "0", "-a", "0", "-b", "1", "--weight_decay", "0", "--momentum", "0", "--nce_m", "1",
        "--nce_z_momentum", "0", "--init_epochs", "0", "--dkd_warmup", "0", "--crcd_grad_weight", "0",
        "--dcd_init_tau", "-2", "--synthetic_difficulty", "0", "--max_steps", "0", "--num_workers", "0",
        "--subset", "0", "--lr_decay_rate", "2", "--learning_rate", "1e-6", "--dist_timeout", "0.05"])
    assert (opt.gamma, opt.alpha, opt.beta) == (0.0, 0.0, 1.0)
    assert (opt.weight_decay, opt.momentum, opt.nce_m, opt.nce_z_momentum) == (0.0, 0.0, 1.0, 0.0)
    assert (opt.init_epochs, opt.dkd_warmup, opt.crcd_grad_weight, opt.dcd_init_tau) == (0, 0, 0.0, -2.0)
    assert opt.learning_rate == 1e-6 and opt.dist_timeout == 0.05
    assert train_student.parse_option(STUDENT).dist_timeout == 10.0  # the default: 10 minutes
    assert train_teacher.parse_option(TEACHER + ["--trial", "3"]).trial == 3


def test_every_numeric_flag_has_a_checked_type():
    """A flag added later with a bare ``type=float`` or ``type=int`` fails here (the seeds take
    any integer; --hint_layer and --ickd_kernel have their choices)."""
    unchecked = {"seed", "synthetic_seed", "hint_layer", "ickd_kernel", "trial"}
    for parser in (train_student.build_parser(), train_teacher.build_parser()):
        for action in parser._actions:  # noqa: SLF001
            if action.type in (float, int):
                assert action.dest in unchecked, f"{action.option_strings} has an unchecked type={action.type.__name__}"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "1e39", "-3.5e38"])
def test_every_float_flag_refuses_non_finite_values(value, capsys):
    """Every float flag of both scripts (whatever its range) refuses NaN and infinities, and
    values beyond float32's range (training computes with float32)."""
    for parse, base, parser in ((train_student.parse_option, STUDENT, train_student.build_parser()),
                                (train_teacher.parse_option, TEACHER, train_teacher.build_parser())):
        floats = [a for a in parser._actions if hasattr(a.type, "wanted") and "number" in a.type.wanted]  # noqa: SLF001
        assert len(floats) >= (20 if parse is train_student.parse_option else 5)
        for action in floats:
            line = parse_error(parse, base + given(action.option_strings[-1], value), capsys)
            assert action.option_strings[-1] in line and "finite" in line, line
            if value == "1e39" and " in " not in action.type.wanted:  # no upper bound of its own: float32's
                assert FLOAT32 in line, line


FLOAT32 = "that float32 holds (|x| <= 3.403e+38)"
TINY = "which is 0 in float32 (its smallest positive number is 1.401e-45)"


@pytest.mark.parametrize("args, line", [
    (["--learning_rate", "1e300"], f"--learning_rate: expected a finite number > 0 {FLOAT32}, got '1e300'"),
    (["-b", "1e39"], f"-b/--beta: expected a finite number >= 0 {FLOAT32}, got '1e39'"),
    (["--nce_t", "1e-50"], f"--nce_t: expected a finite number > 0, got '1e-50', {TINY}"),
    (["--kd_T", "1e-46"], f"--kd_T: expected a finite number > 0, got '1e-46', {TINY}"),
    (["--weight_decay=-1e300"], "--weight_decay: expected a finite number >= 0, got '-1e300'"),
    (["--dcd_init_tau=-1e300"], f"--dcd_init_tau: expected a finite number {FLOAT32}, got '-1e300'"),
    (["--momentum", "0.99999999999"], "--momentum: expected a finite number in [0, 1), got '0.99999999999', which "
                                      "is 1 in float32"),
    (["--dist_timeout", "1e300"], "--dist_timeout: expected a finite number in [1.66667e-05, 1.44e+12], got '1e300'"),
    (["--dist_timeout", "1e-300"], "--dist_timeout: expected a finite number in [1.66667e-05, 1.44e+12], got "
                                   "'1e-300'"),
], ids=["lr", "beta", "nce_t", "kd_T", "weight_decay", "dcd_init_tau", "momentum", "timeout-big", "timeout-tiny"])
def test_floats_beyond_the_range_of_the_type_they_are_used_in(args, line, capsys):
    """Floats become float32 in training (--dist_timeout a timedelta in milliseconds): a value
    that type cannot hold, or that it rounds out of the flag's range, is refused at parsing."""
    assert parse_error(train_student.parse_option, STUDENT + args, capsys) == f"error: argument {line} (see --help)"


def test_values_float32_holds_are_accepted():
    opt = train_student.parse_option(STUDENT + ["--learning_rate", "1e-4", "--weight_decay", "1e-50", "-b", "3.4e38",
                                                "--nce_t", "1e-45", "--momentum", "0.9999999", "--kd_T", "0.05",
                                                "--dcd_init_tau=-3.4e38", "--dist_timeout", "1e12"])
    assert (opt.learning_rate, opt.weight_decay, opt.beta, opt.nce_t) == (1e-4, 1e-50, 3.4e38, 1e-45)
    assert (opt.momentum, opt.kd_T, opt.dcd_init_tau, opt.dist_timeout) == (0.9999999, 0.05, -3.4e38, 1e12)
    assert train_teacher.parse_option(TEACHER + ["--learning_rate", "0.05"]).learning_rate == 0.05


@pytest.mark.numeric
def test_to_float32_rounds_as_torch_does():
    for value in (0.1, 1e-4, 3.4e38, 3.40282356e38, 1e-45, 7.1e-46, 7e-46, 1e-50, 0.99999999999, -2.5e-40):
        assert to_float32(value) == torch.tensor(value, dtype=torch.float32).item(), value
    for value in (3.4028236e38, -1e39, 1e300):
        assert to_float32(value) is None and torch.isinf(torch.tensor(value, dtype=torch.float32)), value
    assert to_float32(FLOAT32_MAX) == torch.finfo(torch.float32).max and FLOAT32_TINY == 2.0**-149


def test_a_float_flag_without_a_checked_type_is_still_refused_when_not_finite(capsys):
    parser = Parser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--sizes", type=float, nargs="*", default=[])
    assert parser.parse_args(["--scale", "2.5"]).scale == 2.5
    for args, name in ((["--scale", "nan"], "--scale"), (["--sizes", "1", "inf"], "--sizes"),
                       (["--scale=-inf"], "--scale")):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(args)
        assert stop.value.code == 2
        assert f"error: argument {name}: expected a finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--scale", "1e39"])  # finite, but beyond float32
    assert capsys.readouterr().err == ("error: argument --scale: expected a finite number that float32 holds "
                                       "(|x| <= 3.403e+38), got 1e+39 (see --help)\n")


def test_type_functions_directly():
    between = float_in(0.0, 1.0, high_open=True)
    assert between("0") == 0.0 and between("0.999") == 0.999
    for bad in ("1", "-1e-9", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            between(bad)
    assert int_at_least(2)("2") == 2
    with pytest.raises(argparse.ArgumentTypeError, match="integer >= 2"):
        int_at_least(2)("1")
    assert path_part("run-1.5_b") == "run-1.5_b"


# --trial becomes the last part of the run folder's name: no path separators, no NUL.
@pytest.mark.parametrize("trial, shown", [("../../x", "'/'"), ("a\\b", "'\\\\'"), ("a\0b", "'\\x00'")],
                         ids=["slash", "backslash", "nul"])
def test_trial_with_path_separators_is_refused(trial, shown, capsys):
    line = parse_error(train_student.parse_option, STUDENT + ["--trial", trial], capsys)
    assert "argument --trial:" in line and "run folder" in line and shown in line, line


def test_trial_escaping_the_save_folder_is_refused_by_the_real_script(tmp_path):
    save = tmp_path / "save" / "inner"
    out = subprocess.run([sys.executable, "train_student.py", *STUDENT, "--trial", "../../x",
                          "--save_folder", str(save)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "argument --trial:" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not any(tmp_path.rglob("*")), "nothing is written"
