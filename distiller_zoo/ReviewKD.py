"""ReviewKD: Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.argtypes import nonnegative_int
from common.declare import option
from common.errors import UserError

from ._common import fp32
from .DKD import warmup_factor
from .registry import Batch, BuildContext, Distiller, NetOutput, register

MAX_MID_CHANNELS = 512  # the ABFs' width: min(512, the student's pooled width), as the authors' code


@dataclass
class ReviewKDOptions:
    """ReviewKD"""

    reviewkd_warmup: int = option(20, "ReviewKD: epochs of linear warm-up, factor min(epoch / warmup, 1); 0: none "
                                      "(default 20, mdistiller's)", type=nonnegative_int)


class ABF(nn.Module):
    """Attention-based fusion (ABF) of one level. The student's map ``x`` [B, C_in, h, w] is
    projected to ``mid`` channels (1x1 conv + BN); with ``fuse``, the deeper level's residual
    ``r`` [B, mid, h', w'] is resized to h x w (nearest) and mixed by two sigmoid attention maps
    from a 1x1 conv over their concatenation:

        x' = BN(W_1 x),   [a_x, a_r] = sigmoid(W_att [x'; up(r)] + b_att),   f = a_x * x' + a_r * up(r)

    ``f`` (resized, nearest, to the teacher's ``out_size``) is the residual handed to the next,
    shallower level, and ``BN(W_3 f)`` (3x3 conv to ``C_out``, the teacher's channels) the
    reviewed feature compared with the teacher's. Parameters: ``conv1`` (1x1 conv, BN),
    ``conv2`` (3x3 conv, BN), ``att_conv`` (1x1 conv with bias, sigmoid; only when ``fuse``).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        for conv in (self.conv1[0], self.conv2[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C_in, h, w]; residual [B, mid, h', w'] (None at the deepest level). Returns
        (the reviewed feature [B, C_out, out_size, out_size], the residual for the next level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            att = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * att[:, :1] + residual * att[:, 1:]
        if x.shape[-1] != out_size:
            x = F.interpolate(x, size=(out_size, out_size), mode="nearest")
        return self.conv2(x), x


def hcl(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Hierarchical context loss of one level: the MSE of the maps [B, C, H, W] and of their
    average-pooled 4x4, 2x2 and 1x1 versions, weighted 1, 1/2, 1/4, 1/8 and normalised by the sum of
    the weights used (a pooled size >= H is left out, so a 1x1 level is a plain MSE):

        HCL = sum_k w_k MSE(pool_k(F_s), pool_k(F_t)) / sum_k w_k
    """
    loss, weight, total = F.mse_loss(f_s, f_t), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= f_s.shape[2]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size))
        total += weight
    return loss / total


def as_map(f: torch.Tensor) -> torch.Tensor:
    """A feature as a map: [B, C] -> [B, C, 1, 1]; maps unchanged."""
    return f if f.dim() == 4 else f.reshape(f.shape[0], -1, 1, 1)


class ReviewKDLoss(nn.Module):
    """ReviewKD's review of the student's levels (Chen et al. 2021, Sec. 3): from the deepest level
    to the shallowest, ABF i fuses the student's level i with the residual of the deeper levels,
    and the reviewed features are compared with the teacher's levels by :func:`hcl`:

        L = sum_i HCL(ABF_i(F_s^i, R^{i+1}), F_t^i)

    ``in_channels``, ``sizes`` (spatial), ``out_channels``, ``out_sizes``: the student's and the
    teacher's levels, shallowest first. ``abfs`` holds the fusions deepest first (``abfs.0``
    reads the deepest level without fusion), as the authors' code names them.
    """

    def __init__(self, in_channels: Sequence[int], sizes: Sequence[int], out_channels: Sequence[int],
                 out_sizes: Sequence[int]) -> None:
        super().__init__()
        mid = min(MAX_MID_CHANNELS, in_channels[-1])
        n = len(in_channels)
        abfs = [ABF(c_in, mid, c_out, fuse=i < n - 1) for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels))]
        self.abfs = nn.ModuleList(abfs[::-1])
        self.out_sizes = list(out_sizes)[::-1]

    def review(self, feats_s: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The reviewed student features (maps, shallowest first) of the levels ``feats_s``."""
        reviewed, residual = [], None
        for f, abf, out_size in zip(reversed(feats_s), self.abfs, self.out_sizes):
            out, residual = abf(f, residual, out_size)
            reviewed.insert(0, out)
        return reviewed

    def forward(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
        """feats_s, feats_t: the levels (maps [B, C, H, W], shallowest first). Returns HCL per
        level [n] (sum them for L)."""
        return per_level_hcl(self.review(feats_s), [f.detach() for f in feats_t])


@fp32
def per_level_hcl(reviewed: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`hcl` of each level, stacked [n] (in float32)."""
    return torch.stack([hcl(f_s, f_t) for f_s, f_t in zip(reviewed, feats_t)])


@register("reviewkd")
class ReviewKD(Distiller):
    """``--distill reviewkd``: :class:`ReviewKDLoss` on the stage outputs and the pooled feature,
    ``feats[1:]`` of both networks (the stem ``feats[0]`` is no stage, on either side), times the
    warm-up factor ``min(epoch / --reviewkd_warmup, 1)`` of the 1-based epoch; one term
    ``reviewkd``.

    The student's features are taken after their ReLU, the teacher's before it
    (``preact_s = False``, ``preact_t = True``), as in the authors' code and mdistiller (the paper
    does not say). The paper and the reference (mdistiller) agree on the levels: the stages'
    outputs and the pooled feature, on both sides; the warm-up is mdistiller's (the paper has none;
    ``--reviewkd_warmup 0`` turns it off). Published weights ``-r 1 -a 0 -b 5`` (mdistiller's
    REVIEWKD_WEIGHT 5, the authors' --kd-loss-weight 5.0; on ImageNet mdistiller uses ``-b 1``
    for ResNet34 -> ResNet18 and ``-b 8`` for ResNet50 -> MobileNetV1, with a 1-epoch warm-up and
    the student's pre-ReLU stages, its STU_PREACT, which has no flag here). The ABFs are sized from the probed
    shapes: student level i's channels and size in, the teacher's out; both networks must have the
    same number of levels.
    """

    Options = ReviewKDOptions
    preact_s = False
    preact_t = True
    weights = (1.0, 0.0, 5.0)

    def __init__(self, options: ReviewKDOptions, ctx: BuildContext) -> None:
        super().__init__()
        levels_s, levels_t = ctx.feats_s[1:], ctx.feats_t[1:]
        if len(levels_s) != len(levels_t) or not levels_s:
            raise UserError(f"--distill reviewkd needs as many stages in the student as in the teacher: "
                            f"{ctx.model_s or 'the student'} has {len(levels_s)} levels (stages and pooled), "
                            f"{ctx.model_t or 'the teacher'} {len(levels_t)}")
        for shapes in (levels_s, levels_t):
            if any(len(shape) not in (2, 4) for shape in shapes) or any(len(shape) != 4 for shape in shapes[:-1]):
                raise UserError("--distill reviewkd needs stage maps [B, C, H, W] and a pooled feature [B, C]; got "
                                f"{[list(shape[1:]) for shape in shapes]}")

        def size(shape) -> int:
            return int(shape[-1]) if len(shape) == 4 else 1

        self.warmup = options.reviewkd_warmup
        self.loss = ReviewKDLoss([int(s[1]) for s in levels_s], [size(s) for s in levels_s],
                                 [int(s[1]) for s in levels_t], [size(s) for s in levels_t])

    @property
    def abfs(self) -> nn.ModuleList:
        """The ABFs, deepest level first (the authors' ``abfs``)."""
        return self.loss.abfs

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """s.feats: the student's post-ReLU features; t.feats: the teacher's pre-ReLU ones."""
        per_level = self.loss([as_map(f) for f in s.feats[1:]], [as_map(f) for f in t.feats[1:]])
        return {"reviewkd": warmup_factor(self.epoch, self.warmup) * per_level.sum()}
