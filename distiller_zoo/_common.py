"""Small shape helpers shared by the feature-map losses."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def pool_to_smaller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool whichever of two maps [B, C, H, W] is taller to the other's spatial size
    (RepDistiller's rule for AT, FT, NST, VID and FSP; channel counts are left alone)."""
    if a.shape[2] > b.shape[2]:
        a = F.adaptive_avg_pool2d(a, b.shape[2:])
    elif a.shape[2] < b.shape[2]:
        b = F.adaptive_avg_pool2d(b, a.shape[2:])
    return a, b


def detached(feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The teacher's features cut from any graph: distillation never trains the teacher."""
    return [f.detach() for f in feats]


def channels(feats: Sequence[torch.Tensor]) -> list[int]:
    """Channel counts of a list of maps [B, C, H, W]."""
    return [int(f.shape[1]) for f in feats]
