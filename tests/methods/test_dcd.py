"""DCD (Giakoumoglou & Stathaki, 2024): the two terms, the learnable scale and bias, and runs."""
from __future__ import annotations

import math
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F

from common.declare import options_from
from crd import DCDLoss
from crd.dcd import DCD, DCDOptions
from distiller_zoo.registry import BuildContext
from models import build_model
from tests.tolerance import FP32, approx, assert_close
import train_student

pytestmark = pytest.mark.numeric

B, S_DIM, T_DIM, FEAT_DIM = 6, 12, 20, 8


def make_loss(**kwargs) -> DCDLoss:
    torch.manual_seed(0)
    return DCDLoss(S_DIM, T_DIM, FEAT_DIM, **kwargs)


def features() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(B, S_DIM, generator=gen, requires_grad=True),
            torch.randn(B, T_DIM, generator=gen, requires_grad=True))


def test_parameters_and_names():
    loss = make_loss()
    names = dict(loss.named_parameters())
    assert {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias", "params.tau", "params.b"} == set(names)
    assert loss.embed_s.weight.shape == (FEAT_DIM, S_DIM) and loss.embed_t.weight.shape == (FEAT_DIM, T_DIM)
    assert loss.params["tau"].item() == 1.0 and loss.params["b"].item() == 0.0
    assert loss.kappa.item() == approx(math.e, rtol=FP32)


def test_contrastive_term_is_plain_cross_entropy():
    loss = make_loss(alpha=0.0)
    f_s, f_t = features()
    z_s = F.normalize(loss.embed_s(f_s), dim=1)
    z_t = F.normalize(loss.embed_t(f_t), dim=1)
    sim = math.e * z_s @ z_t.t()
    plain = -sum(sim[i, i] - torch.log(torch.exp(sim[i]).sum()) for i in range(B)) / B
    assert_close(loss(f_s, f_t), plain, rtol=FP32)
    assert_close(loss(f_s, f_t), F.cross_entropy(sim, torch.arange(B)), rtol=FP32)


def test_total_is_contrastive_plus_alpha_consistency():
    loss = make_loss(alpha=0.5)
    f_s, f_t = features()
    logits = loss.logits(*loss.embed(f_s, f_t))
    p = F.softmax(logits, dim=1)            # student i over teachers
    q = F.softmax(logits.t(), dim=1)        # teacher i over students
    consistency = (q * (q.log() - p.log())).sum() / B
    assert_close(loss(f_s, f_t), F.cross_entropy(logits, torch.arange(B)) + 0.5 * consistency, rtol=FP32)


def test_consistency_is_zero_for_a_symmetric_matrix():
    a = torch.randn(B, B)
    typical = DCDLoss.consistency(a).item()  # a matrix that is not symmetric: the term's size
    assert typical > 1e-3
    assert_close(DCDLoss.consistency(a + a.t()).item(), 0.0, rtol=FP32, scale=typical)


def test_kappa_clamps_and_theta_gets_no_gradient_when_clamped():
    loss = make_loss(max_tau=10.0, init_tau=3.0)            # exp(3) = 20.1 > 10
    assert loss.kappa.item() == 10.0  # the clamp's bound itself
    f_s, f_t = features()
    loss(f_s, f_t).backward()
    assert loss.params["tau"].grad.abs().item() == 0.0


def test_theta_gradient_follows_the_chain_rule_and_b_gets_none():
    loss = make_loss(alpha=0.5, init_tau=1.0)
    f_s, f_t = features()
    z_s, z_t = loss.embed(f_s, f_t)
    logits = loss.logits(z_s, z_t)
    logits.retain_grad()
    total = DCDLoss.contrastive(logits) + 0.5 * DCDLoss.consistency(logits)
    total.backward()
    expected = loss.kappa.detach() * (logits.grad * (z_s @ z_t.t()).detach()).sum()
    assert_close(loss.params["tau"].grad, expected, rtol=FP32)
    assert loss.params["tau"].grad.abs().item() > 1e-4
    # A scalar added to every logit changes no softmax: dloss/db = sum(dloss/dL) = 0, a sum of
    # B^2 terms the size of the logits' gradients.
    assert_close(loss.params["b"].grad, torch.zeros(()), rtol=FP32, scale=float(logits.grad.abs().sum()))
    assert f_t.grad is None and f_s.grad is not None


def test_no_gradient_to_teacher_features_and_inference_tensors_work():
    loss = make_loss()
    f_s, _ = features()
    with torch.inference_mode():
        f_t = torch.randn(B, T_DIM)
    loss(f_s, f_t).backward()
    assert loss.embed_t.weight.grad is not None and f_s.grad is not None


def test_distiller_trains_theta_and_b_and_flags():
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "dcd"])
    assert (opt.dcd_alpha, opt.dcd_max_tau, opt.dcd_init_tau) == (0.5, 10.0, 1.0)
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.0, 1.0)
    options = options_from(DCDOptions, opt)
    assert options == DCDOptions(feat_dim=128, dcd_alpha=0.5, dcd_max_tau=10.0, dcd_init_tau=1.0)
    distiller = DCD(options, BuildContext((torch.Size([2, S_DIM]),), (torch.Size([2, T_DIM]),), num_classes=100))
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert id(distiller.criterion.params["tau"]) in trainable and id(distiller.criterion.params["b"]) in trainable


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teachers") / "resnet32x4_vanilla"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save({"model": build_model("resnet32x4", num_classes=100).state_dict()}, folder / "ckpt_epoch_240.pth")
    return folder / "ckpt_epoch_240.pth"


@pytest.mark.e2e
@pytest.mark.parametrize("weights, terms", [([], ["ce", "dcd"]), (["-a", "1", "-b", "1"], ["ce", "kd", "dcd"])])
def test_train_student_two_steps(weights, terms, teacher_path, tmp_path):
    results = train_student.main([
        "--path_t", str(teacher_path), "--model_s", "resnet8x4", "--distill", "dcd", *weights,
        "--dataset", "synthetic", "--subset", "200", "--val_subset", "20", "--batch_size", "8",
        "--max_steps", "2", "--epochs", "1", "--nce_k", "32", "--num_workers", "0", "--save_folder", str(tmp_path),
        "--synthetic_train", "2", "--synthetic_test", "1"])   # a 300-image set: quick to generate
    assert results["steps"] == 2
    history = results["history"][0]
    for term in terms:
        assert f"loss_{term}" in history and math.isfinite(history[f"loss_{term}"]), history
