"""VID: Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import channels, fp32, pool_to_smaller
from .registry import Batch, BuildContext, Distiller, NetOutput, NoOptions, register


# Maps of at least this many positions (H W) run VID's 1x1 convolutions as matrix products on CPU.
BMM_POSITIONS = 512


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
        return self.nll(self.regress(input), target)

    def regress(self, x: torch.Tensor) -> torch.Tensor:
        """``mu(s)``: the regressor on x [B, C, H, W]. On CPU maps of at least ``BMM_POSITIONS``
        positions go through its 1x1 convolutions as batched matrix products over the positions
        (the same numbers up to float rounding): forward + backward took 60 against 100 ms for
        64-channel 32x32 maps, batch 64, on a 2-core CPU, where the convolution kernels were
        equal or faster on smaller maps."""
        batch, _, height, width = x.shape
        if x.device.type != "cpu" or height * width < BMM_POSITIONS:
            return self.regressor(x)
        y = x.flatten(2)  # [B, C, H W]
        for layer in self.regressor:
            if isinstance(layer, nn.Conv2d):
                y = torch.bmm(layer.weight.flatten(1).expand(batch, -1, -1), y)
            else:
                y = layer(y)
        return y.view(batch, -1, height, width)

    @fp32  # softplus, log and a division by a learned variance; a mean over the whole map
    def nll(self, mu: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Gaussian negative log-likelihood (up to constants) of target [B, C, H, W] around mu, same
        shape, ``mean(0.5 ((mu - t)^2 / var + log var))``, computed from per-channel sums of squares
        (every channel has as many positions): ``0.5 sum_c(SS_c / var_c) / numel + 0.5 mean_c(log var_c)``."""
        var = F.softplus(self.log_scale) + self.eps
        squares = (mu - target).pow(2).sum(dim=(0, 2, 3))  # [C]
        return 0.5 * (squares / var).sum() / mu.numel() + 0.5 * var.log().mean()


@register("vid")
class VIDDistiller(Distiller):
    """``--distill vid``: one ``VIDLoss(C_s, C_t, C_t)`` per stage pair of ``feats[1:-1]``, summed."""

    weights = (1.0, 0.0, 1.0)

    def __init__(self, options: NoOptions, ctx: BuildContext) -> None:
        super().__init__()
        pairs = zip(channels(ctx.feats_s[1:-1]), channels(ctx.feats_t[1:-1]))
        self.vid_losses = nn.ModuleList([VIDLoss(c_s, c_t, c_t) for c_s, c_t in pairs])

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        pairs = zip(self.vid_losses, s.feats[1:-1], t.feats[1:-1])
        return {"vid": sum(vid(f_s, f_t.detach()) for vid, f_s, f_t in pairs)}
