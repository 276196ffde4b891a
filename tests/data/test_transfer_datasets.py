"""CIFAR-10, STL-10 and Tiny-ImageNet on small generated files in the real on-disk formats: shapes,
labels, class order, the 32x32 resize against PIL, STL-10's unlabelled split, the tensor pipeline
against the torchvision loader, the loader variants, and one-line errors for bad folders."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets, transforms

from common.errors import UserError
from dataset import TENSOR_DATASETS, UNLABELED_SETS, get_dataloaders
from dataset.cifar100 import CIFAR10_MEAN, CIFAR10_STD, CIFAR10Folder
from dataset.memory import resize_all
from dataset.stl10 import STL10_MEAN, STL10Folder, read_stl10_images, read_stl10_labels
from dataset.tensor_loader import TensorLoader, tensor_source
from dataset.tinyimagenet import TinyImageNetFolder
from tests.datagen import (TINY_WNIDS, stl10_bytes, write_fake_cifar10, write_fake_stl10,
                           write_fake_tinyimagenet)
from tests.data.test_dataset import check_batches, make_opt, needs_of
from tests.tolerance import FP32_EXACT, assert_close

ROOT = Path(__file__).resolve().parents[2]
SETS = ("cifar10", "stl10", "tinyimagenet")


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """One generated folder per set: CIFAR-10 2 train / 1 test per class, STL-10 2 / 1 per class
    and 6 unlabelled images, Tiny-ImageNet 3 wnids with 3 train / 2 val images each."""
    base = tmp_path_factory.mktemp("transfer")
    return {"cifar10": write_fake_cifar10(base / "cifar10"),
            "stl10": write_fake_stl10(base / "stl10", n_train_per_class=2),
            "tinyimagenet": write_fake_tinyimagenet(base / "tiny", train_per_class=3, val_per_class=2)}


def opt_for(name: str, root: Path, **kw):
    return make_opt(dataset=name, data_folder=str(root), batch_size=4, **kw)


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


# ---------------------------------------------------------------- registration

def test_sets_are_registered_for_the_tensor_pipeline():
    assert set(SETS) <= set(TENSOR_DATASETS) and "stl10" in UNLABELED_SETS


# ---------------------------------------------------------------- CIFAR-10

def test_cifar10_reads_torchvisions_format(roots):
    train = CIFAR10Folder(roots["cifar10"], train=True, allow_modified=True)
    test = CIFAR10Folder(roots["cifar10"], train=False, allow_modified=True)
    assert train.data.shape == (20, 32, 32, 3) and test.data.shape == (10, 32, 32, 3)
    assert sorted(train.targets) == sorted(list(range(10)) * 2) and test.targets == list(range(10))
    assert train.classes == [f"class_{i}" for i in range(10)]
    bundle = get_dataloaders(opt_for("cifar10", roots["cifar10"]))
    assert (bundle.n_data, bundle.num_classes) == (20, 10)
    source = tensor_source(bundle.val_loader.dataset.base)
    assert source is not None and source.mean == CIFAR10_MEAN and source.std == CIFAR10_STD


def test_cifar10_published_md5_missing_folder_and_download_errors(roots, tmp_path, monkeypatch):
    with pytest.raises(UserError) as err:
        get_dataloaders(opt_for("cifar10", roots["cifar10"], allow_modified_data=False))
    one_line(err, "CIFAR-10 file", "data_batch_1 is not the published one", CIFAR10Folder.train_list[0][1])
    with pytest.raises(UserError) as err:
        get_dataloaders(opt_for("cifar10", tmp_path / "nowhere"))
    one_line(err, "CIFAR-10 not found", "cifar-10-batches-py/", "--download")
    offline_download_fails(monkeypatch, "torchvision.datasets.cifar",
                           opt_for("cifar10", tmp_path / "nowhere", download=True),
                           "could not download CIFAR-10", "cifar-10-python.tar.gz")


def offline_download_fails(monkeypatch, module: str, opt, *words: str) -> None:
    """With no network (``module``'s download raising OSError), ``--download`` is one error line."""
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(f"{module}.download_and_extract_archive", offline)
    with pytest.raises(UserError) as err:
        get_dataloaders(opt)
    one_line(err, *words)


# ---------------------------------------------------------------- STL-10

def test_stl10_files_are_column_major_planes_as_torchvision_reads_them(tmp_path):
    image = np.zeros((1, 96, 96, 3), dtype=np.uint8)
    image[0, 5, 70, 1] = 200        # row 5, column 70, green
    image[0, 90, 2, 2] = 77         # row 90, column 2, blue
    raw = stl10_bytes(image)
    assert raw[1 * 9216 + 70 * 96 + 5] == 200 and raw[2 * 9216 + 2 * 96 + 90] == 77  # column by column
    path = tmp_path / "x.bin"
    path.write_bytes(raw)
    ours = read_stl10_images(path, size=96)
    assert ours.shape == (1, 96, 96, 3) and np.array_equal(ours, image)
    assert ours[0, 5, 70, 1] == 200 and ours[0, 70, 5, 1] == 0     # not transposed
    # torchvision's own reading of the same bytes (its loader without the MD5 check), as a PIL image
    (tmp_path / "stl10_binary").mkdir()
    (tmp_path / "stl10_binary" / "train_X.bin").write_bytes(raw)
    reference = datasets.STL10.__new__(datasets.STL10)
    reference.root, reference.base_folder = str(tmp_path), "stl10_binary"
    tv_images, _ = reference._STL10__loadfile("train_X.bin")
    assert np.array_equal(np.asarray(Image.fromarray(np.transpose(tv_images[0], (1, 2, 0)))), image[0])


def test_stl10_splits_labels_classes_and_resize(roots):
    folder = roots["stl10"] / "stl10_binary"
    full = read_stl10_images(folder / "train_X.bin", size=96)
    train = STL10Folder(roots["stl10"], "train")
    assert train.data.shape == (20, 32, 32, 3) and train.data.dtype == np.uint8
    assert train.targets == list(range(10)) * 2 and train.classes[:2] == ["stl_0", "stl_1"]
    for i in (0, 13):  # the resize is transforms.Resize(32) on the PIL image, exactly
        expected = np.asarray(transforms.Resize(32)(Image.fromarray(full[i])))
        assert np.array_equal(train.data[i], expected)
    assert np.array_equal(read_stl10_images(folder / "train_X.bin", chunk=3), train.data)  # chunks change nothing
    assert len(STL10Folder(roots["stl10"], "test")) == 10
    bundle = get_dataloaders(opt_for("stl10", roots["stl10"], split="unlabeled"))
    assert bundle.n_data == 6 and torch.equal(bundle.train_labels, torch.full((6,), -1))
    assert bundle.num_classes == 10 and len(bundle.val_loader.dataset) == 10
    unlabeled = read_stl10_images(folder / "unlabeled_X.bin")
    assert torch.equal(bundle.train_loader.dataset.images, torch.from_numpy(unlabeled).permute(0, 3, 1, 2))


@pytest.mark.parametrize("damage", ["truncated", "empty", "label_count", "label_range", "class_names"])
def test_bad_stl10_files_are_one_line_naming_the_file(roots, tmp_path, damage):
    root = write_fake_stl10(tmp_path)
    folder = root / "stl10_binary"
    name = {"truncated": "train_X.bin", "empty": "test_X.bin", "label_count": "train_y.bin",
            "label_range": "test_y.bin", "class_names": "class_names.txt"}[damage]
    path = folder / name
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "label_count":
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "label_range":
        path.write_bytes(bytes([0]) + path.read_bytes()[1:])
    else:
        path.write_text("one\ntwo\n")
    with pytest.raises(UserError) as err:
        get_dataloaders(opt_for("stl10", root))
    one_line(err, str(path))
    with pytest.raises(UserError, match="not in 1..10"):
        read_stl10_labels(_write(tmp_path / "y.bin", bytes([1, 11])), 2)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_stl10_download_checks_the_published_md5s(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename=None, md5=None):
        calls.append((url, filename, md5))
        write_fake_stl10(root)

    monkeypatch.setattr("dataset.stl10.download_and_extract_archive", fake_download)
    with pytest.raises(UserError) as err:  # the generated files are not the published ones
        get_dataloaders(opt_for("stl10", tmp_path, download=True))
    one_line(err, "downloaded STL-10 file", "train_X.bin is not the published one", datasets.STL10.train_list[0][1])
    assert calls == [(datasets.STL10.url, datasets.STL10.filename, datasets.STL10.tgz_md5)]
    # files already there: no download and no MD5 check (any file in the format is read)
    monkeypatch.setattr("dataset.stl10.download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    assert get_dataloaders(opt_for("stl10", tmp_path, download=True)).n_data == 10
    offline_download_fails(monkeypatch, "dataset.stl10", opt_for("stl10", tmp_path / "empty", download=True),
                           "could not download STL-10", "stl10_binary.tar.gz")


def test_bad_stl10_folder_is_one_error_line_from_the_script(tmp_path):
    run = subprocess.run([sys.executable, "train_teacher.py", "--dataset", "stl10", "--data_folder",
                          str(tmp_path / "BAD"), "--model", "resnet8", "--device", "cpu", "--save_folder",
                          str(tmp_path / "save")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: STL-10 not found") and "--download" in lines[0]


@pytest.mark.e2e
def test_train_teacher_two_steps_on_stl10(roots, tmp_path):
    run = subprocess.run([sys.executable, "train_teacher.py", "--dataset", "stl10", "--data_folder",
                          str(roots["stl10"]), "--max_steps", "2", "--device", "cpu", "--batch_size", "4",
                          "--model", "resnet8", "--save_folder", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "training resnet8 on stl10 (20 images, 10 classes)" in run.stdout
    assert (tmp_path / "resnet8_stl10_lr_0.05_decay_0.0005_trial_0" / "resnet8_last.pth").is_file()


# ---------------------------------------------------------------- Tiny-ImageNet

def test_tinyimagenet_reads_the_distributed_layout(roots):
    root = roots["tinyimagenet"]
    train = TinyImageNetFolder(root, "train")
    val = TinyImageNetFolder(root, "val", threads=1)
    wnids = sorted(TINY_WNIDS)
    assert train.classes == wnids and val.classes == wnids           # sorted, not wnids.txt's order
    assert train.data.shape == (9, 32, 32, 3) and train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [p.parent.parent.name for p in train.files] == [wnids[t] for t in train.targets]
    # val: labels from val_annotations.txt (val_k is wnids.txt's class k % 3), ordered by class then name
    given = {f"val_{k}.JPEG": wnids.index(TINY_WNIDS[k % 3]) for k in range(6)}
    assert [given[p.name] for p in val.files] == val.targets == [0, 0, 1, 1, 2, 2]
    for dataset, i in ((train, 4), (val, 3)):  # transforms.Resize(32) of the decoded 64x64 JPEG, exactly
        with Image.open(dataset.files[i]) as image:
            expected = np.asarray(transforms.Resize(32)(image.convert("RGB")))
        assert np.array_equal(dataset.data[i], expected)
    # the images keep their class colours (the generated classes differ by mean colour)
    means = [train.data[np.asarray(train.targets) == c].mean(axis=(0, 1, 2)) for c in range(3)]
    assert min(np.abs(means[a] - means[b]).max() for a, b in ((0, 1), (0, 2), (1, 2))) > 10


def test_tinyimagenet_grayscale_jpeg_becomes_rgb(tmp_path):
    root = write_fake_tinyimagenet(tmp_path, train_per_class=1)
    wnid = sorted(TINY_WNIDS)[1]
    path = root / "tiny-imagenet-200" / "train" / wnid / "images" / f"{wnid}_0.JPEG"
    Image.fromarray(np.full((64, 64), 90, dtype=np.uint8), mode="L").save(path, format="JPEG")
    train = TinyImageNetFolder(root, "train")
    assert train.data.shape == (3, 32, 32, 3) and np.all(np.abs(train.data[1].astype(int) - 90) <= 1)


@pytest.mark.parametrize("damage", ["no_annotation", "unknown_wnid_folder", "unreadable", "no_folder",
                                    "empty_class", "no_wnids"])
def test_bad_tinyimagenet_folders_are_one_line(tmp_path, damage):
    root = write_fake_tinyimagenet(tmp_path / "data", train_per_class=1)
    folder = root / "tiny-imagenet-200"
    wnid = sorted(TINY_WNIDS)[0]
    if damage == "no_annotation":
        path = folder / "val" / "images" / "val_99.JPEG"
        (folder / "val" / "images" / "val_0.JPEG").rename(path)
        expected = [str(path), "no line in"]
    elif damage == "unknown_wnid_folder":
        path = folder / "train" / "n00000001"
        (path / "images").mkdir(parents=True)
        expected = [str(path), "not in", "wnids.txt"]
    elif damage == "unreadable":
        path = folder / "train" / wnid / "images" / f"{wnid}_0.JPEG"
        path.write_bytes(path.read_bytes()[:50])
        expected = [str(path), "cannot be read"]
    elif damage == "no_folder":
        root = tmp_path / "elsewhere"
        expected = ["Tiny-ImageNet not found", "tiny-imagenet-200/"]
    elif damage == "empty_class":
        for image in (folder / "train" / wnid / "images").iterdir():
            image.unlink()
        expected = [f"class {wnid} has no images"]
    else:
        (folder / "wnids.txt").unlink()
        expected = [str(folder / "wnids.txt"), "not found"]
    with pytest.raises(UserError) as err:
        get_dataloaders(opt_for("tinyimagenet", root))
    one_line(err, *expected)


def test_tinyimagenet_cannot_be_downloaded(roots):
    with pytest.raises(UserError, match="cannot be downloaded automatically"):
        get_dataloaders(opt_for("tinyimagenet", roots["tinyimagenet"], download=True))


# ---------------------------------------------------------------- both pipelines, all variants

SIZES = {"cifar10": (20, 10, 10), "stl10": (20, 10, 10), "tinyimagenet": (9, 3, 6)}


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("loader", ["tensor", "torchvision"])
@pytest.mark.parametrize("variant", ["plain", "instance", "contrast"])
def test_loaders_and_variants(roots, name, loader, variant):
    n_data, num_classes, n_val = SIZES[name]
    k = 3
    bundle = get_dataloaders(opt_for(name, roots[name], loader=loader), needs_of(variant, k=k))
    assert isinstance(bundle.train_loader, TensorLoader) == (loader == "tensor")
    assert (bundle.n_data, bundle.num_classes, len(bundle.val_loader.dataset)) == (n_data, num_classes, n_val)
    check_batches(bundle, size=32, variant=variant, k=k)
    subset = get_dataloaders(opt_for(name, roots[name], loader=loader, subset=6), needs_of(variant, k=k))
    assert subset.n_data == 6 and torch.bincount(subset.train_labels).max() <= 6 // min(num_classes, 6) + 1


@pytest.mark.numeric
@pytest.mark.parametrize("name", SETS)
def test_tensor_loader_matches_torchvision_test_transform(roots, name):
    tensor = get_dataloaders(opt_for(name, roots[name], loader="tensor"))
    folder = get_dataloaders(opt_for(name, roots[name], loader="torchvision"))
    (a, ya), (b, yb) = next(iter(tensor.val_loader)), next(iter(folder.val_loader))
    assert torch.equal(ya, yb)
    assert_close(a, b, rtol=FP32_EXACT)
    if name == "stl10":  # and the normalisation is STL-10's
        pixel = tensor.val_loader.dataset.images[0, :, 0, 0].float() / 255
        assert_close(a[0, :, 0, 0], (pixel - torch.tensor(STL10_MEAN)) / torch.tensor((0.2603, 0.2566, 0.2712)),
                     rtol=FP32_EXACT)


def test_resize_all_is_pil_resize():
    images = np.random.default_rng(1).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    out = resize_all(images, threads=2)
    for image, small in zip(images, out):
        assert np.array_equal(small, np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR)))
