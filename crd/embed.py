"""CRD's embedding head: a linear projection onto the unit sphere."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Embed(nn.Module):
    """The heads g^S and g^T of "Contrastive Representation Distillation" (Tian, Krishnan & Isola,
    ICLR 2020, §3): ``g(x) = normalize(W x + b)``, a linear map followed by L2 normalisation, so
    that the critic's dot products are cosine similarities.

    Parameters ``linear.weight`` [dim_out, dim_in] and ``linear.bias`` [dim_out], as in RepDistiller.
    """

    def __init__(self, dim_in: int = 1024, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, dim_in] (or [B, ...] flattening to dim_in) -> unit vectors [B, dim_out]."""
        return F.normalize(self.linear(x.flatten(1)), p=2, dim=1)
