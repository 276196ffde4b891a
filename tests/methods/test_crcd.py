"""crd/crcd.py: CRCD's relation scores (dot products vs explicit differences), its memory
(measured O(B^2 K)), the closed-form gradient element, the Distiller's gradients and state,
and train_student end to end."""
from __future__ import annotations

import copy
from pathlib import Path
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from common.errors import UserError
from crd import CRCDLoss
from crd.crcd import CRCDOptions, ce_feature_grad, relation_scores
from dataset.needs import DataNeeds
from distiller_zoo.registry import Batch, NetOutput
from engine.methods import build_distiller, get_method
from models import build_model, get_classifier
from tests.tolerance import FP32, FP32_DEEP, FP64, assert_close
import train_student

pytestmark = pytest.mark.numeric


S_DIM, T_DIM, N_DATA = 12, 20, 40  # feature sizes and training-set size of the small losses


def small_options(**kw) -> CRCDOptions:
    base = dict(feat_dim=8, crcd_k=6, crcd_t=0.05, nce_m=0.5, crcd_grad_weight=1.0)
    base.update(kw)
    return CRCDOptions(**base)


def naive_scores(e: torch.Tensor, anchors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """cos(rows[i, k] - anchors[a], e[i] - anchors[a]) with the [B, A, K+1, D] relations materialised."""
    r_e = F.normalize(e[:, None, :] - anchors[None, :, :], dim=-1)                  # [B, A, D]
    r_rows = F.normalize(rows[:, None, :, :] - anchors[None, :, None, :], dim=-1)   # [B, A, K+1, D]
    return (r_rows * r_e[:, :, None, :]).sum(-1)


def batch_case(n_data: int, batch: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample indices [B] and contrast indices [B, K+1] (column 0 the sample) in which some
    negatives are other samples of the batch (their relation to that anchor is the zero vector)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n_data, generator=g)[:batch]
    negatives = torch.stack([torch.randperm(n_data - 1, generator=g)[:k] for _ in range(batch)])
    negatives = negatives + (negatives >= idx[:, None]).long()  # skip the sample itself
    negatives[0, 0], negatives[1, 2] = idx[1], idx[0]
    return idx, torch.cat([idx[:, None], negatives], dim=1)


# --- relation scores from dot products ----------------------------------------------------

@pytest.mark.parametrize("dtype, rtol", [(torch.float64, FP64), (torch.float32, FP32)])
def test_relation_scores_equal_explicit_differences(dtype, rtol):
    torch.manual_seed(0)
    n_data, batch, k, dim = 30, 5, 7, 6
    bank = torch.randn(n_data, dim, dtype=dtype) * torch.rand(n_data, 1, dtype=dtype)  # rows not unit
    idx, contrast_idx = batch_case(n_data, batch, k)
    e = F.normalize(torch.randn(batch, dim, dtype=dtype), dim=1).requires_grad_(True)
    fast = relation_scores(e, bank[idx], bank[contrast_idx], contrast_idx, idx)
    slow = naive_scores(e, bank[idx], bank[contrast_idx])
    assert fast.shape == (batch, batch, k + 1)
    assert_close(fast, slow, rtol=rtol, scale=1.0)  # cosines: the scores' size is 1
    assert fast[0, 1, 1] == 0 and fast[1, 0, 3] == 0 and fast.diagonal(dim1=0, dim2=1)[0].eq(0).all()
    weights = torch.randn_like(fast)
    grad_fast, = torch.autograd.grad((fast * weights).sum(), e)
    grad_slow, = torch.autograd.grad((slow * weights).sum(), e)
    assert_close(grad_fast, grad_slow, rtol=rtol)


def naive_crcd_side(e: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, contrast_idx: torch.Tensor,
                    n_data: int, temperature: float, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One side of CRCD written out: materialised relations, pairs a != i, Z = mean * N, NCE."""
    out = torch.exp(naive_scores(e, bank[idx], bank[contrast_idx]) / temperature)  # [B, A, K+1]
    out = out[~torch.eye(len(idx), dtype=torch.bool)]                              # [B (B - 1), K+1]
    z = out.detach().mean() * n_data if z is None else z
    p = out / z
    noise, eps = (out.shape[1] - 1) / n_data, 1e-7
    loss = -(torch.log(p[:, 0] / (p[:, 0] + noise + eps)).sum()
             + torch.log(noise / (p[:, 1:] + noise + eps)).sum()) / p.shape[0]
    return loss, z


def test_loss_equals_the_materialised_definition_over_two_steps():
    torch.manual_seed(1)
    options = small_options(crcd_grad_weight=0.0)
    criterion = CRCDLoss(S_DIM, T_DIM, N_DATA, options).double()
    reference = copy.deepcopy(criterion)
    z = {"s": None, "t": None}
    for step in range(2):
        idx, contrast_idx = batch_case(N_DATA, 6, options.crcd_k, seed=step)
        f_s = torch.randn(6, S_DIM, dtype=torch.float64, requires_grad=True)
        f_t = torch.randn(6, T_DIM, dtype=torch.float64)
        criterion.zero_grad()
        loss = criterion(f_s, f_t, idx, contrast_idx)["crcd"]
        loss.backward()

        reference.zero_grad()
        f_s_ref = f_s.detach().clone().requires_grad_(True)
        e_s, e_t = reference.embed_s(f_s_ref), reference.embed_t(f_t)
        mem = reference.contrast
        temperature = float(mem.params[1])  # 0.05 as stored (in float32, then float64)
        loss_s, z["s"] = naive_crcd_side(e_s, mem.memory_v2, idx, contrast_idx, N_DATA, temperature, z["s"])
        loss_t, z["t"] = naive_crcd_side(e_t, mem.memory_v1, idx, contrast_idx, N_DATA, temperature, z["t"])
        (loss_s + loss_t).backward()
        with torch.no_grad():
            for bank, e in ((mem.memory_v1, e_s), (mem.memory_v2, e_t)):
                bank[idx] = F.normalize(0.5 * bank[idx] + 0.5 * e, dim=1)

        assert_close(loss, loss_s + loss_t, rtol=FP64)
        assert_close(f_s.grad, f_s_ref.grad, rtol=FP64)
        for name in ("embed_s", "embed_t"):
            assert_close(getattr(criterion, name).linear.weight.grad, getattr(reference, name).linear.weight.grad,
                         rtol=FP64, msg=name)
        assert_close(criterion.contrast.memory_v1, mem.memory_v1, rtol=FP64)
        assert_close(criterion.contrast.memory_v2, mem.memory_v2, rtol=FP64)
        assert_close(criterion.contrast.params[2:4], torch.stack([z["s"], z["t"]]), rtol=FP64)


# --- memory: measured ----------------------------------------------------------------------

class LiveTensorMemory(TorchDispatchMode):
    """Accounts every storage created by an ATen op (forward and backward) while active, and
    when it is freed (weak references to the storages): ``peak`` is the most bytes alive at
    once, ``largest`` the largest single allocation."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                if storage.nbytes():
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
                    self.largest = max(self.largest, storage.nbytes())
        self.peak = max(self.peak, self.current)
        return out


def measure(batch: int, k: int, dim: int) -> LiveTensorMemory:
    """Forward + backward of CRCDLoss (both terms) under the accounting."""
    torch.manual_seed(0)
    n_data = 200
    criterion = CRCDLoss(16, 16, n_data, small_options(feat_dim=dim, crcd_k=k))
    idx = torch.randperm(n_data)[:batch]
    contrast_idx = criterion.contrast.draw_contrast_idx(idx)
    f_s, g_s = torch.randn(2, batch, 16, requires_grad=True)
    f_t, g_t = torch.randn(2, batch, 16)
    with LiveTensorMemory() as memory:
        terms = criterion(f_s, f_t, idx, contrast_idx, g_s, g_t)
        sum(terms.values()).backward()
    return memory


def test_peak_memory_grows_as_b2k_not_b2kd():
    float_bytes = 4
    peaks = {}
    for batch, k, dim in [(16, 32, 8), (32, 32, 8), (32, 64, 8), (32, 32, 64)]:
        memory = measure(batch, k, dim)
        one_score_tensor = batch * batch * (k + 1) * float_bytes  # [B, B, K+1]
        # never a [B, B, K+1, D] tensor: the largest allocation is a score tensor or a bank gather
        assert memory.largest <= max(one_score_tensor, batch * (k + 1) * dim * float_bytes)
        if dim == 8:  # both terms, both sides: about 12 score tensors each (measured: 23-26)
            assert memory.peak <= 30 * one_score_tensor, (batch, k, dim, memory.peak / one_score_tensor)
        peaks[batch, k, dim] = memory.peak
    assert 3.4 <= peaks[32, 32, 8] / peaks[16, 32, 8] <= 4.6       # B^2
    assert 1.7 <= peaks[32, 64, 8] / peaks[32, 32, 8] <= 2.3       # K
    assert peaks[32, 32, 64] / peaks[32, 32, 8] <= 1.5             # not D (8x under B^2 K D)


# --- the gradient element -------------------------------------------------------------------

def test_closed_form_ce_gradient_equals_autograd():
    torch.manual_seed(2)
    batch, dim, classes = 6, 5, 4
    head = nn.Linear(dim, classes).double()
    f = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, classes, (batch,))
    closed = ce_feature_grad(head(f), target, head.weight)
    autograd, = torch.autograd.grad(F.cross_entropy(head(f), target), f, create_graph=True)
    assert_close(closed, autograd * batch, rtol=FP64)
    # and it is the same function of (f, W, b): equal gradients of anything built on it
    weights = torch.randn(batch, dim, dtype=torch.float64)
    params = [f, head.weight, head.bias]
    for a, b in zip(torch.autograd.grad((closed * weights).sum(), params),
                    torch.autograd.grad((autograd * batch * weights).sum(), params)):
        assert_close(a, b, rtol=FP64)


# --- the Distiller ----------------------------------------------------------------------------

def tiny_distiller(grad_weight: float = 1.0):
    torch.manual_seed(3)
    student, teacher = build_model("resnet8", num_classes=10), build_model("resnet14", num_classes=10)
    options = CRCDOptions(crcd_k=6, crcd_t=0.05, crcd_grad_weight=grad_weight, feat_dim=8, nce_m=0.5)
    distiller = build_distiller("crcd", options, student, teacher, torch.randn(2, 3, 32, 32), n_data=40)
    return distiller, student, teacher


def test_published_weights_and_flags():
    method = get_method("crcd")
    assert method.weights == (1.0, 0.9, 1.0)
    assert method.data_needs(method.Options()) == DataNeeds(index=True)  # draws its own negatives
    opt = train_student.parse_option(["--path_t", "x/resnet32x4_vanilla/ckpt_epoch_240.pth", "--distill", "crcd"])
    assert (opt.crcd_k, opt.crcd_t, opt.crcd_grad_weight) == (500, 0.05, 1.0)
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.9, 1.0)


