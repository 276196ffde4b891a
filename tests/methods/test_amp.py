"""Mixed precision: every method's loss under ``torch.autocast`` (bf16 on CPU, as ``--amp bf16``
runs it) is float32, finite and close to its float32 value, and its gradients reach the student.

The numerically sensitive parts of the losses (softmax / KL, exp and log of similarities, Gram
matrices, normalisations, distances, SVD, Sinkhorn, NCE) run in float32 islands
(``distiller_zoo._common.fp32``); the networks and the heads' linear layers stay in bf16.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.declare import options_from
from crd import ContrastLoss
from distiller_zoo import (DKDLoss, FSP, KDSVD, ABLoss, Attention, Correlation, DistillKL, FactorTransfer,
                           HintLoss, NSTLoss, PKT, RKDLoss, Similarity)
from distiller_zoo._common import fp32, to_fp32
from distiller_zoo.registry import Batch, Distiller, NetOutput
from engine.methods import build_distiller, get_method, method_names
from models import build_model
from tests.tolerance import AMP, FP32, assert_close

pytestmark = pytest.mark.numeric

BF16 = torch.bfloat16
# resnet14 -> resnet8: equal channel counts (16, 16, 32, 64), so fsp and kdsvd are served too.
TEACHER, STUDENT = "resnet14", "resnet8"
B, N_DATA, K = 8, 64, 16
# Tolerances of a term under bf16 relative to fp32. The gaps come from the networks' bf16
# forward passes, not from the losses (their sensitive parts are fp32): over six seeds of this
# set-up the largest relative gap was 7e-3 (an init-stage loss; most stay below 3e-3). RKD reached
# 2.3e-2: the random teacher's pooled features differ between samples by only ~5% of their norm,
# so the ~1% rounding of a bf16 forward pass is a sizeable part of the distances and angles
# RKD compares (RKD of the same features merely rounded to bf16 moves by 0.4%).
RTOL = AMP
# DIST's intra-class relation correlates each class's probabilities over the batch after centring
# them: the random networks' predictions differ little between samples, so the ~1% rounding of
# bf16 logits is a sizeable part of those centred columns (3% off on the AVX2 kernels, 1 seed).
RTOL_OF = {"rkd": 6e-2, "dist": 6e-2}
# KDSVD's value is not a continuous function of the features: the sign of each leading singular
# vector is arbitrary (LAPACK's choice), and the RBF between consecutive layers depends on the
# two teacher vectors' relative sign, so a perturbation as small as rounding the features to
# bf16 can flip it (seen on one seed of six: 13% off, with the loss itself computed in fp32).
# Its value is checked for dtype and finiteness here; test_loss_classes_are_fp32_islands checks
# that it computes exactly in fp32.
NOT_COMPARED = {"kdsvd"}
# Cosine between the student's gradients under bf16 and fp32 (measured: >= 0.98 over six seeds,
# except FT). FT's L1 loss sends sign(F_s - F_t): its many near-zero differences flip sign under
# bf16 rounding (cosine 0.98 from rounding the features alone, down to 0.94 with bf16 networks).
GRAD_COSINE, GRAD_COSINE_OF = 0.95, {"factor": 0.85}


# The option values of these tests; each method reads those its Options declare.
OPTION_VALUES = SimpleNamespace(feat_dim=32, hint_layer=2, nce_k=K, nce_t=0.07, nce_m=0.5, crcd_k=K)


def _options(method: str):
    """``--distill method``'s options: OPTION_VALUES where it declares them, else its defaults."""
    return options_from(get_method(method).Options, OPTION_VALUES)


