"""The frozen-teacher fast path: BatchNorm folded into convolutions (models/fold.py), the teacher
prepared by models.teacher.prepare_teacher, and DistillStep running the teachers under
torch.inference_mode."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.declare import options_from
from common.runtime import Runtime
from distiller_zoo import DistillKL
from distiller_zoo.registry import Batch, NetOutput
from distiller_zoo.step import DistillStep, ordinary_tensors
from engine.epoch import evaluate
from engine.methods import build_distiller, get_method
from models import build_model, imagenet_model_dict, model_dict
from models.fold import find_foldable, fold_batchnorm
from models.teacher import prepare_teacher
from tests.tolerance import FP32, FP32_DEEP, FP32_DEEP_GRAD, FP32_EXACT, FP64, approx, assert_close
import train_student

pytestmark = pytest.mark.numeric

CPU = Runtime(torch.device("cpu"))
# The BatchNorms that no convolution feeds alone: the WRNs' pre-activation blocks read a residual
# sum (block1's first one the stem conv's output, which is also a feature and the shortcut), and
# their final BN the last block's sum.
UNFOLDABLE = {name: re.compile(r"(block\d\.layer\.\d+\.bn1|bn1)$") for name in model_dict if name.startswith("wrn_")}


def input_size(name: str) -> int:
    return 64 if name in imagenet_model_dict else 32


def randomize_batchnorm(model: nn.Module, size: int, seed: int = 0) -> nn.Module:
    """Random BN affine parameters, then running statistics measured on random images (so that
    activations stay of order one in deep nets) and perturbed; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.bias.copy_(0.2 * torch.randn(bn.num_features, generator=gen))
            bn.momentum = 1.0  # running statistics := those of the next batch
        model.train()
        model(torch.randn(4, 3, size, size, generator=gen))
        for bn in bns:
            bn.momentum = 0.1
            bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn(bn.num_features, generator=gen))
            bn.running_var.mul_(torch.rand(bn.num_features, generator=gen) * 0.6 + 0.7)
    return model.eval()


def all_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of every forward variant and every feature with and without ``preact``."""
    with torch.no_grad():
        out = {"logits": model(x)}
        for preact in (False, True):
            feats, logits = model(x, is_feat=True, preact=preact)
            out[f"logits(preact={preact})"] = logits
            out.update({f"feats[{i}](preact={preact})": f for i, f in enumerate(feats)})
    return out


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def assert_outputs_close(got: dict, expected: dict, rtol: float, msg: str) -> None:
    """Every output within ``rtol`` of its tensor's largest value (entries near zero in a map whose
    values reach tens carry the rounding of the large ones)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert_close(got[key], value, rtol=rtol, msg=f"{msg} {key}")


def block_scales(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """For each entry (a parameter's gradient, a state tensor), the largest value of its block
    (the parent of its module): the size of the numbers it is computed with. A bias that feeds a
    training-mode BatchNorm has a zero gradient up to rounding (the BN removes the mean), of the
    size of its block's gradients (the BN's own bias gets the same sum without the cancellation)."""
    largest: dict[str, float] = {}
    for key, t in tensors.items():
        block = key.rsplit(".", 2)[0]
        largest[block] = max(largest.get(block, 0.0), float(t.abs().max()))
    return {key: largest[key.rsplit(".", 2)[0]] for key in tensors}


@pytest.mark.parametrize("name", list(model_dict))
def test_folded_model_equals_unfolded(name):
    torch.manual_seed(0)
    size = input_size(name)
    model = randomize_batchnorm(build_model(name, num_classes=10), size)
    model64 = copy.deepcopy(model).double()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))  # eval mode: one image will do
    x64 = x[:, :, : size // 2, : size // 2].double()  # float64 convolutions are slow on the CPU
    expected, expected64 = all_outputs(model, x), all_outputs(model64, x64)
    before = bn_names(model)
    assert fold_batchnorm(model, x) is model
    fold_batchnorm(model64, x64)
    # exact in eval mode: in float64 the folded network computes the same numbers
    assert_outputs_close(all_outputs(model64, x64), expected64, FP64, name)
    # in float32 both compute them up to rounding (which deep nets amplify to ~1e-5 of the largest value)
    assert_outputs_close(all_outputs(model, x), expected, FP32_DEEP, name)
    left = bn_names(model)
    assert bn_names(model64) == left and set(left) < set(before)
    pattern = UNFOLDABLE.get(name)
    if pattern is None:  # every BatchNorm of these models follows its convolution
        assert left == [], left
    else:
        assert left and all(pattern.search(n) for n in left), left


def test_wrn_folds_the_bn_between_its_two_convolutions():
    model = randomize_batchnorm(build_model("wrn_16_2", num_classes=10), 32)
    pairs = {(p.conv, p.bn) for p in find_foldable(model)}
    assert ("block1.layer.0.conv1", "block1.layer.0.bn2") in pairs
    # the stem conv's output is a feature and the shortcut: block1's first bn1 stays
    assert not any(bn == "block1.layer.0.bn1" for _, bn in pairs)


class Toy(nn.Module):
    """Three conv-BN pairs that must not be folded and one that must."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)  # output also returned
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)  # in-place ReLU between
        self.conv_c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # BN also applied elsewhere
        self.conv_d, self.bn_d = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # foldable

    def forward(self, x, is_feat=False, preact=False):
        a = self.conv_a(x)
        h = self.bn_a(a)
        h = self.bn_b(torch.relu_(self.conv_b(h)))
        h = self.bn_c(self.conv_c(h)) + self.bn_c(h)
        h = self.bn_d(self.conv_d(h))
        logits = h.mean((2, 3))
        return ([a, h], logits) if is_feat else logits


def test_only_batchnorms_that_read_a_convolution_alone_are_folded():
    model = randomize_batchnorm(Toy(), 8)
    x = torch.randn(2, 3, 8, 8)
    expected = all_outputs(model, x)
    assert [(p.conv, p.bn) for p in find_foldable(model, x)] == [("conv_d", "bn_d")]
    fold_batchnorm(model, x)
    assert isinstance(model.bn_d, nn.Identity) and model.conv_d.bias is not None
    assert bn_names(model) == ["bn_a", "bn_b", "bn_c"]
    assert_outputs_close(all_outputs(model, x), expected, FP32, "toy")


class HiddenReference(nn.Module):
    """Calls its BN through a plain list, which folding cannot rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.bns = [self.bn]

    def forward(self, x):
        return self.bns[0](self.conv(x)).mean((2, 3))


def test_a_fold_that_changes_the_outputs_is_undone():
    model = randomize_batchnorm(HiddenReference(), 8)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match="left unfolded"):
        fold_batchnorm(model, x)
    assert model.bn is model.bns[0] and model.conv.bias is not None
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_folding_needs_eval_mode_and_leaves_the_global_rng_alone():
    model = build_model("resnet8", num_classes=10)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model)
    state = torch.get_rng_state()
    fold_batchnorm(model.eval())
    assert torch.equal(torch.get_rng_state(), state)
    assert bn_names(model) == []


