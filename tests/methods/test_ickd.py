"""ICKD (Liu et al., ICCV 2021): torchdistill's ChSimLoss + ChannelSimilarityEmbed golden, the paper's
batch mean, the refusal and the flags (every pair of the tables and the train_student runs:
test_table_pairs.py)."""
from __future__ import annotations


import pytest
import torch

import train_student
from common.errors import UserError
from distiller_zoo.ICKD import ICKD, ChannelEmbed, ICKDLoss, ICKDOptions, channel_correlation
from distiller_zoo.registry import BuildContext
from engine.methods import get_method
from tests import goldens

pytestmark = pytest.mark.numeric

# torchdistill's state_dict names -> ours
NAMES = {"conv2d.weight": "conv.weight", "l2norm.weight": "bn.weight", "l2norm.bias": "bn.bias",
         "l2norm.running_mean": "bn.running_mean", "l2norm.running_var": "bn.running_var",
         "l2norm.num_batches_tracked": "bn.num_batches_tracked"}


def _golden_run(batch_squared: bool):
    entry = goldens.method("ICKD")
    x = goldens.inputs(entry)
    embed = ChannelEmbed(256, 256)
    embed.load_state_dict({NAMES[k]: v for k, v in goldens.state(entry).items()}, strict=True)
    embed.train()
    f_s = x["s_feat3"].requires_grad_(True)
    out = embed(f_s)
    loss = ICKDLoss(batch_squared)(out, x["t_feat3"])
    return entry, embed, f_s, out, loss


def test_matches_torchdistill_golden():
    """The reference configuration (``--ickd_batch_squared``): value, embedding, every gradient and
    the BatchNorm buffers after the call."""
    entry, embed, f_s, out, loss = _golden_run(batch_squared=True)
    goldens.assert_matches(loss, torch.tensor(entry["outputs"]["loss"]), rtol=1e-4, what="loss")
    goldens.assert_matches(out, entry["outputs"]["embed_out"], rtol=1e-4, what="embed_out")
    loss.backward()
    params = dict(embed.named_parameters())
    for name, want in entry["grads"].items():
        got = f_s.grad if name == "s_feat3" else params[NAMES[name]].grad
        goldens.assert_matches(got, want, rtol=1e-3, what=name)
    state = embed.state_dict()
    for name, want in entry["state_after"].items():
        goldens.assert_matches(state[NAMES[name]].float(), want.float(), rtol=1e-4, what=name)


def test_paper_reduction_is_the_batch_mean():
    """The default (the paper's per-sample loss averaged over the batch) is B times the reference's
    value, with B times its gradients; and it equals the definition written out per sample."""
    entry, _, f_s, out, ref = _golden_run(batch_squared=True)
    b, c = f_s.shape[:2]
    (grad_ref,) = torch.autograd.grad(ref, f_s, retain_graph=True)
    paper = ICKDLoss()(out, goldens.inputs(entry)["t_feat3"])
    (grad_paper,) = torch.autograd.grad(paper, f_s)
    goldens.assert_matches(paper, ref.detach() * b, rtol=1e-5)
    goldens.assert_matches(grad_paper, grad_ref * b, rtol=1e-5)

    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 5, 4, 4, generator=g), torch.randn(3, 5, 2, 6, generator=g)
    per_sample = []
    for i in range(3):
        gs, gt = s[i].reshape(5, -1) @ s[i].reshape(5, -1).t(), t[i].reshape(5, -1) @ t[i].reshape(5, -1).t()
        gs, gt = gs / gs.norm(dim=1, keepdim=True), gt / gt.norm(dim=1, keepdim=True)
        per_sample.append(((gs - gt) ** 2).sum() / 5)
    goldens.assert_matches(ICKDLoss()(s, t), torch.stack(per_sample).mean(), rtol=1e-5)
    assert channel_correlation(s).shape == (3, 5, 5)
    assert float(ICKDLoss()(s, s)) == pytest.approx(0.0, abs=1e-6)


def test_refuses_a_network_without_a_last_stage_map():
    maps = (torch.Size([2, 16, 8, 8]), torch.Size([2, 16]))
    vectors = (torch.Size([2, 16]), torch.Size([2, 16]))
    with pytest.raises(UserError, match=r"ickd needs a map \[B, C, H, W\] as the student's feats\[-2\]"):
        ICKD(ICKDOptions(), BuildContext(vectors, maps, 10, model_s="mlp"))
    with pytest.raises(UserError, match="teacher's feats"):
        ICKD(ICKDOptions(), BuildContext(maps, vectors, 10))


def test_flags_and_published_weights():
    """The defaults are the authors' CIFAR recipe (1x1 embedding, batch mean, -r 1 -a 0 -b 2.5);
    torchdistill's configuration is reachable with flags."""
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "ickd"])
    assert opt.ickd_batch_squared is False and opt.ickd_kernel == 1
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.0, 2.5)
    assert get_method("ickd").weights == (1.0, 0.0, 2.5) and not get_method("ickd").preact
    ref = train_student.parse_option(["--path_t", "t.pth", "--distill", "ickd", "--ickd_batch_squared",
                                      "--ickd_kernel", "3", "-r", "0.5", "-a", "0.5", "-b", "500", "--kd_T", "1"])
    assert ref.ickd_batch_squared is True and ref.ickd_kernel == 3
    with pytest.raises(SystemExit):
        train_student.parse_option(["--path_t", "t.pth", "--distill", "ickd", "--ickd_kernel", "5"])
    ctx = BuildContext((torch.Size([2, 8, 4, 4]), torch.Size([2, 8])), (torch.Size([2, 16, 2, 2]), torch.Size([2, 16])), 10)
    for kernel in (1, 3):
        conv = ICKD(ICKDOptions(ickd_kernel=kernel), ctx).embed.conv
        assert conv.kernel_size == (kernel, kernel) and conv.padding == (kernel // 2, kernel // 2)
        assert (conv.in_channels, conv.out_channels, conv.bias) == (8, 16, None)

