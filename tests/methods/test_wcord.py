"""WCoRD (crd/wcord.py): the log-domain Sinkhorn plan, the local (primal) and global (dual)
terms, the spectrally normalised heads, and ``--distill wcord`` end to end."""
from __future__ import annotations

import copy
import itertools
import pytest
import torch
import torch.nn.functional as F

from crd import ContrastLoss, CRDLoss, WCoRDLoss
from crd.wcord import WCoRD, WCoRDOptions, cosine_cost, sinkhorn_plan, wasserstein_local
from dataset.needs import ContrastNeed, DataNeeds
from distiller_zoo.registry import Batch, BuildContext, NetOutput
from engine.methods import get_method
from models import build_model
from tests.tolerance import FP32, FP32_EXACT, approx, assert_close
import train_student

pytestmark = pytest.mark.numeric

# Sinkhorn's marginal error after 100 iterations at eps 0.05 (a convergence bound, not rounding;
# measured: < 1e-7)
SINKHORN = 1e-4

N_DATA, K = 60, 12


BANK = dict(feat_dim=16, nce_k=K, nce_t=0.07, nce_m=0.5)  # the memory bank's settings in these tests


def make_loss(s_dim: int = 24, t_dim: int = 40, **options) -> WCoRDLoss:
    """A WCoRDLoss over N_DATA samples with the settings of BANK, ``options`` (WCoRDOptions) instead where given."""
    return WCoRDLoss(s_dim, t_dim, N_DATA, WCoRDOptions(**{**BANK, **options}))


