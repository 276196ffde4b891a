"""A resume continues the same run or nothing: settings that shape training must match the
checkpoint's, results.json says what each epoch ran with, an epoch cut by --max_steps is finished
by the resume, and a new run never overwrites another run's folder."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.datagen import SYNTHETIC
import train_student
import train_teacher

DATA = SYNTHETIC
TEACHER = ["--model", "resnet8", *DATA]
STEPS_PER_EPOCH = 8  # 64 images, batch 8


def only_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    """The run's files and their contents (the lock file names the last process that held the folder)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def teachers(teacher, tmp_path_factory) -> tuple[Path, Path]:
    """Two resnet8 teachers with different weights (trials 0 and 1): the session's and one more."""
    folder = tmp_path_factory.mktemp("teachers")
    train_teacher.main(TEACHER + ["--epochs", "1", "--trial", "1", "--save_folder", str(folder)])
    return teacher, next(folder.glob("*/resnet8_last.pth"))


@pytest.fixture(scope="module")
def student_run(teachers, tmp_path_factory) -> tuple[list[str], Path]:
    """A CRD student stopped after epoch 1 of 2: its flags (without --save_folder) and save folder."""
    save = tmp_path_factory.mktemp("student")
    args = ["--path_t", str(teachers[0]), "--model_s", "resnet8", "--distill", "crd", "--nce_k", "16", *DATA,
            "--epochs", "2"]
    train_student.main(args + ["--save_folder", str(save), "--max_steps", str(STEPS_PER_EPOCH)])
    return args, save


@pytest.mark.parametrize("change, listed", [
    (["--learning_rate", "0.1"], ["--learning_rate 0.05 -> 0.1"]),
    (["--lr_decay_epochs", "1", "--lr_schedule", "cosine"],
     ["--lr_decay_epochs 150,180,210 -> 1", "--lr_schedule step -> cosine"]),
    (["--nce_k", "32", "--nce_t", "0.1", "--mode", "relax"],
     ["--nce_k 16 -> 32", "--nce_t 0.07 -> 0.1", "--mode exact -> relax"]),
    (["--amp", "bf16"], ["--amp off -> bf16"]),
    (["--batch_size", "16"], ["--batch_size 8 -> 16"]),
    (["--seed", "7"], ["--seed 1 -> 7"]),
], ids=["lr", "schedule", "nce", "amp", "batch_size", "seed"])
def test_resume_with_other_settings_is_refused_with_the_differences(student_run, change, listed, capsys):
    args, save = student_run
    (folder,) = save.iterdir()
    before = digests(folder)
    with pytest.raises(SystemExit) as stop:
        train_student.main(args + change + ["--save_folder", str(save), "--resume", str(folder / "resnet8_last.pth")])
    line = only_error_line(capsys)
    assert stop.value.code == 2 and "was made with other settings" in line
    assert all(item in line for item in listed), line
    assert digests(folder) == before


def test_another_teacher_or_another_method_is_refused(student_run, teachers, capsys):
    args, save = student_run
    (folder,) = save.iterdir()
    other_teacher = [a if a != str(teachers[0]) else str(teachers[1]) for a in args]
    with pytest.raises(SystemExit):  # same architecture, so the same run folder: found by --resume auto
        train_student.main(other_teacher + ["--save_folder", str(save), "--resume", "auto"])
    assert "the teacher's weights" in only_error_line(capsys)
    other_method = [a if a != "crd" else "attention" for a in args]
    with pytest.raises(SystemExit):
        train_student.main(other_method + ["--save_folder", str(save), "--resume", str(folder / "resnet8_last.pth")])
    assert "--distill crd -> attention" in only_error_line(capsys)


def rewrite_options(path: Path, **options) -> None:
    """Change what the checkpoint at ``path`` records of its run's options."""
    state = torch.load(path, weights_only=True)
    state["resume"]["options"].update(options)
    torch.save(state, path)


