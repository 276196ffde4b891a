"""Contrastive sampling for CRD: one positive and K negatives per anchor, drawn per batch.

For an anchor of class ``c`` the negatives are ``K`` distinct training samples drawn uniformly
from the samples of every other class, as in CRD (an unlabelled sample, label -1, is a class of
its own: its negatives are drawn uniformly from all the other samples). Unlike RepDistiller's per-item
``np.random.choice`` this works on a whole batch with tensor ops, on any device, with unequal
class counts, and with memory ``O(B * K)`` (never ``O(B * N)``):

- the training set is kept in class-sorted order, so the candidates of class ``c`` are that
  order with the block of class ``c`` cut out; a candidate is named by its position
  ``p in [0, N - n_c)`` and mapped to a sample by stepping over the block;
- ``K`` distinct positions per row are the first ``K`` distinct values of a stream of uniform
  draws with replacement (found with one sort of the batch): each new value of such a stream is
  uniform over the values not seen yet, so this is exactly uniform sampling without
  replacement. When ``K`` is more than half of a row's candidates the stream would be long,
  so such rows rank ``N - n_c`` random keys instead (then ``N - n_c < 2K``).
"""
from __future__ import annotations

import math

import torch

from common.errors import UserError

from .needs import MODES

UNLABELED = -1  # the label of a sample without one (an unlabelled split, --split unlabeled)


