"""dataset/: loaders on fake CIFAR-100 and ImageNet folders, the synthetic set, subsets, the
contrastive sampler, transforms and the errors users see."""
from __future__ import annotations

import argparse
import dataclasses
import math
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from common.declare import options_from
from common.errors import UserError
from dataset import DATASETS, ContrastNeed, ContrastSampler, DataBundle, DataNeeds, DataOptions, get_dataloaders
from dataset import sampling
from dataset.cifar100 import (CIFAR100_MEAN, CIFAR100_STD, CIFAR100Folder, CIFAR100Instance,
                              CIFAR100InstanceSample, cifar100_test_transform,
                              cifar100_train_transform, get_cifar100_dataloaders,
                              get_cifar100_dataloaders_sample, md5_of)
from dataset.imagenet import (IMAGENET_MEAN, IMAGENET_STD, ImageFolderSample, get_dataloader_sample,
                              imagenet_train_transform, imagenet_val_transform)
from dataset.loaders import balanced_subset
from dataset.sampling import distinct_positions
from dataset.synthetic import make_synthetic
from tests.datagen import write_fake_cifar100, write_fake_imagenet
from tests.tolerance import FP32_EXACT, assert_close


def make_opt(**kw) -> DataOptions:
    base = dict(dataset="cifar100", data_folder=None, download=False, batch_size=16, num_workers=0,
                subset=0, seed=0, allow_modified_data=True)  # fake CIFAR: not the published MD5s
    base.update(kw)
    return DataOptions(**base)


def needs_of(variant: str, k: int = 8, mode: str = "exact") -> DataNeeds:
    """The needs of a method whose batches are ``plain``, carry ``instance`` indices or ``contrast``
    indices (``k`` negatives, ``mode`` positives)."""
    return DataNeeds(index=variant == "instance", contrast=ContrastNeed(k, mode) if variant == "contrast" else None)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), n_train_per_class=2, n_test_per_class=1)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    return write_fake_imagenet(tmp_path_factory.mktemp("imagenet"))


# ---------------------------------------------------------------- loaders: batch structure

def check_batches(bundle: DataBundle, *, size: int, variant: str, k: int = 0, exact: bool = True) -> None:
    batch = next(iter(bundle.train_loader))
    arity = {"plain": 2, "instance": 3, "contrast": 4}[variant]
    assert len(batch) == arity
    img, target = batch[:2]
    b = img.shape[0]
    assert img.dtype == torch.float32 and img.shape[1:] == (3, size, size)
    assert target.dtype == torch.int64 and target.shape == (b,)
    if arity >= 3:
        index = batch[2]
        assert index.dtype == torch.int64 and index.shape == (b,)
        assert int(index.min()) >= 0 and int(index.max()) < bundle.n_data
        assert torch.equal(bundle.train_labels[index], target)
    if arity == 4:
        contrast_idx = batch[3]
        assert contrast_idx.dtype == torch.int64 and contrast_idx.shape == (b, k + 1)
        labels = bundle.train_labels
        if exact:
            assert torch.equal(contrast_idx[:, 0], batch[2])
        else:
            assert torch.equal(labels[contrast_idx[:, 0]], target)
        assert not (labels[contrast_idx[:, 1:]] == target[:, None]).any()
    val = next(iter(bundle.val_loader))
    assert len(val) == 2 and val[0].shape[1:] == (3, size, size) and val[1].dtype == torch.int64
    assert bundle.train_labels.dtype == torch.int64 and bundle.train_labels.shape == (bundle.n_data,)


@pytest.mark.parametrize("variant", ["plain", "instance", "contrast"])
def test_fake_cifar100_loads(cifar_root, variant):
    opt = make_opt(data_folder=str(cifar_root))
    bundle = get_dataloaders(opt, needs_of(variant, k=8))
    assert (bundle.n_data, bundle.num_classes) == (200, 100)
    assert len(bundle.val_loader.dataset) == 100
    check_batches(bundle, size=32, variant=variant, k=8)


