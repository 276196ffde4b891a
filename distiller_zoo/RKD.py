"""RKD: Park et al., "Relational Knowledge Distillation" (CVPR 2019)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, NoOptions, register


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """e: [B, D] -> Euclidean distances [B, B] (squares clamped at ``eps``, zero diagonal)."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d.masked_fill(torch.eye(len(e), dtype=torch.bool, device=e.device), 0.0)


def normalized_distances(e: torch.Tensor) -> torch.Tensor:
    """Distance potential psi_D: distances over the mean of the positive ones, [B, B]."""
    d = pairwise_distances(e)
    return d / d[d > 0].mean()


def angles(e: torch.Tensor) -> torch.Tensor:
    """Angle potential psi_A: cos of the angle at e_i between e_j and e_k, [B*B*B]."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [i, j] = unit(e_j - e_i)
    return torch.bmm(diff, diff.transpose(1, 2)).view(-1)


class RKDLoss(nn.Module):
    """Distance-wise (RKD-D) and angle-wise (RKD-A) relational losses with the Huber (smooth L1) loss:

        RKD = w_d * smoothL1(psi_D(s), psi_D(t)) + w_a * smoothL1(psi_A(s), psi_A(t))
    """

    def __init__(self, w_d: float = 25, w_a: float = 50) -> None:
        super().__init__()
        self.w_d = w_d
        self.w_a = w_a

    @fp32  # |a|^2 + |b|^2 - 2 a.b cancels; distances and angles are divided and compared
    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """f_s, f_t: [B, ...] (flattened per sample) -> scalar (float32)."""
        student = f_s.reshape(f_s.shape[0], -1)
        with torch.no_grad():
            teacher = f_t.reshape(f_t.shape[0], -1)
            t_dist, t_angle = normalized_distances(teacher), angles(teacher)
        loss_d = F.smooth_l1_loss(normalized_distances(student), t_dist)
        loss_a = F.smooth_l1_loss(angles(student), t_angle)
        return self.w_d * loss_d + self.w_a * loss_a


@register("rkd")
class RKDDistiller(Distiller):
    """``--distill rkd``: RKD on the pooled features ``feats[-1]``."""

    weights = (1.0, 0.0, 1.0)

    def __init__(self, options: NoOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.loss = RKDLoss()

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {"rkd": self.loss(s.feats[-1], t.feats[-1].detach())}
