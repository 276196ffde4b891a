"""DKD: Zhao, Cui, Song, Qiu and Liang, "Decoupled Knowledge Distillation" (CVPR 2022)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.argtypes import nonnegative_float, nonnegative_int, positive_float
from common.declare import option

from ._common import fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, register

# Subtracted from the (temperature-scaled) target logit so that its softmax weight is exp(-1000) = 0:
# the softmax over the masked logits is the distribution over the non-target classes (p-hat).
MASK_OFFSET = 1000.0


def _binary_kl(log_b_t: torch.Tensor, log_b_s: torch.Tensor) -> torch.Tensor:
    """KL(b_t || b_s) per sample for two-entry distributions given by their logs [B, 2] -> [B]."""
    return (log_b_t.exp() * (log_b_t - log_b_s)).sum(1)


@fp32
def dkd_terms(y_s: torch.Tensor, y_t: torch.Tensor, target: torch.Tensor,
              T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample TCKD and NCKD of Zhao et al. (their reformulation of KD), un-averaged and not scaled by T^2.

    With p = softmax(y / T), the binary distribution b = [p_target, 1 - p_target] and
    p-hat = softmax over the non-target classes only:

        TCKD = KL(b_t || b_s),   NCKD = KL(p-hat_t || p-hat_s),
        KL(p_t || p_s) = TCKD + (1 - p_t[target]) * NCKD

    The target class is taken out of p-hat by subtracting a large constant from its scaled
    logit (a mask, no indexing), so the classes keep their positions. The log of the
    non-target mass, log(1 - p_target), is computed as logsumexp(masked) - logsumexp(all),
    which stays finite when p_target is close to 1.

    y_s, y_t: logits [B, C]; target: labels [B]. Returns (tckd [B], nckd [B]).
    """
    mask = F.one_hot(target, y_s.shape[1]).to(torch.bool)                  # [B, C]
    dtype = torch.promote_types(y_s.dtype, torch.float32)                  # fp16/bf16 logits -> fp32
    z_s, z_t = y_s.to(dtype) / T, y_t.to(dtype) / T
    masked_s = z_s - MASK_OFFSET * mask                                     # target logit lowered by 1000
    masked_t = z_t - MASK_OFFSET * mask

    def log_binary(z: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """[log p_target, log(1 - p_target)] [B, 2]."""
        log_total = torch.logsumexp(z, dim=1)
        log_target = (z * mask).sum(1) - log_total
        log_other = torch.logsumexp(masked, dim=1) - log_total
        return torch.stack([log_target, log_other], dim=1)

    tckd = _binary_kl(log_binary(z_t, masked_t), log_binary(z_s, masked_s))
    log_hat_s = F.log_softmax(masked_s, dim=1)
    log_hat_t = F.log_softmax(masked_t, dim=1)
    # The masked entry has weight exp(-1000) = 0 in p-hat_t, so it adds nothing.
    nckd = (log_hat_t.exp() * (log_hat_t - log_hat_s)).sum(1)
    return tckd, nckd


@dataclass
class DKDOptions:
    """DKD"""

    dkd_alpha: float = option(1.0, "DKD: weight of TCKD, target-class KD (default 1)", type=nonnegative_float)
    dkd_beta: float = option(8.0, "DKD: weight of NCKD, non-target-class KD (default 8)", type=nonnegative_float)
    dkd_T: float = option(4.0, "DKD: temperature (default 4)", type=positive_float)
    dkd_warmup: int = option(20, "DKD: epochs of linear warm-up, factor min(epoch / warmup, 1) (default 20)",
                             type=nonnegative_int)


class DKDLoss(nn.Module):
    """Decoupled KD of Zhao et al. (CVPR 2022; the DKD objective alpha TCKD + beta NCKD), scaled
    by T^2 like KD and averaged over the batch:

        DKD = T^2 / B * sum_b (alpha * TCKD_b + beta * NCKD_b)

    TCKD (target-class KD) matches the binary "target vs. the rest" probabilities, NCKD
    (non-target-class KD) the distributions among the non-target classes (see :func:`dkd_terms`).
    The paper's linear warm-up of the loss over the first epochs is applied by the Distiller,
    not here.
    """

    def __init__(self, alpha: float = DKDOptions.dkd_alpha, beta: float = DKDOptions.dkd_beta,
                 T: float = DKDOptions.dkd_T) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.T = T

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """y_s: student logits [B, C]; y_t: teacher logits [B, C] (no gradient is sent to them);
        target: labels [B]. Returns the scalar ``alpha * TCKD + beta * NCKD``."""
        y_t = y_t.clone() if y_t.is_inference() else y_t.detach()
        tckd, nckd = dkd_terms(y_s, y_t, target, self.T)
        return (self.alpha * tckd + self.beta * nckd).mean() * self.T**2


def warmup_factor(epoch: int, warmup: int) -> float:
    """Linear warm-up of DKD: ``min(epoch / warmup, 1)`` for the 1-based ``epoch`` (1 if warmup <= 0)."""
    return 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)


@register("dkd")
class DKD(Distiller):
    """``--distill dkd``: :class:`DKDLoss` on the logits, times the warm-up factor of the current epoch.

    Published weights: ``-r 1 -a 0 -b 1`` (cross-entropy + DKD; alpha, beta and T of DKD are
    its own flags).
    """

    Options = DKDOptions
    weights = (1.0, 0.0, 1.0)

    def __init__(self, options: DKDOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.criterion = DKDLoss(alpha=options.dkd_alpha, beta=options.dkd_beta, T=options.dkd_T)
        self.warmup = options.dkd_warmup

    @classmethod
    def label_need(cls, options: DKDOptions) -> str | None:
        return "it splits the logits at each sample's labelled class (target-class and non-target-class KD)"

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """s.logits, t.logits: [B, C]; batch.target: [B]."""
        loss = self.criterion(s.logits, t.logits, batch.target)
        return {"dkd": warmup_factor(self.epoch, self.warmup) * loss}
