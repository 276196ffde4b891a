"""The tensor data pipeline for CIFAR-sized data: the whole set as one uint8 tensor on the run's
device, and per batch a gather of its rows, random crop (zero padding) + horizontal flip, and
normalisation, all with tensor ops. No worker processes, no PIL, no per-image Python.

The augmentation has the distribution of torchvision's ``RandomCrop(32, padding=4)`` +
``RandomHorizontalFlip()``: per image, the crop's top and left offsets are independent and
uniform in ``0..2 * padding`` (over the zero-padded image), then the crop is flipped with
probability 0.5. Given the same offsets and flip, the output equals torchvision's
``hflip(crop(pad(img, 4), top, left, 32, 32))`` followed by ``ToTensor`` + ``Normalize`` bit for bit
(``tests/data/test_tensor_loader.py``).

Randomness is a function of ``(seed, epoch, rank)`` and the position in the epoch's order, never of
a mutable RNG state: an epoch's crops and flips are drawn up front, one per position, from a
generator seeded by ``(seed, epoch, rank)``, and each batch's contrastive negatives from one seeded
by ``(seed, epoch, rank, batch number)``. Skipping the first batches of an epoch (a mid-epoch
resume) therefore leaves the rest of the epoch identical, and nothing has to be saved: the loader's
``generator`` is None.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler
from torchvision import transforms

from .sampling import ContrastSampler
from .views import ToViews

_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15
# streams of random numbers a loader draws (mixed into the seed so they never overlap)
AUGMENT_STREAM, CONTRAST_STREAM = 1, 2


def stream_seed(*values: int) -> int:
    """A seed in ``[0, 2**63)`` from a tuple of integers (any sign): SplitMix64 steps over the values,
    so different tuples give unrelated streams (``(seed, epoch)`` and ``(seed + 1, epoch - 1)`` too)."""
    state = _GOLDEN
    for value in values:
        state = ((state ^ (int(value) & _MASK64)) + _GOLDEN) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state >> 1


@dataclass(frozen=True)
class Augment:
    """The training augmentation: ``RandomCrop(size, padding)`` with zero fill (``padding`` 0: no
    crop) and ``RandomHorizontalFlip(flip)`` (``flip`` 0: no flip)."""

    padding: int = 4
    flip: float = 0.5

    def draw(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``count`` independent draws: ``top``, ``left`` (LongTensor ``[count]``, uniform in
        ``0..2 * padding``) and ``flip`` (BoolTensor ``[count]``, True with probability ``flip``)."""
        offsets = torch.randint(0, 2 * self.padding + 1, (2, count), generator=generator)
        flip = torch.rand(count, generator=generator) < self.flip
        return offsets[0], offsets[1], flip


@dataclass(frozen=True)
class TensorSource:
    """What the tensor pipeline needs from a map-style set: its images (uint8 ``[N, H, W, C]``),
    labels, normalisation and training augmentation (None: the set's transform has none);
    ``views``: the transform's :class:`dataset.views.ToViews` (None: ``Normalize``, 3 channels)."""

    images: np.ndarray | torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment | None
    views: ToViews | None = None


def tensor_source(dataset: Any) -> TensorSource | None:
    """The :class:`TensorSource` of a data set held in memory the way torchvision's CIFAR sets are
    (``data``: uint8 ``[N, H, W, 3]``, ``targets``; ``transform``: optionally
    ``RandomCrop(H, padding)`` (zero fill) and ``RandomHorizontalFlip``, then ``ToTensor`` and
    ``Normalize``), or None when the set is anything else (image folders, other transforms):
    those sets go through the torchvision loader. ``ToViews`` may take ``Normalize``'s place
    (``data`` then has its layout's source channels), and ``ConvertImageDtype(torch.float32)``
    ``ToTensor``'s (for sets whose items are uint8 tensors ``[C, H, W]``)."""
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    if not isinstance(data, (np.ndarray, torch.Tensor)) or targets is None:
        return None
    if data.dtype not in (np.uint8, torch.uint8) or data.ndim != 4:
        return None
    steps = list(getattr(dataset.transform, "transforms", [dataset.transform]))
    padding, flip = 0, 0.0
    if steps and isinstance(steps[0], transforms.RandomCrop):
        crop = steps.pop(0)
        if (tuple(crop.size) != tuple(data.shape[1:3]) or crop.pad_if_needed or crop.padding_mode != "constant"
                or crop.fill != 0 or not isinstance(crop.padding, int)):
            return None
        padding = crop.padding
    if steps and isinstance(steps[0], transforms.RandomHorizontalFlip):
        flip = float(steps.pop(0).p)
    if len(steps) != 2 or not _is_to_float(steps[0]) or not isinstance(steps[1], (transforms.Normalize, ToViews)):
        return None
    views = steps[1] if isinstance(steps[1], ToViews) else None
    if data.shape[3] != (3 if views is None else views.layout.source_channels):
        return None
    mean, std = tuple(map(float, steps[1].mean)), tuple(map(float, steps[1].std))
    augment = Augment(padding, flip) if padding or flip else None
    return TensorSource(data, torch.as_tensor(targets, dtype=torch.long), mean, std, augment, views)


