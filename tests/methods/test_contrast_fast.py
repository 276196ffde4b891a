"""crd/memory.py's two ways of scoring the memory bank ("matmul": one GEMM against the whole
bank, then a gather of the scores; "gather": the [B, K+1, D] rows), and CRCD's: equal values,
Z, losses, gradients and bank updates; the automatic choice; no [B, K+1, D] tensor on the
matmul path; backward after the bank moved."""
from __future__ import annotations

import copy
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from crd import CRCDLoss, CRDLoss, ContrastLoss, ContrastMemory
from crd.crcd import CRCDOptions, relation_scores, relation_scores_from_bank
import crd.memory as memory_module
from crd.memory import choose_score_mode, matmul_nt
from tests.tolerance import FP32, FP64, assert_close

pytestmark = pytest.mark.numeric

# The two modes do the same arithmetic in another order (a GEMM's sums vs a gather's): float32
# rounding, relative to each quantity's magnitude.
TOL = dict(rtol=FP32)
DIM, BATCH = 128, 16


def contrast_idx(y: torch.Tensor, n_data: int, k: int, relax: bool, seed: int) -> torch.Tensor:
    """[B, K+1] indices with repeats, column 0 the anchor (``relax``: another sample)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_data, (len(y), k + 1), generator=g)
    idx[:, 0] = torch.randint(0, n_data, (len(y),), generator=g) if relax else y
    idx[:, 5] = idx[:, 3]            # a sample twice in a row
    idx[1, 1:4] = y[0]               # another anchor's row, repeated
    return idx


def direct_scores(bank: torch.Tensor, idx: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(<bank[idx[b, k]], v[b]> / T) [B, K+1, 1] written out elementwise."""
    return torch.exp((bank[idx] * v[:, None, :]).sum(-1, keepdim=True) / temperature)


@pytest.mark.parametrize("n_data, k", [(500, 100), (5000, 400)])
@pytest.mark.parametrize("relax", [False, True])
@pytest.mark.parametrize("z_momentum", [None, 0.9])
def test_matmul_and_gather_agree_over_two_steps(n_data, k, relax, z_momentum):
    torch.manual_seed(0)
    memories = {"matmul": ContrastMemory(DIM, n_data, k, z_momentum=z_momentum, score_mode="matmul")}
    memories["gather"] = copy.deepcopy(memories["matmul"])
    memories["gather"].score_mode = "gather"
    criterion = ContrastLoss(n_data)
    for step in range(2):
        y = torch.randperm(n_data)[:BATCH]
        y[-1] = y[0]  # an anchor twice in the batch
        idx = contrast_idx(y, n_data, k, relax, seed=step)
        v1, v2 = F.normalize(torch.randn(2, BATCH, DIM), dim=2)
        results = {}
        for mode, memory in memories.items():
            banks = memory.memory_v1.clone(), memory.memory_v2.clone()
            a, b = v1.clone().requires_grad_(True), v2.clone().requires_grad_(True)
            out_v1, out_v2 = memory(a, b, y, idx)
            loss = criterion(out_v1) + criterion(out_v2)
            loss.backward()
            results[mode] = dict(out_v1=out_v1, out_v2=out_v2, loss=loss, grad_v1=a.grad, grad_v2=b.grad,
                                 params=memory.params.clone(), memory_v1=memory.memory_v1.clone(),
                                 memory_v2=memory.memory_v2.clone())
            # the direct computation, on the banks as they were scored
            temperature = float(memory.params[1])
            assert_close(out_v1 * memory.params[2], direct_scores(banks[1], idx, v1, temperature), **TOL)
            assert_close(out_v2 * memory.params[3], direct_scores(banks[0], idx, v2, temperature), **TOL)
            if mode == "matmul":
                a_ref, b_ref = v1.clone().requires_grad_(True), v2.clone().requires_grad_(True)
                p1 = direct_scores(banks[1], idx, a_ref, temperature) / memory.params[2]
                p2 = direct_scores(banks[0], idx, b_ref, temperature) / memory.params[3]
                (criterion(p1) + criterion(p2)).backward()
                assert_close(a.grad, a_ref.grad, **TOL)
                assert_close(b.grad, b_ref.grad, **TOL)
        for name, value in results["matmul"].items():
            assert_close(value, results["gather"][name], **TOL, msg=f"{name}, step {step}")
        # the update is the same arithmetic on the same rows: identical banks
        assert torch.equal(results["matmul"]["memory_v1"], results["gather"]["memory_v1"])
        assert torch.equal(results["matmul"]["memory_v2"], results["gather"]["memory_v2"])


