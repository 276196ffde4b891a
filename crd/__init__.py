"""The contrastive family: memory bank, NCE critic and loss, embedding heads, and the CRD,
WCoRD, CRCD and DCD losses.

Importing the package registers ``--distill crd``, ``wcord``, ``crcd`` and ``dcd``.
"""
from models.util import Embed

from .crd_loss import CRD, CRDLoss
from .crcd import CRCD, CRCDLoss
from .dcd import DCD, DCDLoss
from .loss import ContrastLoss
from .memory import ContrastMemory
from .wcord import WCoRD, WCoRDLoss

__all__ = ["CRD", "CRDLoss", "CRCD", "CRCDLoss", "ContrastLoss", "ContrastMemory", "DCD", "DCDLoss", "Embed",
           "WCoRD", "WCoRDLoss"]
