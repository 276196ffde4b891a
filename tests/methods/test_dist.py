"""DIST (Huang et al., NeurIPS 2022): the authors' and torchdistill's goldens at tau 4 and 1
(tests/fixtures/method_goldens.md "DIST"), the definition in float64, the invariants, the flags."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import train_student
from distiller_zoo.DIST import DIST, DISTLoss, DISTOptions
from distiller_zoo.registry import Batch, BuildContext, NetOutput
from engine.methods import get_method
from tests import goldens

pytestmark = pytest.mark.numeric

GOLDEN = goldens.method("DIST")


def _terms(tau: float, beta: float = 1.0, gamma: float = 1.0):
    x = goldens.inputs(GOLDEN)
    y_s = x["s_logits"].clone().requires_grad_(True)
    ctx = BuildContext((torch.Size([8, 4]),), (torch.Size([8, 4]),), 100)
    distiller = DIST(DISTOptions(dist_tau=tau, dist_beta=beta, dist_gamma=gamma), ctx)
    t = NetOutput([], x["t_logits"])
    terms = distiller(NetOutput([], y_s), t, Batch(torch.zeros(8, 3, 4, 4), torch.zeros(8, dtype=torch.long)))
    return y_s, terms


@pytest.mark.parametrize("tau", [4, 1])
def test_matches_the_authors_and_torchdistill_goldens(tau):
    y_s, terms = _terms(float(tau))
    loss = terms["dist_inter"] + terms["dist_intra"]
    for source in ("authors", "torchdistill"):
        want = GOLDEN["outputs"][f"{source}_tau{tau}"]
        goldens.assert_matches(loss, torch.tensor(want["loss"]), rtol=1e-4, what=f"{source} tau {tau} loss")
    want = GOLDEN["outputs"][f"authors_tau{tau}"]
    goldens.assert_matches(terms["dist_inter"], torch.tensor(want["inter"]), rtol=1e-4, what="inter")
    goldens.assert_matches(terms["dist_intra"], torch.tensor(want["intra"]), rtol=1e-4, what="intra")
    loss.backward()
    for source in ("authors", "torchdistill"):
        goldens.assert_matches(y_s.grad, GOLDEN["grads"][f"s_logits ({source}, tau={tau})"], rtol=1e-3, what=source)


def test_the_definition_in_float64_and_the_term_weights():
    g = torch.Generator().manual_seed(1)
    y_s, y_t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    tau = 2.0
    p_s, p_t = F.softmax(y_s / tau, 1), F.softmax(y_t / tau, 1)

    def rho(u, v):  # Pearson's correlation, written out
        u, v = u - u.mean(), v - v.mean()
        return (u * v).sum() / (u.pow(2).sum().sqrt() * v.pow(2).sum().sqrt())

    inter = tau**2 * (1 - torch.stack([rho(p_s[i], p_t[i]) for i in range(6)]).mean())
    intra = tau**2 * (1 - torch.stack([rho(p_s[:, j], p_t[:, j]) for j in range(5)]).mean())
    got = DISTLoss(tau)(y_s.float(), y_t.float())
    goldens.assert_matches(got[0], inter.float(), rtol=1e-5)
    goldens.assert_matches(got[1], intra.float(), rtol=1e-5)
    _, one = _terms(4.0)
    _, weighted = _terms(4.0, beta=0.5, gamma=3.0)
    goldens.assert_matches(weighted["dist_inter"], 0.5 * one["dist_inter"].detach(), rtol=1e-6)
    goldens.assert_matches(weighted["dist_intra"], 3.0 * one["dist_intra"].detach(), rtol=1e-6)


def test_zero_for_equal_predictions_and_invariant_to_logit_shifts():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(4, 10, generator=g)
    inter, intra = DISTLoss(4.0)(y, y)
    zero = 4.0**2 * 1e-4  # tau^2 times float32 rounding of a cosine of 1 (centring the columns cancels digits)
    assert float(inter) == pytest.approx(0.0, abs=zero) and float(intra) == pytest.approx(0.0, abs=zero)
    # a per-sample shift of the logits leaves the softmax, hence both relations, unchanged
    t = torch.randn(4, 10, generator=g)
    a, b = DISTLoss(4.0)(y, t), DISTLoss(4.0)(y + torch.randn(4, 1, generator=g), t)
    goldens.assert_matches(a[0], b[0], rtol=1e-5)
    goldens.assert_matches(a[1], b[1], rtol=1e-5)


def test_no_gradient_reaches_the_teacher():
    y_s = torch.randn(4, 10, requires_grad=True)
    y_t = torch.randn(4, 10, requires_grad=True)
    ctx = BuildContext((torch.Size([4, 4]),), (torch.Size([4, 4]),), 10)
    terms = DIST(DISTOptions(), ctx)(NetOutput([], y_s), NetOutput([], y_t), Batch(torch.zeros(4), torch.zeros(4)))
    sum(terms.values()).backward()
    assert y_t.grad is None and y_s.grad is not None and y_s.grad.abs().sum() > 0


def test_published_weights_and_flags():
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "dist"])
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.0, 2.0) == get_method("dist").weights
    assert (opt.dist_tau, opt.dist_beta, opt.dist_gamma) == (4.0, 1.0, 1.0)
    assert train_student.parse_option(["--path_t", "t.pth", "--distill", "dist", "--dist_tau", "1"]).dist_tau == 1.0
    with pytest.raises(SystemExit):
        train_student.parse_option(["--path_t", "t.pth", "--distill", "dist", "--dist_tau", "0"])
