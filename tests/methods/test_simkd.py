"""SimKD (Chen et al., CVPR 2022): the distillers repository's golden (the loss, the projected map,
the prediction through the teacher's classifier, every gradient, the BatchNorm buffers), the
spatial alignment, every pair of test_losses, the refusals, the flags, and the inference head end
to end: saved with the student, validated with it, rebuilt by eval_student.py (same top-1 as the
run's last validation) and probed by transfer_student.py; a corrupt head entry is one UserError."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval_student
import train_student
import transfer_student
from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import UserError
from distiller_zoo.heads import HeadedNetwork, head_entry, head_from_entry, network_with_head
from distiller_zoo.registry import Batch, BuildContext, NetOutput
from distiller_zoo.SimKD import SimKD, SimKDHead, SimKDOptions, simkd_projector
from engine.methods import get_method
from models import build_model
from tests import goldens
from tests.datagen import SYNTHETIC
from tests.methods.test_losses import PAIR_IDS, pairs  # noqa: F401  (the module-scoped fixture)

pytestmark = pytest.mark.numeric


def _golden_head() -> tuple[dict, dict, SimKDHead]:
    """The reference's state loaded into our projector (the names differ by the prefix
    ``transfer.``: the golden's module is the projector's owner), the teacher's Linear(256, 100)."""
    entry = goldens.method("SimKD")
    x = goldens.inputs(entry)
    transfer = simkd_projector(256, 256, 2)
    transfer.load_state_dict({name.removeprefix("transfer."): value for name, value in goldens.state(entry).items()},
                             strict=True)
    classifier = nn.Linear(256, 100)
    with torch.no_grad():
        classifier.weight.copy_(x["t_fc_weight"])
        classifier.bias.copy_(x["t_fc_bias"])
    classifier.requires_grad_(False)
    return entry, x, SimKDHead(transfer, classifier, None).train()


def test_matches_distillers_golden():
    """The reference configuration (-f 2, maps of equal size): loss, projected map, prediction,
    every gradient and the BatchNorm buffers after the call."""
    entry, x, head = _golden_head()
    f_s = x["s_feat3"].requires_grad_(True)
    out = head([f_s, f_s.mean(dim=(2, 3))])
    loss = SimKD.loss(out.maps, x["t_feat3"])
    want = entry["outputs"]
    goldens.assert_matches(loss, torch.tensor(want["loss"]), rtol=1e-4, what="loss")
    goldens.assert_matches(out.maps, want["trans_feat_s"], rtol=1e-4, what="trans_feat_s")
    goldens.assert_matches(out.logits, want["pred_feat_s"], rtol=1e-4, what="pred_feat_s")
    loss.backward()
    params = {f"transfer.{name}": p for name, p in head.transfer.named_parameters()}
    assert set(entry["grads"]) == {"s_feat3", *params}
    for name, grad in entry["grads"].items():
        got = f_s.grad if name == "s_feat3" else params[name].grad
        goldens.assert_matches(got, grad, rtol=1e-3, what=name)
    state = {f"transfer.{name}": value for name, value in head.transfer.state_dict().items()}
    for name, value in entry["state_after"].items():
        goldens.assert_matches(state[name].float(), value.float(), rtol=1e-4, what=name)
    assert all(p.grad is None for p in head.classifier.parameters()), "the teacher's classifier got a gradient"


def test_distiller_uses_the_golden_head_and_feats_minus_two():
    """The Distiller on NetOutputs (feats[-2] read, the head's output reused from the step when
    given) gives the golden loss."""
    entry, x, head = _golden_head()
    ctx = BuildContext((torch.Size([8, 256, 8, 8]), torch.Size([8, 256])),
                       (torch.Size([8, 256, 8, 8]), torch.Size([8, 256])), 100)
    distiller = SimKD(SimKDOptions(), ctx)
    distiller.transfer.load_state_dict(head.transfer.state_dict())
    teacher = nn.Sequential(nn.Conv2d(3, 256, 1), nn.Linear(256, 100))
    teacher[1].load_state_dict(head.classifier.state_dict())
    distiller.bind(nn.Identity(), teacher)
    s = NetOutput([x["s_feat3"], x["s_feat3"].mean(dim=(2, 3))], torch.zeros(8, 100))
    t = NetOutput([x["t_feat3"], x["t_feat3"].mean(dim=(2, 3))], torch.zeros(8, 100))
    terms = distiller.train()(s, t, Batch(torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)))
    assert list(terms) == ["simkd"]
    goldens.assert_matches(terms["simkd"], torch.tensor(entry["outputs"]["loss"]), rtol=1e-4)


