"""common/sync_bn.py: CPUSyncBatchNorm and convert_sync_batchnorm.

Without torch.distributed a converted model is plain BatchNorm. With two gloo processes (spawned,
CPU) each holding half a batch, a DDP resnet8 with synchronised BatchNorm gives the logits, mean
loss, gradients, SGD updates and running statistics of one process with plain BatchNorm on the
whole batch; standalone layers (BatchNorm1d on [N, C] and [N, C, L], uneven shards, momentum=None)
give the full batch's outputs, input gradients and summed parameter gradients.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from common.sync_bn import CPUSyncBatchNorm, convert_sync_batchnorm
from models import model_dict
from tests.tolerance import FP32_DEEP, assert_close

pytestmark = pytest.mark.numeric

B = 4           # samples per rank in the DDP run
WORLD = 2
STEPS = 2
LR = 0.1
SPLIT = (3, 5)  # uneven shards for the standalone layers
RTOL = FP32_DEEP  # two processes' partial sums of a network's statistics, gradients and updates


def _resnet8() -> nn.Module:
    torch.manual_seed(0)
    return model_dict["resnet8"](num_classes=10)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)


def _layers() -> nn.ModuleDict:
    """Standalone BatchNorms: 1d on [N, C] (cumulative average), 1d on [N, C, L], 2d without
    affine, 2d without running statistics."""
    torch.manual_seed(1)
    layers = nn.ModuleDict({
        "bn1d": nn.BatchNorm1d(6, momentum=None),
        "bn1d_seq": nn.BatchNorm1d(5),
        "bn2d_noaffine": nn.BatchNorm2d(3, affine=False),
        "bn2d_nostats": nn.BatchNorm2d(3, track_running_stats=False),
    })
    for m in layers.values():
        if m.affine:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return layers


def _layer_inputs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Full-batch input (with an offset, to test the variance's stability) and a fixed cotangent."""
    g = torch.Generator().manual_seed(2)
    n = sum(SPLIT)
    shapes = {"bn1d": (n, 6), "bn1d_seq": (n, 5, 7), "bn2d_noaffine": (n, 3, 4, 4),
              "bn2d_nostats": (n, 3, 4, 4)}
    return {k: (torch.randn(s, generator=g) * 2 + 3, torch.randn(s, generator=g))
            for k, s in shapes.items()}


def _layer_run(layers: nn.ModuleDict, inputs, lo: int, hi: int, iters: int = 2) -> dict:
    """Forward/backward of each layer on samples [lo, hi) of its input, `iters` times (the running
    statistics update each time), then an eval-mode forward; returns outputs and gradients."""
    res = {}
    for name, layer in layers.items():
        x_full, cot_full = inputs[name]
        x = x_full[lo:hi].clone().requires_grad_(True)
        layer.train()
        for _ in range(iters):
            x.grad = None
            layer.zero_grad()
            out = layer(x)
            (out * cot_full[lo:hi]).sum().backward()
        layer.eval()
        with torch.no_grad():
            ev = layer(x_full[lo:hi])
        res[name] = {"out": out.detach(), "x_grad": x.grad.clone(), "eval": ev,
                     "grads": {k: p.grad.clone() for k, p in layer.named_parameters()},
                     "state": {k: v.clone() for k, v in layer.state_dict().items()}}
    return res


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(WORLD * B, 3, 32, 32, generator=g), torch.randint(0, 10, (WORLD * B,), generator=g)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """STEPS SGD steps with cross-entropy (mean) on (x, y); records logits, loss and gradients."""
    opt = _sgd(model)
    model.train()
    rec = {"logits": [], "loss": [], "grads": []}
    for _ in range(STEPS):
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        rec["logits"].append(logits.detach())
        rec["loss"].append(loss.detach())
        rec["grads"].append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
    return rec


