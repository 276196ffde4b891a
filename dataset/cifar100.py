"""CIFAR-100 and CIFAR-10 through torchvision, with clear errors, plus RepDistiller's names for its loaders.

On disk: ``<data_folder>/cifar-100-python/{train,test,meta}`` (torchvision's format, the
unpacked ``cifar-100-python.tar.gz``), and for CIFAR-10 ``<data_folder>/cifar-10-batches-py/``
(``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``). The files are pickles:
each is checked against torchvision's published MD5 before it is read, and read by an unpickler
that builds numpy arrays and plain containers only, so a modified file can never run code.
``allow_modified`` (``--allow_modified_data``) reads files whose MD5 differs (a copy of one's own making).
"""
from __future__ import annotations

import hashlib
import pickle
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from common.errors import UserError

from .loaders import make_bundle
from .needs import ContrastNeed, DataNeeds
from .registry import register_dataset
from .sampling import ContrastSampler

if TYPE_CHECKING:
    from . import DataOptions

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DEFAULT_FOLDER = "./data"
NUM_CLASSES = 100


def cifar_train_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> transforms.Compose:
    """The CIFAR training transform for 32x32 images: random crop (pad 4), horizontal flip,
    normalise with ``mean`` and ``std`` (the form :func:`dataset.tensor_loader.tensor_source` serves)."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def cifar_test_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> transforms.Compose:
    """The CIFAR test transform: to tensor and normalise with ``mean`` and ``std``."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def cifar100_train_transform() -> transforms.Compose:
    """RepDistiller's training transform: random crop (pad 4), horizontal flip, normalise."""
    return cifar_train_transform(CIFAR100_MEAN, CIFAR100_STD)