def test_the_data_and_teachers_found_must_be_found_again(teachers, tmp_path, capsys):
    """The training set's size, the number of classes and the teachers' architectures are not
    flags but what the run found: checkpoints record them under the names earlier versions used
    (which wrote them into ``opt``), so those checkpoints resume, and a resume finding others is refused."""
    args = ["--path_t", str(teachers[0]), "--model_s", "resnet8", "--distill", "kd", *DATA, "--epochs", "2",
            "--save_folder", str(tmp_path)]
    train_student.main(args + ["--max_steps", str(STEPS_PER_EPOCH)])
    (last,) = tmp_path.glob("*/resnet8_last.pth")
    saved = torch.load(last, weights_only=True)["resume"]["options"]
    assert (saved["n_data"], saved["num_classes"], saved["model_t"]) == (64, 4, "resnet8")
    original = last.read_bytes()
    for key, other, listed in [("n_data", 100, "the training set's size 100 -> 64"),
                               ("num_classes", 5, "the number of classes 5 -> 4"),
                               ("model_t", "resnet14", "the teacher's architecture resnet14 -> resnet8")]:
        rewrite_options(last, **{key: other})
        with pytest.raises(SystemExit) as stop:
            train_student.main(args + ["--resume", "auto"])
        line = only_error_line(capsys)
        assert stop.value.code == 2 and "was made with other settings" in line and listed in line, line
        last.write_bytes(original)
    results = train_student.main(args + ["--resume", "auto"])
    assert results["status"] == "finished" and [h["epoch"] for h in results["history"]] == [1, 2]
    assert results["sessions"][1]["changed"] == {"--max_steps": [STEPS_PER_EPOCH, 0]}


def test_a_teacher_resume_must_find_the_same_number_of_classes(tmp_path, capsys):
    args = TEACHER + ["--epochs", "2", "--save_folder", str(tmp_path)]
    train_teacher.main(args + ["--max_steps", str(STEPS_PER_EPOCH)])
    (last,) = tmp_path.glob("*/resnet8_last.pth")
    assert torch.load(last, weights_only=True)["resume"]["options"]["num_classes"] == 4
    rewrite_options(last, num_classes=5)
    with pytest.raises(SystemExit):
        train_teacher.main(args + ["--resume", "auto"])
    assert "the number of classes 5 -> 4" in only_error_line(capsys)


def test_flags_that_cannot_change_the_result_may_change_and_are_recorded(teachers, tmp_path, capsys):
    args = ["--path_t", str(teachers[0]), "--model_s", "resnet8", "--distill", "kd", *DATA, "--epochs", "2",
            "--save_folder", str(tmp_path)]
    train_student.main(args + ["--max_steps", str(STEPS_PER_EPOCH)])
    # a copy of the teacher elsewhere: another --path_t, the same weights
    moved = tmp_path / "elsewhere" / "resnet8_vanilla" / "teacher.pth"
    moved.parent.mkdir(parents=True)
    moved.write_bytes(teachers[0].read_bytes())
    changed = [a if a != str(teachers[0]) else str(moved) for a in args]
    results = train_student.main(changed + ["--epochs", "3", "--print_freq", "4", "--resume", "auto"])
    assert "resuming from" in capsys.readouterr().out
    assert results["status"] == "finished" and [h["epoch"] for h in results["history"]] == [1, 2, 3]
    assert [h["session"] for h in results["history"]] == [0, 1, 1]
    first, second = results["sessions"]
    assert first["start_epoch"] == 1 and first["changed"] == {}
    assert second["start_epoch"] == 2 and second["steps_before"] == STEPS_PER_EPOCH
    assert second["changed"] == {"--epochs": [2, 3], "--print_freq": [100, 4], "--max_steps": [8, 0],
                                 "--path_t": [str(teachers[0]), str(moved)]}
    assert "--resume" in second["command"]


def test_epochs_of_a_cosine_schedule_cannot_change(tmp_path, capsys):
    args = TEACHER + ["--epochs", "2", "--lr_schedule", "cosine", "--save_folder", str(tmp_path)]
    train_teacher.main(args + ["--max_steps", str(STEPS_PER_EPOCH)])
    with pytest.raises(SystemExit):
        train_teacher.main(args + ["--epochs", "3", "--resume", "auto"])
    assert "--epochs 2 -> 3 (it sets every epoch's learning rate under --lr_schedule cosine)" in only_error_line(capsys)


