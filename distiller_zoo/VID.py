"""VID: Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import channels, fp32, pool_to_smaller
from .registry import Batch, Distiller, NetOutput, register


class VIDLoss(nn.Module):
    """Variational lower bound on I(t; s) with a heteroscedastic Gaussian q(t | s) (the negative
    log-likelihood the paper minimises): a mean ``mu(s)`` from three
    1x1 convs (no bias, ReLU between) and a learned per-channel variance,

        var_c = softplus(log_scale_c) + eps,   VID = mean(0.5 * ((mu - t)^2 / var + log var))

    ``log_scale`` starts where ``var`` equals ``init_pred_var``. The taller map is pooled first.
    """

    def __init__(self, num_input_channels: int, num_mid_channel: int, num_target_channels: int,
                 init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(num_input_channels, num_mid_channel, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(num_mid_channel, num_mid_channel, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(num_mid_channel, num_target_channels, kernel_size=1, bias=False),
        )
        inverse_softplus = math.log(math.expm1(init_pred_var - eps))
        self.log_scale = nn.Parameter(torch.full((num_target_channels,), inverse_softplus))
        self.eps = eps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """input: student map [B, C_s, H, W]; target: teacher map [B, C_t, H', W'] -> scalar."""
        input, target = pool_to_smaller(input, target)
        return self.nll(self.regressor(input), target)

    @fp32  # softplus, log and a division by a learned variance; a mean over the whole map
    def nll(self, mu: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Gaussian negative log-likelihood (up to constants) of target [B, C, H, W] around mu, same shape."""
        var = (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)
        return (0.5 * ((mu - target).pow(2) / var + var.log())).mean()


@register("vid")
class VIDDistiller(Distiller):
    """``--distill vid``: one ``VIDLoss(C_s, C_t, C_t)`` per stage pair of ``feats[1:-1]``, summed."""

    weights = (1.0, 0.0, 1.0)

    def __init__(self, opt, feats_s: list[torch.Tensor], feats_t: list[torch.Tensor]) -> None:
        super().__init__()
        pairs = zip(channels(feats_s[1:-1]), channels(feats_t[1:-1]))
        self.vid_losses = nn.ModuleList([VIDLoss(c_s, c_t, c_t) for c_s, c_t in pairs])

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        pairs = zip(self.vid_losses, s.feats[1:-1], t.feats[1:-1])
        return {"vid": sum(vid(f_s, f_t.detach()) for vid, f_s, f_t in pairs)}
