"""SP: Tung and Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import detached, fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, NoOptions, register


class Similarity(nn.Module):
    """Similarity-preserving loss (the paper's Eq. 4, with row-normalised Gram matrices), per layer pair:

        G = row_normalize(f f^T)  (f flattened to [B, D]),   SP = ||G_t - G_s||_F^2 / B^2

    Each value has shape [1], as in RepDistiller.
    """

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """g_s, g_t: lists of features [B, ...] (any shape per sample) -> one [1] tensor per pair."""
        return [self.similarity_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    @staticmethod
    def gram(f: torch.Tensor) -> torch.Tensor:
        """f: [B, ...] -> row-normalised sample similarities [B, B]."""
        f = f.reshape(f.shape[0], -1)
        return F.normalize(f @ f.t())

    @fp32  # Gram matrices of long vectors, normalised, then subtracted
    def similarity_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        bsz = f_s.shape[0]
        return (self.gram(f_t) - self.gram(f_s)).pow(2).sum().reshape(1) / (bsz * bsz)


@register("similarity")
class SimilarityDistiller(Distiller):
    """``--distill similarity``: SP on the last stage's map ``feats[-2]``."""

    weights = (1.0, 0.0, 3000.0)

    def __init__(self, options: NoOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.loss = Similarity()

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        (loss,) = self.loss([s.feats[-2]], detached([t.feats[-2]]))
        return {"similarity": loss.squeeze(0)}
