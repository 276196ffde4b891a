"""What :class:`engine.fit.Fit` reads of the run's flags (:class:`FitOptions`) and where a run of
stages stands (:class:`FitState`): what Fit keeps between epochs, and the entries of a checkpoint
it becomes and is read back from, in RepDistiller's layout (``epoch``, ``accuracy``, ``best_acc``,
``optimizer``) with the rest under ``resume``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.argtypes import nonnegative_int, positive_int
from common.declare import option
from common.errors import UserError
from engine.progress import EpochStats

if TYPE_CHECKING:
    from engine.stage import Stage


@dataclass
class FitOptions:
    """What Fit reads of the run's flags (declared here; engine/options.py adds them to the
    training flags): progress lines (``print_freq``), TensorBoard step scalars (``tb_freq``),
    ``ckpt_epoch_N.pth`` (``save_freq``) and the step budget of each stage (``max_steps``)."""

    print_freq: int = option(100, "when the output is not a terminal, a progress line every N steps", type=positive_int,
                             resumable=True)
    tb_freq: int = option(500, "TensorBoard step scalars (step/loss, step/<term>, step/lr, step/top1) every N "
                               "optimiser steps; the epoch scalars are written every epoch", type=positive_int,
                           resumable=True)
    save_freq: int = option(40, "write ckpt_epoch_N.pth every this many epochs", type=positive_int, resumable=True)
    max_steps: int = option(0, "stop after N optimiser steps, then validate and save (0: no limit); with an init "
                               "stage each stage counts its own N, and reaching N inside the init stage stops the run "
                               "there, saved but not validated", type=nonnegative_int, resumable=True)


@dataclass(eq=False)
class FitState:
    """The progress of a run: its ``stages`` (each one's epochs done, steps and optimiser), the
    stage in progress (``stage``, an index), the main stage's best test top-1 and top-5, the last
    validation (``last``), the epoch chosen on held-out images (``selected``: its epoch and
    accuracies), the position inside the stage's next epoch (``batches_done`` steps, with its
    statistics so far ``epoch_stats``; 0 and None at an epoch's end) and the last save (its number
    ``save_seq`` and files ``saved_files``)."""

    stages: list[Stage]
    stage: int = 0
    best_acc: float = 0.0
    best_top5: float = 0.0
    last: dict[str, float] = field(default_factory=dict)
    selected: dict[str, Any] | None = None
    batches_done: int = 0
    epoch_stats: EpochStats | None = None
    save_seq: int = 0
    saved_files: list[str] = field(default_factory=list)

    @property
    def main(self) -> Stage:
        """The last stage: the one validated, whose checkpoints are RepDistiller's."""
        return self.stages[-1]

    @property
    def current(self) -> Stage:
        """The stage in progress."""
        return self.stages[self.stage]

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint entries of this state: ``epoch`` (the main stage's completed epochs),
        ``accuracy``, ``best_acc``, ``optimizer`` (the main stage's), and under ``resume`` the rest:
        ``stage``, each earlier stage's progress and, until it is complete, its optimiser
        (``stages``), the position in the next epoch and the save's mark (``save``)."""
        main = self.main
        return {
            "epoch": main.epochs_done, "accuracy": self.last.get("test_acc"), "best_acc": self.best_acc,
            "optimizer": main.optimizer.state_dict(),
            "resume": {
                "batches_done": self.batches_done,
                "epoch_stats": self.epoch_stats.state_dict() if self.epoch_stats else None,
                "steps": main.budget.done, "best_acc_top5": self.best_top5, "last": self.last,
                "selected": self.selected, "stage": self.stage,
                "stages": [{**s.progress(), "optimizer": None if s.complete else s.optimizer.state_dict()}
                           for s in self.stages[:-1]],
                "save": {"seq": self.save_seq, "files": list(self.saved_files)},
            }}

    @classmethod
    def from_dict(cls, state: dict[str, Any], stages: list[Stage], source: str) -> "FitState":
        """The state a checkpoint written from :meth:`to_dict` (``source`` names it in errors)
        holds, on ``stages``: their progress and optimisers are loaded from it. A checkpoint of a
        version without stages continues the main stage (its earlier stages were over); the stage
        in progress is the first one not complete."""
        resume = state["resume"]
        fit = cls(stages, best_acc=float(state["best_acc"]), best_top5=resume["best_acc_top5"],
                  last=resume["last"] or {}, selected=resume.get("selected"), batches_done=resume["batches_done"],
                  epoch_stats=EpochStats(resume["epoch_stats"]) if resume["epoch_stats"] else None)
        mark = resume.get("save") or {}
        fit.save_seq, fit.saved_files = int(mark.get("seq", 0)), list(mark.get("files", []))
        fit._load_stages(resume, source)
        fit.main.optimizer.load_state_dict(state["optimizer"])
        fit.main.epochs_done, fit.main.budget.done = int(state["epoch"]), resume["steps"]
        return fit

    def _load_stages(self, resume: dict[str, Any], source: str) -> None:
        """The earlier stages' progress and optimisers, and the stage in progress."""
        earlier = self.stages[:-1]
        if "stage" not in resume:  # written before stages were kept: its earlier stages were over
            for stage in earlier:
                stage.epochs_done = stage.epochs
            self.stage = len(earlier)
        else:
            saved = resume["stages"]
            if [s["name"] for s in saved] != [s.name for s in earlier]:
                raise UserError(f"{source} was made by a run of other stages ({[s['name'] for s in saved]}, this "
                                f"run: {[s.name for s in earlier]}): resume with the settings it was made with")
            for stage, record in zip(earlier, saved):
                stage.epochs_done, stage.budget.done = record["epochs_done"], record["steps"]
                if record["optimizer"] is not None:
                    stage.optimizer.load_state_dict(record["optimizer"])
            self.stage = int(resume["stage"])
        while self.stage < len(earlier) and self.stages[self.stage].complete:
            self.stage += 1
