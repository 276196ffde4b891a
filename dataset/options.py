"""The choices of the data flags that are not data sets (``--loader``, ``--split``); the data
options themselves are :class:`dataset.DataOptions`, declared once every data set has registered."""
from __future__ import annotations

LOADERS = ("tensor", "torchvision")
SPLITS = ("train", "unlabeled")
