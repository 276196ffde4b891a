"""crd/: CRD's embeds, memory bank, NCE loss and the ``crd`` Distiller.

The reference values (tests/fixtures/repdistiller_goldens.pt, entry 'crd') were made with
RepDistiller's own CRDLoss on three consecutive steps; see the file's 'about' entry.
"""
from __future__ import annotations

import math
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from crd import CRDLoss, ContrastLoss, ContrastMemory, Embed
from crd.options import NCEOptions
from dataset.needs import ContrastNeed, DataNeeds
from dataset.sampling import ContrastSampler
from distiller_zoo.registry import Batch, NetOutput
from engine.methods import build_distiller, get_method
from models import build_model
from tests.tolerance import FP32, FP32_DEEP, FP32_DEEP_GRAD, approx, assert_close

pytestmark = pytest.mark.numeric

GOLDENS = torch.load(Path(__file__).parents[1] / "fixtures" / "repdistiller_goldens.pt", weights_only=True)


SMALL = dict(s_dim=12, t_dim=20, feat_dim=8, n_data=50, nce_k=10, nce_t=0.07, nce_m=0.5)


def small_loss(**kw) -> CRDLoss:
    """A small CRDLoss: the sizes and settings of ``SMALL``, with ``kw`` instead where given."""
    return CRDLoss(**{**SMALL, **kw})


def raw_scores(bank: torch.Tensor, idx: torch.Tensor, v: torch.Tensor, T: float) -> torch.Tensor:
    """exp(<bank[idx[b, k]], v[b]> / T), [B, K+1, 1], written out without bmm."""
    return torch.exp((bank[idx] * v[:, None, :]).sum(-1, keepdim=True) / T)


# --- the reference values -------------------------------------------------------------------

def test_reproduces_repdistiller_three_steps():
    case = GOLDENS["crd"]
    criterion = CRDLoss(**case["opt"])  # RepDistiller's opt: s_dim, t_dim, feat_dim, n_data, nce_k, nce_t, nce_m
    criterion.load_state_dict(case["initial_state"], strict=True)
    assert list(criterion.state_dict()) == list(case["initial_state"])
    for step, (inputs, expected) in enumerate(zip(case["steps"], case["after_each_step"])):
        criterion.zero_grad()
        f_s = inputs["f_s"].clone().requires_grad_(True)
        loss = criterion(f_s, inputs["f_t"], inputs["idx"], inputs["contrast_idx"])
        loss.backward()
        assert_close(loss.reshape(1), expected["loss"], rtol=FP32_DEEP, msg=f"loss, step {step}")
        grads = {"grad_f_s": f_s.grad, "grad_embed_s_weight": criterion.embed_s.linear.weight.grad,
                 "grad_embed_t_weight": criterion.embed_t.linear.weight.grad}
        for name, grad in grads.items():
            assert_close(grad, expected[name], rtol=FP32_DEEP_GRAD, msg=f"{name}, step {step}")
        # the banks' rows are unit vectors: entries near zero carry the rounding of the row's norm
        for name in ("memory_v1", "memory_v2"):
            assert_close(getattr(criterion.contrast, name), expected[name], rtol=FP32_DEEP, msg=f"{name}, step {step}")
        assert_close(criterion.contrast.params, expected["params"], rtol=FP32_DEEP, msg=f"params, step {step}")


# --- pieces -----------------------------------------------------------------------------------

def test_embed_is_linear_then_unit_norm():
    embed = Embed(6, 4)
    assert [name for name, _ in embed.named_parameters()] == ["linear.weight", "linear.bias"]
    x = torch.randn(5, 6, 1, 1)
    out = embed(x)
    expected = x.flatten(1) @ embed.linear.weight.T + embed.linear.bias
    assert_close(out, expected / expected.norm(dim=1, keepdim=True), rtol=FP32)


def test_nce_loss_equals_direct_computation():
    torch.manual_seed(0)
    n_data, batch, k = 100, 3, 7
    x = torch.rand(batch, k + 1, 1) * 0.2
    total = 0.0
    for b in range(batch):
        p_pos = x[b, 0, 0].item()
        total += math.log(p_pos / (p_pos + k / n_data + 1e-7))
        for j in range(1, k + 1):
            p_neg = x[b, j, 0].item()
            total += math.log((k / n_data) / (p_neg + k / n_data + 1e-7))
    expected = -total / batch
    assert ContrastLoss(n_data)(x).item() == approx(expected, rtol=FP32)
    assert ContrastLoss(n_data)(x.squeeze(-1)).item() == approx(expected, rtol=FP32)


def test_memory_initialisation_and_buffers():
    memory = ContrastMemory(12, 30, K=5, T=0.1, momentum=0.4)
    assert list(memory.state_dict()) == ["params", "memory_v1", "memory_v2"]
    assert memory.params.tolist() == approx([5, 0.1, -1, -1, 0.4], rtol=FP32)  # float32 of the settings
    bound = 1 / math.sqrt(12 / 3)
    for bank in (memory.memory_v1, memory.memory_v2):
        assert bank.shape == (30, 12) and not bank.requires_grad
        assert bank.abs().max() <= bound and bank.abs().max() > 0.8 * bound
    assert len(list(memory.parameters())) == 0


