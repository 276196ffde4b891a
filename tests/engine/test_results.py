"""results.json has one schema (engine/results.py): what real runs write (a teacher stopped by
--max_steps and resumed, chosen on held-out images; a student with an init stage; a linear probe)
matches it field by field, and the check finds what does not."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.results import F, RESULTS_VERSION, V0_RESUMABLE, Results, problems
from tests.datagen import SYNTHETIC
import train_student
import train_teacher
import transfer_student

ROOT = Path(__file__).resolve().parents[2]
DATA = SYNTHETIC
STEPS_PER_EPOCH = 8  # 64 images, batch 8 (56 with --val_split 8: 7)


def read(folder: Path) -> dict:
    (path,) = folder.glob("*/results.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """The results.json of each kind of run, by name."""
    root = tmp_path_factory.mktemp("runs")
    teacher = ["--model", "resnet8", *DATA, "--epochs", "2", "--val_split", "8", "--save_folder", str(root / "t")]
    train_teacher.main(teacher + ["--max_steps", "3"])
    found = {"stopped": read(root / "t")}
    train_teacher.main(teacher + ["--print_freq", "5", "--resume", "auto"])
    found["resumed"] = read(root / "t")
    (path_t,) = (root / "t").glob("*/resnet8_last.pth")
    train_student.main(["--path_t", str(path_t), "--model_s", "resnet8", "--distill", "fsp", "-a", "0.5", *DATA,
                        "--epochs", "1", "--init_epochs", "1", "--save_folder", str(root / "s")])
    found["student"] = read(root / "s")
    (path_s,) = (root / "s").glob("*/resnet8_last.pth")
    transfer_student.main(["--path_s", str(path_s), *DATA, "--epochs", "1", "--save_folder", str(root / "p")])
    found["probe"] = read(root / "p")
    return found


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["stopped", "resumed", "student", "probe"])
def test_a_real_runs_results_json_matches_the_schema(runs, name):
    results = runs[name]
    assert problems(results) == []
    assert results[F.results_version] == RESULTS_VERSION
    # every option a version-0 reader took as resumable is still declared so, and only options are listed
    assert set(results[F.resumable]) >= V0_RESUMABLE & set(results[F.args])
    assert set(results[F.resumable]) <= set(results[F.args])


@pytest.mark.e2e
def test_the_runs_cover_the_fields_a_run_can_write(runs):
    stopped, resumed, student, probe = (runs[k] for k in ("stopped", "resumed", "student", "probe"))
    assert stopped[F.status] == "stopped" and "--max_steps 3" in stopped[F.stopped_by]
    assert resumed[F.status] == "finished" and resumed[F.resumed] == 1 and resumed[F.selection] == "val"
    assert resumed[F.sessions][1]["changed"]["--print_freq"] == [100, 5]
    assert student[F.label] == "fsp+kd" and student["init_history"] and student[F.stages]
    assert student[F.teachers] and isinstance(student[F.teacher_acc], float)
    assert probe[F.role] == "transfer" and probe[F.source]["label"] == "fsp+kd"


def test_the_check_names_what_does_not_match(runs):
    bad = {**runs["student"], "best_acc": "high", "new_field": 1, "history": [{"epoch": 1.5, "loss_kd": 0.1}],
           "weights": {"gamma": 1.0}, "status": "done", "init_history": [{"init_epoch": 1, "init_oops": 2}]}
    found = "\n".join(problems(bad))
    for line in ("results.json.best_acc: 'high' is not", "results.json.new_field: not declared in Results",
                 "results.json.history[0].epoch: 1.5 is not int", "results.json.weights: no alpha",
                 "results.json.status: 'done' is not one of", "results.json.init_history[0].init_oops: not declared"):
        assert line in found
    assert "loss_kd" not in found and "init_epoch" not in found   # declared by pattern


def test_field_names_are_the_schemas():
    assert F.best_acc == "best_acc" and F.results_version == "results_version"
    with pytest.raises(AttributeError, match="declares no field 'best_accuracy'"):
        F.best_accuracy  # noqa: B018
    assert "best_acc" in Results.__annotations__


def test_the_schema_and_summarize_import_no_torch():
    code = ("import sys; sys.path.insert(0, 'scripts'); import summarize, engine.results; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_students_label_is_what_its_method_says():
    """The paper's row name of a student run: ``+kd`` when -a > 0 adds KD to another method's loss;
    KD says that -a weighs its own loss (Distiller.kd_is_own_loss), so its runs stay ``kd``."""
    from engine.methods import get_method

    assert get_method("crd").run_label(0.8) == "crd+kd"
    assert get_method("crd").run_label(0.0) == get_method("crd").run_label(None) == "crd"
    assert get_method("kd").run_label(0.9) == "kd"
    assert get_method("dkd").run_label(1.0) == "dkd+kd"
