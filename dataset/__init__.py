"""Data for RepDistill: CIFAR-100, CIFAR-10, STL-10, Tiny-ImageNet, ImageNet folders, the built-in
synthetic set and paired sets.

``get_dataloaders(DataOptions, DataNeeds)`` is what the training scripts call; RepDistiller's loader
functions and dataset classes keep their names in :mod:`dataset.cifar100` and :mod:`dataset.imagenet`.
"""
from __future__ import annotations

from typing import Callable

import torch

from common.errors import UserError

from .cifar100 import open_cifar10, open_cifar100
from .imagenet import open_imagenet
from .loaders import DataBundle, make_bundle
from .needs import ContrastNeed, DataNeeds
from .options import DATASETS, LOADERS, DataOptions, SyntheticOptions
from .paired import open_paired
from .sampling import ContrastSampler
from .stl10 import open_stl10
from .synthetic import open_synthetic
from .tinyimagenet import open_tinyimagenet
from .views import ViewLayout

# the sets that --loader tensor serves (held in memory as uint8 arrays); imagenet always uses
# torchvision's folder loader
TENSOR_DATASETS = ("cifar100", "cifar10", "stl10", "tinyimagenet", "synthetic", "paired")

_OPENERS: dict[str, Callable[[DataOptions], tuple]] = {
    "cifar100": open_cifar100,
    "cifar10": open_cifar10,
    "stl10": open_stl10,
    "tinyimagenet": open_tinyimagenet,
    "imagenet": open_imagenet,
    "synthetic": open_synthetic,
    "paired": open_paired,
}
# the openers that take the run's views as a second argument (they read only the folders those need)
_VIEW_OPENERS = ("paired",)

# the sets that have an unlabelled training split (--split unlabeled)
UNLABELED_SETS = ("stl10", "synthetic", "paired")

__all__ = ["DATASETS", "LOADERS", "TENSOR_DATASETS", "UNLABELED_SETS", "ContrastNeed", "ContrastSampler",
           "DataBundle", "DataNeeds", "DataOptions", "SyntheticOptions", "ViewLayout", "get_dataloaders"]


def get_dataloaders(data: DataOptions, needs: DataNeeds = DataNeeds(),
                    device: torch.device | str | None = None) -> DataBundle:
    """The loaders for ``data.dataset`` (one of :data:`DATASETS`), their training batches
    carrying what ``needs`` (the method's) asks for; see :func:`dataset.loaders.make_bundle`.

    ``data.data_folder`` None means ``./data`` (``./data/imagenet`` for imagenet);
    ``data.loader`` ``tensor`` (the default) serves :data:`TENSOR_DATASETS` with the tensor
    pipeline, whose batches are made on ``device`` (default the CPU). The validation loader uses
    ``data.batch_size`` and is not shuffled. Both loaders' ``img`` carry ``needs.views``
    concatenated as channels (:class:`dataset.views.ViewLayout`).
    """
    if data.dataset not in _OPENERS:
        raise UserError(f"unknown data set {data.dataset!r}: choose one of {', '.join(DATASETS)}")
    if data.split == "unlabeled" and data.dataset not in UNLABELED_SETS:
        raise UserError(f"--dataset {data.dataset} has no unlabelled split: --split unlabeled needs one of "
                        f"{', '.join(UNLABELED_SETS)}")
    opener = _OPENERS[data.dataset]
    opened = opener(data, needs.views) if data.dataset in _VIEW_OPENERS else opener(data)  # type: ignore[call-arg]
    train_set, val_set, train_labels, num_classes = opened
    return make_bundle(train_set, val_set, train_labels, num_classes, data, needs, device=device)
