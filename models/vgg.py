"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015) in the layout of RepDistiller (Tian et al.,
"Contrastive Representation Distillation", ICLR 2020).

Five conv blocks (``block0..block4``) separated by 2x2 max-pools (after block0..2; after block3
only for 64x64 input, as RepDistiller), global average pooling and one linear classifier.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["VGG", "cfg", "vgg8_bn", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]

cfg: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def conv_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """(conv3x3-BN-ReLU) per width, without the final ReLU: the block ends with its BN."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """CIFAR VGG-BN. Input ``[B, 3, H, W]``, logits ``[B, num_classes]``.

    Features (``is_feat=True``, 32x32 input): block0 ``[B, 64, 32, 32]``, block1 ``[B, 128, 16, 16]``,
    block2 ``[B, 256, 8, 8]``, block3 and block4 ``[B, 512, 4, 4]``, pooled ``[B, 512]``; each
    after its ReLU, or (``preact=True``, block1..4) before it.
    """

    def __init__(self, cfg: list[list[int]], num_classes: int = 1000) -> None:
        super().__init__()
        in_channels = [3] + [widths[-1] for widths in cfg[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            conv_block(widths, c) for widths, c in zip(cfg, in_channels))
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(2, 2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.block0, self.pool0, self.block1, self.pool1, self.block2,
                              self.pool2, self.block3, self.pool3, self.block4])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False
                ) -> torch.Tensor | tuple[list[torch.Tensor], torch.Tensor]:
        h = x.shape[2]
        x = F.relu(self.block0(x))
        feats, preacts = [x], [x]
        pools = [self.pool0, self.pool1, self.pool2, self.pool3]
        for i, block in enumerate([self.block1, self.block2, self.block3, self.block4]):
            if i < 3 or h == 64:  # RepDistiller pools before block4 only for 64x64 input
                x = pools[i](x)
            pre = block(x)
            x = F.relu(pre)
            preacts.append(pre)
            feats.append(x)
        x = torch.flatten(self.pool4(x), 1)
        logits = self.classifier(x)
        if not is_feat:
            return logits
        return (preacts if preact else feats) + [x], logits


def vgg8_bn(num_classes: int = 100, **kwargs: Any) -> VGG:
    return VGG(cfg["S"], num_classes=num_classes, **kwargs)


def vgg11_bn(num_classes: int = 100, **kwargs: Any) -> VGG:
    return VGG(cfg["A"], num_classes=num_classes, **kwargs)


def vgg13_bn(num_classes: int = 100, **kwargs: Any) -> VGG:
    return VGG(cfg["B"], num_classes=num_classes, **kwargs)


def vgg16_bn(num_classes: int = 100, **kwargs: Any) -> VGG:
    return VGG(cfg["D"], num_classes=num_classes, **kwargs)


def vgg19_bn(num_classes: int = 100, **kwargs: Any) -> VGG:
    return VGG(cfg["E"], num_classes=num_classes, **kwargs)
