"""The loop's parts (engine/epoch.py, engine/guards.py, engine/progress.py): train_one_epoch stopping on a non-finite loss and at the step
budget, its TensorBoard step scalars and the --print_freq progress line."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn as nn

from engine.logger import RunLog
from engine.epoch import EpochContext, train_one_epoch
from engine.guards import NonFiniteLoss, StepBudget


def test_nonfinite_loss_stops_with_terms():
    model = nn.Linear(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    loader = [(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))]

    def step(batch):
        logits = model(batch[0])
        return logits, batch[1], {"ce": logits.sum() * 0 + 1.5, "kd": torch.tensor(float("nan"))}

    with pytest.raises(NonFiniteLoss, match=r"epoch 3, step 1 \(ce=1.5, kd=nan\)"):
        train_one_epoch(EpochContext(model, step, optimizer, StepBudget(None)), 3, loader)
    assert torch.equal(model.weight, before), "no update from a non-finite loss"


def test_step_budget_stops_mid_epoch():
    model = nn.Linear(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def step(batch):
        calls.append(1)
        logits = model(batch[0])
        return logits, batch[1], {"ce": nn.functional.cross_entropy(logits, batch[1])}

    loader = [(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))] * 5
    budget = StepBudget(3)
    stats = train_one_epoch(EpochContext(model, step, optimizer, budget), 1, loader)
    assert len(calls) == 3 and budget.exhausted and "loss_ce" in stats


class _Writer:
    """Records add_scalar calls and flushes."""

    def __init__(self):
        self.scalars, self.flushes = [], 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1


def test_step_scalars_every_tb_freq_steps_across_epochs(tmp_path):
    """train_one_epoch logs every tb_freq-th step of the budget (its count across epochs), the
    loss, each term, lr and the batch's top-1, without flushing; an inactive RunLog (a rank
    other than 0) writes nothing."""
    model = nn.Linear(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(batch):
        logits = model(batch[0])
        ce = nn.functional.cross_entropy(logits, batch[1])
        return logits, batch[1], {"ce": ce, "kd": ce * 0 + 0.25}

    loader = [(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))] * 3
    run = RunLog(tmp_path / "run", argparse.Namespace())
    run.writer = writer = _Writer()
    budget = StepBudget(None)
    for epoch in (1, 2):
        train_one_epoch(EpochContext(model, step, optimizer, budget, run=run, tb_freq=2), epoch, loader)
    assert sorted({s for _, _, s in writer.scalars}) == [2, 4, 6] and writer.flushes == 0
    at_2 = {tag: value for tag, value, s in writer.scalars if s == 2}
    assert set(at_2) == {"step/loss", "step/ce", "step/kd", "step/lr", "step/top1"}
    assert at_2["step/loss"] == pytest.approx(at_2["step/ce"] + 0.25) and at_2["step/lr"] == 0.1
    quiet = RunLog(tmp_path / "other", argparse.Namespace(), active=False)
    train_one_epoch(EpochContext(model, step, optimizer, budget, run=quiet, tb_freq=1), 3, loader)
    assert quiet.writer is None and not (tmp_path / "other").exists()


def test_progress_line_labels_means_and_this_step(capsys):
    """The --print_freq line: the epoch's means so far, then this step's loss and its terms."""
    from engine.progress import EpochStats, Progress
    stats = EpochStats()
    stats.update({"ce": 2.0, "kd": 1.0}, 50.0, 4)
    stats.update({"ce": 1.5, "kd": 0.5}, 25.0, 4)
    Progress("epoch 3", 10, 1, 2).step(2, stats, {"ce": 1.5, "kd": 0.5}, 4)
    line = capsys.readouterr().out
    assert line.startswith("epoch 3 [2/10]  epoch mean: loss 2.5000 top-1 37.50  this step: loss 2 ce 1.5 kd 0.5  ")
    assert line.count("\n") == 1
