"""DDP on the CPU with gloo: two processes with batch B each equal one process with batch 2B
(losses, updated student weights, memory banks), and a torchrun run of train_student.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from common import distributed
from common.declare import options_from
from common.distributed import EpochSampler, ShardSampler, all_gather_cat, wrap_ddp
from common.runtime import Runtime
from common.sync_bn import convert_sync_batchnorm
from distiller_zoo.step import DistillStep
from engine.methods import build_distiller, get_method
from engine.optim import build_optimizer
from models import build_model
from tests.datagen import SYNTHETIC
from tests.tolerance import FP32, FP32_DEEP, approx, assert_close
import train_student

ROOT = Path(__file__).resolve().parents[2]
B, N_DATA, K, CLASSES = 4, 64, 16, 4


def _batch() -> tuple[torch.Tensor, ...]:
    """A fixed batch of 2B samples: images, labels, indices and contrast indices [2B, K+1]."""
    gen = torch.Generator().manual_seed(123)
    img = torch.randn(2 * B, 3, 32, 32, generator=gen)
    target = torch.randint(0, CLASSES, (2 * B,), generator=gen)
    index = torch.randperm(N_DATA, generator=gen)[: 2 * B]
    negatives = torch.stack([torch.randperm(N_DATA, generator=gen)[:K] for _ in range(2 * B)])
    return img, target, index, torch.cat([index[:, None], negatives], dim=1)


def _distiller(method: str, opt, student: nn.Module, teacher: nn.Module, sample: torch.Tensor) -> nn.Module:
    """``--distill method`` with the options of ``opt``, for a training set of N_DATA samples."""
    options = options_from(get_method(method).Options, opt)
    return build_distiller(method, options, student, teacher, sample, n_data=N_DATA, model_s=opt.model_s)


def one_step(method: str, rank: int, world: int) -> dict:
    """Build student, teacher and Distiller from fixed seeds, take one SGD step on this rank's
    share of :func:`_batch` (all of it in a world of one) and return what the step produced."""
    opt = train_student.parse_option(["--path_t", "unused.pth", "--distill", method, "--model_s", "resnet8", "--nce_k", str(K),
                                      "--dataset", "synthetic", "--device", "cpu", "-a", "1", "-b", "0.8"])
    torch.manual_seed(0)
    student = build_model("resnet8", num_classes=CLASSES)
    teacher = build_model("resnet14", num_classes=CLASSES).eval().requires_grad_(False)
    if world > 1:
        student = convert_sync_batchnorm(student)
    runtime = Runtime(torch.device("cpu"), dist=distributed.current())
    img, target, index, contrast_idx = _batch()
    distillers = nn.ModuleList([_distiller(method, opt, student, teacher, img[:2])])
    step = DistillStep(student, [teacher], distillers, (opt.gamma, opt.alpha, opt.beta), opt.kd_T, runtime)
    params = list(student.parameters()) + [p for d in distillers for p in d.trainable_parameters()]
    optimizer = build_optimizer(params, opt)
    ddp = wrap_ddp(step, runtime.device, find_unused_parameters=True)
    ddp.train()
    share = slice(rank * (2 * B // world), (rank + 1) * (2 * B // world))
    raw = (img[share], target[share], index[share], contrast_idx[share])
    logits, _, terms = ddp(raw)
    loss = sum(terms.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"terms": {k: v.item() for k, v in terms.items()}, "logits": logits.detach(),
            "student": {k: v.clone() for k, v in student.state_dict().items()},
            "distiller": {k: v.clone() for k, v in distillers.state_dict().items()}}


def _worker(rank: int, world: int, init_file: str, method: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(one_step(method, rank, world), Path(out) / f"{method}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run :func:`one_step` for KD and CRD in two gloo processes; returns the per-rank results."""
    out = tmp_path_factory.mktemp("ddp")
    results = {}
    for method in ("kd", "crd"):
        init_file = out / f"init_{method}"
        mp.start_processes(_worker, args=(2, str(init_file), method, str(out)), nprocs=2,
                           start_method="spawn", join=True)
        results[method] = [torch.load(out / f"{method}_rank{r}.pt", weights_only=True) for r in range(2)]
    return results


