"""OFD (Heo et al., ICCV 2019): mdistiller's golden (margins, every output, every gradient, the
connectors' BatchNorm buffers), the partial L2 against its definition, the teacher's BatchNorm mode
(the paper's eval, mdistiller's train) through DistillStep, every pair of test_losses, the refusals
and the flags."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_student
from common.errors import UserError
from common.runtime import Runtime
from distiller_zoo.OFD import OFD, OFDOptions, ofd_margin, partial_l2, teacher_margins
from distiller_zoo.registry import Batch, BuildContext, NetOutput, build_distiller
from distiller_zoo.step import DistillStep
from engine.methods import get_method
from models import build_model
from models.teacher import prepare_teacher
from tests import goldens

pytestmark = pytest.mark.numeric

CPU = Runtime(torch.device("cpu"))


def _golden_distiller(entry, x) -> OFD:
    """OFD for the golden's shapes, the reference's connector state loaded and the margins bound
    from a resnet32x4 whose BatchNorms before the stages' last ReLU carry the golden's weights."""
    s_feats = [torch.zeros(8, 64, 32, 32), x["s_preact1"], x["s_preact2"], x["s_preact3"], torch.zeros(8, 256)]
    t_feats = [torch.zeros(8, 64, 32, 32), x["t_preact1"], x["t_preact2"], x["t_preact3"], torch.zeros(8, 256)]
    ctx = BuildContext(tuple(f.shape for f in s_feats), tuple(f.shape for f in t_feats), 100)
    distiller = OFD(OFDOptions(), ctx)
    # names: mdistiller's distiller.connectors.<i>.<0 conv | 1 bn>; ours OFD.connectors, the same layout
    names = {name: name.removeprefix("connectors.") for name in entry["state"]}
    assert set(names.values()) == set(distiller.connectors.state_dict()), "connector names differ"
    distiller.connectors.load_state_dict({names[k]: v for k, v in goldens.state(entry).items()}, strict=True)
    teacher = build_model("resnet32x4", num_classes=100)
    with torch.no_grad():
        for i, bn in enumerate(teacher.get_bn_before_relu(), start=1):
            bn.weight.copy_(x[f"t_bn{i}_weight"])
            bn.bias.copy_(x[f"t_bn{i}_bias"])
    distiller.bind(build_model("resnet8x4", num_classes=100), teacher)
    return distiller


def test_matches_mdistiller_golden():
    entry = goldens.method("OFD")
    x = goldens.inputs(entry)
    out = entry["outputs"]
    distiller = _golden_distiller(entry, x).train()
    for got, want in zip(distiller.loss.margins(), out["margins"]):
        goldens.assert_matches(got, want, rtol=1e-4, what="margin")

    s_stages = [x["s_preact1"].requires_grad_(True), x["s_preact2"].requires_grad_(True),
                x["s_preact3"].requires_grad_(True)]
    logits = x["s_logits"].requires_grad_(True)
    s = NetOutput([torch.zeros(8, 64, 32, 32), *s_stages, torch.zeros(8, 256)], logits)
    t = NetOutput([torch.zeros(8, 64, 32, 32), x["t_preact1"], x["t_preact2"], x["t_preact3"], torch.zeros(8, 256)],
                  torch.zeros(8, 100))
    terms = distiller(s, t, Batch(torch.zeros(8, 3, 32, 32), x["labels"]))
    assert list(terms) == ["ofd"]
    gamma, alpha, beta = OFD.weights
    assert (gamma, alpha, beta) == (entry["config"]["CE_WEIGHT"], 0.0, entry["config"]["FEAT_WEIGHT"])
    loss_ce = gamma * F.cross_entropy(logits, x["labels"])
    loss_kd = beta * terms["ofd"]
    goldens.assert_matches(loss_ce, torch.tensor(out["loss_ce"]), rtol=1e-4, what="loss_ce")
    goldens.assert_matches(loss_kd, torch.tensor(out["loss_kd"]), rtol=1e-4, what="loss_kd")
    goldens.assert_matches(loss_ce + loss_kd, torch.tensor(out["total"]), rtol=1e-4, what="total")
    (loss_ce + loss_kd).backward()

    inputs = {"s_preact1": s_stages[0], "s_preact2": s_stages[1], "s_preact3": s_stages[2], "s_logits": logits}
    params = {f"connectors.{k}": p for k, p in distiller.connectors.named_parameters()}
    assert set(entry["grads"]) == set(inputs) | set(params)
    for name, want in entry["grads"].items():
        got = inputs[name].grad if name in inputs else params[name].grad
        goldens.assert_matches(got, want, rtol=1e-3, what=f"grad {name}")
    with torch.no_grad():  # per stage, unweighted (train-mode BN again: the same batch statistics)
        per_stage = distiller.loss.per_stage(s_stages, [x["t_preact1"], x["t_preact2"], x["t_preact3"]])
    for i, want in enumerate(out["feat_loss_per_stage_unweighted"]):
        goldens.assert_matches(per_stage[i], torch.tensor(want), rtol=1e-4, what=f"feat_loss.{i}")
    # the connectors' BatchNorm buffers after both train-mode forwards (the call and the recompute)
    state = {f"connectors.{k}": v for k, v in distiller.connectors.state_dict().items()}
    for name, want in entry["state_after"].items():
        torch.testing.assert_close(state[name].float(), want.float(), rtol=1e-4, atol=1e-6, msg=name)


def test_margin_is_the_truncated_normal_mean():
    weight, bias = torch.tensor([1.0, -2.0, 0.5, 1.0]), torch.tensor([0.0, 1.0, -0.3, 4.0])
    got = ofd_margin(weight, bias)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    for i in range(3):  # E[x | x < 0] by quadrature of N(bias, |weight|) on x < 0
        mu, sigma = bias[i].double(), weight[i].abs().double()
        xs = torch.linspace(float(torch.minimum(mu, torch.tensor(0.0)) - 12 * sigma), 0.0, 400001,
                            dtype=torch.float64)[:-1]
        density = normal.log_prob((xs - mu) / sigma).exp()
        torch.testing.assert_close(got[i].double(), (xs * density).sum() / density.sum(), rtol=1e-4, atol=1e-5)
    assert got[3] == -3.0  # P(x < 0) = Phi(-4) < 0.001: -3 std
    assert got[0] == pytest.approx(-(2 / torch.pi) ** 0.5, rel=1e-6)


def test_partial_l2_definition():
    """d_p: 0 where S <= T <= 0 (T = max(F_t, m)), else (T - S)^2; summed, averaged over the batch."""
    margin = torch.tensor([-1.0, -0.5]).reshape(1, 2, 1, 1)
    t = torch.tensor([[[[-2.0, -0.2, 0.5]], [[-0.7, -0.1, 1.0]]]])  # [1, 2, 1, 3]
    s = torch.tensor([[[[-3.0, -0.5, 0.0]], [[0.0, 0.3, 1.5]]]])
    want = 0.0 + 0.0 + 0.25 + 0.25 + 0.16 + 0.25  # (-3 <= -1: 0) (-0.5 <= -0.2: 0) (0.5-0)^2; (0-(-0.5))^2, ...
    torch.testing.assert_close(partial_l2(s, t, margin), torch.tensor(want))
    torch.testing.assert_close(partial_l2(torch.cat([s, s]), torch.cat([t, t]), margin), torch.tensor(want))


def test_shufflev2_teacher_margins_cover_its_passthrough_channels():
    teacher = build_model("ShuffleV2", num_classes=10)
    channels = [116, 232, 464]
    margins = teacher_margins(teacher, channels)
    assert [m.numel() for m in margins] == channels
    for m, c in zip(margins, channels):
        assert (m[: c // 2] == 0).all() and (m[c // 2:] < 0).all()
    with pytest.raises(UserError, match="one BatchNorm per teacher stage"):
        teacher_margins(teacher, [116, 232])


def test_refuses_different_numbers_of_stages():
    ctx = BuildContext((torch.Size([2, 4, 8, 8]), torch.Size([2, 4, 8, 8]), torch.Size([2, 4, 4, 4]),
                        torch.Size([2, 4])),
                       (torch.Size([2, 4, 8, 8]), torch.Size([2, 4, 8, 8]), torch.Size([2, 4])), 3,
                       model_s="s", model_t="t")
    with pytest.raises(UserError, match="ofd needs as many stages in the student as in the teacher: s has 2, t 1"):
        OFD(OFDOptions(), ctx)
    student, teacher = build_model("resnet8", num_classes=10), build_model("vgg8", num_classes=10)  # 3 vs 4
    with pytest.raises(UserError, match="as many stages"):
        build_distiller("ofd", None, student, teacher, torch.randn(2, 3, 32, 32))


def test_refuses_a_folded_teacher():
    student, teacher = build_model("resnet8", num_classes=10), build_model("resnet8", num_classes=10)
    prepare_teacher(teacher, CPU, torch.randn(2, 3, 32, 32), fast=True)
    with pytest.raises(UserError, match="folded"):
        build_distiller("ofd", None, student, teacher, torch.randn(2, 3, 32, 32))


def _step(teacher_bn: str):
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", num_classes=10), build_model("resnet20", num_classes=10)
    with torch.no_grad():  # running statistics unlike a batch's, so that the two modes differ
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    sample = torch.randn(4, 3, 32, 32)
    prepare_teacher(teacher, CPU, sample, fast=False)
    distiller = build_distiller("ofd", OFDOptions(ofd_teacher_bn=teacher_bn), student, teacher, sample)
    step = DistillStep(student, [teacher], nn.ModuleList([distiller]), OFD.weights, 4.0, CPU)
    return step, teacher, sample


def test_teacher_bn_mode_paper_eval_vs_reference_train():
    outputs, stats = {}, {}
    for mode in ("eval", "train"):
        step, teacher, sample = _step(mode)
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        step.train()
        assert teacher.training == (mode == "train")
        feats_t = []
        handle = teacher.register_forward_hook(lambda m, a, out: feats_t.append(out[1].detach()))
        _, _, terms = step((sample, torch.tensor([0, 1, 2, 3])))
        handle.remove()
        assert set(terms) == {"ce", "ofd"} and torch.isfinite(terms["ofd"])
        outputs[mode] = feats_t[0]
        after = teacher.state_dict()
        stats[mode] = [k for k in before if not torch.equal(before[k], after[k])]
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
        step.eval()
        assert not teacher.training  # validation: eval mode in both
    assert stats["eval"] == []  # the paper's frozen teacher
    assert stats["train"] and all(k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                                  for k in stats["train"])
    assert not torch.allclose(outputs["eval"], outputs["train"])  # batch statistics change the teacher's output


def test_train_mode_teacher_refuses_a_folded_teacher():
    student, teacher = build_model("resnet8", num_classes=10), build_model("resnet8", num_classes=10)
    sample = torch.randn(2, 3, 32, 32)
    distiller = build_distiller("ofd", OFDOptions(ofd_teacher_bn="train"), student, teacher, sample)
    prepare_teacher(teacher, CPU, sample, fast=True)
    with pytest.raises(UserError, match="--plain_teacher"):
        DistillStep(student, [teacher], nn.ModuleList([distiller]), OFD.weights, 4.0, CPU)


def test_published_weights_and_flag():
    assert get_method("ofd") is OFD and OFD.preacts() == (True, True)
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "ofd"])
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.0, 0.001) and opt.ofd_teacher_bn == "eval"
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "ofd", "--ofd_teacher_bn", "train"])
    assert opt.ofd_teacher_bn == "train"
    with pytest.raises(SystemExit):
        train_student.parse_option(["--path_t", "t.pth", "--distill", "ofd", "--ofd_teacher_bn", "frozen"])
