"""CIFAR-100 through torchvision, with clear errors, plus RepDistiller's names for its loaders.

On disk: ``<data_folder>/cifar-100-python/{train,test,meta}`` (torchvision's format, the
unpacked ``cifar-100-python.tar.gz``). The files are checked for presence and format, not md5
(torchvision verifies the archive's md5 when it downloads it).
"""
from __future__ import annotations

import argparse
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from helper.errors import UserError

from .loaders import make_bundle
from .sampling import ContrastSampler

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
DEFAULT_FOLDER = "./data"
NUM_CLASSES = 100


def cifar100_train_transform() -> transforms.Compose:
    """RepDistiller's training transform: random crop (pad 4), horizontal flip, normalise."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
    ])


def cifar100_test_transform() -> transforms.Compose:
    """RepDistiller's test transform: to tensor and normalise."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)])


class CIFAR100Folder(datasets.CIFAR100):
    """torchvision's CIFAR100 that explains what is wrong instead of raising a traceback.

    A missing folder, a failed download and a corrupt file each raise one :class:`UserError`.
    Items are ``(img, target)``.
    """

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None,
                 target_transform: Callable | None = None, download: bool = False):
        root = Path(root).expanduser()
        folder = root / self.base_folder
        if not download and not self._files_present(root):
            raise UserError(
                f"CIFAR-100 not found in {root}: pass --download to fetch it, or --data_folder to "
                f"point at a folder that holds {self.base_folder}/ (with train, test and meta)")
        try:
            super().__init__(str(root), train=train, transform=transform,
                             target_transform=target_transform, download=download)
        except UserError:
            raise
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError,
                IndexError, UnicodeDecodeError, OSError, MemoryError, RuntimeError) as err:
            raise UserError(
                f"CIFAR-100 files in {folder} are corrupt or not in torchvision's format "
                f"({type(err).__name__}: {err}): delete that folder and run again with --download"
            ) from err
        self._check_format(folder)

    def _files_present(self, root: Path) -> bool:
        names = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all((root / self.base_folder / name).is_file() for name in names)

    def _check_integrity(self) -> bool:
        # presence only: md5 is checked by torchvision on the downloaded archive
        return self._files_present(Path(self.root))

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as infile:
            meta = pickle.load(infile, encoding="latin1")
        self.classes = list(meta[self.meta["key"]])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def _check_format(self, folder: Path) -> None:
        problem = None
        labels = np.asarray(self.targets)
        if self.data.dtype != np.uint8 or self.data.shape[1:] != (32, 32, 3):
            problem = f"images of dtype {self.data.dtype} and shape {self.data.shape[1:]}"
        elif labels.shape != (len(self.data),) or labels.dtype.kind not in "iu":
            problem = f"{len(self.data)} images but labels of shape {labels.shape} and dtype {labels.dtype}"
        elif len(self.classes) != NUM_CLASSES:
            problem = f"{len(self.classes)} class names instead of {NUM_CLASSES}"
        elif labels.size and not (labels.min() >= 0 and labels.max() < NUM_CLASSES):
            problem = f"labels outside 0..{NUM_CLASSES - 1}"
        if problem:
            raise UserError(f"CIFAR-100 files in {folder} are not valid ({problem}): "
                            "delete that folder and run again with --download")

    def download(self) -> None:
        """Fetch and unpack the archive with torchvision (md5-checked) unless the files exist."""
        if self._check_integrity():
            return
        try:
            super().download()
        except (OSError, RuntimeError, tarfile.TarError, EOFError, ValueError) as err:
            raise UserError(
                f"could not download CIFAR-100 from {self.url} into {self.root} "
                f"({type(err).__name__}: {err}): check the network connection, or unpack "
                f"{self.filename} into that folder yourself") from err


class CIFAR100Instance(CIFAR100Folder):
    """RepDistiller's CIFAR100Instance: items are ``(img, target, index)``."""

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        img, target = super().__getitem__(index)
        return img, target, index


