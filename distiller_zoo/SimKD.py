"""SimKD: Chen et al., "Knowledge Distillation with the Reused Teacher Classifier" (CVPR 2022)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.argtypes import positive_int
from common.declare import option
from common.errors import UserError
from models import get_classifier

from .heads import HeadOutput, InferenceHead, register_head
from .registry import Batch, BuildContext, Distiller, NetOutput, register


@dataclass
class SimKDOptions:
    """SimKD's projector"""

    simkd_factor: int = option(2, "SimKD: bottleneck factor f of the projector (C_t/f channels inside); the paper's "
                               "2, 4 or 8", type=positive_int)


def simkd_projector(s_channels: int, t_channels: int, factor: int) -> nn.Sequential:
    """SimKD's projector P, a bottleneck from the student's C_s channels to the teacher's C_t:
    conv1x1(C_s -> C_t/f)-BN-ReLU, conv3x3(C_t/f -> C_t/f, padding 1)-BN-ReLU,
    conv1x1(C_t/f -> C_t)-BN-ReLU, convolutions without bias (state names ``0`` ... ``8``:
    convolutions 0, 3, 6 and BatchNorms 1, 4, 7, as the reference's ``transfer``)."""
    mid = t_channels // factor
    if mid < 1:
        raise UserError(f"--simkd_factor {factor} leaves no channel inside the projector (the teacher's map has "
                        f"{t_channels}): use a factor <= {t_channels}")
    return nn.Sequential(
        nn.Conv2d(s_channels, mid, kernel_size=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, t_channels, kernel_size=1, bias=False), nn.BatchNorm2d(t_channels), nn.ReLU(inplace=True))


@register_head("simkd")
class SimKDHead(InferenceHead):
    """SimKD's student head: the projector ``transfer`` on the student's last stage map
    ``feats[-2]`` (average-pooled first to ``size`` where it is larger, the spatial alignment),
    global average pooling, then the teacher's classifier ``classifier`` (frozen):

        f~ = P(align(f_s)),   p = W_T avgpool(f~) + b_T

    ``forward(feats) -> HeadOutput(maps=f~, feature=avgpool(f~), logits=p)``. In training,
    ``transfer`` is the :class:`SimKD` Distiller's (trained) and ``classifier`` the teacher's own
    layer; rebuilt from a checkpoint (:meth:`from_config`), both are fresh modules loaded from it."""

    def __init__(self, transfer: nn.Sequential, classifier: nn.Linear, size: tuple[int, int] | None,
                 factor: int = 2) -> None:
        super().__init__()
        self.transfer, self.classifier = transfer, classifier
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.factor = int(factor)

    def config(self) -> dict[str, Any]:
        return {"s_channels": self.transfer[0].in_channels, "t_channels": self.transfer[6].out_channels,
                "factor": self.factor, "size": None if self.size is None else list(self.size),
                "num_classes": self.classifier.out_features, "bias": self.classifier.bias is not None}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SimKDHead":
        transfer = simkd_projector(int(config["s_channels"]), int(config["t_channels"]), int(config["factor"]))
        classifier = nn.Linear(int(config["t_channels"]), int(config["num_classes"]), bias=bool(config["bias"]))
        size = config["size"]
        return cls(transfer, classifier, None if size is None else tuple(size), int(config["factor"]))

    def project(self, f_s: torch.Tensor) -> torch.Tensor:
        """f~ = P(align(f_s)): f_s [B, C_s, H_s, W_s] -> [B, C_t, h, w]."""
        if self.size is not None and tuple(f_s.shape[-2:]) != self.size:
            f_s = F.adaptive_avg_pool2d(f_s, self.size)
        return self.transfer(f_s)

    def forward(self, feats: list[torch.Tensor]) -> HeadOutput:
        maps = self.project(feats[-2])
        feature = maps.mean(dim=(2, 3))
        weight, bias = self.classifier.weight, self.classifier.bias
        # frozen: the teacher's classifier is read, never trained (detached even if it was not frozen)
        return HeadOutput(maps, feature, F.linear(feature, weight.detach(), None if bias is None else bias.detach()))


