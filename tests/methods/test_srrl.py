"""SRRL (Yang et al., ICLR 2021): the distillers repository's golden, the teacher's classifier kept
frozen and out of the method's state, the refusal and the flags (every pair of the tables and the
train_student runs: test_table_pairs.py)."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

import train_student
from common.errors import UserError
from distiller_zoo.registry import Batch, BuildContext, NetOutput, NoOptions
from distiller_zoo.SRRL import SRRL, SRRLLoss
from engine.methods import get_method
from tests import goldens

pytestmark = pytest.mark.numeric


def test_matches_distillers_golden():
    """Both terms, their sum, the prediction through the teacher's classifier, every gradient
    (the state_dict names are the reference's) and the BatchNorm buffers after the call."""
    entry = goldens.method("SRRL")
    x = goldens.inputs(entry)
    srrl = SRRLLoss(256, 256)
    srrl.load_state_dict(goldens.state(entry), strict=True)
    srrl.train()
    f_s = x["s_pool"].requires_grad_(True)
    weight, bias = x["t_fc_weight"].requires_grad_(True), x["t_fc_bias"].requires_grad_(True)
    fm, sr, pred = srrl(f_s, x["t_pool"], x["t_logits"], weight, bias)
    out = entry["outputs"]
    for got, name in ((fm, "loss_feat"), (sr, "loss_logit"), (fm + sr, "loss")):
        goldens.assert_matches(got, torch.tensor(out[name]), rtol=1e-4, what=name)
    goldens.assert_matches(pred, out["pred_feat_s"], rtol=1e-4, what="pred_feat_s")
    (fm + sr).backward()
    params = dict(srrl.named_parameters())
    for name, want in entry["grads"].items():
        got = f_s.grad if name == "s_pool" else params[name].grad
        goldens.assert_matches(got, want, rtol=1e-3, what=name)
    assert weight.grad is None and bias.grad is None, "the teacher's classifier got a gradient"
    state = srrl.state_dict()
    for name, want in entry["state_after"].items():
        goldens.assert_matches(state[name].float(), want.float(), rtol=1e-4, what=name)


def test_terms_match_their_definition():
    torch.manual_seed(1)
    srrl = SRRLLoss(6, 4).train()
    f_s, f_t, z_t = torch.randn(5, 6), torch.randn(5, 4), torch.randn(5, 3)
    w, b = torch.randn(3, 4), torch.randn(3)
    fm, sr, pred = srrl(f_s, f_t, z_t, w, b)
    conv, bn = srrl.transfer[0].weight.view(4, 6), srrl.transfer[1]
    h = f_s @ conv.t()
    h = ((h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias).relu()
    goldens.assert_matches(fm, ((h - f_t) ** 2).mean(), rtol=1e-5)
    goldens.assert_matches(sr, ((h @ w.t() + b - z_t) ** 2).mean(), rtol=1e-5)


class _Widened(nn.Module):
    """A network whose last linear layer does not read its feats[-1]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)


def test_refuses_a_teacher_whose_classifier_does_not_read_its_features():
    ctx = BuildContext((torch.Size([2, 4]),), (torch.Size([2, 6]),), 3)
    distiller = SRRL(NoOptions(), ctx)
    with pytest.raises(UserError, match="srrl needs the teacher's logits = Linear"):
        distiller.bind(_Widened(), _Widened())
    with pytest.raises(RuntimeError, match="bind"):
        distiller(NetOutput([torch.randn(2, 4)], torch.randn(2, 3)), NetOutput([torch.randn(2, 6)], torch.randn(2, 3)),
                  Batch(torch.randn(2, 3, 4, 4), torch.tensor([0, 1])))


def test_published_weights():
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "srrl"])
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 1.0, 1.0)
    assert get_method("srrl").weights == (1.0, 1.0, 1.0) and not get_method("srrl").preact
