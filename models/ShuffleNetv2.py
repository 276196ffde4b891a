"""ShuffleNet V2 for CIFAR (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN
Architecture Design", ECCV 2018).

RepDistiller's CIFAR variant at net size 1.0 (a CRD student, Tian et al., ICLR 2020): a 1x1 stem with
no down-sampling, three stages (116/232/464 channels; a down-sampling unit then 3/7/3 basic units),
a 1x1 conv to 1024 channels, global average pool and ``linear``. Parameter names and shapes equal
RepDistiller's, so its checkpoints load strictly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .recipe import recipe
from .ShuffleNetv1 import channel_shuffle

__all__ = ["BasicBlock", "DownBlock", "ShuffleNetV2", "ShuffleV2", "configs"]

# net size -> stage widths (+ the final 1x1 conv's width) and basic units per stage
configs: dict[float, dict[str, tuple[int, ...]]] = {
    0.2: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 3, 3)},
    0.3: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 7, 3)},
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class BasicBlock(nn.Module):
    """Split channels in two halves; the second goes 1x1 -> depthwise 3x3 -> 1x1; concat; shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_ratio = split_ratio
        ch = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(ch, ch, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, kernel_size=3, stride=1, padding=1, groups=ch, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch)

    def forward(
        self, x: torch.Tensor, return_preact: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] -> [B, C, H, W].

        The pre-activation (with ``return_preact``) is ``cat([x1, bn3(...)])`` *before* the channel
        shuffle, as in RepDistiller, so its channel order differs from the output's.
        """
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre_branch = self.bn3(self.conv3(out))
        out = channel_shuffle(torch.cat([x1, F.relu(pre_branch)], 1), 2)
        if return_preact:
            return out, torch.cat([x1, pre_branch], 1)
        return out


class DownBlock(nn.Module):
    """Down-sampling unit: both branches stride 2 (left: dw 3x3 -> 1x1; right: 1x1 -> dw 3x3 -> 1x1)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in, H, W] -> [B, out, H/2, W/2]."""
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """CIFAR ShuffleNet V2 of size ``net_size`` (a key of :data:`configs`).

    Features (``is_feat=True``): stem [B, 24, H, W], the three stage outputs, the pooled vector
    (after the final 1x1 conv). ``preact=True``: each stage's last unit's pre-activation (see
    :meth:`BasicBlock.forward`).
    """

    def __init__(self, net_size: float = 1, num_classes: int = 10) -> None:
        super().__init__()
        out_channels = configs[net_size]["out_channels"]
        num_blocks = configs[net_size]["num_blocks"]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        units: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        units += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*units)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """``bn3`` (main branch) of each stage's last unit.

        RepDistiller did not provide this. This BN is the one whose output the stage's last
        ReLU acts on (on half of the channels; the other half passes through unchanged).
        """
        return [self.layer1[-1].bn3, self.layer2[-1].bn3, self.layer3[-1].bn3]

    def preact_passthrough_channels(self) -> list[int]:
        """The leading channels of each stage's pre-activation map, ``cat([x1, bn3(...)])``, that
        do not come from :meth:`get_bn_before_relu`'s BatchNorm: the split's first half ``x1``,
        passed through unchanged (an earlier unit's output, after its ReLU)."""
        return [layer[-1].bn3.num_features for layer in (self.layer1, self.layer2, self.layer3)]

    def forward(
        self, x: torch.Tensor, is_feat: bool = False, preact: bool = False
    ) -> torch.Tensor | tuple[list[torch.Tensor], torch.Tensor]:
        """x: [B, 3, H, W] -> logits [B, num_classes] (and feats if ``is_feat``)."""
        out = F.relu(self.bn1(self.conv1(x)))
        feats, pre_feats = [out], [out]
        for layer in (self.layer1, self.layer2, self.layer3):
            *units, last = layer
            for unit in units:
                out = unit(out)
            out, pre = last(out, return_preact=True)
            feats.append(out)
            pre_feats.append(pre)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        feats.append(out)
        pre_feats.append(out)
        logits = self.linear(out)
        if is_feat:
            return (pre_feats if preact else feats), logits
        return logits


@recipe(learning_rate=0.01)  # RepDistiller trains this student at 0.01 (not 0.05)
def ShuffleV2(num_classes: int = 100, **kwargs) -> ShuffleNetV2:
    """The CLI model ``ShuffleV2``: net size 1.0 (1.36M parameters at 100 classes)."""
    return ShuffleNetV2(net_size=1, num_classes=num_classes, **kwargs)
