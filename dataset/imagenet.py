"""ImageNet (or any data set) as image folders: ``<data_folder>/train/<class>/*.JPEG`` and
``<data_folder>/val/<class>/*``, read by torchvision's ImageFolder, plus RepDistiller's names."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from common.errors import UserError

from .loaders import make_bundle
from .needs import ContrastNeed, DataNeeds
from .registry import register_dataset
from .sampling import ContrastSampler
from .skipping import DECODE_ERRORS, Unreadable, pixel_limit_errors

if TYPE_CHECKING:
    from . import DataOptions

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_FOLDER = "./data/imagenet"
LAYOUT = "<data_folder>/train/<class>/*.JPEG and <data_folder>/val/<class>/*.JPEG"


def imagenet_train_transform() -> transforms.Compose:
    """Random-resized crop to 224, horizontal flip, normalise with the ImageNet statistics."""
    return transforms.Compose([
        transforms.RandomResizedCrop(224),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def imagenet_val_transform() -> transforms.Compose:
    """Resize to 256, centre crop 224, normalise with the ImageNet statistics."""
    return transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def open_image_folder(folder: str | Path, transform: Callable | None = None,
                      cls: type[datasets.ImageFolder] = datasets.ImageFolder, **kwargs: Any
                      ) -> datasets.ImageFolder:
    """``cls(folder, transform)``, or a :class:`UserError` naming the expected layout when the
    folder is missing or holds no class folders with images."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found: ImageNet is read from {LAYOUT} "
                        "(set --data_folder to the folder that holds train/ and val/)")
    try:
        return cls(str(folder), transform=transform, **kwargs)
    except FileNotFoundError as err:
        raise UserError(f"no images in {folder} ({err}): ImageNet is read from {LAYOUT}, one "
                        "sub-folder of images per class in both train/ and val/") from err


class SafeImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder whose items are :class:`~dataset.skipping.Unreadable` for files
    that cannot be decoded (truncated, empty, not images, over PIL's pixel limit) instead of an
    exception (which would end the run from inside a DataLoader worker); the loaders of :func:`dataset.loaders.make_bundle`
    leave them out of the batches and count them."""

    def __getitem__(self, index: int) -> tuple[Any, Any] | Unreadable:
        path, target = self.samples[index]
        try:
            with pixel_limit_errors():
                sample = self.loader(path)
        except DECODE_ERRORS as err:
            return Unreadable.from_error(path, err)
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


class ImageFolderInstance(datasets.ImageFolder):
    """RepDistiller's ImageFolderInstance: items are ``(img, target, index)``."""

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        img, target = super().__getitem__(index)
        return img, target, index


class ImageFolderSample(datasets.ImageFolder):
    """RepDistiller's ImageFolderSample: items ``(img, target, index, sample_idx)`` with
    ``is_sample`` (``sample_idx``: the sample itself, then k negatives of other classes drawn
    without replacement), else ``(img, target, index)``."""

    def __init__(self, root: str, transform: Callable | None = None,
                 target_transform: Callable | None = None, is_sample: bool = False, k: int = 4096):
        super().__init__(root=root, transform=transform, target_transform=target_transform)
        self.k, self.is_sample = k, is_sample
        self.sampler = ContrastSampler(torch.as_tensor(self.targets), k, "exact") if is_sample else None

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        img, target = super().__getitem__(index)
        if self.sampler is None:
            return img, target, index
        return img, target, index, self.sampler(torch.tensor([index]))[0]


@register_dataset("imagenet")
def open_imagenet(data: DataOptions) -> tuple[datasets.ImageFolder, datasets.ImageFolder, torch.Tensor, int]:
    """The training and validation folders (standard transforms; unreadable files become
    :class:`~dataset.skipping.Unreadable` items, see :class:`SafeImageFolder`), the training
    labels and the number of classes (that of train/, which val/ must match)."""
    root = Path(data.data_folder or DEFAULT_FOLDER).expanduser()
    if data.download:
        raise UserError("ImageNet cannot be downloaded automatically: get it from image-net.org "
                        f"and arrange it as {LAYOUT}")
    train_set = open_image_folder(root / "train", imagenet_train_transform(), SafeImageFolder)
    val_set = open_image_folder(root / "val", imagenet_val_transform(), SafeImageFolder)
    if val_set.classes != train_set.classes:
        raise UserError(f"{root}/val has {len(val_set.classes)} class folders and {root}/train has "
                        f"{len(train_set.classes)}, or their names differ: both need the same class "
                        "sub-folders (sort the flat validation images into class folders)")
    return train_set, val_set, torch.as_tensor(train_set.targets, dtype=torch.long), len(train_set.classes)


def _compat_options(batch_size: int, num_workers: int, data_folder: str) -> DataOptions:
    from . import DataOptions  # made once every data set has registered (after this file)

    return DataOptions(dataset="imagenet", data_folder=data_folder, batch_size=batch_size, num_workers=num_workers)


def get_imagenet_dataloader(dataset: str = "imagenet", batch_size: int = 128, num_workers: int = 16,
                            is_instance: bool = False, *, data_folder: str = DEFAULT_FOLDER
                            ) -> tuple[DataLoader, DataLoader] | tuple[DataLoader, DataLoader, int]:
    """RepDistiller's loader function: ``(train_loader, test_loader)``, or with ``is_instance``
    ``(train_loader, test_loader, n_data)`` and training batches ``(img, target, index)``."""
    _check_name(dataset)
    data = _compat_options(batch_size, num_workers, data_folder)
    bundle = make_bundle(*open_imagenet(data), data, DataNeeds(index=is_instance), val_workers=num_workers // 2)
    if is_instance:
        return bundle.train_loader, bundle.val_loader, bundle.n_data
    return bundle.train_loader, bundle.val_loader


def get_dataloader_sample(dataset: str = "imagenet", batch_size: int = 128, num_workers: int = 8,
                          is_sample: bool = False, k: int = 4096, *, data_folder: str = DEFAULT_FOLDER
                          ) -> tuple[DataLoader, DataLoader, int, int]:
    """RepDistiller's CRD loader function: ``(train_loader, test_loader, n_data, num_classes)``,
    training batches ``(img, target, index[, contrast_idx])``."""
    _check_name(dataset)
    data = _compat_options(batch_size, num_workers, data_folder)
    needs = DataNeeds(index=True, contrast=ContrastNeed(k) if is_sample else None)
    bundle = make_bundle(*open_imagenet(data), data, needs)
    return bundle.train_loader, bundle.val_loader, bundle.n_data, bundle.num_classes


def get_test_loader(dataset: str = "imagenet", batch_size: int = 128, num_workers: int = 8,
                    *, data_folder: str = DEFAULT_FOLDER) -> DataLoader:
    """RepDistiller's validation loader function."""
    _check_name(dataset)
    val_set = open_image_folder(Path(data_folder) / "val", imagenet_val_transform())
    return DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())


def _check_name(dataset: str) -> None:
    if dataset != "imagenet":
        raise UserError(f"data set {dataset!r} is not served by the ImageNet loaders: use 'imagenet'")
