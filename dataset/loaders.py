"""What every data set shares: the index wrapper, the class-balanced subset, the contrastive
collate function and the construction of the train/validation loaders."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import copy

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from common.distributed import EpochSampler, ShardSampler, current
from common.errors import UserError

from .needs import DataNeeds
from .options import LOADERS
from .sampling import ContrastSampler, own_classes
from .skipping import SkippingLoader, SkipUnreadable, Unreadable
from .tensor_loader import TensorImages, TensorLoader, tensor_source
from .views import ToViews, ViewLayout, with_views

if TYPE_CHECKING:
    from . import DataOptions


@dataclass
class DataBundle:
    """The loaders of one run and what the models and losses need to know about the data.

    train_loader batches: ``(img, target)``, ``(img, target, index)`` when the needs ask for
    ``index``, ``(img, target, index, contrast_idx)`` with a contrast need (``[B, K+1]``).
    val_loader batches: ``(img, target)``. ``index`` is the position in the training set (after
    ``--val_split`` and ``--subset``), ``n_data`` its size and ``train_labels`` (LongTensor
    ``[n_data]``) its labels. ``holdout_loader`` (``--val_split N``, else None): batches
    ``(img, target)`` of the N training images held out for model selection, with the test transform.
    ``layout``: the views ``img`` carries as channels (:meth:`ViewLayout.slice` gives a view's).
    """

    train_loader: DataLoader | TensorLoader
    val_loader: DataLoader | TensorLoader
    n_data: int
    num_classes: int
    train_labels: torch.Tensor
    holdout_loader: DataLoader | TensorLoader | None = None
    layout: ViewLayout = ViewLayout()


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


# the seed of --val_split's held-out images: fixed, apart from --seed (as --val_subset's)
VAL_SPLIT_SEED = 0


def balanced_subset(labels: torch.Tensor, size: int, seed: int, flag: str = "--subset") -> torch.Tensor:
    """Positions of a class-balanced subset of ``size`` samples, in increasing order.

    Classes are filled in turns (one random sample of each class, in a random class order, then
    a second, ...), so class counts differ by at most one unless a class runs out of samples.
    Depends only on ``labels``, ``size`` and ``seed``; ``flag`` names the option in errors. An
    unlabelled sample (-1) is a class of its own, so of an unlabelled set this is a uniformly
    random subset.
    """
    labels = own_classes(labels)
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
    does not depend on the seed; ``val_split`` holds out a class-balanced set of that many training
    images (the same whatever the seed) for model selection, never trained on (see
    :data:`VAL_SPLIT_SEED`). ``needs`` (the method's :class:`DataNeeds`) says whether the
    training batches carry ``index`` and ``contrast_idx`` (its ``contrast.k`` negatives,
    ``contrast.mode`` positives; RepDistiller's ``percent`` is ``negative_fraction``).
    ``data.loader`` ``'tensor'`` (the default): sets held in memory as CIFAR's are (uint8 ``data``,
    see :func:`dataset.tensor_loader.tensor_source`) become :class:`TensorLoader` s whose batches
    are made with tensor ops on ``device`` (default the CPU) and need no workers; other sets
    (image folders) silently get torchvision DataLoaders, as with ``'torchvision'``.
    The tensor loaders have the same order (:class:`EpochSampler`) and, for validation, the same
    sharding; their augmentations and negatives come from ``(seed, epoch, rank)`` alone.
    Training order: :class:`common.distributed.EpochSampler` (a permutation drawn from
    ``seed + epoch``, sharded across ranks under torchrun; call ``train_loader.sampler.set_epoch``).
    Each epoch's worker seeds come from ``train_loader.generator`` (seeded ``seed + rank``),
    so the loader's output is reproducible, and that generator's state is all a resume has to
    save (plus torch's global RNG when ``num_workers`` is 0). Validation is sharded without padding.
    ``needs.views`` other than ``("rgb",)``: both sets' ``Normalize`` is replaced by
    :class:`dataset.views.ToViews` (in place), so both loaders' ``img`` carry the views' channels.
    """
    for split in (train_set, val_set):
        transform = getattr(split, "transform", None)
        viewed = with_views(transform, needs.views)
        if viewed is not transform:
            split.transform = viewed  # type: ignore[attr-defined]
    steps = list(getattr(getattr(train_set, "transform", None), "transforms", []))
    layout = steps[-1].layout if steps and isinstance(steps[-1], ToViews) else ViewLayout()
    if data.loader not in LOADERS:
        raise UserError(f"unknown --loader {data.loader!r}: use one of {', '.join(LOADERS)}")
    if data.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {data.batch_size}")
    plan = _plan(train_set, val_set, train_labels, data, needs, negative_fraction)
    val_batch_size = val_batch_size or data.batch_size
    train_source = tensor_source(train_set) if data.loader == "tensor" else None
    val_source = tensor_source(val_set) if train_source is not None else None
    if train_source is not None and val_source is not None:
        device = torch.device(device or "cpu")
        tensor_train = TensorImages(train_source, plan.indices, device=device, with_index=needs.with_index,
                                    base=train_set)
        tensor_val = TensorImages(val_source, plan.val_indices, device=device, base=val_set)
        holdout = None
        if plan.holdout is not None:  # training images, without the training augmentation
            tensor_holdout = TensorImages(train_source, plan.holdout, device=device, base=train_set)
            holdout = TensorLoader(tensor_holdout, val_batch_size,
                                   ShardSampler(len(tensor_holdout), plan.rank, plan.world_size))
        return DataBundle(
            TensorLoader(tensor_train, data.batch_size, plan.order, augment=train_source.augment,
                         contrast=plan.contrast, seed=plan.seed, rank=plan.rank, drop_last=plan.drop_last),
            TensorLoader(tensor_val, val_batch_size, ShardSampler(len(tensor_val), plan.rank, plan.world_size)),
            plan.n_data, num_classes, plan.labels, holdout, layout)
    num_workers = data.num_workers or 0
    val_workers = num_workers if val_workers is None else val_workers
    holdout = None
    if plan.holdout is not None:
        holdout = _eval_loader(IndexedDataset(with_test_transform(train_set, val_set), plan.holdout), plan,
                               val_batch_size, val_workers)
    return DataBundle(*_folder_loaders(train_set, val_set, plan, needs, data.batch_size, val_batch_size,
                                       num_workers, val_workers), plan.n_data, num_classes, plan.labels, holdout, layout)


def with_test_transform(train_set: Dataset, val_set: Dataset) -> Dataset:
    """A shallow copy of ``train_set`` whose ``transform`` is ``val_set``'s (the held-out images
    of ``--val_split`` are seen as the test images are)."""
    if not hasattr(train_set, "transform") or not hasattr(val_set, "transform"):
        raise UserError("--val_split needs a data set whose images are transformed by a 'transform' attribute "
                        f"({type(train_set).__name__} has none): use --val_split 0")
    held = copy.copy(train_set)
    held.transform = val_set.transform  # type: ignore[attr-defined]
    return held


@dataclass
class _Plan:
    """What both kinds of loaders share: the seed, the training rows (``indices`` of the set, None:
    all) and their labels, the training order, the contrastive sampler, the validation rows."""

    seed: int
    labels: torch.Tensor
    indices: torch.Tensor | None
    val_indices: torch.Tensor | None
    holdout: torch.Tensor | None
    order: EpochSampler
    contrast: ContrastSampler | None
    drop_last: bool
    rank: int
    world_size: int

    @property
    def n_data(self) -> int:
        return len(self.labels)


def _plan(train_set: Dataset, val_set: Dataset, train_labels: torch.Tensor, data: DataOptions, needs: DataNeeds,
          negative_fraction: float) -> _Plan:
    seed = int(torch.randint(0, 2**62, ())) if data.seed is None else int(data.seed)
    labels = torch.as_tensor(train_labels).long()
    holdout, indices = None, None
    if data.val_split:  # the same images whatever the run's seed, so runs stay comparable
        if bool((labels < 0).any()):
            raise UserError("--val_split holds out labelled training images to choose the best epoch by their "
                            "top-1, and this training split has no labels (--split unlabeled): use --val_split 0")
        if data.val_split >= labels.numel():
            raise UserError(f"--val_split {data.val_split} leaves no training images (the set has "
                            f"{labels.numel()}): hold out fewer")
        holdout = balanced_subset(labels, data.val_split, seed=VAL_SPLIT_SEED, flag="--val_split")
        keep = torch.ones(labels.numel(), dtype=torch.bool)
        keep[holdout] = False
        indices = torch.nonzero(keep).flatten()
    if data.subset:  # of the rows left for training
        rows = labels if indices is None else labels[indices]
        chosen = balanced_subset(rows, data.subset, seed)
        indices = chosen if indices is None else indices[chosen]
    if indices is not None:
        labels = labels[indices]
    contrast = None
    if needs.contrast is not None:
        contrast = ContrastSampler(labels, needs.contrast.k, needs.contrast.mode, negative_fraction,
                                   generator=torch.Generator().manual_seed(seed))
    rank = current()
    # One permutation per epoch from (seed, epoch), sharded across ranks: resumable and the same
    # on every rank. The loader's generator gives each epoch's worker seeds (different per rank).
    order = EpochSampler(len(labels), seed, rank.rank, rank.world_size)
    # a last batch of one sample would break BatchNorm in training: drop it
    drop_last = len(order) > 1 and len(order) % data.batch_size == 1
    val_indices = None
    if data.val_subset:  # the same samples whatever the run's seed, so runs stay comparable
        val_labels = torch.as_tensor(val_set.targets, dtype=torch.long)  # type: ignore[attr-defined]
        val_indices = balanced_subset(val_labels, data.val_subset, seed=0, flag="--val_subset")
    return _Plan(seed, labels, indices, val_indices, holdout, order, contrast, drop_last, rank.rank,
                 rank.world_size)


def _folder_loaders(train_set: Dataset, val_set: Dataset, plan: _Plan, needs: DataNeeds, batch_size: int,
                    val_batch_size: int, num_workers: int, val_workers: int) -> tuple[SkippingLoader, SkippingLoader]:
    """torchvision DataLoaders (workers, PIL transforms) of the plan's training and validation rows."""
    pin = torch.cuda.is_available()
    train_view = IndexedDataset(train_set, plan.indices, with_index=needs.with_index)
    collate = ContrastCollate(plan.contrast) if plan.contrast is not None else None
    # Image folders may hold unreadable files: their items are left out of the batches (a
    # training batch is kept at two samples at least) and counted (``loader.images_skipped``).
    train_loader = SkippingLoader(
        train_view, batch_size=batch_size, sampler=plan.order, num_workers=num_workers,
        collate_fn=SkipUnreadable(collate, min_size=2), pin_memory=pin, drop_last=plan.drop_last,
        generator=torch.Generator().manual_seed(plan.seed + plan.rank))
    return train_loader, _eval_loader(IndexedDataset(val_set, plan.val_indices), plan, val_batch_size, val_workers)


def _eval_loader(view: IndexedDataset, plan: _Plan, batch_size: int, num_workers: int) -> SkippingLoader:
    """A torchvision DataLoader of ``view`` for testing: in order, sharded across ranks without padding."""
    return SkippingLoader(
        view, batch_size=batch_size, sampler=ShardSampler(len(view), plan.rank, plan.world_size),
        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        # its own generator: iterating it must not draw from the global RNG (validating
        # teachers or resuming would otherwise change the training run's augmentations)
        generator=torch.Generator().manual_seed(0), collate_fn=SkipUnreadable())
