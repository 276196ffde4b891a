"""What every data set shares: the index wrapper, the class-balanced subset, the contrastive
collate function and the construction of the train/validation loaders."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from helper.distributed import EpochSampler, ShardSampler, current
from helper.errors import UserError

from .needs import DataNeeds
from .options import LOADERS, DataOptions
from .sampling import ContrastSampler
from .skipping import SkippingLoader, SkipUnreadable, Unreadable
from .tensor_loader import TensorImages, TensorLoader, tensor_source


@dataclass
class DataBundle:
    """The loaders of one run and what the models and losses need to know about the data.

    train_loader batches: ``(img, target)``, ``(img, target, index)`` when the needs ask for
    ``index``, ``(img, target, index, contrast_idx)`` with a contrast need (``[B, K+1]``).
    val_loader batches: ``(img, target)``. ``index`` is the position in the training set (after
    ``--subset``), ``n_data`` its size and ``train_labels`` (LongTensor ``[n_data]``) its labels.
    """

    train_loader: DataLoader | TensorLoader
    val_loader: DataLoader | TensorLoader
    n_data: int
    num_classes: int
    train_labels: torch.Tensor


class IndexedDataset(Dataset):
    """A view of a map-style data set, optionally restricted to ``indices``.

    Item ``i`` is the base set's item ``indices[i]`` as ``(img, target)``, followed by ``i``
    when ``with_index`` is set (so indices always count rows of this view).
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | torch.Tensor | None = None,
                 with_index: bool = False):
        self.base = base
        self.indices = None if indices is None else torch.as_tensor(indices).long().tolist()
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, ...] | Unreadable:
        item = self.base[i if self.indices is None else self.indices[i]]
        if isinstance(item, Unreadable):  # an image file that could not be read: the collate drops it
            return item
        img, target = item[:2]
        return (img, target, i) if self.with_index else (img, target)


class ContrastCollate:
    """Collate ``(img, target, index)`` items and append the batch's ``contrast_idx`` ``[B, K+1]``
    drawn by ``sampler`` (in the loader's worker, with the worker's seeded torch RNG)."""

    def __init__(self, sampler: ContrastSampler):
        self.sampler = sampler

    def __call__(self, items: list[tuple[Any, ...]]) -> tuple[torch.Tensor, ...]:
        img, target, index = default_collate(items)
        return img, target, index, self.sampler(index, target)


def balanced_subset(labels: torch.Tensor, size: int, seed: int, flag: str = "--subset") -> torch.Tensor:
    """Positions of a class-balanced subset of ``size`` samples, in increasing order.

    Classes are filled in turns (one random sample of each class, in a random class order, then
    a second, ...), so class counts differ by at most one unless a class runs out of samples.
    Depends only on ``labels``, ``size`` and ``seed``; ``flag`` names the option in errors.
    """
    labels = torch.as_tensor(labels).long()
    total = labels.numel()
    if not 0 < size <= total:
        raise UserError(f"{flag} {size} is not between 1 and the number of samples ({total}): "
                        f"use a value in that range, or 0 for all")
    gen = torch.Generator().manual_seed(int(seed))
    num_classes = int(labels.max()) + 1
    shuffled = torch.randperm(total, generator=gen)
    by_class = shuffled[torch.argsort(labels[shuffled], stable=True)]  # class blocks, random inside
    counts = torch.bincount(labels, minlength=num_classes)
    rank_in_class = torch.arange(total) - (torch.cumsum(counts, 0) - counts)[labels[by_class]]
    class_turn = torch.randperm(num_classes, generator=gen)[labels[by_class]]
    priority = rank_in_class * num_classes + class_turn
    chosen = by_class[torch.argsort(priority)[:size]]
    return torch.sort(chosen).values


