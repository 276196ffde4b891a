"""Training utilities: meters, accuracy, schedules, checkpoints, run records (the loop's parts:
test_loops.py)."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn as nn

from common import checkpoint as ckpt
from common.errors import UserError
from common.meters import AverageMeter, accuracy
from engine.logger import RunLog
from engine.optim import adjust_learning_rate, build_optimizer, lr_at_epoch
from tests.tolerance import FP32, FP64, approx


def test_average_meter_weights_by_count():
    m = AverageMeter()
    m.update(1.0, 1)
    m.update(4.0, 3)
    assert m.val == 4.0 and m.count == 4 and m.avg == approx(13 / 4, rtol=FP64)


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.3, 0.4, 0.3]])
    target = torch.tensor([1, 2, 2, 0])
    top1, top2, top5 = accuracy(logits, target, topk=(1, 2, 5))
    assert top1.item() == approx(50.0, rtol=FP32)   # rows 0 and 2
    assert top2.item() == approx(75.0, rtol=FP32)   # row 3's target 0 ties second; row 1's is last
    assert top5.item() == approx(100.0, rtol=FP32)  # k beyond the class count covers all


def _opt(**kw):
    base = dict(learning_rate=0.05, lr_decay_epochs=[150, 180, 210], lr_decay_rate=0.1, epochs=240,
                momentum=0.9, weight_decay=5e-4, lr_schedule="step")
    base.update(kw)
    return argparse.Namespace(**base)


def test_step_schedule_matches_repdistiller():
    opt = _opt()
    assert lr_at_epoch(1, opt) == approx(0.05, rtol=FP64)
    assert lr_at_epoch(150, opt) == approx(0.05, rtol=FP64)
    assert lr_at_epoch(151, opt) == approx(0.005, rtol=FP64)
    assert lr_at_epoch(181, opt) == approx(0.0005, rtol=FP64)
    assert lr_at_epoch(240, opt) == approx(0.00005, rtol=FP64)


def test_cosine_schedule():
    opt = _opt(lr_schedule="cosine", epochs=10)
    assert lr_at_epoch(1, opt) == approx(0.05, rtol=FP64)
    assert lr_at_epoch(6, opt) == approx(0.025, rtol=FP64)
    assert lr_at_epoch(10, opt) == approx(0.025 * (1 + math.cos(math.pi * 0.9)), rtol=FP64)


def test_optimizer_and_adjust():
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model.parameters(), _opt())
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 5e-4)
    assert adjust_learning_rate(200, _opt(), optimizer) == approx(0.0005, rtol=FP64)
    assert group["lr"] == approx(0.0005, rtol=FP64)


def test_atomic_save_keeps_good_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "resnet8_last.pth"
    ckpt.save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(UserError, match="could not write the checkpoint .* the previous one was kept"):
        ckpt.save_checkpoint({"model": {"w": torch.zeros(2)}, "epoch": 2}, path)
    monkeypatch.undo()
    state = ckpt.load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["resnet8_last.pth"], "no temporary file left behind"


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        ckpt.load_checkpoint(bad)
    good = tmp_path / "good.pth"
    ckpt.save_checkpoint({"model": {}}, good)
    good.write_bytes(good.read_bytes()[:20])
    with pytest.raises(UserError, match="truncated"):
        ckpt.load_checkpoint(good)


def test_load_weights_names_disagreeing_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    other = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)).state_dict()
    with pytest.raises(UserError, match=r"wrong shape: 0\.weight"):
        ckpt.load_weights(model, other, "t.pth")
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    ckpt.load_weights(model, prefixed, "ddp.pth")  # DataParallel prefix accepted


def test_runlog_writes_args_results_and_tensorboard(tmp_path):
    opt = argparse.Namespace(model="resnet8", lr_decay_epochs=[1, 2], path=tmp_path)
    run = RunLog(tmp_path / "run", opt)
    run.epoch({"epoch": 1, "test_acc": 12.5, "train_loss": 3.0})
    run.save("finished", best_acc=12.5)
    run.close()
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["model"] == "resnet8" and args["lr_decay_epochs"] == [1, 2]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and results["best_acc"] == 12.5
    assert results["history"] == [{"epoch": 1, "test_acc": 12.5, "train_loss": 3.0, "session": 0}]
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
