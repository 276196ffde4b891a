"""CRD: the full contrastive distillation loss, and its ``--distill crd`` Distiller."""
from __future__ import annotations

import torch
import torch.nn as nn

from dataset.needs import ContrastNeed, DataNeeds
from distiller_zoo.registry import Batch, BuildContext, Distiller, NetOutput, register
from models.util import Embed

from .loss import ContrastLoss
from .memory import ContrastMemory
from .options import NCEOptions


class CRDLoss(nn.Module):
    """The CRD objective of "Contrastive Representation Distillation" (Tian, Krishnan & Isola,
    ICLR 2020, Eq. 18 applied to both views), with RepDistiller's modules and names::

        e_s = embed_s(f_s),  e_t = embed_t(f_t)          # unit vectors [B, feat_dim]
        out_s, out_t = contrast(e_s, e_t, idx, contrast_idx)
        CRD = criterion_s(out_s) + criterion_t(out_t)

    ``out_s`` scores the student's embedding against the teacher's bank, ``out_t`` the teacher's
    against the student's bank; the banks' rows ``idx`` are then updated (see
    :class:`ContrastMemory`).

    s_dim, t_dim: feature sizes; n_data: N, the training samples (the banks' rows); the others
    default to their flags' defaults (:class:`crd.options.NCEOptions`): feat_dim: embedding size; nce_k (K), nce_t (T), nce_m (memory momentum), nce_z_momentum (None: Z
    frozen after the first batch, as in the paper; a float such as 0.99: Z as an EMA) and
    nce_scores: see :class:`ContrastMemory`. labels: optional classes [N] of the training
    samples, used only when ``contrast_idx`` is not given (negatives are then drawn from other
    classes). RepDistiller's ``CRDLoss(opt)`` is :class:`crd.criterion.CRDLoss`.
    State dict: ``embed_s.linear.*``, ``embed_t.linear.*``, ``contrast.params``,
    ``contrast.memory_v1``, ``contrast.memory_v2``.
    """

    def __init__(self, s_dim: int, t_dim: int, n_data: int, feat_dim: int = NCEOptions.feat_dim,
                 nce_k: int = NCEOptions.nce_k, nce_t: float = NCEOptions.nce_t, nce_m: float = NCEOptions.nce_m,
                 nce_z_momentum: float | None = NCEOptions.nce_z_momentum, nce_scores: str = NCEOptions.nce_scores,
                 labels: torch.Tensor | None = None):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, n_data, nce_k, nce_t, nce_m, labels=labels,
                                       z_momentum=nce_z_momentum, score_mode=nce_scores)
        self.criterion_s = ContrastLoss(n_data)
        self.criterion_t = ContrastLoss(n_data)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None) -> torch.Tensor:
        """f_s: student features [B, s_dim]; f_t: teacher features [B, t_dim] (no gradient is
        sent to them); idx: the samples' indices in the training set [B]; contrast_idx:
        [B, K+1], column 0 the positive (drawn by the memory when None). Returns the scalar loss."""
        # The teacher is frozen; its features may come from torch.inference_mode, which autograd
        # cannot save for the embedding's backward: use an ordinary copy then.
        f_t = f_t.clone() if f_t.is_inference() else f_t.detach()
        e_s, e_t = self.embed_s(f_s), self.embed_t(f_t)
        out_s, out_t = self.contrast(e_s, e_t, idx, contrast_idx)
        return self.criterion_s(out_s) + self.criterion_t(out_t)


@register("crd")
class CRD(Distiller):
    """``--distill crd``: :class:`CRDLoss` on the pooled features ``feats[-1]`` of both nets.

    Published weights: ``-r 1 -a 0 -b 0.8`` (CRD+KD: ``-a 1 -b 0.8``). The data loader supplies
    ``index`` and ``contrast_idx`` with ``--nce_k`` negatives (``--mode exact|relax``), the
    bank's K; the context's ``n_data`` is the number of training samples (the bank's rows).
    """

    Options = NCEOptions
    weights = (1.0, 0.0, 0.8)

    def __init__(self, options: NCEOptions, ctx: BuildContext):
        super().__init__()
        self.criterion = CRDLoss(ctx.s_dim, ctx.t_dim, ctx.training_set_size(self.name), options.feat_dim,
                                 options.nce_k, options.nce_t, options.nce_m, options.nce_z_momentum,
                                 options.nce_scores)

    @classmethod
    def data_needs(cls, options: NCEOptions) -> DataNeeds:
        return DataNeeds(index=True, contrast=ContrastNeed(options.nce_k, options.mode))

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """s / t: network outputs, ``feats[-1]`` [B, C]; batch: ``index`` [B], ``contrast_idx`` [B, K+1]."""
        if batch.index is None:
            raise ValueError("--distill crd needs the batch's sample indices (index)")
        return {"crd": self.criterion(s.feats[-1], t.feats[-1], batch.index, batch.contrast_idx)}
