"""Option groups shared by several methods (each method's own options live in its file)."""
from __future__ import annotations

from dataclasses import dataclass

from common.argtypes import positive_int
from common.declare import option


@dataclass
class EmbedOptions:
    """the embedding heads"""

    feat_dim: int = option(128, "embedding dimension of the heads (CRD, CC, WCoRD, CRCD, DCD)", type=positive_int)
