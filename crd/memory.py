"""CRD's memory bank and critic scores (the two views: student and teacher embeddings)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset.sampling import ContrastSampler
from helper import distributed
from helper.errors import UserError

# Positions in the ``params`` buffer (RepDistiller's layout).
K_SLOT, T_SLOT, Z_V1_SLOT, Z_V2_SLOT, MOMENTUM_SLOT = range(5)


class ContrastMemory(nn.Module):
    """Memory bank and critic of "Contrastive Representation Distillation" (Tian, Krishnan &
    Isola, ICLR 2020, §3 and its NCE implementation), with RepDistiller's buffers.

    Each training sample ``i`` has a row in ``memory_v1`` (the student's embedding of it) and in
    ``memory_v2`` (the teacher's). For anchors ``b`` and the samples ``idx[b, :]`` (column 0 the
    positive, then K negatives) the critic's unnormalised scores use the *other* view's bank::

        out_v1[b, k] = exp(<memory_v2[idx[b, k]], v1[b]> / T) / Z_v1      (student anchor)
        out_v2[b, k] = exp(<memory_v1[idx[b, k]], v2[b]> / T) / Z_v2      (teacher anchor)

    ``Z = mean(out) * N`` is the Monte-Carlo estimate of the partition function, taken on the
    first batch and then frozen (the paper); with ``z_momentum`` set (e.g. 0.99) it is instead
    an exponential moving average, ``Z <- z_momentum * Z + (1 - z_momentum) * mean(out) * N``,
    updated on every batch before the scores are divided by it. Z never receives gradients.

    After the scores, the batch's rows are moved towards the new embeddings and renormalised,
    ``mem[y] = normalize(momentum * mem[y] + (1 - momentum) * v)``, without gradients.

    Args:
        inputSize: embedding size D.
        outputSize: N, the number of training samples (bank rows).
        K: negatives per anchor.
        T: temperature.
        momentum: memory update momentum.
        labels: optional LongTensor [N] of the samples' classes, used only when ``forward`` draws
            the negatives itself (``idx=None``): negatives are then drawn from other classes.
        z_momentum: None (frozen Z, the paper) or the momentum of an EMA of Z.

    Buffers (RepDistiller's names): ``params`` = [K, T, Z_v1, Z_v2, momentum] (Z = -1 until
    estimated), ``memory_v1`` and ``memory_v2`` [N, D], initialised uniform in ±1/sqrt(D/3).
    """

    def __init__(self, inputSize: int, outputSize: int, K: int, T: float = 0.07, momentum: float = 0.5,
                 labels: torch.Tensor | None = None, z_momentum: float | None = None):
        super().__init__()
        if z_momentum is not None and not 0.0 <= z_momentum < 1.0:
            raise UserError(f"the momentum of Z (nce_z_momentum) must be in [0, 1), got {z_momentum}")
        if labels is not None and torch.as_tensor(labels).numel() != outputSize:
            raise ValueError(f"labels has {torch.as_tensor(labels).numel()} entries "
                             f"for a bank of {outputSize} rows")
        self.n_data = outputSize
        self.K = K
        self.z_momentum = z_momentum
        self.labels = None if labels is None else torch.as_tensor(labels).long().flatten()
        self._sampler: ContrastSampler | None = None
        self.register_buffer("params", torch.tensor([K, T, -1.0, -1.0, momentum]))
        bound = 1.0 / math.sqrt(inputSize / 3)
        self.register_buffer("memory_v1", torch.rand(outputSize, inputSize) * (2 * bound) - bound)
        self.register_buffer("memory_v2", torch.rand(outputSize, inputSize) * (2 * bound) - bound)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor,
                idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """v1: student embeddings [B, D]; v2: teacher embeddings [B, D] (unit vectors);
        y: the anchors' sample indices [B]; idx: sample indices to score [B, K+1], column 0 the
        positive (drawn here when None, see :meth:`draw_contrast_idx`).
        Returns (out_v1, out_v2), each [B, K+1, 1]."""
        if idx is None:
            idx = self.draw_contrast_idx(y)
        bank_dtype = self.memory_v1.dtype
        # exp(s / 0.07) reaches 1.6e6: score in the bank's precision even under autocast.
        with torch.autocast(device_type=v1.device.type, enabled=False):
            v1, v2 = v1.to(bank_dtype), v2.to(bank_dtype)
            temperature = self.params[T_SLOT].clone()  # a copy: params changes in place below
            out_v1 = torch.exp(torch.bmm(self.memory_v2[idx], v1.unsqueeze(2)) / temperature)
            out_v2 = torch.exp(torch.bmm(self.memory_v1[idx], v2.unsqueeze(2)) / temperature)
            out_v1 = out_v1 / self._partition(Z_V1_SLOT, out_v1)
            out_v2 = out_v2 / self._partition(Z_V2_SLOT, out_v2)
            self.update_memory(v1, v2, y)
        return out_v1, out_v2

    @torch.no_grad()
    def _partition(self, slot: int, out: torch.Tensor) -> torch.Tensor:
        """Z for one view (0-dim, no gradient): estimated from ``out`` [B, K+1, 1] on the first
        batch, then frozen or (with ``z_momentum``) an EMA; stored in ``params[slot]``."""
        if distributed.current().enabled:  # the mean over every rank's scores: Z is the same on all ranks
            sums = distributed.all_reduce_sum(torch.stack([out.sum(dtype=torch.float64),
                                                           out.new_tensor(out.numel(), dtype=torch.float64)]))
            estimate = (sums[0] / sums[1]).to(out.dtype) * self.n_data
        else:
            estimate = out.mean() * self.n_data
        z = self.params[slot]
        if self.z_momentum is None:
            z_new = torch.where(z < 0, estimate, z)
        else:
            z_new = torch.where(z < 0, estimate, self.z_momentum * z + (1.0 - self.z_momentum) * estimate)
        self.params[slot] = z_new
        return z_new

    @torch.no_grad()
    def update_memory(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor) -> None:
        """Momentum update of the rows ``y`` [B] with v1 / v2 [B, D]:
        ``mem[y] = normalize(m * mem[y] + (1 - m) * v)``. Under torchrun the rows and indices
        of every rank are gathered first, so that every rank's bank stays identical (a sample
        that two ranks hold, from the sampler's padding, takes the first rank's update)."""
        if distributed.current().enabled:
            y, v1, v2 = distributed.all_gather_cat(y), distributed.all_gather_cat(v1), distributed.all_gather_cat(v2)
            y, first = first_occurrences(y)
            v1, v2 = v1[first], v2[first]
        m = self.params[MOMENTUM_SLOT]
        for bank, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
            rows = bank.index_select(0, y) * m + v.to(bank.dtype) * (1 - m)
            bank.index_copy_(0, y, F.normalize(rows, dim=1))

    def draw_contrast_idx(self, y: torch.Tensor) -> torch.Tensor:
        """Draw ``idx`` [B, K+1] for anchors ``y`` [B]: column 0 is ``y``, then K distinct
        negatives drawn uniformly, without replacement, from the samples other than the anchor,
        or, when the bank was given ``labels``, from the samples of other classes.

        RepDistiller's fallback draws uniformly over all N with replacement (so an anchor can
        be its own negative); the data loader's ``contrast_idx`` (``--mode exact|relax``) is the
        usual source and never hits this path."""
        if self._sampler is None:
            if self.labels is None and self.K > self.n_data - 1:
                raise UserError(f"--nce_k {self.K} is more negatives than the {self.n_data - 1} other samples: "
                                f"use --nce_k {self.n_data - 1} or less")
            classes = self.labels if self.labels is not None else torch.arange(self.n_data)
            self._sampler = ContrastSampler(classes, self.K, mode="exact")
        if self._sampler.labels.device != y.device:
            self._sampler.to(y.device)
        return self._sampler(y)


def first_occurrences(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``y`` [B] and the position of each one's first occurrence."""
    values, inverse = torch.unique(y, return_inverse=True)
    positions = torch.arange(y.numel(), device=y.device)
    first = torch.full_like(values, y.numel()).scatter_reduce(0, inverse, positions, reduce="amin")
    return values, first
