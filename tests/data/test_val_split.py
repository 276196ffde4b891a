"""--val_split N: training images held out (class-balanced, the same for every seed, never trained
on) to choose the best checkpoint without looking at the test set."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint
from dataset import DataOptions, get_dataloaders
import train_teacher

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import summarize  # noqa: E402

CLASSES, PER_CLASS, HELD = 4, 16, 8
SYNTH = dict(dataset="synthetic", synthetic_classes=CLASSES, synthetic_train=PER_CLASS, synthetic_test=4,
             batch_size=8)
TINY = ["--dataset", "synthetic", "--synthetic_classes", str(CLASSES), "--synthetic_train", str(PER_CLASS),
        "--synthetic_test", "4", "--batch_size", "8", "--device", "cpu", "--model", "resnet8"]


def rows(seed: int, **more) -> tuple[list[int], list[int], torch.Tensor]:
    """(training rows, held-out rows, held-out labels) of the torchvision pipeline."""
    bundle = get_dataloaders(DataOptions(**SYNTH, loader="torchvision", num_workers=0, val_split=HELD, seed=seed,
                                         **more))
    held = bundle.holdout_loader.dataset
    return bundle.train_loader.dataset.indices, held.indices, torch.tensor([held.base.targets[i] for i in held.indices])


def test_held_out_images_are_balanced_disjoint_and_seed_independent():
    train_1, held_1, labels = rows(seed=1)
    train_2, held_2, _ = rows(seed=2)
    assert held_1 == held_2 and len(held_1) == HELD
    assert torch.bincount(labels, minlength=CLASSES).tolist() == [HELD // CLASSES] * CLASSES
    assert sorted(train_1 + held_1) == list(range(CLASSES * PER_CLASS))  # disjoint, nothing lost
    # --subset draws from the rows left (with the run's seed); the held-out rows stay the same
    sub_train, sub_held, _ = rows(seed=3, subset=20)
    assert sub_held == held_1 and len(sub_train) == 20 and not set(sub_train) & set(held_1)


def test_tensor_pipeline_holds_out_the_same_images_with_the_test_transform():
    _, held, _ = rows(seed=1)
    bundle = get_dataloaders(DataOptions(**SYNTH, val_split=HELD, seed=1))
    assert bundle.n_data == CLASSES * PER_CLASS - HELD and len(bundle.train_labels) == bundle.n_data
    images = torch.cat([img for img, _ in bundle.holdout_loader])
    twice = torch.cat([img for img, _ in bundle.holdout_loader])
    assert torch.equal(images, twice)  # no augmentation
    folder = get_dataloaders(DataOptions(**SYNTH, loader="torchvision", num_workers=0, val_split=HELD, seed=1))
    expected = torch.cat([img for img, _ in folder.holdout_loader])
    assert images.shape == (HELD, 3, 32, 32)
    assert float((images - expected).abs().max()) < 1e-5 * max(1.0, float(expected.abs().max()))


def test_default_builds_no_holdout():
    assert get_dataloaders(DataOptions(**SYNTH, seed=1)).holdout_loader is None


@pytest.fixture(scope="module")
def val_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    results = train_teacher.main(TINY + ["--epochs", "3", "--val_split", str(HELD), "--save_folder", str(folder),
                                         "--learning_rate", "0.1"])
    return results, next(folder.iterdir())


def test_best_checkpoint_is_chosen_on_the_held_out_images(val_run):
    results, folder = val_run
    history = results["history"]
    assert len(history) == 3 and all({"val_acc", "val_acc_top5", "val_loss", "test_acc"} <= set(h) for h in history)
    best_val = max(h["val_acc"] for h in history)
    chosen = next(h for h in history if h["val_acc"] == best_val)  # the first epoch reaching it
    assert results["selection"] == "val" and results["val_split"] == HELD
    assert results["best_val_epoch"] == chosen["epoch"] and results["best_val_acc"] == best_val
    assert results["best_val_test_acc"] == chosen["test_acc"]
    assert results["best_acc"] == max(h["test_acc"] for h in history)  # best-on-test, labelled as such
    assert results["last_acc"] == history[-1]["test_acc"]
    best = load_checkpoint(folder / "resnet8_best.pth")
    assert best["epoch"] == chosen["epoch"] and best["accuracy"] == chosen["test_acc"]
    on_disk = json.loads((folder / "results.json").read_text())
    assert on_disk["best_val_epoch"] == chosen["epoch"]


def test_resume_refuses_another_val_split(val_run, capsys):
    _, folder = val_run
    with pytest.raises(SystemExit) as exit_:
        train_teacher.main(TINY + ["--epochs", "4", "--val_split", "4", "--save_folder", str(folder.parent),
                                   "--learning_rate", "0.1", "--resume", "auto"])
    assert exit_.value.code == 2
    assert f"--val_split {HELD} -> 4" in capsys.readouterr().err


def test_summarize_says_which_selection_its_best_column_used(val_run, tmp_path):
    results, folder = val_run
    run = summarize.load_run(folder / "results.json")
    assert run.selection == "val" and run.best_acc == results["best_val_test_acc"]
    plain = dict(results, selection=None, best_acc=12.5)
    (tmp_path / "results.json").write_text(json.dumps(plain))
    other = summarize.load_run(tmp_path / "results.json")
    assert other.selection == "test" and other.best_acc == 12.5
    _, notes = summarize.select_runs([run, other], None, False)
    assert any("--val_split" in note and "1 of the 2" in note for note in notes)
    _, notes = summarize.select_runs([other], None, False)
    assert not any("--val_split" in note for note in notes)
