"""Distillation losses with RepDistiller's class names, and the ``--distill`` registry.

Importing this package registers every classic method (one module per loss, its Distiller beside it).
"""
from .registry import (Batch, BuildContext, Distiller, NetOutput, NoOptions, build_distiller, get_method, method_names,
                       register)

from .AB import ABLoss
from .AT import Attention
from .CC import Correlation
from .DIST import DISTLoss
from .DKD import DKDLoss
from .EGA import EGALoss
from .FitNet import HintLoss
from .FSP import FSP
from .FT import FactorTransfer
from .ICKD import ICKDLoss
from .ITRD import ITRDLoss
from .KD import DistillKL
from .KDSVD import KDSVD
from .NST import NSTLoss
from .OFD import OFDLoss
from .PKT import PKT
from .ReviewKD import ReviewKDLoss
from .RKD import RKDLoss
from .SemCKD import SemCKDLoss
from .SP import Similarity
from .SimKD import SimKD
from .SRRL import SRRLLoss
from .VID import VIDLoss

__all__ = [
    "Batch", "BuildContext", "Distiller", "NetOutput", "NoOptions", "build_distiller", "get_method", "method_names",
    "register",
    "ABLoss", "Attention", "Correlation", "DISTLoss", "DKDLoss", "DistillKL", "EGALoss", "FSP", "FactorTransfer",
    "HintLoss", "ICKDLoss", "ITRDLoss", "KDSVD", "NSTLoss", "OFDLoss", "PKT", "RKDLoss", "ReviewKDLoss", "SRRLLoss", "SemCKDLoss",
    "SimKD",
    "Similarity", "VIDLoss",
]