def test_z_is_estimated_on_the_first_batch_then_fixed():
    torch.manual_seed(0)
    n, d, k, T = 40, 8, 6, 0.07
    memory = ContrastMemory(d, n, k, T=T, momentum=0.5)
    z_values = []
    for step in range(3):
        v1, v2 = F.normalize(torch.randn(4, d), dim=1), F.normalize(torch.randn(4, d), dim=1)
        y = torch.randperm(n)[:4]
        idx = torch.cat([y[:, None], torch.randint(0, n, (4, k))], dim=1)
        bank_v1, bank_v2 = memory.memory_v1.clone(), memory.memory_v2.clone()
        out_v1, out_v2 = memory(v1, v2, y, idx)
        scores_v1, scores_v2 = raw_scores(bank_v2, idx, v1, T), raw_scores(bank_v1, idx, v2, T)
        if step == 0:
            z_values = [scores_v1.mean().item() * n, scores_v2.mean().item() * n]
        assert memory.params[2].item() == approx(z_values[0], rtol=FP32)
        assert memory.params[3].item() == approx(z_values[1], rtol=FP32)
        assert out_v1.shape == out_v2.shape == (4, k + 1, 1)
        # exps of scores, spanning orders of magnitude: every element to a relative precision
        for out, expected in ((out_v1, scores_v1 / z_values[0]), (out_v2, scores_v2 / z_values[1])):
            assert_close(out, expected, rtol=FP32, scale=float(expected.min()))


def test_z_as_moving_average_when_asked():
    torch.manual_seed(1)
    n, d, k, T = 40, 8, 6, 0.07
    memory = ContrastMemory(d, n, k, T=T, z_momentum=0.99)
    z = None
    for _ in range(3):
        v1, v2 = F.normalize(torch.randn(4, d), dim=1), F.normalize(torch.randn(4, d), dim=1)
        y = torch.randperm(n)[:4]
        idx = torch.cat([y[:, None], torch.randint(0, n, (4, k))], dim=1)
        estimate = raw_scores(memory.memory_v2.clone(), idx, v1, T).mean().item() * n
        z = estimate if z is None else 0.99 * z + 0.01 * estimate
        out_v1, _ = memory(v1, v2, y, idx)
        assert memory.params[2].item() == approx(z, rtol=FP32)
    # and CRDLoss takes it as nce_z_momentum
    assert small_loss(nce_z_momentum=0.99).contrast.z_momentum == 0.99
    assert small_loss().contrast.z_momentum is None


def test_memory_update_touches_only_the_batch_rows():
    torch.manual_seed(2)
    n, d, k = 30, 8, 5
    memory = ContrastMemory(d, n, k, momentum=0.5)
    before_v1, before_v2 = memory.memory_v1.clone(), memory.memory_v2.clone()
    y = torch.tensor([3, 17, 9])
    v1, v2 = F.normalize(torch.randn(3, d), dim=1), F.normalize(torch.randn(3, d), dim=1)
    idx = torch.cat([y[:, None], torch.randint(0, n, (3, k))], dim=1)
    memory(v1, v2, y, idx)
    others = torch.ones(n, dtype=torch.bool)
    others[y] = False
    for bank, before, v in ((memory.memory_v1, before_v1, v1), (memory.memory_v2, before_v2, v2)):
        assert torch.equal(bank[others], before[others])
        mixed = 0.5 * before[y] + 0.5 * v
        assert_close(bank[y], mixed / mixed.norm(dim=1, keepdim=True), rtol=FP32)
        assert_close(bank[y].norm(dim=1), torch.ones(3), rtol=FP32)


# --- negatives drawn by the memory (idx=None) ---------------------------------------------------

def test_drawn_negatives_exclude_the_anchor_and_are_uniform():
    torch.manual_seed(3)
    n, k, draws = 20, 5, 2000
    memory = ContrastMemory(4, n, k)
    y = torch.full((draws,), 7)
    idx = memory.draw_contrast_idx(y)
    assert idx.shape == (draws, k + 1)
    assert torch.equal(idx[:, 0], y)
    negatives = idx[:, 1:]
    assert not (negatives == 7).any()
    assert all(row.unique().numel() == k for row in negatives[:50])  # without replacement
    counts = torch.bincount(negatives.flatten(), minlength=n).float()
    expected = draws * k / (n - 1)
    others = torch.arange(n) != 7
    assert (counts[others] - expected).abs().max() < 0.15 * expected
    # forward without idx puts y in column 0 too
    v = F.normalize(torch.randn(3, 4), dim=1)
    out_v1, out_v2 = memory(v, v, torch.tensor([0, 1, 2]))
    assert out_v1.shape == out_v2.shape == (3, k + 1, 1)


