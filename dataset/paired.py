"""A paired data set (``--dataset paired --data_folder DIR``): several modalities of the same
samples, e.g. RGB images and depth maps, for cross-modal distillation.

On disk: ``DIR/<folder>/<split>/<class>/<file>``, ``<split>`` one of ``train``, ``test`` and
``unlabeled`` (whose one class folder is ``unlabeled``). ``rgb/`` holds the RGB images (the views
``rgb``, ``gray``, ``L`` and ``ab`` are made from them); another folder, e.g. ``depth/``, is the view
``paired:depth``. Files with the same name (extension aside) in the same split and class folder
of two folders are the same sample; a file without its partner is an error naming it. Images are
read with PIL: 1-channel modes (L, I, I;16, 1) give one channel (16-bit images their high byte),
others are converted to RGB. All images must have the same size.

Only the folders the run's views need are read, and held in memory as one uint8 array
``[N, H, W, C]`` (the folders' channels side by side: rgb first, then the paired folders in the
order of the views), so the tensor pipeline crops and flips all views of a sample alike. The rgb
view is normalised with ImageNet's mean and std, the ``paired:`` ones with mean 0.5 and std 0.5
(``dataset/views.py``): fixed values, so that runs on different splits see the same inputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from common.errors import UserError

from .registry import register_dataset
from .skipping import DECODE_ERRORS, Unreadable, pixel_limit_errors
from .views import PAIRED, ToViews, ViewLayout, distinct

if TYPE_CHECKING:
    from . import DataOptions

RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
UNLABELED = "unlabeled"
ONE_CHANNEL = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N")


class PairedImages(Dataset):
    """Samples of several folders (uint8 ``data`` ``[N, H, W, C]``, ``targets``); item ``i`` is
    ``(transform(img), target)`` with ``img`` the uint8 tensor ``[C, H, W]``."""

    def __init__(self, data: np.ndarray, targets: list[int], transform: Any, files: list[str]):
        self.data, self.targets, self.transform, self.files = data, targets, transform, files

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = torch.from_numpy(self.data[index]).permute(2, 0, 1)
        return self.transform(img), self.targets[index]


def sources_of(views: Sequence[str]) -> list[str]:
    """The folders ``views`` are made from: ``rgb`` (first, when a view needs it), then the
    ``paired:`` folders in their order."""
    views = distinct(views)
    folders = ["rgb"] if any(not v.startswith(PAIRED) for v in views) else []
    return folders + [v[len(PAIRED):] for v in views if v.startswith(PAIRED)]


def _read(path: Path, folder: str) -> np.ndarray:
    """The image at ``path`` as uint8 ``[H, W, C]`` (C 3 for ``rgb``, else 1 or 3); an unreadable
    one (damaged, not an image, over PIL's pixel limit) is a :class:`UserError`."""
    try:
        with pixel_limit_errors(), Image.open(path) as img:
            if folder != "rgb" and img.mode in ONE_CHANNEL:
                if img.mode.startswith("I"):
                    arr = np.asarray(img).astype(np.int64)
                    return np.clip(arr >> 8 if arr.max() > 255 else arr, 0, 255).astype(np.uint8)[..., None]
                return np.asarray(img.convert("L"))[..., None]
            return np.asarray(img.convert("RGB"))
    except DECODE_ERRORS as err:
        raise UserError(f"--dataset paired: cannot read '{path}' ({Unreadable.from_error(str(path), err).reason}): "
                        "replace that file, or remove it and its partners in the other view folders") from None


def _samples(root: Path, folder: str, split: str) -> dict[tuple[str, str], Path]:
    """``(class, file name without extension) -> path`` of ``root/folder/split``."""
    base = root / folder / split
    if not base.is_dir():
        raise UserError(f"--dataset paired: '{base}' is not a folder: the layout is "
                        f"DIR/<view folder>/<split>/<class or unlabeled>/<file>")
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(base.glob("*/*")):
        if path.is_file() and not path.name.startswith("."):
            key = (path.parent.name, path.stem)
            if key in found:
                raise UserError(f"--dataset paired: '{found[key]}' and '{path}' are the same sample name twice")
            found[key] = path
    if not found:
        raise UserError(f"--dataset paired: '{base}' holds no images in <class>/ folders")
    return found


def read_split(root: Path, folders: list[str], split: str
               ) -> tuple[np.ndarray, list[tuple[str, str]], list[tuple[str, int]]]:
    """The images of ``split`` of every folder in ``folders``, channels side by side, as uint8
    ``[N, H, W, C]``, each sample's ``(class, name)``, sorted, and each folder's channels. Every
    view folder of ``root`` that has this split must hold the same samples (checked on the file
    names, read or not), so that all runs on a paired set see the same samples."""
    others = sorted(p.name for p in root.iterdir() if (p / split).is_dir() and p.name not in folders)
    checked = folders + others
    listed = {folder: _samples(root, folder, split) for folder in checked}
    anchor = "rgb" if "rgb" in listed else folders[0]
    keys = sorted(listed[anchor])
    for folder in [f for f in checked if f != anchor]:
        missing = [k for k in keys if k not in listed[folder]]
        if missing:
            cls, name = missing[0]
            raise UserError(f"--dataset paired: '{root / folder / split / cls / name}.*' is missing: the partner of "
                            f"'{listed[anchor][missing[0]]}' (a file of the same name in every view folder)")
        extra = sorted(set(listed[folder]) - set(keys))
        if extra:
            raise UserError(f"--dataset paired: '{listed[folder][extra[0]]}' has no partner in "
                            f"'{root / anchor / split / extra[0][0]}/'")
    rows, size, channels = [], None, {}
    for key in keys:
        parts = []
        for folder in folders:
            path = listed[folder][key]
            img = _read(path, folder)
            if size is None:
                size = img.shape[:2]
            if img.shape[:2] != size:
                raise UserError(f"--dataset paired: '{path}' is {img.shape[1]}x{img.shape[0]} pixels, the others "
                                f"{size[1]}x{size[0]}: the images of a paired set must have one size")
            if channels.setdefault(folder, img.shape[2]) != img.shape[2]:
                raise UserError(f"--dataset paired: '{path}' has {img.shape[2]} channels, the other images of "
                                f"'{folder}/' {channels[folder]}")
            parts.append(img)
        rows.append(np.concatenate(parts, axis=2))
    return np.stack(rows), keys, [(folder, channels[folder]) for folder in folders]


@register_dataset("paired", tensor=True, views=True, splits=("train", "unlabeled"))
def open_paired(data: DataOptions, views: Sequence[str] = ("rgb",)
                ) -> tuple[PairedImages, PairedImages, torch.Tensor, int]:
    """The paired set at ``data.data_folder`` for ``views``: the training split (``data.split``:
    ``train``, or ``unlabeled`` with labels -1) and ``test``, both with the layout's views as
    their transform's output, the training labels and the number of classes (``train``'s class
    folders)."""
    if not data.data_folder:
        raise UserError("--dataset paired needs --data_folder DIR, laid out as "
                        "DIR/<view folder>/<split>/<class>/<file>")
    root = Path(data.data_folder)
    if not root.is_dir():
        raise UserError(f"--dataset paired: --data_folder '{root}' is not a folder")
    folders = sources_of(views)
    classes = sorted({cls for cls, _ in _samples(root, folders[0], "train")})
    index = {cls: i for i, cls in enumerate(classes)}
    sets = []
    for split in (data.split, "test"):
        images, keys, sources = read_split(root, folders, split)
        if split == UNLABELED:
            targets = [-1] * len(keys)
        else:
            unknown = [cls for cls, _ in keys if cls not in index]
            if unknown:
                raise UserError(f"--dataset paired: class '{unknown[0]}' of '{root / folders[0] / split}' "
                                f"is not a class of its train split")
            targets = [index[cls] for cls, _ in keys]
        sets.append((images, targets, [f"{cls}/{name}" for cls, name in keys], sources))
    layout = ViewLayout(distinct(views), tuple(sets[0][3]))
    height, width = sets[0][0].shape[1:3]
    if sets[1][0].shape[1:] != sets[0][0].shape[1:]:
        raise UserError(f"--dataset paired: the test images ({sets[1][0].shape[2]}x{sets[1][0].shape[1]}, "
                        f"{sets[1][0].shape[3]} channels) and the training images ({width}x{height}, "
                        f"{sets[0][0].shape[3]} channels) must have one size and the same channels")
    to_views = ToViews(layout, RGB_MEAN, RGB_STD)
    to_float = transforms.ConvertImageDtype(torch.float32)
    train_transform = transforms.Compose([transforms.RandomCrop((height, width), padding=max(1, height // 8)),
                                          transforms.RandomHorizontalFlip(), to_float, to_views])
    train = PairedImages(*sets[0][:2], train_transform, sets[0][2])
    test = PairedImages(*sets[1][:2], transforms.Compose([to_float, to_views]), sets[1][2])
    return train, test, torch.as_tensor(train.targets, dtype=torch.long), len(classes)
