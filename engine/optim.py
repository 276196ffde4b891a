"""SGD and the learning-rate schedules (RepDistiller's step schedule, or cosine)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from common.argtypes import momentum_float, nonnegative_float, positive_float
from common.declare import option, options_from
from models import default_learning_rate, model_dict
from models.recipe import LEARNING_RATE


def learning_rate_help() -> str:
    """``--learning_rate``'s help: the default, and the networks whose recipe declares another rate."""
    others: dict[float, list[str]] = {}
    for name in model_dict:
        if default_learning_rate(name) != LEARNING_RATE:
            others.setdefault(default_learning_rate(name), []).append(name)
    notes = "".join(f"; {rate:g} for {'/'.join(names)}" for rate, names in others.items())
    return f"learning rate (default {LEARNING_RATE:g}{notes})"


@dataclass
class OptimOptions:
    """optimisation"""

    learning_rate: float | None = option(None, learning_rate_help(), type=positive_float)
    lr_decay_epochs: str = option("150,180,210", "epochs after which the learning rate is multiplied by "
                                  "--lr_decay_rate")
    lr_decay_rate: float = option(0.1, "decay rate for the learning rate", type=positive_float)
    weight_decay: float = option(5e-4, "weight decay", type=nonnegative_float)
    momentum: float = option(0.9, "SGD momentum", type=momentum_float)
    lr_schedule: str = option("step", "step: RepDistiller's decays at --lr_decay_epochs; cosine: cosine annealing to 0",
                              choices=("step", "cosine"))


def build_optimizer(params: Iterable[torch.nn.Parameter], opt) -> torch.optim.SGD:
    """SGD with ``opt.learning_rate``, ``opt.momentum`` and ``opt.weight_decay``."""
    return torch.optim.SGD(params, lr=opt.learning_rate, momentum=opt.momentum, weight_decay=opt.weight_decay)


def lr_at_epoch(epoch: int, opt) -> float:
    """Learning rate of (1-based) ``epoch``.

    step: ``lr * rate ** (number of decay epochs strictly below epoch)``, so with decay epochs
    150,180,210 epoch 151 is the first at ``0.1 * lr``, as in RepDistiller.
    cosine: ``0.5 * lr * (1 + cos(pi * (epoch - 1) / epochs))``.
    """
    o = options_from(OptimOptions, opt)  # RepDistiller's opt has no lr_schedule: step
    if o.lr_schedule == "cosine":
        return 0.5 * o.learning_rate * (1 + math.cos(math.pi * (epoch - 1) / opt.epochs))
    steps = sum(epoch > e for e in o.lr_decay_epochs)
    return o.learning_rate * o.lr_decay_rate**steps


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def adjust_learning_rate(epoch: int, opt, optimizer: torch.optim.Optimizer) -> float:
    """RepDistiller's name: set and return the learning rate of ``epoch``."""
    lr = lr_at_epoch(epoch, opt)
    set_lr(optimizer, lr)
    return lr
