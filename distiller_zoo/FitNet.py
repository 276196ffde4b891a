"""FitNet: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from helper.errors import UserError
from models.util import ConvReg

from ._common import fp32
from .registry import Batch, Distiller, NetOutput, register


class HintLoss(nn.Module):
    """Hint loss of FitNets (Eq. 3, up to its constant factor): ``mean((r(u_s) - v_t)^2)``,
    where the regressor ``r`` has already been applied to the student's map."""

    @fp32  # a mean of squares over whole maps
    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """f_s, f_t: [B, C, H, W] (equal shapes) -> scalar (float32)."""
        return F.mse_loss(f_s, f_t)


@register("hint")
class HintDistiller(Distiller):
    """``--distill hint``: ``HintLoss(ConvReg(f_s[hint_layer]), f_t[hint_layer])``."""

    weights = (1.0, 0.0, 100.0)

    def __init__(self, opt, feats_s: list[torch.Tensor], feats_t: list[torch.Tensor]) -> None:
        super().__init__()
        self.hint_layer = int(opt.hint_layer)
        names = {"student": getattr(opt, "model_s", None), "teacher": getattr(opt, "model_t", None)}
        for who, feats in (("student", feats_s), ("teacher", feats_t)):
            n_maps = len(feats) - 1  # the last feature is the pooled vector, not a map
            if not 0 <= self.hint_layer < n_maps:
                name = f" {names[who]}" if names[who] and "+" not in names[who] else ""
                raise UserError(f"--hint_layer {self.hint_layer} is not a feature map of the {who}{name}: it has "
                                f"{n_maps} feature maps, so use --hint_layer 0 to {n_maps - 1}")
        s_shape, t_shape = feats_s[self.hint_layer].shape, feats_t[self.hint_layer].shape
        try:
            self.conv_reg = ConvReg(s_shape, t_shape)
        except ValueError as err:
            raise UserError(f"--hint_layer {self.hint_layer}: {err}; choose another --hint_layer") from err
        self.loss = HintLoss()

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        f_s = self.conv_reg(s.feats[self.hint_layer])
        return {"hint": self.loss(f_s, t.feats[self.hint_layer].detach())}
