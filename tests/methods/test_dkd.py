"""DKD (Zhao et al., CVPR 2022): the decomposition of KL, the target mask, the warm-up and a run."""
from __future__ import annotations

import math
import pytest
import torch
import torch.nn.functional as F

from distiller_zoo import DKDLoss
from distiller_zoo.DKD import DKD, MASK_OFFSET, DKDOptions, dkd_terms, warmup_factor
from distiller_zoo.registry import Batch, BuildContext, NetOutput
from models import build_model
from tests.tolerance import FP32, FP32_EXACT, FP64, approx, assert_close
import train_student

pytestmark = pytest.mark.numeric

T = 2.0
Y_S = [[1.0, -0.5, 2.0, 0.3], [0.2, 0.1, -1.0, 1.5]]
Y_T = [[3.0, 0.5, -0.2, 1.0], [-0.3, 2.2, 0.4, 0.0]]
TARGET = [0, 3]


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def explicit(b: int) -> dict[str, float]:
    """KL, TCKD, NCKD and p_t[target] of sample b, from the definitions, in plain Python."""
    g = TARGET[b]
    p_s, p_t = softmax(Y_S[b]), softmax(Y_T[b])
    bin_s, bin_t = [p_s[g], 1 - p_s[g]], [p_t[g], 1 - p_t[g]]
    hat_s = [p_s[i] / (1 - p_s[g]) for i in range(4) if i != g]
    hat_t = [p_t[i] / (1 - p_t[g]) for i in range(4) if i != g]
    return {"kl": kl(p_t, p_s), "tckd": kl(bin_t, bin_s), "nckd": kl(hat_t, hat_s), "pt_target": p_t[g]}


def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(Y_S, dtype=torch.float64), torch.tensor(Y_T, dtype=torch.float64), torch.tensor(TARGET)


@pytest.mark.parametrize("b", [0, 1])
def test_kl_decomposes_into_tckd_and_nckd(b):
    e = explicit(b)
    assert e["kl"] == approx(e["tckd"] + (1 - e["pt_target"]) * e["nckd"], rtol=FP64)
    tckd, nckd = dkd_terms(*tensors(), T)
    assert tckd[b].item() == approx(e["tckd"], rtol=FP64)
    assert nckd[b].item() == approx(e["nckd"], rtol=FP64)


def test_mask_by_subtraction_equals_renormalisation_over_non_target_classes():
    y = torch.randn(5, 10)
    target = torch.tensor([0, 3, 9, 3, 5])
    mask = F.one_hot(target, 10).bool()
    masked = F.softmax(y / T - MASK_OFFSET * mask, dim=1)
    p = F.softmax(y / T, dim=1)
    p_target = p[mask].view(5, 1)
    renormalised = torch.where(mask, torch.zeros_like(p), p / (1 - p_target))
    assert_close(masked, renormalised, rtol=FP32)


def test_loss_is_the_weighted_scaled_batch_mean():
    e = [explicit(b) for b in range(2)]
    loss = DKDLoss(alpha=1.5, beta=8.0, T=T)(*tensors())
    expected = T**2 * sum(1.5 * x["tckd"] + 8.0 * x["nckd"] for x in e) / 2
    assert loss.item() == approx(expected, rtol=FP64)


def test_zero_when_student_equals_teacher():
    y = torch.randn(6, 100) * 3
    target = torch.randint(0, 100, (6,))
    typical = DKDLoss()(torch.randn(6, 100) * 3, y, target).item()  # an unrelated student: the loss's size
    assert_close(DKDLoss()(y, y.clone(), target).item(), 0.0, rtol=FP32, scale=typical)


def test_finite_for_a_confident_teacher_and_no_gradient_to_teacher():
    y_s = torch.randn(4, 10, requires_grad=True)
    y_t = torch.randn(4, 10, requires_grad=True)
    target = torch.tensor([1, 2, 3, 4])
    y_t_confident = y_t + 200.0 * F.one_hot(target, 10)   # p_t[target] = 1 in float32
    loss = DKDLoss()(y_s, y_t_confident, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(y_s.grad).all()
    assert y_t.grad is None


def test_warmup_factor_by_epoch():
    options = DKDOptions(dkd_alpha=1.0, dkd_beta=8.0, dkd_T=4.0, dkd_warmup=20)
    distiller = DKD(options, BuildContext((), (), num_classes=10))  # logits only: no feature shapes
    s = NetOutput([], torch.randn(3, 10))
    t = NetOutput([], torch.randn(3, 10))
    batch = Batch(torch.zeros(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    full = DKDLoss(1.0, 8.0, 4.0)(s.logits, t.logits, batch.target)
    for epoch, factor in [(1, 0.05), (10, 0.5), (20, 1.0), (240, 1.0)]:
        distiller.start_epoch(epoch)
        assert distiller(s, t, batch)["dkd"].item() == approx(factor * full.item(), rtol=FP32_EXACT)
    assert warmup_factor(5, 0) == 1.0


def test_flags_and_published_weights():
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "dkd"])
    assert (opt.dkd_alpha, opt.dkd_beta, opt.dkd_T, opt.dkd_warmup) == (1.0, 8.0, 4.0, 20)
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.0, 1.0)


@pytest.mark.e2e
def test_train_student_two_steps(tmp_path):
    folder = tmp_path / "resnet32x4_vanilla"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save({"model": build_model("resnet32x4", num_classes=100).state_dict()}, folder / "ckpt_epoch_240.pth")
    results = train_student.main([
        "--path_t", str(folder / "ckpt_epoch_240.pth"), "--model_s", "resnet8x4", "--distill", "dkd",
        "--dataset", "synthetic", "--subset", "200", "--val_subset", "20", "--batch_size", "8",
        "--max_steps", "2", "--epochs", "1", "--nce_k", "32", "--num_workers", "0", "--save_folder", str(tmp_path),
        "--synthetic_train", "2", "--synthetic_test", "1"])   # a 300-image set: quick to generate
    assert results["steps"] == 2
    history = results["history"][0]
    assert "loss_dkd" in history and "loss_ce" in history and math.isfinite(history["loss_dkd"])
