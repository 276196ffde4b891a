"""ShuffleNet (v1) for CIFAR (Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural
Network for Mobile Devices", CVPR 2018).

RepDistiller's CIFAR variant (a CRD student, Tian et al., ICLR 2020): a 1x1 stem with no down-sampling,
three stages of grouped bottlenecks (groups 3, widths 240/480/960, 4/8/4 units), global average pool
and ``linear``. Parameter names and shapes equal RepDistiller's, so its checkpoints load strictly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .recipe import recipe

__all__ = ["channel_shuffle", "Bottleneck", "ShuffleNet", "ShuffleV1"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, C, H, W] viewed as [B, g, C/g, H, W], the two group axes swapped, flattened back."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class Bottleneck(nn.Module):
    """Grouped 1x1 -> channel shuffle -> depthwise 3x3 -> grouped 1x1, plus shortcut.

    Stride 2 concatenates a 3x3 average-pooled shortcut (so ``out_planes`` excludes its channels);
    stride 1 adds the identity. The ReLU comes after the merge.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        # the first unit sees the 24-channel stem, too few channels to group
        self.first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(
        self, x: torch.Tensor, return_preact: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [B, in, H, W] -> [B, out(+in if stride 2), H/stride, W/stride] (and the pre-ReLU sum)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        pre = torch.cat([out, res], 1) if self.stride == 2 else out + res
        out = F.relu(pre)
        return (out, pre) if return_preact else out


class ShuffleNet(nn.Module):
    """CIFAR ShuffleNet: ``cfg`` has 'out_planes' (3 stage widths), 'num_blocks', 'groups'.

    Features (``is_feat=True``): stem [B, 24, H, W], the three stage outputs, the pooled vector.
    ``preact=True``: the stage outputs before the last unit's final ReLU.
    """

    def __init__(self, cfg: dict, num_classes: int = 10) -> None:
        super().__init__()
        out_planes = cfg["out_planes"]
        num_blocks = cfg["num_blocks"]
        groups = cfg["groups"]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        units = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            concat_planes = self.in_planes if i == 0 else 0
            units.append(Bottleneck(self.in_planes, out_planes - concat_planes, stride=stride, groups=groups))
            self.in_planes = out_planes
        return nn.Sequential(*units)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """``bn3`` (main branch) of each stage's last unit.

        RepDistiller did not provide this. In ShuffleNet the last ReLU of a stage follows the
        sum of this BN's output and the shortcut, so the BN is not directly before that ReLU; it is the
        closest BatchNorm (what the "Overhaul" margin statistics can be computed from).
        """
        return [self.layer1[-1].bn3, self.layer2[-1].bn3, self.layer3[-1].bn3]

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
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        feats.append(out)
        pre_feats.append(out)
        logits = self.linear(out)
        if is_feat:
            return (pre_feats if preact else feats), logits
        return logits


@recipe(learning_rate=0.01)  # RepDistiller trains this student at 0.01 (not 0.05)
def ShuffleV1(num_classes: int = 100, **kwargs) -> ShuffleNet:
    """The CLI model ``ShuffleV1``: groups 3, stage widths 240/480/960, 4/8/4 units (0.95M parameters)."""
    cfg = {"out_planes": [240, 480, 960], "num_blocks": [4, 8, 4], "groups": 3}
    return ShuffleNet(cfg, num_classes=num_classes, **kwargs)