def cifar100_test_transform() -> transforms.Compose:
    """RepDistiller's test transform: to tensor and normalise."""
    return cifar_test_transform(CIFAR100_MEAN, CIFAR100_STD)


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers, strings, numbers and numpy arrays, and refuses every other
    global (so a pickle cannot call anything else: no code can run)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a data file never needs")
        return super().find_class(module, name)


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CIFARFolder(datasets.CIFAR10):
    """A torchvision CIFAR set, read safely and explaining what is wrong instead of raising a traceback.

    The torchvision class it derives from gives the layout (``base_folder``, ``train_list``,
    ``test_list``, ``meta``, the download ``url``); ``title``, ``num_classes`` and ``contents``
    (the files, for messages) are this class's. Labels are read from ``fine_labels`` (CIFAR-100)
    or ``labels`` (CIFAR-10). Each file is checked against its published MD5 before it is read
    (``allow_modified`` skips that check) and read with :class:`ArrayUnpickler`. A missing
    folder, a failed download, a modified file and a corrupt file each raise one
    :class:`UserError`. Items are ``(img, target)``.
    """

    title = "CIFAR-10"
    num_classes = 10
    contents = "data_batch_1 .. data_batch_5, test_batch and batches.meta"

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None,
                 target_transform: Callable | None = None, download: bool = False,
                 allow_modified: bool = False):
        root = Path(root).expanduser()
        datasets.VisionDataset.__init__(self, str(root), transform=transform, target_transform=target_transform)
        self.train, self.allow_modified = train, allow_modified
        folder = root / self.base_folder
        if download:
            self.download()
        if not self._files_present(root):
            raise UserError(
                f"{self.title} not found in {root}: pass --download to fetch it, or --data_folder to "
                f"point at a folder that holds {self.base_folder}/ (with {self.contents})")
        files = self.train_list if train else self.test_list
        data, targets = [], []
        for name, md5 in files:
            entry = self._read(folder / name, md5)
            try:
                data.append(np.asarray(entry["data"]))
                targets.extend(entry["fine_labels"] if "fine_labels" in entry else entry["labels"])
            except (KeyError, TypeError) as err:
                raise self._corrupt(folder, err) from None
        try:
            self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        except ValueError as err:
            raise self._corrupt(folder, err) from None
        self.targets = targets
        self._load_meta()
        self._check_format(folder)

    def _read(self, path: Path, md5: str) -> Any:
        if not self.allow_modified:
            found = md5_of(path)
            if found != md5:
                raise UserError(f"{self.title} file {path} is not the published one (MD5 {found}, expected {md5}): "
                                f"delete {path.parent} and run again with --download, or pass "
                                "--allow_modified_data if you modified it on purpose")
        try:
            with open(path, "rb") as f:
                return ArrayUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                UnicodeDecodeError, OSError, MemoryError) as err:
            raise self._corrupt(path.parent, err) from None

    def _corrupt(self, folder: Path, err: Exception) -> UserError:
        return UserError(f"{self.title} files in {folder} are corrupt or not in torchvision's format "
                         f"({type(err).__name__}: {err}): delete that folder and run again with --download")

    def _files_present(self, root: Path) -> bool:
        names = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all((root / self.base_folder / name).is_file() for name in names)

    def _check_integrity(self) -> bool:
        # presence only: the files are checked one by one when read (see _read)
        return self._files_present(Path(self.root))

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        meta = self._read(path, self.meta["md5"])
        try:
            self.classes = list(meta[self.meta["key"]])
        except (KeyError, TypeError) as err:
            raise self._corrupt(path.parent, err) from None
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def _check_format(self, folder: Path) -> None:
        problem = None
        labels = np.asarray(self.targets)
        if self.data.dtype != np.uint8 or self.data.shape[1:] != (32, 32, 3):
            problem = f"images of dtype {self.data.dtype} and shape {self.data.shape[1:]}"
        elif labels.shape != (len(self.data),) or labels.dtype.kind not in "iu":
            problem = f"{len(self.data)} images but labels of shape {labels.shape} and dtype {labels.dtype}"
        elif len(self.classes) != self.num_classes:
            problem = f"{len(self.classes)} class names instead of {self.num_classes}"
        elif labels.size and not (labels.min() >= 0 and labels.max() < self.num_classes):
            problem = f"labels outside 0..{self.num_classes - 1}"
        if problem:
            raise UserError(f"{self.title} files in {folder} are not valid ({problem}): "
                            "delete that folder and run again with --download")

    def download(self) -> None:
        """Fetch and unpack the archive with torchvision (md5-checked) unless the files exist."""
        if self._check_integrity():
            return
        try:
            super().download()
        except (OSError, RuntimeError, tarfile.TarError, EOFError, ValueError) as err:
            raise UserError(
                f"could not download {self.title} from {self.url} into {self.root} "
                f"({type(err).__name__}: {err}): check the network connection, or unpack "
                f"{self.filename} into that folder yourself") from err


class CIFAR10Folder(CIFARFolder):
    """torchvision's CIFAR10 (``cifar-10-batches-py/``), read as :class:`CIFARFolder` reads."""


class CIFAR100Folder(CIFARFolder, datasets.CIFAR100):
    """torchvision's CIFAR100 (``cifar-100-python/``), read as :class:`CIFARFolder` reads."""

    title = "CIFAR-100"
    num_classes = NUM_CLASSES
    contents = "train, test and meta"


class CIFAR100Instance(CIFAR100Folder):
    """RepDistiller's CIFAR100Instance: items are ``(img, target, index)``."""

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        img, target = super().__getitem__(index)
        return img, target, index


class CIFAR100InstanceSample(CIFAR100Folder):
    """RepDistiller's CIFAR100InstanceSample: items are ``(img, target, index, sample_idx)``, with
    ``sample_idx`` LongTensor ``[k+1]`` (the positive, then k negatives of other classes, drawn
    by :class:`ContrastSampler` without replacement), or ``(img, target, index)`` when not
    ``is_sample``. ``percent`` < 1 restricts each class's negatives to a fixed random share.
    """

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None,
                 target_transform: Callable | None = None, download: bool = False,
                 k: int = 4096, mode: str = "exact", is_sample: bool = True, percent: float = 1.0,
                 allow_modified: bool = False):
        super().__init__(root, train=train, transform=transform, target_transform=target_transform,
                         download=download, allow_modified=allow_modified)
        self.k, self.mode, self.is_sample = k, mode, is_sample
        self.sampler = ContrastSampler(torch.as_tensor(self.targets), k, mode, percent) if is_sample else None

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        img, target = super().__getitem__(index)
        if self.sampler is None:
            return img, target, index
        return img, target, index, self.sampler(torch.tensor([index]))[0]


