"""CC: Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019)."""
from __future__ import annotations

import torch
import torch.nn as nn

from models.util import LinearEmbed

from ._common import fp32
from .options import EmbedOptions
from .registry import Batch, BuildContext, Distiller, NetOutput, register


class Correlation(nn.Module):
    """Correlation congruence in RepDistiller's form (the authors' code): with the embedding gap
    ``d = |e_s - e_t|`` [B, D], the mean over consecutive samples of ``<d_b, d_{b+1}>``:

        CC = mean_b sum_k d[b, k] * d[b + 1, k]
    """

    @fp32  # a difference of close embeddings, then products
    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """f_s, f_t: embeddings [B, D] -> scalar (float32)."""
        delta = (f_s - f_t).abs()
        return (delta[:-1] * delta[1:]).sum(1).mean()


@register("correlation")
class CorrelationDistiller(Distiller):
    """``--distill correlation``: CC between ``LinearEmbed`` heads (-> ``--feat_dim``) on ``feats[-1]``
    of both networks; both heads are trained."""

    Options = EmbedOptions
    weights = (1.0, 0.0, 0.02)

    def __init__(self, options: EmbedOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.embed_s = LinearEmbed(ctx.feats_s[-1][1], options.feat_dim)
        self.embed_t = LinearEmbed(ctx.feats_t[-1][1], options.feat_dim)
        self.loss = Correlation()

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        e_s = self.embed_s(s.feats[-1])
        e_t = self.embed_t(t.feats[-1].detach())
        return {"correlation": self.loss(e_s, e_t)}
