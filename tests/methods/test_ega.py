"""EGA (Ma, Chen & Akata, BMVC 2022): against the reference's golden (giakoumoglou/distillers' EGA,
tests/fixtures/method_goldens.md "EGA"), the definition in float64 and the embedding for unequal
sizes (every pair of the tables and the train_student runs: test_table_pairs.py)."""
from __future__ import annotations


import pytest
import torch

from common.declare import options_from
from distiller_zoo import EGALoss
from distiller_zoo.EGA import EGA, EGAOptions
from distiller_zoo.registry import Batch, BuildContext, NetOutput
from engine.methods import get_method
from tests import goldens
import train_student

pytestmark = pytest.mark.numeric

GOLDEN = goldens.method("EGA")
VALUE_RTOL, GRAD_RTOL = 1e-4, 1e-3


def _distiller(s_dim: int, t_dim: int, **options) -> EGA:
    shape_s, shape_t = torch.Size([8, s_dim]), torch.Size([8, t_dim])
    return EGA(EGAOptions(**options), BuildContext((shape_s,), (shape_t,), num_classes=100)).train()


def _outputs(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[NetOutput, NetOutput, Batch]:
    b = f_s.shape[0]
    logits = torch.zeros(b, 100)
    return NetOutput([f_s], logits), NetOutput([f_t], logits), Batch(torch.zeros(b, 3, 32, 32),
                                                                      torch.zeros(b, dtype=torch.long))


def test_matches_the_reference_golden():
    inputs = goldens.inputs(GOLDEN)
    config = GOLDEN["config"]
    distiller = _distiller(256, 256, ega_node_weight=config["node_weight"], ega_edge_weight=config["edge_weight"])
    assert distiller.embed is None and list(distiller.parameters()) == []  # equal sizes: as the reference
    f_s = inputs["s_pool"].requires_grad_(True)
    terms = distiller(*_outputs(f_s, inputs["t_pool"]))
    assert list(terms) == ["ega"]
    goldens.assert_matches(terms["ega"], torch.tensor(GOLDEN["outputs"]["loss"]), VALUE_RTOL, "loss")
    terms["ega"].backward()
    assert set(GOLDEN["grads"]) == {"s_pool"}
    goldens.assert_matches(f_s.grad, GOLDEN["grads"]["s_pool"], GRAD_RTOL, "s_pool")
    # the arguments the other way round (the reference's own order puts the student first)
    swapped = distiller(*_outputs(inputs["t_pool"], inputs["s_pool"]))["ega"]
    goldens.assert_matches(swapped, torch.tensor(GOLDEN["outputs"]["loss_with_arguments_swapped"]), VALUE_RTOL,
                           "loss_with_arguments_swapped")


def test_defaults_are_the_reference_config():
    assert (EGAOptions().ega_node_weight, EGAOptions().ega_edge_weight) == (GOLDEN["config"]["node_weight"],
                                                                            GOLDEN["config"]["edge_weight"])


def test_the_definition_in_float64():
    """Pearson correlations of the 2B samples (torch.corrcoef), Frobenius norms not squared."""
    torch.manual_seed(0)
    f_s, f_t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    c = torch.corrcoef(torch.cat([f_t, f_s]))
    node = (c[:5, 5:] - torch.eye(5, dtype=torch.float64)).pow(2).sum().sqrt()
    edge = (c[:5, :5] - c[5:, 5:]).pow(2).sum().sqrt()
    got = EGALoss(0.7, 0.2)(f_s, f_t)
    assert got.item() == pytest.approx((0.7 * node + 0.2 * edge).item(), rel=1e-10)
    assert EGALoss(0.7, 0.2)(f_t, f_s).item() == pytest.approx(got.item(), rel=1e-10)  # symmetric


def test_a_constant_sample_and_a_batch_of_one_stay_finite():
    f_s = torch.randn(3, 6, requires_grad=True)
    f_t = torch.randn(3, 6)
    f_t[1] = 2.0  # a sample whose features are all equal: no variance across the features
    loss = EGALoss()(f_s, f_t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f_s.grad).all()
    assert torch.isfinite(EGALoss()(torch.randn(1, 6), torch.randn(1, 6)))


def test_unequal_sizes_embed_the_student_into_the_teacher_size():
    distiller = _distiller(12, 8)
    assert distiller.embed.linear.weight.shape == (8, 12)
    f_s = torch.randn(4, 12, requires_grad=True)
    f_t = torch.randn(4, 8)
    loss = distiller(*_outputs(f_s, f_t))["ega"]
    assert loss.item() == pytest.approx(EGALoss()(distiller.embed(f_s), f_t).item(), rel=1e-6)
    loss.backward()
    assert f_s.grad.abs().sum() > 0 and distiller.embed.linear.weight.grad.abs().sum() > 0


def test_flags_and_published_weights():
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "ega", "--ega_node_weight", "0.8"])
    assert (opt.ega_node_weight, opt.ega_edge_weight) == (0.8, 0.3)
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.0, 1.0)
    assert options_from(get_method("ega").Options, opt) == EGAOptions(ega_node_weight=0.8)
