"""What stops a training run: a non-finite loss or weights (:func:`check_finite`,
:class:`NonFiniteLoss`), SIGINT/SIGTERM (:class:`StopSignals`, :class:`Interrupted`) and the
``--max_steps`` budget (:class:`StepBudget`)."""
from __future__ import annotations

import math
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from common import distributed
from common.checkpoint import nonfinite_tensors
from common.errors import Stopped, UserError


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


def weights_are_finite(modules: dict[str, nn.Module]) -> bool:
    """Whether every tensor of every module's state (weights and buffers) is finite."""
    return not any(nonfinite_tensors(m.state_dict()) for m in modules.values())


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
