"""Tiny-ImageNet read from the folder as distributed, held in memory at 32x32.

On disk: ``<data_folder>/tiny-imagenet-200/`` (the unpacked ``tiny-imagenet-200.zip``) with
``wnids.txt`` (one class id per line), ``train/<wnid>/images/*.JPEG`` and the flat validation
folder ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (tab-separated: file name,
wnid, four box numbers). No restructuring step: the validation labels are read from the
annotations. Classes are indexed in sorted-wnid order and samples ordered by class, then file
name: what torchvision's ImageFolder gives on the restructured copy the DCD code reads.
The 64x64 JPEGs are decoded in a thread pool and resized to 32x32 once (:mod:`dataset.memory`).
Everything is checked while loading, so an unreadable JPEG, a class folder not in ``wnids.txt``
or a validation image without annotation is one :class:`UserError` naming the file (the images
are all decoded up front, so there is no batch to skip an unreadable one from).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image

from common.errors import UserError

from .cifar100 import DEFAULT_FOLDER, cifar_test_transform, cifar_train_transform
from .memory import SIZE, ArrayImages, decode_all
from .registry import register_dataset
from .skipping import DECODE_ERRORS, pixel_limit_errors

if TYPE_CHECKING:
    from . import DataOptions

TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2770, 0.2691, 0.2821)
FOLDER = "tiny-imagenet-200"
LAYOUT = (f"{FOLDER}/wnids.txt, {FOLDER}/train/<wnid>/images/*.JPEG, {FOLDER}/val/images/*.JPEG and "
          f"{FOLDER}/val/val_annotations.txt")
EXTENSIONS = (".jpeg", ".jpg", ".png")


def _fail(problem: str) -> UserError:
    return UserError(f"Tiny-ImageNet {problem}: the folder must be as distributed ({LAYOUT}); unpack "
                     "tiny-imagenet-200.zip again")


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file()),
                  key=lambda p: p.name)


def read_wnids(folder: Path) -> list[str]:
    """The class ids of ``folder/wnids.txt``, sorted (class ``i`` is the ``i``-th)."""
    path = folder / "wnids.txt"
    if not path.is_file():
        raise _fail(f"file {path} not found")
    wnids = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise _fail(f"file {path} is empty or repeats a class id")
    return sorted(wnids)


def train_samples(folder: Path, wnids: list[str]) -> list[tuple[Path, int]]:
    """``(file, class)`` of ``folder/train/<wnid>/images/*``, by class then file name."""
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train = folder / "train"
    if not train.is_dir():
        raise _fail(f"folder {train} not found")
    for sub in sorted(p for p in train.iterdir() if p.is_dir()):
        if sub.name not in index:
            raise _fail(f"class folder {sub} is not in {folder / 'wnids.txt'}")
    samples = []
    for wnid in wnids:
        images = train / wnid / "images"
        files = _images_in(images) if images.is_dir() else []
        if not files:
            raise _fail(f"class {wnid} has no images in {images}")
        samples += [(path, index[wnid]) for path in files]
    return samples


def val_samples(folder: Path, wnids: list[str]) -> list[tuple[Path, int]]:
    """``(file, class)`` of ``folder/val/images/*`` labelled by ``val/val_annotations.txt``, by class
    then file name (ImageFolder's order on the restructured copy)."""
    index = {wnid: i for i, wnid in enumerate(wnids)}
    notes, images = folder / "val" / "val_annotations.txt", folder / "val" / "images"
    if not notes.is_file() or not images.is_dir():
        raise _fail(f"{notes if not notes.is_file() else images} not found")
    labels = {}
    for number, line in enumerate(notes.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in index:
            raise _fail(f"line {number} of {notes} does not name an image and a class of wnids.txt: {line[:80]!r}")
        labels[fields[0].strip()] = index[fields[1].strip()]
    files = _images_in(images)
    if not files:
        raise _fail(f"has no images in {images}")
    for path in files:
        if path.name not in labels:
            raise _fail(f"validation image {path} has no line in {notes}")
    return sorted(((path, labels[path.name]) for path in files), key=lambda s: (s[1], s[0].name))


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except DECODE_ERRORS as err:
        raise UserError(f"Tiny-ImageNet image {path} cannot be read ({type(err).__name__}: {err}): the file is "
                        "damaged; unpack tiny-imagenet-200.zip again (or remove that file)") from None


class TinyImageNetFolder(ArrayImages):
    """One split of Tiny-ImageNet (``train`` or ``val``) at 32x32 in memory: ``data`` uint8
    ``[N, 32, 32, 3]``, ``targets`` (sorted-wnid order), ``classes`` (the wnids), ``files``."""

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 threads: int | None = None):
        folder = Path(root).expanduser() / FOLDER
        if not folder.is_dir():
            raise UserError(f"Tiny-ImageNet not found in {Path(root).expanduser()}: --data_folder must point at "
                            f"the folder that holds {FOLDER}/ (unpacked tiny-imagenet-200.zip; there is no "
                            "--download for it)")
        wnids = read_wnids(folder)
        samples = train_samples(folder, wnids) if split == "train" else val_samples(folder, wnids)
        with pixel_limit_errors():  # here, not in _open: decode_all's threads share the filters
            data = decode_all([path for path, _ in samples], SIZE, _open, threads)
        super().__init__(data, [label for _, label in samples], transform, wnids)
        self.files = [path for path, _ in samples]
        self.split = split


@register_dataset("tinyimagenet", tensor=True)
def open_tinyimagenet(data: DataOptions) -> tuple[TinyImageNetFolder, TinyImageNetFolder, torch.Tensor, int]:
    """Tiny-ImageNet's training set (CIFAR training transform with its statistics) and
    validation set (the test set of the transfer recipe), the training labels and 200 (the
    number of wnids)."""
    root = Path(data.data_folder or DEFAULT_FOLDER).expanduser()
    if data.download:
        raise UserError("Tiny-ImageNet cannot be downloaded automatically: get tiny-imagenet-200.zip "
                        f"(cs231n.stanford.edu) and unpack it into {root}")
    train_set = TinyImageNetFolder(root, "train", cifar_train_transform(TINY_MEAN, TINY_STD))
    val_set = TinyImageNetFolder(root, "val", cifar_test_transform(TINY_MEAN, TINY_STD))
    return train_set, val_set, torch.as_tensor(np.asarray(train_set.targets), dtype=torch.long), len(train_set.classes)