def _is_to_float(step: Any) -> bool:
    """Whether ``step`` turns uint8 images into float ones in [0, 1] (``ToTensor``, or
    ``ConvertImageDtype`` to float32)."""
    return isinstance(step, transforms.ToTensor) or (
        isinstance(step, transforms.ConvertImageDtype) and step.dtype == torch.float32)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float32, as torchvision's ``ToTensor`` + ``Normalize`` compute it
    (divide by 255, subtract ``mean``, divide by ``std``; ``mean``, ``std``: ``[3, 1, 1]``)."""
    return images.float().div_(255).sub_(mean).div_(std)


class CropFlip:
    """Random crop with zero padding + horizontal flip of uint8 batches ``[B, C, H, W]``, for given
    parameters. The ``(2p+1)^2 * 2`` possible pixel maps are tabulated once (``[codes, H * W]``
    indices into the padded image), so a batch is one pad and one gather."""

    def __init__(self, height: int, width: int, padding: int, device: torch.device | str = "cpu"):
        self.height, self.width, self.padding = height, width, padding
        self.padded_width = width + 2 * padding
        span = 2 * padding + 1
        rows = torch.arange(span)[:, None] + torch.arange(height)[None, :]                 # [top, y]
        cols = torch.arange(span)[:, None] + torch.arange(width)[None, :]                  # [left, x]
        cols = torch.stack([cols, cols.flip(1)])                                           # [flip, left, x]
        table = rows[None, :, None, :, None] * self.padded_width + cols[:, None, :, None, :]  # [flip, top, left, y, x]
        self.table = table.reshape(2 * span * span, height * width).to(device)
        self.span = span

    def __call__(self, images: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                 flip: torch.Tensor) -> torch.Tensor:
        """images: uint8 ``[B, C, H, W]``; top, left: LongTensor ``[B]`` in ``0..2p``; flip: BoolTensor
        ``[B]``. Returns ``hflip(crop(pad(image, p), top, left, H, W))`` where flip is set, else
        the crop, as uint8 ``[B, C, H, W]``."""
        b, c = images.shape[:2]
        p = self.padding
        padded = F.pad(images, (p, p, p, p)) if p else images
        code = (flip.long() * self.span + top) * self.span + left
        where = self.table[code].unsqueeze(1).expand(b, c, -1)
        return padded.reshape(b, c, -1).gather(2, where).view(b, c, self.height, self.width)


class TensorImages:
    """Images as one uint8 tensor ``[N, C, H, W]`` with their labels, on ``device``.

    Item ``i`` is ``(img, target)`` as the torchvision set's test transform gives it (``img``
    float ``[3, H, W]``, normalised, no augmentation), followed by ``i`` when ``with_index``.
    ``base`` is the set the images came from (kept for reference; no copy).
    """

    def __init__(self, source: TensorSource, indices: torch.Tensor | None = None, *,
                 device: torch.device | str = "cpu", with_index: bool = False, base: Any = None):
        images = torch.as_tensor(source.images)
        labels = source.labels
        if indices is not None:
            indices = torch.as_tensor(indices).long()
            images, labels = images[indices], labels[indices]
        self.device = torch.device(device)
        self.images = images.permute(0, 3, 1, 2).to(self.device).contiguous()  # [N, C, H, W] uint8
        self.labels = labels.to(self.device)
        self.mean = torch.tensor(source.mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.std = torch.tensor(source.std, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.targets = labels.tolist()
        self.with_index = with_index
        self.base = base
        self.views = source.views

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images ``[B, C, H, W]`` -> the float batch the set's transform gives: normalised
        (``Normalize``), or its views concatenated (``ToViews``)."""
        if self.views is None:
            return normalize(images, self.mean, self.std)
        return self.views.layout.make(images.float().div_(255), self.views.mean, self.views.std)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        img = self.to_float(self.images[i].unsqueeze(0))[0]
        return (img, self.targets[i], i) if self.with_index else (img, self.targets[i])


