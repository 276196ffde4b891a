"""FT: Kim, Park and Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer"
(NeurIPS 2018)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.util import Paraphraser, Translator

from ._common import fp32, pool_to_smaller
from .registry import Batch, BuildContext, Distiller, NetOutput, NoOptions, register


class FactorTransfer(nn.Module):
    """Factor-transfer loss L_FT between the student's translated and the teacher's paraphrased
    factors, with ``F(x) = normalize(mean_c x^p1)`` flattened to [B, H*W]:

        FT = mean |F(f_s) - F(f_t)|^p2     (the taller map is average-pooled first)
    """

    def __init__(self, p1: float = 2, p2: float = 1) -> None:
        super().__init__()
        self.p1 = p1
        self.p2 = p2

    @fp32  # normalised maps of student and teacher are close: their difference needs float32
    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """f_s, f_t: factors [B, C, H, W] (channel counts may differ) -> scalar (float32)."""
        f_s, f_t = pool_to_smaller(f_s, f_t)
        diff = self.factor(f_s) - self.factor(f_t)
        return diff.abs().mean() if self.p2 == 1 else diff.pow(self.p2).mean()

    def factor(self, f: torch.Tensor) -> torch.Tensor:
        """f: [B, C, H, W] -> [B, H*W] of unit L2 norm."""
        return F.normalize(f.pow(self.p1).mean(1).view(f.shape[0], -1))


@register("factor")
class FactorDistiller(Distiller):
    """``--distill factor``: the init stage trains a ``Paraphraser`` to reconstruct the teacher's
    ``feats[-2]`` (MSE), which is then frozen; the main stage trains a ``Translator`` on the
    student's ``feats[-2]`` with FT against the paraphrased teacher factor."""

    weights = (1.0, 0.0, 200.0)
    has_init_stage = True

    def __init__(self, options: NoOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.model_s = ctx.model_s
        self.translator = Translator(ctx.feats_s[-2], ctx.feats_t[-2])
        self.paraphraser = Paraphraser(ctx.feats_t[-2])
        self.loss = FactorTransfer()

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        factor_s = self.translator(s.feats[-2])
        factor_t = self.paraphraser(t.feats[-2].detach(), is_factor=True)
        return {"factor": self.loss(factor_s, factor_t)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.translator.parameters() if p.requires_grad]  # never the paraphraser

    def init_modules(self) -> list[nn.Module]:
        return [self.paraphraser]

    def init_learning_rate(self, learning_rate: float) -> float:
        # RepDistiller pre-trains the paraphraser at 0.01 for its ResNet and WRN students.
        return 0.01 if self.model_s.startswith(("resnet", "wrn_")) else learning_rate

    def init_loss(self, s: NetOutput, t: NetOutput, batch: Batch) -> torch.Tensor:
        f_t = t.feats[-2].detach()
        _, reconstruction = self.paraphraser(f_t)
        return F.mse_loss(reconstruction, f_t)

    def after_init_stage(self) -> None:
        self.paraphraser.requires_grad_(False)
