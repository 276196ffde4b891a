"""The driver of a run's stages (:class:`Fit`): an init stage, the main one, used by both training
scripts, with exact resume (:class:`engine.checkpoints.FitCheckpoints`), signal handling and mixed
precision. Methods plug in through each :class:`engine.stage.Stage`'s ``train_step``; Fit never
names one. RepDistiller's ``train_vanilla``, ``validate`` and ``train_distill`` run on the same
epoch loop (:mod:`engine.epoch`) from :mod:`helper.repdistiller`."""
from __future__ import annotations

import math
import signal
import time
from typing import Any

import torch

from common import distributed
from engine.checkpoints import FitCheckpoints
from engine.epoch import EpochContext, StopRequest, evaluate, train_one_epoch
from engine.guards import Interrupted, NonFiniteLoss, StopSignals, weights_are_finite
from engine.progress import EpochStats
from engine.stage import Stage
from engine.state import FitOptions  # noqa: F401 (Fit's options: callers import them from here)


class Fit(FitCheckpoints):
    """Runs the stages of a run in turn (an init stage, then the main one; or the main one
    alone) and keeps what a resume needs (:class:`engine.state.FitState`). The last stage is the
    main one: its epochs, optimiser and accuracies take RepDistiller's checkpoint layout; the
    earlier stages' progress and, until they are complete, their optimisers' states are kept
    under ``resume['stages']``.

    ``options``: what Fit reads of the flags (:class:`FitOptions`; the scripts pass
    ``options_from(FitOptions, opt)``). ``modules`` are saved by name (``'model'`` is the trained
    network, saved in RepDistiller's layout; e.g. ``'distiller'`` holds a method's heads and
    memory banks); ``static`` entries are added to every checkpoint as they are (``'arch'``,
    ``'distill'``, ...). Checkpoints take RepDistiller's names: ``<prefix>_last.pth`` (every epoch
    of every stage, and at a stop), ``<prefix>_best.pth`` and ``ckpt_epoch_N.pth`` (main stage,
    every ``options.save_freq`` epochs). ``recorded``: every option of the run with its identity
    entries (e.g. digests of the teachers' weights, the world size; see
    :func:`engine.resume.run_options`), recorded in every checkpoint: a resume must agree with
    them, but for the options a resume may change, ``resumable`` (the scripts pass
    :func:`engine.run_flags.free_flags` of their flags). ``options.max_steps`` counts each stage's steps apart. ``inputs``: the channels of the
    validation images ``'model'`` sees (see :func:`evaluate`). ``evaluated``: the network that is
    validated (default ``modules['model']``; a method's inference head: the student with it, see
    :class:`distiller_zoo.heads.HeadedNetwork`); ``entries``: checkpoint entries computed at each
    save (``{'head': ...}``: the head's kind, config and state), not read back by a resume (the
    head's parts are restored with ``modules`` and the teachers).

    Model selection: the best checkpoint is the epoch of the best test top-1 (RepDistiller's), or,
    with a ``holdout_loader`` (``--val_split``: training images held out), the best top-1 on it
    (``val_acc`` in the history); results.json then says ``selection: "val"`` and reports that
    epoch (``best_val_epoch``), its held-out top-1 (``best_val_acc``) and its test top-1
    (``best_val_test_acc``), next to ``best_acc``, still the best test top-1 of any epoch. A main
    stage that does not validate keeps no best checkpoint: ``selection: "last"``.
    """

    def __call__(self) -> dict[str, Any]:
        """Train from where the run stands through every stage to its last epoch (or until a
        stage has taken ``options.max_steps`` steps: the run stops there, and a resume with a larger
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
                stage = self.at.current
                self._run_stage(stage, stop)
                if not stage.complete:
                    break  # its step budget ran out
                if stage.on_end is not None:
                    stage.on_end()
                if stage is self.main:
                    break
                self.at.stage += 1
        return self._finish()

    def _run_stage(self, stage: Stage, stop: StopSignals) -> None:
        """Train ``stage``'s epochs from where it stands, until its last or its step budget runs out."""
        ctx = self._epoch_context(stage, stop)
        for epoch in range(stage.epochs_done + 1, stage.epochs + 1):
            if stage.budget.exhausted:
                return
            lr = stage.learning_rate(epoch)
            if stage.on_epoch_start is not None:
                stage.on_epoch_start(epoch)
            first_step, stats = self._start_epoch(stage, epoch)
            skipped_before = self._images_skipped()
            start = time.perf_counter()
            train_stats = self._train_epoch(ctx, epoch, stats, first_step)
            self.at.batches_done, self.at.epoch_stats = 0, None
            if stage.validates:
                self._validate(epoch, train_stats)
            is_best = stage is self.main and stage.validates and self._is_best(epoch)
            names = [self.last_name] + ([self.best_name] if is_best else [])
            record = self._record(stage, epoch, lr, train_stats, time.perf_counter() - start, skipped_before)
            if stats.batches < len(self.train_loader):  # --max_steps ran out inside the epoch: a resume continues it
                record.update(partial=True, batches=stats.batches)
                self._log(stage, record)
                self.at.batches_done, self.at.epoch_stats = stats.batches, stats
                self._save(names)
                return
            stage.epochs_done = epoch
            self._log(stage, record)
            if stage is self.main and epoch % self.options.save_freq == 0:
                names.append(f"ckpt_epoch_{epoch}.pth")
            self._save(names)
            if stop.signum is not None:  # arrived during validation or saving: stop here
                self._stopped(stop.signum, f"the end of {self._label(stage)} {epoch}")

    def _start_epoch(self, stage: Stage, epoch: int) -> tuple[int, EpochStats]:
        """Set the sampler to ``epoch``'s order (skipping the batches a resumed epoch has done);
        returns the epoch's first step and its statistics so far."""
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(stage.sampler_epoch(epoch))
        skip = self.at.batches_done
        if skip and hasattr(sampler, "skip"):
            sampler.skip(skip * self.train_loader.batch_size)
        self._loader_state_at_epoch_start = self._loader_state()
        return skip + 1, self.at.epoch_stats or EpochStats()

    def _epoch_context(self, stage: Stage, stop: StopSignals) -> EpochContext:
        """What :func:`train_one_epoch` trains ``stage``'s epochs with."""
        fresh = sum(s.budget.done for s in self.stages if s is not stage) == 0
        return EpochContext(
            stage.trainable, stage.train_step, stage.optimizer, stage.budget,
            scaler=self.scaler if stage.loss_scaling and self.scaler.is_enabled() else None,
            autocast=self.runtime.autocast, stop=stop, device=self.runtime.device, label=self._label(stage),
            fresh_run=fresh, fp16=self.runtime.amp == "fp16", sync_gradients=stage.sync_gradients,
            print_freq=self.options.print_freq, run=self.run, tb_freq=self.options.tb_freq,
            tb_tag="step" if stage is self.main else f"{stage.name}_step")

    def _train_epoch(self, ctx: EpochContext, epoch: int, stats: EpochStats, first_step: int) -> dict[str, float]:
        """One epoch (see :func:`train_one_epoch`); a stop signal saves and raises :class:`Interrupted`."""
        try:
            return train_one_epoch(ctx, epoch, self.train_loader, stats, first_step)
        except StopRequest as request:
            self._guard_weights(f"{ctx.label} {epoch}")
            distributed.broadcast_buffers(self.modules["model"])
            self.at.batches_done, self.at.epoch_stats = request.step, request.stats
            self._save([self.last_name])
            self._stopped(ctx.stop.signum or signal.SIGTERM, f"{ctx.label} {epoch}, step {request.step}")

    def _stopped(self, signum: int, where: str) -> None:
        """After the stop's save: results.json says interrupted, and :class:`Interrupted` is raised."""
        self.run.save("interrupted")
        self.run.close()
        raise Interrupted(signum, where, self.folder / self.last_name)

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
        model, device = self.evaluated, self.runtime.device
        last = evaluate(model, self.val_loader, device, self.runtime, inputs=self.inputs)
        if self.holdout_loader is not None:
            held = evaluate(model, self.holdout_loader, device, self.runtime, inputs=self.inputs)
            last.update({name.replace("test_", "val_"): value for name, value in held.items()})
        self.at.last = last
        if not math.isfinite(last["test_loss"]):
            raise NonFiniteLoss(f"the test loss became non-finite after epoch {epoch} "
                                f"(train loss {train_stats['train_loss']:.6g}): the weights blew up; the run "
                                "stopped and its checkpoints were left as they were: lower --learning_rate")

    def _is_best(self, epoch: int) -> bool:
        """Whether this epoch's checkpoint is the new best (by test top-1, or held-out top-1 with a
        holdout loader); keeps the best test top-1 either way."""
        at, last = self.at, self.at.last
        first = epoch == 1 and not self.run.history
        best_on_test = last["test_acc"] > at.best_acc or first
        if best_on_test:
            at.best_acc, at.best_top5 = last["test_acc"], last["test_acc_top5"]
        if self.holdout_loader is None:
            return best_on_test
        if not (first or at.selected is None or last["val_acc"] > at.selected["val_acc"]):
            return False
        at.selected = {"epoch": epoch, "val_acc": last["val_acc"], "test_acc": last["test_acc"],
                       "test_acc_top5": last["test_acc_top5"]}
        return True

    def _record(self, stage: Stage, epoch: int, lr: float, train_stats: dict[str, float], seconds: float,
                skipped_before: int) -> dict[str, Any]:
        """The epoch's record: the main stage's in full; an earlier stage's as its epoch and mean loss."""
        tested = self.at.last if stage.validates else {}
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
        """Write the final results.json (the status, the best and last accuracies, the stages'
        progress, what stopped the run early) and return its entries."""
        stage, at = self.at.current, self.at
        finished = stage is self.main and stage.complete
        images_per_s = [h["images_per_s"] for h in self.run.history]
        summary = {}
        if not finished:
            where = "" if stage is self.main else f" in the {stage.name} stage"
            summary["stopped_by"] = f"--max_steps {stage.budget.max_steps}{where}"
        if len(self.stages) > 1:
            summary["stages"] = [s.progress() for s in self.stages]
        results = self.run.save(
            "finished" if finished else "stopped", epochs_run=self.main.epochs_done, steps=self.main.budget.done,
            images_skipped=sum(h.get("images_skipped", 0) for h in self.run.history),
            last_acc=at.last.get("test_acc"), last_acc_top5=at.last.get("test_acc_top5"),
            **self._best(), device=str(self.runtime.device),
            world_size=self.runtime.dist.world_size, amp=self.runtime.amp,
            images_per_s=sum(images_per_s) / max(len(images_per_s), 1), **summary)
        self.run.close()
        return results

    def _best(self) -> dict[str, Any]:
        """The results' entries of the best checkpoint and how it was chosen (see the class docstring)."""
        best = {"best_acc": self.at.best_acc, "best_acc_top5": self.at.best_top5}
        if not self.main.validates:
            return {"best_acc": None, "best_acc_top5": None, "selection": "last"}
        if self.holdout_loader is not None:
            chosen = self.at.selected or {}
            best.update(selection="val", val_split=len(self.holdout_loader.dataset),
                        best_val_epoch=chosen.get("epoch"), best_val_acc=chosen.get("val_acc"),
                        best_val_test_acc=chosen.get("test_acc"), best_val_test_acc_top5=chosen.get("test_acc_top5"))
        return best


def best_line(results: dict) -> str:
    """The best checkpoint's accuracies for the closing line: best test top-1, or with
    ``--val_split`` the epoch chosen on the held-out images and its test top-1."""
    if results.get("selection") != "val":
        return f"best top-1 {results['best_acc']:.2f}"
    if results.get("best_val_epoch") is None:
        return "no epoch chosen on the held-out images yet"
    return (f"best on val: epoch {results['best_val_epoch']} (val top-1 {results['best_val_acc']:.2f}, test top-1 "
            f"{results['best_val_test_acc']:.2f}); best on test top-1 {results['best_acc']:.2f}")
