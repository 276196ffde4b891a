"""RRD (Giakoumoglou & Stathaki, 2024): the reference's golden, the paper's configuration, the FIFO
queue (wrapping, checkpointed, gathered over processes), the resume (every pair of the tables and
the train_student runs: test_table_pairs.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from common.declare import options_from
from crd.rrd import RRD, RRDLoss, RRDOptions
from distiller_zoo.registry import get_method
from tests import goldens
from tests.datagen import SYNTHETIC
from tests.tolerance import FP32, assert_close
import train_student

pytestmark = pytest.mark.numeric

GOLDEN = goldens.method("RRD")


def golden_loss(**kwargs) -> RRDLoss:
    """RRDLoss in the golden's configuration, holding the reference module's state (names mapped:
    the reference nests ours under ``memory.``)."""
    config = GOLDEN["config"]
    torch.manual_seed(0)
    loss = RRDLoss(config["s_dim"], config["t_dim"], config["feat_dim"], config["nce_k"], config["nce_t_s"],
                   config["nce_t_t"], **kwargs)
    state = {name.removeprefix("memory."): value for name, value in goldens.state(GOLDEN).items()}
    loss.load_state_dict(state, strict=True)
    return loss


def test_matches_the_reference_over_two_steps():
    """Two consecutive calls (the second on the queue the first left), every output, the queue,
    its pointer and every gradient the golden lists."""
    loss, inputs = golden_loss(), goldens.inputs(GOLDEN)
    assert torch.equal(loss.queue, inputs["rrd_queue"]) and int(loss.queue_ptr) == 56
    for step in GOLDEN["outputs"]["steps"]:
        f_s = inputs[step["inputs"]["f_s"]].clone().requires_grad_(True)
        f_t = inputs[step["inputs"]["f_t"]]
        loss.zero_grad(set_to_none=True)
        value = loss(f_s, f_t)
        value.backward()
        goldens.assert_matches(value.reshape(()), torch.tensor(step["loss"]), rtol=1e-4, what="loss")
        assert int(loss.queue_ptr) == step["queue_ptr_after"]
        goldens.assert_matches(loss.queue, step["queue_after"], rtol=1e-4, what="queue")
        got = {"f_s": f_s.grad, "memory.embed_s.weight": loss.embed_s.weight.grad,
               "memory.embed_s.bias": loss.embed_s.bias.grad}
        assert set(step["grads"]) == set(GOLDEN["grads"]) == set(got)
        for name, want in step["grads"].items():
            goldens.assert_matches(got[name], want, rtol=1e-3, what=name)
        assert loss.embed_t.weight.grad is None  # the teacher's head gets no gradient (reference)


def explicit_loss(loss: RRDLoss, f_s, f_t, queue):
    """The paper's cross-entropy written out sample by sample."""
    z_s = F.normalize(loss.embed_s(f_s), dim=1)
    z_t = F.normalize(loss.embed_t(f_t), dim=1)
    total = 0.0
    for i in range(len(f_s)):
        p_t = torch.exp(z_t[i] @ queue.t() / loss.nce_t_t)
        p_t = p_t / p_t.sum()
        log_p_s = z_s[i] @ queue.t() / loss.nce_t_s - torch.logsumexp(z_s[i] @ queue.t() / loss.nce_t_s, 0)
        total = total - (p_t * log_p_s).sum()
    return total / len(f_s)


