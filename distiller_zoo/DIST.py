"""DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.argtypes import nonnegative_float, positive_float
from common.declare import option

from ._common import fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, register

COSINE_EPS = 1e-8  # the authors' cosine: (a . b) / (|a| |b| + eps)


def pearson_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - mean_i rho(a_i, b_i)`` over the rows of ``a`` and ``b`` [N, C], with the Pearson
    correlation rho(u, v) = cos(u - mean(u), v - mean(v)) (Eq. 3 of the paper: d_p = 1 - rho)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    cos = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + COSINE_EPS)
    return 1 - cos.mean()


class DISTLoss(nn.Module):
    """DIST's relations of the predictions Y = softmax(logits / tau) [B, C] (Eqs. 4-6):

        inter = tau^2 * (1 - 1/B sum_i rho(Y_s[i, :], Y_t[i, :]))    (each sample's class ranking)
        intra = tau^2 * (1 - 1/C sum_j rho(Y_s[:, j], Y_t[:, j]))    (each class over the batch)

    returned as the pair (inter, intra) (float32); the loss is ``beta * inter + gamma * intra``."""

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    @fp32
    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y_s, y_t: logits [B, C] -> (inter, intra), scalars."""
        p_s, p_t = F.softmax(y_s / self.tau, dim=1), F.softmax(y_t / self.tau, dim=1)
        scale = self.tau ** 2
        return scale * pearson_distance(p_s, p_t), scale * pearson_distance(p_s.t(), p_t.t())


@dataclass
class DISTOptions:
    """DIST"""

    dist_tau: float = option(4.0, "DIST: temperature of the predictions (the authors' CIFAR recipe 4; ImageNet 1)",
                             type=positive_float)
    dist_beta: float = option(1.0, "DIST: weight of the inter-class relation (each sample's class ranking)",
                              type=nonnegative_float)
    dist_gamma: float = option(1.0, "DIST: weight of the intra-class relation (each class over the batch)",
                               type=nonnegative_float)


@register("dist")
class DIST(Distiller):
    """``--distill dist``: :class:`DISTLoss` on the two networks' logits, terms ``dist_inter``
    (``beta * inter``) and ``dist_intra`` (``gamma * intra``).

    Published weights ``-r 1 -a 0 -b 2`` with ``--dist_tau 4``: the authors' CIFAR-100 recipe
    (``kd_loss_weight 2``, ``ori_loss_weight 1``, ``dist_t4``); their ImageNet one is
    ``--dist_tau 1`` with the same weights. The authors' code and torchdistill's ``DISTLoss``
    agree (they differ only in where the cosine's epsilon goes, ~1e-7)."""

    Options = DISTOptions
    weights = (1.0, 0.0, 2.0)

    def __init__(self, options: DISTOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.loss = DISTLoss(options.dist_tau)
        self.beta, self.gamma = options.dist_beta, options.dist_gamma

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        inter, intra = self.loss(s.logits, t.logits.detach())
        return {"dist_inter": self.beta * inter, "dist_intra": self.gamma * intra}
