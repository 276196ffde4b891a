"""A stage of a run (:class:`Stage`: an init stage, or the main one) and its learning-rate rules
(:func:`scheduled_lr`, :func:`constant_lr`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from engine.epoch import TrainStep
from engine.guards import StepBudget
from engine.optim import adjust_learning_rate


def same_epoch(epoch: int) -> int:
    """The sampler draws an epoch's order from the epoch's own number (the main stage's orders)."""
    return epoch


def scheduled_lr(opt, optimizer: torch.optim.Optimizer) -> Callable[[int], float]:
    """The learning-rate rule of ``--learning_rate``, ``--lr_schedule`` and its decays: sets and
    returns the rate of an epoch on ``optimizer``."""
    return lambda epoch: adjust_learning_rate(epoch, opt, optimizer)


def constant_lr(optimizer: torch.optim.Optimizer) -> Callable[[int], float]:
    """A learning-rate rule that keeps ``optimizer``'s rate as it was built."""
    return lambda epoch: optimizer.param_groups[0]["lr"]


@dataclass(eq=False)
class Stage:
    """One training stage for :class:`engine.fit.Fit`: ``epochs`` passes over the training data,
    each step ``train_step(batch) -> (logits, target, {term: loss})`` minimised by ``optimizer``.

    - ``name``: in messages (``init epoch 2, step 5``; the last stage, the main one, says
      ``epoch 2``) and, for a stage before the last, in results.json: its records
      ``{"<name>_epoch": e, "<name>_loss": mean loss}`` go to ``<name>_history``;
    - ``trainable``: put in training mode before each epoch (its ``train()`` decides which parts train);
    - ``learning_rate``: called with the epoch before it starts; sets and returns its rate;
    - ``validates``: the model is tested after each epoch (and the best checkpoint kept, in the last stage);
    - ``on_epoch_start(epoch)``; ``on_end()``: once the stage is complete, in the run that completes
      it or in a resume that finds it complete;
    - ``sampler_epoch(epoch)``: the number the sampler draws the epoch's order from;
    - ``sync_gradients``: the step is not DDP-wrapped: its gradients are averaged over ranks by the loop;
    - ``loss_scaling``: fp16 loss scaling (``--amp fp16``) applies to the stage.

    ``epochs_done`` and ``budget`` (its own ``--max_steps`` count) are the stage's progress,
    which Fit keeps (and :class:`engine.state.FitState` records)."""

    name: str
    epochs: int
    train_step: TrainStep
    trainable: nn.Module
    optimizer: torch.optim.Optimizer
    learning_rate: Callable[[int], float]
    validates: bool = True
    on_epoch_start: Callable[[int], None] | None = None
    on_end: Callable[[], None] | None = None
    sampler_epoch: Callable[[int], int] = same_epoch
    sync_gradients: bool = False
    loss_scaling: bool = True
    epochs_done: int = field(default=0, init=False)
    budget: StepBudget = field(default_factory=lambda: StepBudget(None), init=False)

    @property
    def complete(self) -> bool:
        return self.epochs_done >= self.epochs

    def progress(self) -> dict[str, Any]:
        """Where the stage stands, as plain values (what a checkpoint and results.json record)."""
        return {"name": self.name, "epochs": self.epochs, "epochs_done": self.epochs_done, "steps": self.budget.done}
