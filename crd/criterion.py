"""RepDistiller's module path ``crd.criterion``, kept so that code written for RepDistiller imports
unchanged: ``from crd.criterion import CRDLoss, ContrastLoss, Embed, Normalize``.

The names are this library's classes, with RepDistiller's constructor signatures, parameter and
buffer names:

- :class:`CRDLoss`: ``CRDLoss(opt)`` reading RepDistiller's ``opt.s_dim, t_dim, feat_dim, n_data,
  nce_k, nce_t, nce_m``; ``forward(f_s, f_t, idx, contrast_idx=None)`` (``crd.crd_loss.CRDLoss``
  takes these as arguments);
- :class:`ContrastLoss` (``crd.loss``): ``ContrastLoss(n_data)``, ``forward(x)`` on scores [B, K+1(, 1)];
- :class:`Embed` (``models.util``): ``Embed(dim_in=1024, dim_out=128)``, linear map + L2 normalisation;
- :class:`Normalize` (``models.util``): ``Normalize(power=2)``, rows divided by their L_power norm.
"""
from models.util import Embed, Normalize

from . import crd_loss
from .loss import ContrastLoss


class CRDLoss(crd_loss.CRDLoss):
    """RepDistiller's ``CRDLoss(opt)``: :class:`crd.crd_loss.CRDLoss` with its sizes and NCE
    settings read from RepDistiller's ``opt`` (``s_dim``, ``t_dim``, ``feat_dim``, ``n_data``,
    ``nce_k``, ``nce_t``, ``nce_m``)."""

    def __init__(self, opt):
        super().__init__(opt.s_dim, opt.t_dim, opt.n_data, opt.feat_dim, opt.nce_k, opt.nce_t, opt.nce_m)


__all__ = ["CRDLoss", "ContrastLoss", "Embed", "Normalize"]