def unit(n: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def batch_inputs(batch_size: int = 6, seed: int = 0):
    """f_s [B, 24] (requires grad), f_t [B, 40] (requires grad, to check none arrives), idx [B],
    contrast_idx [B, K+1] with column 0 the anchor and K other samples."""
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(batch_size, 24, generator=g, requires_grad=True)
    f_t = torch.randn(batch_size, 40, generator=g, requires_grad=True)
    idx = torch.randperm(N_DATA, generator=g)[:batch_size]
    others = torch.stack([torch.randperm(N_DATA - 1, generator=g)[:K] for _ in range(batch_size)])
    others = others + (others >= idx[:, None]).long()  # skip the anchor itself
    return f_s, f_t, idx, torch.cat([idx[:, None], others], dim=1)


# --- Sinkhorn -------------------------------------------------------------------------------

@pytest.mark.parametrize("n, m", [(8, 8), (16, 10)])
def test_plan_marginals_are_uniform(n, m):
    plan = sinkhorn_plan(cosine_cost(unit(n, seed=1), unit(m, seed=2)), eps=0.05, iters=100)
    assert plan.dtype == torch.float32 and plan.shape == (n, m)
    # the marginals of a plan of mass 1, converged to SINKHORN of it
    assert_close(plan.sum(1), torch.full((n,), 1 / n), rtol=SINKHORN, scale=1.0)
    assert_close(plan.sum(0), torch.full((m,), 1 / m), rtol=SINKHORN, scale=1.0)


def test_identical_batches_transport_along_the_diagonal():
    x = unit(6, seed=3)
    cost = cosine_cost(x, x.clone())
    plan = sinkhorn_plan(cost, eps=0.05, iters=100)
    assert plan.diagonal().sum() > 0.99                      # the mass sits on the diagonal
    assert torch.equal(plan.argmax(1), torch.arange(6))
    diagonal_cost = cost.diagonal().mean()
    every_assignment = [cost[torch.arange(6), torch.tensor(p)].mean() for p in itertools.permutations(range(6))]
    # and it is the cheapest assignment (the identity among them gives the same sum: costs of size 1)
    assert diagonal_cost <= min(every_assignment) + FP32_EXACT * 1.0
    typical = wasserstein_local(x, unit(6, seed=4)).item()  # between unrelated batches: the distance's size
    assert wasserstein_local(x, x.clone()) < 1e-3 * typical  # entropic: the plan is not exactly the identity


def test_permuted_teacher_batch_is_matched_by_the_plan():
    x = unit(8, seed=4)
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    plan = sinkhorn_plan(cosine_cost(x, x[perm]), eps=0.05, iters=100)
    assert torch.equal(plan.argmax(1), perm.argsort())


@pytest.mark.parametrize("case", ["random", "nearly_identical_rows", "antipodal", "bf16"])
def test_small_epsilon_stays_finite(case):
    torch.manual_seed(0)
    if case == "random":
        x, y = unit(16, seed=5), unit(16, seed=6)
    elif case == "nearly_identical_rows":  # every row almost the same vector, on both sides
        base = unit(1, seed=7).repeat(16, 1)
        x, y = base + 1e-6 * torch.randn(16, 32), base + 1e-6 * torch.randn(16, 32)
    elif case == "antipodal":              # cost 2 everywhere on the diagonal: exp(-2 / eps) underflows
        x = unit(16, seed=8)
        y = -x
    else:
        x, y = unit(16, seed=9).bfloat16(), unit(16, seed=10).bfloat16()
    x = x.clone().requires_grad_(True)
    plan = sinkhorn_plan(cosine_cost(x, y), eps=0.01, iters=100)
    assert plan.dtype == torch.float32 and torch.isfinite(plan).all()
    assert plan.sum().item() == approx(1.0, rtol=FP32)  # the last scaling makes the columns sum to 1/m
    loss = wasserstein_local(x, y, eps=0.01, iters=100)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_sinkhorn_runs_in_fp32_under_autocast():
    x, y = unit(8, seed=11), unit(8, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = wasserstein_local(x, y, eps=0.01)
    assert loss.dtype == torch.float32
    assert_close(loss, wasserstein_local(x, y, eps=0.01), rtol=FP32_EXACT)


# --- gradients --------------------------------------------------------------------------------

def test_plan_is_constant_and_local_gradient_reaches_the_student_only():
    x, y = unit(8, seed=13).requires_grad_(True), unit(8, seed=14)
    assert not sinkhorn_plan(cosine_cost(x, y)).requires_grad

    criterion = make_loss()
    f_s, f_t, idx, contrast_idx = batch_inputs()
    e_s, e_t = criterion.embed(f_s, f_t)
    criterion.local_loss(e_s, e_t).backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None
    assert criterion.embed_s.linear.parametrizations.weight.original.grad.abs().sum() > 0
    assert criterion.embed_t.linear.parametrizations.weight.original.grad is None  # the teacher side is a target


def test_loss_never_sends_gradients_into_the_teacher_features():
    criterion = make_loss()
    f_s, f_t, idx, contrast_idx = batch_inputs()
    terms = criterion(f_s, f_t, idx, contrast_idx)
    assert set(terms) == {"wcord_global", "wcord_local"}
    sum(terms.values()).backward()
    assert f_t.grad is None and f_s.grad.abs().sum() > 0
    assert criterion.embed_t.linear.parametrizations.weight.original.grad.abs().sum() > 0  # via the global term


def test_inference_mode_teacher_features_are_accepted():
    criterion = make_loss()
    f_s, f_t, idx, contrast_idx = batch_inputs()
    with torch.inference_mode():
        f_t = f_t * 1.0
    sum(criterion(f_s, f_t, idx, contrast_idx).values()).backward()
    assert f_s.grad.abs().sum() > 0


# --- the global term and the heads --------------------------------------------------------------

def test_global_term_equals_crd_through_the_same_memory():
    torch.manual_seed(0)
    criterion = make_loss(wcord_lambda_g=0.7, wcord_lambda_l=0.3).eval()  # eval: the spectral norm is fixed
    f_s, f_t, idx, contrast_idx = batch_inputs()
    # A CRD loss with the same (effective, spectrally normalised) heads and a copy of the same banks.
    crd = CRDLoss(24, 40, N_DATA, **BANK)
    with torch.no_grad():
        for mine, theirs in ((criterion.embed_s, crd.embed_s), (criterion.embed_t, crd.embed_t)):
            theirs.linear.weight.copy_(mine.linear.weight)
            theirs.linear.bias.copy_(mine.linear.bias)
    crd.contrast.load_state_dict(copy.deepcopy(criterion.contrast.state_dict()))
    expected = crd(f_s, f_t, idx, contrast_idx)

    # The same NCE by hand, from a copy of the memory taken before the forward.
    memory = copy.deepcopy(criterion.contrast)
    with torch.no_grad():
        e_s, e_t = criterion.embed(f_s, f_t)
        out_s, out_t = memory(e_s, e_t, idx, contrast_idx)
        by_hand = ContrastLoss(N_DATA)(out_s) + ContrastLoss(N_DATA)(out_t)

    terms = criterion(f_s, f_t, idx, contrast_idx)
    assert_close(terms["wcord_global"], 0.7 * expected, rtol=FP32)
    assert_close(terms["wcord_global"], 0.7 * by_hand, rtol=FP32)
    assert_close(terms["wcord_local"], 0.3 * wasserstein_local(e_s, e_t), rtol=FP32)
    # the banks were updated exactly as CRD's
    assert_close(criterion.contrast.memory_v1, crd.contrast.memory_v1, rtol=FP32)
    assert_close(criterion.contrast.params, crd.contrast.params, rtol=FP32)


def test_zero_lambda_term_is_not_computed():
    criterion = make_loss(wcord_lambda_g=0.0)
    f_s, f_t, idx, contrast_idx = batch_inputs()
    bank = criterion.contrast.memory_v1.clone()
    assert set(criterion(f_s, f_t, idx, contrast_idx)) == {"wcord_local"}
    assert torch.equal(bank, criterion.contrast.memory_v1)


def test_heads_are_spectrally_normalised():
    torch.manual_seed(0)
    criterion = make_loss(s_dim=256, t_dim=64, feat_dim=32).train()
    heads = (criterion.embed_s, criterion.embed_t)

    def top_singular_values() -> list[float]:
        return [torch.linalg.matrix_norm(h.linear.weight.detach(), ord=2).item() for h in heads]

    # power iteration (one step a training-mode forward) converges to the largest singular value
    assert top_singular_values() == approx([1.0, 1.0], rtol=3e-2)
    with torch.no_grad():  # raw weights far from norm 1: the parametrisation still rescales them
        for head in heads:
            head.linear.parametrizations.weight.original.mul_(5.0)
    assert all(torch.linalg.matrix_norm(h.linear.parametrizations.weight.original, ord=2) > 2 for h in heads)
    for _ in range(30):  # each training-mode forward does one more power iteration
        criterion.embed(torch.randn(4, 256), torch.randn(4, 64))
    assert top_singular_values() == approx([1.0, 1.0], rtol=5e-3)


def test_bad_flags_are_refused():
    from common.errors import UserError
    with pytest.raises(UserError, match="wcord_eps"):
        make_loss(wcord_eps=0.0)
    with pytest.raises(UserError, match="wcord_iters"):
        make_loss(wcord_iters=0)


# --- the Distiller ------------------------------------------------------------------------------

def test_distiller_contract():
    cls = get_method("wcord")
    assert cls is WCoRD
    assert cls.data_needs(cls.Options()) == DataNeeds(index=True, contrast=ContrastNeed(16384, "exact"))
    assert cls.weights == (1.0, 1.0, 0.8)
    options = WCoRDOptions(nce_k=K, feat_dim=16, wcord_iters=20, mode="relax")
    assert cls.data_needs(options) == DataNeeds(index=True, contrast=ContrastNeed(K, "relax"))
    ctx = BuildContext((torch.Size([2, 24]),), (torch.Size([2, 40]),), num_classes=10, n_data=N_DATA)
    distiller = cls(options, ctx)
    assert distiller.criterion.iters == 20 and distiller.criterion.eps == 0.05
    f_s, f_t, idx, contrast_idx = batch_inputs()
    out = distiller(NetOutput([f_s], torch.zeros(6, 10)), NetOutput([f_t], torch.zeros(6, 10)),
                    Batch(torch.zeros(6, 3, 32, 32), torch.zeros(6, dtype=torch.long), idx, contrast_idx))
    assert set(out) == {"wcord_global", "wcord_local"} and all(torch.isfinite(v) for v in out.values())


def test_flags_and_defaults():
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "wcord"])
    assert (opt.wcord_lambda_g, opt.wcord_lambda_l, opt.wcord_eps, opt.wcord_iters) == (1.0, 1.0, 0.05, 100)
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 1.0, 0.8)
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "wcord", "--wcord_eps", "0.1", "--wcord_iters", "30"])
    assert (opt.wcord_eps, opt.wcord_iters) == (0.1, 30)


@pytest.mark.e2e
def test_train_student_end_to_end(tmp_path):
    folder = tmp_path / "resnet32x4_vanilla"
    folder.mkdir()
    torch.manual_seed(0)
    path_t = folder / "ckpt_epoch_240.pth"
    torch.save({"model": build_model("resnet32x4", num_classes=100).state_dict()}, path_t)
    results = train_student.main([
        "--path_t", str(path_t), "--distill", "wcord", "--model_s", "resnet8x4", "--dataset", "synthetic",
        "--subset", "200", "--val_subset", "20", "--batch_size", "8", "--max_steps", "2", "--epochs", "1",
        "--nce_k", "32", "--num_workers", "0", "--save_folder", str(tmp_path)])
    assert results["steps"] == 2 and results["method"] == "wcord"
    history = results["history"][0]
    assert "loss_wcord_global" in history and "loss_wcord_local" in history, history
