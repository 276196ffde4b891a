"""ImageNet backbones: torchvision checkpoints load strictly and give the same logits; feature contract."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from models.mobilenetv1 import imagenet_mobilenetv1
from models.resnet_imagenet import imagenet_resnet18, imagenet_resnet34, imagenet_resnet50
from tests.tolerance import FP32, assert_close

pytestmark = pytest.mark.numeric

RESNETS = {
    "resnet18": (imagenet_resnet18, torchvision.models.resnet18, 512),
    "resnet34": (imagenet_resnet34, torchvision.models.resnet34, 512),
    "resnet50": (imagenet_resnet50, torchvision.models.resnet50, 2048),
}


def _randomise_bn_stats(model: nn.Module) -> None:
    """Non-trivial running statistics and affine BN parameters, so that eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + 0.5 * torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))


@pytest.fixture(scope="module", params=list(RESNETS))
def resnet_pair(request):
    ours_fn, tv_fn, width = RESNETS[request.param]
    torch.manual_seed(0)
    reference = tv_fn(num_classes=10)
    with torch.no_grad():
        _randomise_bn_stats(reference)
    ours = ours_fn(num_classes=10)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return request.param, ours.eval(), reference.eval(), width


def test_state_dict_layout_is_torchvisions(resnet_pair):
    _, ours, reference, _ = resnet_pair
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]


def test_same_logits_and_feature_contract(resnet_pair):
    _, ours, reference, width = resnet_pair
    e = width // 512
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(reference, name).register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
        for name in ("maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
    ]
    with torch.inference_mode():
        expected = reference(x)
        for h in hooks:
            h.remove()
        logits = ours(x)
        feats, logits_feat = ours(x, is_feat=True)
        pre_feats, logits_pre = ours(x, is_feat=True, preact=True)
    for out in (logits, logits_feat, logits_pre):
        assert_close(out, expected, rtol=FP32)  # torchvision's modules: the same ops

    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 16, 16), (1, 64 * e, 16, 16), (1, 128 * e, 8, 8), (1, 256 * e, 4, 4), (1, 512 * e, 2, 2), (1, width)
    ]
    assert_close(feats[0], captured["maxpool"], rtol=FP32)
    for ours_stage, name in zip(feats[1:-1], ("layer1", "layer2", "layer3", "layer4")):
        assert_close(ours_stage, captured[name], rtol=FP32, msg=name)
    assert_close(feats[-1], torch.flatten(captured["avgpool"], 1), rtol=FP32)
    # pre-activations: same shapes, their ReLU gives the stage outputs, and they have negative values
    assert [f.shape for f in pre_feats] == [f.shape for f in feats]
    assert_close(pre_feats[0], feats[0], rtol=FP32)
    for pre, post in zip(pre_feats[1:-1], feats[1:-1]):
        assert_close(pre.relu(), post, rtol=FP32)
        assert (pre < 0).any()
    assert_close(pre_feats[-1], feats[-1], rtol=FP32)

    bns = ours.get_bn_before_relu()
    assert len(bns) == 4 and all(isinstance(b, nn.BatchNorm2d) for b in bns)
    assert [b.num_features for b in bns] == [64 * e, 128 * e, 256 * e, 512 * e]
    assert isinstance(ours.get_feat_modules(), nn.ModuleList)


def test_resnet18_at_224():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    ours = imagenet_resnet18().eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        feats, logits = ours(x, is_feat=True)
        assert_close(logits, reference(x), rtol=FP32)
    assert logits.shape == (1, 1000)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, 56, 56), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7), (512,)
    ]


@pytest.mark.parametrize("fn,count", [(imagenet_resnet18, 11_689_512), (imagenet_resnet34, 21_797_672),
                                      (imagenet_resnet50, 25_557_032)])
def test_resnet_parameter_counts(fn, count):
    assert sum(p.numel() for p in fn().parameters()) == count


def test_mobilenetv1(capsys):
    model = imagenet_mobilenetv1()
    assert capsys.readouterr().out == ""
    assert sum(p.numel() for p in model.parameters()) == 4_231_976
    keys = list(model.state_dict())
    assert keys[:2] == ["model.0.0.weight", "model.0.1.weight"]
    assert "model.13.3.weight" in keys and keys[-2:] == ["fc.weight", "fc.bias"]
    model.eval()
    with torch.no_grad():
        _randomise_bn_stats(model)
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
        logits = model(x)
        feats, logits_feat = model(x, is_feat=True)
        pre_feats, _ = model(x, is_feat=True, preact=True)
    assert logits.shape == (1, 1000)
    assert_close(logits_feat, logits, rtol=FP32)
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8), (1, 512, 4, 4), (1, 1024, 2, 2), (1, 1024)
    ]
    assert_close(feats[-1], feats[-2].mean((2, 3)), rtol=FP32)
    for pre, post in zip(pre_feats[1:-1], feats[1:-1]):
        assert_close(pre.relu(), post, rtol=FP32)
        assert (pre < 0).any()
    bns = model.get_bn_before_relu()
    assert [b.num_features for b in bns] == [128, 256, 512, 1024]
    assert isinstance(model.get_feat_modules(), nn.ModuleList)


def test_mobilenetv1_at_224_and_num_classes():
    model = imagenet_mobilenetv1(num_classes=100).eval()
    with torch.no_grad():
        feats, logits = model(torch.randn(1, 3, 224, 224), is_feat=True)
    assert logits.shape == (1, 100)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7), (1024,)
    ]
