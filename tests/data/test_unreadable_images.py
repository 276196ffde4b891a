"""Unreadable files in an ImageNet folder (truncated JPEG, empty file, text named .JPEG, an image
over PIL's pixel limit) are skipped with one warning per file and counted in results.json; a folder
of unreadable images stops the run with one error line naming it. A paired or Tiny-ImageNet set,
read whole into memory, refuses such a file with one error line instead."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from common.errors import UserError
from dataset import ContrastNeed, DataNeeds, DataOptions, get_dataloaders
from dataset.memory import decode_all
from dataset.paired import open_paired
from dataset.skipping import PartialBatch, SkipUnreadable, Unreadable, pixel_limit_errors
from dataset.tinyimagenet import TinyImageNetFolder
from dataset.tinyimagenet import _open as tinyimagenet_open
from models import build_model
from tests.datagen import write_fake_imagenet, write_fake_tinyimagenet
import train_student
import train_teacher

ROOT = Path(__file__).resolve().parents[2]
# 12 training files (3 unreadable) and a batch of 4: three batches, every file read each epoch
RUN = ["--dataset", "imagenet", "--batch_size", "4", "--epochs", "2", "--device", "cpu", "--model", "resnet8"]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> SimpleNamespace:
    """An ImageNet folder of real JPEGs with three unreadable training files and one unreadable
    validation file."""
    root = write_fake_imagenet(tmp_path_factory.mktemp("imagenet"), classes=3, train_per_class=(4, 3, 3),
                               val_per_class=2, image_size=(40, 32))
    bad = SimpleNamespace(truncated=root / "train" / "n00000000" / "n00000000_1.JPEG",
                          empty=root / "train" / "n00000001" / "empty.JPEG",
                          text=root / "train" / "n00000002" / "notes.JPEG",
                          val=root / "val" / "n00000001" / "n00000001_0.JPEG")
    truncate(bad.truncated)
    bad.empty.write_bytes(b"")
    bad.text.write_text("these are not pixels\n")
    truncate(bad.val)
    return SimpleNamespace(root=root, bad=bad, train_bad=[bad.truncated, bad.empty, bad.text])


def make_opt(root: Path, workers: int, **more) -> DataOptions:
    return DataOptions(dataset="imagenet", data_folder=str(root), download=False, batch_size=4,
                       num_workers=workers, subset=0, seed=0, loader="torchvision", **more)


def test_collate_leaves_unreadable_items_out():
    ok = [(torch.full((3, 2, 2), float(i)), i % 2, i) for i in range(3)]
    gone = Unreadable("/data/train/c/x.JPEG", "OSError: image file is truncated")
    collate = SkipUnreadable(min_size=2)
    whole = collate(ok)
    assert isinstance(whole, (tuple, list)) and whole[2].tolist() == [0, 1, 2]  # nothing missing: a plain batch
    part = collate([ok[0], gone, ok[2]])
    assert isinstance(part, PartialBatch) and [u.path for u in part.unreadable] == [gone.path]
    assert part.batch[2].tolist() == [0, 2] and part.batch[1].tolist() == [0, 0]
    single = collate([gone, ok[1], gone])  # one left: repeated, BatchNorm needs two
    assert single.batch[2].tolist() == [1, 1] and len(single.unreadable) == 2
    assert collate([gone, gone]).batch is None


@pytest.mark.parametrize("workers", [0, 2])
def test_contrast_batches_stay_consistent_when_samples_are_dropped(folder, workers):
    bundle = get_dataloaders(make_opt(folder.root, workers), DataNeeds(contrast=ContrastNeed(3, "exact")))
    loader = bundle.train_loader
    samples = loader.dataset.base.samples
    bad = {i for i, (path, _) in enumerate(samples) if Path(path) in folder.train_bad}
    assert bundle.n_data == 12 and len(bad) == 3
    seen = []
    for img, target, index, contrast_idx in loader:
        assert img.shape[0] == target.shape[0] == index.shape[0] == contrast_idx.shape[0] >= 2
        assert torch.equal(bundle.train_labels[index], target)
        assert torch.equal(contrast_idx[:, 0], index)  # positives are the kept samples themselves
        assert not (bundle.train_labels[contrast_idx[:, 1:]] == target[:, None]).any()
        seen += index.tolist()
    assert set(seen) == set(range(12)) - bad  # every readable sample once (a lone one may be repeated)
    assert loader.images_skipped == 3 and loader.warned == {str(p) for p in folder.train_bad}
    list(bundle.val_loader)
    assert bundle.val_loader.images_skipped == 1


def assert_warned_once_each(err: str, paths: list[Path]) -> None:
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping unreadable image")]
    assert len(warnings) == len(paths), err
    for path in paths:
        assert sum(f"image {path} (" in line for line in warnings) == 1, (path, err)


def test_teacher_run_skips_unreadable_images_and_records_them(folder, tmp_path, capsys):
    results = train_teacher.main(RUN + ["--data_folder", str(folder.root), "--num_workers", "0",
                                        "--save_folder", str(tmp_path)])
    err = capsys.readouterr().err
    assert_warned_once_each(err, folder.train_bad + [folder.bad.val])
    assert "Traceback" not in err and "error" not in err
    assert "truncated" in err and "not an image file" in err
    saved = json.loads(next(tmp_path.glob("*/results.json")).read_text())
    assert saved["status"] == "finished" and saved["epochs_run"] == 2
    assert [h["images_skipped"] for h in saved["history"]] == [4, 4]  # 3 training + 1 validation image per epoch
    assert saved["images_skipped"] == results["images_skipped"] == 8


def test_student_crd_run_with_workers_skips_and_records(folder, tmp_path, capsys):
    teacher = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    teacher.parent.mkdir()
    torch.manual_seed(0)
    torch.save({"model": build_model("resnet8", num_classes=3).state_dict()}, teacher)
    results = train_student.main(["--path_t", str(teacher), "--model_s", "resnet8", "--distill", "crd",
                                  "--nce_k", "3", *RUN[:-2], "--data_folder", str(folder.root), "--num_workers", "1",
                                  "--epochs", "1", "--save_folder", str(tmp_path / "students")])
    err = capsys.readouterr().err
    assert_warned_once_each(err, folder.train_bad + [folder.bad.val])
    assert [h["images_skipped"] for h in results["history"]] == [4] and results["images_skipped"] == 4
    assert results["status"] == "finished" and all(h["loss_crd"] > 0 for h in results["history"])


def test_folder_of_unreadable_images_is_one_error_line(folder, tmp_path):
    broken = write_fake_imagenet(tmp_path / "broken", classes=2, train_per_class=(2,), val_per_class=1,
                                 image_size=(40, 32))
    for path in (broken / "train").rglob("*.JPEG"):
        truncate(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "train_teacher.py", *RUN, "--data_folder", str(broken), "--num_workers", "1",
                          "--save_folder", str(tmp_path / "runs")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: every image of a batch is unreadable"), out.stderr
    assert f"under {broken / 'train'}" in lines[0] and "truncated" in lines[0], lines[0]


# Images over PIL's pixel limit (Image.MAX_IMAGE_PIXELS, lowered here so that small files count):
# above twice the limit PIL raises DecompressionBombError, up to it it warns; both are unreadable.
LIMIT = 2000  # pixels: the 40x32 images (1280) are under it
BOMBS = {"bomb_warning": (60, 50), "bomb_error": (100, 80)}  # 3000 and 8000 pixels


def write_png(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)
    return path


def test_images_over_the_pixel_limit_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    root = write_fake_imagenet(tmp_path / "imagenet", classes=2, train_per_class=(3,), val_per_class=1,
                               image_size=(40, 32))
    bombs = [write_png(root / "train" / "n00000000" / f"{name}.JPEG", size) for name, size in BOMBS.items()]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)
    capsys.readouterr()
    bundle = get_dataloaders(make_opt(root, 0), DataNeeds())
    seen = sum(len(target) for _, target in bundle.train_loader)
    assert bundle.n_data == 8 and seen >= 6
    assert bundle.train_loader.images_skipped == 2 and bundle.train_loader.warned == {str(p) for p in bombs}
    err = capsys.readouterr().err
    assert_warned_once_each(err, bombs)
    assert "DecompressionBombWarning: Image size (3000 pixels) exceeds limit of 2000 pixels" in err
    assert "DecompressionBombError: Image size (8000 pixels) exceeds limit of 4000 pixels" in err
    assert len(err.strip().splitlines()) == 2, err  # PIL's own warning is not printed besides
    assert Image.MAX_IMAGE_PIXELS == LIMIT and not any(  # the limit and the warning filters are as they were
        f[2] is Image.DecompressionBombWarning for f in warnings.filters)


@pytest.mark.parametrize("damage", ["truncated", *BOMBS])
def test_paired_image_over_the_pixel_limit_is_refused_like_a_truncated_one(tmp_path, monkeypatch, damage):
    root = tmp_path / "paired"
    for split in ("train", "test"):
        for c in range(2):
            write_png(root / "rgb" / split / f"class{c}" / "img0.png", (40, 32))
    bad = root / "rgb" / "train" / "class1" / "img0.png"
    if damage == "truncated":
        truncate(bad)
    else:
        write_png(bad, BOMBS[damage])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT)
    with pytest.raises(UserError) as info:
        open_paired(DataOptions(dataset="paired", data_folder=str(root), split="train"))
    line = str(info.value)
    assert line.startswith(f"--dataset paired: cannot read '{bad}' (") and "\n" not in line, line
    assert "replace that file, or remove it and its partners" in line
    assert ("truncated" if damage == "truncated" else "exceeds limit of") in line, line


def test_tinyimagenet_image_over_the_pixel_limit_is_one_error(tmp_path, monkeypatch):
    root = write_fake_tinyimagenet(tmp_path / "tiny", train_per_class=1, val_per_class=1)  # 64x64 JPEGs
    paths = sorted((root / "tiny-imagenet-200" / "val" / "images").glob("*.JPEG"))
    for limit, kind in ((3000, "DecompressionBombWarning"), (1000, "DecompressionBombError")):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(UserError, match=f"Tiny-ImageNet image .*val_\\d.JPEG cannot be read \\({kind}"):
            TinyImageNetFolder(root, "val", threads=1)
        # decode_all's threads see the filter pixel_limit_errors sets
        with pytest.raises(UserError, match=kind), pixel_limit_errors():
            decode_all(paths, 32, tinyimagenet_open, threads=2, block=1)
