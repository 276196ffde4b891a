"""WCoRD: Chen, Wang, Gan, Liu, Henao and Carin, "Wasserstein Contrastive Representation
Distillation" (CVPR 2021): a global dual-form (critic) term and a local primal-form (optimal
transport) term, and its ``--distill wcord`` Distiller."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from common.argtypes import nonnegative_float, positive_float, positive_int
from common.declare import option
from common.errors import UserError
from dataset.needs import ContrastNeed, DataNeeds
from distiller_zoo.registry import Batch, BuildContext, Distiller, NetOutput, register
from models.util import Embed

from .loss import ContrastLoss
from .memory import ContrastMemory
from .options import NCEOptions

# Defaults of the method's own flags (the paper's exact constants were not available to us).
DEFAULT_LAMBDA_G = 1.0
DEFAULT_LAMBDA_L = 1.0
DEFAULT_EPS = 0.05
DEFAULT_ITERS = 100


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Transport cost ``C[i, j] = 1 - cos(x_i, y_j)`` in fp32, in [0, 2].

    x: [n, D]; y: [m, D] (any scale: both are L2-normalised here). Returns C [n, m]."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=1)
        y = F.normalize(y.float(), dim=1)
        return 1.0 - x @ y.t()


@torch.no_grad()
def sinkhorn_plan(cost: torch.Tensor, eps: float = DEFAULT_EPS, iters: int = DEFAULT_ITERS) -> torch.Tensor:
    """Entropic optimal-transport plan between two uniform distributions (Cuturi, 2013), by
    Sinkhorn's iterations in the log domain, in fp32 and outside autocast:

        P = argmin_{P 1 = a, P^T 1 = b, P >= 0}  <P, C> - eps * H(P),   a = 1/n,  b = 1/m
        P[i, j] = exp(u_i + v_j - C[i, j] / eps)
        u <- log a - logsumexp_j(v_j - C[i, j] / eps)
        v <- log b - logsumexp_i(u_i - C[i, j] / eps)

    (u, v are the dual potentials divided by eps.) Working with logsumexp keeps every step
    finite for small eps (no ``exp(-C / eps)`` kernel that underflows). The last update is
    the column one, so the column marginals are exact and the row marginals converge with
    ``iters``. The plan carries no gradient (it is treated as a constant of the loss).

    cost: [n, m]; eps > 0; iters >= 1. Returns P [n, m] (fp32), summing to 1.
    """
    if eps <= 0 or iters < 1:
        raise ValueError(f"Sinkhorn needs eps > 0 and iters >= 1, got eps={eps}, iters={iters}")
    with torch.autocast(device_type=cost.device.type, enabled=False):
        log_kernel = -cost.detach().float() / eps                        # [n, m]
        n, m = log_kernel.shape
        log_a, log_b = -math.log(n), -math.log(m)
        u = log_kernel.new_zeros(n)
        v = log_kernel.new_zeros(m)
        for _ in range(iters):
            u = log_a - torch.logsumexp(log_kernel + v[None, :], dim=1)
            v = log_b - torch.logsumexp(log_kernel + u[:, None], dim=0)
        return torch.exp(log_kernel + u[:, None] + v[None, :])


def wasserstein_local(x: torch.Tensor, y: torch.Tensor, eps: float = DEFAULT_EPS,
                      iters: int = DEFAULT_ITERS) -> torch.Tensor:
    """The primal-form (local) term of WCoRD: the entropic Wasserstein distance between the
    batch's two empirical distributions, ``sum_ij P_ij C_ij`` with ``C = 1 - cos`` and the
    Sinkhorn plan P held constant (gradients reach x and y through C only).

    x: [n, D]; y: [m, D]. Returns a 0-dim fp32 tensor in [0, 2]."""
    cost = cosine_cost(x, y)
    plan = sinkhorn_plan(cost, eps, iters)
    return (plan * cost).sum()


@dataclass
class WCoRDOptions(NCEOptions):
    """WCoRD"""

    wcord_lambda_g: float = option(DEFAULT_LAMBDA_G, "WCoRD: weight of the global (dual, contrastive) term",
                                   type=nonnegative_float)
    wcord_lambda_l: float = option(DEFAULT_LAMBDA_L, "WCoRD: weight of the local (primal, in-batch optimal "
                                   "transport) term", type=nonnegative_float)
    wcord_eps: float = option(DEFAULT_EPS, "WCoRD: entropic regularisation epsilon of the Sinkhorn plan",
                              type=positive_float)
    wcord_iters: int = option(DEFAULT_ITERS, "WCoRD: Sinkhorn iterations (log domain)", type=positive_int)


class WCoRDLoss(nn.Module):
    """The WCoRD objective of "Wasserstein Contrastive Representation Distillation" (Chen et al.,
    CVPR 2021, §3), ``lambda_g * global + lambda_l * local``::

        e_s = embed_s(f_s),  e_t = embed_t(f_t)        # unit vectors [B, feat_dim]; the heads'
                                                        # linear maps are spectrally normalised
        global = NCE(out_s) + NCE(out_t)                # dual form: CRD's critic and loss on the
                                                        # memory banks (Tian et al., Eq. 18)
        local  = sum_ij P_ij (1 - cos(e_s_i, e_t_j))    # primal form: entropic OT in the batch,
                                                        # P = Sinkhorn plan, uniform marginals

    Global (dual form): the Kantorovich-Rubinstein dual of the Wasserstein distance needs a
    1-Lipschitz critic; as in the paper, the critic is CRD's ``exp(<g_s(x), g_t(y)> / T)`` with
    its heads ``g`` kept Lipschitz by spectral normalisation of their linear maps
    (``torch.nn.utils.parametrizations.spectral_norm``), and the bound is CRD's NCE with the
    memory banks (:class:`ContrastMemory`, :class:`ContrastLoss`), so the term equals CRD's loss
    for the same heads and banks.

    Local (primal form): the batch's student and teacher embeddings are two uniform
    distributions; the entropic transport plan P (log-domain Sinkhorn, fp32, autocast off) is
    computed without gradient and the loss ``sum(P * C)`` sends gradients through the cost into
    the student's embedding (and head, and features). The teacher side of the local term is a
    target: ``e_t`` is detached there (the teacher head is trained by the global term only).

    Defaults (the paper's exact constants were not available to us; these are stable choices):
    ``lambda_g = 1``, ``lambda_l = 1`` (the local term lies in [0, 2]), ``eps = 0.05``
    (``C / eps`` at most 40: the plan is sharp, yet in our checks with unit embeddings of 8 to
    128 dimensions the row marginals came within 1e-6 (relative) of uniform in at most 100
    iterations; eps 0.01 stays finite but needs many more iterations), ``iters = 100``.

    s_dim, t_dim: feature sizes; n_data: N; options (:class:`WCoRDOptions`): ``feat_dim``,
    ``nce_k`` (K), ``nce_t`` (T), ``nce_m`` (memory momentum), ``nce_z_momentum`` and
    ``nce_scores`` (as in CRD), ``wcord_lambda_g``, ``wcord_lambda_l``, ``wcord_eps``, ``wcord_iters``.
    labels: optional classes [N] of the training samples (used only when ``contrast_idx`` is
    not given, as in :class:`crd.CRDLoss`).
    State dict: ``embed_s.linear.parametrizations.weight.{original,0._u,0._v}``,
    ``embed_s.linear.bias`` (same for ``embed_t``), ``contrast.params``,
    ``contrast.memory_v1``, ``contrast.memory_v2``.
    """

    def __init__(self, s_dim: int, t_dim: int, n_data: int, options: WCoRDOptions | None = None,
                 labels: torch.Tensor | None = None):
        super().__init__()
        o = options or WCoRDOptions()
        self.lambda_g, self.lambda_l, self.eps, self.iters = o.wcord_lambda_g, o.wcord_lambda_l, o.wcord_eps, o.wcord_iters
        if self.eps <= 0:
            raise UserError(f"--wcord_eps must be positive, got {self.eps}")
        if self.iters < 1:
            raise UserError(f"--wcord_iters must be at least 1, got {self.iters}")
        self.embed_s = Embed(s_dim, o.feat_dim)
        self.embed_t = Embed(t_dim, o.feat_dim)
        spectral_norm(self.embed_s.linear)
        spectral_norm(self.embed_t.linear)
        self.contrast = ContrastMemory(o.feat_dim, n_data, o.nce_k, o.nce_t, o.nce_m, labels=labels,
                                       z_momentum=o.nce_z_momentum, score_mode=o.nce_scores)
        self.criterion_s = ContrastLoss(n_data)
        self.criterion_t = ContrastLoss(n_data)

    def embed(self, f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_s: [B, s_dim]; f_t: [B, t_dim] (detached here: no gradient reaches the teacher).
        Returns the unit embeddings (e_s, e_t), each [B, feat_dim]."""
        # Teacher features from torch.inference_mode cannot be saved for backward: copy them.
        f_t = f_t.clone() if f_t.is_inference() else f_t.detach()
        return self.embed_s(f_s), self.embed_t(f_t)

    def global_loss(self, e_s: torch.Tensor, e_t: torch.Tensor, idx: torch.Tensor,
                    contrast_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Dual form: CRD's NCE bound of both views through the memory banks (which are then
        updated). e_s, e_t: [B, feat_dim]; idx: [B]; contrast_idx: [B, K+1]. Returns a scalar."""
        out_s, out_t = self.contrast(e_s, e_t, idx, contrast_idx)
        return self.criterion_s(out_s) + self.criterion_t(out_t)

    def local_loss(self, e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
        """Primal form: ``sum(P * C)`` between the batch's embeddings, teacher side detached.
        e_s, e_t: [B, feat_dim]. Returns a 0-dim fp32 tensor."""
        return wasserstein_local(e_s, e_t.detach(), self.eps, self.iters)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """f_s: student features [B, s_dim]; f_t: teacher features [B, t_dim]; idx: the samples'
        indices in the training set [B]; contrast_idx: [B, K+1], column 0 the positive (drawn by
        the memory when None).

        Returns ``{"wcord_global": lambda_g * global, "wcord_local": lambda_l * local}``
        (a term whose lambda is 0 is neither computed nor returned); the total WCoRD loss is the
        sum of the values."""
        e_s, e_t = self.embed(f_s, f_t)
        terms: dict[str, torch.Tensor] = {}
        if self.lambda_g:
            terms["wcord_global"] = self.lambda_g * self.global_loss(e_s, e_t, idx, contrast_idx)
        if self.lambda_l:
            terms["wcord_local"] = self.lambda_l * self.local_loss(e_s, e_t)
        return terms


@register("wcord")
class WCoRD(Distiller):
    """``--distill wcord``: :class:`WCoRDLoss` on the pooled features ``feats[-1]`` of both nets.

    Published weights ``-r 1 -a 1 -b 0.8``: the paper's CIFAR-100 tables report WCoRD+KD
    (cross-entropy + KD + WCoRD), and its global term is CRD's NCE on the same banks, so
    WCoRD+KD keeps CRD+KD's weights (``-a 1 -b 0.8``); the local term's share is set by
    ``--wcord_lambda_l``. Like CRD, it uses ``--feat_dim --nce_k --nce_t --nce_m`` and the data
    loader supplies ``index`` and ``contrast_idx`` (``--mode exact|relax``); the context's ``n_data``
    is the number of training samples (the banks' rows).
    """

    Options = WCoRDOptions
    weights = (1.0, 1.0, 0.8)

    def __init__(self, options: WCoRDOptions, ctx: BuildContext):
        super().__init__()
        self.criterion = WCoRDLoss(ctx.s_dim, ctx.t_dim, ctx.training_set_size(self.name), options)

    @classmethod
    def data_needs(cls, options: WCoRDOptions) -> DataNeeds:
        return DataNeeds(index=True, contrast=ContrastNeed(options.nce_k, options.mode))

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """s / t: network outputs, ``feats[-1]`` [B, C]; batch: ``index`` [B], ``contrast_idx`` [B, K+1]."""
        if batch.index is None:
            raise ValueError("--distill wcord needs the batch's sample indices (index)")
        return self.criterion(s.feats[-1], t.feats[-1], batch.index, batch.contrast_idx)
