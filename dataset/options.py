"""The data options of the training scripts, declared once (their flags are generated from them)."""
from __future__ import annotations

from dataclasses import dataclass

from common.argtypes import int_at_least, nonnegative_float, nonnegative_int, positive_int
from common.declare import option

DATASETS = ("cifar100", "cifar10", "stl10", "tinyimagenet", "imagenet", "synthetic", "paired")
LOADERS = ("tensor", "torchvision")
SPLITS = ("train", "unlabeled")


@dataclass
class SyntheticOptions:
    """the synthetic data set (--dataset synthetic)"""

    synthetic_classes: int = option(100, "number of classes", type=int_at_least(2, name="synthetic_classes"))
    synthetic_train: int = option(100, "training images per class", type=positive_int)
    synthetic_test: int = option(20, "test images per class", type=positive_int)
    synthetic_difficulty: float = option(1.0, "strength of warps, blending and noise (0: bare class prototypes)",
                                         type=nonnegative_float)
    synthetic_seed: int = option(0, "seed of the images (fixed apart from --seed, so teachers and students share data)",
                                 type=int)


@dataclass
class DataOptions(SyntheticOptions):
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
