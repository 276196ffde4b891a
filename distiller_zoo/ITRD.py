"""ITRD: Miles, Lopez-Rodriguez and Mikolajczyk, "Information Theoretic Representation Distillation" (BMVC 2022)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.argtypes import nonnegative_float, positive_float
from common.declare import option
from models.util import LinearEmbed

from ._common import fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, register

# A batch std below this is taken as this (only a feature constant over the batch, e.g. a dead
# ReLU channel, gets there; its standardised values are 0 instead of 0/0).
STD_FLOOR = 1e-12


@dataclass
class ITRDOptions:
    """ITRD"""

    itrd_lambda_corr: float = option(2.0, "ITRD: weight of the correlation term (default 2; 1 with "
                                     "--itrd_lambda_mutual 1 is the giakoumoglou/distillers reference, which "
                                     "sums the two terms unweighted)", type=nonnegative_float)
    itrd_lambda_mutual: float = option(0.05, "ITRD: weight of the mutual-information term (default 0.05)",
                                       type=nonnegative_float)
    itrd_alpha: float = option(1.5, "ITRD: Renyi's alpha of the correlation term (default 1.5)", type=positive_float)


def standardized(z: torch.Tensor) -> torch.Tensor:
    """z [B, D] -> each column minus its batch mean, over its (unbiased, B - 1) batch std."""
    return (z - z.mean(0)) / z.std(0).clamp_min(STD_FLOOR)


def normalized_gram(z: torch.Tensor) -> torch.Tensor:
    """z [B, D] -> the cosine-similarity (polynomial-kernel) Gram matrix of its rows [B, B]."""
    unit = F.normalize(z, p=2, dim=1)
    return unit @ unit.t()


class ITRDLoss(nn.Module):
    """The two losses of ITRD on pooled features, the student's mapped to the teacher's size by a
    linear embedding ``embed`` (``z_s = W f_s + b``; ``z_t = f_t``):

    Correlation (Renyi's alpha-entropy of the cross-correlation's deviation from the identity),
    with z-hat the batch-standardised features (unbiased std) and B the batch size:

        C_ii = 1/B * sum_b zhat_s[b, i] * zhat_t[b, i]                       # [D_t]
        L_corr = log2( sum_i |1 - C_ii|^(2 alpha) )

    Mutual information (alpha = 2 matrix entropies of the trace-normalised Gram matrices, the
    joint one the Hadamard product of the two):

        G_s = u_s u_s^T,  G_t = u_t u_t^T   (u: L2-normalised rows),  G_st = G_s o G_t
        L_mutual = ||G_s / tr G_s||_F^2 - ||G_st / tr G_st||_F^2

    The mutual term uses ``embed(f_s)`` only when the sizes differ (``s_dim != t_dim``) and the
    raw ``f_s`` otherwise, as the authors' code (roymiles/ITRD) and the reference
    (giakoumoglou/distillers) do; the correlation term always uses the embedding.

    ``forward`` returns ``(L_corr, L_mutual)``, unweighted; a batch of one sample has no batch
    statistics and gives two zeros. State dict: ``embed.linear.weight`` [t_dim, s_dim],
    ``embed.linear.bias`` [t_dim], the reference's names.
    """

    def __init__(self, s_dim: int, t_dim: int, alpha: float = ITRDOptions.itrd_alpha) -> None:
        super().__init__()
        self.s_dim, self.t_dim, self.alpha = s_dim, t_dim, alpha
        self.embed = LinearEmbed(s_dim, t_dim)

    @fp32  # batch statistics, a log2, Gram matrices and their squares
    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_s: [B, s_dim] (or [B, ...] flattening to it); f_t: [B, t_dim] (no gradient is sent
        to it) -> (correlation, mutual), float32 scalars."""
        f_s = f_s.flatten(1)
        f_t = f_t.flatten(1).detach()
        z_s = self.embed(f_s)
        if f_s.shape[0] < 2:
            zero = z_s.sum() * 0.0
            return zero, zero.clone()
        return self.correlation(z_s, f_t), self.mutual(z_s if self.s_dim != self.t_dim else f_s, f_t)

    def correlation(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """L_corr of embedded student features z_s and teacher features z_t, both [B, D] -> scalar."""
        c = (standardized(z_s) * standardized(z_t)).sum(0) / z_s.shape[0]
        return torch.log2((1.0 - c).square().pow(self.alpha).sum())

    @staticmethod
    def mutual(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """L_mutual of student features z_s [B, D_s] and teacher features z_t [B, D_t] -> scalar."""
        g_s = normalized_gram(z_s)
        g_st = g_s * normalized_gram(z_t)
        return (g_s / torch.trace(g_s)).square().sum() - (g_st / torch.trace(g_st)).square().sum()


@register("itrd")
class ITRD(Distiller):
    """``--distill itrd``: :class:`ITRDLoss` on the pooled features ``feats[-1]``, its terms
    weighted by ``--itrd_lambda_corr`` and ``--itrd_lambda_mutual`` (the authors' training loop):

        itrd_corr = lambda_corr * L_corr,   itrd_mutual = lambda_mutual * L_mutual

    Published weights: ``-r 1 -a 0 -b 1`` (the authors' README; their loop has no KD term).
    Reference behaviour (giakoumoglou/distillers' ``ITLoss``, which sets the lambdas but never
    uses them, returning ``L_corr + L_mutual``): ``--itrd_lambda_corr 1 --itrd_lambda_mutual 1``.
    Serves any pair: the embedding maps the student's pooled size to the teacher's.
    """

    Options = ITRDOptions
    weights = (1.0, 0.0, 1.0)

    def __init__(self, options: ITRDOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.criterion = ITRDLoss(ctx.s_dim, ctx.t_dim, alpha=options.itrd_alpha)
        self.lambda_corr = options.itrd_lambda_corr
        self.lambda_mutual = options.itrd_lambda_mutual

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """s.feats[-1]: [B, s_dim]; t.feats[-1]: [B, t_dim]."""
        corr, mutual = self.criterion(s.feats[-1], t.feats[-1])
        return {"itrd_corr": self.lambda_corr * corr, "itrd_mutual": self.lambda_mutual * mutual}
