"""Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016) in the
layout of RepDistiller (Tian et al., "Contrastive Representation Distillation", ICLR 2020).

``wrn_D_K``: depth ``D = 6n + 4`` and widen factor ``K``; stages of 16K/32K/64K channels made
of pre-activation blocks, then a final BN-ReLU.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "NetworkBlock", "WideResNet", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, plus shortcut.

    The shortcut is the input itself, or a 1x1 conv of the activated input when the shape
    changes. ``[B, in_planes, H, W] -> [B, out_planes, H/s, W/s]``; no ReLU at the end.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropRate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.droprate = dropRate
        self.convShortcut = (nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
                             if in_planes != out_planes or stride != 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """One stage: ``nb_layers`` blocks in ``self.layer``, the first with ``stride``."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, dropRate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropRate)
            for i in range(nb_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for CIFAR. Input ``[B, 3, H, W]``, logits ``[B, num_classes]``.

    Features (``is_feat=True``): stem conv ``[B, 16, H, W]``, block1 ``[B, 16K, H, W]``, block2
    ``[B, 32K, H/2, W/2]``, block3 ``[B, 64K, H/4, W/4]``, pooled ``[B, 64K]``. The stages are
    pre-activation, so they end without BN-ReLU; with ``preact=True`` each stage output is passed
    through the BN that precedes the next ReLU (:meth:`get_bn_before_relu`), as RepDistiller does.
    """

    def __init__(self, depth: int, num_classes: int, widen_factor: int = 1, dropRate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, dropRate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, dropRate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, dropRate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False
                ) -> torch.Tensor | tuple[list[torch.Tensor], torch.Tensor]:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        f4 = torch.flatten(F.adaptive_avg_pool2d(self.relu(self.bn1(f3)), 1), 1)
        logits = self.fc(f4)
        if not is_feat:
            return logits
        if preact:
            f1, f2, f3 = (bn(f) for bn, f in zip(self.get_bn_before_relu(), (f1, f2, f3)))
        return [f0, f1, f2, f3, f4], logits


def wrn(depth: int, widen_factor: int, num_classes: int = 100, **kwargs: Any) -> WideResNet:
    return WideResNet(depth=depth, num_classes=num_classes, widen_factor=widen_factor, **kwargs)


def wrn_16_1(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    return wrn(16, 1, num_classes, **kwargs)


def wrn_16_2(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    return wrn(16, 2, num_classes, **kwargs)


def wrn_40_1(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    return wrn(40, 1, num_classes, **kwargs)


def wrn_40_2(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    return wrn(40, 2, num_classes, **kwargs)