@pytest.mark.parametrize("variant", ["plain", "instance", "contrast"])
def test_fake_imagenet_loads(imagenet_root, variant):
    opt = make_opt(dataset="imagenet", data_folder=str(imagenet_root), batch_size=4)
    bundle = get_dataloaders(opt, needs_of(variant, k=5))
    assert (bundle.n_data, bundle.num_classes) == (9, 3)
    assert torch.bincount(bundle.train_labels).tolist() == [4, 2, 3]
    check_batches(bundle, size=224, variant=variant, k=5)


@pytest.mark.parametrize("variant", ["plain", "instance", "contrast"])
def test_synthetic_loads(variant):
    opt = make_opt(dataset="synthetic", synthetic_classes=10, synthetic_train=6, synthetic_test=2)
    bundle = get_dataloaders(opt, needs_of(variant, k=8, mode="relax"))
    assert (bundle.n_data, bundle.num_classes, len(bundle.val_loader.dataset)) == (60, 10, 20)
    check_batches(bundle, size=32, variant=variant, k=8, exact=False)


def test_loader_reads_no_method_flag():
    """The contrastive indices follow the method's DataNeeds alone: method flags in the parsed
    namespace (``--nce_k 8 --mode exact`` here) are not data options and do not reach the loader."""
    assert not {"nce_k", "mode"} & {f.name for f in dataclasses.fields(DataOptions)}
    namespace = argparse.Namespace(dataset="synthetic", synthetic_classes=4, synthetic_train=6, synthetic_test=1,
                                   batch_size=8, seed=0, nce_k=8, mode="exact")
    data = options_from(DataOptions, namespace)
    bundle = get_dataloaders(data, DataNeeds(index=True, contrast=ContrastNeed(k=5, mode="relax")))
    labels, moved = bundle.train_labels, 0
    for img, target, index, contrast_idx in bundle.train_loader:
        assert contrast_idx.shape == (img.shape[0], 6)
        assert torch.equal(labels[contrast_idx[:, 0]], target)  # relax: a positive of the class
        assert not (labels[contrast_idx[:, 1:]] == target[:, None]).any()
        moved += int((contrast_idx[:, 0] != index).sum())
    assert moved > 0  # not exact's positives (the sample itself)
    assert (bundle.n_data, bundle.num_classes) == (24, 4)


def test_contrast_batches_from_worker_processes_are_reproducible(cifar_root):
    """Workers draw augmentations and negatives from seeds that come from ``data.seed`` alone."""
    opt = make_opt(data_folder=str(cifar_root), num_workers=2, batch_size=50)

    def first_two():
        torch.manual_seed(torch.seed())  # the global RNG must not matter
        it = iter(get_dataloaders(opt, needs_of("contrast", k=20)).train_loader)
        return [next(it), next(it)]

    a, b = first_two(), first_two()
    for batch_a, batch_b in zip(a, b):
        for x, y in zip(batch_a, batch_b):
            assert torch.equal(x, y)
    opt.seed = 1
    assert not torch.equal(first_two()[0][2], a[0][2])


def test_single_sample_last_batch_is_dropped():
    opt = make_opt(dataset="synthetic", synthetic_classes=5, synthetic_train=5, synthetic_test=1,
                   batch_size=8)  # 25 samples = 3 * 8 + 1
    bundle = get_dataloaders(opt)
    assert len(bundle.train_loader) == 3
    assert get_dataloaders(make_opt(dataset="synthetic", synthetic_classes=5, synthetic_train=5,
                                    synthetic_test=1, batch_size=10)).train_loader.drop_last is False


# ---------------------------------------------------------------- RepDistiller compatibility