def test_paper_configuration_queue_start_and_teacher_head():
    """Defaults: unit queue rows (the paper's buffer holds unit embeddings; the reference's
    ``columns`` start normalises the same Gaussian draw along dim 0) and a frozen teacher head;
    ``train_embed_t`` sends the explicit formula's gradient into embed_t."""
    torch.manual_seed(0)
    rows = RRDLoss(12, 20, 8, 16)
    torch.manual_seed(0)
    columns = RRDLoss(12, 20, 8, 16, queue_init="columns")
    assert_close(rows.queue.norm(dim=1), torch.ones(16), rtol=FP32)
    assert_close(columns.queue.norm(dim=0), torch.ones(8), rtol=FP32)
    torch.manual_seed(0)  # the same Gaussian draw, made after the two heads as the reference does
    torch.nn.Linear(12, 8), torch.nn.Linear(20, 8)
    draw = torch.randn(16, 8)
    assert_close(rows.queue, F.normalize(draw, dim=1), rtol=FP32)
    assert_close(columns.queue, F.normalize(draw, dim=0), rtol=FP32)
    assert not any(p.requires_grad for p in rows.embed_t.parameters())
    with pytest.raises(ValueError, match="queue_init"):
        RRDLoss(12, 20, 8, 16, queue_init="diagonal")

    gen = torch.Generator().manual_seed(3)
    f_s = torch.randn(4, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(4, 20, generator=gen, dtype=torch.float64)
    for train_t in (False, True):  # in float64: the comparisons hold to rounding
        torch.manual_seed(0)
        loss = RRDLoss(12, 20, 8, 16, train_embed_t=train_t).double()
        value = loss(f_s, f_t)  # enqueues first: the expected value uses the queue after the write
        queue = loss.queue.clone()
        expected = (explicit_loss if train_t else explicit_loss_fixed_target)(loss, f_s, f_t, queue)
        assert_close(value, expected, rtol=1e-12)
        got = torch.autograd.grad(value, [f_s, *loss.embed_s.parameters()]
                                  + (list(loss.embed_t.parameters()) if train_t else []))
        want = torch.autograd.grad(expected, [f_s, *loss.embed_s.parameters()]
                                   + (list(loss.embed_t.parameters()) if train_t else []))
        for g, w in zip(got, want):
            assert_close(g, w, rtol=1e-9)
        if train_t:
            assert got[-2].abs().sum() > 0  # embed_t.weight learns


def explicit_loss_fixed_target(loss: RRDLoss, f_s, f_t, queue):
    """The explicit loss with the teacher's distribution as a constant target."""
    with torch.no_grad():
        z_t = F.normalize(loss.embed_t(f_t), dim=1)
        p_t = F.softmax(z_t @ queue.t() / loss.nce_t_t, dim=1)
    z_s = F.normalize(loss.embed_s(f_s), dim=1)
    return -(p_t * F.log_softmax(z_s @ queue.t() / loss.nce_t_s, dim=1)).sum(1).mean()


def test_queue_writes_wrap_for_any_batch_size():
    torch.manual_seed(0)
    loss = RRDLoss(6, 6, 4, 10)
    keys = F.normalize(torch.randn(7, 4), dim=1)
    loss.queue_ptr[0] = 6
    before = loss.queue.clone()
    loss.enqueue(keys)  # rows 6..9 then 0..2
    assert int(loss.queue_ptr) == 3
    assert torch.equal(loss.queue[6:], keys[:4]) and torch.equal(loss.queue[:3], keys[4:])
    assert torch.equal(loss.queue[3:6], before[3:6])
    many = F.normalize(torch.randn(23, 4), dim=1)
    loss.enqueue(many)  # 23 keys from row 3: the last 10 stay, the pointer moves 23 rows on
    assert int(loss.queue_ptr) == (3 + 23) % 10
    expected = torch.empty(10, 4)
    for j, key in enumerate(many):
        expected[(3 + j) % 10] = key
    assert torch.equal(loss.queue, expected)


def test_options_flags_and_weights():
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "rrd"])
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.0, 1.0)
    options = options_from(RRDOptions, opt)
    assert options == RRDOptions(feat_dim=128, nce_k=16384, nce_t_s=0.1, nce_t_t=0.02, rrd_queue_init="rows",
                                 rrd_train_embed_t=False)
    assert get_method("rrd") is RRD and RRD.run_label(1.0) == "rrd+kd"
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "rrd", "--rrd_queue_init", "columns",
                                      "--rrd_train_embed_t", "--nce_t_s", "0.2"])
    options = options_from(RRDOptions, opt)
    assert (options.rrd_queue_init, options.rrd_train_embed_t, options.nce_t_s) == ("columns", True, 0.2)


# --- under torchrun: every process's embeddings enter the queue -----------------------------------

B, S_DIM, T_DIM, FEAT, K = 4, 12, 20, 8, 12


def _features() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2 * B, S_DIM, generator=gen), torch.randn(2 * B, T_DIM, generator=gen)


def _two_steps(rank: int, world: int) -> dict:
    """Two calls on this rank's share of the 2B samples (all of them in a world of one)."""
    torch.manual_seed(0)
    loss = RRDLoss(S_DIM, T_DIM, FEAT, K)
    f_s, f_t = _features()
    share = slice(rank * (2 * B // world), (rank + 1) * (2 * B // world))
    values = []
    for shift in (0.0, 1.0):
        values.append(loss(f_s[share] + shift, f_t[share] - shift).item())
    return {"values": values, "queue": loss.queue.clone(), "ptr": loss.queue_ptr.clone()}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_two_steps(rank, world), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_fill_the_queue_as_one_with_twice_the_batch(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn",
                       join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _two_steps(0, 1)
    for r in ranks:
        assert torch.equal(r["ptr"], single["ptr"]) and int(single["ptr"]) == (2 * 2 * B) % K
        assert_close(r["queue"], single["queue"], rtol=FP32)
    for step in range(2):  # the loss of 2B samples is the mean of the ranks' losses of B samples
        assert_close(torch.tensor(sum(r["values"][step] for r in ranks) / 2), torch.tensor(single["values"][step]),
                     rtol=FP32)


# --- training: the queue through a checkpoint and --resume (runs: test_table_pairs.py) ----------

def _last(folder: Path) -> dict:
    (path,) = folder.glob("*/*_last.pth")
    return torch.load(path, weights_only=True)


@pytest.mark.e2e
def test_resume_restores_the_queue_exactly(teacher, tmp_path):
    """3 steps (of the 8 of an epoch), stopped after 2 and resumed, end where 3 uninterrupted steps end: the same
    queue, pointer and heads (and student)."""
    args = ["--path_t", str(teacher), "--model_s", "resnet8", "--distill", "rrd", *SYNTHETIC, "--nce_k", "12",
            "--epochs", "1", "--deterministic"]
    train_student.main(args + ["--max_steps", "3", "--save_folder", str(tmp_path / "whole")])
    train_student.main(args + ["--max_steps", "2", "--save_folder", str(tmp_path / "cut")])
    cut = _last(tmp_path / "cut")
    assert int(cut["distiller"]["criterion.queue_ptr"]) == (2 * 8) % 12
    resumed_run = train_student.main(args + ["--max_steps", "3", "--save_folder", str(tmp_path / "cut"), "--resume", "auto"])
    assert resumed_run["steps"] == 3, resumed_run["steps"]
    whole, resumed = _last(tmp_path / "whole"), _last(tmp_path / "cut")
    assert int(whole["distiller"]["criterion.queue_ptr"]) == (3 * 8) % 12
    assert whole["distiller"].keys() == resumed["distiller"].keys()
    for part in ("distiller", "model"):
        for key, value in whole[part].items():
            assert torch.equal(resumed[part][key], value), f"{part} {key}"
