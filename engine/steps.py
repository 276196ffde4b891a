"""The training step of ``train_teacher.py`` as a module (the distillation step is
:class:`distiller_zoo.step.DistillStep`): ``step(raw_batch) -> (logits, target, {term: loss})``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.runtime import Runtime


class ClassifyStep(nn.Module):
    """Cross-entropy training of one network (``train_teacher.py``): term ``ce``."""

    def __init__(self, model: nn.Module, runtime: Runtime):
        super().__init__()
        self.model = model
        self.runtime = runtime
        self._forward = (runtime.forward_fn(model),)  # a tuple: not registered as a submodule

    def forward(self, raw: tuple) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        images, target = self.runtime.to_device(raw[0]), self.runtime.to_device(raw[1])
        logits = self._forward[0](images)
        return logits, target, {"ce": F.cross_entropy(logits, target)}