def test_repdistiller_cifar_functions(cifar_root):
    train, test = get_cifar100_dataloaders(batch_size=8, num_workers=0, data_folder=str(cifar_root),
                                           allow_modified=True)
    assert len(next(iter(train))) == 2 and test.batch_size == 4
    train, test, n_data = get_cifar100_dataloaders(batch_size=8, num_workers=0, is_instance=True,
                                                   data_folder=str(cifar_root), allow_modified=True)
    assert n_data == 200 and len(next(iter(train))) == 3
    train, test, n_data = get_cifar100_dataloaders_sample(batch_size=8, num_workers=0, k=30, mode="relax",
                                                          data_folder=str(cifar_root), allow_modified=True)
    img, target, index, contrast_idx = next(iter(train))
    assert contrast_idx.shape == (8, 31) and n_data == 200
    train, _, _ = get_cifar100_dataloaders_sample(batch_size=8, num_workers=0, k=30, percent=0.5,
                                                  data_folder=str(cifar_root), allow_modified=True)
    assert next(iter(train))[3].shape == (8, 31)
    train, _, _ = get_cifar100_dataloaders_sample(batch_size=8, num_workers=0, is_sample=False,
                                                  data_folder=str(cifar_root), allow_modified=True)
    assert len(next(iter(train))) == 3


def test_repdistiller_dataset_classes(cifar_root, imagenet_root):
    tensor = transforms.ToTensor()
    item = CIFAR100Instance(str(cifar_root), train=True, transform=tensor, allow_modified=True)[7]
    assert item[1:] == (7, 7)
    sample_set = CIFAR100InstanceSample(str(cifar_root), train=True, transform=tensor, k=50, mode="exact",
                                        allow_modified=True)
    img, target, index, sample_idx = sample_set[3]
    assert index == 3 and sample_idx.shape == (51,) and int(sample_idx[0]) == 3
    assert all(sample_set.targets[int(i)] != target for i in sample_idx[1:])
    assert len(CIFAR100InstanceSample(str(cifar_root), transform=tensor, is_sample=False,
                                      allow_modified=True)[0]) == 3
    folder = ImageFolderSample(str(imagenet_root / "train"), transform=tensor, is_sample=True, k=4)
    assert folder[0][3].shape == (5,)
    train, val, n_data, num_classes = get_dataloader_sample(
        batch_size=3, num_workers=0, is_sample=True, k=4, data_folder=str(imagenet_root))
    assert (n_data, num_classes) == (9, 3) and next(iter(train))[3].shape == (3, 5)


# ---------------------------------------------------------------- errors users see

def test_unknown_dataset_lists_choices():
    with pytest.raises(UserError, match="cifar100, cifar10, stl10, tinyimagenet, imagenet, synthetic, paired"):
        get_dataloaders(make_opt(dataset="mnist"))
    assert DATASETS == ("cifar100", "cifar10", "stl10", "tinyimagenet", "imagenet", "synthetic", "paired")


def test_missing_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="--download") as err:
        get_dataloaders(make_opt(data_folder=str(tmp_path / "nowhere")))
    assert "cifar-100-python" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "empty" / "cifar-100-python").mkdir(parents=True)
    with pytest.raises(UserError, match="not found"):
        get_dataloaders(make_opt(data_folder=str(tmp_path / "empty")))


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(UserError, match="could not download CIFAR-100.*network"):
        get_dataloaders(make_opt(data_folder=str(tmp_path), download=True))


def test_download_skipped_when_files_exist(cifar_root, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive",
                        lambda *a, **k: pytest.fail("must not download"))
    assert get_dataloaders(make_opt(data_folder=str(cifar_root), download=True)).n_data == 200


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no_labels", "bad_shape", "bad_meta"])
def test_corrupt_cifar_is_reported(tmp_path, damage):
    root = write_fake_cifar100(tmp_path, n_train_per_class=1, n_test_per_class=1)
    folder = root / "cifar-100-python"
    target = folder / ("meta" if damage == "bad_meta" else "train")
    if damage == "garbage":
        target.write_bytes(b"this is not a pickle")
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:500])
    else:
        with open(target, "rb") as f:
            entry = pickle.load(f)
        if damage == "no_labels":
            del entry["fine_labels"]
        elif damage == "bad_shape":
            entry["data"] = entry["data"][:, :1000]
        else:
            entry = {"something": 1}
        with open(target, "wb") as f:
            pickle.dump(entry, f)
    with pytest.raises(UserError, match="cifar-100-python") as err:
        get_dataloaders(make_opt(data_folder=str(root)))
    assert "--download" in str(err.value)


