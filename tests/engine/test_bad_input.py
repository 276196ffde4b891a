"""Bad input ends with one clear line on stderr, ``error: ...`` saying what to do, exit status 2
and no traceback (DESIGN.md, "reliability"): unknown names, teacher checkpoints, a loss that blows
up. The cases of data folders and of methods are tests/data/test_bad_data_folder.py and
tests/methods/test_bad_method_input.py, with the files, cases and fixtures of this module.

Cases that fail while the flags are read call the script's ``main([...])`` in-process. Of the
others, one or more of each kind (REAL_SCRIPT) run the real script as a subprocess; a module's
are all started together by its fixture ``launched`` (two at a time, one torch thread each, as
the machine has two cores) and each test then checks its own run's output.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from dataset import DATASETS
from engine.methods import method_names
from models import build_model, model_dict
import train_student
import train_teacher
import transfer_student

ROOT = Path(__file__).resolve().parents[2]
# Seconds-long runs on a 4-class synthetic set (32 training images: 8 per class, 24 of other classes).
TINY = ["--synthetic_classes", "4", "--synthetic_train", "8", "--synthetic_test", "2", "--subset", "32",
        "--batch_size", "8", "--epochs", "1", "--max_steps", "2", "--num_workers", "0", "--device", "cpu"]
SYNTHETIC = ["--dataset", "synthetic"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def assert_one_error_line(code, stderr: str, *words: str) -> str:
    """Exit status 2, no traceback, and stderr is one line starting ``error:`` holding ``words``."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"
    return lines[0]