@pytest.mark.parametrize("s_size,t_size", [(8, 4), (4, 8), (6, 6)])
def test_spatial_alignment_pools_the_larger_map(s_size, t_size):
    """Where the sizes differ the larger map is average-pooled to the smaller one's (the student's
    before the projector, the teacher's target after); the loss is the mean squared difference."""
    torch.manual_seed(0)
    ctx = BuildContext((torch.Size([2, 6, s_size, s_size]), torch.Size([2, 6])),
                       (torch.Size([2, 8, t_size, t_size]), torch.Size([2, 8])), 3)
    distiller = SimKD(SimKDOptions(simkd_factor=4), ctx)
    distiller.bind(nn.Identity(), nn.Linear(8, 3))
    assert distiller.transfer[0].out_channels == 2 and distiller.transfer[6].out_channels == 8
    f_s, f_t = torch.rand(2, 6, s_size, s_size), torch.rand(2, 8, t_size, t_size)
    out = distiller.inference_head()([f_s, f_s.mean(dim=(2, 3))])
    small = min(s_size, t_size)
    expected = distiller.transfer(F.adaptive_avg_pool2d(f_s, small))
    torch.testing.assert_close(out.maps, expected)
    goldens.assert_matches(SimKD.loss(out.maps, f_t), ((expected - F.adaptive_avg_pool2d(f_t, small)) ** 2).mean(),
                           rtol=1e-5)
    torch.testing.assert_close(out.logits, distiller.inference_head().classifier(expected.mean(dim=(2, 3))))


def test_refusals():
    """A pair it cannot serve is refused at build time with one line: features that are not maps,
    a teacher classifier that does not read C_t features, a factor that leaves no channel."""
    flat = BuildContext((torch.Size([2, 4]), torch.Size([2, 4])), (torch.Size([2, 8, 4, 4]), torch.Size([2, 8])), 3)
    with pytest.raises(UserError, match="simkd needs the last stage feature maps"):
        SimKD(SimKDOptions(), flat)
    ctx = BuildContext((torch.Size([2, 4, 4, 4]), torch.Size([2, 4])), (torch.Size([2, 8, 4, 4]), torch.Size([2, 8])), 3)
    with pytest.raises(UserError, match="reuses the teacher's classifier"):
        SimKD(SimKDOptions(), ctx).bind(nn.Identity(), nn.Linear(16, 3))
    with pytest.raises(UserError, match="leaves no channel"):
        SimKD(SimKDOptions(simkd_factor=9), ctx)
    with pytest.raises(RuntimeError, match="bind"):
        SimKD(SimKDOptions(), ctx)(NetOutput([torch.rand(2, 4, 4, 4), torch.rand(2, 4)], torch.rand(2, 3)),
                                   NetOutput([torch.rand(2, 8, 4, 4), torch.rand(2, 8)], torch.rand(2, 3)),
                                   Batch(torch.rand(2, 3, 8, 8), torch.tensor([0, 1])))


def test_published_weights_and_flag():
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "simkd"])
    assert (opt.gamma, opt.alpha, opt.beta) == (0.0, 0.0, 1.0) and opt.simkd_factor == 2
    assert get_method("simkd").weights == (0.0, 0.0, 1.0) and not get_method("simkd").preact
    assert train_student.parse_option(["--path_t", "t.pth", "--distill", "simkd", "--simkd_factor", "4"]).simkd_factor == 4
    with pytest.raises(SystemExit):
        train_student.parse_option(["--path_t", "t.pth", "--distill", "simkd", "--simkd_factor", "0"])


def test_head_entry_round_trip_and_corrupt_entries(tmp_path):
    """The entry is plain types + tensors (weights_only loads it) and rebuilds the same network;
    a missing part, an unknown kind or weights of another shape are one UserError line."""
    torch.manual_seed(0)
    student = build_model("resnet8", num_classes=4)
    teacher = build_model("resnet8", num_classes=4)
    ctx = BuildContext.probe(student, teacher, torch.rand(2, 3, 32, 32))
    distiller = SimKD(SimKDOptions(), ctx)
    distiller.bind(student, teacher)
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": student.state_dict(), "head": head_entry(distiller.inference_head())}, path)
    state = torch.load(path, weights_only=True)
    rebuilt = network_with_head(build_model("resnet8", num_classes=4), state, "ckpt")
    rebuilt.backbone.load_state_dict(student.state_dict())
    x = torch.rand(3, 3, 32, 32)
    reference = HeadedNetwork(student, distiller.inference_head()).eval()
    torch.testing.assert_close(rebuilt.eval()(x), reference(x))
    feats, _ = rebuilt(x, is_feat=True)
    assert feats[-1].shape == (3, 64)  # the head's feature: the teacher's width
    assert network_with_head(student, {"model": {}}, "plain") is student
    bad = [state["head"] | {"kind": "nope"}, {"kind": "simkd"}, "junk",
           state["head"] | {"config": {"s_channels": 1}},
           state["head"] | {"state": {k: v[:1] if v.dim() else v for k, v in state["head"]["state"].items()}},
           state["head"] | {"state": "junk"}]
    for entry in bad:
        with pytest.raises(UserError) as err:
            head_from_entry(entry, "'ckpt'")
        assert "\n" not in str(err.value)