def test_cifar_wrong_class_count_is_reported(tmp_path):
    root = write_fake_cifar100(tmp_path, n_train_per_class=1)
    meta = root / "cifar-100-python" / "meta"
    meta.write_bytes(pickle.dumps({"fine_label_names": ["a", "b"], "coarse_label_names": []}))
    with pytest.raises(UserError, match="2 class names"):
        CIFAR100Folder(root, allow_modified=True)


def test_cifar_files_are_checked_against_the_published_md5s_before_reading(tmp_path, monkeypatch):
    root = write_fake_cifar100(tmp_path, n_train_per_class=1, n_test_per_class=1)
    folder = root / "cifar-100-python"
    with pytest.raises(UserError) as err:
        get_dataloaders(make_opt(data_folder=str(root), allow_modified_data=False))
    message = str(err.value)
    assert f"{folder / 'train'} is not the published one" in message and "--allow_modified_data" in message
    assert CIFAR100Folder.train_list[0][1] in message  # the published MD5 it expected
    # files with the published MD5s load without the flag (the published MD5s made to be the fake files')
    monkeypatch.setattr(CIFAR100Folder, "train_list", [["train", md5_of(folder / "train")]])
    monkeypatch.setattr(CIFAR100Folder, "test_list", [["test", md5_of(folder / "test")]])
    monkeypatch.setattr(CIFAR100Folder, "meta", {**CIFAR100Folder.meta, "md5": md5_of(folder / "meta")})
    assert get_dataloaders(make_opt(data_folder=str(root), allow_modified_data=False)).n_data == 100


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["meta", "train"])
def test_a_cifar_pickle_that_would_run_code_is_refused_even_when_modified_files_are_allowed(tmp_path, name):
    root = write_fake_cifar100(tmp_path / "data", n_train_per_class=1, n_test_per_class=1)
    marker = tmp_path / "pwned"
    (root / "cifar-100-python" / name).write_bytes(pickle.dumps({"fine_label_names": RunsCode(marker),
                                                                 "data": RunsCode(marker)}))
    with pytest.raises(UserError, match="corrupt or not in torchvision's format.*asks for posix.system"):
        CIFAR100Folder(root, allow_modified=True)
    assert not marker.exists(), "the payload ran"


def test_imagenet_errors_name_the_layout(tmp_path, imagenet_root):
    with pytest.raises(UserError, match=r"train/<class>/\*\.JPEG"):
        get_dataloaders(make_opt(dataset="imagenet", data_folder=str(tmp_path / "nowhere")))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(UserError, match="no images.*train/<class>"):
        get_dataloaders(make_opt(dataset="imagenet", data_folder=str(tmp_path / "empty")))
    (tmp_path / "empty" / "train" / "n01").mkdir()
    (tmp_path / "empty" / "train" / "n01" / "notes.txt").write_text("no image")
    with pytest.raises(UserError, match="no images"):
        get_dataloaders(make_opt(dataset="imagenet", data_folder=str(tmp_path / "empty")))
    flat = write_fake_imagenet(tmp_path / "flatval", classes=2, val_per_class=1)
    for path in (flat / "val").rglob("*.JPEG"):
        path.rename(flat / "val" / path.name)
    for folder in (flat / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(UserError, match="val"):
        get_dataloaders(make_opt(dataset="imagenet", data_folder=str(flat)))
    with pytest.raises(UserError, match="image-net.org"):
        get_dataloaders(make_opt(dataset="imagenet", data_folder=str(imagenet_root), download=True))


# ---------------------------------------------------------------- synthetic set

def test_synthetic_is_deterministic_and_seeded():
    a = make_synthetic(num_classes=7, n_train_per_class=5, n_test_per_class=3, seed=3)
    b = make_synthetic(num_classes=7, n_train_per_class=5, n_test_per_class=3, seed=3)
    c = make_synthetic(num_classes=7, n_train_per_class=5, n_test_per_class=3, seed=4)
    for x, y in zip(a, b):
        assert (x == y).all()
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[2], c[2])
    train_x, train_y, test_x, test_y = a
    assert train_x.shape == (35, 32, 32, 3) and train_x.dtype == np.uint8
    assert test_x.shape == (21, 32, 32, 3) and test_x.dtype == np.uint8
    assert train_y.dtype == torch.int64 and torch.bincount(train_y).tolist() == [5] * 7
    assert torch.bincount(test_y).tolist() == [3] * 7
    assert train_x.std() > 20  # not blank
    # the test split does not depend on the training split's size
    d = make_synthetic(num_classes=7, n_train_per_class=9, n_test_per_class=3, seed=3)
    assert np.array_equal(d[2], a[2])


