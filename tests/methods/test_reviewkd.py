"""ReviewKD (Chen et al., CVPR 2021): mdistiller's golden (every output, the ABF outputs, every
gradient, the BatchNorm buffers after the call), the warm-up, the two feature kinds (student after
ReLU, teacher before), the refusal and the flags (every pair of the tables and the train_student
runs: test_table_pairs.py)."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import train_student
from common.errors import UserError
from distiller_zoo.registry import Batch, BuildContext, Distiller, NetOutput
from distiller_zoo.ReviewKD import ReviewKD, ReviewKDOptions, as_map, hcl
from engine.methods import get_method, method_names
from tests import goldens

pytestmark = pytest.mark.numeric

# the golden's state names are relative to mdistiller's distiller.abfs; ours to ReviewKD.abfs (the same
# ModuleList, deepest level first), so each name maps to itself, checked both ways
def _abf_names(entry) -> dict[str, str]:
    return {name: name for name in entry["state"]}


def _golden_run(epoch: int):
    entry = goldens.method("ReviewKD")
    x = goldens.inputs(entry)
    s_feats = [x[f"s_feat{i}"] for i in range(4)] + [x["s_pool"]]
    t_feats = [x[f"t_preact{i}"] for i in range(4)] + [x["t_pool"]]
    ctx = BuildContext(tuple(f.shape for f in s_feats), tuple(f.shape for f in t_feats), 100)
    distiller = ReviewKD(ReviewKDOptions(), ctx)
    ours = distiller.abfs.state_dict()
    names = _abf_names(entry)
    assert set(names.values()) == set(ours), "ABF state names differ from the reference's"
    distiller.abfs.load_state_dict({names[k]: v for k, v in goldens.state(entry).items()}, strict=True)
    distiller.train()
    distiller.start_epoch(epoch)
    for f in s_feats + [x["s_logits"]]:
        f.requires_grad_(True)
    s = NetOutput(s_feats, x["s_logits"])
    t = NetOutput(t_feats, torch.zeros(8, 100))
    terms = distiller(s, t, Batch(torch.zeros(8, 3, 32, 32), x["labels"]))
    gamma, _, beta = ReviewKD.weights
    loss_ce = gamma * F.cross_entropy(s.logits, x["labels"])
    return entry, x, distiller, s, terms, loss_ce, beta * terms["reviewkd"]


def test_matches_mdistiller_golden():
    entry, x, distiller, s, terms, loss_ce, loss_kd = _golden_run(epoch=entry_epoch())
    out = entry["outputs"]
    assert list(terms) == ["reviewkd"]
    goldens.assert_matches(loss_ce, torch.tensor(out["loss_ce"]), rtol=1e-4, what="loss_ce")
    goldens.assert_matches(loss_kd, torch.tensor(out["loss_kd"]), rtol=1e-4, what="loss_kd")
    goldens.assert_matches(loss_ce + loss_kd, torch.tensor(out["total"]), rtol=1e-4, what="total")
    (loss_ce + loss_kd).backward()
    params = dict(distiller.abfs.named_parameters())
    inputs = {"s_feat1": s.feats[1], "s_feat2": s.feats[2], "s_feat3": s.feats[3], "s_pool": s.feats[4],
              "s_logits": s.logits}
    assert set(entry["grads"]) == set(inputs) | set(params)
    for name, want in entry["grads"].items():
        got = inputs[name].grad if name in inputs else params[name].grad
        goldens.assert_matches(got, want, rtol=1e-3, what=name)
    assert entry["grads_absent"] == ["s_feat0"] and s.feats[0].grad is None  # the stem is no level
    state = distiller.abfs.state_dict()
    for name, want in entry["state_after"].items():  # atol 1e-6 (the md's): 0.conv2's batch means are ~1e-8
        torch.testing.assert_close(state[name].float(), want.float(), rtol=1e-4, atol=1e-6, msg=name)

    # the reviewed features and the per-level HCL, recomputed (train mode: BN uses the batch's statistics)
    with torch.no_grad():
        reviewed = distiller.loss.review([as_map(f) for f in s.feats[1:]])
    t_levels = [x["t_preact1"], x["t_preact2"], x["t_preact3"], x["t_pool"][:, :, None, None]]
    for i, (got, want) in enumerate(zip(reviewed, out["abf_outputs"])):
        goldens.assert_matches(got, want, rtol=1e-4, what=f"abf_outputs.{i}")
    per_level = [hcl(f, g) for f, g in zip(reviewed, t_levels)]
    for i, (got, want) in enumerate(zip(per_level, out["hcl_per_stage_unweighted"])):
        goldens.assert_matches(got, torch.tensor(want), rtol=1e-4, what=f"hcl_per_stage_unweighted.{i}")
    goldens.assert_matches(sum(per_level), torch.tensor(out["hcl_total_unweighted"]), rtol=1e-4, what="hcl_total")

def entry_epoch() -> int:
    return int(goldens.method("ReviewKD")["config"]["epoch"])


@pytest.mark.parametrize("epoch", [1, 5, 20, 40])
def test_warmup_matches_golden(epoch):
    entry, *_, loss_kd = _golden_run(epoch)
    want = entry["outputs"]["loss_kd_at_epoch"][str(epoch)]
    goldens.assert_matches(loss_kd, torch.tensor(want), rtol=1e-4, what=f"loss_kd at epoch {epoch}")


def test_warmup_off():
    """``--reviewkd_warmup 0``: the full loss from the first epoch (20 times the warmed-up one)."""
    shapes = (torch.Size([2, 4, 4, 4]), torch.Size([2, 4, 4, 4]), torch.Size([2, 4]))
    ctx = BuildContext(shapes, shapes, 3)
    distiller = ReviewKD(ReviewKDOptions(reviewkd_warmup=0), ctx)
    distiller.start_epoch(1)
    s = NetOutput([torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4)], torch.randn(2, 3))
    distiller_warm = ReviewKD(ReviewKDOptions(), ctx)
    distiller_warm.load_state_dict(distiller.state_dict())
    distiller_warm.start_epoch(1)
    batch = Batch(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
    cold, warm = distiller(s, s, batch)["reviewkd"], distiller_warm(s, s, batch)["reviewkd"]
    torch.testing.assert_close(warm, cold / 20)


def test_hcl_matches_its_definition():
    torch.manual_seed(1)
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    want = (F.mse_loss(a, b) + sum(w * F.mse_loss(F.adaptive_avg_pool2d(a, k), F.adaptive_avg_pool2d(b, k))
                                   for w, k in ((0.5, 4), (0.25, 2), (0.125, 1)))) / 1.875
    torch.testing.assert_close(hcl(a, b), want)
    a, b = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)  # 4x4 and 2x2 levels left out
    want = (F.mse_loss(a, b) + 0.5 * F.mse_loss(a.mean((2, 3)), b.mean((2, 3)))) / 1.5
    torch.testing.assert_close(hcl(a, b), want)


def test_student_after_relu_teacher_before():
    assert ReviewKD.preacts() == (False, True)
    assert Distiller.preacts() == (False, False)
    assert get_method("abound").preacts() == (True, True)
    for name in method_names():  # every other method: one choice for both networks, as before
        cls = get_method(name)
        assert name == "reviewkd" or cls.preacts() == (cls.preact, cls.preact), name


def test_refuses_networks_with_different_numbers_of_levels():
    ctx = BuildContext((torch.Size([2, 4, 8, 8]), torch.Size([2, 4, 4, 4]), torch.Size([2, 4])),
                       (torch.Size([2, 4, 8, 8]), torch.Size([2, 4])), 3, model_s="s", model_t="t")
    with pytest.raises(UserError, match="reviewkd needs as many stages in the student as in the teacher: s has 2"):
        ReviewKD(ReviewKDOptions(), ctx)


def test_published_weights_and_flag():
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "reviewkd"])
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.0, 5.0) and opt.reviewkd_warmup == 20
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "reviewkd", "--reviewkd_warmup", "0"])
    assert opt.reviewkd_warmup == 0