def test_epoch_cut_by_max_steps_is_finished_by_the_resume(tmp_path):
    args = TEACHER + ["--epochs", "2", "--deterministic"]
    whole = train_teacher.main(args + ["--save_folder", str(tmp_path / "whole")])
    cut = train_teacher.main(args + ["--save_folder", str(tmp_path / "cut"), "--max_steps", "3"])
    assert cut["status"] == "stopped" and cut["epochs_run"] == 0 and cut["history"][0]["batches"] == 3
    saved = torch.load(next((tmp_path / "cut").glob("*/resnet8_last.pth")))
    assert saved["epoch"] == 0 and saved["resume"]["batches_done"] == 3
    resumed = train_teacher.main(args + ["--save_folder", str(tmp_path / "cut"), "--resume", "auto"])
    assert resumed["status"] == "finished" and resumed["steps"] == whole["steps"] == 2 * STEPS_PER_EPOCH
    assert [h["epoch"] for h in resumed["history"]] == [1, 2] and not any(h.get("partial") for h in resumed["history"])
    for key in ("train_loss", "test_acc", "test_loss"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in whole["history"]], key
    a = torch.load(next((tmp_path / "whole").glob("*/resnet8_last.pth")))["model"]
    b = torch.load(next((tmp_path / "cut").glob("*/resnet8_last.pth")))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_run_never_overwrites_another_runs_folder(tmp_path, capsys):
    args = TEACHER + ["--epochs", "1", "--save_folder", str(tmp_path)]
    train_teacher.main(args)
    (folder,) = tmp_path.iterdir()
    before = digests(folder)
    with pytest.raises(SystemExit) as stop:
        train_teacher.main(args)
    line = only_error_line(capsys)
    assert stop.value.code == 2 and "already holds a run" in line
    assert "--resume auto" in line and "--overwrite" in line and "--trial" in line
    assert digests(folder) == before
    with pytest.raises(SystemExit):
        train_teacher.main(args + ["--overwrite", "--resume", "auto"])
    assert "contradict" in only_error_line(capsys)
    results = train_teacher.main(args + ["--overwrite", "--epochs", "2", "--save_freq", "2"])
    assert results["status"] == "finished" and "resumed" not in results
    names = {p.name for p in folder.iterdir()}
    assert "ckpt_epoch_2.pth" in names and "ckpt_epoch_1.pth" not in names
    assert len([n for n in names if n.startswith("events.out.tfevents")]) == 1
    assert json.loads((folder / "results.json").read_text())["epochs_run"] == 2


def test_resume_auto_without_a_last_checkpoint_to_continue(tmp_path, capsys):
    args = TEACHER + ["--epochs", "1", "--save_folder", str(tmp_path)]
    train_teacher.main(args)
    (folder,) = tmp_path.iterdir()
    (folder / "resnet8_last.pth").unlink()
    with pytest.raises(SystemExit):
        train_teacher.main(args + ["--resume", "auto"])
    assert "none to continue from" in only_error_line(capsys)


def test_resume_from_elsewhere_never_writes_over_another_run(tmp_path, capsys):
    args = TEACHER + ["--epochs", "2", "--max_steps", str(STEPS_PER_EPOCH)]
    train_teacher.main(args + ["--save_folder", str(tmp_path / "a")])
    train_teacher.main(args + ["--save_folder", str(tmp_path / "b")])
    (elsewhere,) = (tmp_path / "a").glob("*/resnet8_last.pth")
    (folder,) = (tmp_path / "b").iterdir()
    before = digests(folder)
    with pytest.raises(SystemExit):
        train_teacher.main(args + ["--save_folder", str(tmp_path / "b"), "--resume", str(elsewhere)])
    assert "holds another run's checkpoints" in only_error_line(capsys)
    assert digests(folder) == before
    # into a new folder it continues
    moved = train_teacher.main(args + ["--save_folder", str(tmp_path / "c"), "--resume", str(elsewhere),
                                       "--max_steps", "0"])
    assert moved["status"] == "finished" and [h["epoch"] for h in moved["history"]] == [1, 2]


