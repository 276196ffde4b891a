"""FitNet: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.declare import option
from common.errors import UserError
from models.util import ConvReg

from ._common import fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, register


class HintLoss(nn.Module):
    """Hint loss of FitNets (Eq. 3, up to its constant factor): ``mean((r(u_s) - v_t)^2)``,
    where the regressor ``r`` has already been applied to the student's map."""

    @fp32  # a mean of squares over whole maps
    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """f_s, f_t: [B, C, H, W] (equal shapes) -> scalar (float32)."""
        return F.mse_loss(f_s, f_t)


@dataclass
class HintOptions:
    """FitNet"""

    hint_layer: int = option(2, "FitNet's feature index", type=int, choices=[0, 1, 2, 3, 4])


@register("hint")
class HintDistiller(Distiller):
    """``--distill hint``: ``HintLoss(ConvReg(f_s[hint_layer]), f_t[hint_layer])``."""

    Options = HintOptions
    weights = (1.0, 0.0, 100.0)

    def __init__(self, options: HintOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.hint_layer = options.hint_layer
        names = {"student": ctx.model_s, "teacher": ctx.model_t}
        for who, feats in (("student", ctx.feats_s), ("teacher", ctx.feats_t)):
            n_maps = len(feats) - 1  # the last feature is the pooled vector, not a map
            if not 0 <= self.hint_layer < n_maps:
                name = f" {names[who]}" if names[who] and "+" not in names[who] else ""
                raise UserError(f"--hint_layer {self.hint_layer} is not a feature map of the {who}{name}: it has "
                                f"{n_maps} feature maps, so use --hint_layer 0 to {n_maps - 1}")
        s_shape, t_shape = ctx.feats_s[self.hint_layer], ctx.feats_t[self.hint_layer]
        try:
            self.conv_reg = ConvReg(s_shape, t_shape)
        except ValueError as err:
            raise UserError(f"--hint_layer {self.hint_layer}: {err}; choose another --hint_layer") from err
        self.loss = HintLoss()

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        f_s = self.conv_reg(s.feats[self.hint_layer])
        return {"hint": self.loss(f_s, t.feats[self.hint_layer].detach())}
