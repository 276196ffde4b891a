"""The contrastive family: memory bank, NCE critic and loss, embedding heads, and the CRD,
WCoRD, CRCD, DCD and RRD losses.

Importing the package registers ``--distill crd``, ``wcord``, ``crcd``, ``dcd`` and ``rrd``.
"""
from models.util import Embed

from .crd_loss import CRD, CRDLoss
from .crcd import CRCD, CRCDLoss
from .dcd import DCD, DCDLoss
from .loss import ContrastLoss
from .memory import ContrastMemory
from .rrd import RRD, RRDLoss
from .wcord import WCoRD, WCoRDLoss

__all__ = ["CRD", "CRDLoss", "CRCD", "CRCDLoss", "ContrastLoss", "ContrastMemory", "DCD", "DCDLoss", "Embed",
           "RRD", "RRDLoss", "WCoRD", "WCoRDLoss"]
