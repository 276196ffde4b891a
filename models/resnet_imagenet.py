"""ResNets for ImageNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

Parameter names, shapes and computation are torchvision's (``torchvision.models.resnet18/34/50``,
the v1.5 bottleneck with the stride on the 3x3 conv), so torchvision checkpoints load with
``strict=True`` and give the same logits. On top of that the RepDistill model contract:
``forward(x, is_feat=False, preact=False)``, ``get_feat_modules()``, ``get_bn_before_relu()``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; identity (or 1x1 conv + BN ``downsample``) shortcut; ReLU after the sum."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        """The BN of the residual branch, right before the sum and the block's last ReLU."""
        return self.bn2

    def forward(
        self, x: torch.Tensor, return_preact: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [B, inplanes, H, W] -> [B, planes, H/stride, W/stride] (and the pre-ReLU sum)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        pre = self.bn2(self.conv2(out)) + identity
        return (F.relu(pre), pre) if return_preact else self.relu(pre)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride here, torchvision's v1.5) -> 1x1 expand (x4), each with BN; shortcut; ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        """The BN of the residual branch, right before the sum and the block's last ReLU."""
        return self.bn3

    def forward(
        self, x: torch.Tensor, return_preact: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [B, inplanes, H, W] -> [B, 4 * planes, H/stride, W/stride] (and the pre-ReLU sum)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        pre = self.bn3(self.conv3(out)) + identity
        return (F.relu(pre), pre) if return_preact else self.relu(pre)


class ResNet(nn.Module):
    """ImageNet ResNet: 7x7/2 conv + BN + ReLU + 3x3/2 max-pool stem, four stages, average pool, ``fc``.

    Features (``is_feat=True``), for a 224x224 input: stem (after the max-pool) [B, 64, 56, 56], the
    four stage outputs ([B, 64e, 56, 56] ... [B, 512e, 7, 7], e = block expansion) and the pooled
    vector [B, 512e]. ``preact=True`` gives the stage outputs before their last ReLU.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        units = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        units += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*units)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList(
            [self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3, self.layer4]
        )

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last BN of each stage's last block (``bn2`` for BasicBlock, ``bn3`` for Bottleneck)."""
        return [layer[-1].last_bn for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def forward(
        self, x: torch.Tensor, is_feat: bool = False, preact: bool = False
    ) -> torch.Tensor | tuple[list[torch.Tensor], torch.Tensor]:
        """x: [B, 3, H, W] -> logits [B, num_classes] (and feats if ``is_feat``)."""
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = [out]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if not is_feat:
                out = layer(out)
                continue
            *units, last = layer
            for unit in units:
                out = unit(out)
            out, pre = last(out, return_preact=True)
            feats.append(pre if preact else out)
        out = torch.flatten(self.avgpool(out), 1)
        feats.append(out)
        logits = self.fc(out)
        if is_feat:
            return feats, logits
        return logits


def imagenet_resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-18 (11.7M parameters at 1000 classes); torchvision ``resnet18`` layout."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


def imagenet_resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-34 (21.8M parameters at 1000 classes); torchvision ``resnet34`` layout."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def imagenet_resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50 (25.6M parameters at 1000 classes); torchvision ``resnet50`` layout."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)
