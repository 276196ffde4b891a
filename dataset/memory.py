"""Data sets held in memory as CIFAR's are (uint8 ``data`` ``[N, H, W, 3]`` + ``targets``), and the
resize that brings larger images (STL-10's 96x96, Tiny-ImageNet's 64x64) to 32x32 once, when loading.

The resize is PIL's bilinear resize with antialiasing, ``Image.resize((32, 32), BILINEAR)``: what
``transforms.Resize(32)`` does to a square PIL image, i.e. what the DCD transfer recipe applies per
image. Doing it once at load time gives the same pixels and lets the tensor pipeline serve the set.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

SIZE = 32  # the side of the images held in memory


class ArrayImages(Dataset):
    """Images (uint8 ``[N, H, W, 3]``, as CIFAR's ``data``) and labels; items ``(img, target)``
    with ``img`` a PIL image through ``transform``, exactly like torchvision's CIFAR sets (so
    :func:`dataset.tensor_loader.tensor_source` serves them). ``classes``: the class names."""

    def __init__(self, data: np.ndarray, targets: Sequence[int], transform: Callable | None = None,
                 classes: Sequence[str] = ()):
        self.data, self.targets, self.transform = data, list(targets), transform
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.data[index])
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


def resize_image(image: Image.Image, size: int = SIZE) -> np.ndarray:
    """``image`` (converted to RGB) resized to ``size`` x ``size`` with PIL's antialiased bilinear
    filter (``transforms.Resize(size)`` on a square image), as uint8 ``[size, size, 3]``."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def default_threads() -> int:
    """Threads for decoding and resizing: the cores this process may use, at most 8 (PIL releases
    the GIL while it decodes and resamples)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def resize_all(images: np.ndarray, size: int = SIZE, threads: int | None = None) -> np.ndarray:
    """uint8 ``[n, H, W, 3]`` -> uint8 ``[n, size, size, 3]``, each image through :func:`resize_image`."""
    return decode_all(images, size, lambda image: Image.fromarray(np.ascontiguousarray(image)), threads)


def decode_all(items: Sequence[Any], size: int, load: Callable[[Any], Image.Image],
               threads: int | None = None, block: int = 256) -> np.ndarray:
    """``load(item)`` for each item, resized by :func:`resize_image`: uint8 ``[len(items), size,
    size, 3]`` in the items' order. Blocks of ``block`` items go to a pool of ``threads`` threads
    (default :func:`default_threads`); exceptions of ``load`` propagate."""
    out = np.empty((len(items), size, size, 3), dtype=np.uint8)
    threads = threads or default_threads()

    def work(start: int) -> None:
        for position in range(start, min(start + block, len(items))):
            out[position] = resize_image(load(items[position]), size)

    starts = range(0, len(items), block)
    if threads == 1 or len(starts) == 1:
        for start in starts:
            work(start)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(work, starts):  # consumed so that an exception propagates
                pass
    return out
