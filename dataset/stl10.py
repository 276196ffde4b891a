"""STL-10 in torchvision's layout, read by our own reader and held in memory at 32x32.

On disk: ``<data_folder>/stl10_binary/`` with ``train_X.bin``, ``train_y.bin`` (5,000 labelled
images), ``test_X.bin``, ``test_y.bin`` (8,000), ``unlabeled_X.bin`` (100,000) and
``class_names.txt`` (the unpacked ``stl10_binary.tar.gz``). An image file is raw uint8: per image
three 96x96 channel planes, each stored column by column (so a plane read row-major is the image
transposed); a label file is one uint8 per image, 1..10. Any files in that format are read (the
published MD5s are checked only right after ``--download``). Images are resized to 32x32 once,
when loading (:mod:`dataset.memory`), as the DCD transfer recipe resizes them, and the unlabeled
file is read in chunks so its 2.7 GB are never decoded at once.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.utils import download_and_extract_archive

from common.errors import UserError

from .cifar100 import DEFAULT_FOLDER, cifar_test_transform, cifar_train_transform, md5_of
from .memory import SIZE, ArrayImages, resize_all
from .registry import register_dataset
from .sampling import UNLABELED

if TYPE_CHECKING:
    from . import DataOptions

STL10_MEAN = (0.4467, 0.4398, 0.4066)
STL10_STD = (0.2603, 0.2566, 0.2712)
FOLDER = "stl10_binary"
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
NUM_CLASSES = 10
CHUNK = 4096  # images read and resized at a time
FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
         "unlabeled": ("unlabeled_X.bin", None)}


def read_stl10_images(path: str | Path, size: int = SIZE, chunk: int = CHUNK) -> np.ndarray:
    """The images of an STL-10 image file, resized to ``size`` x ``size``: uint8 ``[n, size, size, 3]``
    (``size`` 96 or None: as stored, not resized). Pixel ``(y, x)`` of channel ``c`` of image ``i``
    is byte ``i * 27648 + c * 9216 + x * 96 + y`` (column-major planes, as torchvision reads them).
    Reads ``chunk`` images at a time. A file whose size is not a positive multiple of 27,648 bytes
    raises a :class:`UserError` naming it."""
    path = Path(path)
    nbytes = _size_of(path)
    if nbytes == 0 or nbytes % IMAGE_BYTES:
        raise UserError(f"STL-10 image file {path} holds {nbytes} bytes, not a positive multiple of "
                        f"{IMAGE_BYTES} (3x{SIDE}x{SIDE} per image): it is truncated or not an STL-10 file; "
                        "delete the folder and run again with --download")
    count = nbytes // IMAGE_BYTES
    size = size or SIDE
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(count, 3, SIDE, SIDE))
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for start in range(0, count, chunk):
        block = np.asarray(raw[start:start + chunk]).transpose(0, 3, 2, 1)  # [n, c, x, y] -> [n, y, x, c]
        out[start:start + len(block)] = block if size == SIDE else resize_all(block, size)
    del raw
    return out


def read_stl10_labels(path: str | Path, count: int) -> np.ndarray:
    """The labels of an STL-10 label file, 0-based (int64 ``[count]``). A file that does not hold
    ``count`` labels in 1..10 raises a :class:`UserError` naming it."""
    path = Path(path)
    nbytes = _size_of(path)
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    problem = None
    if nbytes != count:
        problem = f"{nbytes} labels for {count} images"
    elif labels.size and not (labels.min() >= 1 and labels.max() <= NUM_CLASSES):
        problem = f"labels from {labels.min()} to {labels.max()}, not in 1..{NUM_CLASSES}"
    if problem:
        raise UserError(f"STL-10 label file {path} is not valid ({problem}): delete the folder and run "
                        "again with --download")
    return labels - 1


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as err:
        raise UserError(f"cannot read STL-10 file {path} ({type(err).__name__}: {err.strerror})") from None


class STL10Folder(ArrayImages):
    """One split of STL-10 (``train``, ``test`` or ``unlabeled``) at 32x32 in memory: ``data`` uint8
    ``[N, 32, 32, 3]``, ``targets`` (0..9; :data:`dataset.sampling.UNLABELED` for ``unlabeled``),
    ``classes`` (from ``class_names.txt``, else ``class0`` ..). Items ``(img, target)`` as CIFAR's."""

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None):
        folder = Path(root).expanduser() / FOLDER
        image_file, label_file = FILES[split]
        data = read_stl10_images(folder / image_file)
        if label_file is None:
            targets = np.full(len(data), UNLABELED, dtype=np.int64)
        else:
            targets = read_stl10_labels(folder / label_file, len(data))
        super().__init__(data, targets.tolist(), transform, class_names(folder))
        self.split = split


