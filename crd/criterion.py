"""RepDistiller's module path ``crd.criterion``, kept so that code written for RepDistiller imports
unchanged: ``from crd.criterion import CRDLoss, ContrastLoss, Embed, Normalize``.

Nothing is implemented here; the names are this library's classes, with RepDistiller's constructor
signatures, parameter and buffer names:

- :class:`CRDLoss` (``crd.crd_loss``): ``CRDLoss(opt)``, ``forward(f_s, f_t, idx, contrast_idx=None)``;
- :class:`ContrastLoss` (``crd.loss``): ``ContrastLoss(n_data)``, ``forward(x)`` on scores [B, K+1(, 1)];
- :class:`Embed` (``crd.embed``): ``Embed(dim_in=1024, dim_out=128)``, linear map + L2 normalisation;
- :class:`Normalize` (``models.util``): ``Normalize(power=2)``, rows divided by their L_power norm.
"""
from models.util import Normalize

from .crd_loss import CRDLoss
from .embed import Embed
from .loss import ContrastLoss

__all__ = ["CRDLoss", "ContrastLoss", "Embed", "Normalize"]
