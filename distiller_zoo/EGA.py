"""EGA: Ma, Chen and Akata, "Distilling Knowledge from Self-Supervised Teacher by Embedding Graph Alignment" (BMVC 2022)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.argtypes import nonnegative_float
from common.declare import option
from models.util import LinearEmbed

from ._common import fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, register


@dataclass
class EGAOptions:
    """EGA"""

    ega_node_weight: float = option(1.0, "EGA: weight of the node-alignment term (default 1)",
                                    type=nonnegative_float)
    ega_edge_weight: float = option(0.3, "EGA: weight of the edge-alignment term (default 0.3)",
                                    type=nonnegative_float)


def pearson(x: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between the rows of x [N, D], across the D features -> [N, N]
    (rows are centred, then L2-normalised; a constant row correlates 0 with everything)."""
    centred = x - x.mean(1, keepdim=True)
    unit = F.normalize(centred, p=2, dim=1)
    return unit @ unit.t()


class EGALoss(nn.Module):
    """Embedding Graph Alignment: each network's batch is a graph whose nodes are the samples'
    embeddings and whose edges are their Pearson correlations. With C the correlation matrix of
    the 2B stacked embeddings [f_t; f_s] (both [B, D]),

        E_t = C[:B, :B],  E_s = C[B:, B:]           (edges of each graph)
        N   = C[:B, B:]                              (teacher-student node correspondences)
        EGA = w_node * ||N - I||_F + w_edge * ||E_t - E_s||_F

    ``||.||_F``: the Frobenius norm, not squared (the reference's ``torch.norm(M, 2)`` of a
    matrix). The loss is symmetric in its two arguments (``N`` becomes ``N^T``), so the order in
    which they are passed does not matter (the reference passes the student in the teacher's
    slot). No parameters.
    """

    def __init__(self, node_weight: float = EGAOptions.ega_node_weight,
                 edge_weight: float = EGAOptions.ega_edge_weight) -> None:
        super().__init__()
        self.node_weight, self.edge_weight = node_weight, edge_weight

    @fp32  # correlations and norms of their differences
    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """f_s, f_t: [B, D] (the same D; no gradient is sent to f_t) -> scalar (float32)."""
        b = f_s.shape[0]
        c = pearson(torch.cat([f_t.detach(), f_s], 0))
        edges = c[:b, :b] - c[b:, b:]
        nodes = c[:b, b:] - torch.eye(b, dtype=c.dtype, device=c.device)
        return self.node_weight * torch.linalg.norm(nodes) + self.edge_weight * torch.linalg.norm(edges)


@register("ega")
class EGA(Distiller):
    """``--distill ega``: :class:`EGALoss` on the pooled features ``feats[-1]``.

    Pooled sizes that differ (e.g. ShuffleV1's 960 under resnet32x4's 256): the student's
    feature goes through a linear embedding to the teacher's size (``embed``, trained with the
    student), as the paper maps the student's representation into the embedding space by a
    linear layer. Equal sizes: no embedding, as in the reference (giakoumoglou/distillers, the
    authors' EGA loss on raw pooled features).
    Published weights: ``-r 1 -a 0 -b 1`` (the authors' defaults, yccm/EGA).
    """

    Options = EGAOptions
    weights = (1.0, 0.0, 1.0)

    def __init__(self, options: EGAOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.criterion = EGALoss(options.ega_node_weight, options.ega_edge_weight)
        self.embed = LinearEmbed(ctx.s_dim, ctx.t_dim) if ctx.s_dim != ctx.t_dim else None

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """s.feats[-1]: [B, s_dim]; t.feats[-1]: [B, t_dim]."""
        f_s = s.feats[-1].flatten(1)
        if self.embed is not None:
            f_s = self.embed(f_s)
        return {"ega": self.criterion(f_s, t.feats[-1].flatten(1))}
