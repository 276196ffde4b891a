"""SemCKD (Chen et al., AAAI 2021): the distillers repository's golden (state names mapped to ours, its
unused MLPEmbed.regressor left out), the paper's definition, a smaller last batch (padded by
default, skipped with --semckd_small_batch skip), the refusals, the flags and an epoch with a
smaller last batch (every pair of the tables and the train_student runs: test_table_pairs.py)."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import train_student
from common.errors import UserError
from distiller_zoo.registry import BuildContext
from distiller_zoo.SemCKD import SemCKDDistiller, SemCKDLoss, SemCKDOptions
from engine.methods import get_method
from tests import goldens
from tests.datagen import SYNTHETIC

pytestmark = pytest.mark.numeric


def ours(name: str) -> str | None:
    """Our SemCKDLoss state name of the reference SelfA's ``name`` (None: the unused MLPEmbed.regressor)."""
    m = re.fullmatch(r"(query|key)_(\d+)\.(.+)", name)
    if m:
        return None if m.group(3).startswith("regressor.") else f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(r"regressor(\d)(\d)\.(.+)", name)
    assert m, name
    return f"proj.{m.group(1)}.{m.group(2)}.{m.group(3)}"


def _golden_module(entry) -> SemCKDLoss:
    loss = SemCKDLoss(8, [64, 128, 256], [64, 128, 256], soft=1.0, factor=4, small_batch="skip")
    state = {ours(k): v for k, v in goldens.state(entry).items() if ours(k) is not None}
    loss.load_state_dict(state, strict=True)
    return loss.train()


def test_matches_distillers_golden():
    """The loss (before the 400 weight), the attention, every listed gradient (inputs and
    parameters, by the reference's names) and the BatchNorm buffers after the call; the
    reference configuration (a full batch: 'pad' and 'skip' agree)."""
    entry = goldens.method("SemCKD")
    x = goldens.inputs(entry)
    loss = _golden_module(entry)
    feats_s = [x[f"s_feat{i}"].requires_grad_(True) for i in (1, 2, 3)]
    feats_t = [x[f"t_feat{i}"] for i in (1, 2, 3)]
    with torch.no_grad():
        goldens.assert_matches(loss.attention(feats_s, feats_t), entry["outputs"]["attention"], rtol=1e-4,
                               what="attention")
    value = loss(feats_s, feats_t)
    errs = {"loss": goldens.assert_matches(value, torch.tensor(entry["outputs"]["loss"]), rtol=1e-4, what="loss")}
    value.backward()
    params = dict(loss.named_parameters())
    for name, want in entry["grads"].items():
        got = feats_s[int(name[-1]) - 1].grad if name.startswith("s_feat") else params[ours(name)].grad
        errs[name] = goldens.assert_matches(got, want, rtol=1e-3, what=name)
    state = loss.state_dict()
    for name, want in entry["state_after"].items():
        goldens.assert_matches(state[ours(name)].float(), want.float(), rtol=1e-4, what=name)
    assert len(entry["grads"]) == 3 + 8 * 3 + 7 * 9


def test_matches_the_paper_definition():
    """A direct evaluation of the paper's equations on a full batch (the default, 'pad')."""
    torch.manual_seed(3)
    loss = SemCKDLoss(8, [4, 6], [5, 3, 7]).eval()
    fs = [torch.randn(8, 4, 8, 8).relu(), torch.randn(8, 6, 4, 4).relu()]
    ft = [torch.randn(8, 5, 8, 8).relu(), torch.randn(8, 3, 4, 4).relu(), torch.randn(8, 7, 2, 2).relu()]

    def embed(mlp, f):
        a = f.flatten(1) @ f.flatten(1).t()
        return F.normalize(mlp.linear2(mlp.linear1(a).relu()), dim=1)

    q = torch.stack([embed(m, f) for m, f in zip(loss.query, fs)], 1)
    k = torch.stack([embed(m, f) for m, f in zip(loss.key, ft)], 1)
    alpha = torch.einsum("bld,bmd->blm", q, k).softmax(-1)
    total = 0.0
    for i, f_s in enumerate(fs):
        for j, f_t in enumerate(ft):
            size = min(f_s.shape[2], f_t.shape[2])
            d = loss.proj[i][j](F.adaptive_avg_pool2d(f_s, size)) - F.adaptive_avg_pool2d(f_t, size)
            total = total + (alpha[:, i, j] * d.pow(2).flatten(1).mean(1)).sum()
    goldens.assert_matches(loss(fs, ft), total / (8 * 2), rtol=1e-5)
    assert torch.allclose(alpha.sum(-1), torch.ones(8, 2))


