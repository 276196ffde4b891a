"""Every ``--distill`` method: importing this module imports the method packages
(:mod:`distiller_zoo` and :mod:`crd`), whose Distillers register themselves."""
from __future__ import annotations

import crd  # noqa: F401  (registers crd, wcord, crcd, dcd, rrd)
import distiller_zoo  # noqa: F401  (registers the classic methods)
from distiller_zoo.registry import (Distiller, build_distiller, get_method, method_names, method_option_groups,
                                    method_option_names)

__all__ = ["Distiller", "build_distiller", "get_method", "method_names", "method_option_groups",
           "method_option_names"]
