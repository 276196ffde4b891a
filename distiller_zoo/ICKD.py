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
    """The student's embedding into the teacher's channel space: a ``kernel`` x ``kernel``
    convolution (stride 1, "same" padding, no bias) and BatchNorm, ``e = BN(W * f_s)`` (the spatial
    size is kept). ``kernel`` 1 is the paper's linear transformation (the authors' CIFAR code);
    3 is torchdistill's ``ChannelSimilarityEmbed``."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=1, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """f: [B, c_in, H, W] -> [B, c_out, H, W]."""
        return self.bn(self.conv(f))


@dataclass
class ICKDOptions:
    """ICKD"""

    ickd_batch_squared: bool = option(False, "ICKD: divide the summed squared ICC differences by C*B*B as "
                                             "torchdistill's ChSimLoss does (default: C*B, a batch mean, as the "
                                             "authors' code)")
    ickd_kernel: int = option(1, "ICKD: kernel size of the student's embedding convolution: 1 (the paper's "
                                 "linear map, the authors' CIFAR code) or 3 (torchdistill's)", choices=(1, 3))


@register("ickd")
class ICKD(Distiller):
    """``--distill ickd``: :class:`ICKDLoss` between ``ChannelEmbed(student's feats[-2])`` and the
    teacher's ``feats[-2]`` (the last stage's map; any spatial sizes, since the ICC matrices are
    C x C).

    Published weights ``-r 1 -a 0 -b 2.5``: the authors' CIFAR-100 recipe (ICKD-C without KL; add
    ``-a 1`` for ICKD-C with KL), with their 1x1 embedding and batch-mean divisor C B (the defaults).
    torchdistill's ImageNet configuration, the reference of the goldens, is ``--ickd_kernel 3
    --ickd_batch_squared -r 0.5 -a 0.5 -b 500 --kd_T 1`` (its 500 goes with the divisor C B^2).
    """

    Options = ICKDOptions
    weights = (1.0, 0.0, 2.5)

    def __init__(self, options: ICKDOptions, ctx: BuildContext) -> None:
        super().__init__()
        for who, name, feats in (("student", ctx.model_s, ctx.feats_s), ("teacher", ctx.model_t, ctx.feats_t)):
            if len(feats) < 2 or len(feats[-2]) != 4:
                got = list(feats[-2][1:]) if len(feats) >= 2 else "no such feature"
                raise UserError(f"--distill ickd needs a map [B, C, H, W] as the {who}'s feats[-2] (its last "
                                f"stage); the {who} {name or ''} gives {got}".replace("  ", " "))
        self.embed = ChannelEmbed(int(ctx.feats_s[-2][1]), int(ctx.feats_t[-2][1]), options.ickd_kernel)
        self.loss = ICKDLoss(options.ickd_batch_squared)

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {"ickd": self.loss(self.embed(s.feats[-2]), t.feats[-2].detach())}
