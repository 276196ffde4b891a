"""PKT: Passalis and Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer" (ECCV 2018)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ._common import fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, NoOptions, register


class PKT(nn.Module):
    """Probabilistic knowledge transfer with the cosine-similarity kernel: conditional probabilities

        p_ij = (cos(f_i, f_j) + 1) / 2 / sum_k (cos(f_i, f_k) + 1) / 2,
        PKT = mean_ij p_t_ij * log((p_t_ij + eps) / (p_s_ij + eps))
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    @fp32  # cosine kernels, row normalisation and a log ratio
    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """f_s: [B, D_s]; f_t: [B, D_t] -> scalar (float32)."""
        p_s, p_t = self.probabilities(f_s), self.probabilities(f_t)
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()

    def probabilities(self, f: torch.Tensor) -> torch.Tensor:
        """f: [B, D] -> row-stochastic cosine-kernel affinities [B, B] (NaNs in f give zero cosines)."""
        unit = f / (f.pow(2).sum(1, keepdim=True).sqrt() + self.eps)
        unit = unit.masked_fill(unit.isnan(), 0.0)
        similarity = (unit @ unit.t() + 1.0) / 2.0
        return similarity / similarity.sum(1, keepdim=True)


@register("pkt")
class PKTDistiller(Distiller):
    """``--distill pkt``: PKT on the pooled features ``feats[-1]``."""

    weights = (1.0, 0.0, 30000.0)

    def __init__(self, options: NoOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.loss = PKT()

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {"pkt": self.loss(s.feats[-1], t.feats[-1].detach())}