def test_synthetic_defaults_and_class_structure():
    train_x, train_y, test_x, test_y = make_synthetic()
    assert train_x.shape == (10000, 32, 32, 3) and test_x.shape == (2000, 32, 32, 3)
    assert int(train_y.max()) == 99
    # nearest class mean (on 8x8 thumbnails) beats chance by far: the classes are structured
    def thumbs(x):
        t = torch.from_numpy(x).float().permute(0, 3, 1, 2)
        return torch.nn.functional.avg_pool2d(t, 4).flatten(1)
    tr, te = thumbs(train_x), thumbs(test_x)
    means = torch.stack([tr[train_y == c].mean(0) for c in range(100)])
    accuracy = (torch.cdist(te, means).argmin(1) == test_y).float().mean().item()
    assert 0.1 < accuracy < 0.6  # structured, but far from what a template matcher can solve


def test_synthetic_seed_is_not_the_run_seed():
    small = dict(dataset="synthetic", synthetic_classes=4, synthetic_train=3, synthetic_test=1)
    a = get_dataloaders(make_opt(seed=0, **small)).train_loader.dataset.base.data
    b = get_dataloaders(make_opt(seed=1, **small)).train_loader.dataset.base.data
    c = get_dataloaders(make_opt(seed=0, synthetic_seed=1, **small)).train_loader.dataset.base.data
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---------------------------------------------------------------- subset

def test_balanced_subset():
    labels = torch.arange(1000) % 10
    chosen = balanced_subset(labels, 95, seed=0)
    counts = torch.bincount(labels[chosen], minlength=10)
    assert chosen.numel() == 95 and chosen.unique().numel() == 95
    assert int(counts.max() - counts.min()) <= 1 and torch.equal(chosen, chosen.sort().values)
    assert torch.equal(chosen, balanced_subset(labels, 95, seed=0))
    assert not torch.equal(chosen, balanced_subset(labels, 95, seed=1))
    # unequal classes: a small class gives all it has, the others share the rest evenly
    labels = torch.tensor([0] * 3 + [1] * 50 + [2] * 50)
    counts = torch.bincount(labels[balanced_subset(labels, 43, seed=0)])
    assert counts.tolist() == [3, 20, 20]
    with pytest.raises(UserError, match="--subset"):
        balanced_subset(labels, 104, seed=0)


def test_subset_loader_has_n_rows(cifar_root):
    opt = make_opt(data_folder=str(cifar_root), subset=50, batch_size=50)
    bundle = get_dataloaders(opt, needs_of("contrast", k=40))
    assert bundle.n_data == 50 and bundle.train_labels.shape == (50,)
    assert bundle.train_labels.unique().numel() == 50  # 50 different classes, one each
    img, target, index, contrast_idx = next(iter(bundle.train_loader))
    assert sorted(index.tolist()) == list(range(50))
    assert int(contrast_idx.max()) < 50
    assert torch.equal(bundle.train_labels[index], target)


def test_val_subset_is_balanced_and_seed_independent(cifar_root):
    def val_targets(seed):
        bundle = get_dataloaders(make_opt(data_folder=str(cifar_root), val_subset=30, seed=seed))
        return torch.cat([target for _, target in bundle.val_loader])

    a = val_targets(0)
    assert a.numel() == 30 and a.unique().numel() == 30
    assert torch.equal(a, val_targets(5))
    with pytest.raises(UserError, match="--val_subset 101"):
        get_dataloaders(make_opt(data_folder=str(cifar_root), val_subset=101))


# ---------------------------------------------------------------- contrastive sampler

