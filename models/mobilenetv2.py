"""MobileNetV2 for CIFAR (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

The layout is RepDistiller's CIFAR variant (used as a student in CRD, Tian et al., ICLR 2020), so its
checkpoints load with ``strict=True``: a stride-2 3x3 stem, seven groups of inverted residual blocks
in ``blocks``, a 1x1 conv to 1280 channels (``conv2``) and ``classifier.0``.
The CLI name ``MobileNetV2`` is :func:`mobile_half` (expansion 6, width 0.5).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .recipe import recipe

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenetv2_T_w", "mobile_half"]

# (expansion t, output channels c, repeats n, first stride s) per block group, at width 1.0;
# the expansion entries equal to None take the network's ``T``.
_SETTING: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    """conv (no bias) + BN + ReLU, indices 0/1/2 as RepDistiller's ``conv_bn`` / ``conv_1x1_bn``."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), with identity shortcut when shapes allow.

    ``conv`` indices: 0 conv, 1 BN, 2 ReLU, 3 depthwise conv, 4 BN, 5 ReLU, 6 conv, 7 BN (no ReLU).
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, inp, H, W] -> [B, oup, H/stride, W/stride]."""
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 with expansion ``T`` and width multiplier ``width_mult``.

    Features (``is_feat=True``): stem output, the outputs of block groups 1, 2, 4 and 6 (the last
    group at each resolution), then the pooled 1280-d vector. The blocks end in a BatchNorm with no
    ReLU after it, so ``preact=True`` returns the same tensors (as in RepDistiller).
    """

    def __init__(
        self,
        T: int = 6,
        feature_dim: int = 100,
        input_size: int = 32,
        width_mult: float = 1.0,
        remove_avg: bool = False,
    ) -> None:
        super().__init__()
        self.remove_avg = remove_avg
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, input_channel, 3, 2)

        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTING:
            expansion = T if t is None else t
            output_channel = int(c * width_mult)
            units = []
            for i in range(n):
                units.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, expansion))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*units))

        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, feature_dim))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self._initialize_weights()

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last BatchNorm of block groups 1, 2, 4, 6 (the feature stages)."""
        return [self.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.blocks])

    def forward(
        self, x: torch.Tensor, is_feat: bool = False, preact: bool = False
    ) -> torch.Tensor | tuple[list[torch.Tensor], torch.Tensor]:
        """x: [B, 3, H, W] -> logits [B, num_classes] (and feats if ``is_feat``)."""
        out = self.conv1(x)
        feats = [out]
        for i, group in enumerate(self.blocks):
            out = group(out)
            if i in (1, 2, 4, 6):
                feats.append(out)
        out = self.conv2(out)
        if not self.remove_avg:
            out = self.avgpool(out)
        out = out.flatten(1)
        feats.append(out)
        logits = self.classifier(out)
        if is_feat:
            return feats, logits
        return logits

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)


def mobilenetv2_T_w(T: int, W: float, feature_dim: int = 100) -> MobileNetV2:
    """MobileNetV2 with expansion ``T`` and width ``W`` (RepDistiller's constructor name)."""
    return MobileNetV2(T=T, feature_dim=feature_dim, width_mult=W)


@recipe(learning_rate=0.01)  # RepDistiller trains this student at 0.01 (not 0.05)
def mobile_half(num_classes: int = 100, **kwargs) -> MobileNetV2:
    """The CLI model ``MobileNetV2``: expansion 6, width 0.5 (0.81M parameters at 100 classes)."""
    return MobileNetV2(T=6, feature_dim=num_classes, width_mult=0.5, **kwargs)
