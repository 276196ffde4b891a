"""Bottleneck ResNet-50 for 32x32 input (He et al., CVPR 2016), in the layout of RepDistiller's
``resnetv2.py`` (Tian et al., "Contrastive Representation Distillation", ICLR 2020): a 3x3 stem
without max-pooling and four stages of 64/128/256/512 bottleneck widths (outputs x4).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import ResNetTrunk, conv3x3, projection

__all__ = ["Bottleneck", "ResNet", "ResNet50"]


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN, plus shortcut, then ReLU.

    ``forward`` maps ``[B, in_planes, H, W]`` to ``(out, preact)``, both ``[B, 4*planes, H/s, W/s]``.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = projection(in_planes, planes * self.expansion, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        preact = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(preact), preact


class ResNet(ResNetTrunk):
    """RepDistiller's ``resnetv2.ResNet``: 64-wide stem, four stages (``num_blocks`` blocks each),
    head ``linear``."""

    def __init__(self, block: type[nn.Module], num_blocks: list[int], num_classes: int = 10) -> None:
        super().__init__(block, 64, [64, 128, 256, 512], list(num_blocks), num_classes,
                         head_name="linear", relu_module=False)


def ResNet50(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-50 for CIFAR: bottleneck stages of 3, 4, 6, 3 blocks; 2048-d pooled feature."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)