@register("simkd")
class SimKD(Distiller):
    """``--distill simkd``: SimKD. The student's last stage map ``f_s = feats[-2]`` goes through the
    projector P (:func:`simkd_projector`, factor ``--simkd_factor``) to the teacher's width; the loss
    is the feature match with the teacher's last stage map ``f_t = feats[-2]``,

        L_SimKD = || f_t - P(f_s) ||_2^2     (term ``simkd``, a mean over the elements: MSELoss)

    and the student's prediction reuses the teacher's frozen classifier on the pooled projection,
    ``p_s = W_T avgpool(P(f_s)) + b_T``: that is the method's inference head (:class:`SimKDHead`),
    with which the student is trained (CE/KD, weight 0 by default), validated, saved and tested.

    Spatial alignment (the paper does not say; the reference's behaviour): where the maps' sizes
    differ, the larger one is average-pooled to the smaller one's (the student's before the
    projector, the teacher's target otherwise). Equal channel counts still get the projector (as
    the reference). The paper's squared L2 distance is taken as the reference's mean over elements
    (the scale the published ``-b 1`` is for); the method has no quirk where paper and reference
    differ in results, so it has no reference flag.

    Published weights ``-r 0 -a 0 -b 1`` (the authors' ``-c 0 -d 0 -b 1``). Refused (at build):
    features that are not maps, a teacher whose last linear layer does not read its ``feats[-1]``
    of C_t features (the classifier reused on the projection), and more than one teacher.
    """

    Options = SimKDOptions
    weights = (0.0, 0.0, 1.0)

    def __init__(self, options: SimKDOptions, ctx: BuildContext) -> None:
        super().__init__()
        s_shape, t_shape = ctx.feats_s[-2], ctx.feats_t[-2]
        if len(s_shape) != 4 or len(t_shape) != 4:
            raise UserError(f"--distill simkd needs the last stage feature maps [B, C, H, W] (feats[-2]) of both "
                            f"networks; {ctx.model_s or 'the student'} gives {list(s_shape)}, "
                            f"{ctx.model_t or 'the teacher'} {list(t_shape)}")
        self.factor = options.simkd_factor
        self.t_channels = int(t_shape[1])
        self.transfer = simkd_projector(int(s_shape[1]), self.t_channels, self.factor)
        size = (min(s_shape[2], t_shape[2]), min(s_shape[3], t_shape[3]))
        self.size = None if size == tuple(s_shape[2:]) else size  # the student's map is pooled to it
        self._head: tuple[SimKDHead] | None = None

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Build the head on the teacher's final linear layer (referenced, frozen, never trained;
        kept out of this module's parameters and state)."""
        classifier = get_classifier(teacher)
        if classifier.in_features != self.t_channels:
            raise UserError(f"--distill simkd reuses the teacher's classifier on its last stage map's "
                            f"{self.t_channels} channels, but its last linear layer takes {classifier.in_features} "
                            "inputs: this teacher's logits are not Linear(avgpool(feats[-2]))")
        self._head = (SimKDHead(self.transfer, classifier, self.size, self.factor),)

    def inference_head(self) -> SimKDHead | None:
        return None if self._head is None else self._head[0]

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self._head is None:
            raise RuntimeError("--distill simkd: call bind(student, teacher) before forward")
        out = s.head if s.head is not None else self._head[0](s.feats)
        return {"simkd": self.loss(out.maps, t.feats[-2])}

    @staticmethod
    def loss(trans_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """mean((P(f_s) - f_t)^2), ``f_t`` average-pooled to ``trans_s``'s size where larger."""
        f_t = f_t.detach()
        if f_t.shape[-2:] != trans_s.shape[-2:]:
            f_t = F.adaptive_avg_pool2d(f_t, trans_s.shape[-2:])
        return F.mse_loss(trans_s.float(), f_t.float())
