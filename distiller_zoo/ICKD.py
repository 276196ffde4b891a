"""ICKD: Liu et al., "Exploring Inter-Channel Correlation for Diversity-preserved Knowledge
Distillation" (ICCV 2021)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.declare import option
from common.errors import UserError

from ._common import fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, register


def channel_correlation(f: torch.Tensor) -> torch.Tensor:
    """The inter-channel correlation (ICC) matrix of a map, its rows L2-normalised:

        G_mn = <vec(F_m), vec(F_n)>,   G^_m = G_m / ||G_m||_2

    f: [B, C, H, W] -> [B, C, C]."""
    flat = f.flatten(2)
    return F.normalize(torch.bmm(flat, flat.transpose(1, 2)), dim=2)


class ICKDLoss(nn.Module):
    """The inter-channel correlation loss between the student's embedded map and the teacher's:

        L_ICKD = 1 / (C B) * sum_b sum_{m,n} (G^T_b,mn - G^S_b,mn)^2

    with ``G`` the row-normalised ICC matrices of :func:`channel_correlation` (C x C per sample,
    so the two maps may differ in size as long as they have the same channels C): the sum over
    each sample's C x C matrix divided by C, averaged over the batch of B.

    ``batch_squared``: divide by ``C B^2`` instead (B twice), as torchdistill's ``ChSimLoss``
    does; its published term weight (500) was tuned with that divisor.
    """

    def __init__(self, batch_squared: bool = False) -> None:
        super().__init__()
        self.batch_squared = batch_squared

    @fp32  # Gram matrices over H*W positions and their normalisation
    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """f_s: the student's embedded map [B, C, H_s, W_s]; f_t: the teacher's [B, C, H_t, W_t]
        -> scalar (float32)."""
        b, c = f_s.shape[:2]
        diff = channel_correlation(f_s) - channel_correlation(f_t)
        divisor = c * b * (b if self.batch_squared else 1)
        return diff.pow(2).sum() / divisor


class ChannelEmbed(nn.Module):
    """The student's embedding into the teacher's channel space: a 3x3 convolution (stride 1,
    padding 1, no bias) and BatchNorm, ``e = BN(W * f_s)`` (the spatial size is kept)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """f: [B, c_in, H, W] -> [B, c_out, H, W]."""
        return self.bn(self.conv(f))


@dataclass
class ICKDOptions:
    """ICKD"""

    ickd_batch_squared: bool = option(False, "ICKD: divide the summed squared ICC differences by C*B*B as "
                                             "torchdistill's ChSimLoss does (default: C*B, a batch mean)")


@register("ickd")
class ICKD(Distiller):
    """``--distill ickd``: :class:`ICKDLoss` between ``ChannelEmbed(student's feats[-2])`` and the
    teacher's ``feats[-2]`` (the last stage's map; any spatial sizes, since the ICC matrices are
    C x C).

    Published weights ``-r 0.5 -a 0.5 -b 500``: torchdistill's ICKD configuration (ResNet34 ->
    ResNet18, ImageNet), ``KDLoss(temperature=1, alpha=0.5)`` (0.5 CE + 0.5 KL at T = 1: pass
    ``--kd_T 1``) plus 500 times the ChSim term. That weight goes with the reference's divisor
    C B^2 (``--ickd_batch_squared``); the default divides by C B (a batch mean), B times more.
    The reference's 3x3 embedding is kept (the paper only asks for a linear transformation).
    """

    Options = ICKDOptions
    weights = (0.5, 0.5, 500.0)

    def __init__(self, options: ICKDOptions, ctx: BuildContext) -> None:
        super().__init__()
        for who, name, feats in (("student", ctx.model_s, ctx.feats_s), ("teacher", ctx.model_t, ctx.feats_t)):
            if len(feats) < 2 or len(feats[-2]) != 4:
                got = list(feats[-2][1:]) if len(feats) >= 2 else "no such feature"
                raise UserError(f"--distill ickd needs a map [B, C, H, W] as the {who}'s feats[-2] (its last "
                                f"stage); the {who} {name or ''} gives {got}".replace("  ", " "))
        self.embed = ChannelEmbed(int(ctx.feats_s[-2][1]), int(ctx.feats_t[-2][1]))
        self.loss = ICKDLoss(options.ickd_batch_squared)

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {"ickd": self.loss(self.embed(s.feats[-2]), t.feats[-2].detach())}
