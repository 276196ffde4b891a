"""MobileNetV1 for ImageNet (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for
Mobile Vision Applications", 2017).

The width-1.0 network used as the ImageNet student in the KD literature (e.g. ResNet-50 -> MobileNet
in CRD, Tian et al., ICLR 2020, and in "A Comprehensive Overhaul of Feature Distillation"): a 3x3/2
conv stem and 13 depthwise-separable units (dw 3x3 + BN + ReLU, pw 1x1 + BN + ReLU) ending at 1024
channels, global average pool and ``fc`` (4.23M parameters at 1000 classes). Parameters are named
``model.N.*`` (``model.0`` the stem, ``model.1``..``model.13`` the units; in a unit ``.0``/``.1`` are the
depthwise conv/BN and ``.3``/``.4`` the pointwise conv/BN) plus ``fc``, the usual layout of that
student's checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MobileNetV1", "imagenet_mobilenetv1"]

# (output channels, stride) of the 13 depthwise-separable units
_UNITS: list[tuple[int, int]] = [
    (64, 1),
    (128, 2), (128, 1),
    (256, 2), (256, 1),
    (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
]
# index in ``model`` of the last unit of each feature stage (resolution 1/4, 1/8, 1/16, 1/32)
_STAGE_ENDS: tuple[int, ...] = (3, 5, 11, 13)


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    """3x3 conv + BN + ReLU (the stem)."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """ImageNet MobileNetV1 (width 1.0).

    Features (``is_feat=True``), for a 224x224 input: stem output (``model.0``-``model.1``)
    [B, 64, 112, 112]; stage outputs (``model`` up to index 3, 5, 11, 13) [B, 128, 56, 56],
    [B, 256, 28, 28], [B, 512, 14, 14], [B, 1024, 7, 7]; pooled vector [B, 1024].
    ``preact=True`` gives the stage outputs before their last ReLU (the pointwise BN output).
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 2)]
        in_ch = 32
        for out_ch, stride in _UNITS:
            layers.append(_conv_dw(in_ch, out_ch, stride))
            in_ch = out_ch
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList(list(self.model.children())[: _STAGE_ENDS[-1] + 1])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The pointwise BN (``model.N.4``) of each stage's last unit."""
        return [self.model[i][4] for i in _STAGE_ENDS]

    def forward(
        self, x: torch.Tensor, is_feat: bool = False, preact: bool = False
    ) -> torch.Tensor | tuple[list[torch.Tensor], torch.Tensor]:
        """x: [B, 3, H, W] -> logits [B, num_classes] (and feats if ``is_feat``)."""
        out = self.model[1](self.model[0](x))
        feats = [out]
        for i in range(2, _STAGE_ENDS[-1] + 1):
            unit = self.model[i]
            if is_feat and i in _STAGE_ENDS:
                pre = unit[4](unit[3](unit[2](unit[1](unit[0](out)))))
                out = F.relu(pre)
                feats.append(pre if preact else out)
            else:
                out = unit(out)
        out = torch.flatten(self.model[_STAGE_ENDS[-1] + 1](out), 1)
        feats.append(out)
        logits = self.fc(out)
        if is_feat:
            return feats, logits
        return logits


def imagenet_mobilenetv1(num_classes: int = 1000, **kwargs) -> MobileNetV1:
    """The CLI model ``MobileNetV1``: ImageNet MobileNetV1, width 1.0 (4.23M parameters at 1000 classes)."""
    return MobileNetV1(num_classes=num_classes, **kwargs)