def make_bundle(train_set: Dataset, val_set: Dataset, train_labels: torch.Tensor, num_classes: int,
                data: DataOptions, needs: DataNeeds = DataNeeds(), *,
                val_batch_size: int | None = None, val_workers: int | None = None,
                negative_fraction: float = 1.0, device: torch.device | str | None = None) -> DataBundle:
    """Build the train/validation loaders for a data set given as two map-style sets.

    ``data`` supplies ``loader``, ``batch_size``, ``num_workers``, ``subset``, ``val_subset`` and
    ``seed`` (None: a random one); ``val_subset`` picks a class-balanced validation subset that
    does not depend on the seed. ``needs`` (the method's :class:`DataNeeds`) says whether the
    training batches carry ``index`` and ``contrast_idx`` (its ``contrast.k`` negatives,
    ``contrast.mode`` positives; RepDistiller's ``percent`` is ``negative_fraction``).
    ``data.loader`` ``'tensor'`` (the default): sets held in memory as CIFAR's are (uint8 ``data``,
    see :func:`dataset.tensor_loader.tensor_source`) become :class:`TensorLoader` s whose batches
    are made with tensor ops on ``device`` (default the CPU) and need no workers; other sets
    (image folders) silently get torchvision DataLoaders, as with ``'torchvision'``.
    The tensor loaders have the same order (:class:`EpochSampler`) and, for validation, the same
    sharding; their augmentations and negatives come from ``(seed, epoch, rank)`` alone.
    Training order: :class:`helper.distributed.EpochSampler` (a permutation drawn from
    ``seed + epoch``, sharded across ranks under torchrun; call ``train_loader.sampler.set_epoch``).
    Each epoch's worker seeds come from ``train_loader.generator`` (seeded ``seed + rank``),
    so the loader's output is reproducible, and that generator's state is all a resume has to
    save (plus torch's global RNG when ``num_workers`` is 0). Validation is sharded without padding.
    """
    batch_size, loader_kind, num_workers = data.batch_size, data.loader, data.num_workers or 0
    if loader_kind not in LOADERS:
        raise UserError(f"unknown --loader {loader_kind!r}: use one of {', '.join(LOADERS)}")
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    seed = data.seed
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    labels = torch.as_tensor(train_labels).long()
    indices = balanced_subset(labels, data.subset, seed) if data.subset else None
    if indices is not None:
        labels = labels[indices]
    with_index = needs.with_index
    train_view = IndexedDataset(train_set, indices, with_index=with_index)
    collate = sampler = None
    if needs.contrast is not None:
        sampler = ContrastSampler(labels, needs.contrast.k, needs.contrast.mode, negative_fraction,
                                  generator=torch.Generator().manual_seed(int(seed)))
        collate = ContrastCollate(sampler)
    n_data = len(train_view)
    rank = current()
    # One permutation per epoch from (seed, epoch), sharded across ranks: resumable and the same
    # on every rank. The loader's generator gives each epoch's worker seeds (different per rank).
    train_sampler = EpochSampler(n_data, seed, rank.rank, rank.world_size)
    per_rank = len(train_sampler)
    # a last batch of one sample would break BatchNorm in training: drop it
    drop_last = per_rank > 1 and per_rank % batch_size == 1
    val_size = data.val_subset
    val_indices = None
    if val_size:  # the same samples whatever the run's seed, so runs stay comparable
        val_labels = torch.as_tensor(val_set.targets, dtype=torch.long)  # type: ignore[attr-defined]
        val_indices = balanced_subset(val_labels, val_size, seed=0, flag="--val_subset")
    train_source = tensor_source(train_set) if loader_kind == "tensor" else None
    val_source = tensor_source(val_set) if train_source is not None else None
    if train_source is not None and val_source is not None:
        device = torch.device(device or "cpu")
        tensor_train = TensorImages(train_source, indices, device=device, with_index=with_index, base=train_set)
        tensor_val = TensorImages(val_source, val_indices, device=device, base=val_set)
        return DataBundle(
            TensorLoader(tensor_train, batch_size, train_sampler, augment=train_source.augment,
                         contrast=sampler, seed=int(seed), rank=rank.rank, drop_last=drop_last),
            TensorLoader(tensor_val, val_batch_size or batch_size,
                         ShardSampler(len(tensor_val), rank.rank, rank.world_size)),
            n_data, num_classes, labels)
    pin = torch.cuda.is_available()
    # Image folders may hold unreadable files: their items are left out of the batches (a
    # training batch is kept at two samples at least) and counted (``loader.images_skipped``).
    train_loader = SkippingLoader(
        train_view, batch_size=batch_size, sampler=train_sampler, num_workers=num_workers,
        collate_fn=SkipUnreadable(collate, min_size=2), pin_memory=pin, drop_last=drop_last,
        generator=torch.Generator().manual_seed(int(seed) + rank.rank))
    val_workers = num_workers if val_workers is None else val_workers
    val_view = IndexedDataset(val_set, val_indices)
    val_loader = SkippingLoader(
        val_view, batch_size=val_batch_size or batch_size,
        sampler=ShardSampler(len(val_view), rank.rank, rank.world_size), num_workers=val_workers, pin_memory=pin,
        # its own generator: iterating it must not draw from the global RNG (validating
        # teachers or resuming would otherwise change the training run's augmentations)
        generator=torch.Generator().manual_seed(0), collate_fn=SkipUnreadable())
    return DataBundle(train_loader, val_loader, n_data, num_classes, labels)
