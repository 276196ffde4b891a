"""ITRD (Miles et al., BMVC 2022): against the reference's golden (giakoumoglou/distillers' ITLoss,
tests/fixtures/method_goldens.md "ITRD"), the paper's weighting and the embedding rule (every pair
of the tables and the train_student runs: test_table_pairs.py)."""
from __future__ import annotations

import math

import pytest
import torch

from common.declare import options_from
from distiller_zoo import ITRDLoss
from distiller_zoo.ITRD import ITRD, ITRDOptions
from distiller_zoo.registry import Batch, BuildContext, NetOutput
from engine.methods import get_method
from tests import goldens
from tests.tolerance import FP32_DEEP, assert_close
import train_student

pytestmark = pytest.mark.numeric

GOLDEN = goldens.method("ITRD")
VALUE_RTOL, GRAD_RTOL = 1e-4, 1e-3


def _reference_distiller() -> ITRD:
    """``--distill itrd`` as the reference computes it (lambdas unused: both 1), with the golden's
    embedding state (the reference's state-dict names are ours under ``criterion.``)."""
    config = GOLDEN["config"]
    options = ITRDOptions(itrd_lambda_corr=1.0, itrd_lambda_mutual=1.0, itrd_alpha=config["alpha_it"])
    shape_s, shape_t = torch.Size([8, config["s_dim"]]), torch.Size([8, config["t_dim"]])
    distiller = ITRD(options, BuildContext((shape_s,), (shape_t,), num_classes=100))
    distiller.criterion.load_state_dict(goldens.state(GOLDEN), strict=True)
    return distiller.train()


def _outputs(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[NetOutput, NetOutput, Batch]:
    logits = torch.zeros(f_s.shape[0], 100)
    return NetOutput([f_s], logits), NetOutput([f_t], logits), Batch(torch.zeros(f_s.shape[0], 3, 32, 32),
                                                                      torch.zeros(f_s.shape[0], dtype=torch.long))


def test_matches_the_reference_golden():
    inputs = goldens.inputs(GOLDEN)
    distiller = _reference_distiller()
    f_s = inputs["s_pool"].requires_grad_(True)
    terms = distiller(*_outputs(f_s, inputs["t_pool"]))
    assert list(terms) == ["itrd_corr", "itrd_mutual"]
    want = GOLDEN["outputs"]
    goldens.assert_matches(terms["itrd_corr"], torch.tensor(want["correlation"]), VALUE_RTOL, "correlation")
    goldens.assert_matches(terms["itrd_mutual"], torch.tensor(want["mutual"]), VALUE_RTOL, "mutual")
    loss = sum(terms.values())
    goldens.assert_matches(loss, torch.tensor(want["loss"]), VALUE_RTOL, "loss")
    loss.backward()
    grads = GOLDEN["grads"]
    assert set(grads) == {"s_pool", "embed.linear.weight", "embed.linear.bias"}
    goldens.assert_matches(f_s.grad, grads["s_pool"], GRAD_RTOL, "s_pool")
    weight = distiller.criterion.embed.linear.weight.grad
    goldens.assert_matches(weight, grads["embed.linear.weight"], GRAD_RTOL, "embed.linear.weight")
    # The bias gets no gradient at all: the correlation standardises z_s over the batch (a shift
    # of every sample cancels) and the mutual term uses the raw f_s at equal sizes. The golden's
    # bias gradient is rounding noise (~1e-9); compared at the size of the embedding's gradients.
    bias = distiller.criterion.embed.linear.bias.grad
    assert_close(bias, grads["embed.linear.bias"], rtol=GRAD_RTOL, scale=GOLDEN["grads"]["embed.linear.weight"]
                 ["digest"]["max_abs"])


def test_the_paper_weights_the_two_terms():
    """Our default: lambda_corr 2 and lambda_mutual 0.05 weight the terms (the authors' loop); the
    reference sums them unweighted."""
    inputs = goldens.inputs(GOLDEN)
    distiller = _reference_distiller()
    distiller.lambda_corr, distiller.lambda_mutual = ITRDOptions().itrd_lambda_corr, ITRDOptions().itrd_lambda_mutual
    terms = distiller(*_outputs(inputs["s_pool"], inputs["t_pool"]))
    want = GOLDEN["outputs"]
    assert (ITRDOptions().itrd_lambda_corr, ITRDOptions().itrd_lambda_mutual) == (2.0, 0.05)
    goldens.assert_matches(terms["itrd_corr"], torch.tensor(2.0 * want["correlation"]), VALUE_RTOL)
    goldens.assert_matches(terms["itrd_mutual"], torch.tensor(0.05 * want["mutual"]), VALUE_RTOL)


def test_the_mutual_term_embeds_the_student_only_when_the_sizes_differ():
    torch.manual_seed(0)
    f_t = torch.randn(6, 8)
    for s_dim in (8, 12):
        loss = ITRDLoss(s_dim, 8)
        f_s = torch.randn(6, s_dim)
        _, mutual = loss(f_s, f_t)
        seen = loss.embed(f_s) if s_dim != 8 else f_s
        assert_close(mutual, ITRDLoss.mutual(seen, f_t), rtol=FP32_DEEP)


def test_the_terms_from_their_definitions_in_float64():
    """log2 of the summed |1 - C_ii|^(2 alpha) with the unbiased batch std; the Gram terms."""
    torch.manual_seed(1)
    f_s, f_t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    loss = ITRDLoss(4, 3, alpha=1.3).double()
    corr, mutual = loss(f_s, f_t)
    z = loss.embed(f_s)
    c = [sum((z[b, i] - z[:, i].mean()) / z[:, i].std(unbiased=True) * (f_t[b, i] - f_t[:, i].mean())
             / f_t[:, i].std(unbiased=True) for b in range(5)) / 5 for i in range(3)]
    assert corr.item() == pytest.approx(math.log2(sum(abs(1 - ci.item()) ** 2.6 for ci in c)), rel=1e-10)
    u_s = z / z.norm(dim=1, keepdim=True)
    u_t = f_t / f_t.norm(dim=1, keepdim=True)
    g_s, g_t = u_s @ u_s.T, u_t @ u_t.T
    g_st = g_s * g_t
    expected = ((g_s / g_s.trace()) ** 2).sum() - ((g_st / g_st.trace()) ** 2).sum()
    assert mutual.item() == pytest.approx(expected.item(), rel=1e-10)


def test_a_batch_of_one_gives_zeros_and_a_constant_feature_no_nan():
    loss = ITRDLoss(4, 4)
    f_s = torch.randn(1, 4, requires_grad=True)
    corr, mutual = loss(f_s, torch.randn(1, 4))
    assert corr.item() == 0.0 and mutual.item() == 0.0
    (corr + mutual).backward()
    f_t = torch.randn(4, 4)
    f_t[:, 2] = 0.0  # a dead ReLU channel of the teacher: std 0
    corr, mutual = loss(torch.randn(4, 4), f_t)
    assert torch.isfinite(corr) and torch.isfinite(mutual)


def test_flags_and_published_weights():
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "itrd"])
    assert (opt.itrd_lambda_corr, opt.itrd_lambda_mutual, opt.itrd_alpha) == (2.0, 0.05, 1.5)
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.0, 1.0)
    assert options_from(get_method("itrd").Options, opt) == ITRDOptions()
