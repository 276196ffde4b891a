"""The contrastive family: memory bank, NCE critic and loss, embedding heads, and CRD.

Importing the package registers ``--distill crd``.
"""
from .crd_loss import CRD, CRDLoss
from .embed import Embed
from .loss import ContrastLoss
from .memory import ContrastMemory

__all__ = ["CRD", "CRDLoss", "ContrastLoss", "ContrastMemory", "Embed"]