@pytest.mark.parametrize("mode", ["matmul", "gather"])
def test_crd_loss_gradients_through_the_heads_equal_the_other_mode(mode):
    torch.manual_seed(1)
    s_dim, t_dim, n_data, k = 24, 40, 800, 200
    reference = CRDLoss(s_dim, t_dim, n_data, feat_dim=DIM, nce_k=k, nce_t=0.07, nce_m=0.5)
    reference.contrast.score_mode = "gather" if mode == "matmul" else "matmul"
    criterion = copy.deepcopy(reference)
    criterion.contrast.score_mode = mode
    for step in range(2):
        y = torch.randperm(n_data)[:BATCH]
        idx = contrast_idx(y, n_data, k, relax=False, seed=10 + step)
        f_s, f_t = torch.randn(BATCH, s_dim), torch.randn(BATCH, t_dim)
        grads = []
        for model in (criterion, reference):
            model.zero_grad()
            x = f_s.clone().requires_grad_(True)
            loss = model(x, f_t, y, idx)
            loss.backward()
            grads.append([loss, x.grad] + [p.grad for p in model.parameters()])
        for got, expected in zip(*grads):
            assert_close(got, expected, **TOL)
        assert torch.equal(criterion.contrast.memory_v1, reference.contrast.memory_v1)
        assert_close(criterion.contrast.params, reference.contrast.params, **TOL)