def test_several_teachers_are_refused(pairs):  # noqa: F811
    from common.runtime import Runtime
    from distiller_zoo.step import DistillStep
    pair = pairs[PAIR_IDS[0]]
    distillers = nn.ModuleList([pair.build("simkd"), pair.build("simkd")])
    with pytest.raises(UserError, match="one --path_t"):
        DistillStep(pair.student, [pair.teacher, pair.teacher], distillers, (0, 0, 1), 4, Runtime(torch.device("cpu")))


@pytest.mark.e2e
def test_head_end_to_end(teacher, tmp_path, monkeypatch):
    """train_student --distill simkd (2 steps): the history's test top-1 is the head's; the
    checkpoints keep RepDistiller's 'model' (the backbone) and add 'head'; eval_student on
    _best.pth gives the run's last validation; transfer_student probes the head's feature; a
    resume restores the head exactly; a checkpoint with a broken head is one UserError."""
    results = train_student.main(["--path_t", str(teacher), "--model_s", "resnet8", "--distill", "simkd",
                                  *SYNTHETIC, "--max_steps", "2", "--epochs", "1", "--save_folder", str(tmp_path)])
    assert results["steps"] == 2
    history = results["history"][-1]
    assert math.isfinite(history["loss_simkd"]) and "loss_ce" not in history
    folder = next(tmp_path.glob("S:resnet8_T:resnet8_synthetic_simkd_*"))
    best, last = folder / "resnet8_best.pth", folder / "resnet8_last.pth"
    state = load_checkpoint(best)
    assert set(state["head"]) == {"kind", "config", "state"} and state["head"]["kind"] == "simkd"
    backbone = build_model("resnet8", num_classes=4)
    backbone.load_state_dict(state["model"])  # RepDistiller's layout, unchanged
    # the head's trained parts are the distiller's, the frozen classifier the teacher's
    head_state = state["head"]["state"]
    for name, value in state["distiller"].items():
        assert torch.equal(head_state[name], value)
    teacher_fc = load_checkpoint(teacher)["model"]
    assert torch.equal(head_state["classifier.weight"], teacher_fc["fc.weight"])

    tested = eval_student.main(["--path", str(best), "--synthetic_classes", "4", "--synthetic_train", "16",
                                "--synthetic_test", "4", "--num_workers", "0", "--device", "cpu"])
    assert tested["test_acc"] == pytest.approx(history["test_acc"], abs=1e-9)
    assert tested["test_loss"] == pytest.approx(history["test_loss"], rel=1e-5)

    probed = []

    def spy(model, state, source):
        probed.append(network_with_head(model, state, source))
        return probed[-1]

    monkeypatch.setattr(transfer_student, "network_with_head", spy)
    transfer_student.main(["--path_s", str(best), "--dataset", "synthetic", "--synthetic_classes", "4",
                                   "--synthetic_train", "16", "--synthetic_test", "4", "--num_workers", "0",
                                   "--device", "cpu", "--epochs", "1", "--batch_size", "8", "--no_augment",
                                   "--save_folder", str(tmp_path / "probe")])
    assert len(probed) == 1 and isinstance(probed[0], HeadedNetwork)  # the probe reads the head's feature
    args = json.loads(next((tmp_path / "probe").glob("*/results.json")).read_text())
    assert args["recipe"]["feat_dim"] == head_state["classifier.weight"].shape[1]  # the teacher's width
    x = torch.rand(2, 3, 32, 32)
    feats, logits = probed[0](x, is_feat=True)  # folded and frozen, as the probe ran it
    headed = network_with_head(backbone.eval(), state, "best").eval()
    torch.testing.assert_close(feats[-1], headed.head(backbone(x, is_feat=True)[0]).feature, rtol=1e-4, atol=1e-5)

    # resume: the run continues to 3 steps from _last.pth; its head is the distiller's restored state
    resumed = train_student.main(["--path_t", str(teacher), "--model_s", "resnet8", "--distill", "simkd",
                                  *SYNTHETIC, "--max_steps", "3", "--epochs", "1", "--save_folder", str(tmp_path),
                                  "--resume", "auto"])
    assert resumed["steps"] == 3
    after = load_checkpoint(last)
    for name, value in after["distiller"].items():
        assert torch.equal(after["head"]["state"][name], value)

    broken = dict(state)
    broken["head"] = {"kind": "simkd", "config": state["head"]["config"]}
    save_checkpoint(broken, tmp_path / "broken.pth")
    with pytest.raises(SystemExit):
        eval_student.main(["--path", str(tmp_path / "broken.pth"), "--synthetic_classes", "4", "--num_workers", "0",
                           "--device", "cpu"])
