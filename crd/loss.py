"""CRD's NCE loss on the critic's scores."""
from __future__ import annotations

import torch
import torch.nn as nn

from distiller_zoo._common import fp32

EPS = 1e-7


class ContrastLoss(nn.Module):
    """The NCE loss of "Contrastive Representation Distillation" (Tian, Krishnan & Isola,
    ICLR 2020, Eq. 18) as RepDistiller computes it.

    With ``m = K`` negatives per anchor drawn from the noise distribution ``Pn = 1/N``, the
    probability that a pair with (normalised) score ``P`` came from the data is
    ``P / (P + m Pn)``; the loss is the binary cross-entropy of the positive (column 0) being data
    and the K negatives being noise::

        loss = -( sum_b log(P_pos / (P_pos + m Pn + eps)) + sum_{b,k} log(m Pn / (P_neg + m Pn + eps)) ) / B

    n_data: N, the number of training samples (rows of the memory bank).
    """

    def __init__(self, n_data: int):
        super().__init__()
        self.n_data = n_data

    @fp32  # logs of ratios of scores that span many orders of magnitude
    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: scores [B, K+1] or [B, K+1, 1], column 0 the positive. Returns the scalar loss, in
        float32 for fp16/bf16 scores (RepDistiller returns a one-element [1] tensor with the same value).

        With ``rows`` (a bool mask of x's shape without its score dimension, e.g. [B, A] for
        scores [B, A, K+1]), the mean over the rows it selects: the loss of ``x[rows]`` without
        copying the selected rows (the others get zero gradient; their scores must be finite)."""
        if rows is not None:
            x = x.reshape(-1, x.shape[-1])
            rows = rows.reshape(-1)
        x = x.flatten(1)
        batch_size, m = x.shape[0], x.shape[1] - 1
        noise = m / self.n_data  # m * Pn
        p_pos, p_neg = x[:, 0], x[:, 1:]
        log_d1 = torch.log(p_pos / (p_pos + (noise + EPS)))  # log P(data | positive pair)
        log_d0 = torch.log(noise / (p_neg + (noise + EPS)))  # log P(noise | negative pair)
        if rows is not None:
            per_row = torch.where(rows, log_d1 + log_d0.sum(1), 0.0)
            return -per_row.sum() / rows.sum()
        return -(log_d1.sum() + log_d0.sum()) / batch_size