class CIFAR100InstanceSample(CIFAR100Folder):
    """RepDistiller's CIFAR100InstanceSample: items are ``(img, target, index, sample_idx)``, with
    ``sample_idx`` LongTensor ``[k+1]`` (the positive, then k negatives of other classes, drawn
    by :class:`ContrastSampler` without replacement), or ``(img, target, index)`` when not
    ``is_sample``. ``percent`` < 1 restricts each class's negatives to a fixed random share.
    """

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None,
                 target_transform: Callable | None = None, download: bool = False,
                 k: int = 4096, mode: str = "exact", is_sample: bool = True, percent: float = 1.0):
        super().__init__(root, train=train, transform=transform,
                         target_transform=target_transform, download=download)
        self.k, self.mode, self.is_sample = k, mode, is_sample
        self.sampler = ContrastSampler(torch.as_tensor(self.targets), k, mode, percent) if is_sample else None

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        img, target = super().__getitem__(index)
        if self.sampler is None:
            return img, target, index
        return img, target, index, self.sampler(torch.tensor([index]))[0]


def open_cifar100(opt: Any) -> tuple[CIFAR100Folder, CIFAR100Folder, torch.Tensor, int]:
    """The training and test sets (reference transforms), the training labels and 100."""
    root = getattr(opt, "data_folder", None) or DEFAULT_FOLDER
    download = bool(getattr(opt, "download", False))
    train_set = CIFAR100Folder(root, train=True, transform=cifar100_train_transform(), download=download)
    test_set = CIFAR100Folder(root, train=False, transform=cifar100_test_transform())
    return train_set, test_set, torch.as_tensor(train_set.targets, dtype=torch.long), NUM_CLASSES


def _compat_bundle(batch_size: int, num_workers: int, data_folder: str, download: bool, **extra: Any):
    opt = argparse.Namespace(dataset="cifar100", data_folder=data_folder, download=download,
                             loader="torchvision", batch_size=batch_size, num_workers=num_workers,
                             subset=0, seed=None,
                             nce_k=extra.pop("k", 4096), mode=extra.pop("mode", "exact"))
    train_set, test_set, labels, num_classes = open_cifar100(opt)
    # RepDistiller's test loader: half the batch size and half the workers
    return make_bundle(train_set, test_set, labels, num_classes, opt,
                       val_batch_size=max(1, batch_size // 2), val_workers=num_workers // 2, **extra)


def get_cifar100_dataloaders(batch_size: int = 128, num_workers: int = 8, is_instance: bool = False,
                             *, data_folder: str = DEFAULT_FOLDER, download: bool = True
                             ) -> tuple[DataLoader, DataLoader] | tuple[DataLoader, DataLoader, int]:
    """RepDistiller's loader function: ``(train_loader, test_loader)``, or with ``is_instance``
    ``(train_loader, test_loader, n_data)`` and training batches ``(img, target, index)``."""
    bundle = _compat_bundle(batch_size, num_workers, data_folder, download, instance=is_instance)
    if is_instance:
        return bundle.train_loader, bundle.val_loader, bundle.n_data
    return bundle.train_loader, bundle.val_loader


def get_cifar100_dataloaders_sample(batch_size: int = 128, num_workers: int = 8, k: int = 4096,
                                    mode: str = "exact", is_sample: bool = True, percent: float = 1.0,
                                    *, data_folder: str = DEFAULT_FOLDER, download: bool = True
                                    ) -> tuple[DataLoader, DataLoader, int]:
    """RepDistiller's CRD loader function: ``(train_loader, test_loader, n_data)`` with training
    batches ``(img, target, index, contrast_idx)`` (``(img, target, index)`` if not ``is_sample``)."""
    bundle = _compat_bundle(batch_size, num_workers, data_folder, download, k=k, mode=mode,
                            instance=True, contrast=is_sample, negative_fraction=percent)
    return bundle.train_loader, bundle.val_loader, bundle.n_data
