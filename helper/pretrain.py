"""The init stage of two-stage methods (AB, FT, FSP): pre-train the Distiller's init modules
(and, where the method says so, the student's feature layers) before distillation, as in
RepDistiller's ``helper/pretrain.py``.

RepDistiller's ``init(model_s, model_t, init_modules, criterion, train_loader, logger, opt)`` is not
provided: it dispatches on ``opt.distill`` and finds the modules by position in ``init_modules``;
here each method's Distiller declares its init stage, which :func:`run_init_stage` runs."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from distiller_zoo.registry import Batch, Distiller, NetOutput
from helper import distributed
from helper.loops import Interrupted, StepBudget, StopSignals, check_finite
from helper.meters import AverageMeter
from helper.runtime import Runtime


def run_init_stage(distiller: Distiller, student: nn.Module, teacher: nn.Module, loader,
                   to_batch: Callable[[tuple], Batch], opt, log: Callable[[dict], None],
                   runtime: Runtime | None = None) -> None:
    """Train ``distiller.init_loss`` for ``opt.init_epochs`` epochs (at most ``opt.max_steps``
    steps when set) with SGD at ``distiller.init_learning_rate(opt)``; then
    ``distiller.after_init_stage()``. The student runs in eval mode except for the layers trained.
    With ``runtime``: its autocast, and under torchrun gradients averaged over ranks."""
    modules = list(distiller.init_modules())
    if distiller.init_trains_student():
        modules.append(student.get_feat_modules())
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=distiller.init_learning_rate(opt.learning_rate), momentum=opt.momentum,
                                weight_decay=opt.weight_decay)
    budget = StepBudget(getattr(opt, "max_steps", None))
    teacher.eval()
    student.eval()
    for m in modules:
        m.train()
    autocast = runtime.autocast if runtime is not None else contextlib.nullcontext
    device = runtime.device if runtime is not None else None
    with StopSignals() as stop:
        for epoch in range(1, opt.init_epochs + 1):
            meter = AverageMeter()
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(-epoch)  # an order of its own, apart from the main stage's
            for step, raw in enumerate(loader, start=1):
                if budget.exhausted:
                    break
                batch = to_batch(raw)
                with autocast():
                    feats_s, logits_s = student(batch.img, is_feat=True, preact=distiller.preact)
                    with torch.no_grad():
                        feats_t, logits_t = teacher(batch.img, is_feat=True, preact=distiller.preact)
                    loss = distiller.init_loss(NetOutput(feats_s, logits_s), NetOutput(feats_t, logits_t), batch)
                check_finite({"init": loss.item()}, f"init epoch {epoch}", step, device,
                             before_any_update=budget.done == 0, fp16=runtime is not None and runtime.amp == "fp16",
                             lr=optimizer.param_groups[0]["lr"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.average_gradients(params)
                optimizer.step()
                budget.done += 1
                meter.update(loss.item(), batch.target.size(0))
                if stop.requested(device or loss.device):  # the init stage is short: not resumable inside
                    raise Interrupted(stop.signum, f"init epoch {epoch}, step {step}", None)
            log({"init_epoch": epoch, "init_loss": meter.avg})
            if budget.exhausted:
                break
    distiller.after_init_stage()
