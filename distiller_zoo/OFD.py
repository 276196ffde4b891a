"""OFD: Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.declare import option
from common.errors import UserError
from models import preact_passthrough_channels

from ._common import fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, register

TEACHER_BN_MODES = ("eval", "train")
MARGIN_MIN_PROBABILITY = 1e-3  # below this P(x < 0), the margin is -3 std (the paper's code)


@dataclass
class OFDOptions:
    """OFD"""

    ofd_teacher_bn: str = option(
        "eval", "OFD: the teacher's BatchNorms during training: eval (frozen running statistics, the paper's) or "
                "train (batch statistics, running statistics updated, as mdistiller runs it)",
        choices=TEACHER_BN_MODES)


def ofd_margin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The margin of each channel of a teacher map read from the BatchNorm before its ReLU
    (Heo et al. 2019, Sec. 3.2): the BN's output is taken as x ~ N(mu = bias, sigma = |weight|),
    and the margin is the expectation of its negative part,

        m = E[x | x < 0] = mu - sigma * phi(mu / sigma) / Phi(-mu / sigma)   if Phi(-mu / sigma) > 0.001,
        m = -3 sigma                                                          otherwise

    (``phi``, ``Phi``: the standard normal density and distribution). ``weight``, ``bias`` [C];
    returns [C] (float32, computed in float64; a zero weight is a point mass: m = mu when mu < 0)."""
    mu = bias.detach().double()
    sigma = weight.detach().double().abs().clamp_min(1e-12)
    z = mu / sigma
    below = torch.special.ndtr(-z)  # P(x < 0)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    truncated = mu - sigma * density / below.clamp_min(1e-300)
    return torch.where(below > MARGIN_MIN_PROBABILITY, truncated, -3 * sigma).float()


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 distance of one stage (Heo et al. 2019, Eq. 4): with the teacher's map
    raised to its margin, T = max(F_t, m) (``margin`` [1, C, 1, 1]), a position counts unless the
    student is below a non-positive teacher value,

        d_p(T, S) = sum_{c,h,w} [ 0 if S <= T <= 0, else (T - S)^2 ],

    averaged over the batch. ``source`` (the connected student map) and ``target`` [B, C, H, W]."""
    target = torch.max(target, margin)
    keep = (source > target) | (target > 0)
    return ((source - target).pow(2) * keep).sum() / source.shape[0]


class OFDLoss(nn.Module):
    """OFD's feature loss over the stages (Heo et al. 2019, Eq. 5 with the paper's code's stage
    weights): each student stage map (before its ReLU) goes through a connector r_i (1x1
    convolution to the teacher's channels, no bias, then BatchNorm), the teacher's map (before
    its ReLU) is average-pooled to the student's size where they differ, and

        L = sum_i d_p(max(T_i, m_i), r_i(S_i)) / 2^(n-1-i)     (i = 0 .. n-1, shallowest first)

    ``in_channels``, ``out_channels``: the student's and the teacher's stage channels.
    The margins m_i [1, C_t, 1, 1] are given by :meth:`set_margins` (buffers, never trained, not
    saved: they are read from the teacher again when the loss is built).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]) -> None:
        super().__init__()
        self.connectors = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out))
            for c_in, c_out in zip(in_channels, out_channels))
        for connector in self.connectors:
            conv, bn = connector
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / conv.out_channels))  # He init over fan-out (1x1)
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)
        for i, c_out in enumerate(out_channels):
            self.register_buffer(f"margin{i}", torch.zeros(1, c_out, 1, 1), persistent=False)
        self.has_margins = False

    def margins(self) -> list[torch.Tensor]:
        """The margins m_i [1, C_t, 1, 1], shallowest stage first."""
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    def set_margins(self, margins: Sequence[torch.Tensor]) -> None:
        """Set the stages' margins (each [C_t]; see :func:`ofd_margin`)."""
        for buffer, margin in zip(self.margins(), margins):
            buffer.copy_(margin.detach().reshape(buffer.shape))
        self.has_margins = True

    def per_stage(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
        """d_p of each stage, unweighted, stacked [n] (the teacher's maps are detached)."""
        if not self.has_margins:
            raise RuntimeError("OFDLoss: set the margins (set_margins, or OFD.bind) before the forward")
        connected = [connector(f) for connector, f in zip(self.connectors, feats_s)]
        targets = [f.detach() for f in feats_t]
        targets = [t if t.shape[2:] == s.shape[2:] else F.adaptive_avg_pool2d(t, s.shape[2:])
                   for s, t in zip(connected, targets)]
        return _stage_distances(connected, targets, self.margins())

    def forward(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
        """feats_s, feats_t: the stage maps before their ReLU, shallowest first. Returns L."""
        per_stage = self.per_stage(feats_s, feats_t)
        n = per_stage.shape[0]
        weights = torch.tensor([2.0 ** -(n - 1 - i) for i in range(n)], device=per_stage.device)
        return (per_stage * weights).sum()


@fp32  # sums of ~1e5 squares: float32
def _stage_distances(connected: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                     margins: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([partial_l2(s, t, m.to(s.dtype)) for s, t, m in zip(connected, targets, margins)])


def teacher_margins(teacher: nn.Module, channels_t: Sequence[int]) -> list[torch.Tensor]:
    """The margins [C] of the teacher's stage maps: :func:`ofd_margin` of each BatchNorm its
    ``get_bn_before_relu()`` gives, after the channels that bypass it (``preact_passthrough_channels``
    of the model contract: ShuffleV2's units pass half their input, already after a ReLU, so
    never negative; their margin is 0, which gives the same loss as any non-positive one)."""
    if not hasattr(teacher, "get_bn_before_relu"):
        raise UserError(f"--distill ofd needs the teacher's BatchNorms before its stages' ReLUs "
                        f"(get_bn_before_relu()); {type(teacher).__name__} has none")
    bns = list(teacher.get_bn_before_relu())
    passthrough = preact_passthrough_channels(teacher)
    if not all(isinstance(bn, nn.modules.batchnorm._BatchNorm) for bn in bns):
        raise UserError("--distill ofd reads the teacher's BatchNorms, but they were folded into its convolutions "
                        "(the fast teacher path): build the teacher with prepare_teacher(..., fast=False)")
    got = [p + bn.num_features for p, bn in zip(passthrough, bns)]
    if len(bns) != len(channels_t) or got != list(channels_t):
        raise UserError(f"--distill ofd needs one BatchNorm per teacher stage with its channels: "
                        f"{type(teacher).__name__}'s get_bn_before_relu() covers {got}, its stages have "
                        f"{list(channels_t)}")
    return [torch.cat([torch.zeros(p, device=bn.weight.device), ofd_margin(bn.weight, bn.bias)])
            for p, bn in zip(passthrough, bns)]


@register("ofd")
class OFD(Distiller):
    """``--distill ofd``: :class:`OFDLoss` on the stage maps before their ReLU, ``feats[1:-1]``
    of both networks (``preact = True``; the stem and the pooled vector are no stage); one term
    ``ofd``. The margins are read from the teacher's BatchNorms by :meth:`bind`.

    Published weights ``-r 1 -a 0 -b 0.001`` (mdistiller's CE_WEIGHT 1, FEAT_WEIGHT 0.001; the
    paper's code divides the batch-averaged sum by 1000). The paper and mdistiller agree on the
    loss; they differ on the teacher: the paper distils from a frozen teacher (eval mode, the
    default, ``--ofd_teacher_bn eval``), mdistiller's OFD never puts the teacher in eval mode, so
    its BatchNorms use the batch's statistics and update their running statistics
    (``--ofd_teacher_bn train`` reproduces it; see :meth:`teacher_train_mode`). Both networks
    must have the same number of stages (refused otherwise when built). On ImageNet, mdistiller's
    ResNet50 -> MobileNetV1 recipe is ``-b 0.0001`` with lr 0.05 at batch 128.
    """

    Options = OFDOptions
    preact = True
    weights = (1.0, 0.0, 0.001)
    reads_teacher_batchnorm = True

    def __init__(self, options: OFDOptions, ctx: BuildContext) -> None:
        super().__init__()
        if options.ofd_teacher_bn not in TEACHER_BN_MODES:
            raise UserError(f"--ofd_teacher_bn must be one of {', '.join(TEACHER_BN_MODES)}, "
                            f"not '{options.ofd_teacher_bn}'")
        stages_s, stages_t = ctx.feats_s[1:-1], ctx.feats_t[1:-1]
        if len(stages_s) != len(stages_t) or not stages_s:
            raise UserError(f"--distill ofd needs as many stages in the student as in the teacher: "
                            f"{ctx.model_s or 'the student'} has {len(stages_s)}, "
                            f"{ctx.model_t or 'the teacher'} {len(stages_t)}")
        if any(len(shape) != 4 for shape in stages_s + stages_t):
            raise UserError("--distill ofd needs stage maps [B, C, H, W]; got "
                            f"{[list(s[1:]) for s in stages_s]} and {[list(s[1:]) for s in stages_t]}")
        self.teacher_bn = options.ofd_teacher_bn
        self.channels_t = [int(s[1]) for s in stages_t]
        self.loss = OFDLoss([int(s[1]) for s in stages_s], self.channels_t)

    @property
    def connectors(self) -> nn.ModuleList:
        """The connectors r_i, shallowest stage first (mdistiller's ``connectors``)."""
        return self.loss.connectors

    def teacher_train_mode(self) -> bool:
        """``--ofd_teacher_bn train``: the loop runs the teacher in train mode (no gradient)."""
        return self.teacher_bn == "train"

    @torch.no_grad()
    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Read the margins from the teacher's BatchNorms (see :func:`teacher_margins`)."""
        self.loss.set_margins(teacher_margins(teacher, self.channels_t))

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """s.feats, t.feats: both networks' features before their stages' last ReLU."""
        if not self.loss.has_margins:
            raise RuntimeError("--distill ofd: call bind(student, teacher) before forward")
        return {"ofd": self.loss(s.feats[1:-1], t.feats[1:-1])}