def test_classifiers_are_not_the_distillers():
    distiller, student, teacher = tiny_distiller()
    heads = [get_classifier(student), get_classifier(teacher)]
    head_params = {id(p) for h in heads for p in h.parameters()}
    assert not head_params & {id(p) for p in distiller.parameters()}
    assert all(key.startswith("criterion.") for key in distiller.state_dict())
    head_storage = {p.data_ptr() for h in heads for p in h.parameters()}
    assert not head_storage & {t.data_ptr() for t in distiller.state_dict().values()}
    assert not [m for m in distiller.modules() if m is heads[0] or m is heads[1]]
    without_grad_term, _, _ = tiny_distiller(grad_weight=0.0)
    assert not any("grad" in key for key in without_grad_term.state_dict())


def test_gradients_reach_the_student_only():
    distiller, student, teacher = tiny_distiller()
    img, target = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    batch = Batch(img, target, index=torch.arange(8) * 5)
    student.train()
    teacher.eval()  # parameters left trainable on purpose: any gradient reaching them shows up
    s, t = NetOutput(*student(img, is_feat=True)), NetOutput(*teacher(img, is_feat=True))
    terms = distiller(s, t, batch)
    assert set(terms) == {"crcd", "crcd_grad"}
    banks = [b for name, b in distiller.named_buffers() if "memory" in name]
    assert len(banks) == 4 and not any(b.requires_grad for b in banks)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(b.grad is None for b in banks)
    assert get_classifier(student).weight.grad.abs().sum() > 0  # through g_s = (softmax(z_s) - y) W_s
    assert all(p.grad is not None for p in distiller.parameters())


