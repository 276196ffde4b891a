"""The model contract's ``get_bn_before_relu()`` (and ``preact_passthrough_channels``) against the
pre-ReLU stage maps ``feats[1:-1]`` that OFD compares, for every model of ``model_dict``: one
BatchNorm per stage map, with its channels (after the channels that bypass it), run in the forward
at the map's spatial size."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models import build_model, imagenet_model_dict, model_dict, preact_passthrough_channels

pytestmark = pytest.mark.numeric


@pytest.mark.parametrize("name", list(model_dict))
def test_bn_before_relu_matches_the_preact_stage_maps(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    size = 64 if name in imagenet_model_dict else 32  # ImageNet networks: any size divisible by 32
    bns = model.get_bn_before_relu()
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns)
    seen: dict[int, torch.Tensor] = {}
    hooks = [bn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i, bn in enumerate(bns)]
    with torch.no_grad():
        feats, _ = model(torch.randn(2, 3, size, size), is_feat=True, preact=True)
    for hook in hooks:
        hook.remove()
    maps = feats[1:-1]
    passthrough = preact_passthrough_channels(model)
    assert len(bns) == len(maps) == len(passthrough)
    assert [p + bn.num_features for p, bn in zip(passthrough, bns)] == [f.shape[1] for f in maps]
    assert sorted(seen) == list(range(len(bns))), "a BatchNorm of get_bn_before_relu() is not run"
    for i, (f, p) in enumerate(zip(maps, passthrough)):
        assert seen[i].shape[2:] == f.shape[2:]
        assert (f[:, :p] >= 0).all(), "channels that bypass the BatchNorm must be after a ReLU"
    if name == "ShuffleV2":
        assert passthrough == [58, 116, 232]
    else:
        assert passthrough == [0] * len(bns)
