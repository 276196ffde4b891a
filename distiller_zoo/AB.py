"""AB: Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
Neurons" (AAAI 2019)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from common.errors import UserError
from models.util import Connector

from ._common import detached, fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, NoOptions, register


class ABLoss(nn.Module):
    """Activation-boundary transfer with the paper's alternative (margin) L2 loss:

        AB(s, t) = sum |(s + m)^2 [s > -m][t <= 0] + (s - m)^2 [s <= m][t > 0]|

    on pre-activations, layer i of n weighted by ``2^(i - n + 1)``, divided by B, times 3/1000.
    """

    def __init__(self, feat_num: int, margin: float = 1.0) -> None:
        super().__init__()
        self.w = [2 ** (i - feat_num + 1) for i in range(feat_num)]
        self.margin = margin

    @fp32  # squares summed over whole maps
    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """g_s: connected student pre-activations; g_t: teacher pre-activations, same shapes [B, C, H, W].
        Returns float32 scalars."""
        bsz = g_s[0].shape[0]
        return [w * self.alternative_l2(s, t) / bsz / 1000 * 3 for w, s, t in zip(self.w, g_s, g_t)]

    def alternative_l2(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        m = self.margin
        off_but_active = ((source > -m) & (target <= 0)).float()
        on_but_inactive = ((source <= m) & (target > 0)).float()
        loss = (source + m).pow(2) * off_but_active + (source - m).pow(2) * on_but_inactive
        return loss.abs().sum()


@register("abound")
class ABDistiller(Distiller):
    """``--distill abound``: init stage only. ``Connector``s map the student's pre-activation
    ``feats[1:-1]`` to the teacher's, and AB trains them with the student's feature layers;
    the main stage is plain CE (+KD)."""

    preact = True
    weights = (1.0, 0.0, 1.0)
    has_init_stage = True

    def __init__(self, options: NoOptions, ctx: BuildContext) -> None:
        super().__init__()
        s_shapes = list(ctx.feats_s[1:-1])
        t_shapes = list(ctx.feats_t[1:-1])
        try:
            self.connector = Connector(s_shapes, t_shapes)
        except ValueError as err:
            raise UserError(f"--distill abound cannot connect this student to this teacher: {err}") from err
        self.loss = ABLoss(len(s_shapes))

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []  # the connectors serve the init stage only

    def init_modules(self) -> list[nn.Module]:
        return [self.connector]

    def init_trains_student(self) -> bool:
        return True

    def init_loss(self, s: NetOutput, t: NetOutput, batch: Batch) -> torch.Tensor:
        return sum(self.loss(self.connector(s.feats[1:-1]), detached(t.feats[1:-1])))