# 28 samples of 5 classes with 7, 3, 12, 5 and 1 samples, in shuffled order
UNEQUAL = torch.tensor([0] * 7 + [1] * 3 + [2] * 12 + [3] * 5 + [4] * 1)[
    torch.randperm(28, generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("k", [3, 16])  # 3: the stream path for every row; 16: key ranking
@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_sampler_rows_are_valid(mode, k):
    torch.manual_seed(0)
    sampler = ContrastSampler(UNEQUAL, k, mode)
    index = torch.arange(28).repeat(20)
    out = sampler(index, UNEQUAL[index])
    assert out.shape == (560, k + 1) and out.dtype == torch.int64
    negatives = out[:, 1:]
    assert not (UNEQUAL[negatives] == UNEQUAL[index][:, None]).any()
    assert (negatives.sort(1).values.diff(dim=1) > 0).all()  # distinct in each row
    if mode == "exact":
        assert torch.equal(out[:, 0], index)
    else:
        assert torch.equal(UNEQUAL[out[:, 0]], UNEQUAL[index])
        assert (out[:, 0] != index).any()
    assert sampler(index[:5]).shape == (5, k + 1)  # labels looked up when no target is given


def test_sampler_largest_k_takes_every_candidate():
    sampler = ContrastSampler(UNEQUAL, 16)  # class 2 has 28 - 12 = 16 candidates
    index = torch.nonzero(UNEQUAL == 2).flatten()
    out = sampler(index)
    expected = torch.nonzero(UNEQUAL != 2).flatten()
    for row in out[:, 1:]:
        assert torch.equal(row.sort().values, expected)


def test_sampler_refuses_too_large_k():
    with pytest.raises(UserError, match="--nce_k 16 or less"):
        ContrastSampler(UNEQUAL, 17)
    with pytest.raises(UserError, match="--nce_k 0 or less"):
        ContrastSampler(torch.zeros(5, dtype=torch.long), 1)
    with pytest.raises(UserError, match="mode"):
        ContrastSampler(UNEQUAL, 3, "loose")


def test_too_large_k_refused_by_loader(cifar_root):
    opt = make_opt(data_folder=str(cifar_root), subset=100)  # 99 negatives per class
    with pytest.raises(UserError, match="--nce_k 99 or less"):
        get_dataloaders(opt, needs_of("contrast", k=100))


def chi_square_ok(counts: torch.Tensor) -> bool:
    """Counts of equally likely cells: chi-square within six standard deviations of its mean."""
    expected = counts.double().mean()
    stat = float(((counts.double() - expected) ** 2 / expected).sum())
    dof = counts.numel() - 1
    return abs(stat - dof) < 6 * math.sqrt(2 * dof)


@pytest.mark.parametrize("k", [5, 14])  # stream path and key-ranking path (16 candidates)
def test_negatives_are_uniform(k):
    gen = torch.Generator().manual_seed(1234)
    sampler = ContrastSampler(UNEQUAL, k, "relax")
    anchor = int(torch.nonzero(UNEQUAL == 2)[0])
    out = sampler(torch.full((4000,), anchor), generator=gen)
    negatives = out[:, 1:]
    candidates = torch.nonzero(UNEQUAL != 2).flatten()
    counts = torch.bincount(negatives.flatten(), minlength=28)[candidates]
    assert int(counts.sum()) == 4000 * k and chi_square_ok(counts)
    # every column too (the order of the negatives is random, not the candidates' order)
    for column in (0, k - 1):
        assert chi_square_ok(torch.bincount(negatives[:, column], minlength=28)[candidates])
    # relax positives: uniform over the anchor's class
    assert chi_square_ok(torch.bincount(out[:, 0], minlength=28)[UNEQUAL == 2])
    # unordered pairs are uniform too (no structure between the draws of one row)
    if k == 5:
        pairs = negatives[:, 0] * 28 + negatives[:, 1]
        cells = (candidates[:, None] * 28 + candidates[None, :])[~torch.eye(16, dtype=torch.bool)]
        assert chi_square_ok(torch.bincount(pairs, minlength=28 * 28)[cells])


def test_distinct_positions_large_and_mixed_bounds():
    gen = torch.Generator().manual_seed(0)
    upper = torch.tensor([100_000, 500, 41, 1_000_000])  # stream rows and one key-ranking row
    out = distinct_positions(upper, 40, gen)
    assert out.shape == (4, 40)
    assert (out >= 0).all() and (out < upper[:, None]).all()
    assert all(row.unique().numel() == 40 for row in out)


def test_first_copies_table_and_sort_agree(monkeypatch):
    """The table of first positions and the stable sort find the same first copies, so the
    sampler draws the same negatives from the same generator whichever path the size takes."""
    values = torch.randint(0, 50, (6, 200), generator=torch.Generator().manual_seed(3))
    table = sampling._first_copies(values, 50)
    monkeypatch.setattr(sampling, "TABLE_ELEMENTS", 0)
    assert torch.equal(sampling._first_copies(values, 50), table)
    expected = torch.zeros_like(table)
    for r, row in enumerate(values.tolist()):
        seen = set()
        for j, v in enumerate(row):
            expected[r, j] = v not in seen
            seen.add(v)
    assert torch.equal(table, expected)
    sampler = ContrastSampler(torch.arange(3000) % 10, 900)
    index = torch.arange(0, 3000, 97)
    by_sort = sampler(index, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(sampling, "TABLE_ELEMENTS", 1 << 24)
    assert torch.equal(sampler(index, generator=torch.Generator().manual_seed(5)), by_sort)


def test_sampler_negative_fraction_uses_a_fixed_pool():
    labels = torch.arange(200) % 4
    sampler = ContrastSampler(labels, 10, negative_fraction=0.2, generator=torch.Generator().manual_seed(0))
    out = sampler(torch.zeros(300, dtype=torch.long))
    pool = out[:, 1:].unique()
    assert pool.numel() == 30 and not (labels[pool] == 0).any()  # 20% of 150 candidates


# ---------------------------------------------------------------- transforms

def test_cifar_transforms_are_the_reference_ones():
    train = cifar100_train_transform().transforms
    assert [type(t) for t in train] == [transforms.RandomCrop, transforms.RandomHorizontalFlip,
                                        transforms.ToTensor, transforms.Normalize]
    assert train[0].size == (32, 32) and train[0].padding == 4 and train[1].p == 0.5
    assert tuple(train[3].mean) == CIFAR100_MEAN and tuple(train[3].std) == CIFAR100_STD
    test = cifar100_test_transform().transforms
    assert [type(t) for t in test] == [transforms.ToTensor, transforms.Normalize]
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 0, 128, 255
    pixels[5, 7] = (10, 20, 30)
    out = cifar100_test_transform()(Image.fromarray(pixels))
    mean, std = torch.tensor(CIFAR100_MEAN), torch.tensor(CIFAR100_STD)
    assert_close(out[:, 0, 0], (torch.tensor([0, 128, 255]) / 255 - mean) / std, rtol=FP32_EXACT)
    assert_close(out[:, 5, 7], (torch.tensor([10, 20, 30]) / 255 - mean) / std, rtol=FP32_EXACT)


def test_imagenet_transforms_are_the_standard_ones():
    train = imagenet_train_transform().transforms
    assert [type(t) for t in train] == [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip,
                                        transforms.ToTensor, transforms.Normalize]
    assert train[0].size == (224, 224) and train[0].scale == (0.08, 1.0)
    assert tuple(train[3].mean) == IMAGENET_MEAN and tuple(train[3].std) == IMAGENET_STD
    val = imagenet_val_transform().transforms
    assert [type(t) for t in val] == [transforms.Resize, transforms.CenterCrop, transforms.ToTensor,
                                      transforms.Normalize]
    assert val[0].size == 256 and val[1].size == (224, 224)
    out = imagenet_val_transform()(Image.new("RGB", (300, 260), (255, 0, 128)))
    expected = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert out.shape == (3, 224, 224)
    assert_close(out[:, 100, 100], expected, rtol=FP32_EXACT)


def test_validation_does_not_draw_from_the_global_rng():
    bundle = get_dataloaders(make_opt(dataset="synthetic", subset=100, val_subset=20, batch_size=8))
    state = torch.get_rng_state()
    for _ in bundle.val_loader:
        pass
    assert torch.equal(torch.get_rng_state(), state)
