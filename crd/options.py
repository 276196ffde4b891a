"""Option groups of the memory banks and queues, shared by the contrastive methods."""
from __future__ import annotations

from dataclasses import dataclass

from common.argtypes import momentum_float, positive_float, positive_int, unit_interval
from common.declare import option
from dataset.needs import MODES
from distiller_zoo.options import EmbedOptions

from .memory import SCORE_MODES


@dataclass
class BankOptions(EmbedOptions):
    """the memory banks"""

    nce_m: float = option(0.5, "momentum of the memory-bank update", type=unit_interval)
    nce_scores: str = option("auto", "how the memory-bank scores are computed (the same numbers either way): one "
                             "matrix product of the batch against the whole bank, a gather of the K+1 rows of each "
                             "anchor, or auto: the cheaper one for N and K", choices=SCORE_MODES,
                             resumable=True)


@dataclass
class NegativesOptions(EmbedOptions):
    """the negatives (CRD's drawn samples, RRD's queue)"""

    nce_k: int = option(16384, "negatives per anchor: CRD's data loader draws as many per sample; RRD's queue holds "
                        "as many teacher embeddings", type=positive_int)


@dataclass
class NCEOptions(BankOptions, NegativesOptions):
    """CRD's NCE critic"""

    nce_t: float = option(0.07, "temperature for NCE", type=positive_float)
    nce_z_momentum: float | None = option(None, "keep NCE's normaliser Z as an EMA with this momentum (e.g. 0.99); "
                                          "default: estimated on the first batch, then frozen (the paper)",
                                          type=momentum_float)
    mode: str = option("exact", "CRD positives: the sample itself (exact) or a sample of its class (relax)",
                       choices=MODES)
