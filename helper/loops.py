"""The shared training loop: one epoch of training, validation, and the epoch driver ``fit``
used by both training scripts. Methods plug in through ``train_step``; the loop never names one."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from helper.checkpoint import save_checkpoint
from helper.errors import UserError
from helper.logger import RunLog, is_interactive
from helper.meters import AverageMeter, accuracy
from helper.optim import adjust_learning_rate

# train_step(batch) -> (logits [B, C], target [B], named loss terms); the loss is their sum.
TrainStep = Callable[[tuple], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops before anything is saved."""


def check_finite(values: dict[str, float], where: str, step: int) -> None:
    """Raise :class:`NonFiniteLoss` naming ``where``, the step and every term if any term is NaN/inf."""
    if not all(math.isfinite(v) for v in values.values()):
        shown = ", ".join(f"{name}={value:.6g}" for name, value in values.items())
        raise NonFiniteLoss(f"the loss became non-finite at {where}, step {step} ({shown}); "
                            "the run stopped and its checkpoints were left as they were: "
                            "lower --learning_rate or the loss weights")


class StepBudget:
    """Counts optimiser steps against ``--max_steps`` (None or 0: no limit)."""

    def __init__(self, max_steps: int | None) -> None:
        self.max_steps = max_steps or None
        self.done = 0

    @property
    def exhausted(self) -> bool:
        return self.max_steps is not None and self.done >= self.max_steps


def train_one_epoch(epoch: int, loader, trainable: nn.Module, train_step: TrainStep,
                    optimizer: torch.optim.Optimizer, budget: StepBudget) -> dict[str, float]:
    """Train for one pass over ``loader`` (or until the step budget runs out).

    Returns the epoch's averages: ``train_loss``, ``train_acc`` and one ``loss_<term>`` per term.
    A non-finite loss raises :class:`NonFiniteLoss` naming the epoch, the step and every term.
    """
    trainable.train()
    loss_meter, acc_meter = AverageMeter(), AverageMeter()
    term_meters: dict[str, AverageMeter] = {}
    images, start = 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not is_interactive())
    for step, batch in enumerate(bar, start=1):
        if budget.exhausted:
            break
        logits, target, terms = train_step(batch)
        loss = sum(terms.values())
        values = {name: term.item() for name, term in terms.items()}
        check_finite(values, f"epoch {epoch}", step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        budget.done += 1
        n = target.size(0)
        images += n
        loss_meter.update(sum(values.values()), n)
        acc_meter.update(accuracy(logits.detach(), target)[0].item(), n)
        for name, value in values.items():
            term_meters.setdefault(name, AverageMeter()).update(value, n)
        bar.set_postfix(loss=f"{loss_meter.avg:.3f}", acc=f"{acc_meter.avg:.1f}")
    seconds = time.perf_counter() - start
    stats = {"train_loss": loss_meter.avg, "train_acc": acc_meter.avg,
             "images_per_s": images / seconds if seconds > 0 else 0.0}
    stats.update({f"loss_{name}": m.avg for name, m in term_meters.items()})
    return stats


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Cross-entropy, top-1 and top-5 accuracy (%) of ``model`` over ``loader``."""
    model.eval()
    loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    for batch in loader:
        images, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        logits = model(images)
        top1, top5 = accuracy(logits, target, topk=(1, 5))
        n = target.size(0)
        loss_m.update(F.cross_entropy(logits, target).item(), n)
        top1_m.update(top1.item(), n)
        top5_m.update(top5.item(), n)
    return {"test_acc": top1_m.avg, "test_acc_top5": top5_m.avg, "test_loss": loss_m.avg}


def fit(opt, *, model: nn.Module, trainable: nn.Module, optimizer: torch.optim.Optimizer,
        train_loader, val_loader, train_step: TrainStep, device: torch.device, run: RunLog,
        checkpoint_extra: Callable[[], dict[str, Any]] = dict,
        on_epoch_start: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train for ``opt.epochs`` epochs (or ``opt.max_steps`` steps), validating ``model`` after each.

    Writes ``last.pth`` every epoch, ``best.pth`` when test top-1 improves and ``ckpt_epoch_N.pth``
    every ``opt.save_freq`` epochs into ``run.folder``; each holds ``model``, ``arch``, ``epoch``,
    ``accuracy``, ``best_acc``, ``optimizer`` and ``checkpoint_extra()``; ``on_epoch_start(epoch)``
    is called before each epoch. Returns the final results.
    """
    folder = Path(run.folder)
    budget = StepBudget(getattr(opt, "max_steps", None))
    best_acc, best_top5, last = 0.0, 0.0, {}
    for epoch in range(1, opt.epochs + 1):
        lr = adjust_learning_rate(epoch, opt, optimizer)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        start = time.perf_counter()
        train_stats = train_one_epoch(epoch, train_loader, trainable, train_step, optimizer, budget)
        last = validate(model, val_loader, device)
        is_best = last["test_acc"] > best_acc or epoch == 1
        if is_best:
            best_acc, best_top5 = last["test_acc"], last["test_acc_top5"]
        run.epoch({"epoch": epoch, "lr": lr, **train_stats, **last,
                   "epoch_time_s": time.perf_counter() - start})
        state = {"model": model.state_dict(), "arch": opt.arch, "dataset": opt.dataset,
                 "num_classes": opt.num_classes, "epoch": epoch, "accuracy": last["test_acc"],
                 "best_acc": best_acc, "optimizer": optimizer.state_dict(), **checkpoint_extra()}
        save_checkpoint(state, folder / "last.pth")
        if is_best:
            save_checkpoint(state, folder / "best.pth")
        if epoch % opt.save_freq == 0:
            save_checkpoint(state, folder / f"ckpt_epoch_{epoch}.pth")
        if budget.exhausted:
            break
    images_per_s = [h["images_per_s"] for h in run.history]
    results = run.save("finished", epochs_run=len(run.history), steps=budget.done,
                       last_acc=last.get("test_acc"), last_acc_top5=last.get("test_acc_top5"),
                       best_acc=best_acc, best_acc_top5=best_top5, device=str(device),
                       images_per_s=sum(images_per_s) / max(len(images_per_s), 1))
    run.close()
    return results