@register_dataset("cifar100", tensor=True)
def open_cifar100(data: DataOptions) -> tuple[CIFAR100Folder, CIFAR100Folder, torch.Tensor, int]:
    """The training and test sets (reference transforms), the training labels and 100."""
    root = data.data_folder or DEFAULT_FOLDER
    download, modified = data.download, data.allow_modified_data
    train_set = CIFAR100Folder(root, train=True, transform=cifar100_train_transform(), download=download,
                               allow_modified=modified)
    test_set = CIFAR100Folder(root, train=False, transform=cifar100_test_transform(), allow_modified=modified)
    return train_set, test_set, torch.as_tensor(train_set.targets, dtype=torch.long), NUM_CLASSES


@register_dataset("cifar10", tensor=True)
def open_cifar10(data: DataOptions) -> tuple[CIFAR10Folder, CIFAR10Folder, torch.Tensor, int]:
    """CIFAR-10's training and test sets (CIFAR transforms with CIFAR-10's statistics), the
    training labels and 10."""
    root = data.data_folder or DEFAULT_FOLDER
    download, modified = data.download, data.allow_modified_data
    train_set = CIFAR10Folder(root, train=True, transform=cifar_train_transform(CIFAR10_MEAN, CIFAR10_STD),
                              download=download, allow_modified=modified)
    test_set = CIFAR10Folder(root, train=False, transform=cifar_test_transform(CIFAR10_MEAN, CIFAR10_STD),
                             allow_modified=modified)
    return train_set, test_set, torch.as_tensor(train_set.targets, dtype=torch.long), CIFAR10Folder.num_classes


def _compat_bundle(batch_size: int, num_workers: int, data_folder: str, download: bool, allow_modified: bool,
                   needs: DataNeeds, **extra: Any):
    from . import DataOptions  # made once every data set has registered (after this file)

    data = DataOptions(dataset="cifar100", data_folder=data_folder, download=download,
                       allow_modified_data=allow_modified, loader="torchvision", batch_size=batch_size,
                       num_workers=num_workers)
    train_set, test_set, labels, num_classes = open_cifar100(data)
    # RepDistiller's test loader: half the batch size and half the workers
    return make_bundle(train_set, test_set, labels, num_classes, data, needs,
                       val_batch_size=max(1, batch_size // 2), val_workers=num_workers // 2, **extra)


def get_cifar100_dataloaders(batch_size: int = 128, num_workers: int = 8, is_instance: bool = False,
                             *, data_folder: str = DEFAULT_FOLDER, download: bool = True,
                             allow_modified: bool = False
                             ) -> tuple[DataLoader, DataLoader] | tuple[DataLoader, DataLoader, int]:
    """RepDistiller's loader function: ``(train_loader, test_loader)``, or with ``is_instance``
    ``(train_loader, test_loader, n_data)`` and training batches ``(img, target, index)``."""
    bundle = _compat_bundle(batch_size, num_workers, data_folder, download, allow_modified,
                            DataNeeds(index=is_instance))
    if is_instance:
        return bundle.train_loader, bundle.val_loader, bundle.n_data
    return bundle.train_loader, bundle.val_loader


def get_cifar100_dataloaders_sample(batch_size: int = 128, num_workers: int = 8, k: int = 4096,
                                    mode: str = "exact", is_sample: bool = True, percent: float = 1.0,
                                    *, data_folder: str = DEFAULT_FOLDER, download: bool = True,
                                    allow_modified: bool = False) -> tuple[DataLoader, DataLoader, int]:
    """RepDistiller's CRD loader function: ``(train_loader, test_loader, n_data)`` with training
    batches ``(img, target, index, contrast_idx)`` (``(img, target, index)`` if not ``is_sample``)."""
    needs = DataNeeds(index=True, contrast=ContrastNeed(k, mode) if is_sample else None)
    bundle = _compat_bundle(batch_size, num_workers, data_folder, download, allow_modified, needs,
                            negative_fraction=percent)
    return bundle.train_loader, bundle.val_loader, bundle.n_data
