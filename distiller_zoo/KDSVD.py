"""KDSVD: Lee, Kim and Song, "Self-supervised Knowledge Distillation Using Singular Value
Decomposition" (ECCV 2018)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError

from ._common import channels, detached, fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, NoOptions, register


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class KDSVD(nn.Module):
    """SVD knowledge distillation: each map [B, C, H, W], seen as H*W samples of C
    features, is reduced to its leading right singular vectors ``v`` [B, C, n] (k for the teacher,
    k + 3 for the student, whose vectors are then matched to the teacher's by sign and largest
    |cosine|), scaled by the teacher's normalised singular values. Consecutive layers are related
    by an RBF between all channel pairs and the student's relation regresses onto the teacher's:

        R(v_i, v_{i-1})[c, c'] = exp(-(v_i[c] - v_{i-1}[c'])^2 / 8),   KDSVD_i = sum (R_s - R_t)^2 / B

    One value per layer after the first. Student and teacher need equal channel counts.
    """

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        self.k = k

    @fp32  # torch.linalg.svd has no bf16 kernel; RBF of scaled singular vectors
    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """g_s, g_t: lists of n maps [B, C_i, H_i, W_i] -> n - 1 scalars (float32)."""
        losses = []
        v_s_prev = v_t_prev = None
        for f_s, f_t in zip(g_s, g_t):
            s_t, v_t = self.svd(f_t, self.k)
            _, v_s = self.svd(f_s, self.k + 3)
            v_s = self.align_rsv(v_s, v_t)
            v_t = v_t * s_t.unsqueeze(1)
            v_s = v_s * s_t.unsqueeze(1)
            if v_s_prev is not None:
                rbf_s = self.rbf(v_s, v_s_prev)
                rbf_t = self.rbf(v_t, v_t_prev).detach()
                losses.append(finite_or_zero((rbf_s - rbf_t).pow(2)).sum())
            v_s_prev, v_t_prev = v_s, v_t
        bsz = g_s[0].shape[0]
        return [loss / bsz for loss in losses]

    @staticmethod
    @fp32
    def svd(feat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """feat: [B, C, H, W] -> leading singular values [B, n] and right singular vectors [B, C, n],
        each L2-normalised over dim 1 (non-finite entries zeroed first)."""
        x = feat.flatten(2).transpose(1, 2)  # [B, HW, C]
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        s, v = finite_or_zero(s), finite_or_zero(vh.transpose(1, 2))
        return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)

    @staticmethod
    def align_rsv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """For each vector of b [B, C, k], the vector of a [B, C, n] with the largest |cosine|,
        sign-flipped to agree with it -> [B, C, k]."""
        cosine = a.transpose(1, 2) @ b  # [B, n, k]
        with torch.no_grad():
            best = cosine.abs() == cosine.abs().max(1, keepdim=True).values
            selection = torch.where(best, cosine.sign(), torch.zeros_like(cosine))
        return a @ selection

    @staticmethod
    def rbf(v: torch.Tensor, v_prev: torch.Tensor) -> torch.Tensor:
        """v: [B, C, k], v_prev: [B, C', k] -> [B, C, C', k]."""
        return torch.exp(-(v.unsqueeze(2) - v_prev.unsqueeze(1)).pow(2) / 8)


@register("kdsvd")
class KDSVDDistiller(Distiller):
    """``--distill kdsvd``: KDSVD summed over the stage outputs ``feats[1:-1]``."""

    weights = (1.0, 0.0, 1.0)

    def __init__(self, options: NoOptions, ctx: BuildContext) -> None:
        super().__init__()
        s_c, t_c = channels(ctx.feats_s[1:-1]), channels(ctx.feats_t[1:-1])
        if s_c != t_c:
            raise UserError(f"KDSVD needs a student and a teacher with the same channel counts at every stage "
                            f"(student {s_c}, teacher {t_c}); use another --distill, or a pair of equal "
                            f"widths such as resnet32x4 -> resnet8x4")
        self.loss = KDSVD()

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {"kdsvd": sum(self.loss(s.feats[1:-1], detached(t.feats[1:-1])))}
