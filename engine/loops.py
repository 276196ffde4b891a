"""The shared training loop: one epoch of training, validation, and the driver :class:`Fit` of a
run's stages (an init stage, the main one) used by both training scripts, with exact resume,
signal handling and mixed precision. Methods plug in through each :class:`Stage`'s
``train_step``; the loop never names one.
RepDistiller's ``train_vanilla``, ``validate`` and ``train_distill`` run on this loop from
:mod:`helper.repdistiller` (``helper.loops`` re-exports them)."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed
from common.checkpoint import (copy_checkpoint, load_checkpoint, load_weights, nonfinite_tensors, save_checkpoint,
                               saved_mark)
from common.errors import Stopped, UserError
from common.meters import accuracy
from common.runtime import Runtime, rng_state, set_rng_state
from engine.logger import RunLog, is_interactive, is_terminal_output
from engine.optim import adjust_learning_rate
from engine.resume import checkpoint_names, compare_options, free_flags, run_options

# train_step(batch) -> (logits [B, C], target [B], named loss terms); the loss is their sum.
TrainStep = Callable[[tuple], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


class NonFiniteLoss(UserError):
    """The loss (or the weights) became NaN or infinite; the run stops before anything is saved."""


class Interrupted(Stopped):
    """SIGINT or SIGTERM arrived; ``last.pth`` has been written (``saved``) and the run stops."""

    def __init__(self, signum: int, where: str, saved: Path | None):
        self.signum, self.where, self.saved = signum, where, saved
        name = signal.Signals(signum).name
        then = (f"saved {saved}; continue with --resume auto (or --resume {saved})" if saved
                else "nothing was saved")
        super().__init__(f"{name} received at {where}: {then}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def nonfinite_cause(values: dict[str, float], *, before_any_update: bool = False, fp16: bool = False,
                    lr: float | None = None) -> str:
    """The likely cause of non-finite loss ``values`` (term -> value) and what to do, as one clause.

    In order: at the first step of a fresh run (``before_any_update``) the learning rate
    cannot be the cause, so the inputs, the teacher or the loss weights are; under ``--amp fp16``
    (``fp16``) an overflow; when only distillation terms (``kd``, or the method's own ones) are
    non-finite while others are not, their weight or temperature; otherwise a learning rate
    (``lr``, that of the step) too high."""
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    overflow = "try --amp bf16 or --amp off"
    if before_any_update:
        cause = ("it happened at the first step, before any update, so the learning rate is not the cause: "
                 "check the input images, the teacher (its checkpoint) and the loss weights and temperatures")
        return cause + (f", or an fp16 overflow ({overflow})" if fp16 else "")
    if fp16:
        return f"with --amp fp16 this is likely an fp16 overflow: {overflow}"
    if bad and "ce" not in bad and len(bad) < len(values):
        if bad == ["kd"]:
            return "only the kd term is non-finite: lower its weight -a or raise its temperature --kd_T"
        method = [name for name in bad if name != "kd"]
        which = f"the method's term{'s' if len(method) > 1 else ''} {', '.join(method)}"
        weights = "-a and -b" if "kd" in bad else "-b"
        return (f"only {'kd and ' if 'kd' in bad else ''}{which} {'are' if len(bad) > 1 else 'is'} non-finite: "
                f"lower the weight {weights} or raise the method's temperature")
    at = f" (this step ran at {lr:g})" if lr is not None else ""
    return f"the learning rate is likely too high: lower --learning_rate{at} or the loss weights"


def check_finite(values: dict[str, float], where: str, step: int, device: torch.device | None = None, *,
                 before_any_update: bool = False, fp16: bool = False, lr: float | None = None) -> None:
    """Raise :class:`NonFiniteLoss` naming ``where``, the step, every term and the likely cause
    (see :func:`nonfinite_cause`) if any term is NaN/inf (on any rank, under torchrun: every
    rank then stops together)."""
    bad = not all(math.isfinite(v) for v in values.values())
    if device is not None:
        bad = distributed.any_rank(bad, device)
    if bad:
        shown = ", ".join(f"{name}={value:.6g}" for name, value in values.items())
        raise NonFiniteLoss(f"the loss became non-finite at {where}, step {step} ({shown}); "
                            "the run stopped and its checkpoints were left as they were: "
                            + nonfinite_cause(values, before_any_update=before_any_update, fp16=fp16, lr=lr))


class StepBudget:
    """Counts optimiser steps against ``--max_steps`` (None or 0: no limit)."""

    def __init__(self, max_steps: int | None) -> None:
        self.max_steps = max_steps or None
        self.done = 0

    @property
    def exhausted(self) -> bool:
        return self.max_steps is not None and self.done >= self.max_steps


class StopSignals:
    """While active, SIGINT and SIGTERM only set :attr:`signum`; the loop checks :meth:`requested`
    between steps, saves ``last.pth`` and stops. A second signal of the same kind exits at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum == signum:  # asked twice: stop now
            raise SystemExit(128 + signum)
        self.signum = signum

    def requested(self, device: torch.device) -> bool:
        """True when a signal arrived here (or, under torchrun, on any rank)."""
        return distributed.any_rank(self.signum is not None, device)


class EpochStats:
    """Sums of one epoch's training losses, accuracy and images (kept across a mid-epoch resume)."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        state = state or {}
        self.count: int = state.get("count", 0)
        self.loss: float = state.get("loss", 0.0)
        self.correct: float = state.get("correct", 0.0)
        self.terms: dict[str, float] = dict(state.get("terms", {}))
        self.seconds: float = state.get("seconds", 0.0)
        self.batches: int = state.get("batches", 0)

    def update(self, values: dict[str, float], top1: float, n: int) -> None:
        self.batches += 1
        self.count += n
        self.loss += sum(values.values()) * n
        self.correct += top1 * n
        for name, value in values.items():
            self.terms[name] = self.terms.get(name, 0.0) + value * n

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "loss": self.loss, "correct": self.correct, "terms": dict(self.terms),
                "seconds": self.seconds, "batches": self.batches}

    def summary(self) -> dict[str, float]:
        n = max(self.count, 1)
        stats = {"train_loss": self.loss / n, "train_acc": self.correct / n,
                 "images_per_s": self.count / self.seconds if self.seconds > 0 else 0.0}
        stats.update({f"loss_{name}": value / n for name, value in self.terms.items()})
        return stats


def train_one_epoch(epoch: int, loader, trainable: nn.Module, train_step: TrainStep,
                    optimizer: torch.optim.Optimizer, budget: StepBudget, *,
                    scaler: torch.amp.GradScaler | None = None, autocast=contextlib.nullcontext,
                    stats: EpochStats | None = None, first_step: int = 1,
                    stop: StopSignals | None = None, device: torch.device | None = None,
                    print_freq: int = 0, fresh_run: bool = False, label: str = "epoch", fp16: bool = False,
                    sync_gradients: bool = False, run: RunLog | None = None, tb_freq: int = 0,
                    tb_tag: str = "step") -> dict[str, float]:
    """Train for one pass over ``loader`` (or until the step budget runs out).

    Each step runs ``train_step`` under ``autocast()``, checks every loss term is finite (raising
    :class:`NonFiniteLoss` naming the epoch, the step, every term and the likely cause; ``fresh_run``:
    no update was made before this call's first step, not even in a previous run or an init
    stage), and steps ``optimizer`` through ``scaler`` (fp16 loss scaling) when given. ``stats`` and ``first_step`` continue an
    epoch resumed in its middle. When ``stop`` reports a signal after a step, :class:`StopRequest`
    is raised carrying the step and the stats so far. The budget is checked after each step, so no
    batch is drawn that is not trained on (``stats.batches`` tells how far the epoch got). When the
    console is not a terminal, a progress line is printed every ``print_freq`` steps. Returns the
    epoch's averages: ``train_loss``, ``train_acc``, ``images_per_s`` and one ``loss_<term>`` per term.
    ``label`` names the epoch in messages (``init epoch 2, step 5``); ``fp16``: the forward runs under
    fp16 autocast (a hint for the cause of a non-finite loss); ``sync_gradients``: the step is not
    DDP-wrapped, so the gradients of the optimiser's parameters are averaged over ranks here.
    With ``run`` and ``tb_freq``, every ``tb_freq``-th optimiser step of the budget (its count across
    epochs is the x axis) logs ``<tb_tag>/loss``, one ``<tb_tag>/<term>`` per term, ``<tb_tag>/lr``
    and the batch's ``<tb_tag>/top1`` to TensorBoard (:meth:`RunLog.step`; rank 0 alone writes),
    from the values the step already read.
    """
    trainable.train()
    stats = stats or EpochStats()
    if budget.exhausted:
        return stats.summary()
    start = time.perf_counter()
    total = len(loader) if hasattr(loader, "__len__") else None
    progress = Progress(f"{label} {epoch}", total, first_step, print_freq if distributed.is_main_process() else 0)
    bar = tqdm(loader, desc=f"{label} {epoch}", leave=False,
               disable=not (is_interactive() and distributed.is_main_process()))
    for step, batch in enumerate(bar, start=first_step):
        with autocast():
            logits, target, terms = train_step(batch)
        loss = sum(terms.values())
        values = {name: term.item() for name, term in terms.items()}
        lr = optimizer.param_groups[0]["lr"]
        check_finite(values, f"{label} {epoch}", step, device, before_any_update=fresh_run and budget.done == 0,
                     fp16=fp16 or (scaler is not None and scaler.is_enabled()), lr=lr)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if sync_gradients:
            distributed.average_gradients([p for group in optimizer.param_groups for p in group["params"]])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        budget.done += 1
        top1 = accuracy(logits.detach().float(), target)[0].item()
        stats.update(values, top1, target.size(0))
        if run is not None and tb_freq and budget.done % tb_freq == 0:
            run.step({"loss": sum(values.values()), **values, "lr": lr, "top1": top1}, budget.done, tb_tag)
        bar.set_postfix(loss=f"{stats.loss / stats.count:.3f}", acc=f"{stats.correct / stats.count:.1f}")
        progress.step(step, stats, values, target.size(0))
        if stop is not None and stop.requested(device or logits.device):
            stats.seconds += time.perf_counter() - start
            raise StopRequest(step, stats)
        if budget.exhausted:
            break
    stats.seconds += time.perf_counter() - start
    return stats.summary()


class Progress:
    """One console line every ``every`` steps of an epoch (``label``: e.g. ``epoch 3``), for logs
    that are not a terminal (a terminal gets tqdm's bar): the step, the means over the epoch so far
    of the loss and top-1, this step's loss and (with several) each term, images/s and the time
    left in the epoch, e.g. (one line)::

        epoch 1 [20/782]  epoch mean: loss 3.3747 top-1 12.50  this step: loss 3.213 ce 2.191 kd 1.022
          1234.5 img/s  eta 0:01:23
    """

    def __init__(self, label: str, total: int | None, first_step: int, every: int) -> None:
        self.label, self.total, self.first_step = label, total, first_step
        self.every = every if every > 0 and not is_terminal_output() else 0
        self.start = time.perf_counter()
        self.images = 0

    def step(self, step: int, stats: EpochStats, values: dict[str, float], images: int) -> None:
        """After ``step`` (``values``: its loss terms; ``images``: its batch size)."""
        if not self.every:
            return
        self.images += images
        if step % self.every:
            return
        elapsed = time.perf_counter() - self.start
        of = f"/{self.total}" if self.total else ""
        n = max(stats.count, 1)
        now = f"loss {sum(values.values()):.4g}"
        if len(values) > 1:
            now += "".join(f" {name} {value:.4g}" for name, value in values.items())
        line = (f"{self.label} [{step}{of}]  epoch mean: loss {stats.loss / n:.4f} top-1 {stats.correct / n:.2f}  "
                f"this step: {now}")
        if elapsed > 0:
            line += f"  {self.images / elapsed:.1f} img/s"
            if self.total:
                left = (self.total - step) * elapsed / (step - self.first_step + 1)
                line += f"  eta {format_seconds(left)}"
        print(line, flush=True)


def format_seconds(seconds: float) -> str:
    """``h:mm:ss``."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StopRequest(Exception):
    """Raised by :func:`train_one_epoch` after ``step`` when a stop signal arrived."""

    def __init__(self, step: int, stats: EpochStats):
        super().__init__(f"stop requested after step {step}")
        self.step, self.stats = step, stats


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


def weights_are_finite(modules: dict[str, nn.Module]) -> bool:
    return not any(nonfinite_tensors(m.state_dict()) for m in modules.values())


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
    """One training stage for :class:`Fit`: ``epochs`` passes over the training data, each step
    ``train_step(batch) -> (logits, target, {term: loss})`` minimised by ``optimizer``.

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

    ``epochs_done`` and ``budget`` (its own ``--max_steps`` count) are the progress Fit keeps."""

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


class Fit:
    """Runs the stages of a run in turn (an init stage, then the main one; or the main one
    alone) and keeps what a resume needs. The last stage is the main one: its epochs, optimiser
    and accuracies take RepDistiller's checkpoint layout; the earlier stages' progress and, until
    they are complete, their optimisers' states are kept under ``resume['stages']``.

    ``modules`` are saved by name (``'model'`` is the trained network, saved in RepDistiller's
    layout; e.g. ``'distiller'`` holds a method's heads and memory banks); ``static`` entries
    are added to every checkpoint as they are (``'arch'``, ``'distill'``, ...). Checkpoints take
    RepDistiller's names: ``<prefix>_last.pth`` (every epoch of every stage, and at a stop),
    ``<prefix>_best.pth`` and ``ckpt_epoch_N.pth`` (main stage). ``identity`` entries (e.g. digests of
    the teachers' weights) are recorded with every option of ``opt``: a resume must agree with
    them (see engine/resume.py). ``--max_steps`` counts each stage's steps apart. ``inputs``: the
    channels of the validation images ``'model'`` sees (see :func:`evaluate`).

    Model selection: the best checkpoint is the epoch of the best test top-1 (RepDistiller's), or,
    with a ``holdout_loader`` (``--val_split``: training images held out), the best top-1 on it
    (``val_acc`` in the history); results.json then says ``selection: "val"`` and reports that
    epoch (``best_val_epoch``), its held-out top-1 (``best_val_acc``) and its test top-1
    (``best_val_test_acc``), next to ``best_acc``, still the best test top-1 of any epoch. A main
    stage that does not validate keeps no best checkpoint: ``selection: "last"``.
    """

    def __init__(self, opt, *, stages: list[Stage], modules: dict[str, nn.Module], train_loader, val_loader,
                 runtime: Runtime, run: RunLog, prefix: str, static: dict[str, Any] | None = None,
                 identity: dict[str, Any] | None = None, holdout_loader=None, inputs: slice | None = None) -> None:
        self.opt, self.stages, self.modules, self.inputs = opt, list(stages), modules, inputs
        self.train_loader, self.val_loader, self.holdout_loader = train_loader, val_loader, holdout_loader
        self.runtime, self.run, self.static = runtime, run, static or {}
        self.folder = Path(run.folder)
        self.last_name, self.best_name = checkpoint_names(prefix)
        self.options = run_options(opt, **(identity or {}), world_size=runtime.dist.world_size)
        for stage in self.stages:
            stage.budget = StepBudget(opt.max_steps)
        self.scaler = runtime.grad_scaler()
        self.best_acc, self.best_top5, self.last = 0.0, 0.0, {}
        self.selected: dict[str, Any] | None = None  # the held-out selection's epoch and accuracies
        self.current, self.skip_batches, self.carry = 0, 0, None
        self.save_seq, self.saved_files = 0, []  # the number of the last save, and its files
        self.resumed: tuple[Path, os.stat_result] | None = None
        self._loader_state_at_epoch_start = self._loader_state()

    @property
    def main(self) -> Stage:
        """The last stage: the one validated, whose checkpoints are RepDistiller's."""
        return self.stages[-1]

    @property
    def epochs_done(self) -> int:
        return self.main.epochs_done

    @property
    def budget(self) -> StepBudget:
        return self.main.budget

    def _label(self, stage: Stage) -> str:
        return "epoch" if stage is self.main else f"{stage.name} epoch"

    # ------------------------------------------------------------------ checkpoint state
    def _loader_state(self) -> torch.Tensor | None:
        generator = getattr(self.train_loader, "generator", None)
        return generator.get_state() if generator is not None else None

    def state(self, batches_done: int = 0, stats: EpochStats | None = None) -> dict[str, Any]:
        """The checkpoint of this moment (collective under torchrun: every rank must call it).
        ``epoch`` counts the main stage's completed epochs, ``resume['stage']`` is the stage in
        progress and ``batches_done`` > 0 marks a save inside its next epoch. It holds tensors
        and plain types only (it loads with ``torch.load(weights_only=True)``)."""
        loader_state = self._loader_state_at_epoch_start if batches_done else self._loader_state()
        per_rank = distributed.gather_objects({"rng": rng_state(), "loader": loader_state})
        state = {name: module.state_dict() for name, module in self.modules.items()}
        state.update(self.static)
        earlier = self.stages[:-1]
        state.update({
            "epoch": self.main.epochs_done, "accuracy": self.last.get("test_acc"), "best_acc": self.best_acc,
            "optimizer": self.main.optimizer.state_dict(),
            "resume": {
                "batches_done": batches_done, "epoch_stats": stats.state_dict() if stats else None,
                "steps": self.main.budget.done, "best_acc_top5": self.best_top5, "last": self.last,
                "selected": self.selected,
                "history": self.run.history, "sessions": self.run.sessions, "options": self.options,
                "wall_time_s": self.run.elapsed(), "scaler": self.scaler.state_dict(),
                "world_size": self.runtime.dist.world_size, "per_rank": per_rank, "stage": self.current,
                "stages": [{**s.progress(), "optimizer": None if s.complete else s.optimizer.state_dict()}
                           for s in earlier],
                **{f"{s.name}_history": self.run.results.get(f"{s.name}_history") for s in earlier},
            }})
        return state

    def restore(self, state: dict[str, Any], source: str) -> None:
        """Continue from a checkpoint written by :meth:`state` (``--resume``), if it was made with
        this run's settings (else :class:`UserError` lists the differences). Stages it finished
        are not run again (their ``on_end`` is called now); a checkpoint of a version without
        stages continues the main stage."""
        resume = state.get("resume")
        if not isinstance(resume, dict):
            raise UserError(f"{source} has no resume state (it is not a {self.last_name} or ckpt_epoch_N.pth "
                            "of this library): start a new run, or use it as a teacher")
        epochs_done = int(state["epoch"])
        changed = self._check_options(resume.get("options"), resume["world_size"], epochs_done, source)
        for name, module in self.modules.items():
            if name not in state:
                raise UserError(f"{source} has no '{name}' entry: it is a checkpoint of another kind of run")
            load_weights(module, state[name], source)
        self._restore_stages(resume, source)
        self.main.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(resume["scaler"])
        self.main.epochs_done, self.best_acc = epochs_done, float(state["best_acc"])
        self.best_top5, self.last = resume["best_acc_top5"], resume["last"] or {}
        self.selected = resume.get("selected")
        mark = resume.get("save") or {}
        self.save_seq, self.saved_files = int(mark.get("seq", 0)), list(mark.get("files", []))
        self.main.budget.done = resume["steps"]
        self.skip_batches = resume["batches_done"]
        self.carry = EpochStats(resume["epoch_stats"]) if resume["epoch_stats"] else None
        stage = self.stages[self.current]
        session = {"start_epoch": stage.epochs_done + 1, "start_step": self.skip_batches + 1,
                   "steps_before": stage.budget.done, "changed": changed}
        if stage is not self.main:
            session["start_stage"] = stage.name
        self.run.restore(resume["history"], {s.name: resume.get(f"{s.name}_history") for s in self.stages[:-1]},
                         resume["wall_time_s"], sessions=resume.get("sessions"), session=session)
        mine = resume["per_rank"][self.runtime.dist.rank]
        set_rng_state(mine["rng"])
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None and mine["loader"] is not None:
            generator.set_state(mine["loader"])
        label = self._label(stage)
        where = (f"{label} {stage.epochs_done + 1}, after step {self.skip_batches}" if self.skip_batches
                 else f"the start of {label} {stage.epochs_done + 1}")
        shown = "".join(f"; {flag} {old} -> {new}" for flag, (old, new) in changed.items())
        distributed.say(f"resuming from {source} at {where} ({stage.budget.done} steps of this stage done, "
                        f"best top-1 so far {self.best_acc:.2f}{shown})")

    def _restore_stages(self, resume: dict[str, Any], source: str) -> None:
        """The earlier stages' progress and optimisers, and the stage in progress."""
        earlier = self.stages[:-1]
        if "stage" not in resume:  # written before stages were kept: its earlier stages were over
            for stage in earlier:
                stage.epochs_done = stage.epochs
            self.current = len(earlier)
        else:
            saved = resume["stages"]
            if [s["name"] for s in saved] != [s.name for s in earlier]:
                raise UserError(f"{source} was made by a run of other stages ({[s['name'] for s in saved]}, this "
                                f"run: {[s.name for s in earlier]}): resume with the settings it was made with")
            for stage, record in zip(earlier, saved):
                stage.epochs_done, stage.budget.done = record["epochs_done"], record["steps"]
                if record["optimizer"] is not None:
                    stage.optimizer.load_state_dict(record["optimizer"])
            self.current = int(resume["stage"])
        while self.current < len(earlier) and self.stages[self.current].complete:
            self.current += 1
        for stage in self.stages[:self.current]:
            if stage.on_end is not None:
                stage.on_end()

    def _check_options(self, saved: dict[str, Any] | None, saved_world: int, epochs_done: int,
                       source: str) -> dict[str, list]:
        if saved is None:
            distributed.say(f"note: {source} does not record its settings (an older version wrote it): "
                            "only its number of processes can be checked against this run's")
            saved = {"world_size": saved_world}
        refused, changed = compare_options(saved, self.options, epochs_done, free_flags(self.opt))
        if refused:
            raise UserError(f"{source} was made with other settings than this run: {'; '.join(refused)}. "
                            "Resume with the settings it was made with, or start a new run (another --trial, "
                            "or --overwrite to replace it)")
        return changed

    def _save(self, state: dict[str, Any], names: list[str]) -> None:
        """Write ``state`` under each of ``names``, ``<prefix>_last.pth`` first. The state lists
        the files of its save and numbers it (``resume['save']``): a run killed between two of
        these writes is completed by the resume (:meth:`_complete_saves`), so an epoch's
        checkpoints are all written or the epoch is done again."""
        self.save_seq += 1
        state["resume"]["save"] = {"seq": self.save_seq, "files": list(names)}
        if self.runtime.dist.is_main:
            for name in names:
                save_checkpoint(state, self.folder / name)

    def resume_from(self, path: Path) -> None:
        """:meth:`restore` the checkpoint file ``path`` (``--resume``), remembering it for
        :meth:`_complete_saves`."""
        self.resumed = (Path(path), os.stat(path))
        self.restore(load_checkpoint(path), f"'{path}'")

    def _complete_saves(self) -> None:
        """Before training on from a resumed checkpoint (once this run holds its folder): refuse
        if the file changed since it was read (another run wrote it meanwhile), then write the
        files of its save that a kill left unwritten or older than it (e.g. ``ckpt_epoch_N.pth``
        and ``<prefix>_best.pth`` after ``<prefix>_last.pth``), as copies of it."""
        if self.resumed is None:
            return
        path, seen = self.resumed
        now = os.stat(path)
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (seen.st_ino, seen.st_size, seen.st_mtime_ns):
            raise UserError(f"{path} was rewritten while this run started (by another run in the same folder): "
                            "start this command again to continue from the new file")
        if not self.runtime.dist.is_main or path.resolve().parent != self.folder.resolve():
            return
        for name in self.saved_files:
            target = self.folder / name
            if name == path.name or (saved_mark(target) or {}).get("seq", -1) >= self.save_seq:
                continue
            copy_checkpoint(path, target)
            distributed.say(f"note: the run had stopped while saving; wrote {name} from {path.name}, "
                            "the state it saved first")

    def _images_skipped(self) -> int:
        """Unreadable images skipped so far by this process's loaders (see dataset/skipping.py)."""
        return sum(getattr(loader, "images_skipped", 0) for loader in (self.train_loader, self.val_loader))

    def _guard_weights(self, where: str) -> None:
        if not weights_are_finite(self.modules):
            raise NonFiniteLoss(f"the weights became non-finite during {where}; the run stopped and its "
                                "checkpoints were left as they were: lower --learning_rate or the loss weights")

    def _validate(self, epoch: int, train_stats: dict[str, float]) -> None:
        self._guard_weights(f"epoch {epoch}")
        distributed.broadcast_buffers(self.modules["model"])
        self.last = evaluate(self.modules["model"], self.val_loader, self.runtime.device, self.runtime,
                             inputs=self.inputs)
        if self.holdout_loader is not None:
            held = evaluate(self.modules["model"], self.holdout_loader, self.runtime.device, self.runtime,
                            inputs=self.inputs)
            self.last.update({name.replace("test_", "val_"): value for name, value in held.items()})
        if not math.isfinite(self.last["test_loss"]):
            raise NonFiniteLoss(f"the test loss became non-finite after epoch {epoch} "
                                f"(train loss {train_stats['train_loss']:.6g}): the weights blew up; the run "
                                "stopped and its checkpoints were left as they were: lower --learning_rate")

    def _is_best(self, epoch: int) -> bool:
        """Whether this epoch's checkpoint is the new best (by test top-1, or held-out top-1 with a
        holdout loader); keeps the best test top-1 either way."""
        first = epoch == 1 and not self.run.history
        best_on_test = self.last["test_acc"] > self.best_acc or first
        if best_on_test:
            self.best_acc, self.best_top5 = self.last["test_acc"], self.last["test_acc_top5"]
        if self.holdout_loader is None:
            return best_on_test
        if not (first or self.selected is None or self.last["val_acc"] > self.selected["val_acc"]):
            return False
        self.selected = {"epoch": epoch, "val_acc": self.last["val_acc"], "test_acc": self.last["test_acc"],
                         "test_acc_top5": self.last["test_acc_top5"]}
        return True

    def _stop(self, signum: int, where: str, state: dict[str, Any]) -> None:
        self._save(state, [self.last_name])
        self.run.save("interrupted")
        self.run.close()
        raise Interrupted(signum, where, self.folder / self.last_name)

    # ------------------------------------------------------------------ the stages and their epochs
    def __call__(self) -> dict[str, Any]:
        """Train from where the run stands through every stage to its last epoch (or until a
        stage has taken ``opt.max_steps`` steps: the run stops there, and a resume with a larger
        ``--max_steps`` continues that stage); returns the final results. A validating stage
        stopped by ``--max_steps`` inside an epoch is validated and saved there, and a resume
        finishes that epoch. Each main-stage epoch's record and the results hold
        ``images_skipped``: unreadable images left out by the loaders (their ``images_skipped``
        count, summed over ranks) in that epoch / in all. A resumed run first completes the save
        its checkpoint was written by (:meth:`_complete_saves`)."""
        self._complete_saves()
        self.run.open()
        with StopSignals() as stop:
            while True:
                stage = self.stages[self.current]
                self._run_stage(stage, stop)
                if not stage.complete:
                    break  # its step budget ran out
                if stage.on_end is not None:
                    stage.on_end()
                if stage is self.main:
                    break
                self.current += 1
        return self._finish()

    def _run_stage(self, stage: Stage, stop: StopSignals) -> None:
        """Train ``stage``'s epochs from where it stands, until its last or its step budget runs out."""
        sampler = getattr(self.train_loader, "sampler", None)
        for epoch in range(stage.epochs_done + 1, stage.epochs + 1):
            if stage.budget.exhausted:
                return
            lr = stage.learning_rate(epoch)
            if stage.on_epoch_start is not None:
                stage.on_epoch_start(epoch)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(stage.sampler_epoch(epoch))
            first_step = self.skip_batches + 1
            if self.skip_batches and hasattr(sampler, "skip"):
                sampler.skip(self.skip_batches * self.train_loader.batch_size)
            self._loader_state_at_epoch_start = self._loader_state()
            stats = self.carry or EpochStats()
            skipped_before = self._images_skipped()
            start = time.perf_counter()
            train_stats = self._train_epoch(stage, epoch, stats, first_step, stop)
            self.skip_batches, self.carry = 0, None
            partial = stats.batches < len(self.train_loader)
            if stage.validates:
                self._validate(epoch, train_stats)
            is_best = stage is self.main and stage.validates and self._is_best(epoch)
            names = [self.last_name] + ([self.best_name] if is_best else [])
            record = self._record(stage, epoch, lr, train_stats, time.perf_counter() - start, skipped_before)
            if partial:  # --max_steps ran out inside the epoch: a resume continues it
                record.update(partial=True, batches=stats.batches)
                self._log(stage, record)
                self._save(self.state(stats.batches, stats), names)
                return
            stage.epochs_done = epoch
            self._log(stage, record)
            if stage is self.main and epoch % self.opt.save_freq == 0:
                names.append(f"ckpt_epoch_{epoch}.pth")
            self._save(self.state(), names)
            if stop.signum is not None:  # arrived during validation or saving: stop here
                self.run.save("interrupted")
                self.run.close()
                raise Interrupted(stop.signum, f"the end of {self._label(stage)} {epoch}",
                                  self.folder / self.last_name)

    def _train_epoch(self, stage: Stage, epoch: int, stats: EpochStats, first_step: int,
                     stop: StopSignals) -> dict[str, float]:
        """One epoch of ``stage`` (see :func:`train_one_epoch`); a stop signal saves and raises
        :class:`Interrupted`."""
        label = self._label(stage)
        others = sum(s.budget.done for s in self.stages if s is not stage)
        try:
            return train_one_epoch(
                epoch, self.train_loader, stage.trainable, stage.train_step, stage.optimizer, stage.budget,
                scaler=self.scaler if stage.loss_scaling and self.scaler.is_enabled() else None,
                autocast=self.runtime.autocast, stats=stats, first_step=first_step, stop=stop,
                device=self.runtime.device, print_freq=self.opt.print_freq,
                fresh_run=others == 0, label=label,
                fp16=self.runtime.amp == "fp16", sync_gradients=stage.sync_gradients,
                run=self.run, tb_freq=self.opt.tb_freq,
                tb_tag="step" if stage is self.main else f"{stage.name}_step")
        except StopRequest as request:
            self._guard_weights(f"{label} {epoch}")
            distributed.broadcast_buffers(self.modules["model"])
            self._stop(stop.signum or signal.SIGTERM, f"{label} {epoch}, step {request.step}",
                       self.state(request.step, request.stats))

    def _record(self, stage: Stage, epoch: int, lr: float, train_stats: dict[str, float], seconds: float,
                skipped_before: int) -> dict[str, Any]:
        """The epoch's record: the main stage's in full; an earlier stage's as its epoch and mean loss."""
        tested = self.last if stage.validates else {}
        if stage is not self.main:
            return {f"{stage.name}_epoch": epoch, f"{stage.name}_loss": train_stats["train_loss"], **tested}
        skipped = distributed.all_reduce_sum(torch.tensor(
            [self._images_skipped() - skipped_before], dtype=torch.float64, device=self.runtime.device))
        return {"epoch": epoch, "lr": lr, **train_stats, **tested, "epoch_time_s": seconds,
                "images_skipped": int(skipped.item())}

    def _log(self, stage: Stage, record: dict[str, Any]) -> None:
        if stage is self.main:
            self.run.epoch(record)
        else:
            self.run.stage_epoch(stage.name, record)

    def _finish(self) -> dict[str, Any]:
        stage = self.stages[self.current]
        finished = stage is self.main and stage.complete
        images_per_s = [h["images_per_s"] for h in self.run.history]
        summary = {}
        if not finished:
            where = "" if stage is self.main else f" in the {stage.name} stage"
            summary["stopped_by"] = f"--max_steps {stage.budget.max_steps}{where}"
        if len(self.stages) > 1:
            summary["stages"] = [s.progress() for s in self.stages]
        best = {"best_acc": self.best_acc, "best_acc_top5": self.best_top5}
        if not self.main.validates:
            best = {"best_acc": None, "best_acc_top5": None, "selection": "last"}
        elif self.holdout_loader is not None:
            chosen = self.selected or {}
            best.update(selection="val", val_split=len(self.holdout_loader.dataset),
                        best_val_epoch=chosen.get("epoch"), best_val_acc=chosen.get("val_acc"),
                        best_val_test_acc=chosen.get("test_acc"), best_val_test_acc_top5=chosen.get("test_acc_top5"))
        results = self.run.save(
            "finished" if finished else "stopped", epochs_run=self.main.epochs_done, steps=self.main.budget.done,
            images_skipped=sum(h.get("images_skipped", 0) for h in self.run.history),
            last_acc=self.last.get("test_acc"), last_acc_top5=self.last.get("test_acc_top5"),
            **best, device=str(self.runtime.device),
            world_size=self.runtime.dist.world_size, amp=self.runtime.amp,
            images_per_s=sum(images_per_s) / max(len(images_per_s), 1), **summary)
        self.run.close()
        return results


def best_line(results: dict) -> str:
    """The best checkpoint's accuracies for the closing line: best test top-1, or with
    ``--val_split`` the epoch chosen on the held-out images and its test top-1."""
    if results.get("selection") != "val":
        return f"best top-1 {results['best_acc']:.2f}"
    if results.get("best_val_epoch") is None:
        return "no epoch chosen on the held-out images yet"
    return (f"best on val: epoch {results['best_val_epoch']} (val top-1 {results['best_val_acc']:.2f}, test top-1 "
            f"{results['best_val_test_acc']:.2f}); best on test top-1 {results['best_acc']:.2f}")
