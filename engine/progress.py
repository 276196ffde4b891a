"""An epoch's statistics (:class:`EpochStats`: sums of its losses, accuracy and images, kept
across a mid-epoch resume) and its console progress lines (:class:`Progress`)."""
from __future__ import annotations

import time
from typing import Any

from engine.logger import is_terminal_output


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
        """Add one batch of ``n`` images: its loss ``values`` (term -> value) and top-1 (%)."""
        self.batches += 1
        self.count += n
        self.loss += sum(values.values()) * n
        self.correct += top1 * n
        for name, value in values.items():
            self.terms[name] = self.terms.get(name, 0.0) + value * n

    def state_dict(self) -> dict[str, Any]:
        """The sums as plain values (what a checkpoint records; the constructor takes them back)."""
        return {"count": self.count, "loss": self.loss, "correct": self.correct, "terms": dict(self.terms),
                "seconds": self.seconds, "batches": self.batches}

    def summary(self) -> dict[str, float]:
        """The epoch's averages: ``train_loss``, ``train_acc``, ``images_per_s``, ``loss_<term>``."""
        n = max(self.count, 1)
        stats = {"train_loss": self.loss / n, "train_acc": self.correct / n,
                 "images_per_s": self.count / self.seconds if self.seconds > 0 else 0.0}
        stats.update({f"loss_{name}": value / n for name, value in self.terms.items()})
        return stats


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