def _worker(rank: int, folder: str) -> None:
    """One rank: DDP resnet8 with synchronised BatchNorm on its half of the batch, then the
    standalone layers on its uneven shard. Writes its results to folder/rank{rank}.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(folder, "rendezvous"),
                            rank=rank, world_size=WORLD)
    try:
        model = convert_sync_batchnorm(_resnet8())
        assert any(isinstance(m, CPUSyncBatchNorm) for m in model.modules())
        ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
        x, y = _data()
        rec = _train(ddp, x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B])
        rec["grads"] = [{k.removeprefix("module."): v for k, v in g.items()} for g in rec["grads"]]
        model.eval()
        with torch.no_grad():
            rec["eval_logits"] = model(x[rank * B:(rank + 1) * B])
        rec["state"] = {k: v.clone() for k, v in model.state_dict().items()}

        layers = convert_sync_batchnorm(_layers())
        lo = sum(SPLIT[:rank])
        rec["layers"] = _layer_run(layers, _layer_inputs(), lo, lo + SPLIT[rank])
        torch.save(rec, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dtype.is_floating_point:
        assert_close(a, b, rtol=RTOL, msg=what)
    else:
        assert torch.equal(a, b), what


# ----------------------------------------------------------------------------------------------
# without torch.distributed

def test_converted_model_is_plain_batchnorm_without_distributed():
    assert not dist.is_initialized()
    ref = _resnet8()
    conv = convert_sync_batchnorm(copy.deepcopy(ref))
    kinds = [type(m) for m in conv.modules()]
    assert CPUSyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    sd_ref, sd_conv = ref.state_dict(), conv.state_dict()
    assert list(sd_ref) == list(sd_conv)
    assert all(sd_ref[k].shape == sd_conv[k].shape and sd_ref[k].dtype == sd_conv[k].dtype for k in sd_ref)
    # loads into the plain model and back
    ref.load_state_dict(sd_conv)
    conv.load_state_dict(sd_ref)

    x, y = _data()
    rec_ref, rec_conv = _train(ref, x, y), _train(conv, x, y)
    for a, b in zip(rec_ref["logits"], rec_conv["logits"]):
        assert torch.equal(a, b)
    for ga, gb in zip(rec_ref["grads"], rec_conv["grads"]):
        assert all(torch.equal(ga[k], gb[k]) for k in ga)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, conv.state_dict()[k]), k
    ref.eval()
    conv.eval()
    with torch.no_grad():
        assert torch.equal(ref(x), conv(x))


def test_convert_keeps_parameters_buffers_and_flags():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.3),
                          nn.Sequential(nn.Flatten(), nn.BatchNorm1d(8, momentum=None, affine=False)),
                          nn.BatchNorm2d(4, track_running_stats=False))
    model[1].weight.requires_grad_(False)
    model[1].num_batches_tracked.fill_(7)
    model.eval()
    old_bn = model[1]
    params = {id(p) for p in model.parameters()}
    out = convert_sync_batchnorm(model)
    assert out is model
    new_bn = model[1]
    assert isinstance(new_bn, CPUSyncBatchNorm) and isinstance(model[2][1], CPUSyncBatchNorm)
    assert isinstance(model[3], CPUSyncBatchNorm)
    assert new_bn.weight is old_bn.weight and not new_bn.weight.requires_grad
    assert new_bn.running_mean is old_bn.running_mean and int(new_bn.num_batches_tracked) == 7
    assert (new_bn.eps, new_bn.momentum, new_bn.affine, new_bn.training) == (1e-3, 0.3, True, False)
    assert model[2][1].momentum is None and not model[2][1].affine and model[2][1].weight is None
    assert not model[3].track_running_stats and model[3].running_mean is None
    assert {id(p) for p in model.parameters()} == params
    # a BatchNorm itself is returned converted; converting again changes nothing
    bn = convert_sync_batchnorm(nn.BatchNorm1d(3))
    assert isinstance(bn, CPUSyncBatchNorm)
    assert convert_sync_batchnorm(bn) is bn

    # BatchNorm1d inputs [N, C] and [N, C, L] without distributed: exactly nn.BatchNorm1d
    for shape in [(6, 3), (6, 3, 5)]:
        ref = nn.BatchNorm1d(3, momentum=None)
        conv = convert_sync_batchnorm(copy.deepcopy(ref))
        x = torch.randn(shape)
        for _ in range(2):
            assert torch.equal(ref(x), conv(x))
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), conv.state_dict().values()))
    with pytest.raises(ValueError):
        CPUSyncBatchNorm(3)(torch.randn(3))


# ----------------------------------------------------------------------------------------------
# two gloo processes

def test_two_ranks_match_one_process_on_the_whole_batch(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # reference: one process, plain BatchNorm, the whole batch
    ref = _resnet8()
    x, y = _data()
    rec = _train(ref, x, y)
    for s in range(STEPS):
        _close(torch.cat([r["logits"][s] for r in ranks]), rec["logits"][s], f"logits step {s}")
        _close(torch.stack([r["loss"][s] for r in ranks]).mean(), rec["loss"][s], f"loss step {s}")
        for r in ranks:
            for k, g in rec["grads"][s].items():
                _close(r["grads"][s][k], g, f"grad {k} step {s}")
    state = ref.state_dict()
    assert int(state["bn1.num_batches_tracked"]) == STEPS
    for r in ranks:
        assert list(r["state"]) == list(state)
        for k, v in state.items():
            _close(r["state"][k], v, f"state {k}")  # parameters after the steps and running stats
    ref.eval()
    with torch.no_grad():
        _close(torch.cat([r["eval_logits"] for r in ranks]), ref(x), "eval logits")

    # standalone layers on uneven shards
    res = _layer_run(_layers(), _layer_inputs(), 0, sum(SPLIT))
    for name, full in res.items():
        parts = [r["layers"][name] for r in ranks]
        _close(torch.cat([p["out"] for p in parts]), full["out"], f"{name} output")
        _close(torch.cat([p["x_grad"] for p in parts]), full["x_grad"], f"{name} input grad")
        for k, g in full["grads"].items():  # no DDP here: the ranks' gradients sum to the full one
            _close(sum(p["grads"][k] for p in parts), g, f"{name} grad {k}")
        for p in parts:
            assert list(p["state"]) == list(full["state"])
            for k, v in full["state"].items():
                _close(p["state"][k], v, f"{name} state {k}")
        if name != "bn2d_nostats":  # eval with running stats: local, equal to the full batch's rows
            _close(torch.cat([p["eval"] for p in parts]), full["eval"], f"{name} eval output")
