"""One epoch: :func:`train_one_epoch` (a step callable minimised over a loader, with its finite
checks, stop signals, step budget, statistics and progress lines), configured by an
:class:`EpochContext`; and :func:`evaluate` (loss, top-1 and top-5 over a loader). The loop never
names a method: a step is any ``train_step(batch) -> (logits, target, {term: loss})``."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed
from common.meters import accuracy
from common.runtime import Runtime
from engine.guards import StepBudget, StopSignals, check_finite
from engine.logger import RunLog, is_interactive
from engine.progress import EpochStats, Progress

# train_step(batch) -> (logits [B, C], target [B], named loss terms); the loss is their sum.
TrainStep = Callable[[tuple], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(eq=False)
class EpochContext:
    """What :func:`train_one_epoch` trains with, the same for every epoch of a stage.

    - ``trainable`` is put in training mode first (its ``train()`` decides which parts train);
      each step runs ``train_step`` under ``autocast()`` and minimises the sum of its terms with
      ``optimizer``, through ``scaler`` (fp16 loss scaling) when given; ``budget`` counts the steps
      (``--max_steps``);
    - ``stop``: checked after each step (on every rank, ``device``'s collective); a signal raises
      :class:`StopRequest`;
    - ``label`` names the epoch in messages (``init epoch 2, step 5``); ``fresh_run``: no update
      was made before this stage's first step, not even in a previous run or an init stage;
      ``fp16``: the forward runs under fp16 autocast (both are hints for the cause of a
      non-finite loss);
    - ``sync_gradients``: the step is not DDP-wrapped, so the gradients of the optimiser's
      parameters are averaged over ranks here;
    - ``print_freq``: when the console is not a terminal, a progress line every that many steps;
    - ``run`` and ``tb_freq``: every ``tb_freq``-th step of the budget (its count across epochs is
      the x axis) logs ``<tb_tag>/loss``, one ``<tb_tag>/<term>`` per term, ``<tb_tag>/lr`` and the
      batch's ``<tb_tag>/top1`` to TensorBoard (:meth:`RunLog.step`; rank 0 alone writes)."""

    trainable: nn.Module
    train_step: TrainStep
    optimizer: torch.optim.Optimizer
    budget: StepBudget = field(default_factory=lambda: StepBudget(None))
    scaler: torch.amp.GradScaler | None = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    stop: StopSignals | None = None
    device: torch.device | None = None
    label: str = "epoch"
    fresh_run: bool = False
    fp16: bool = False
    sync_gradients: bool = False
    print_freq: int = 0
    run: RunLog | None = None
    tb_freq: int = 0
    tb_tag: str = "step"


class StopRequest(Exception):
    """Raised by :func:`train_one_epoch` after ``step`` when a stop signal arrived."""

    def __init__(self, step: int, stats: EpochStats):
        super().__init__(f"stop requested after step {step}")
        self.step, self.stats = step, stats


def train_one_epoch(ctx: EpochContext, epoch: int, loader, stats: EpochStats | None = None,
                    first_step: int = 1) -> dict[str, float]:
    """Train for one pass over ``loader`` (or until ``ctx.budget`` runs out), each step as
    :func:`take_step` runs it; ``stats`` and ``first_step`` continue an epoch resumed in its middle.

    When ``ctx.stop`` reports a signal after a step, :class:`StopRequest` is raised carrying the
    step and the stats so far. The budget is checked after each step, so no batch is drawn that is
    not trained on (``stats.batches`` tells how far the epoch got). Returns the epoch's averages
    (:meth:`EpochStats.summary`): ``train_loss``, ``train_acc``, ``images_per_s`` and one
    ``loss_<term>`` per term."""
    ctx.trainable.train()
    stats = stats or EpochStats()
    if ctx.budget.exhausted:
        return stats.summary()
    start = time.perf_counter()
    where = f"{ctx.label} {epoch}"
    total = len(loader) if hasattr(loader, "__len__") else None
    progress = Progress(where, total, first_step, ctx.print_freq if distributed.is_main_process() else 0)
    bar = tqdm(loader, desc=where, leave=False, disable=not (is_interactive() and distributed.is_main_process()))
    for step, batch in enumerate(bar, start=first_step):
        logits, target, values, lr = take_step(ctx, batch, where, step)
        top1 = accuracy(logits.detach().float(), target)[0].item()
        stats.update(values, top1, target.size(0))
        if ctx.run is not None and ctx.tb_freq and ctx.budget.done % ctx.tb_freq == 0:
            ctx.run.step({"loss": sum(values.values()), **values, "lr": lr, "top1": top1}, ctx.budget.done,
                         ctx.tb_tag)
        bar.set_postfix(loss=f"{stats.loss / stats.count:.3f}", acc=f"{stats.correct / stats.count:.1f}")
        progress.step(step, stats, values, target.size(0))
        if ctx.stop is not None and ctx.stop.requested(ctx.device or logits.device):
            stats.seconds += time.perf_counter() - start
            raise StopRequest(step, stats)
        if ctx.budget.exhausted:
            break
    stats.seconds += time.perf_counter() - start
    return stats.summary()


def take_step(ctx: EpochContext, batch: tuple, where: str, step: int
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], float]:
    """One optimiser step of ``ctx`` on ``batch``, counted in its budget: the forward under
    autocast, the check that every loss term is finite (:func:`check_finite`, naming ``where`` and
    ``step``), the backward, the gradients averaged over ranks (``sync_gradients``), the update.
    Returns the logits, the target, each term's value and the step's learning rate."""
    with ctx.autocast():
        logits, target, terms = ctx.train_step(batch)
    loss = sum(terms.values())
    values = {name: term.item() for name, term in terms.items()}
    optimizer, scaler = ctx.optimizer, ctx.scaler
    lr = optimizer.param_groups[0]["lr"]
    check_finite(values, where, step, ctx.device, before_any_update=ctx.fresh_run and ctx.budget.done == 0,
                 fp16=ctx.fp16 or (scaler is not None and scaler.is_enabled()), lr=lr)
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if ctx.sync_gradients:
        distributed.average_gradients([p for group in optimizer.param_groups for p in group["params"]])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    ctx.budget.done += 1
    return logits, target, values, lr


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, runtime: Runtime | None = None,
             criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             inputs: slice | None = None) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) of ``model`` over ``loader`` (batches ``(img, target, ...)``);
    under torchrun each rank scores its shard and the sums are added over ranks.

    The loss is the cross-entropy, or with ``criterion`` (a batch-mean loss such as
    ``nn.CrossEntropyLoss()``) the mean of ``criterion(logits, target)`` over the batches weighted by
    their sizes. ``inputs``: the channels of the images the model sees (its view, when the batches
    carry several; None: all). Returns ``test_acc``, ``test_acc_top5`` and ``test_loss``."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count
    autocast = runtime.autocast if runtime is not None else contextlib.nullcontext
    for batch in loader:
        if runtime is not None:
            images, target = runtime.to_device(batch[0]), runtime.to_device(batch[1])
        else:
            images, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if inputs is not None:
            images = images[:, inputs]
        with autocast():
            logits = model(images)
        logits = logits.float()
        top1, top5 = accuracy(logits, target, topk=(1, 5))
        n = target.size(0)
        loss = (F.cross_entropy(logits, target, reduction="sum") if criterion is None
                else criterion(logits, target) * n)
        sums += torch.stack([loss.double(), top1[0].double() * n / 100, top5[0].double() * n / 100,
                             torch.tensor(n, dtype=torch.float64, device=device)])
    loss, top1, top5, count = distributed.all_reduce_sum(sums).tolist()
    count = max(count, 1)
    return {"test_acc": 100 * top1 / count, "test_acc_top5": 100 * top5 / count, "test_loss": loss / count}