class TensorLoader:
    """Batches of a :class:`TensorImages` set in the order of ``sampler``, made with tensor ops.

    Batches: ``(img, target)``; ``(img, target, index)`` with ``dataset.with_index``;
    ``(img, target, index, contrast_idx)`` with ``contrast`` (a :class:`ContrastSampler` over the
    set's labels, ``contrast_idx`` ``[B, K+1]``). ``img`` float ``[B, 3, H, W]`` and the rest
    LongTensors, all on the set's device (``img`` has the set's views' channels, see
    :meth:`TensorImages.to_float`).

    sampler: the order of one pass, e.g. :class:`common.distributed.EpochSampler` (training:
    ``set_epoch`` and ``skip`` work as with a DataLoader) or ``ShardSampler`` (validation).
    It yields ``len(sampler)`` positions of the pass unless told to skip some first; the skipped
    count is taken as the offset into the pass, so the batches after it are those of the whole pass.
    augment: the training augmentation, or None (the images as they are).
    seed, rank: with the sampler's ``epoch`` (0 without one) they seed every random draw.
    drop_last: leave out a last, incomplete batch.
    image_threads: torch threads for making a batch's images on the CPU (default 1). They are
    a few small memory-bound ops (well under a millisecond for 64 images), where splitting over
    threads gains little and costs a synchronisation per op, which is ruinous when another
    process holds a core (measured on 2 cores: 3,000 instead of 230,000 images/s). The
    contrastive sampling (one large sort) keeps the process's thread count.
    """

    generator = None   # nothing to save for a resume: every draw comes from (seed, epoch, rank)
    num_workers = 0

    def __init__(self, dataset: TensorImages, batch_size: int, sampler: Sampler[int], *,
                 augment: Augment | None = None, contrast: ContrastSampler | None = None,
                 seed: int = 0, rank: int = 0, drop_last: bool = False, image_threads: int | None = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset, self.batch_size, self.sampler = dataset, int(batch_size), sampler
        self.augment, self.seed, self.rank, self.drop_last = augment, int(seed), int(rank), drop_last
        self.image_threads = image_threads
        self.contrast = contrast.to(dataset.device) if contrast is not None else None
        self.crop_flip = None
        if augment is not None:
            _, _, height, width = dataset.images.shape
            self.crop_flip = CropFlip(height, width, augment.padding, dataset.device)

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __len__(self) -> int:
        per_pass = len(self.sampler)  # type: ignore[arg-type]
        return per_pass // self.batch_size if self.drop_last else math.ceil(per_pass / self.batch_size)

    def epoch_params(self, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The augmentation of every position of the pass of ``epoch`` (default: the sampler's):
        ``top``, ``left``, ``flip``, each ``[len(sampler)]`` on the CPU."""
        if self.augment is None:
            raise ValueError("this loader has no augmentation")
        epoch = self.epoch if epoch is None else epoch
        gen = torch.Generator().manual_seed(stream_seed(self.seed, epoch, self.rank, AUGMENT_STREAM))
        return self.augment.draw(len(self.sampler), gen)  # type: ignore[arg-type]

    def contrast_generator(self, epoch: int, batch_number: int) -> torch.Generator:
        """The generator of the negatives of batch ``batch_number`` (counted from 0) of ``epoch``."""
        gen = torch.Generator(device=self.dataset.device)
        return gen.manual_seed(stream_seed(self.seed, epoch, self.rank, batch_number, CONTRAST_STREAM))

    @contextlib.contextmanager
    def _image_threads(self) -> Iterator[None]:
        """Run the block with ``image_threads`` torch threads (CPU only); restores the count."""
        before = torch.get_num_threads()
        if self.dataset.device.type != "cpu" or not self.image_threads or self.image_threads == before:
            yield
            return
        torch.set_num_threads(self.image_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch = self.epoch
        per_pass = len(self.sampler)  # type: ignore[arg-type]
        with self._image_threads():
            order = torch.as_tensor(list(self.sampler), dtype=torch.long)  # consumes a pending skip
            offset = per_pass - order.numel()
            end = (per_pass // self.batch_size) * self.batch_size if self.drop_last else per_pass
            order = order[:max(end - offset, 0)].to(self.dataset.device)
            params = None
            if self.crop_flip is not None:
                params = [p[offset:end].to(self.dataset.device) for p in self.epoch_params(epoch)]
        data = self.dataset
        for start in range(0, order.numel(), self.batch_size):
            index = order[start:start + self.batch_size]
            with self._image_threads():
                images = data.images.index_select(0, index)
                if params is not None:
                    top, left, flip = (p[start:start + self.batch_size] for p in params)
                    images = self.crop_flip(images, top, left, flip)  # type: ignore[misc]
                batch: tuple[torch.Tensor, ...] = (data.to_float(images), data.labels[index])
            if data.with_index or self.contrast is not None:
                batch += (index,)
            if self.contrast is not None:
                gen = self.contrast_generator(epoch, (offset + start) // self.batch_size)
                batch += (self.contrast(index, batch[1], generator=gen),)
            yield batch