def make_setup() -> tuple[nn.Module, nn.Module, Batch]:
    """The student (train mode), the teacher (eval mode) and one batch of B samples, from seed 0."""
    torch.manual_seed(0)
    teacher = build_model(TEACHER, num_classes=10).eval()
    student = build_model(STUDENT, num_classes=10).train()
    index = torch.randperm(N_DATA)[:B]
    negatives = torch.stack([torch.randperm(N_DATA)[:K] for _ in range(B)])
    batch = Batch(torch.randn(B, 3, 32, 32), torch.randint(0, 10, (B,)), index,
                  torch.cat([index[:, None], negatives], dim=1))
    return student, teacher, batch


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def _terms(distiller: Distiller, student: nn.Module, teacher: nn.Module, batch: Batch,
           amp: bool, dtype: torch.dtype = BF16) -> dict[str, torch.Tensor]:
    """The method's terms for ``batch``, student and teacher forward and the distiller under
    autocast to ``dtype`` on the batch's device when ``amp``; an init stage's loss is the term
    ``init``, kd's term is the loop's KL. The terms are then back-propagated (the student's
    gradients are left in its parameters)."""
    student.zero_grad(set_to_none=True)
    with torch.autocast(batch.img.device.type, dtype=dtype, enabled=amp):
        preact_s, preact_t = distiller.preacts()
        s = NetOutput(*student(batch.img, is_feat=True, preact=preact_s))
        with torch.no_grad():
            t = NetOutput(*teacher(batch.img, is_feat=True, preact=preact_t))
        torch.manual_seed(1)  # the same negatives for methods that draw their own (crcd)
        terms = dict(distiller(s, t, batch))
        if distiller.has_init_stage:
            terms["init"] = distiller.init_loss(s, t, batch)
        if not terms:  # kd: the loop's alpha * KL_T is the whole method
            terms["kl"] = DistillKL(4)(s.logits, t.logits)
    sum(terms.values()).backward()
    return {name: term.detach() for name, term in terms.items()}


def _student_grad(student: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])


@pytest.mark.parametrize("method", method_names())
def test_method_under_bf16_autocast(method: str, setup) -> None:
    check_method_under_autocast(method, *setup, BF16)


def check_method_under_autocast(method: str, student: nn.Module, teacher: nn.Module, batch: Batch,
                                dtype: torch.dtype) -> None:
    """The method's terms under ``dtype`` autocast (on the device of the networks and ``batch``)
    against fp32: float32, finite, within the tolerances above; the student's gradients finite
    and aligned with fp32's."""
    torch.manual_seed(2)
    reference = build_distiller(method, _options(method), student, teacher, batch.img[:2], n_data=N_DATA,
                                model_s=STUDENT, model_t=TEACHER,
                                batch_size=len(batch.img)).train().to(batch.img.device)
    mixed = copy.deepcopy(reference)  # the same heads and memory banks to start from
    mixed.bind(student, teacher)      # the networks themselves, not copies of them

    expected = _terms(reference, student, teacher, batch, amp=False)
    grad_fp32 = _student_grad(student)
    got = _terms(mixed, student, teacher, batch, amp=True, dtype=dtype)
    grad_mixed = _student_grad(student)

    assert got.keys() == expected.keys()
    for name, value in got.items():
        assert value.dtype == torch.float32 and value.dim() == 0, (name, value.dtype, value.shape)
        assert torch.isfinite(value), name
        if method not in NOT_COMPARED:
            assert_close(value, expected[name], rtol=RTOL_OF.get(method, RTOL), msg=name)
    assert grad_mixed.numel() > 0 and torch.isfinite(grad_mixed).all()
    assert grad_mixed.abs().sum() > 0, "no gradient reached the student"
    assert F.cosine_similarity(grad_mixed, grad_fp32, dim=0) > GRAD_COSINE_OF.get(method, GRAD_COSINE)
    for p in mixed.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_distill_kl_computes_in_fp32(dtype: torch.dtype, autocast: bool) -> None:
    torch.manual_seed(0)
    y_s = (torch.randn(16, 100) * 6).to(dtype).requires_grad_(True)
    y_t = (torch.randn(16, 100) * 6).to(dtype)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        loss = DistillKL(4)(y_s, y_t)
    expected = DistillKL(4)(y_s.detach().float(), y_t.float())  # fp32 on the same rounded logits
    assert loss.dtype == torch.float32
    assert_close(loss, expected, rtol=FP32)
    loss.backward()
    assert y_s.grad.dtype == dtype and torch.isfinite(y_s.grad).all()