def main_error(main: Callable, args: list[str], capsys) -> tuple[int, str]:
    """Run ``main(args)`` in-process; it must exit: its status and its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """One tiny resnet14 teacher trained by train_teacher.py, and the bad files made from it."""
    root = tmp_path_factory.mktemp("bad_input")
    train_teacher.main(["--model", "resnet14", *SYNTHETIC, *TINY, "--save_folder", str(root / "teachers")])
    teacher = next((root / "teachers").glob("resnet14_*/resnet14_last.pth"))
    f = SimpleNamespace(root=root, teacher=teacher, missing=root / "no_such_folder" / "ckpt_epoch_240.pth",
                        text=root / "notes.pth", truncated=root / "truncated.pth", no_model=root / "no_model.pth",
                        empty=root / "empty", students=root / "students")
    f.text.write_text("these are not weights\n")
    data = teacher.read_bytes()
    f.truncated.write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": torch.load(teacher, weights_only=True)["model"]}, f.no_model)
    # resnet8 weights in RepDistiller's layout ({'model': state_dict}, no 'arch') in a resnet14 folder.
    f.wrong_arch = root / "save" / "models" / "resnet14_vanilla" / "ckpt_epoch_240.pth"
    f.wrong_arch.parent.mkdir(parents=True)
    torch.save({"model": build_model("resnet8", num_classes=4).state_dict()}, f.wrong_arch)
    # resnet8 weights (4 classes) with one malformed entry each
    f.bad = {}
    for name, entries in BAD_ENTRIES.items():
        f.bad[name] = root / "bad_entries" / f"{name}.pth"
        f.bad[name].parent.mkdir(exist_ok=True)
        torch.save({"model": build_model("resnet8", num_classes=4).state_dict(), "arch": "resnet8", "num_classes": 4,
                    "view": "rgb", **entries}, f.bad[name])
    f.empty.mkdir()
    return f


def student_args(f: SimpleNamespace, *args: str, path_t: Path | str | None = None) -> list[str]:
    return ["train_student.py", "--path_t", str(path_t or f.teacher), *SYNTHETIC, *TINY, *args,
            "--save_folder", str(f.students)]


def transfer_args(f: SimpleNamespace, path_s: Path) -> list[str]:
    return ["transfer_student.py", "--path_s", str(path_s), *SYNTHETIC, *TINY, "--save_folder", str(f.students)]


# A checkpoint's entries of the wrong type or value (the others as train_teacher.py writes them).
BAD_ENTRIES = {"arch_list": {"arch": ["resnet8"]}, "arch_unknown": {"arch": "resnet9000"},
               "classes_str": {"num_classes": "4"}, "classes_bool": {"num_classes": True},
               "classes_zero": {"num_classes": 0}, "view_unknown": {"view": "xyz"}, "view_int": {"view": 3},
               "dataset_list": {"dataset": ["cifar100"]}}


# Every case with files: id -> the script and its flags (later flags override earlier ones).
CASES: dict[str, Callable[[SimpleNamespace], list[str]]] = {
    "path_t_text": lambda f: student_args(f, path_t=f.text),
    "path_t_truncated": lambda f: student_args(f, path_t=f.truncated),
    "path_t_no_model": lambda f: student_args(f, path_t=f.no_model),
    "path_t_other_arch": lambda f: student_args(f, path_t=f.wrong_arch),
    **{f"path_t_{name}": (lambda f, name=name: student_args(f, path_t=f.bad[name])) for name in BAD_ENTRIES},
    "path_t_ensemble_classes_str": lambda f: student_args(f, path_t=f"{f.teacher},{f.bad['classes_str']}"),
    "path_s_arch_list": lambda f: transfer_args(f, f.bad["arch_list"]),
    "path_s_classes_str": lambda f: transfer_args(f, f.bad["classes_str"]),
    "path_s_view_unknown": lambda f: transfer_args(f, f.bad["view_unknown"]),
    "cifar100_empty": lambda f: student_args(f, "--dataset", "cifar100", "--data_folder", str(f.empty)),
    "imagenet_empty": lambda f: student_args(f, "--dataset", "imagenet", "--data_folder", str(f.empty)),
    "fsp_channels": lambda f: student_args(f, "--distill", "fsp", "--model_s", "wrn_16_2"),
    "kdsvd_channels": lambda f: student_args(f, "--distill", "kdsvd", "--model_s", "wrn_16_2"),
    # CIFAR ResNets, WRNs and ShuffleNets have 4 feature maps, VGGs and MobileNetV2 5; --hint_layer allows 0..4.
    "hint_layer": lambda f: student_args(f, "--distill", "hint", "--model_s", "resnet8", "--hint_layer", "4"),
    "hint_layer_teacher": lambda f: student_args(f, "--distill", "hint", "--model_s", "vgg8", "--hint_layer", "4"),
    "nce_k": lambda f: student_args(f, "--distill", "crd", "--nce_k", "100"),
    "lr_blowup": lambda f: student_args(f, "--distill", "kd", "--learning_rate", "1e20", "--max_steps", "4"),
    "crd_published": lambda f: student_args(f, "--distill", "crd", "--nce_k", "16"),
}
# The ones run as real scripts (subprocesses): at least one of each kind of failure; the other
# cases call main() in-process, the same code without the ~4 s of a fresh interpreter.
REAL_SCRIPT = {"path_t_truncated", "path_t_arch_list", "cifar100_empty", "fsp_channels", "nce_k", "lr_blowup",
               "crd_published"}
MAINS = {"train_student.py": train_student.main, "train_teacher.py": train_teacher.main,
         "transfer_student.py": transfer_student.main}


def launcher(cases: set[str]):
    """The module fixture ``launched`` of a module whose REAL_SCRIPT cases are ``cases``: it starts
    their runs at once, two at a time; ``launched[case]`` is its future."""
    assert cases <= REAL_SCRIPT, cases - REAL_SCRIPT

    @pytest.fixture(scope="module")
    def launched(files):
        def run(args: list[str]) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                                  timeout=300)

        with ThreadPoolExecutor(max_workers=2) as pool:
            yield {case: pool.submit(run, CASES[case](files)) for case in sorted(cases)}

    return launched


launched = launcher({"path_t_truncated", "path_t_arch_list", "lr_blowup"})


@pytest.fixture
def outcome(files, launched, capsys) -> Callable[[str], SimpleNamespace]:
    """``outcome(case)``: the exit status, stdout and stderr of a case of CASES."""
    def get(case: str) -> SimpleNamespace:
        if case in REAL_SCRIPT:
            out = launched[case].result()
            return SimpleNamespace(code=out.returncode, out=out.stdout, err=out.stderr)
        script, *args = CASES[case](files)
        capsys.readouterr()
        try:
            MAINS[script](args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return SimpleNamespace(code=code, out=captured.out, err=captured.err)

    return get


def case_error(outcome, case: str, *words: str) -> str:
    result = outcome(case)
    return assert_one_error_line(result.code, result.err, *words)


# 1. Unknown model: the message lists the valid names.
@pytest.mark.parametrize("main, args", [
    (train_teacher.main, ["--model", "resnet9000"]),
    (train_student.main, ["--path_t", "t.pth", "--model_s", "resnet9000"]),
], ids=["teacher", "student"])
def test_unknown_model_lists_the_models(main, args, capsys):
    code, err = main_error(main, args + SYNTHETIC + TINY, capsys)
    assert_one_error_line(code, err, "unknown model 'resnet9000'", "choose one of:",
                          ", ".join(list(model_dict)[:3]), "wrn_40_2", "ShuffleV2")


# 2. Unknown --distill and --dataset: the message lists the methods / data sets.
@pytest.mark.parametrize("main, args, words", [
    (train_student.main, ["--path_t", "t.pth", "--distill", "magic"] + SYNTHETIC,
     ["unknown --distill 'magic'", "choose one of: " + ", ".join(method_names())]),
    (train_student.main, ["--path_t", "t.pth", "--dataset", "mnist"],
     ["unknown --dataset 'mnist'", ", ".join(DATASETS)]),
    (train_teacher.main, ["--model", "resnet8", "--dataset", "mnist"],
     ["unknown --dataset 'mnist'", ", ".join(DATASETS)]),
], ids=["distill", "dataset-student", "dataset-teacher"])
def test_unknown_method_or_dataset_lists_the_choices(main, args, words, capsys):
    code, err = main_error(main, TINY + args, capsys)
    assert_one_error_line(code, err, *words)


# 3. --path_t: not given, not there (the line says how to get a teacher), a folder, not a checkpoint,
# no 'model', another architecture.
GET_A_TEACHER = ["bash scripts/fetch_pretrained_teachers.sh", "save/models/<model>_vanilla/ckpt_epoch_240.pth",
                 "the folder RepDistiller's scripts expect", "python train_teacher.py --model",
                 "_lr_<lr>_decay_<wd>_trial_<trial>/ckpt_epoch_240.pth"]


@pytest.mark.parametrize("path_t, words", [
    (lambda f: None, ["--path_t is required", *GET_A_TEACHER, "train_teacher.py --model <model>`"]),
    (lambda f: f.missing, ["the teacher checkpoint", "no_such_folder", "does not exist", *GET_A_TEACHER]),
    # a missing file in a RepDistiller folder: the training command names its model
    (lambda f: f.wrong_arch.with_name("ckpt_epoch_100.pth"),
     ["does not exist", *GET_A_TEACHER, "train_teacher.py --model resnet14`", "save/models/resnet14_<dataset>_lr_"]),
    (lambda f: f.empty, ["is a folder", "give the checkpoint file in it"]),
], ids=["not-given", "not-there", "named-model", "folder"])
def test_teacher_path_not_given_or_missing(path_t, words, files, capsys):
    path = path_t(files)
    args = [] if path is None else ["--path_t", str(path)]
    code, err = main_error(train_student.main, args + SYNTHETIC + TINY + ["--save_folder", str(files.students)],
                           capsys)
    assert_one_error_line(code, err, *words)


@pytest.mark.parametrize("case, words", [
    ("path_t_text", ["notes.pth", "not a readable PyTorch checkpoint", "truncated or another kind of file"]),
    ("path_t_truncated", ["truncated.pth", "not a readable PyTorch checkpoint", "truncated"]),
    ("path_t_no_model", ["no_model.pth", "no 'model' entry"]),
    ("path_t_other_arch", ["resnet14_vanilla", "do not fit resnet14", "folder name",
                           "missing: layer1.1.conv1.weight", "another architecture"]),
], ids=["text", "truncated", "no-model", "other-arch"])
def test_teacher_checkpoint_not_usable(case, words, outcome):
    case_error(outcome, case, *words)


# A checkpoint entry of the wrong type or value is blamed on that entry of that file (not on a
# flag, nor reported as a contradiction), for a teacher, one of an ensemble and a probed network.
MALFORMED = "is malformed: it is"
DAMAGED = "use another checkpoint"


@pytest.mark.parametrize("case, words", [
    ("path_t_arch_list", ["'arch' entry of", "arch_list.pth", MALFORMED, "a list (['resnet8'])", "not a model name"]),
    ("path_t_arch_unknown", ["'arch' entry of", "is 'resnet9000', which is not a model name", "resnet32x4"]),
    ("path_t_classes_str", ["'num_classes' entry of", "classes_str.pth", MALFORMED, "a str ('4')", "positive int"]),
    ("path_t_classes_bool", ["'num_classes' entry of", MALFORMED, "a bool (True)"]),
    ("path_t_classes_zero", ["'num_classes' entry of", "is 0, which is not a positive number of classes"]),
    ("path_t_view_unknown", ["'view' entry of", "view_unknown.pth", "is 'xyz', which is not a view",
                             "rgb, gray, L, ab, paired:<name>"]),
    ("path_t_view_int", ["'view' entry of", MALFORMED, "an int (3)"]),
    ("path_t_dataset_list", ["'dataset' entry of", MALFORMED, "a list (['cifar100'])"]),
    ("path_t_ensemble_classes_str", ["'num_classes' entry of", "classes_str.pth", "a str ('4')"]),
    ("path_s_arch_list", ["'arch' entry of", "arch_list.pth", "a list (['resnet8'])"]),
    ("path_s_classes_str", ["'num_classes' entry of", "classes_str.pth", "a str ('4')"]),
    ("path_s_view_unknown", ["'view' entry of", "view_unknown.pth", "is 'xyz', which is not a view"]),
], ids=lambda value: value if isinstance(value, str) else None)
def test_checkpoint_entry_of_the_wrong_type_or_value(case, words, outcome):
    line = case_error(outcome, case, DAMAGED, *words)
    assert "--view" not in line and "classes but" not in line and "no 'arch' entry" not in line, line


# 7. A loss that blows up: the epoch, the step and every term's value.
def test_exploding_loss_stops_with_epoch_step_and_terms(outcome):
    line = case_error(outcome, "lr_blowup", "non-finite", "epoch 1", "step ", "ce=", "kd=", "--learning_rate")
    assert "nan" in line or "inf" in line