def test_resume_auto_that_finds_no_run_says_so_and_names_the_closest(student_run, tmp_path, capsys):
    """--resume auto with a flag that names another folder (-a 0.5) starts a new run, and says
    so naming the run folders closest to the one it looked in; in an empty folder it says that."""
    args, save = student_run
    (existing,) = [p.name for p in save.iterdir()]
    capsys.readouterr()
    results = train_student.main(args + ["--save_folder", str(save), "--resume", "auto", "-a", "0.5",
                                         "--max_steps", "1"])
    assert results["steps"] == 1 and "resumed" not in results
    out = capsys.readouterr().out
    wanted = existing.replace("_a:0.0_", "_a:0.5_")
    assert (f"note: --resume auto: no run folder {wanted} in {save}, so a new run starts; the closest run folders "
            f"there: {existing} (give the flags that name one of them to continue it)") in out, out
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a run")
    from engine.resume import no_run_to_resume
    assert no_run_to_resume(empty) == f"note: --resume auto: no checkpoint to continue in {empty}; a new run starts there"
    assert no_run_to_resume(tmp_path / "none") == f"note: --resume auto: no run folder none in {tmp_path}, so a new run starts"


def test_flags_declared_resumable_where_they_are_declared_may_change(teachers, tmp_path):
    """A method's (--nce_scores), the data's (--num_workers), the runtime's (--deterministic), the
    loop's (--tb_freq) and the script's own (--plain_teacher) flags say at their declaration that a
    resume may change them: the resume continues and records the changes."""
    args = ["--path_t", str(teachers[0]), "--model_s", "resnet8", "--distill", "crd", "--nce_k", "16", *DATA,
            "--epochs", "2", "--save_folder", str(tmp_path)]
    train_student.main(args + ["--max_steps", str(STEPS_PER_EPOCH)])
    results = train_student.main(args + ["--nce_scores", "gather", "--num_workers", "1", "--deterministic",
                                         "--tb_freq", "3", "--plain_teacher", "--resume", "auto"])
    assert results["status"] == "finished" and [h["epoch"] for h in results["history"]] == [1, 2]
    assert results["sessions"][1]["changed"] == {
        "--nce_scores": ["auto", "gather"], "--num_workers": [0, 1], "--deterministic": [False, True],
        "--tb_freq": [500, 3], "--plain_teacher": [False, True], "--max_steps": [STEPS_PER_EPOCH, 0]}


def test_the_scripts_options_that_a_resume_may_change():
    """What each script's parser declares resumable (and records on the options it parses), with
    the values a script records beside its options, holds every option an older version let a
    resume change; an option() field says it with resumable=True, an add_argument flag with resumable()."""
    import argparse
    from dataclasses import dataclass

    from common.declare import add_option_group, option, resumable, resumable_options
    from engine.results import V0_RESUMABLE
    from engine.run_flags import RECORDED, free_flags

    for script, argv in ((train_student, ["--path_t", "t.pth"]), (train_teacher, [])):
        parser = script.build_parser()
        opt = parser.parse_args(argv)
        assert free_flags(opt) == resumable_options(parser) | RECORDED
        assert V0_RESUMABLE & set(vars(opt)) <= free_flags(opt)
    assert {"nce_scores", "plain_teacher", "path_t"} <= resumable_options(train_student.build_parser())
    assert not {"nce_k", "learning_rate", "distill", "batch_size"} & resumable_options(train_student.build_parser())

    @dataclass
    class Group:
        """a group"""
        fast: bool = option(False, "same numbers, faster", resumable=True)
        size: int = option(3, "a size")

    parser = argparse.ArgumentParser()
    add_option_group(parser, Group)
    resumable(parser.add_argument("--every", type=int, default=1))
    parser.add_argument("--other", type=int, default=1)
    assert resumable_options(parser) == {"fast", "every"}