def _maps(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    return [torch.randn(shape).to(BF16) for shape in shapes]


# Each loss class with bf16 inputs [B=4]: (loss, student inputs, teacher inputs).
LOSS_CASES = {
    "DistillKL": lambda: (DistillKL(4), _maps((4, 10)), _maps((4, 10))),
    "HintLoss": lambda: (HintLoss(), _maps((4, 8, 4, 4)), _maps((4, 8, 4, 4))),
    "Attention": lambda: (Attention(), [_maps((4, 8, 8, 8), (4, 16, 4, 4))], [_maps((4, 12, 4, 4), (4, 24, 4, 4))]),
    "Similarity": lambda: (Similarity(), [_maps((4, 8, 4, 4))], [_maps((4, 12, 4, 4))]),
    "Correlation": lambda: (Correlation(), _maps((4, 16)), _maps((4, 16))),
    "RKDLoss": lambda: (RKDLoss(), _maps((4, 16)), _maps((4, 24))),
    "PKT": lambda: (PKT(), _maps((4, 16)), _maps((4, 24))),
    "ABLoss": lambda: (ABLoss(2), [_maps((4, 8, 4, 4), (4, 16, 2, 2))], [_maps((4, 8, 4, 4), (4, 16, 2, 2))]),
    "FactorTransfer": lambda: (FactorTransfer(), _maps((4, 8, 8, 8)), _maps((4, 6, 4, 4))),
    "FSP": lambda: (FSP([(4, 8, 8, 8), (4, 16, 4, 4)], [(4, 8, 8, 8), (4, 16, 4, 4)]),
                    [_maps((4, 8, 8, 8), (4, 16, 4, 4))], [_maps((4, 8, 8, 8), (4, 16, 4, 4))]),
    "NSTLoss": lambda: (NSTLoss(), [_maps((4, 8, 4, 4))], [_maps((4, 12, 4, 4))]),
    "KDSVD": lambda: (KDSVD(), [_maps((4, 8, 8, 8), (4, 8, 4, 4))], [_maps((4, 8, 8, 8), (4, 8, 4, 4))]),
    "DKDLoss": lambda: (DKDLoss(), _maps((4, 10)), _maps((4, 10)) + [torch.tensor([0, 3, 5, 9])]),
    "ContrastLoss": lambda: (ContrastLoss(64), [torch.rand(4, K + 1, 1).to(BF16)], []),
}


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_loss_classes_are_fp32_islands(case: str) -> None:
    """bf16 inputs under autocast give exactly the float32 computation on the upcast inputs: no
    operation of the loss runs in bf16, and the values are float32."""
    torch.manual_seed(0)
    loss, s_args, t_args = LOSS_CASES[case]()
    args = [s_args] if isinstance(s_args, torch.Tensor) else list(s_args)
    args += [t_args] if isinstance(t_args, torch.Tensor) else list(t_args)
    with torch.autocast("cpu", dtype=BF16):
        got = loss(*args)
    expected = loss(*to_fp32(args))
    got, expected = (got, expected) if isinstance(got, list) else ([got], [expected])
    for value, reference in zip(got, expected):
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
        assert torch.equal(value, reference)


def test_fp32_helper_leaves_float32_and_float64_alone() -> None:
    x32, x64, ints = torch.randn(3), torch.randn(3, dtype=torch.float64), torch.arange(3)
    assert to_fp32(x32) is x32 and to_fp32(x64) is x64 and to_fp32(ints) is ints
    cast = to_fp32([x32.to(BF16), (x32.half(), 2.0)])
    assert isinstance(cast, list) and cast[0].dtype == torch.float32
    assert isinstance(cast[1], tuple) and cast[1][0].dtype == torch.float32 and cast[1][1] == 2.0

    @fp32
    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

    with torch.autocast("cpu", dtype=BF16):
        assert product(x32[None], x32[:, None]).dtype == torch.float32  # a matmul autocast would lower
        assert (x32[None] @ x32[:, None]).dtype == BF16
