"""dataset/tensor_loader.py: the tensor pipeline against torchvision's transforms (same pixels for
the same crop and flip, same distribution of crops and flips), exact resume, sharding, contrastive
batches, the scripts with both loaders, and the --num_workers default."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from common.distributed import EpochSampler, ShardSampler
from dataset import ContrastNeed, DataNeeds, DataOptions, get_dataloaders
from dataset.cifar100 import CIFAR100_MEAN, CIFAR100_STD, cifar100_test_transform, cifar100_train_transform
from dataset.sampling import ContrastSampler
from dataset.synthetic import SyntheticDataset
from dataset.tensor_loader import (Augment, CropFlip, TensorImages, TensorLoader, normalize,
                                   stream_seed, tensor_source)
from engine.options import Parser, add_training_args, default_workers, finalize_training_args
from tests.tolerance import FP32_EXACT, assert_close
import train_student
import train_teacher

pytestmark = pytest.mark.numeric

MEAN = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
STD = torch.tensor(CIFAR100_STD).view(3, 1, 1)


def random_images(n: int, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen).numpy()


def train_set(images: np.ndarray, labels: list[int]) -> SyntheticDataset:
    return SyntheticDataset(images, labels, cifar100_train_transform())


def make_loader(images: np.ndarray, labels: list[int], *, batch_size: int = 8, seed: int = 3, rank: int = 0,
                world: int = 1, augment: bool = True, with_index: bool = True, contrast: ContrastSampler | None = None,
                drop_last: bool = False, device: str = "cpu") -> TensorLoader:
    source = tensor_source(train_set(images, labels))
    assert source is not None and source.augment == Augment(4, 0.5)
    data = TensorImages(source, with_index=with_index, device=device)
    return TensorLoader(data, batch_size, EpochSampler(len(labels), seed, rank, world),
                        augment=source.augment if augment else None, contrast=contrast, seed=seed, rank=rank,
                        drop_last=drop_last)


def torchvision_reference(image: np.ndarray, top: int, left: int, flip: bool) -> torch.Tensor:
    """torchvision's RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor + Normalize for given draws."""
    img = Image.fromarray(image)
    img = TF.crop(TF.pad(img, 4), top, left, 32, 32)
    if flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), CIFAR100_MEAN, CIFAR100_STD)


def test_without_augmentation_images_pass_unchanged():
    images, labels = random_images(20), [i % 5 for i in range(20)]
    loader = make_loader(images, labels, augment=False)
    reference = cifar100_test_transform()
    seen = []
    for img, target, index in loader:
        assert img.dtype == torch.float32 and img.shape[1:] == (3, 32, 32) and target.dtype == torch.int64
        for row, i in enumerate(index.tolist()):
            expected = reference(Image.fromarray(images[i]))
            assert_close(img[row], expected, rtol=FP32_EXACT)
            assert int(target[row]) == labels[i]
        seen += index.tolist()
    assert sorted(seen) == list(range(20))
    # the dataset view: item i is the test transform's image
    item = loader.dataset[7]
    assert_close(item[0], reference(Image.fromarray(images[7])), rtol=FP32_EXACT)
    assert item[1:] == (labels[7], 7)


