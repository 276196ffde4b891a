"""Unreadable image files (truncated, empty, not images) are skipped instead of ending the run.

An image-folder data set (:class:`dataset.imagenet.SafeImageFolder`) returns an
:class:`Unreadable` item for a file it cannot decode, instead of raising in a DataLoader worker.
:class:`SkipUnreadable` (the loader's collate function) leaves those items out of the batch and,
only then, hands the batch over as a :class:`PartialBatch` that names them.
:class:`SkippingLoader` (the DataLoader) unwraps it in the main process: it warns once per file,
counts the skipped images (``images_skipped``, which the training loop records in results.json)
and raises one :class:`UserError` naming the folder when a whole batch was unreadable.
"""
from __future__ import annotations

import os
import struct
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from common.errors import UserError

# What PIL raises for a file it cannot decode (UnidentifiedImageError is an OSError; so are
# truncated files and unreadable ones), and for one over its pixel limit (Image.MAX_IMAGE_PIXELS):
# DecompressionBombError above twice the limit, DecompressionBombWarning up to it (raised as an
# error within pixel_limit_errors()); neither is an OSError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError,
                 Image.DecompressionBombWarning)


@contextmanager
def pixel_limit_errors() -> Iterator[None]:
    """Within it, an image over PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``) is an error even up
    to twice the limit (PIL only warns there): :data:`DECODE_ERRORS` then hold every image PIL
    refuses or warns about, which is unreadable like a damaged file (the limit stays PIL's). It sets
    the process's warning filters: enter it from one thread (threads started inside see it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


class Unreadable:
    """The item a data set returns for an image file it could not read: its ``path`` and why."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason

    @classmethod
    def from_error(cls, path: str, err: BaseException) -> "Unreadable":
        if isinstance(err, UnidentifiedImageError):  # its text repeats the path
            return cls(path, "not an image file PIL can identify (empty, or another kind of file)")
        return cls(path, f"{type(err).__name__}: {err}")

    def __repr__(self) -> str:
        return f"Unreadable({self.path!r}, {self.reason!r})"


class PartialBatch:
    """A collated ``batch`` and the :class:`Unreadable` items left out of it (``batch`` is None
    when every item was unreadable). Made by :class:`SkipUnreadable`, unwrapped by
    :class:`SkippingLoader`."""

    def __init__(self, batch: Any, unreadable: Sequence[Unreadable]):
        self.batch, self.unreadable = batch, list(unreadable)


class SkipUnreadable:
    """A collate function: leave the :class:`Unreadable` items out and collate the others with
    ``collate`` (so a contrastive collate draws ``contrast_idx`` for the samples kept). With
    ``min_size`` 2 (training), a batch left with one sample repeats it (BatchNorm and some losses
    need two). A batch that lost items is returned as a :class:`PartialBatch`."""

    def __init__(self, collate: Callable[[list], Any] | None = None, min_size: int = 1):
        self.collate = collate or default_collate
        self.min_size = min_size

    def __call__(self, items: list) -> Any:
        good = [item for item in items if not isinstance(item, Unreadable)]
        if len(good) == len(items):
            return self.collate(good)
        bad = [item for item in items if isinstance(item, Unreadable)]
        if not good:
            return PartialBatch(None, bad)
        wanted = min(self.min_size, len(items))
        if len(good) < wanted:
            good = (good * wanted)[:wanted]
        return PartialBatch(self.collate(good), bad)


def unreadable_batch_message(items: Sequence[Unreadable]) -> str:
    """The error for a batch whose every image was unreadable, naming their folder."""
    paths = [item.path for item in items]
    folder = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return (f"every image of a batch is unreadable ({len(paths)} files under {folder}, e.g. {paths[0]}: "
            f"{items[0].reason}): the folder's files are damaged or not images; check the data folder "
            "(the files must open as images), or remove the unreadable files")


class SkippingLoader(DataLoader):
    """A DataLoader whose set may return :class:`Unreadable` items (its ``collate_fn`` must be a
    :class:`SkipUnreadable`).

    Unreadable images are left out of their batches; the first time a file is skipped its path
    is printed on stderr (``warning: skipping unreadable image ...``). ``images_skipped`` counts
    the images skipped by this process's iterations of the loader so far (a file skipped in two
    epochs counts twice). A batch of unreadable images only raises one :class:`UserError` naming
    their folder, in the main process."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.images_skipped = 0
        self.warned: set[str] = set()

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, PartialBatch):
                if batch.batch is None:
                    raise UserError(unreadable_batch_message(batch.unreadable))
                self._skipped(batch.unreadable)
                batch = batch.batch
            yield batch

    def _skipped(self, items: Sequence[Unreadable]) -> None:
        self.images_skipped += len(items)
        for item in items:
            if item.path not in self.warned:
                self.warned.add(item.path)
                print(f"warning: skipping unreadable image {item.path} ({item.reason}); it is left out of "
                      "its batches and counted in results.json (images_skipped)", file=sys.stderr, flush=True)


def sample_images(dataset: Any, count: int = 2) -> torch.Tensor:
    """The first ``count`` readable images of ``dataset`` (items ``(img, ...)``) stacked: an input
    of the data's size, e.g. for sizing a method's modules."""
    images = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, Unreadable):
            images.append(item[0])
            if len(images) == count:
                return torch.stack(images)
    raise UserError(f"the validation set has {len(images)} readable images, {count} are needed")