def test_drawn_negatives_exclude_the_class_when_labels_are_given():
    torch.manual_seed(4)
    n, k, draws = 24, 6, 2000
    labels = torch.arange(n) % 4
    memory = ContrastMemory(4, n, k, labels=labels)
    y = torch.full((draws,), 5)  # class 1
    idx = memory.draw_contrast_idx(y)
    assert torch.equal(idx[:, 0], y)
    assert not (labels[idx[:, 1:]] == labels[5]).any()
    counts = torch.bincount(idx[:, 1:].flatten(), minlength=n).float()
    expected = draws * k / (n - n // 4)
    other_class = labels != labels[5]
    assert (counts[other_class] - expected).abs().max() < 0.15 * expected


def test_too_many_negatives_for_the_fallback_sampler_is_a_user_error():
    memory = ContrastMemory(4, 10, K=10)
    with pytest.raises(UserError, match="nce_k 10"):
        memory.draw_contrast_idx(torch.tensor([0]))


# --- gradients --------------------------------------------------------------------------------

def test_gradients_reach_embeds_and_student_but_not_memory_or_teacher():
    torch.manual_seed(5)
    criterion = small_loss()
    f_s = torch.randn(4, SMALL["s_dim"], requires_grad=True)
    f_t = torch.randn(4, SMALL["t_dim"], requires_grad=True)
    idx = torch.tensor([1, 2, 3, 4])
    contrast_idx = torch.cat([idx[:, None], torch.randint(5, SMALL["n_data"], (4, SMALL["nce_k"]))], dim=1)
    loss = criterion(f_s, f_t, idx, contrast_idx)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None
    for embed in (criterion.embed_s, criterion.embed_t):
        assert embed.linear.weight.grad is not None and embed.linear.weight.grad.abs().sum() > 0
    for buffer in criterion.contrast.buffers():
        assert not buffer.requires_grad and buffer.grad is None
    assert {name for name, _ in criterion.named_parameters()} == {
        "embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight", "embed_t.linear.bias"}


def test_teacher_features_from_inference_mode_are_accepted():
    criterion = small_loss()
    with torch.inference_mode():
        f_t = torch.randn(4, SMALL["t_dim"])
    f_s = torch.randn(4, SMALL["s_dim"], requires_grad=True)
    idx = torch.arange(4)
    criterion(f_s, f_t, idx).backward()
    assert criterion.embed_t.linear.weight.grad is not None


def test_scores_stay_in_the_bank_dtype_under_autocast():
    criterion = small_loss()
    f_s = torch.randn(4, SMALL["s_dim"], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e_s = criterion.embed_s(f_s)
        out_v1, _ = criterion.contrast(e_s, e_s.detach(), torch.arange(4))
    assert e_s.dtype == torch.bfloat16
    assert out_v1.dtype == criterion.contrast.memory_v1.dtype == torch.float32


# --- the Distiller ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet_pair():
    torch.manual_seed(6)
    return build_model("resnet8x4", num_classes=10), build_model("resnet32x4", num_classes=10).eval()


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_crd_distiller_resnet32x4_to_resnet8x4(resnet_pair, mode):
    student, teacher = resnet_pair
    n_data, k, batch = 40, 16, 4
    labels = torch.arange(n_data) % 10
    options = NCEOptions(feat_dim=32, nce_k=k, nce_t=0.07, nce_m=0.5, mode=mode)
    cls = get_method("crd")
    assert cls.data_needs(options) == DataNeeds(index=True, contrast=ContrastNeed(k, mode))
    assert cls.data_needs(cls.Options()) == DataNeeds(index=True, contrast=ContrastNeed(16384, "exact"))
    assert cls.weights == (1.0, 0.0, 0.8)
    distiller = build_distiller("crd", options, student, teacher, torch.randn(2, 3, 32, 32), n_data=n_data)
    assert distiller.criterion.embed_s.linear.in_features == 256
    assert distiller.criterion.embed_t.linear.in_features == 256
    assert distiller.criterion.contrast.memory_v1.shape == (n_data, 32)

    sampler = ContrastSampler(labels, k, mode=mode)
    index = torch.tensor([0, 11, 22, 33])
    contrast_idx = sampler(index)
    assert contrast_idx.shape == (batch, k + 1)
    img = torch.randn(batch, 3, 32, 32)
    s = NetOutput(*student(img, is_feat=True))
    with torch.inference_mode():
        t = NetOutput(*teacher(img, is_feat=True))
    terms = distiller(s, t, Batch(img, labels[index], index, contrast_idx))
    assert set(terms) == {"crd"} and terms["crd"].dim() == 0 and torch.isfinite(terms["crd"])
    student.zero_grad()
    terms["crd"].backward()
    assert student.fc.weight.grad is None  # the loss uses features, not logits
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None for p in distiller.trainable_parameters())


def test_crd_distiller_needs_n_data(resnet_pair):
    student, teacher = resnet_pair
    with pytest.raises(UserError, match="n_data"):
        build_distiller("crd", NCEOptions(feat_dim=8, nce_k=4, nce_t=0.07, nce_m=0.5),
                        student, teacher, torch.randn(2, 3, 32, 32))
