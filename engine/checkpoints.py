"""The checkpoint side of :class:`engine.fit.Fit` (:class:`FitCheckpoints`): the checkpoint of a
moment, the restore of one (``--resume``), the saves under RepDistiller's file names and their
completion after a run was killed between two files of one save."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from common import distributed
from common.checkpoint import copy_checkpoint, load_checkpoint, load_weights, save_checkpoint, saved_mark
from common.errors import UserError
from common.runtime import Runtime, rng_state, set_rng_state
from engine.guards import StepBudget
from engine.logger import RunLog
from engine.resume import checkpoint_names, compare_options
from engine.stage import Stage
from engine.state import FitOptions, FitState


class FitCheckpoints:
    """What :class:`engine.fit.Fit` (its subclass, which runs the stages; its docstring tells the
    arguments) keeps, and its checkpoints: the run's progress is :attr:`at` (a :class:`FitState`)."""

    def __init__(self, options: FitOptions, recorded: dict[str, Any], *, stages: list[Stage],
                 modules: dict[str, nn.Module], train_loader, val_loader, runtime: Runtime, run: RunLog, prefix: str,
                 static: dict[str, Any] | None = None, holdout_loader=None, inputs: slice | None = None,
                 resumable: frozenset[str] = frozenset(), evaluated: nn.Module | None = None,
                 entries: dict[str, Callable[[], Any]] | None = None) -> None:
        self.options, self.recorded, self.stages, self.modules = options, recorded, list(stages), modules
        self.evaluated = modules["model"] if evaluated is None else evaluated
        self.entries = dict(entries or {})
        self.resumable = resumable
        self.train_loader, self.val_loader, self.holdout_loader = train_loader, val_loader, holdout_loader
        self.runtime, self.run, self.static, self.inputs = runtime, run, static or {}, inputs
        self.folder = Path(run.folder)
        self.last_name, self.best_name = checkpoint_names(prefix)
        for stage in self.stages:
            stage.budget = StepBudget(options.max_steps)
        self.scaler = runtime.grad_scaler()
        self.at = FitState(self.stages)
        self.resumed: tuple[Path, os.stat_result] | None = None
        self._loader_state_at_epoch_start = self._loader_state()

    @property
    def main(self) -> Stage:
        """The last stage: the one validated, whose checkpoints are RepDistiller's."""
        return self.stages[-1]

    def _label(self, stage: Stage) -> str:
        return "epoch" if stage is self.main else f"{stage.name} epoch"

    def _loader_state(self) -> torch.Tensor | None:
        generator = getattr(self.train_loader, "generator", None)
        return generator.get_state() if generator is not None else None

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint of this moment (collective under torchrun: every rank must call it): the
        modules, the ``static`` entries, the ``entries`` computed now (e.g. the student's inference
        head, ``'head'``), :meth:`FitState.to_dict`'s, and under ``resume`` the run
        log's history and sessions, the recorded options, the loss scaler and each rank's random
        states. It holds tensors and plain types only (it loads with ``torch.load(weights_only=True)``)."""
        loader_state = self._loader_state_at_epoch_start if self.at.batches_done else self._loader_state()
        per_rank = distributed.gather_objects({"rng": rng_state(), "loader": loader_state})
        state = {name: module.state_dict() for name, module in self.modules.items()}
        state.update(self.static)
        state.update({name: entry() for name, entry in self.entries.items()})
        state.update(self.at.to_dict())
        state["resume"].update({
            "history": self.run.history, "sessions": self.run.sessions, "options": self.recorded,
            "wall_time_s": self.run.elapsed(), "scaler": self.scaler.state_dict(),
            "world_size": self.runtime.dist.world_size, "per_rank": per_rank,
            **{f"{s.name}_history": self.run.results.get(f"{s.name}_history") for s in self.stages[:-1]}})
        return state

    def restore(self, state: dict[str, Any], source: str) -> None:
        """Continue from a checkpoint written by :meth:`checkpoint` (``--resume``), if it was made
        with this run's settings (else :class:`UserError` lists the differences). Stages it finished
        are not run again (their ``on_end`` is called now)."""
        resume = state.get("resume")
        if not isinstance(resume, dict):
            raise UserError(f"{source} has no resume state (it is not a {self.last_name} or ckpt_epoch_N.pth "
                            "of this library): start a new run, or use it as a teacher")
        changed = self._check_options(resume.get("options"), resume["world_size"], int(state["epoch"]), source)
        for name, module in self.modules.items():
            if name not in state:
                raise UserError(f"{source} has no '{name}' entry: it is a checkpoint of another kind of run")
            load_weights(module, state[name], source)
        self.at = FitState.from_dict(state, self.stages, source)
        for stage in self.stages[:self.at.stage]:
            if stage.on_end is not None:
                stage.on_end()
        self.scaler.load_state_dict(resume["scaler"])
        self._restore_session(resume, changed, source)

    def _restore_session(self, resume: dict[str, Any], changed: dict[str, list], source: str) -> None:
        """The run log, this rank's random states and the loader's, and the line saying where the run resumes."""
        stage, skip = self.at.current, self.at.batches_done
        session = {"start_epoch": stage.epochs_done + 1, "start_step": skip + 1,
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
        where = (f"{label} {stage.epochs_done + 1}, after step {skip}" if skip
                 else f"the start of {label} {stage.epochs_done + 1}")
        shown = "".join(f"; {flag} {old} -> {new}" for flag, (old, new) in changed.items())
        distributed.say(f"resuming from {source} at {where} ({stage.budget.done} steps of this stage done, "
                        f"best top-1 so far {self.at.best_acc:.2f}{shown})")

    def _check_options(self, saved: dict[str, Any] | None, saved_world: int, epochs_done: int,
                       source: str) -> dict[str, list]:
        if saved is None:
            distributed.say(f"note: {source} does not record its settings (an older version wrote it): "
                            "only its number of processes can be checked against this run's")
            saved = {"world_size": saved_world}
        refused, changed = compare_options(saved, self.recorded, epochs_done, self.resumable)
        if refused:
            raise UserError(f"{source} was made with other settings than this run: {'; '.join(refused)}. "
                            "Resume with the settings it was made with, or start a new run (another --trial, "
                            "or --overwrite to replace it)")
        return changed

    def _save(self, names: list[str]) -> None:
        """Write :meth:`checkpoint` under each of ``names``, ``<prefix>_last.pth`` first. The
        checkpoint lists the files of its save and numbers it (``resume['save']``): a run killed
        between two of these writes is completed by the resume (:meth:`_complete_saves`), so an
        epoch's checkpoints are all written or the epoch is done again."""
        self.at.save_seq += 1
        self.at.saved_files = list(names)
        state = self.checkpoint()
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
        for name in self.at.saved_files:
            target = self.folder / name
            if name == path.name or (saved_mark(target) or {}).get("seq", -1) >= self.at.save_seq:
                continue
            copy_checkpoint(path, target)
            distributed.say(f"note: the run had stopped while saving; wrote {name} from {path.name}, "
                            "the state it saved first")