def class_names(folder: Path) -> list[str]:
    """The ten class names of ``folder/class_names.txt`` (``class0`` .. ``class9`` when the file is missing)."""
    path = folder / "class_names.txt"
    if not path.is_file():
        return [f"class{i}" for i in range(NUM_CLASSES)]
    names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if len(names) != NUM_CLASSES:
        raise UserError(f"STL-10 file {path} names {len(names)} classes, not {NUM_CLASSES}: delete the folder "
                        "and run again with --download")
    return names


def download_stl10(root: str | Path) -> None:
    """Fetch and unpack ``stl10_binary.tar.gz`` into ``root`` with torchvision (the archive's MD5
    checked) unless the files are there, then check each file against torchvision's published MD5."""
    root = Path(root).expanduser()
    folder = root / FOLDER
    published = datasets.STL10.train_list + datasets.STL10.test_list
    if all((folder / name).is_file() for name, _ in published):
        return
    try:
        download_and_extract_archive(datasets.STL10.url, str(root), filename=datasets.STL10.filename,
                                     md5=datasets.STL10.tgz_md5)
    except (OSError, RuntimeError, tarfile.TarError, EOFError, ValueError) as err:
        raise UserError(f"could not download STL-10 from {datasets.STL10.url} into {root} "
                        f"({type(err).__name__}: {err}): check the network connection, or unpack "
                        f"{datasets.STL10.filename} into that folder yourself") from err
    for name, md5 in published:
        found = md5_of(folder / name) if (folder / name).is_file() else "missing"
        if found != md5:
            raise UserError(f"the downloaded STL-10 file {folder / name} is not the published one (MD5 {found}, "
                            f"expected {md5}): delete {folder} and run again with --download")


@register_dataset("stl10", tensor=True, splits=("train", "unlabeled"))
def open_stl10(data: DataOptions) -> tuple[STL10Folder, STL10Folder, torch.Tensor, int]:
    """STL-10's training set (``train``, or ``unlabeled`` with ``data.split``; CIFAR training
    transform with STL-10's statistics) and test set (8,000 images), the training labels and 10."""
    root = Path(data.data_folder or DEFAULT_FOLDER).expanduser()
    if data.download:
        download_stl10(root)
    split = "unlabeled" if data.split == "unlabeled" else "train"
    needed = [name for part in (split, "test") for name in FILES[part] if name]
    missing = [name for name in needed if not (root / FOLDER / name).is_file()]
    if missing:
        raise UserError(f"STL-10 not found in {root} (no {FOLDER}/{missing[0]}): pass --download to fetch it, or "
                        f"--data_folder to point at a folder that holds {FOLDER}/ (with {', '.join(needed)})")
    train_set = STL10Folder(root, split, cifar_train_transform(STL10_MEAN, STL10_STD))
    test_set = STL10Folder(root, "test", cifar_test_transform(STL10_MEAN, STL10_STD))
    return train_set, test_set, torch.as_tensor(train_set.targets, dtype=torch.long), NUM_CLASSES
