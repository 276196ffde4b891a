"""--split unlabeled: distillation without labels (no cross-entropy, label-based methods refused,
the student gets the teacher's classes, CRD's negatives drawn uniformly from all other samples)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.errors import UserError
from crd.crcd import CRCDOptions
from crd.options import NCEOptions
from dataset.loaders import balanced_subset
from dataset.sampling import ContrastSampler, own_classes
from engine.methods import get_method, method_names  # with every method registered (crd's too)
from models import build_model
import train_student
import train_teacher

ROOT = Path(__file__).resolve().parents[2]
TEACHER_CLASSES = 4
DATA = ["--dataset", "synthetic", "--synthetic_classes", str(TEACHER_CLASSES), "--synthetic_train", "16",
        "--synthetic_test", "4", "--batch_size", "8", "--device", "cpu", "--epochs", "1", "--max_steps", "2"]
TINY = DATA + ["--nce_k", "12", "--model_s", "resnet8"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A checkpoint of ours: a resnet8 of the synthetic set's 4 classes (untrained is enough)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet8_last.pth"
    torch.save({"model": build_model("resnet8", num_classes=TEACHER_CLASSES).state_dict(), "arch": "resnet8",
                "num_classes": TEACHER_CLASSES}, path)
    return path


def test_crd_distils_without_labels(teacher, tmp_path, capsys):
    results = train_student.main(["--path_t", str(teacher), "--distill", "crd", "--split", "unlabeled",
                                  "--save_folder", str(tmp_path)] + TINY)
    out = capsys.readouterr().out
    assert "--split unlabeled: no labels, so no cross-entropy term (-r 0)" in out
    assert results["steps"] == 2 and results["weights"]["gamma"] == 0
    record = results["history"][0]
    assert "loss_ce" not in record and record["loss_crd"] > 0
    # the unlabelled set has the teacher's classes here: the student is tested as usual
    assert "selection" not in results and results["last_acc"] is not None
    folder = next(tmp_path.iterdir())
    assert "_r:0_" in folder.name and folder.name.endswith("_split:unlabeled_1")
    # the labelled run of the same flags (-r 0 given) gets a folder of its own
    train_student.main(["--path_t", str(teacher), "--distill", "crd", "-r", "0", "--save_folder", str(tmp_path)]
                       + TINY)
    assert len(list(tmp_path.iterdir())) == 2
    state = load_checkpoint(folder / "resnet8_last.pth")
    assert state["num_classes"] == TEACHER_CLASSES
    assert state["model"]["fc.weight"].shape[0] == TEACHER_CLASSES


def test_student_gets_the_teachers_classes_and_is_not_tested_on_other_classes(teacher, tmp_path, capsys):
    # a test set of 5 classes, a teacher of 4: the test top-1 would mean nothing
    args = [a if a != str(TEACHER_CLASSES) else "5" for a in TINY]
    results = train_student.main(["--path_t", str(teacher), "--distill", "crd", "--split", "unlabeled",
                                  "--save_folder", str(tmp_path)] + args)
    assert "not tested" in capsys.readouterr().out
    assert results["selection"] == "last" and results["last_acc"] is None and results["best_acc"] is None
    assert results["teacher_acc"] is None and "transfer_student.py" in results["evaluation"]
    assert "test_acc" not in results["history"][0]
    folder = next(tmp_path.iterdir())
    assert not (folder / "resnet8_best.pth").exists()
    state = load_checkpoint(folder / "resnet8_last.pth")
    assert state["num_classes"] == TEACHER_CLASSES and state["model"]["fc.weight"].shape[0] == TEACHER_CLASSES


def script(name: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / name), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def assert_refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0]


def test_cross_entropy_refused(teacher, tmp_path):
    proc = script("train_student.py", ["--path_t", str(teacher), "--distill", "crd", "--split", "unlabeled",
                                       "-r", "1", "--save_folder", str(tmp_path)] + TINY)
    assert_refused(proc, "-r 1", "no cross-entropy")
    assert not any(tmp_path.iterdir())


def test_train_teacher_refuses_unlabeled(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_teacher.main(["--model", "resnet8", "--split", "unlabeled", "--save_folder", str(tmp_path)] + DATA)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --split unlabeled") and "needs labels" in err[0]


@pytest.mark.parametrize("args, words", [
    (["--distill", "dkd"], ["--distill dkd needs labels", "labelled class"]),
    (["--distill", "crd", "--mode", "relax"], ["--distill crd needs labels", "--mode relax"]),
    (["--distill", "wcord", "--mode", "relax"], ["--distill wcord needs labels", "--mode relax"]),
    (["--distill", "crcd"], ["--distill crcd needs labels", "--crcd_grad_weight 0"]),
])
def test_more_label_based_methods_refused(args, words, teacher, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_student.main(["--path_t", str(teacher), "--split", "unlabeled", "--save_folder", str(tmp_path)]
                           + args + TINY)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(word in err[0] for word in words)
    assert not any(tmp_path.iterdir())


def test_label_need_is_declared_on_the_contract():
    needing = {name for name in method_names()
               if get_method(name).label_need(get_method(name).Options()) is not None}
    assert needing == {"dkd", "crcd"}
    assert get_method("crcd").label_need(CRCDOptions(crcd_grad_weight=0)) is None
    assert get_method("crd").label_need(NCEOptions(mode="relax")) is not None
    assert get_method("crd").label_need(NCEOptions(mode="exact")) is None


def test_own_classes():
    assert own_classes(torch.tensor([-1, -1, -1])).tolist() == [0, 1, 2]
    assert own_classes(torch.tensor([1, -1, 0, -1])).tolist() == [1, 2, 0, 3]
    assert own_classes(torch.tensor([2, 0])).tolist() == [2, 0]


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_sampler_without_labels_draws_uniform_negatives(mode):
    n, k, draws = 40, 10, 600
    labels = torch.full((n,), -1)
    sampler = ContrastSampler(labels, k, mode)
    gen = torch.Generator().manual_seed(0)
    index = torch.zeros(draws, dtype=torch.long)  # anchor 0, many times
    # the batch's labels (-1) are given, as the loaders do: they must not be read as a class
    idx = sampler(index, torch.full((draws,), -1), generator=gen)
    assert idx.shape == (draws, k + 1)
    assert torch.equal(idx[:, 0], index)  # the positive is the sample itself, in either mode
    negatives = idx[:, 1:]
    assert bool((negatives != 0).all())
    assert all(len(set(row.tolist())) == k for row in negatives)
    counts = torch.bincount(negatives.flatten(), minlength=n)[1:].double()
    expected = draws * k / (n - 1)  # about 154 for each of the 39 others
    assert counts.sum() == draws * k
    # binomial spread: sd ~ 11; 5 sd either way
    assert float((counts - expected).abs().max()) < 5 * (expected * (1 - k / (n - 1))) ** 0.5
    # a whole batch: no row ever draws its own anchor
    rows = sampler(torch.arange(n), generator=gen)
    assert bool((rows[:, 1:] != torch.arange(n)[:, None]).all())


def test_sampler_without_labels_refuses_too_many_negatives():
    with pytest.raises(UserError, match="--nce_k 9 or less"):
        ContrastSampler(torch.full((10,), -1), 10)


def test_subset_of_an_unlabelled_set_is_uniform():
    labels = torch.full((20,), -1)
    hits = torch.zeros(20)
    for seed in range(400):
        chosen = balanced_subset(labels, 5, seed)
        assert len(set(chosen.tolist())) == 5 and torch.equal(chosen, chosen.sort().values)
        hits[chosen] += 1
    # each sample is in a subset with probability 1/4: 100 of 400, sd ~ 8.7
    assert float((hits - 100).abs().max()) < 45
