"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016), in the
layout of RepDistiller (Tian et al., "Contrastive Representation Distillation", ICLR 2020).

``resnet{8,14,20,32,44,56,110}`` have stages of 16/32/64 channels; the ``x4`` variants are four
times wider. The trunk (:class:`ResNetTrunk`) and :class:`Stage` are shared with
``models/resnetv2.py``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "Stage", "ResNetTrunk", "ResNet", "resnet8", "resnet14", "resnet20", "resnet32",
           "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    """The 1x1 conv + BN shortcut when the shape changes, else ``None`` (identity)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convolutions, BatchNorm weight 1 and bias 0, as RepDistiller."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    ``forward`` maps ``[B, in_planes, H, W]`` to ``(out, preact)``, both ``[B, planes, H/s, W/s]``;
    ``preact`` is the sum before the final ReLU.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = projection(in_planes, planes, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        preact = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(preact), preact


class Stage(nn.Sequential):
    """A sequence of residual blocks; ``forward`` returns ``(out, preact)`` of the last block."""

    def __init__(self, block: type[nn.Module], in_planes: int, planes: int, depth: int, stride: int) -> None:
        out_planes = planes * block.expansion
        super().__init__(*[block(in_planes if i == 0 else out_planes, planes, stride if i == 0 else 1)
                           for i in range(depth)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        preact = x
        for block in self:
            x, preact = block(x)
        return x, preact


class ResNetTrunk(nn.Module):
    """Stem conv3x3-BN-ReLU, stages ``layer1..layerN`` (the first at stride 1, the others at
    stride 2), global average pooling and a linear head (attribute ``head_name``).

    Input ``[B, 3, H, W]``; logits ``[B, num_classes]``. With ``is_feat=True`` also returns the
    features ``[stem, layer1, ..., layerN, pooled]`` (``preact=True``: stage outputs before
    their last ReLU).
    """

    def __init__(self, block: type[nn.Module], stem_width: int, widths: list[int], depths: list[int],
                 num_classes: int, head_name: str = "fc", relu_module: bool = True) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True) if relu_module else None
        in_planes = stem_width
        self.num_stages = len(widths)
        for i, (width, depth) in enumerate(zip(widths, depths)):
            setattr(self, f"layer{i + 1}", Stage(block, in_planes, width, depth, 1 if i == 0 else 2))
            in_planes = width * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head_name = head_name
        setattr(self, head_name, nn.Linear(in_planes, num_classes))
        init_weights(self)

    def stages(self) -> list[Stage]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def get_feat_modules(self) -> nn.ModuleList:
        stem = [self.conv1, self.bn1] + ([self.relu] if self.relu is not None else [])
        return nn.ModuleList(stem + self.stages())

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [stage[-1].last_bn for stage in self.stages()]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False
                ) -> torch.Tensor | tuple[list[torch.Tensor], torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [x], [x]
        for stage in self.stages():
            x, pre = stage(x)
            feats.append(x)
            preacts.append(pre)
        x = torch.flatten(self.avgpool(x), 1)
        logits = getattr(self, self.head_name)(x)
        if not is_feat:
            return logits
        return (preacts if preact else feats) + [x], logits


class ResNet(ResNetTrunk):
    """RepDistiller's CIFAR ResNet: ``depth = 6n + 2`` basic blocks, ``num_filters`` the stem
    width followed by the three stage widths."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 10) -> None:
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        super().__init__(BasicBlock, num_filters[0], list(num_filters[1:4]), [n] * 3, num_classes)


def _resnet(depth: int, filters: list[int], num_classes: int, **kwargs: Any) -> ResNet:
    return ResNet(depth, filters, num_classes=num_classes, **kwargs)


_THIN = [16, 16, 32, 64]
_WIDE = [32, 64, 128, 256]


def resnet8(num_classes: int = 100, **kwargs: Any) -> ResNet:
    return _resnet(8, _THIN, num_classes, **kwargs)


def resnet14(num_classes: int = 100, **kwargs: Any) -> ResNet:
    return _resnet(14, _THIN, num_classes, **kwargs)


def resnet20(num_classes: int = 100, **kwargs: Any) -> ResNet:
    return _resnet(20, _THIN, num_classes, **kwargs)


def resnet32(num_classes: int = 100, **kwargs: Any) -> ResNet:
    return _resnet(32, _THIN, num_classes, **kwargs)


def resnet44(num_classes: int = 100, **kwargs: Any) -> ResNet:
    return _resnet(44, _THIN, num_classes, **kwargs)


def resnet56(num_classes: int = 100, **kwargs: Any) -> ResNet:
    return _resnet(56, _THIN, num_classes, **kwargs)


def resnet110(num_classes: int = 100, **kwargs: Any) -> ResNet:
    return _resnet(110, _THIN, num_classes, **kwargs)


def resnet8x4(num_classes: int = 100, **kwargs: Any) -> ResNet:
    return _resnet(8, _WIDE, num_classes, **kwargs)


def resnet32x4(num_classes: int = 100, **kwargs: Any) -> ResNet:
    return _resnet(32, _WIDE, num_classes, **kwargs)