@pytest.mark.parametrize("mode", ["matmul", "gather"])
def test_backward_after_later_steps_uses_the_rows_as_scored(mode):
    """Two forward passes (each moving the bank) before one backward: the gradients are those of
    the banks each pass saw (the updates are undone for backward, the bank is not copied)."""
    torch.manual_seed(2)
    n_data, k = 300, 50
    memory = ContrastMemory(DIM, n_data, k, score_mode=mode)
    temperature = float(memory.params[1])
    y1, y2 = torch.arange(BATCH), torch.arange(BATCH // 2, BATCH // 2 + BATCH)  # overlapping rows
    idx1 = contrast_idx(y1, n_data, k, relax=False, seed=3)
    idx2 = contrast_idx(y2, n_data, k, relax=False, seed=4)
    v = F.normalize(torch.randn(4, BATCH, DIM), dim=2)
    weights = torch.randn(2, BATCH, k + 1, 1)
    leaves = [x.clone().requires_grad_(True) for x in v]
    banks = []
    total = 0
    for step, (y, idx) in enumerate(((y1, idx1), (y2, idx2))):
        banks.append((memory.memory_v1.clone(), memory.memory_v2.clone()))
        out_v1, out_v2 = memory(leaves[2 * step], leaves[2 * step + 1], y, idx)
        total = total + (out_v1 * weights[0]).sum() + (out_v2 * weights[1]).sum()
    total.backward()
    for step, idx in enumerate((idx1, idx2)):
        a, b = v[2 * step].clone().requires_grad_(True), v[2 * step + 1].clone().requires_grad_(True)
        z1, z2 = memory.params[2], memory.params[3]
        expected = ((direct_scores(banks[step][1], idx, a, temperature) / z1 * weights[0]).sum()
                    + (direct_scores(banks[step][0], idx, b, temperature) / z2 * weights[1]).sum())
        expected.backward()
        assert_close(leaves[2 * step].grad, a.grad, **TOL)
        assert_close(leaves[2 * step + 1].grad, b.grad, **TOL)


def test_a_bank_changed_elsewhere_before_backward_is_refused():
    memory = ContrastMemory(DIM, 100, 20, score_mode="matmul")
    y = torch.arange(4)
    v1, v2 = F.normalize(torch.randn(2, 4, DIM), dim=2).requires_grad_(True)
    out_v1, _ = memory(v1, v2, y, contrast_idx(y, 100, 20, relax=False, seed=0))
    memory.memory_v2.mul_(2.0)
    with pytest.raises(RuntimeError, match="changed in place outside"):
        out_v1.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("onednn", [True, False])
def test_matmul_nt_is_a_times_b_transposed(dtype, onednn, monkeypatch):
    monkeypatch.setattr(memory_module, "_onednn_gemm", onednn)
    torch.manual_seed(6)
    a, bank, g = torch.randn(7, DIM, dtype=dtype), torch.randn(900, DIM, dtype=dtype), torch.randn(7, 900, dtype=dtype)
    # the same sums of 128 and 900 products in another order
    rtol = FP64 if dtype == torch.float64 else FP32
    assert_close(matmul_nt(a, bank), a @ bank.T, rtol=rtol)
    assert_close(matmul_nt(g, bank.T), g @ bank, rtol=rtol)
    assert_close(matmul_nt(a[:1], bank), a[:1] @ bank.T, rtol=rtol)


def test_matmul_mode_without_onednn_equals_gather(monkeypatch):
    monkeypatch.setattr(memory_module, "_onednn_gemm", False)
    test_matmul_and_gather_agree_over_two_steps(500, 100, relax=True, z_momentum=None)


def test_auto_rule():
    # CRD on CIFAR-100 (N 50000, K 16384): the GEMM against the whole bank
    assert choose_score_mode(50000, 16385) == "matmul"
    assert ContrastMemory(8, 50000, 16384).resolved_score_mode(16385) == "matmul"
    # ImageNet (N 1281167) with a small K: gather the rows
    assert choose_score_mode(1281167, 4097) == "gather"
    assert choose_score_mode(1281167, 1025) == "gather"
    assert choose_score_mode(1281167, 16385) == "gather"
    # small banks (the tests' and the demo's): matmul
    assert choose_score_mode(500, 101) == "matmul"
    # the override wins
    assert ContrastMemory(8, 50000, 16384, score_mode="gather").resolved_score_mode(16385) == "gather"
    with pytest.raises(ValueError):
        ContrastMemory(8, 100, 10, score_mode="fast")


@pytest.mark.parametrize("mode", ["matmul", "gather"])
def test_chunks_of_anchors_give_the_same_scores_and_gradients(mode, monkeypatch):
    torch.manual_seed(5)
    n_data, k = 700, 90
    memory = ContrastMemory(DIM, n_data, k, score_mode=mode)
    chunked = copy.deepcopy(memory)
    y = torch.randperm(n_data)[:BATCH]
    idx = contrast_idx(y, n_data, k, relax=True, seed=7)
    v1, v2 = F.normalize(torch.randn(2, BATCH, DIM), dim=2)
    weights = torch.randn(BATCH, k + 1, 1)
    # 5 anchors per chunk of [c, N] scores, or 3 per chunk of [c, K+1, D] rows
    small_chunks = 5 * n_data if mode == "matmul" else 3 * (k + 1) * DIM
    results = []
    for model, chunk_elements in ((memory, memory_module.SCORE_CHUNK_ELEMENTS), (chunked, small_chunks)):
        monkeypatch.setattr(memory_module, "SCORE_CHUNK_ELEMENTS", chunk_elements)
        a, b = v1.clone().requires_grad_(True), v2.clone().requires_grad_(True)
        out_v1, out_v2 = model(a, b, y, idx)
        ((out_v1 + out_v2) * weights).sum().backward()
        results.append((out_v1, out_v2, a.grad, b.grad, model.memory_v1, model.params))
    for got, expected in zip(*results):
        assert_close(got, expected, **TOL)


class LargestAllocation(TorchDispatchMode):
    """The largest new tensor (elements) an ATen op returns while active, forward and backward
    (views and in-place results, which share an input's storage, are not new)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("mode", ["matmul", "gather"])
def test_matmul_path_never_materialises_the_gathered_rows(mode):
    n_data, k = 5000, 400
    criterion = CRDLoss(32, 32, n_data, feat_dim=DIM, nce_k=k, nce_t=0.07, nce_m=0.5)
    criterion.contrast.score_mode = mode
    y = torch.randperm(n_data)[:BATCH]
    idx = contrast_idx(y, n_data, k, relax=False, seed=0)
    f_s = torch.randn(BATCH, 32, requires_grad=True)
    with LargestAllocation() as probe:
        criterion(f_s, torch.randn(BATCH, 32), y, idx).backward()
    gathered_rows = BATCH * (k + 1) * DIM
    if mode == "matmul":  # at most the [B, N] scores of one view
        assert probe.largest <= BATCH * n_data < gathered_rows
    else:  # the probe does see the gathered rows
        assert probe.largest >= gathered_rows


# --- CRCD ------------------------------------------------------------------------------------

def crcd_case(n_data: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n_data, generator=g)[:BATCH]
    contrast = torch.randint(0, n_data, (BATCH, k + 1), generator=g)
    contrast[:, 0] = idx
    contrast[0, 1], contrast[1, 2], contrast[2, 3:5] = idx[1], idx[0], idx[4]  # rows that are anchors
    return idx, contrast


def test_crcd_relation_scores_from_the_bank_equal_the_gathered_rows():
    torch.manual_seed(3)
    memory = ContrastMemory(DIM, 600, 80)
    memory.memory_v2.mul_(torch.rand(600, 1))  # rows not unit
    idx, contrast = crcd_case(600, 80, seed=0)
    bank = memory.memory_v2
    results = []
    for mode in ("matmul", "gather"):
        e = F.normalize(torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(5)), dim=1)
        e.requires_grad_(True)
        cos = relation_scores_from_bank(memory, e, "memory_v2", idx, contrast, mode=mode)
        weights = torch.randn(cos.shape, generator=torch.Generator().manual_seed(6))
        (cos * weights).sum().backward()
        results.append((cos, e.grad))
    direct = relation_scores(e.detach(), bank[idx], bank[contrast], contrast, idx)
    assert_close(results[0][0], direct, **TOL)
    for got, expected in zip(*results):
        assert_close(got, expected, **TOL)


@pytest.mark.parametrize("grad_weight", [0.0, 1.0])
def test_crcd_loss_equal_in_both_modes_over_two_steps(grad_weight):
    torch.manual_seed(4)
    s_dim, t_dim, n_data = 24, 40, 400
    options = CRCDOptions(feat_dim=DIM, crcd_k=60, crcd_t=0.05, nce_m=0.5, crcd_grad_weight=grad_weight)
    models = {"matmul": CRCDLoss(s_dim, t_dim, n_data, options)}
    models["gather"] = copy.deepcopy(models["matmul"])
    for mode, model in models.items():
        for memory in (model.contrast, getattr(model, "contrast_grad", None)):
            if memory is not None:
                memory.score_mode = mode
    for step in range(2):
        idx, contrast = crcd_case(n_data, options.crcd_k, seed=step)
        f_s, g_s = torch.randn(2, BATCH, s_dim)
        f_t, g_t = torch.randn(2, BATCH, t_dim)
        results = []
        for model in models.values():
            model.zero_grad()
            x, g = f_s.clone().requires_grad_(True), g_s.clone().requires_grad_(True)
            terms = model(x, f_t, idx, contrast, g, g_t)
            sum(terms.values()).backward()
            results.append([*terms.values(), x.grad, g.grad if grad_weight else x.grad]
                           + [p.grad for p in model.parameters()] + list(model.buffers()))
        for got, expected in zip(*results):
            assert_close(got, expected, **TOL)