def test_student_gradient_element_matches_double_backward():
    """The term's gradients into the student equal those of the autograd.grad(create_graph=True)
    formulation (times B), for the same bank state and negatives."""
    distiller, student, teacher = tiny_distiller()
    criterion = distiller.criterion
    img, target = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    index, contrast_idx = batch_case(40, 8, 6)
    with torch.no_grad():
        t = NetOutput(*teacher(img, is_feat=True))
    reference = copy.deepcopy(criterion)

    student.zero_grad()
    s = NetOutput(*student(img, is_feat=True))
    distiller(s, t, Batch(img, target, index, contrast_idx))["crcd_grad"].backward()
    closed = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()
    feats, logits = student(img, is_feat=True)
    g_s, = torch.autograd.grad(F.cross_entropy(logits, target), feats[-1], create_graph=True)
    g_t = ce_feature_grad(t.logits, target, get_classifier(teacher).weight)
    reference(feats[-1], t.feats[-1], index, contrast_idx, g_s * len(img), g_t)["crcd_grad"].backward()
    for a, p in zip(closed, student.parameters()):
        assert_close(a, p.grad, rtol=FP32_DEEP)  # through the student's backward twice


def test_negatives_are_drawn_unless_given_with_crcd_k_columns(monkeypatch):
    criterion = CRCDLoss(S_DIM, T_DIM, N_DATA, small_options(crcd_grad_weight=0.0))
    drawn = []
    draw = criterion.contrast.draw_contrast_idx
    monkeypatch.setattr(criterion.contrast, "draw_contrast_idx", lambda y: drawn.append(draw(y)) or drawn[-1])
    idx = torch.arange(5) * 3
    f_s, f_t = torch.randn(5, 12), torch.randn(5, 20)
    criterion(f_s, f_t, idx)                                          # none given
    criterion(f_s, f_t, idx, torch.randint(0, 40, (5, 33)))           # the loader's --nce_k columns
    assert len(drawn) == 2
    for contrast_idx in drawn:
        assert contrast_idx.shape == (5, 7) and torch.equal(contrast_idx[:, 0], idx)
        assert (contrast_idx[:, 1:] != idx[:, None]).all()
        assert all(len(set(row.tolist())) == 7 for row in contrast_idx)
    _, given = batch_case(40, 5, 6)
    criterion(f_s, f_t, idx, given)
    assert len(drawn) == 2
    with pytest.raises(UserError, match="--crcd_k 40"):
        CRCDLoss(S_DIM, T_DIM, N_DATA, small_options(crcd_k=40))


# --- end to end --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crcd_teachers")
    paths = {}
    for arch in ("resnet32x4", "vgg13"):
        folder = root / f"{arch}_vanilla"
        folder.mkdir()
        paths[arch] = folder / "ckpt_epoch_240.pth"
        torch.save({"model": build_model(arch, num_classes=100).state_dict()}, paths[arch])
    return paths


@pytest.mark.e2e
@pytest.mark.parametrize("teacher, student", [("resnet32x4", "resnet8x4"), ("vgg13", "MobileNetV2")])
def test_train_student_two_steps(teacher, student, teachers, tmp_path):
    results = train_student.main([
        "--path_t", str(teachers[teacher]), "--model_s", student, "--distill", "crcd",
        "--dataset", "synthetic", "--subset", "200", "--val_subset", "20", "--batch_size", "8",
        "--max_steps", "2", "--epochs", "1", "--nce_k", "32", "--crcd_k", "32", "--num_workers", "0",
        "--save_folder", str(tmp_path)])
    assert results["steps"] == 2
    history = results["history"][0]
    for term in ("ce", "kd", "crcd", "crcd_grad"):
        assert f"loss_{term}" in history and history[f"loss_{term}"] == history[f"loss_{term}"], history
