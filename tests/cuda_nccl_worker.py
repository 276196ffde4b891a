"""Run by tests/engine/test_cuda.py as ``torchrun --standalone --nproc_per_node 1 -m tests.cuda_nccl_worker OUT``:
joins an NCCL process group on one GPU and checks the collectives of common/distributed.py and
the memory bank's gathered update against the single-process path, then writes OUT (JSON).
``... OUT gloo`` does the same on the CPU with gloo (to check this script without a GPU).

A world of one takes the single-process path everywhere (``DistInfo.enabled`` is False), so the
multi-process path is forced on here: it then runs the real NCCL all-gathers, which must give
back this rank's own rows.
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import distributed
from crd import ContrastLoss, ContrastMemory
from tests.tolerance import FP32_EXACT, assert_close


class ForcedWorld(distributed.DistInfo):
    """This process's place, reported as a multi-process world whatever its size."""

    @property
    def enabled(self) -> bool:
        return True


def bank_step(memory: ContrastMemory, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor,
              idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """One scored and updated step of ``memory``: loss, gradients, Z and the banks."""
    a, b = v1.clone().requires_grad_(True), v2.clone().requires_grad_(True)
    out_v1, out_v2 = memory(a, b, y, idx)
    criterion = ContrastLoss(memory.n_data)
    loss = criterion(out_v1) + criterion(out_v2)
    loss.backward()
    return {"loss": loss.detach(), "grad_v1": a.grad, "grad_v2": b.grad, "params": memory.params.clone(),
            "memory_v1": memory.memory_v1.clone(), "memory_v2": memory.memory_v2.clone()}


def main(out: str, backend: str = "nccl") -> None:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    checks: dict[str, bool] = {}
    try:
        single = distributed.current
        forced = ForcedWorld(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
        distributed.current = lambda: forced
        try:
            rows = torch.randn(5, 128, device=device)
            index = torch.randperm(1000, device=device)[:5]
            checks["all_gather_cat float rows"] = torch.equal(distributed.all_gather_cat(rows), rows)
            checks["all_gather_cat indices"] = torch.equal(distributed.all_gather_cat(index), index)
            checks["all_gather_cat no rows"] = distributed.all_gather_cat(rows[:0]).shape == (0, 128)
            checks["all_reduce_sum"] = torch.equal(distributed.all_reduce_sum(rows), rows)
            checks["any_rank"] = distributed.any_rank(True, device) and not distributed.any_rank(False, device)
            checks["gather_objects"] = distributed.gather_objects({"rank": 0}) == [{"rank": 0}]

            torch.manual_seed(0)
            n_data, k, batch, dim = 2000, 64, 16, 128
            gathered = ContrastMemory(dim, n_data, k).to(device)
            local = copy.deepcopy(gathered)
            initial = gathered.memory_v1.clone()
            gather, calls = distributed.all_gather_cat, []
            distributed.all_gather_cat = lambda t: calls.append(t.shape) or gather(t)
            steps = []
            for step in range(2):
                y = torch.randperm(n_data, device=device)[:batch]
                idx = torch.cat([y[:, None], torch.randint(0, n_data, (batch, k), device=device)], dim=1)
                v1, v2 = F.normalize(torch.randn(2, batch, dim, device=device), dim=2)
                distributed.current = lambda: forced
                got = bank_step(gathered, v1, v2, y, idx)
                distributed.current = single
                steps.append((got, bank_step(local, v1, v2, y, idx)))
            distributed.all_gather_cat = gather
            checks["bank updates gathered y, v1, v2"] = len(calls) == 3 * len(steps)
            distributed.current = lambda: forced
            for step, (got, expected) in enumerate(steps):
                for name, value in expected.items():
                    assert_close(got[name], value, rtol=FP32_EXACT, msg=f"{name}, step {step}")
                    checks[f"bank step {step} {name}"] = True
            checks["banks moved"] = not torch.equal(gathered.memory_v1, initial)
            before = gathered.memory_v1.clone()
            distributed.broadcast_buffers(gathered)  # rank 0's buffers: this rank's own
            checks["broadcast_buffers"] = torch.equal(gathered.memory_v1, before)
        finally:
            distributed.current = single
        report = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "checks": checks}
    finally:
        dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:3])
