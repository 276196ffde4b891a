"""The backbone zoo.

``model_dict`` maps every command-line model name to a constructor ``fn(num_classes=...)``.
The CIFAR names are RepDistiller's; the ImageNet backbones (224x224 input, torchvision parameter
names) are ``ResNet18``, ``ResNet34``, ``ResNet50_imagenet`` and ``MobileNetV1``.

Every model follows one contract:
- ``forward(x, is_feat=False, preact=False)`` returns the logits, or ``(feats, logits)`` where
  ``feats`` is the stem output, each stage's output, then the pooled vector (``feats[-1]``);
  with ``preact=True`` the stage outputs are taken before their last ReLU.
- ``get_feat_modules()`` returns the modules that produce the features, as an ``nn.ModuleList``.
- ``get_bn_before_relu()`` returns the BatchNorm layer that precedes each stage's last ReLU: one
  per stage map of ``feats[1:-1]``, with its channels, except that a model whose stage maps start
  with channels that bypass that BatchNorm says how many per stage with
  ``preact_passthrough_channels()`` (ShuffleV2; see :func:`preact_passthrough_channels`).

``build_model(..., in_channels=C)`` gives a network for ``C``-channel inputs (a view such as
``L`` or ``ab``): its stem's first convolution takes ``C`` channels, all else unchanged.
"""
from __future__ import annotations

from typing import Callable

import math

import torch
import torch.nn as nn

from common.errors import UserError

from .mobilenetv1 import imagenet_mobilenetv1
from .mobilenetv2 import mobile_half
from .recipe import LEARNING_RATE
from .resnet import resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44, resnet56, resnet110
from .resnet_imagenet import imagenet_resnet18, imagenet_resnet34, imagenet_resnet50
from .resnetv2 import ResNet50
from .ShuffleNetv1 import ShuffleV1
from .ShuffleNetv2 import ShuffleV2
from .vgg import vgg8_bn, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn
from .wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

cifar_model_dict: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "ResNet50": ResNet50,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8_bn,
    "vgg11": vgg11_bn,
    "vgg13": vgg13_bn,
    "vgg16": vgg16_bn,
    "vgg19": vgg19_bn,
    "MobileNetV2": mobile_half,
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
}

imagenet_model_dict: dict[str, Callable[..., nn.Module]] = {
    "ResNet18": imagenet_resnet18,
    "ResNet34": imagenet_resnet34,
    "ResNet50_imagenet": imagenet_resnet50,
    "MobileNetV1": imagenet_mobilenetv1,
}

model_dict: dict[str, Callable[..., nn.Module]] = {**cifar_model_dict, **imagenet_model_dict}


def default_learning_rate(name: str) -> float:
    """The learning rate of a run training the network ``name`` when ``--learning_rate`` is left
    out: the one its constructor declares (:func:`models.recipe.recipe`: RepDistiller's 0.01 for
    MobileNetV2, ShuffleV1 and ShuffleV2), else :data:`models.recipe.LEARNING_RATE` (0.05, also for
    a name that is no model's)."""
    return getattr(model_dict.get(name), "learning_rate", LEARNING_RATE)


def resolve_model_name(name: str, dataset: str = "cifar100") -> str:
    """The ``model_dict`` key for a command-line model name.

    On ImageNet, ``ResNet50`` means the torchvision-layout ImageNet network
    (``ResNet50_imagenet``); everywhere else names map to themselves.
    Raises :class:`UserError` listing the valid names for an unknown one.
    """
    if dataset == "imagenet" and name == "ResNet50":
        return "ResNet50_imagenet"
    if name not in model_dict:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(model_dict)}")
    return name


def build_model(name: str, num_classes: int, dataset: str = "cifar100", in_channels: int = 3) -> nn.Module:
    """Build the network called ``name`` (see :func:`resolve_model_name`) with ``num_classes``
    outputs, for inputs of ``in_channels`` channels (see :func:`set_in_channels`)."""
    model = model_dict[resolve_model_name(name, dataset)](num_classes=num_classes)
    return set_in_channels(model, in_channels) if in_channels != 3 else model


def preact_passthrough_channels(model: nn.Module) -> list[int]:
    """For each BatchNorm of ``model.get_bn_before_relu()``: how many leading channels of that
    stage's pre-activation map (``feats[1:-1]`` with ``preact=True``) do not come from it. Those
    channels pass through the stage's last unit unchanged (ShuffleV2's channel split: already after
    a ReLU, so never negative); the BatchNorm's channels follow them. 0 per stage for models that do
    not define ``preact_passthrough_channels()`` (every stage map is the BatchNorm's output, or a
    residual sum on it)."""
    own = getattr(model, "preact_passthrough_channels", None)
    return list(own()) if own is not None else [0] * len(model.get_bn_before_relu())


def stem_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The name and module of the convolution that reads the input: the model's first
    ``nn.Conv2d`` (every network of :data:`model_dict` registers its stem first)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise TypeError(f"{type(model).__name__} has no convolution")


def in_channels_of(model: nn.Module) -> int:
    """The number of input channels ``model`` takes (its stem's)."""
    return stem_conv(model)[1].in_channels


@torch.no_grad()
def set_in_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """``model`` (changed in place) with a stem convolution taking ``in_channels`` channels: a new
    ``nn.Conv2d`` with the old one's hyper-parameters in its place (state-dict keys unchanged).
    Its weights are the old ones' input channels in turn (channel ``j`` gets old channel
    ``j % C_old``) scaled by ``sqrt(C_old / in_channels)``, which keeps the initial output's
    variance and draws no random numbers (the model's initialisation stays a function of the seed)."""
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    _, old = stem_conv(model)
    if old.in_channels == in_channels:
        return model
    if old.groups != 1:
        raise TypeError(f"{type(model).__name__}'s stem is a grouped convolution")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size,  # type: ignore[arg-type]
                    stride=old.stride, padding=old.padding,  # type: ignore[arg-type]
                    dilation=old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    picks = torch.arange(in_channels, device=old.weight.device) % old.in_channels
    new.weight.copy_(old.weight[:, picks] * math.sqrt(old.in_channels / in_channels))
    if old.bias is not None:
        new.bias.copy_(old.bias)
    for module in list(model.modules()):  # every place that holds it (a module may be registered twice)
        for child_name, child in list(module.named_children()):
            if child is old:
                setattr(module, child_name, new)
    return model


def get_classifier(model: nn.Module) -> nn.Linear:
    """The network's final linear layer: ``logits = get_classifier(model)(feats[-1])``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(model).__name__} has no linear classifier")
    return linears[-1]
