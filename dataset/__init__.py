"""Data for RepDistill: CIFAR-100, ImageNet folders and the built-in synthetic set.

``get_dataloaders(opt)`` is what the training scripts call; RepDistiller's loader functions and
dataset classes keep their names in :mod:`dataset.cifar100` and :mod:`dataset.imagenet`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from helper.errors import UserError

from .cifar100 import open_cifar100
from .imagenet import open_imagenet
from .loaders import LOADERS, DataBundle, make_bundle
from .sampling import ContrastSampler
from .synthetic import open_synthetic

DATASETS = ("cifar100", "imagenet", "synthetic")
# the sets that --loader tensor serves (held in memory as uint8 arrays); imagenet always uses
# torchvision's folder loader
TENSOR_DATASETS = ("cifar100", "synthetic")

_OPENERS: dict[str, Callable[[Any], tuple]] = {
    "cifar100": open_cifar100,
    "imagenet": open_imagenet,
    "synthetic": open_synthetic,
}

__all__ = ["DATASETS", "LOADERS", "TENSOR_DATASETS", "DataBundle", "ContrastSampler", "get_dataloaders"]


def get_dataloaders(opt: Any, *, instance: bool = False, contrast: bool = False,
                    device: torch.device | str | None = None) -> DataBundle:
    """The loaders for ``opt.dataset`` (one of :data:`DATASETS`).

    ``opt`` is the scripts' argparse namespace: ``dataset``, ``data_folder`` (None: ``./data``
    for cifar100, ``./data/imagenet`` for imagenet), ``download``, ``loader`` (``tensor``, the
    default: for :data:`TENSOR_DATASETS` the tensor pipeline, whose batches are made on ``device``,
    default the CPU; ``torchvision``: DataLoaders with workers), ``batch_size``,
    ``num_workers``, ``subset`` (0/None: the whole training set), ``val_subset`` (0/None: the
    whole validation set), ``seed``, ``nce_k`` and ``mode``. With ``instance`` the training batches carry ``index``; with ``contrast`` also
    ``contrast_idx`` ``[B, nce_k + 1]``. The validation loader uses ``batch_size`` and is not
    shuffled.
    """
    name = getattr(opt, "dataset", "cifar100")
    if name not in _OPENERS:
        raise UserError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    train_set, val_set, train_labels, num_classes = _OPENERS[name](opt)
    return make_bundle(train_set, val_set, train_labels, num_classes, opt,
                       instance=instance, contrast=contrast, device=device)
