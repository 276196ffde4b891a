"""SRRL: Yang et al., "Knowledge Distillation via Softmax Regression Representation Learning" (ICLR 2021)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from models import get_classifier

from ._common import fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, NoOptions, register


class SRRLLoss(nn.Module):
    """SRRL's two terms on the penultimate (pooled) features. A connector ``r`` maps the student's
    feature to the teacher's width, a 1x1 convolution (no bias), BatchNorm and ReLU on the vector
    viewed as a 1x1 map; the teacher's frozen classifier ``W_T, b_T`` then reads it:

        h~ = r(h_S),   L_FM = mean((h~ - h_T)^2),   L_SR = mean((W_T h~ + b_T - z_T)^2)

    (``z_T = W_T h_T + b_T``, the teacher's logits; means over all elements, as ``MSELoss``).
    The connector's parameters are this module's (``transfer.0.weight``, ``transfer.1.*``); the
    classifier is an argument of :meth:`forward` and gets no gradient.
    """

    def __init__(self, s_dim: int, t_dim: int) -> None:
        super().__init__()
        self.transfer = nn.Sequential(nn.Conv2d(s_dim, t_dim, kernel_size=1, bias=False), nn.BatchNorm2d(t_dim),
                                      nn.ReLU(inplace=True))

    def connect(self, f_s: torch.Tensor) -> torch.Tensor:
        """r(h_S): f_s [B, s_dim] -> [B, t_dim]."""
        return self.transfer(f_s.reshape(*f_s.shape[:2], 1, 1)).flatten(1)

    @fp32  # a few [B, C] products; the logits' differences in bf16 keep ~3 digits
    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, logits_t: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """f_s [B, s_dim], f_t [B, t_dim], logits_t [B, classes]; weight [classes, t_dim] and bias
        [classes] of the teacher's classifier (detached here). Returns (L_FM, L_SR, the student's
        logits through the teacher's classifier [B, classes])."""
        trans = self.connect(f_s)
        pred = F.linear(trans, weight.detach(), None if bias is None else bias.detach())
        return F.mse_loss(trans, f_t.detach()), F.mse_loss(pred, logits_t.detach()), pred


@register("srrl")
class SRRL(Distiller):
    """``--distill srrl``: :class:`SRRLLoss` on the pooled features ``feats[-1]``, with the
    teacher's final linear layer (:func:`models.get_classifier`, given by :meth:`bind`) as the
    softmax-regression head; terms ``srrl_fm`` (feature matching) and ``srrl_sr`` (softmax
    regression), each weighted by ``-b``.

    Published weights ``-r 1 -a 1 -b 1``: SimKD's and the distillers repository's SRRL runs
    (``-c 1 -d 1 -b 1``, KD at ``--kd_T 4``). The teacher's classifier is held in a tuple, so
    that it is not a submodule: it stays out of this module's parameters, state_dict, optimiser
    and ``.to()``; it must map the teacher's ``feats[-1]`` to its logits.
    """

    weights = (1.0, 1.0, 1.0)

    def __init__(self, options: NoOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.t_dim = ctx.t_dim
        self.loss = SRRLLoss(ctx.s_dim, ctx.t_dim)
        self._classifier: tuple[nn.Linear] | None = None

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Keep a reference to the teacher's final linear layer (frozen: never trained here)."""
        head = get_classifier(teacher)
        if head.in_features != self.t_dim:
            raise UserError(f"--distill srrl needs the teacher's logits = Linear(feats[-1]); its last linear "
                            f"layer takes {head.in_features} inputs, its feats[-1] has {self.t_dim}")
        self._classifier = (head,)

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if self._classifier is None:
            raise RuntimeError("--distill srrl: call bind(student, teacher) before forward")
        (head,) = self._classifier
        fm, sr, _ = self.loss(s.feats[-1].flatten(1), t.feats[-1].flatten(1), t.logits, head.weight, head.bias)
        return {"srrl_fm": fm, "srrl_sr": sr}
