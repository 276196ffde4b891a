"""Small fake data sets on disk, in the exact formats the real ones use, for tests.

``write_fake_cifar100(root)`` writes ``root/cifar-100-python/{train,test,meta}`` as torchvision
reads them, ``write_fake_cifar10(root)`` ``root/cifar-10-batches-py/``; ``write_fake_imagenet(root)``
writes ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``; ``write_fake_stl10(root)``
writes ``root/stl10_binary/`` (raw column-major planes); ``write_fake_tinyimagenet(root)`` writes
``root/tiny-imagenet-200/`` as distributed (flat ``val/images`` + ``val_annotations.txt``).
All return ``root``, the folder to pass as ``--data_folder``.
Images are random but class-dependent (each class has its own mean colour). ``SYNTHETIC``: the
flags of a tiny run on the built-in synthetic set.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# The flags of a tiny run on the synthetic set: 4 classes of 16 training and 4 test images each,
# batches of 8 (8 steps an epoch), no loader workers, on the CPU. The session's teacher
# (tests/conftest.py) is trained on it; tests that need other sizes write their own.
SYNTHETIC = ["--dataset", "synthetic", "--synthetic_classes", "4", "--synthetic_train", "16", "--synthetic_test", "4",
             "--batch_size", "8", "--num_workers", "0", "--device", "cpu"]
CIFAR_CLASSES = 100
CIFAR_SUPERCLASSES = 20


def _class_images(rng: np.random.Generator, labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[n, height, width, 3]``: a per-class colour plus noise."""
    colours = np.random.default_rng(12345).integers(40, 216, size=(int(labels.max()) + 1, 3))
    noise = rng.integers(-40, 41, size=(labels.size, height, width, 3))
    return np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def write_fake_cifar100(root: str | Path, n_train_per_class: int = 2, n_test_per_class: int = 1,
                        seed: int = 0) -> Path:
    """Write a CIFAR-100 folder in torchvision's on-disk format with the given number of
    images per class (sample ``i`` has fine label ``i % 100``); returns ``root``."""
    root = Path(root)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        fine = np.tile(np.arange(CIFAR_CLASSES), per_class)
        images = _class_images(rng, fine, 32, 32)
        entry = {
            "filenames": [f"fake_{name}_{i}.png" for i in range(fine.size)],
            "batch_label": f"fake {name} batch",
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // (CIFAR_CLASSES // CIFAR_SUPERCLASSES)).tolist(),
            "data": images.transpose(0, 3, 1, 2).reshape(fine.size, 3 * 32 * 32),  # channel planes
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    meta = {"fine_label_names": [f"fine_{i:02d}" for i in range(CIFAR_CLASSES)],
            "coarse_label_names": [f"coarse_{i:02d}" for i in range(CIFAR_SUPERCLASSES)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f)
    return root


def write_fake_cifar10(root: str | Path, n_train_per_class: int = 2, n_test_per_class: int = 1,
                       seed: int = 0) -> Path:
    """Write a CIFAR-10 folder in torchvision's on-disk format (five training batches, which
    share the training images in turn, ``test_batch``, ``batches.meta``); sample ``i`` of a split
    has label ``i % 10``. Returns ``root``."""
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = np.tile(np.arange(10), n_train_per_class)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    parts = [(name, train[i::5]) for i, name in enumerate(names)] + [("test_batch", np.tile(np.arange(10),
                                                                                             n_test_per_class))]
    for name, labels in parts:
        images = _class_images(rng, labels, 32, 32) if labels.size else np.zeros((0, 32, 32, 3), np.uint8)
        entry = {"batch_label": f"fake {name}", "labels": labels.tolist(),
                 "filenames": [f"fake_{name}_{i}.png" for i in range(labels.size)],
                 "data": images.transpose(0, 3, 1, 2).reshape(labels.size, 3 * 32 * 32)}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": 10000,
                     "num_vis": 3072}, f)
    return root


STL10_SIDE = 96


