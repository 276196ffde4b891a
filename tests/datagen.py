"""Small fake data sets on disk, in the exact formats the real ones use, for tests.

``write_fake_cifar100(root)`` writes ``root/cifar-100-python/{train,test,meta}`` as torchvision
reads them; ``write_fake_imagenet(root)`` writes ``root/train/<class>/*.JPEG`` and
``root/val/<class>/*.JPEG``. Both return ``root``, the folder to pass as ``--data_folder``.
Images are random but class-dependent (each class has its own mean colour).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

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