def test_folding_a_conv_without_bias_gives_it_one():
    model = randomize_batchnorm(build_model("resnet8", num_classes=10), 32)
    assert model.conv1.bias is None
    fold_batchnorm(model)
    assert isinstance(model.conv1.bias, nn.Parameter) and model.conv1.bias.dtype == model.conv1.weight.dtype


def tiny_validation_set(model: nn.Module, classes: int = 10, n: int = 48) -> DataLoader:
    """Images labelled by ``model`` for half of them and at random for the rest."""
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    with torch.no_grad():
        labels = model(images).argmax(1)
    labels[n // 2:] = torch.randint(0, classes, (n - n // 2,), generator=gen)
    return DataLoader(TensorDataset(images, labels), batch_size=16)


@pytest.mark.parametrize("channels_last", [False, True])
def test_prepared_teacher_has_the_same_accuracy(channels_last):
    teacher = randomize_batchnorm(build_model("resnet14", num_classes=10), 32)
    loader = tiny_validation_set(teacher)
    expected = evaluate(teacher, loader, CPU.device, CPU)
    runtime = Runtime(torch.device("cpu"), channels_last=channels_last)
    sample = runtime.to_device(next(iter(loader))[0][:2])
    prepared = prepare_teacher(copy.deepcopy(teacher), runtime, sample)
    assert not prepared.training and not any(p.requires_grad for p in prepared.parameters())
    assert bn_names(prepared) == []
    assert prepared.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # always on the fast path
    got = evaluate(prepared, loader, runtime.device, runtime)
    assert 0 < expected["test_acc"] < 100
    assert got["test_acc"] == expected["test_acc"] and got["test_acc_top5"] == expected["test_acc_top5"]
    assert got["test_loss"] == approx(expected["test_loss"], rtol=FP32)


def test_plain_teacher_keeps_the_batchnorms_and_the_memory_format():
    teacher = prepare_teacher(build_model("resnet8", num_classes=10), CPU, fast=False)
    assert len(bn_names(teacher)) == 9 and not teacher.training
    assert teacher.conv1.weight.is_contiguous()


B, N_DATA, K, CLASSES = 4, 32, 8, 5


def make_run(method: str, fold: bool = False):
    """Student, teacher and one Distiller from fixed seeds, and a batch of B samples."""
    opt = train_student.parse_option(["--path_t", "unused.pth", "--distill", method, "--model_s", "resnet8",
                                      "--nce_k", str(K), "--dataset", "synthetic", "--device", "cpu",
                                      "-a", "1", "-b", "0.8"])
    gen = torch.Generator().manual_seed(7)
    img = torch.randn(B, 3, 32, 32, generator=gen)
    target = torch.randint(0, CLASSES, (B,), generator=gen)
    index = torch.randperm(N_DATA, generator=gen)[:B]
    contrast_idx = torch.cat([index[:, None], torch.randint(0, N_DATA, (B, K), generator=gen)], 1)
    torch.manual_seed(0)
    student = build_model("resnet8", num_classes=CLASSES)
    teacher = randomize_batchnorm(build_model("resnet14", num_classes=CLASSES), 32, seed=5)
    teacher = prepare_teacher(teacher, CPU, img[:2], fast=fold)
    options = options_from(get_method(method).Options, opt)
    distiller = build_distiller(method, options, student, teacher, img[:2], n_data=N_DATA, model_s=opt.model_s)
    return opt, student, teacher, distiller, Batch(img, target, index, contrast_idx)


def no_grad_reference(opt, student, teacher, distiller, batch):
    """The loss terms as DistillStep computed them with the teacher under torch.no_grad."""
    preact_s, preact_t = distiller.preacts()
    feats_s, logits_s = student(batch.img, is_feat=True, preact=preact_s)
    with torch.no_grad():
        t = NetOutput(*teacher(batch.img, is_feat=True, preact=preact_t))
    terms = {"ce": opt.gamma * F.cross_entropy(logits_s, batch.target),
             "kd": opt.alpha * DistillKL(opt.kd_T)(logits_s, t.logits)}
    terms.update({k: opt.beta * v for k, v in distiller(NetOutput(feats_s, logits_s), t, batch).items()})
    return terms


def step_result(method: str, inference: bool, fold: bool = False, trained_paraphraser: bool = False):
    opt, student, teacher, distiller, batch = make_run(method, fold)
    if trained_paraphraser:
        distiller.after_init_stage()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    if inference:
        step = DistillStep(student, [teacher], nn.ModuleList([distiller]), (opt.gamma, opt.alpha, opt.beta),
                           opt.kd_T, CPU).train()
        _, _, terms = step(batch)
    else:
        student.train(), distiller.train()
        terms = no_grad_reference(opt, student, teacher, distiller, batch)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key
    grads = {f"student.{n}": p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    grads.update({f"distiller.{n}": p.grad.clone() for n, p in distiller.named_parameters() if p.grad is not None})
    return {k: v.detach() for k, v in terms.items()}, grads, distiller.state_dict()


@pytest.mark.parametrize("method, trained_paraphraser", [
    ("kd", False), ("hint", False), ("correlation", False), ("vid", False), ("crd", False),
    ("factor", False), ("factor", True), ("attention", False), ("reviewkd", False)])
def test_inference_mode_step_equals_no_grad_step(method, trained_paraphraser):
    ref_terms, ref_grads, ref_state = step_result(method, False, trained_paraphraser=trained_paraphraser)
    terms, grads, state = step_result(method, True, trained_paraphraser=trained_paraphraser)
    assert terms.keys() == ref_terms.keys() and len(terms) >= 2
    for key, value in ref_terms.items():
        assert_close(terms[key], value, rtol=FP32_EXACT, msg=key)
    assert grads.keys() == ref_grads.keys()
    assert any(k.startswith("distiller.") for k in grads) == (method not in ("kd", "attention"))
    scales = block_scales(ref_grads)
    for key, value in ref_grads.items():
        assert_close(grads[key], value, rtol=FP32_EXACT, scale=scales[key], msg=key)
    floats = {key: value for key, value in ref_state.items() if value.is_floating_point()}
    scales = block_scales(floats)
    for key, value in ref_state.items():  # e.g. CRD's memory banks moved the same way
        if key not in floats:
            assert torch.equal(state[key], value), key
        elif value.any():
            assert_close(state[key], value, rtol=FP32_EXACT, msg=key)
        else:  # a zero buffer (an untouched bias): its block's size
            assert_close(state[key], value, rtol=FP32_EXACT, scale=scales[key], msg=key)


@pytest.mark.parametrize("method", ["hint", "crd", "correlation", "factor", "reviewkd"])
def test_folded_teacher_gives_the_same_step(method):
    # factor as in its main stage: the paraphraser pre-trained and frozen
    ref_terms, ref_grads, _ = step_result(method, False, fold=False, trained_paraphraser=method == "factor")
    terms, grads, _ = step_result(method, True, fold=True, trained_paraphraser=method == "factor")
    for key, value in ref_terms.items():
        assert_close(terms[key], value, rtol=FP32_DEEP, msg=key)
    assert grads.keys() == ref_grads.keys()
    scales = block_scales(ref_grads)
    for key, value in ref_grads.items():  # float rounding only (some biases feeding a BN have ~0 gradient)
        assert_close(grads[key], value, rtol=FP32_DEEP_GRAD, scale=scales[key], msg=key)


def test_teacher_outputs_reach_the_distillers_as_ordinary_tensors():
    model = build_model("resnet8", num_classes=CLASSES).eval()
    with torch.inference_mode():
        out = NetOutput(*model(torch.randn(2, 3, 32, 32), is_feat=True))
    assert out.logits.is_inference()
    ordinary = ordinary_tensors(out)
    assert not ordinary.logits.is_inference() and not any(f.is_inference() for f in ordinary.feats)
    assert not ordinary.logits.requires_grad
    assert torch.equal(ordinary.logits, out.logits)