def stl10_bytes(images: np.ndarray) -> bytes:
    """uint8 ``[n, 96, 96, 3]`` (row, column, channel) as an STL-10 image file stores them: per image
    three channel planes, each written column by column (byte ``c * 9216 + x * 96 + y`` is pixel
    ``(y, x)`` of channel ``c``)."""
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def write_fake_stl10(root: str | Path, n_train_per_class: int = 1, n_test_per_class: int = 1,
                     n_unlabeled: int = 6, seed: int = 0) -> Path:
    """Write ``root/stl10_binary/`` in STL-10's format: ``{train,test}_X.bin`` (see
    :func:`stl10_bytes`), ``{train,test}_y.bin`` (labels 1..10, sample ``i`` has class
    ``i % 10`` + 1), ``unlabeled_X.bin`` and ``class_names.txt``. Returns ``root``."""
    root = Path(root)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = np.tile(np.arange(10), per_class)
        (folder / f"{name}_X.bin").write_bytes(stl10_bytes(_class_images(rng, labels, STL10_SIDE, STL10_SIDE)))
        (folder / f"{name}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    unlabeled = _class_images(rng, np.arange(n_unlabeled) % 10, STL10_SIDE, STL10_SIDE)
    (folder / "unlabeled_X.bin").write_bytes(stl10_bytes(unlabeled))
    (folder / "class_names.txt").write_text("\n".join(f"stl_{i}" for i in range(10)) + "\n")
    return root


TINY_WNIDS = ("n09999999", "n01443537", "n05000000")  # unsorted, as the real wnids.txt


def write_fake_tinyimagenet(root: str | Path, wnids: Sequence[str] = TINY_WNIDS, train_per_class: int = 2,
                            val_per_class: int = 1, seed: int = 0) -> Path:
    """Write ``root/tiny-imagenet-200/`` as distributed: ``wnids.txt`` (in the given, unsorted order),
    ``train/<wnid>/images/<wnid>_<j>.JPEG`` and ``train/<wnid>/<wnid>_boxes.txt``, the flat
    ``val/images/val_<k>.JPEG`` (classes interleaved) with ``val/val_annotations.txt``; 64x64 JPEGs.
    Class colours follow the sorted wnids. Returns ``root``."""
    root = Path(root)
    folder = root / "tiny-imagenet-200"
    rng = np.random.default_rng(seed)
    ordered = sorted(wnids)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True, exist_ok=True)
        pixels = _class_images(rng, np.full(train_per_class, ordered.index(wnid)), 64, 64)
        for j, image in enumerate(pixels):
            Image.fromarray(image).save(images / f"{wnid}_{j}.JPEG", format="JPEG", quality=90)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{j}.JPEG\t0\t0\t63\t63\n" for j in range(train_per_class)))
    val = folder / "val" / "images"
    val.mkdir(parents=True, exist_ok=True)
    labels = np.tile(np.arange(len(wnids)), val_per_class)  # positions in the given (unsorted) order
    lines = []
    for k, position in enumerate(labels):
        wnid = wnids[position]
        pixels = _class_images(rng, np.array([ordered.index(wnid)]), 64, 64)[0]
        Image.fromarray(pixels).save(val / f"val_{k}.JPEG", format="JPEG", quality=90)
        lines.append(f"val_{k}.JPEG\t{wnid}\t1\t2\t60\t61\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    return root


def write_fake_imagenet(root: str | Path, classes: int = 3, train_per_class: Sequence[int] = (4, 2, 3),
                        val_per_class: int = 2, image_size: tuple[int, int] = (48, 40),
                        seed: int = 0) -> Path:
    """Write an ImageNet-style folder of real JPEG files: ``classes`` class folders (WordNet-like
    names) in ``train/`` and ``val/``; class ``c`` gets ``train_per_class[c % len(...)]``
    training images (unequal counts by default) and ``val_per_class`` validation images of
    ``image_size`` (width, height). Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    width, height = image_size
    for split in ("train", "val"):
        for c in range(classes):
            count = train_per_class[c % len(train_per_class)] if split == "train" else val_per_class
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            images = _class_images(rng, np.full(count, c), height, width)
            for j, pixels in enumerate(images):
                Image.fromarray(pixels).save(folder / f"n{c:08d}_{j}.JPEG", format="JPEG", quality=90)
    return root
