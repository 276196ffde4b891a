"""DCD: Giakoumoglou & Stathaki, "Discriminative and Consistent Representation Distillation" (2024)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.argtypes import finite_float, nonnegative_float, positive_float
from common.declare import option
from distiller_zoo._common import fp32
from distiller_zoo.options import EmbedOptions
from distiller_zoo.registry import Batch, BuildContext, Distiller, NetOutput, register


@dataclass
class DCDOptions(EmbedOptions):
    """DCD"""

    dcd_alpha: float = option(0.5, "DCD: weight of the consistency term (default 0.5)", type=nonnegative_float)
    dcd_max_tau: float = option(10.0, "DCD: upper bound of the learnable logit scale kappa = exp(theta) (default 10)",
                                type=positive_float)
    dcd_init_tau: float = option(1.0, "DCD: initial theta, the log of the logit scale kappa (default 1.0)",
                                 type=finite_float)


class DCDLoss(nn.Module):
    """The DCD objective of Giakoumoglou & Stathaki (arXiv:2407.11802, the method section): an
    in-batch contrastive term plus a consistency regulariser, with a learnable scale (inverse
    temperature) and bias.
    No memory bank: the other samples of the batch are the negatives.

        z_s = normalize(embed_s(f_s)),  z_t = normalize(embed_t(f_t))      # [B, feat_dim]
        kappa = min(exp(theta), max_tau)                                    # theta = params.tau
        L = kappa * z_s z_t^T + b                                           # [B, B], b = params.b
        con = CE(L, arange(B))                   # student i must pick its own teacher i
        P = softmax(L, dim=1)                    # row i: student i's distribution over teachers
        Q = softmax(L^T, dim=1)                  # row i: teacher i's distribution over students
        consistency = 1/B * sum_i KL(Q_i || P_i)
        DCD = con + alpha * consistency

    Both ``params.tau`` (theta, initialised to ``init_tau``) and ``params.b`` are learnable
    parameters, as in the paper. Note that a scalar added to every logit changes no softmax, so
    neither term depends on ``b``: its gradient is zero (up to float rounding; the tests check
    this) and it keeps its initial value except for weight decay. It is kept for the
    authors' parameterisation and state-dict names. When ``exp(theta)`` exceeds ``max_tau`` the
    clamp is active and theta receives no gradient.

    s_dim, t_dim: feature sizes; feat_dim: embedding size.
    State dict: ``embed_s.weight``/``.bias`` [feat_dim, s_dim]/[feat_dim], ``embed_t.*`` likewise,
    ``params.tau`` and ``params.b`` (scalars).
    Under DDP each process contrasts its own batch (negatives are not gathered across processes).
    """

    def __init__(self, s_dim: int, t_dim: int, feat_dim: int = DCDOptions.feat_dim,
                 max_tau: float = DCDOptions.dcd_max_tau, alpha: float = DCDOptions.dcd_alpha,
                 init_tau: float = DCDOptions.dcd_init_tau, init_b: float = 0.0) -> None:
        super().__init__()
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        self.params = nn.ParameterDict({
            "tau": nn.Parameter(torch.tensor(float(init_tau))),
            "b": nn.Parameter(torch.tensor(float(init_b))),
        })
        self.max_tau = max_tau
        self.alpha = alpha

    @property
    def kappa(self) -> torch.Tensor:
        """The logit scale ``min(exp(theta), max_tau)`` (a scalar tensor)."""
        return self.params["tau"].exp().clamp(max=self.max_tau)

    def embed(self, f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_s: [B, s_dim], f_t: [B, t_dim] (or shapes flattening to them) -> unit vectors z_s, z_t
        [B, feat_dim]. No gradient is sent to ``f_t`` (the teacher is frozen)."""
        # The teacher's features may come from torch.inference_mode: use an ordinary copy then.
        f_t = f_t.clone() if f_t.is_inference() else f_t.detach()
        z_s = F.normalize(self.embed_s(f_s.flatten(1)).float(), dim=1)
        z_t = F.normalize(self.embed_t(f_t.flatten(1)).float(), dim=1)
        return z_s, z_t

    def logits(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """z_s, z_t: [B, D] -> ``L = kappa * z_s z_t^T + b`` [B, B] (rows students, columns teachers)."""
        return self.kappa * z_s @ z_t.t() + self.params["b"]

    @staticmethod
    def contrastive(logits: torch.Tensor) -> torch.Tensor:
        """``CE(L, arange(B))`` for L [B, B]: each student's positive is its own teacher."""
        labels = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, labels)

    @staticmethod
    def consistency(logits: torch.Tensor) -> torch.Tensor:
        """``1/B sum_i KL(Q_i || P_i)`` for L [B, B], P = softmax(L) over teachers,
        Q = softmax(L^T) over students; zero when L is symmetric."""
        log_p = F.log_softmax(logits, dim=1)
        log_q = F.log_softmax(logits.t(), dim=1)
        return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """f_s: student features [B, s_dim]; f_t: teacher features [B, t_dim]. Returns the scalar
        ``con + alpha * consistency``."""
        return self.loss(*self.embed(f_s, f_t))

    @fp32  # scaled cosines, a cross-entropy and a KL between softmaxes
    def loss(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """z_s, z_t: unit embeddings [B, D] -> the scalar ``con + alpha * consistency`` (float32)."""
        logits = self.logits(z_s, z_t)
        return self.contrastive(logits) + self.alpha * self.consistency(logits)


@register("dcd")
class DCD(Distiller):
    """``--distill dcd``: :class:`DCDLoss` on the pooled features ``feats[-1]`` of both nets.

    Published weights: ``-r 1 -a 0 -b 1`` (DCD+KD: ``-a 1 -b 1``). The embedding heads, theta and
    b are parameters of this module, so the optimiser updates them.
    """

    Options = DCDOptions
    weights = (1.0, 0.0, 1.0)

    def __init__(self, options: DCDOptions, ctx: BuildContext) -> None:
        super().__init__()
        self.criterion = DCDLoss(ctx.s_dim, ctx.t_dim, options.feat_dim, max_tau=options.dcd_max_tau,
                                 alpha=options.dcd_alpha, init_tau=options.dcd_init_tau)

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """s.feats[-1]: [B, s_dim]; t.feats[-1]: [B, t_dim]."""
        return {"dcd": self.criterion(s.feats[-1], t.feats[-1])}