def test_crop_and_flip_equal_torchvision_for_the_same_draws():
    images = random_images(162, seed=1)
    top = torch.arange(162) % 9
    left = (torch.arange(162) // 9) % 9
    flip = torch.arange(162) >= 81  # every (top, left, flip) once
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    crop_flip = CropFlip(32, 32, 4)
    out = normalize(crop_flip(nchw, top, left, flip), MEAN, STD)
    for i in range(162):
        expected = torchvision_reference(images[i], int(top[i]), int(left[i]), bool(flip[i]))
        assert_close(out[i], expected, rtol=FP32_EXACT, msg=str((int(top[i]), int(left[i]), bool(flip[i]))))
        # and on uint8 tensors, with torchvision's tensor functions
        cropped = TF.crop(TF.pad(nchw[i], [4]), int(top[i]), int(left[i]), 32, 32)
        cropped = TF.hflip(cropped) if flip[i] else cropped
        assert torch.equal(crop_flip(nchw[i:i + 1], top[i:i + 1], left[i:i + 1], flip[i:i + 1])[0], cropped)


def position_images() -> np.ndarray:
    """One image whose red and green channels are row + 1 and column + 1 (0 only in the padding)."""
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    image[0, :, :, 0] = np.arange(1, 33)[:, None]
    image[0, :, :, 1] = np.arange(1, 33)[None, :]
    image[0, :, :, 2] = 7
    return image


def chi_square_p_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's chi-square of ``counts`` against ``probs``: not in the upper 0.1% tail (Wilson-Hilferty)."""
    expected = probs.double() * counts.sum()
    stat = float(((counts.double() - expected) ** 2 / expected).sum())
    dof = counts.numel() - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return z < 3.09  # p > 0.001


def test_crops_and_flips_are_distributed_as_torchvision_draws_them():
    """Read each output's crop offsets and flip back from its pixels: offsets uniform over 0..8,
    x and y independent, flips Bernoulli(0.5) and independent of the offsets."""
    n = 20000
    images = np.repeat(position_images(), n, axis=0)
    loader = make_loader(images, [0] * n, batch_size=1000, seed=11)
    loader.sampler.set_epoch(4)
    tops, lefts, flips = [], [], []
    for img, _, _ in loader:
        pixels = torch.round((img[:, :2, 16, 16:18] * STD[:2, :, 0] + MEAN[:2, :, 0]) * 255)  # uint8 values again
        row = pixels[:, 0, 0] - 1                          # source row of output row 16: top - 4 + 16
        col_a, col_b = pixels[:, 1, 0] - 1, pixels[:, 1, 1] - 1
        flip = col_b < col_a                               # columns run backwards in a flipped crop
        left = torch.where(flip, col_a - 15 + 4, col_a - 16 + 4)  # flipped: output column 16 is crop column 15
        tops.append(row - 12)
        lefts.append(left)
        flips.append(flip)
    top, left, flip = torch.cat(tops).long(), torch.cat(lefts).long(), torch.cat(flips)
    assert top.numel() == n and (int(top.min()), int(top.max()), int(left.min()), int(left.max())) == (0, 8, 0, 8)
    uniform9 = torch.full((9,), 1 / 9)
    assert chi_square_p_ok(torch.bincount(top, minlength=9), uniform9)
    assert chi_square_p_ok(torch.bincount(left, minlength=9), uniform9)
    assert chi_square_p_ok(torch.bincount(top * 9 + left, minlength=81), torch.full((81,), 1 / 81))  # independent
    assert chi_square_p_ok(torch.bincount(flip.long(), minlength=2), torch.full((2,), 0.5))
    joint = torch.bincount(flip.long() * 81 + top * 9 + left, minlength=162)
    assert chi_square_p_ok(joint, torch.full((162,), 1 / 162))
    # the draws are exactly the loader's epoch parameters, by position in the epoch's order
    expected_top, expected_left, expected_flip = loader.epoch_params(4)
    assert torch.equal(top, expected_top) and torch.equal(left, expected_left) and torch.equal(flip, expected_flip)
    # which is how torchvision draws them: RandomCrop.get_params on the padded 40x40 image
    torch.manual_seed(0)
    padded = torch.zeros(3, 40, 40)
    drawn = torch.tensor([transforms.RandomCrop.get_params(padded, (32, 32))[:2] for _ in range(3000)])
    assert chi_square_p_ok(torch.bincount(drawn[:, 0] * 9 + drawn[:, 1], minlength=81), torch.full((81,), 1 / 81))


def test_batches_equal_torchvision_given_the_epoch_draws():
    images, labels = random_images(30, seed=2), [i % 3 for i in range(30)]
    loader = make_loader(images, labels, batch_size=8)
    loader.sampler.set_epoch(2)
    top, left, flip = loader.epoch_params()
    sampler = EpochSampler(30, 3)  # the loader's order of epoch 2
    sampler.set_epoch(2)
    order = list(sampler)
    position = 0
    for img, target, index in loader:
        for row in range(img.shape[0]):
            i = order[position]
            assert int(index[row]) == i and int(target[row]) == labels[i]
            expected = torchvision_reference(images[i], int(top[position]), int(left[position]), bool(flip[position]))
            assert_close(img[row], expected, rtol=FP32_EXACT)
            position += 1
    assert position == 30


def all_batches(loader: TensorLoader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_skipping_batches_leaves_the_rest_of_the_epoch_identical():
    images, labels = random_images(45, seed=3), [i % 5 for i in range(45)]
    contrast = ContrastSampler(torch.tensor(labels), 6, "relax")
    loader = make_loader(images, labels, batch_size=8, contrast=contrast)
    loader.sampler.set_epoch(3)
    whole = all_batches(loader)
    assert len(whole) == len(loader) == 6
    for skipped in (1, 4):
        fresh = make_loader(images, labels, batch_size=8, contrast=ContrastSampler(torch.tensor(labels), 6, "relax"))
        fresh.sampler.set_epoch(3)
        fresh.sampler.skip(skipped * fresh.batch_size)  # what Fit does on a mid-epoch resume
        rest = all_batches(fresh)
        assert len(rest) == len(whole) - skipped
        for a, b in zip(whole[skipped:], rest):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert len(all_batches(fresh)) == len(whole)  # the skip holds for one pass only
    # the same epoch again gives the same batches (no hidden RNG state), another epoch others
    torch.manual_seed(123)
    again = all_batches(loader)
    assert all(torch.equal(x, y) for a, b in zip(whole, again) for x, y in zip(a, b))
    loader.sampler.set_epoch(4)
    assert not torch.equal(all_batches(loader)[0][0], whole[0][0])
    assert loader.generator is None


def test_global_rng_is_not_used():
    images, labels = random_images(20), [i % 4 for i in range(20)]
    loader = make_loader(images, labels, contrast=ContrastSampler(torch.tensor(labels), 5))
    state = torch.get_rng_state()
    all_batches(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_two_ranks_cover_the_epoch_and_draw_their_own_augmentations():
    n, images = 23, random_images(23, seed=4)
    labels = [i % 4 for i in range(n)]
    per_rank = []
    for rank in (0, 1):
        loader = make_loader(images, labels, batch_size=4, rank=rank, world=2)
        loader.sampler.set_epoch(5)
        assert len(loader) == 3  # 12 positions per rank (23 padded to 24)
        per_rank.append(torch.cat([index for _, _, index in loader]))
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(3 + 5))
    padded = torch.cat([permutation, permutation[:1]])
    assert torch.equal(per_rank[0], padded[0::2]) and torch.equal(per_rank[1], padded[1::2])
    assert set(torch.cat(per_rank).tolist()) == set(range(n))
    a = make_loader(images, labels, rank=0, world=2).epoch_params(5)
    b = make_loader(images, labels, rank=1, world=2).epoch_params(5)
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


def test_validation_loader_is_sharded_in_order():
    bundles = []
    for rank in (0, 1):
        source = tensor_source(SyntheticDataset(random_images(11), list(range(11)), cifar100_test_transform()))
        assert source is not None and source.augment is None
        data = TensorImages(source)
        bundles.append(torch.cat([t for _, t in TensorLoader(data, 4, ShardSampler(11, rank, 2))]))
    assert bundles[0].tolist() == list(range(0, 11, 2)) and bundles[1].tolist() == list(range(1, 11, 2))


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_contrast_batches_are_valid(mode):
    images, labels = random_images(60, seed=5), [i % 6 for i in range(60)]
    label_tensor = torch.tensor(labels)
    loader = make_loader(images, labels, batch_size=16, contrast=ContrastSampler(label_tensor, 12, mode))
    batches = all_batches(loader)
    assert len(batches) == 4
    for img, target, index, contrast_idx in batches:
        assert contrast_idx.dtype == torch.int64 and contrast_idx.shape == (index.numel(), 13)
        if mode == "exact":
            assert torch.equal(contrast_idx[:, 0], index)
        else:
            assert torch.equal(label_tensor[contrast_idx[:, 0]], target)
        negatives = contrast_idx[:, 1:]
        assert not (label_tensor[negatives] == target[:, None]).any()
        assert (negatives.sort(1).values.diff(dim=1) > 0).all()
    # different batches draw different negatives
    assert not torch.equal(batches[0][3][:, 1:], batches[1][3][:, 1:])


def test_last_batch_of_one_is_dropped_and_get_dataloaders_chooses_the_loader():
    base = dict(dataset="synthetic", synthetic_classes=5, synthetic_train=5, synthetic_test=2, batch_size=8,
                num_workers=0, subset=0, seed=0)
    needs = DataNeeds(contrast=ContrastNeed(4, "exact"))
    tensor = get_dataloaders(DataOptions(**base), needs)  # default: tensor
    assert isinstance(tensor.train_loader, TensorLoader) and isinstance(tensor.val_loader, TensorLoader)
    assert len(tensor.train_loader) == 3 and tensor.train_loader.drop_last  # 25 = 3 * 8 + 1
    assert sum(b[0].shape[0] for b in tensor.train_loader) == 24
    assert len(tensor.val_loader.dataset) == 10 and tensor.val_loader.dataset[0][0].shape == (3, 32, 32)
    vision = get_dataloaders(DataOptions(**base, loader="torchvision"), needs)
    assert isinstance(vision.train_loader, DataLoader) and len(vision.train_loader) == 3
    # both loaders: the same order, labels and validation images
    assert torch.equal(next(iter(tensor.train_loader))[2], next(iter(vision.train_loader))[2])
    for (a, ta), (b, tb) in zip(tensor.val_loader, vision.val_loader):
        assert_close(a, b, rtol=FP32_EXACT)
        assert torch.equal(ta, tb)
    with pytest.raises(Exception, match="--loader"):
        get_dataloaders(DataOptions(**base, loader="dali"))


def test_stream_seeds_differ():
    seeds = {stream_seed(s, e, r, k) for s in range(5) for e in range(-3, 5) for r in range(3) for k in (1, 2)}
    assert len(seeds) == 5 * 8 * 3 * 2 and all(0 <= s < 2**63 for s in seeds)


def test_num_workers_default_follows_the_loader(monkeypatch):
    parser = Parser()
    add_training_args(parser)
    parser.add_argument("--trial", default="0")

    def workers(*argv):
        return finalize_training_args(parser.parse_args(list(argv)), "resnet8").num_workers

    monkeypatch.setattr("engine.options.available_cores", lambda: 2)
    assert workers() == 0 and workers("--dataset", "synthetic") == 0
    assert workers("--loader", "torchvision") == 1 and workers("--dataset", "imagenet") == 1
    assert workers("--loader", "torchvision", "--num_workers", "3") == 3
    monkeypatch.setattr("engine.options.available_cores", lambda: 32)
    assert default_workers("torchvision") == 8 and default_workers("tensor", "imagenet") == 8
    monkeypatch.setattr("engine.options.available_cores", lambda: 1)
    assert default_workers("torchvision") == 0


TINY = ["--dataset", "synthetic", "--synthetic_classes", "4", "--synthetic_train", "16", "--synthetic_test", "4",
        "--batch_size", "8", "--epochs", "1", "--max_steps", "2", "--device", "cpu"]


@pytest.mark.e2e
@pytest.mark.parametrize("loader", ["tensor", "torchvision"])
def test_scripts_run_with_either_loader(tmp_path, loader):
    flags = TINY + ["--loader", loader, "--num_workers", "0"]
    teacher = train_teacher.main(["--model", "resnet8", *flags, "--save_folder", str(tmp_path / "t")])
    assert teacher["status"] == "stopped" and teacher["steps"] == 2
    path = next((tmp_path / "t").glob("*/resnet8_last.pth"))
    student = train_student.main(["--path_t", str(path), "--model_s", "resnet8", "--distill", "crd",
                                  "--nce_k", "8", *flags, "--save_folder", str(tmp_path / "s")])
    assert student["status"] == "stopped" and math.isfinite(student["history"][0]["loss_crd"])
