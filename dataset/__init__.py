"""Data for RepDistill: CIFAR-100, CIFAR-10, STL-10, Tiny-ImageNet, ImageNet folders, the built-in
synthetic set and paired sets.

``get_dataloaders(DataOptions, DataNeeds)`` is what the training scripts call; RepDistiller's loader
functions and dataset classes keep their names in :mod:`dataset.cifar100` and :mod:`dataset.imagenet`.

Each data set registers itself in its own file (:func:`dataset.registry.register_dataset`);
adding one is that file and its import below, whose order is the order ``--dataset`` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.argtypes import nonnegative_int, positive_int
from common.declare import option
from common.errors import UserError

from . import cifar100, stl10, tinyimagenet, imagenet, synthetic, paired  # noqa: F401  (each registers its sets)
from .loaders import DataBundle, make_bundle
from .needs import ContrastNeed, DataNeeds
from .options import LOADERS, SPLITS
from .registry import dataset_names, get_dataset, option_groups, register_dataset, sets_with_split, tensor_sets
from .sampling import ContrastSampler
from .synthetic import SyntheticOptions
from .views import ViewLayout

# the registered sets (in --dataset's order), those that --loader tensor serves (held in memory as
# uint8 arrays; imagenet always uses torchvision's folder loader) and those with an unlabelled
# training split (--split unlabeled); the registry answers for sets registered later
DATASETS = dataset_names()
TENSOR_DATASETS = tensor_sets()
UNLABELED_SETS = sets_with_split("unlabeled")

__all__ = ["DATASETS", "LOADERS", "TENSOR_DATASETS", "UNLABELED_SETS", "ContrastNeed", "ContrastSampler",
           "DataBundle", "DataNeeds", "DataOptions", "SyntheticOptions", "ViewLayout", "get_dataloaders",
           "register_dataset"]


@dataclass
class DataOptions(*reversed(option_groups())):  # type: ignore[misc]  # bases: the sets' groups, first last
    """data"""

    dataset: str = option("cifar100", f"data set: {', '.join(DATASETS)}")
    data_folder: str | None = option(None, "where the data set lives (default ./data, holding cifar-100-python/, "
                                     "cifar-10-batches-py/, stl10_binary/ or tiny-imagenet-200/; ./data/imagenet for "
                                     "imagenet; paired: DIR/<view folder>/<split>/<class>/<file>)", resumable=True)
    download: bool = option(False, "download CIFAR-100, CIFAR-10 or STL-10 into --data_folder if missing (STL-10's "
                            "files are then checked against the published MD5s)", resumable=True)
    allow_modified_data: bool = option(False, "read CIFAR-100/CIFAR-10 files whose MD5 is not the published one (a "
                                       "copy you modified on purpose); they are still read without running code",
                                       resumable=True)
    loader: str = option("tensor", "tensor: whole set as a uint8 tensor on the device, crop/flip/normalise per batch "
                         "with tensor ops (every set but imagenet, which always uses torchvision's folder loader); "
                         "torchvision: DataLoader with PIL transforms in worker processes", choices=LOADERS)
    split: str = option("train", "training split: train (labelled), or unlabeled (images without labels: "
                        "distillation without cross-entropy; stl10: its 100,000 unlabelled images; synthetic: a "
                        "further set rendered from the same classes)",
                        choices=SPLITS)
    batch_size: int = option(64, "batch size", type=positive_int)
    num_workers: int | None = option(None, "data-loading worker processes of the torchvision loader (default: 0 "
                                     "with --loader tensor, which needs none; else min(8, cores - 1))",
                                     type=nonnegative_int, resumable=True)
    subset: int = option(0, "train on a class-balanced subset of N samples (0: all)", type=nonnegative_int)
    val_subset: int = option(0, "validate on a class-balanced subset of N test samples (0: all; for smoke tests)",
                             type=nonnegative_int)
    val_split: int = option(0, "hold out N class-balanced training images (the same for every --seed), never trained "
                            "on, and choose the best checkpoint by their top-1 instead of the test set's (0: none; "
                            "RepDistiller's best-on-test)", type=nonnegative_int)
    seed: int | None = option(None, "random seed (default: the trial number)", type=int)


def get_dataloaders(data: DataOptions, needs: DataNeeds = DataNeeds(),
                    device: torch.device | str | None = None) -> DataBundle:
    """The loaders for ``data.dataset`` (a registered set, see :mod:`dataset.registry`), their
    training batches carrying what ``needs`` (the method's) asks for; see
    :func:`dataset.loaders.make_bundle`.

    ``data.data_folder`` None means ``./data`` (``./data/imagenet`` for imagenet);
    ``data.loader`` ``tensor`` (the default) serves the sets held in memory with the tensor
    pipeline, whose batches are made on ``device`` (default the CPU). The validation loader uses
    ``data.batch_size`` and is not shuffled. Both loaders' ``img`` carry ``needs.views``
    concatenated as channels (:class:`dataset.views.ViewLayout`).
    """
    spec = get_dataset(data.dataset)
    if data.split not in spec.splits:  # every set has "train"
        raise UserError(f"--dataset {data.dataset} has no unlabelled split: --split unlabeled needs one of "
                        f"{', '.join(sets_with_split('unlabeled'))}")
    if spec.options is not None and not isinstance(data, spec.options):
        raise TypeError(f"--dataset {spec.name}: the data options lack its {spec.options.__name__} (register it "
                        "in a file that dataset/__init__.py imports)")
    train_set, val_set, train_labels, num_classes = spec.open(data, needs.views)
    return make_bundle(train_set, val_set, train_labels, num_classes, data, needs, device=device)