def own_classes(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` [N] with every unlabelled sample (label -1) made a class of its own (numbered
    after the real classes): what instance discrimination needs, where each sample's only
    positive is itself and every other sample is a negative. Labelled samples keep their class."""
    labels = torch.as_tensor(labels).long().flatten()
    missing = labels < 0
    if not bool(missing.any()):
        return labels
    first = int(labels.max()) + 1 if bool((~missing).any()) else 0
    labels = labels.clone()
    labels[missing] = first + torch.arange(int(missing.sum()), device=labels.device)
    return labels

# Rows with K > DENSE_SHARE * candidates rank random keys (cost O(candidates) < O(K / share));
# the others take the first K distinct values of a random stream (at most about 1.4 K draws).
DENSE_SHARE = 0.5
# Largest [rows, candidates] int32 table of first positions (64 MB) that _first_copies uses
# instead of a sort: a CIFAR batch (64 x 50000) fits, an ImageNet one sorts.
TABLE_ELEMENTS = 1 << 24


def _draw_below(upper: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform integers in ``[0, upper)`` elementwise (``upper`` is a LongTensor of any shape)."""
    u = torch.rand(upper.shape, dtype=torch.float64, device=upper.device, generator=generator)
    return (u * upper).long().clamp_max_(upper - 1)


def distinct_positions(upper: torch.Tensor, k: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``k`` distinct integers uniformly from ``[0, upper[b])`` for each row ``b``.

    upper: LongTensor ``[B]`` with ``upper[b] >= k``. Returns LongTensor ``[B, k]``: each row a
    uniformly random ordered k-subset (sampling without replacement).
    """
    if upper.numel() == 0 or k == 0:
        return torch.empty(upper.numel(), k, dtype=torch.long, device=upper.device)
    dense = upper * DENSE_SHARE < k
    if bool(dense.all()):
        return _rank_random_keys(upper, k, generator)
    if not bool(dense.any()):
        return _first_distinct(upper, k, generator)
    out = torch.empty(upper.numel(), k, dtype=torch.long, device=upper.device)
    out[dense] = _rank_random_keys(upper[dense], k, generator)
    out[~dense] = _first_distinct(upper[~dense], k, generator)
    return out


def _rank_random_keys(upper: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Positions of the ``k`` smallest of ``upper[b]`` random keys: a random ordered k-subset."""
    width = int(upper.max())
    keys = torch.randint(0, 2**62, (upper.numel(), width), device=upper.device, generator=generator)
    outside = torch.arange(width, device=upper.device) >= upper[:, None]
    keys[outside] = 2**62  # never among the k smallest, since upper >= k
    return keys.topk(k, dim=1, largest=False, sorted=True).indices


def _draws_for(candidates: int, k: int) -> int:
    """Stream length that holds ``k`` distinct values out of ``candidates`` with high probability
    (mean ``m ln(m / (m - k))`` plus five standard deviations; needs ``k <= candidates / 2``)."""
    share = k / candidates
    mean = candidates * math.log(candidates / (candidates - k))
    std = math.sqrt(k * share) / (1.0 - share)
    return int(mean + 5.0 * std) + 8


def _first_distinct(upper: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """The first ``k`` distinct values of a stream of uniform draws from ``[0, upper[b])``.

    Each new value of an i.i.d. uniform stream is uniform over the values not seen yet, so these
    are exactly a uniform ordered sample without replacement. Rows whose stream was too short
    (rare) are drawn again with a longer one (an event symmetric in the values: still uniform).
    """
    out = torch.empty(upper.numel(), k, dtype=torch.long, device=upper.device)
    todo = torch.arange(upper.numel(), device=upper.device)
    draws = _draws_for(int(upper.min()), k)
    while todo.numel() > 0:
        bound = upper[todo]
        values = _draw_below(bound[:, None].expand(-1, draws), generator)
        fresh = _first_copies(values, int(bound.max()))
        rank = fresh.cumsum(dim=1, dtype=torch.int32)
        enough = rank[:, -1] >= k
        take = fresh & (rank <= k)
        if bool(enough.all()):
            out[todo] = values[take].view(-1, k)
            break
        out[todo[enough]] = values[enough][take[enough]].view(-1, k)
        todo, draws = todo[~enough], 2 * draws
    return out


def _first_copies(values: torch.Tensor, width: int) -> torch.Tensor:
    """BoolTensor like ``values`` [R, L] (each in ``[0, width)``): True where a value occurs for
    the first time in its row.

    Up to ``TABLE_ELEMENTS`` cells, an [R, width] table takes each value's first position
    (``scatter_reduce`` amin; 3x faster than sorting at CIFAR's N); beyond, one stable sort."""
    rows, length = values.shape
    if rows * width <= TABLE_ELEMENTS:
        position = torch.arange(length, dtype=torch.int32, device=values.device).expand(rows, -1)
        first = torch.full((rows, width), length, dtype=torch.int32, device=values.device)
        first.scatter_reduce_(1, values, position, reduce="amin")
        return first.gather(1, values) == position
    row = torch.arange(rows, device=values.device)[:, None]
    keys = (row * width + values).flatten()
    sorted_keys, order = keys.sort(stable=True)  # stable: a value's first copy comes first
    fresh = torch.ones_like(keys, dtype=torch.bool)
    fresh[order[1:]] = sorted_keys[1:] != sorted_keys[:-1]
    return fresh.view(rows, length)


class ContrastSampler:
    """Draws CRD's ``contrast_idx`` for a batch: column 0 the positive, then K negatives.

    labels: LongTensor ``[N]``, the class of every training sample (index order); an unlabelled
    sample (-1) is a class of its own (:func:`own_classes`), so with an unlabelled training set
    the negatives are K distinct samples drawn uniformly from all the others (instance
    discrimination) and the positive is the sample itself in either mode.
    k: number of negatives per anchor; it must not exceed the candidates of any class present
    (``N - n_c``), else a :class:`UserError` names the largest usable value.
    mode: ``'exact'`` (the positive is the anchor itself) or ``'relax'`` (a uniformly random
    sample of the anchor's class, possibly the anchor).
    negative_fraction: RepDistiller's ``percent``: below 1, each class draws its negatives from a
    fixed random share of its candidates (the same count for every class), chosen here.
    generator: optional generator for that choice.
    """

    def __init__(self, labels: torch.Tensor, k: int, mode: str = "exact",
                 negative_fraction: float = 1.0, generator: torch.Generator | None = None):
        if mode not in MODES:
            raise UserError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")
        if not 0.0 < negative_fraction <= 1.0:
            raise UserError(f"the share of negatives (percent) must be in (0, 1], got {negative_fraction}")
        raw = torch.as_tensor(labels).long().flatten()
        labels = own_classes(raw)
        # batches carry their labels (-1 for unlabelled samples): look the sampler's classes up instead
        self.relabelled = bool((raw < 0).any())
        if k < 0:
            raise UserError(f"the number of negatives (--nce_k) must be >= 0, got {k}")
        self.k, self.mode = int(k), mode
        self.labels = labels
        self.counts = torch.bincount(labels)
        self.class_order = torch.argsort(labels, stable=True)   # samples sorted by class
        self.starts = torch.cumsum(self.counts, 0) - self.counts  # first position of each class
        self.candidates = labels.numel() - self.counts            # negatives available per class
        present = self.counts > 0
        fewest = int(self.candidates[present].min()) if bool(present.any()) else 0
        if self.k > fewest:
            worst = int(torch.nonzero(present & (self.candidates == fewest))[0])
            which = ("an unlabelled sample has" if self.relabelled
                     and worst >= int(self.counts.numel()) - int((raw < 0).sum()) else f"class {worst} has")
            raise UserError(
                f"--nce_k {self.k} is more negatives than {which} "
                f"({fewest} samples of other classes): use --nce_k {fewest} or less")
        self.negative_table: torch.Tensor | None = None
        if negative_fraction < 1.0:
            self.negative_table = self._fixed_negatives(int(fewest * negative_fraction), generator)
            if self.k > self.negative_table.shape[1]:
                raise UserError(
                    f"--nce_k {self.k} is more than the {self.negative_table.shape[1]} negatives kept "
                    f"per class with percent={negative_fraction}: lower K or raise percent")

    def _fixed_negatives(self, size: int, generator: torch.Generator | None) -> torch.Tensor:
        """LongTensor ``[C, size]``: a random ``size``-subset of each class's candidates."""
        classes = torch.arange(self.counts.numel())
        positions = distinct_positions(self.candidates, size, generator)
        return self._position_to_sample(classes[:, None].expand_as(positions), positions)

    def _position_to_sample(self, target: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Map candidate positions ``[B, K]`` of anchors of class ``target`` to sample indices."""
        start = self.starts[target]
        skipped = position + (position >= start) * self.counts[target]
        return self.class_order[skipped]

    def to(self, device: torch.device | str) -> "ContrastSampler":
        """Move the sampler's tables to ``device`` (in place); returns self."""
        for name in ("labels", "counts", "class_order", "starts", "candidates", "negative_table"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def __call__(self, index: torch.Tensor, target: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """index: LongTensor ``[B]`` of training-set positions; target: their labels (looked up
        when omitted). Returns ``contrast_idx``: LongTensor ``[B, K+1]`` on the sampler's device."""
        device = self.labels.device
        index = torch.as_tensor(index).long().to(device).flatten()
        if target is None or self.relabelled:
            target = self.labels[index]
        else:
            target = torch.as_tensor(target).long().to(device).flatten()
        if self.mode == "exact":
            positive = index
        else:
            offset = _draw_below(self.counts[target], generator)
            positive = self.class_order[self.starts[target] + offset]
        if self.negative_table is not None:
            upper = torch.full_like(target, self.negative_table.shape[1])
            negatives = self.negative_table[target[:, None], distinct_positions(upper, self.k, generator)]
        else:
            positions = distinct_positions(self.candidates[target], self.k, generator)
            negatives = self._position_to_sample(target[:, None], positions)
        return torch.cat([positive[:, None], negatives], dim=1)
