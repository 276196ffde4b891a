"""AT: Zagoruyko and Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer" (ICLR 2017)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import detached, fp32, pool_to_smaller
from .registry import Batch, BuildContext, Distiller, NetOutput, NoOptions, register


class Attention(nn.Module):
    """Attention transfer (Eq. 2), per layer pair, with the squared L2 distance averaged:

        Q(f) = normalize(mean_c f^p)  (a [B, H*W] row per sample),   AT = mean((Q(f_s) - Q(f_t))^2)

    The taller map is average-pooled to the other's size first.
    """

    def __init__(self, p: float = 2) -> None:
        super().__init__()
        self.p = p

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """g_s, g_t: lists of maps [B, C, H, W] -> one scalar per pair."""
        return [self.at_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    @fp32  # the maps of student and teacher are close: their difference needs float32
    def at_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        return (self.at(f_s) - self.at(f_t)).pow(2).mean()

    def at(self, f: torch.Tensor) -> torch.Tensor:
        """f: [B, C, H, W] -> attention map [B, H*W] of unit L2 norm."""
        return F.normalize(f.pow(self.p).mean(1).view(f.shape[0], -1))


@register("attention")
class AttentionDistiller(Distiller):
    """``--distill attention``: AT summed over the stage outputs ``feats[1:-1]``."""

    weights = (1.0, 0.0, 1000.0)

    def __init__(self, options: NoOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.loss = Attention()

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {"attention": sum(self.loss(s.feats[1:-1], detached(t.feats[1:-1])))}
