"""Command-line flags shared by train_teacher.py and train_student.py (RepDistiller's, plus ours);
the data's flags come from :class:`dataset.DataOptions`, declared once."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from dataset import DATASETS, TENSOR_DATASETS, DataOptions
from helper.argtypes import momentum_float, nonfinite_floats, nonnegative_float, nonnegative_int, positive_float, positive_int
from helper.declare import add_option_groups
from helper.errors import UserError
from helper.runtime import RuntimeOptions

# RepDistiller trains these students with lr 0.01 instead of 0.05.
SMALL_LR_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``error: ...``) with exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parsing, then a check that no float option is NaN or infinite (flags with a
        checked ``type=`` from :mod:`helper.argtypes` refuse them already; this covers any other)."""
        namespace, extras = super().parse_known_args(args, namespace)
        flags = {action.dest: "/".join(action.option_strings) for action in self._actions}
        for dest, value in nonfinite_floats(namespace):
            self.error(f"argument {flags.get(dest) or dest}: expected a finite number, got {value!r}")
        return namespace, extras


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(loader: str = "torchvision", dataset: str = "cifar100") -> int:
    """``--num_workers`` when not given: 0 for the tensor pipeline (it needs no workers); else
    one core left to the training process, at most 8, and at least 1 when there are two cores."""
    if loader == "tensor" and dataset in TENSOR_DATASETS:
        return 0
    cores = available_cores()
    return min(8, cores - 1) if cores > 1 else 0


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Flags for optimisation, data, device and run control, with RepDistiller's defaults."""
    g = parser.add_argument_group("RepDistiller flags")
    g.add_argument("--print_freq", type=positive_int, default=100,
                   help="print frequency (steps; kept for compatibility)")
    g.add_argument("--tb_freq", type=positive_int, default=500, help="tensorboard frequency (kept for compatibility)")
    g.add_argument("--save_freq", type=positive_int, default=40, help="write ckpt_epoch_N.pth every this many epochs")
    g.add_argument("--epochs", type=positive_int, default=240, help="number of training epochs")
    g.add_argument("--learning_rate", type=positive_float, default=None,
                   help="learning rate (default 0.05; 0.01 for MobileNetV2/ShuffleV1/ShuffleV2)")
    g.add_argument("--lr_decay_epochs", type=str, default="150,180,210",
                   help="epochs after which the learning rate is multiplied by --lr_decay_rate")
    g.add_argument("--lr_decay_rate", type=positive_float, default=0.1, help="decay rate for the learning rate")
    g.add_argument("--weight_decay", type=nonnegative_float, default=5e-4, help="weight decay")
    g.add_argument("--momentum", type=momentum_float, default=0.9, help="SGD momentum")

    g = parser.add_argument_group("RepDistill flags")
    g.add_argument("--lr_schedule", choices=("step", "cosine"), default="step",
                   help="step: RepDistiller's decays at --lr_decay_epochs; cosine: cosine annealing to 0")
    g.add_argument("--max_steps", type=nonnegative_int, default=0,
                   help="stop after N optimiser steps in total (per stage, with an init stage), then validate and save (0: no limit)")
    g.add_argument("--save_folder", type=str, default="./save/models", help="parent folder of the run folder")
    g.add_argument("--resume", type=str, default=None,
                   help="continue a run from its <model>_last.pth: a path, or 'auto' for this run's folder (fresh start "
                        "if none); the settings that shape training must be the ones it was made with")
    g.add_argument("--overwrite", action="store_true",
                   help="start the run again in a run folder that already holds its checkpoints (they are deleted); "
                        "without it such a start is refused")

    add_option_groups(parser, [DataOptions, RuntimeOptions])


def finalize_training_args(opt: argparse.Namespace, model_name: str) -> argparse.Namespace:
    """Check the shared flags and fill in derived values (learning rate, decay epochs, seed, data folder)."""
    if opt.dataset not in DATASETS:
        raise UserError(f"unknown --dataset '{opt.dataset}'; choose one of: {', '.join(DATASETS)}")
    try:
        opt.lr_decay_epochs = [int(e) for e in str(opt.lr_decay_epochs).split(",") if e.strip()]
    except ValueError:
        raise UserError(f"--lr_decay_epochs must be comma-separated integers, got '{opt.lr_decay_epochs}'") from None
    if any(e < 0 for e in opt.lr_decay_epochs):
        raise UserError(f"--lr_decay_epochs cannot hold negative epochs, got {opt.lr_decay_epochs}")
    if opt.learning_rate is None:
        opt.learning_rate = 0.01 if model_name in SMALL_LR_MODELS else 0.05
    if opt.num_workers is None:
        opt.num_workers = default_workers(opt.loader, opt.dataset)
    if opt.seed is None:
        trial = str(opt.trial)
        opt.seed = int(trial) if trial.lstrip("-").isdigit() else sum(map(ord, trial))
    opt.save_folder = str(Path(opt.save_folder))
    return opt
