"""KD: Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (NIPS 2014 workshop)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, NoOptions, register


class DistillKL(nn.Module):
    """Soft-target loss of Hinton et al. (Sec. 2), scaled by T^2 so its gradients keep their size:

        KD = T^2 / B * sum_b KL(softmax(y_t[b] / T) || softmax(y_s[b] / T))
    """

    def __init__(self, T: float) -> None:
        super().__init__()
        self.T = T

    @fp32
    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        """y_s, y_t: logits [B, num_classes] -> scalar (float32, also for fp16/bf16 logits under autocast)."""
        log_p_s = F.log_softmax(y_s / self.T, dim=1)
        p_t = F.softmax(y_t / self.T, dim=1)
        return F.kl_div(log_p_s, p_t, reduction="sum") * self.T**2 / y_s.shape[0]


@register("kd")
class KDDistiller(Distiller):
    """``--distill kd``: no term of its own; the loop's ``alpha * KL_T`` is the whole method."""

    weights = (0.1, 0.9, 0.0)
    kd_is_own_loss = True

    def __init__(self, options: NoOptions, ctx: BuildContext) -> None:
        super().__init__()

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {}