def test_smaller_last_batch_padded_by_default_skipped_as_the_reference():
    """A batch of 5 with a module built for 8: 'pad' (the default) zero-pads the similarity rows
    (= the first 5 columns of psi's first layer), 'skip' gives 0 (the reference skips the batch);
    a larger batch is refused."""
    torch.manual_seed(4)
    pad = SemCKDLoss(8, [4], [6, 5]).eval()
    skip = SemCKDLoss(8, [4], [6, 5], small_batch="skip").eval()
    skip.load_state_dict(pad.state_dict())
    fs = [torch.randn(5, 4, 4, 4, requires_grad=True)]
    ft = [torch.randn(5, 6, 4, 4), torch.randn(5, 5, 2, 2)]
    a = fs[0].flatten(1) @ fs[0].flatten(1).t()
    q = pad.query[0]
    direct = F.normalize(F.linear(F.linear(a, q.linear1.weight[:, :5], q.linear1.bias).relu(),
                                  q.linear2.weight, q.linear2.bias), dim=1)
    assert torch.allclose(q(F.pad(a, (0, 3))), direct, atol=1e-6)
    value = pad(fs, ft)
    assert value > 0 and torch.isfinite(value)
    value.backward()
    assert fs[0].grad.abs().sum() > 0
    zero = skip(fs, ft)
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(UserError, match="built for batches of 8"):
        pad([torch.randn(9, 4, 4, 4)], [torch.randn(9, 6, 4, 4), torch.randn(9, 5, 2, 2)])
    with pytest.raises(UserError, match="semckd_small_batch"):
        SemCKDLoss(8, [4], [6], small_batch="drop")


def test_refusals():
    shapes = (torch.Size([8, 3, 8, 8]), torch.Size([8, 4, 8, 8]), torch.Size([8, 6, 4, 4]), torch.Size([8, 6]))
    with pytest.raises(UserError, match="semckd needs a training batch size of at least 4"):
        SemCKDDistiller(SemCKDOptions(), BuildContext(shapes, shapes, 10))
    with pytest.raises(UserError, match="semckd needs a training batch size of at least 4"):
        SemCKDDistiller(SemCKDOptions(), BuildContext(shapes, shapes, 10, batch_size=2))
    flat = (torch.Size([8, 3]), torch.Size([8, 4]), torch.Size([8, 6]))
    with pytest.raises(UserError, match="semckd needs stage feature maps"):
        SemCKDDistiller(SemCKDOptions(), BuildContext(flat, shapes, 10, batch_size=8))
    assert SemCKDDistiller(SemCKDOptions(), BuildContext(shapes, shapes, 10, batch_size=8)).loss.batch_size == 8


def test_published_weights_and_flag():
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "semckd"])
    assert (opt.gamma, opt.alpha, opt.beta, opt.kd_T) == (1.0, 1.0, 400.0, 4.0)
    assert opt.semckd_small_batch == "pad" and not get_method("semckd").preact
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "semckd", "--semckd_small_batch", "skip"])
    assert opt.semckd_small_batch == "skip"


@pytest.mark.e2e
def test_an_epoch_with_a_smaller_last_batch(teacher, tmp_path):
    """19 samples per class, 4 classes (76) in batches of 8: the last batch of 4 is distilled with padded similarity rows."""
    results = train_student.main(["--path_t", str(teacher), "--model_s", "resnet8", "--distill", "semckd",
                                  *SYNTHETIC, "--synthetic_train", "19", "--epochs", "1",
                                  "--save_folder", str(tmp_path)])
    assert results["steps"] == 10
    assert math.isfinite(results["history"][0]["loss_semckd"])
