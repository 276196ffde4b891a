"""FSP: Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization
and Transfer Learning" (CVPR 2017)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from common.errors import UserError

from ._common import channels, detached, fp32, pool_to_smaller
from .registry import Batch, BuildContext, Distiller, NetOutput, NoOptions, register


class FSP(nn.Module):
    """Flow-of-solution-procedure matrices (Eq. 1) between consecutive maps and their squared
    distance (Eq. 2, averaged):

        G(bot, top)[j, i] = mean_{h,w} bot[i, h, w] * top[j, h, w],   FSP = mean((G_s - G_t)^2)

    (the taller of two consecutive maps is average-pooled first). Needs equal channel counts.
    """

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if len(s_shapes) != len(t_shapes):
            raise ValueError(f"FSP: unequal numbers of student ({len(s_shapes)}) and teacher ({len(t_shapes)}) maps")
        s_c, t_c = [s[1] for s in s_shapes], [t[1] for t in t_shapes]
        if s_c != t_c:
            raise ValueError(f"FSP: channel counts differ (student {s_c}, teacher {t_c})")

    @fp32  # Gram matrices over H*W positions, then squared differences
    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """g_s, g_t: lists of n maps [B, C_i, H_i, W_i] -> n - 1 scalars (float32)."""
        return [(s - t).pow(2).mean() for s, t in zip(self.compute_fsp(g_s), self.compute_fsp(g_t))]

    @staticmethod
    def compute_fsp(g: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """n maps -> n - 1 matrices [B, C_{i+1}, C_i]."""
        matrices = []
        for bot, top in zip(g[:-1], g[1:]):
            bot, top = pool_to_smaller(bot, top)
            bot = bot.flatten(2)  # [B, C_i, HW]
            top = top.flatten(2)  # [B, C_{i+1}, HW]
            matrices.append(top @ bot.transpose(1, 2) / bot.shape[2])
        return matrices


@register("fsp")
class FSPDistiller(Distiller):
    """``--distill fsp``: init stage only; FSP summed over ``feats[:-1]`` trains the student's
    feature layers; the main stage is plain CE (+KD)."""

    weights = (1.0, 0.0, 50.0)
    has_init_stage = True

    def __init__(self, options: NoOptions, ctx: BuildContext) -> None:
        super().__init__()
        s_c, t_c = channels(ctx.feats_s[:-1]), channels(ctx.feats_t[:-1])
        if s_c != t_c:
            raise UserError(f"FSP needs a student and a teacher with the same channel counts at every stage "
                            f"(student {s_c}, teacher {t_c}); use another --distill, or a pair of equal "
                            f"widths such as resnet32x4 -> resnet8x4")
        self.loss = FSP(list(ctx.feats_s[:-1]), list(ctx.feats_t[:-1]))

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {}

    def init_trains_student(self) -> bool:
        return True

    def init_loss(self, s: NetOutput, t: NetOutput, batch: Batch) -> torch.Tensor:
        return sum(self.loss(s.feats[:-1], detached(t.feats[:-1])))
