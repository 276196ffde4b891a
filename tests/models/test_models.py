"""The CIFAR zoo against RepDistiller's own models (tests/fixtures, made with its code)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from common.errors import UserError
from models import build_model, cifar_model_dict, get_classifier, model_dict, resolve_model_name
from tests.tolerance import FP32, FP32_DEEP, assert_close

pytestmark = pytest.mark.numeric

FIXTURES = Path(__file__).parents[1] / "fixtures"
LAYOUTS = json.loads((FIXTURES / "repdistiller_state_dicts.json").read_text())["models"]
OUTPUTS = torch.load(FIXTURES / "repdistiller_model_outputs.pt", weights_only=True)["models"]
CIFAR_NAMES = list(LAYOUTS)


def test_fixture_lists_every_cifar_name():
    assert len(CIFAR_NAMES) == 22
    assert set(CIFAR_NAMES) == set(cifar_model_dict)


def set_reference_weights(model: nn.Module) -> None:
    """The fixture's weight rule (see the 'about' entry of repdistiller_model_outputs.pt)."""
    state = model.state_dict()
    new = {}
    for k, (name, t) in enumerate(state.items()):
        if name.endswith("num_batches_tracked"):
            new[name] = t
            continue
        s = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.37 + k).float().reshape(t.shape)
        module = name.rsplit(".", 1)[0]
        if name.endswith("running_var"):
            new[name] = 1 + 0.2 * s.abs()
        elif name.endswith("running_mean"):
            new[name] = 0.1 * s
        elif t.dim() == 1 and name.endswith("weight") and f"{module}.running_mean" in state:
            new[name] = 0.25 + 0.05 * s
        elif t.dim() == 1:
            new[name] = 0.1 * s
        else:
            new[name] = s / math.sqrt(t[0].numel())
    model.load_state_dict(new, strict=True)


def reference_input() -> torch.Tensor:
    return torch.sin(torch.arange(2 * 3 * 32 * 32, dtype=torch.float64) * 0.011).float().reshape(2, 3, 32, 32)


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_state_dict_layout_and_shapes(name):
    model = build_model(name, num_classes=100)
    layout = LAYOUTS[name]
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, list(s)) for k, s in layout["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == layout["num_params"]
    model.eval()
    with torch.no_grad():
        feats, logits = model(torch.zeros(2, 3, 32, 32), is_feat=True)
    assert [list(f.shape) for f in feats] == layout["feat_shapes"]
    assert list(logits.shape) == layout["logit_shape"]


def _check_summaries(ours: list[torch.Tensor], ref: list[dict]) -> None:
    assert len(ours) == len(ref)
    for i, (t, r) in enumerate(zip(ours, ref)):
        assert list(t.shape) == list(r["shape"]), f"feature {i}"
        # a sum of signed values: the size of its terms is the sum of their absolute values
        assert_close(t.sum().item(), float(r["sum"]), rtol=FP32_DEEP, scale=float(r["abs_sum"]), msg=f"feature {i} sum")
        # the sample's scale: the feature's mean absolute value (a sample of a ReLU map can be all 0)
        assert_close(t.flatten()[::97], r["sample"], rtol=FP32_DEEP, scale=float(r["abs_sum"]) / t.numel(),
                     msg=f"feature {i}")


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_outputs_match_repdistiller(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=100)
    set_reference_weights(model)
    model.eval()
    ref = OUTPUTS[name]
    x = reference_input()
    with torch.no_grad():
        logits = model(x)
        feats, logits_feat = model(x, is_feat=True)
        pre_feats, _ = model(x, is_feat=True, preact=True)
    assert_close(logits, ref["logits"], rtol=FP32_DEEP)
    assert_close(logits_feat, ref["logits"], rtol=FP32_DEEP)
    assert_close(get_classifier(model)(feats[-1]), logits, rtol=FP32)
    _check_summaries(feats, ref["feats"])
    _check_summaries(pre_feats, ref["preact_feats"])


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_contract_and_other_input_sizes(name, capsys):
    model = build_model(name, num_classes=10)
    assert capsys.readouterr().out == "", "models must not print when built"
    assert isinstance(model.get_feat_modules(), nn.ModuleList)
    bns = model.get_bn_before_relu()
    assert len(bns) >= 3 and all(isinstance(b, nn.BatchNorm2d) for b in bns)
    model.eval()
    with torch.no_grad():
        feats, logits = model(torch.randn(1, 3, 64, 64), is_feat=True)
    assert logits.shape == (1, 10)
    assert feats[-1].dim() == 2


def test_unknown_model_lists_choices():
    with pytest.raises(UserError) as err:
        build_model("resnet9000", num_classes=10)
    assert "resnet9000" in str(err.value) and "resnet32x4" in str(err.value)


def test_imagenet_resnet50_name():
    assert resolve_model_name("ResNet50", "cifar100") == "ResNet50"
    assert resolve_model_name("ResNet50", "imagenet") == "ResNet50_imagenet"
    assert "ResNet50_imagenet" in model_dict
