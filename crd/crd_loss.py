"""CRD: the full contrastive distillation loss, and its ``--distill crd`` Distiller."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from distiller_zoo.registry import Batch, Distiller, NetOutput, register
from helper.errors import UserError

from .embed import Embed
from .loss import ContrastLoss
from .memory import ContrastMemory


# Defaults of the memory-bank flags, for an ``opt`` built outside train_student.py.
BANK_DEFAULTS = dict(feat_dim=128, nce_k=16384, nce_t=0.07, nce_m=0.5, nce_z_momentum=None)


def head_options(opt, feats_s: list[torch.Tensor], feats_t: list[torch.Tensor], method: str,
                 needs_bank: bool = True, **defaults) -> SimpleNamespace:
    """The options of a contrastive loss: ``opt``'s attributes over ``defaults``, plus ``s_dim``
    and ``t_dim``, the sizes of the pooled features ``feats[-1]``. With ``needs_bank``, ``opt``
    must give ``n_data`` (the training-set size, the memory banks' rows)."""
    if needs_bank and not getattr(opt, "n_data", None):
        raise UserError(f"--distill {method} needs opt.n_data, the number of training samples "
                        "(the memory bank's rows)")
    values = {**defaults, **vars(opt)}
    values.update(s_dim=feats_s[-1].flatten(1).shape[1], t_dim=feats_t[-1].flatten(1).shape[1])
    if needs_bank:
        values["n_data"] = int(values["n_data"])
    return SimpleNamespace(**values)


class CRDLoss(nn.Module):
    """The CRD objective of "Contrastive Representation Distillation" (Tian, Krishnan & Isola,
    ICLR 2020, Eq. 18 applied to both views), with RepDistiller's modules and names::

        e_s = embed_s(f_s),  e_t = embed_t(f_t)          # unit vectors [B, feat_dim]
        out_s, out_t = contrast(e_s, e_t, idx, contrast_idx)
        CRD = criterion_s(out_s) + criterion_t(out_t)

    ``out_s`` scores the student's embedding against the teacher's bank, ``out_t`` the teacher's
    against the student's bank; the banks' rows ``idx`` are then updated (see
    :class:`ContrastMemory`).

    opt: ``s_dim``, ``t_dim`` (feature sizes), ``feat_dim`` (embedding size), ``n_data`` (N),
    ``nce_k`` (K), ``nce_t`` (T), ``nce_m`` (memory momentum); optional ``nce_z_momentum``
    (None: Z frozen after the first batch, as in the paper; a float such as 0.99: Z as an EMA).
    labels: optional classes [N] of the training samples, used only when ``contrast_idx`` is
    not given (negatives are then drawn from other classes).
    State dict: ``embed_s.linear.*``, ``embed_t.linear.*``, ``contrast.params``,
    ``contrast.memory_v1``, ``contrast.memory_v2``.
    """

    def __init__(self, opt, labels: torch.Tensor | None = None):
        super().__init__()
        self.embed_s = Embed(opt.s_dim, opt.feat_dim)
        self.embed_t = Embed(opt.t_dim, opt.feat_dim)
        self.contrast = ContrastMemory(opt.feat_dim, opt.n_data, opt.nce_k, opt.nce_t, opt.nce_m,
                                       labels=labels, z_momentum=getattr(opt, "nce_z_momentum", None),
                                       score_mode=getattr(opt, "nce_scores", "auto"))
        self.criterion_s = ContrastLoss(opt.n_data)
        self.criterion_t = ContrastLoss(opt.n_data)

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
    ``index`` and ``contrast_idx`` (``--mode exact|relax``, ``--nce_k``); ``opt.n_data`` is the
    number of training samples (the bank's rows).
    """

    needs_index = True
    needs_contrast_idx = True
    weights = (1.0, 0.0, 0.8)

    def __init__(self, opt, feats_s: list[torch.Tensor], feats_t: list[torch.Tensor]):
        super().__init__()
        self.criterion = CRDLoss(head_options(opt, feats_s, feats_t, "crd", **BANK_DEFAULTS))

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """s / t: network outputs, ``feats[-1]`` [B, C]; batch: ``index`` [B], ``contrast_idx`` [B, K+1]."""
        if batch.index is None:
            raise ValueError("--distill crd needs the batch's sample indices (index)")
        return {"crd": self.criterion(s.feats[-1], t.feats[-1], batch.index, batch.contrast_idx)}