@pytest.mark.parametrize("method", ["kd", "crd"])
def test_two_processes_equal_one_with_twice_the_batch(two_ranks, method):
    ranks = two_ranks[method]
    single = one_step(method, 0, 1)
    # the loss of 2B samples is the mean of the two ranks' losses of B samples
    for name, value in single["terms"].items():
        mean = sum(r["terms"][name] for r in ranks) / 2
        assert mean == approx(value, rtol=FP32), name
    assert_close(torch.cat([r["logits"] for r in ranks]), single["logits"], rtol=FP32)
    for part in ("student", "distiller"):
        for key, expected in single[part].items():
            for r in ranks:
                got = r[part][key]
                if expected.is_floating_point():
                    assert_close(got, expected, rtol=FP32_DEEP, msg=f"{part} {key}")  # after an SGD step
                else:
                    assert torch.equal(got, expected), f"{part} {key}"
    if method == "crd":  # the banks moved, identically on both ranks, and Z was estimated once for all
        for key in ("criterion.contrast.memory_v1", "criterion.contrast.memory_v2", "criterion.contrast.params"):
            assert torch.equal(ranks[0]["distiller"]["0." + key], ranks[1]["distiller"]["0." + key]), key
            assert not torch.equal(ranks[0]["distiller"]["0." + key], one_step_initial_bank(key)), key


def one_step_initial_bank(key: str) -> torch.Tensor:
    opt = train_student.parse_option(["--path_t", "unused.pth", "--distill", "crd", "--model_s", "resnet8", "--nce_k", str(K),
                                      "--dataset", "synthetic", "--device", "cpu"])
    torch.manual_seed(0)
    student = build_model("resnet8", num_classes=CLASSES)
    teacher = build_model("resnet14", num_classes=CLASSES).eval()
    return _distiller("crd", opt, student, teacher, _batch()[0][:2]).state_dict()[key]


def test_epoch_sampler_shards_one_permutation():
    whole = list(EpochSampler(10, seed=3))
    ranks = [EpochSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    shards = [list(s) for s in ranks]
    assert all(len(s) == 4 for s in shards)  # 10 padded to 12
    assert [shards[r][i] for i in range(4) for r in range(3)][:10] == whole
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != whole  # a new order each epoch, from (seed, epoch) only
    sampler.set_epoch(0)
    sampler.skip(4)
    assert list(sampler) == whole[4:] and list(sampler) == whole  # skip applies to one pass
    assert sum((list(ShardSampler(10, r, 3)) for r in range(3)), []) == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]


def test_single_process_helpers_are_identities():
    x = torch.arange(6.0).reshape(3, 2)
    assert all_gather_cat(x) is x
    assert distributed.all_reduce_sum(x) is x
    assert not distributed.current().enabled and distributed.is_main_process()
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, torch.device("cpu")) is model


def test_torchrun_two_processes_train_student_crd(teacher, tmp_path):
    save = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train_student.py", "--path_t", str(teacher), "--distill", "crd", "--model_s", "resnet8",
           "--nce_k", "16", *SYNTHETIC, "--epochs", "2", "--sync_bn", "--save_folder", str(save)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("distilling resnet8 -> resnet8") == 1  # rank 0 alone speaks
    assert proc.stdout.count("epoch 2 ") == 1
    assert "2 processes (gloo, cpu)" in proc.stdout
    (folder,) = list(save.iterdir())
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "finished" and results["world_size"] == 2
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    # 64 training images over 2 ranks of batch 8: 4 steps per epoch
    assert results["steps"] == 8
    state = torch.load(next(folder.glob("*_last.pth")), weights_only=True)
    assert state["epoch"] == 2 and len(state["resume"]["per_rank"]) == 2
    assert not any(k.startswith("module.") for k in state["model"])
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
