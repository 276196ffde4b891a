"""NST: Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (2017)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import detached, fp32, pool_to_smaller
from .registry import Batch, BuildContext, Distiller, NetOutput, NoOptions, register


def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Polynomial kernel k(x, y) = (x . y)^2 between all channel vectors: [B, C_a, N], [B, C_b, N] -> [B, C_a, C_b]."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2)


class NSTLoss(nn.Module):
    """Neuron selectivity transfer: squared MMD with the polynomial kernel (d = 2, c = 0)
    between the spatially L2-normalised channel vectors of the two maps:

        NST = mean k(t, t) + mean k(s, s) - 2 mean k(s, t)

    (the taller map is average-pooled first; the teacher-only term carries no gradient).
    """

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """g_s, g_t: lists of maps [B, C, H, W] (channel counts may differ) -> one scalar per pair."""
        return [self.nst_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    @staticmethod
    @fp32  # MMD^2 is a difference of three close kernel means
    def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        s = F.normalize(f_s.flatten(2), dim=2)
        t = F.normalize(f_t.flatten(2), dim=2)
        n, c_s, c_t = s.shape[2], s.shape[1], t.shape[1]
        if n * (2 * c_s + c_t) < 2 * c_s * c_s + 2 * c_s * c_t + c_t * c_t:
            return NSTLoss.position_form(s, t)
        return poly_kernel(t, t).mean().detach() + poly_kernel(s, s).mean() - 2 * poly_kernel(s, t).mean()

    @staticmethod
    def position_form(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The same MMD from the [B, N, N] Gram matrices of the positions, cheaper when a map has
        fewer positions N than channels: ``sum_ij (s_i . t_j)^2 = <S^T S, T^T T>``, so

            NST = mean_b || S_b^T S_b / C_s - T_b^T T_b / C_t ||_F^2

        (S_b [C_s, N] the normalised channel vectors of sample b); the teacher's Gram is a constant."""
        gram_s = torch.bmm(s.transpose(1, 2), s).div_(s.shape[1])
        with torch.no_grad():
            gram_t = torch.bmm(t.transpose(1, 2), t).div_(t.shape[1])
        return (gram_s - gram_t).pow(2).sum() / s.shape[0]


@register("nst")
class NSTDistiller(Distiller):
    """``--distill nst``: NST summed over the stage outputs ``feats[1:-1]``."""

    weights = (1.0, 0.0, 50.0)

    def __init__(self, options: NoOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.loss = NSTLoss()

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {"nst": sum(self.loss(s.feats[1:-1], detached(t.feats[1:-1])))}
