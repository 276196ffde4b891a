"""One registry per extension point: a data set registers itself in one call (its name, opener,
tensor support, views, splits, options) and trains; a backbone declares its recipe's learning
rate beside its constructor."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import train_teacher
from common.declare import option
from common.errors import UserError
from dataset import (DATASETS, TENSOR_DATASETS, UNLABELED_SETS, DataNeeds, DataOptions, SyntheticOptions,
                     get_dataloaders)
from dataset.cifar100 import cifar100_test_transform, cifar100_train_transform
from dataset.registry import (dataset_names, get_dataset, register_dataset, sets_with_split, tensor_sets,
                              unregister_dataset)
from dataset.synthetic import SyntheticDataset
from dataset.tensor_loader import TensorLoader
from engine.optim import learning_rate_help
from engine.options import default_workers, finalize_training_args
from models import default_learning_rate, model_dict
from models.recipe import recipe
from models.resnet import resnet8

CLASSES, PER_CLASS = 3, 4


def open_tiny(data: DataOptions) -> tuple:
    """Three classes of random 32x32 images, four per class and split, held as CIFAR's are."""
    gen = np.random.default_rng(0)
    labels = [i % CLASSES for i in range(CLASSES * PER_CLASS)]
    train_x, test_x = (gen.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8) for _ in range(2))
    train = SyntheticDataset(train_x, labels, cifar100_train_transform())
    test = SyntheticDataset(test_x, labels, cifar100_test_transform())
    return train, test, torch.tensor(labels), CLASSES


@pytest.fixture
def tiny():
    register_dataset("tiny", tensor=True)(open_tiny)
    yield "tiny"
    unregister_dataset("tiny")


def test_the_built_in_sets_are_registered_in_their_order():
    assert dataset_names() == DATASETS == ("cifar100", "cifar10", "stl10", "tinyimagenet", "imagenet", "synthetic",
                                           "paired")
    assert tensor_sets() == TENSOR_DATASETS == ("cifar100", "cifar10", "stl10", "tinyimagenet", "synthetic", "paired")
    assert sets_with_split("unlabeled") == UNLABELED_SETS == ("stl10", "synthetic", "paired")
    assert get_dataset("synthetic").options is SyntheticOptions and issubclass(DataOptions, SyntheticOptions)
    assert get_dataset("paired").views and not get_dataset("cifar100").views


@pytest.mark.parametrize("loader", ["tensor", "torchvision"])
def test_a_registered_set_loads(tiny, loader):
    assert dataset_names()[-1] == tiny and default_workers("tensor", tiny) == 0
    bundle = get_dataloaders(DataOptions(dataset=tiny, batch_size=4, num_workers=0, seed=0, loader=loader),
                             DataNeeds(index=True))
    assert (bundle.n_data, bundle.num_classes) == (CLASSES * PER_CLASS, CLASSES)
    assert isinstance(bundle.train_loader, TensorLoader) == (loader == "tensor")
    img, target, index = next(iter(bundle.train_loader))
    assert img.shape == (4, 3, 32, 32) and target.shape == index.shape == (4,)
    with pytest.raises(UserError, match="no unlabelled split: --split unlabeled needs one of stl10, synthetic, paired"):
        get_dataloaders(DataOptions(dataset=tiny, split="unlabeled"))


def test_a_registered_set_trains_with_train_teacher(tiny, tmp_path):
    results = train_teacher.main(["--model", "resnet8", "--dataset", tiny, "--epochs", "1", "--max_steps", "1",
                                  "--batch_size", "4", "--save_folder", str(tmp_path)])
    assert results["steps"] == 1
    args = json.loads((tmp_path / "resnet8_tiny_lr_0.05_decay_0.0005_trial_0" / "args.json").read_text())
    assert args["dataset"] == tiny and args["num_workers"] == 0


def test_an_unregistered_set_is_refused(tiny):
    unregister_dataset(tiny)
    with pytest.raises(UserError, match=f"unknown data set 'tiny': choose one of {', '.join(DATASETS)}$"):
        get_dataloaders(DataOptions(dataset=tiny))
    register_dataset(tiny, tensor=True)(open_tiny)  # for the fixture's unregister


def test_registration_mistakes_are_programming_errors(tiny):
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset(tiny)(lambda data: ())
    with pytest.raises(ValueError, match="splits"):
        register_dataset("other", splits=("unlabeled",))
    assert "other" not in dataset_names()


def test_options_of_a_set_registered_after_data_options_was_made_are_caught():
    @dataclass
    class LateOptions:
        """late"""

        late_size: int = option(1, "size")

    register_dataset("late", options=LateOptions)(open_tiny)
    try:
        assert not any(f.name == "late_size" for f in dataclasses.fields(DataOptions))
        with pytest.raises(TypeError, match="LateOptions"):
            get_dataloaders(DataOptions(dataset="late"))
    finally:
        unregister_dataset("late")


def test_backbones_declare_their_learning_rate(monkeypatch):
    assert {name: default_learning_rate(name) for name in ("MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet8",
                                                             "ResNet18", "")} == {
        "MobileNetV2": 0.01, "ShuffleV1": 0.01, "ShuffleV2": 0.01, "resnet8": 0.05, "ResNet18": 0.05, "": 0.05}
    assert learning_rate_help() == "learning rate (default 0.05; 0.01 for MobileNetV2/ShuffleV1/ShuffleV2)"

    @recipe(learning_rate=0.02)
    def slow_resnet8(num_classes: int = 100, **kwargs):
        return resnet8(num_classes=num_classes, **kwargs)

    monkeypatch.setitem(model_dict, "slow_resnet8", slow_resnet8)
    opt = train_teacher.parse_option(["--model", "slow_resnet8", "--dataset", "synthetic"])
    assert opt.learning_rate == 0.02 and opt.model_name.startswith("slow_resnet8_synthetic_lr_0.02_")
    assert "0.02 for slow_resnet8" in learning_rate_help()
    given = finalize_training_args(train_teacher.build_parser().parse_args(["--learning_rate", "0.3"]), "slow_resnet8")
    assert given.learning_rate == 0.3
