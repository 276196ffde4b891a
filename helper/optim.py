"""SGD and the learning-rate schedules (RepDistiller's step schedule, or cosine)."""
from __future__ import annotations

import math
from typing import Iterable

import torch


def build_optimizer(params: Iterable[torch.nn.Parameter], opt) -> torch.optim.SGD:
    """SGD with ``opt.learning_rate``, ``opt.momentum`` and ``opt.weight_decay``."""
    return torch.optim.SGD(params, lr=opt.learning_rate, momentum=opt.momentum, weight_decay=opt.weight_decay)


def lr_at_epoch(epoch: int, opt) -> float:
    """Learning rate of (1-based) ``epoch``.

    step: ``lr * rate ** (number of decay epochs strictly below epoch)``, so with decay epochs
    150,180,210 epoch 151 is the first at ``0.1 * lr``, as in RepDistiller.
    cosine: ``0.5 * lr * (1 + cos(pi * (epoch - 1) / epochs))``.
    """
    if getattr(opt, "lr_schedule", "step") == "cosine":
        return 0.5 * opt.learning_rate * (1 + math.cos(math.pi * (epoch - 1) / opt.epochs))
    steps = sum(epoch > e for e in opt.lr_decay_epochs)
    return opt.learning_rate * opt.lr_decay_rate**steps


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def adjust_learning_rate(epoch: int, opt, optimizer: torch.optim.Optimizer) -> float:
    """RepDistiller's name: set and return the learning rate of ``epoch``."""
    lr = lr_at_epoch(epoch, opt)
    set_lr(optimizer, lr)
    return lr
