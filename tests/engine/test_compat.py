"""RepDistiller's import paths keep working: every name that its scripts and users' code import,
imported from RepDistiller's module path and used for real on tiny inputs (values by hand)."""
from __future__ import annotations

import argparse
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from tests.datagen import write_fake_cifar100, write_fake_imagenet
from tests.tolerance import FP32, FP32_DEEP, FP32_EXACT, FP64, approx, assert_close

pytestmark = pytest.mark.numeric

EPS = 1e-7  # RepDistiller's NCE epsilon


def close(actual: torch.Tensor | float, expected: torch.Tensor | float, rel: float = FP32) -> None:
    """:func:`tests.tolerance.assert_close` for RepDistiller's scalar shapes ([1] or [] alike), at
    the scale of these tests' inputs, which are of order one (so a zero reference is compared at it)."""
    actual = torch.as_tensor(actual).detach().double()
    expected = torch.as_tensor(expected).detach().double()
    if actual.numel() == expected.numel() == 1:  # RepDistiller's losses may be [1] or []
        actual, expected = actual.reshape(()), expected.reshape(())
    assert_close(actual, expected, rtol=rel, scale=1.0)


def nce_by_hand(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """CRD's NCE loss (Eq. 18) on normalised scores [B, K+1], column 0 the positive."""
    noise = (scores.shape[1] - 1) / n_data
    pos, neg = scores[:, 0], scores[:, 1:]
    return -(torch.log(pos / (pos + noise + EPS)).sum() + torch.log(noise / (neg + noise + EPS)).sum()) / len(scores)


def contrast_indices(idx: torch.Tensor, n_data: int, k: int, seed: int = 0) -> torch.Tensor:
    """[B, K+1]: column 0 ``idx``, then k distinct other samples."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in idx.tolist():
        others = torch.tensor([j for j in torch.randperm(n_data, generator=gen).tolist() if j != i][:k])
        rows.append(torch.cat([torch.tensor([i]), others]))
    return torch.stack(rows)


# ---------------------------------------------------------------- crd.criterion, crd.memory

def test_crd_criterion_crdloss_by_hand():
    from crd.criterion import CRDLoss
    torch.manual_seed(0)
    opt = SimpleNamespace(s_dim=8, t_dim=6, feat_dim=4, n_data=20, nce_k=5, nce_t=0.07, nce_m=0.5)
    criterion = CRDLoss(opt)
    # RepDistiller's CRDLoss(opt) is this library's CRDLoss with the same settings as arguments
    from crd.crd_loss import CRDLoss as ExplicitCRDLoss
    assert isinstance(criterion, ExplicitCRDLoss)
    torch.manual_seed(0)
    explicit = ExplicitCRDLoss(opt.s_dim, opt.t_dim, opt.n_data, feat_dim=opt.feat_dim, nce_k=opt.nce_k,
                               nce_t=opt.nce_t, nce_m=opt.nce_m)
    assert list(explicit.state_dict()) == list(criterion.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(explicit.state_dict().values(), criterion.state_dict().values()))
    assert explicit.contrast.z_momentum is criterion.contrast.z_momentum is None
    f_s, f_t = torch.randn(3, 8, requires_grad=True), torch.randn(3, 6)
    idx = torch.tensor([0, 4, 7])
    contrast_idx = contrast_indices(idx, opt.n_data, opt.nce_k)
    bank_s, bank_t = criterion.contrast.memory_v1.clone(), criterion.contrast.memory_v2.clone()
    with torch.no_grad():
        e_s = F.normalize(criterion.embed_s.linear(f_s), dim=1)
        e_t = F.normalize(criterion.embed_t.linear(f_t), dim=1)
    loss = criterion(f_s, f_t, idx, contrast_idx)

    expected = 0.0
    for anchor, bank in ((e_s, bank_t), (e_t, bank_s)):  # each view scored against the other's bank
        out = torch.exp(torch.einsum("bkd,bd->bk", bank[contrast_idx], anchor) / opt.nce_t)
        expected = expected + nce_by_hand(out / (out.mean() * opt.n_data), opt.n_data)
    assert loss.dim() == 0
    close(loss, expected)
    # the banks' rows of the batch moved half-way to the new embeddings, renormalised
    close(criterion.contrast.memory_v1[idx], F.normalize(0.5 * bank_s[idx] + 0.5 * e_s, dim=1))
    close(criterion.contrast.memory_v2[idx], F.normalize(0.5 * bank_t[idx] + 0.5 * e_t, dim=1))
    loss.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0 and criterion.embed_t.linear.weight.grad is not None


def test_crd_criterion_contrastloss_embed_normalize():
    from crd.criterion import ContrastLoss, Embed, Normalize
    scores = torch.tensor([[2.0, 0.1, 0.3], [0.5, 0.5, 1.0]])
    close(ContrastLoss(10)(scores), nce_by_hand(scores, 10))
    close(ContrastLoss(10)(scores.unsqueeze(2)), nce_by_hand(scores, 10))  # RepDistiller's [B, K+1, 1]

    torch.manual_seed(0)
    embed = Embed(6, 3)
    x = torch.randn(4, 6)
    out = embed(x)
    linear = x @ embed.linear.weight.T + embed.linear.bias
    close(out, linear / linear.norm(dim=1, keepdim=True))
    assert set(embed.state_dict()) == {"linear.weight", "linear.bias"}  # RepDistiller's names

    y = torch.tensor([[3.0, 4.0], [1.0, -1.0]])
    close(Normalize(2)(y), [[0.6, 0.8], [1 / math.sqrt(2), -1 / math.sqrt(2)]])
    close(Normalize(1)(y[:1]), [[3 / 7, 4 / 7]])  # x / sum(x^p)^(1/p), as RepDistiller's


def test_crd_memory_contrast_memory_scores_by_hand():
    from crd.memory import ContrastMemory
    torch.manual_seed(1)
    memory = ContrastMemory(4, 12, 3, T=0.1, momentum=0.5)
    v1, v2 = F.normalize(torch.randn(2, 4), dim=1), F.normalize(torch.randn(2, 4), dim=1)
    y = torch.tensor([2, 9])
    idx = contrast_indices(y, 12, 3, seed=1)
    bank1, bank2 = memory.memory_v1.clone(), memory.memory_v2.clone()
    out_v1, out_v2 = memory(v1, v2, y, idx)
    assert out_v1.shape == out_v2.shape == (2, 4, 1)
    for out, anchor, bank in ((out_v1, v1, bank2), (out_v2, v2, bank1)):
        raw = torch.exp(torch.einsum("bkd,bd->bk", bank[idx], anchor) / 0.1)
        close(out.squeeze(2), raw / (raw.mean() * 12))
    z1, z2 = memory.params[2].item(), memory.params[3].item()
    assert z1 > 0 and z2 > 0  # Z estimated on this first batch, then frozen
    memory(v1, v2, y, idx)
    assert (memory.params[2].item(), memory.params[3].item()) == (z1, z2)
    assert set(memory.state_dict()) == {"params", "memory_v1", "memory_v2"}


def test_crd_memory_alias_method_draws_the_distribution():
    from crd.memory import AliasMethod
    torch.manual_seed(0)
    sampler = AliasMethod(torch.tensor([1.0, 0.0, 3.0]))  # weights: normalised to 1/4, 0, 3/4
    draws = sampler.draw(40000)
    assert draws.dtype == torch.long and draws.shape == (40000,)
    counts = torch.bincount(draws, minlength=3).double() / 40000
    assert counts[1] == 0  # probability 0: never drawn
    assert abs(counts[2].item() - 0.75) < 0.01  # 4.6 standard deviations (0.0022)
    assert sampler.to("cpu") is sampler and sampler.draw(5).device.type == "cpu"
    with pytest.raises(ValueError):
        AliasMethod(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError):
        AliasMethod(torch.zeros(3))


# ---------------------------------------------------------------- helper.util

def test_helper_util_meter_accuracy_and_learning_rate():
    from helper.util import AverageMeter, accuracy, adjust_learning_rate
    meter = AverageMeter()
    meter.update(2.0, 3)
    meter.update(4.0)
    assert (meter.val, meter.sum, meter.count, meter.avg) == (4.0, 10.0, 4, 2.5)

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    target = torch.tensor([1, 1, 2, 2])
    top1, top2 = accuracy(logits, target, topk=(1, 2))
    assert top1.shape == top2.shape == (1,)
    assert top1.item() == approx(50.0, rtol=FP32_EXACT) and top2.item() == approx(75.0, rtol=FP32_EXACT)  # rows 0, 2; 1
    (only,) = accuracy(logits, target)
    assert only.item() == approx(50.0, rtol=FP32_EXACT)

    opt = argparse.Namespace(learning_rate=0.05, lr_decay_epochs=[150, 180, 210], lr_decay_rate=0.1)
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=opt.learning_rate)
    for epoch, lr in ((1, 0.05), (150, 0.05), (151, 0.005), (181, 5e-4), (211, 5e-5), (240, 5e-5)):
        adjust_learning_rate(epoch, opt, optimizer)
        assert [g["lr"] for g in optimizer.param_groups] == approx([lr, lr], rtol=FP64)


# ---------------------------------------------------------------- helper.loops

def tiny_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 4, generator=gen), torch.tensor([0, 2, 1])),
            (torch.randn(2, 4, generator=gen), torch.tensor([1, 1]))]


def test_helper_loops_validate_repdistiller_form_by_hand():
    from helper.loops import validate
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batches = tiny_batches()
    criterion = nn.CrossEntropyLoss()
    top1, top5, loss = validate(batches, model, criterion, argparse.Namespace(print_freq=10))
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in batches)
        mean_loss = sum(criterion(model(x), y).item() * len(y) for x, y in batches) / 5
    assert isinstance(top1, float) and isinstance(loss, float)
    assert top1 == approx(100 * correct / 5, rtol=FP32_EXACT) and top5 == approx(100.0, rtol=FP32_EXACT)
    assert loss == approx(mean_loss, rtol=FP32_EXACT)
    assert validate(val_loader=batches, model=model, criterion=criterion, opt=None) == (top1, top5, loss)
    # this library's form still answers with its dict: the same numbers
    ours = validate(model, batches, torch.device("cpu"))
    assert ours["test_acc"] == approx(top1, rtol=FP32_EXACT) and ours["test_loss"] == approx(loss, rtol=FP32_EXACT)


def test_helper_loops_train_vanilla_matches_a_hand_written_epoch():
    from helper.loops import train_vanilla
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    batches = tiny_batches(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    top1, loss = train_vanilla(1, batches, model, criterion, optimizer, argparse.Namespace(print_freq=10))

    loss_sum = correct = 0.0
    for x, y in batches:  # RepDistiller's loop body
        logits = reference(x)
        batch_loss = criterion(logits, y)
        correct += (logits.argmax(1) == y).sum().item()
        loss_sum += batch_loss.item() * len(y)
        ref_optimizer.zero_grad()
        batch_loss.backward()
        ref_optimizer.step()
    assert top1 == approx(100 * correct / 5, rtol=FP32_EXACT) and loss == approx(loss_sum / 5, rtol=FP32_EXACT)
    for got, want in zip(model.parameters(), reference.parameters()):
        close(got.detach(), want.detach(), rel=FP32_EXACT)
    assert not torch.equal(model.weight, initial.weight)  # it trained


# ---------------------------------------------------------------- distiller_zoo

def test_distiller_zoo_losses():
    from distiller_zoo import (ABLoss, Attention, Correlation, DistillKL, FactorTransfer, FSP, HintLoss, KDSVD,
                               NSTLoss, PKT, RKDLoss, Similarity, VIDLoss)
    torch.manual_seed(0)
    # KD, T = 1: student uniform, teacher (1/4, 3/4): KL = 1/4 ln(1/2) + 3/4 ln(3/2)
    kd = DistillKL(1)(torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]]))
    close(kd, 0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    close(DistillKL(4)(torch.ones(2, 5), torch.ones(2, 5)), 0.0)
    close(HintLoss()(torch.zeros(2, 3, 2, 2), torch.full((2, 3, 2, 2), 2.0)), 4.0)
    # AB on one pre-activation -0.5 with a teacher off (<= 0): (s + m)^2 / B * 3 / 1000
    (ab,) = ABLoss(1)([torch.full((1, 1, 1, 1), -0.5)], [torch.full((1, 1, 1, 1), -0.5)])
    close(ab, 0.25 * 3 / 1000)

    maps = [torch.randn(4, 8, 8, 8), torch.randn(4, 16, 4, 4)]
    other = [torch.randn_like(m) for m in maps]
    for loss in (Attention(), Similarity(), NSTLoss(), KDSVD()):
        same = loss(maps, [m.clone() for m in maps])
        different = loss(maps, other)
        assert len(same) == len(different) == (1 if isinstance(loss, KDSVD) else 2), type(loss).__name__  # KDSVD: layer pairs
        for zero, positive in zip(same, different):
            close(zero, 0.0, rel=FP32_DEEP)
            assert positive > 1e-4, type(loss).__name__
    fsp_maps = [torch.randn(4, 8, 8, 8), torch.randn(4, 8, 8, 8), torch.randn(4, 16, 4, 4)]
    fsp = FSP([m.shape for m in fsp_maps], [m.shape for m in fsp_maps])
    for zero in fsp(fsp_maps, [m.clone() for m in fsp_maps]):
        close(zero, 0.0)
    assert sum(fsp(fsp_maps, [torch.randn_like(m) for m in fsp_maps])) > 0

    vectors, others = torch.randn(6, 10), torch.randn(6, 10)
    for loss in (Correlation(), RKDLoss(), PKT()):
        close(loss(vectors, vectors.clone()), 0.0)
        assert loss(vectors, others) > 1e-4, type(loss).__name__
    close(FactorTransfer()(maps[0], maps[0].clone()), 0.0)
    assert FactorTransfer()(maps[0], other[0]) > 0

    # VID with a zero regressor predicts mu = 0: mean(0.5 * (t^2 / var + log var)), var = 5 at the start
    vid = VIDLoss(8, 6, 5)
    for layer in vid.regressor:
        if isinstance(layer, nn.Conv2d):
            nn.init.zeros_(layer.weight)
    target = torch.randn(4, 5, 8, 8)
    close(vid(maps[0], target), 0.5 * (target.pow(2).mean() / 5.0 + math.log(5.0)))


# ---------------------------------------------------------------- models, models.util

def test_models_model_dict_and_util_modules():
    from models import model_dict
    from models.util import ConvReg, Connector, Embed, LinearEmbed, Paraphraser, Translator
    torch.manual_seed(0)
    net = model_dict["resnet8"](num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = net(x, is_feat=True)
        assert torch.equal(net(x), logits)  # the same ops on the same input
    assert logits.shape == (2, 10) and feats[-1].shape == (2, 64)

    v = torch.randn(3, 8)
    embed = Embed(8, 4)
    close(embed(v).norm(dim=1), torch.ones(3))
    linear = LinearEmbed(8, 4)
    close(linear(v), v @ linear.linear.weight.T + linear.linear.bias)
    assert ConvReg((1, 3, 8, 8), (1, 5, 4, 4))(torch.randn(2, 3, 8, 8)).shape == (2, 5, 4, 4)
    assert ConvReg((1, 3, 4, 4), (1, 5, 8, 8))(torch.randn(2, 3, 4, 4)).shape == (2, 5, 8, 8)
    connector = Connector([(1, 4, 8, 8), (1, 3, 4, 4)], [(1, 4, 8, 8), (1, 6, 4, 4)])
    same, mapped = connector([maps := torch.randn(2, 4, 8, 8), torch.randn(2, 3, 4, 4)])
    assert torch.equal(same, maps) and mapped.shape == (2, 6, 4, 4)  # equal shapes pass through
    assert Translator((1, 3, 4, 4), (1, 8, 4, 4))(torch.randn(2, 3, 4, 4)).shape == (2, 4, 4, 4)
    factor, reconstruction = Paraphraser((1, 8, 4, 4))(torch.randn(2, 8, 4, 4))
    assert factor.shape == (2, 4, 4, 4) and reconstruction.shape == (2, 8, 4, 4)


# ---------------------------------------------------------------- dataset (fake files on disk)

def test_dataset_cifar100_loader_functions(tmp_path):
    """Uses a fake CIFAR-100 folder (tests/datagen.py; not the published MD5s, hence
    ``allow_modified``): sample i has label i % 100."""
    from dataset.cifar100 import get_cifar100_dataloaders, get_cifar100_dataloaders_sample
    root = str(write_fake_cifar100(tmp_path / "cifar", n_train_per_class=2, n_test_per_class=1))
    train, test = get_cifar100_dataloaders(batch_size=8, num_workers=0, data_folder=root, allow_modified=True)
    img, target = next(iter(train))
    assert img.shape == (8, 3, 32, 32) and img.dtype == torch.float32 and target.shape == (8,)
    assert len(train.dataset) == 200 and len(test.dataset) == 100 and test.batch_size == 4
    test_img, test_target = next(iter(test))
    assert test_img.shape == (4, 3, 32, 32) and test_target.tolist() == [0, 1, 2, 3]  # in order

    train, _, n_data = get_cifar100_dataloaders(batch_size=8, num_workers=0, is_instance=True, data_folder=root,
                                                allow_modified=True)
    img, target, index = next(iter(train))
    assert n_data == 200 and torch.equal(target, index % 100)

    train, _, n_data = get_cifar100_dataloaders_sample(batch_size=8, num_workers=0, k=4, mode="exact",
                                                       data_folder=root, allow_modified=True)
    img, target, index, contrast_idx = next(iter(train))
    assert n_data == 200 and img.shape == (8, 3, 32, 32) and contrast_idx.shape == (8, 5)
    assert torch.equal(contrast_idx[:, 0], index)  # exact: the positive is the sample itself
    assert bool((contrast_idx[:, 1:] % 100 != target[:, None]).all())  # negatives of other classes


def test_dataset_imagenet_loader_functions(tmp_path):
    from dataset.imagenet import get_dataloader_sample, get_imagenet_dataloader, get_test_loader
    root = str(write_fake_imagenet(tmp_path / "imagenet"))  # 3 classes, 4 + 2 + 3 training images
    train, val = get_imagenet_dataloader(batch_size=2, num_workers=0, data_folder=root)
    img, target = next(iter(train))
    assert img.shape == (2, 3, 224, 224) and target.shape == (2,) and len(train.dataset) == 9
    assert next(iter(val))[0].shape[1:] == (3, 224, 224)
    test = get_test_loader(batch_size=2, num_workers=0, data_folder=root)  # the same validation images, in order
    assert len(test.dataset) == len(val.dataset)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(test, val))
    with pytest.raises(UserError, match="'cifar100' is not served by the ImageNet loaders"):
        get_test_loader("cifar100", data_folder=root)
    train, _, n_data, num_classes = get_dataloader_sample(batch_size=3, num_workers=0, is_sample=True, k=2,
                                                          data_folder=root)
    img, target, index, contrast_idx = next(iter(train))
    assert (n_data, num_classes) == (9, 3) and contrast_idx.shape == (3, 3)
    assert torch.equal(contrast_idx[:, 0], index)
    labels = torch.as_tensor(train.dataset.base.targets)
    assert bool((labels[contrast_idx[:, 1:]] != target[:, None]).all())
