"""The ``--dataset`` registry: each data set registers itself in its own file.

A data set is an opener, a function of the data options (and, when it reads only what the run's
views need, of those views) returning ``(train_set, val_set, train_labels, num_classes)``,
decorated with :func:`register_dataset`::

    @register_dataset("cifar10", tensor=True)
    def open_cifar10(data: DataOptions) -> tuple[...]: ...

``--dataset`` lists the sets in the order they registered (the order :mod:`dataset` imports
their files). A set's option group (a dataclass of :func:`common.declare.option` fields) becomes
a base of :class:`dataset.DataOptions`, so its flags exist once its file is imported by
:mod:`dataset`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from common.errors import UserError

from .options import SPLITS

Opener = Callable[..., tuple]


@dataclass(frozen=True)
class DataSet:
    """A ``--dataset`` choice: its name, its opener, whether ``--loader tensor`` serves it (it is
    held in memory as uint8 arrays; else torchvision's loader reads it), whether its opener takes
    the run's views as a second argument, its training splits (``--split``) and its option group."""

    name: str
    opener: Opener
    tensor: bool = False
    views: bool = False
    splits: tuple[str, ...] = ("train",)
    options: type | None = None

    def open(self, data, views: Sequence[str]) -> tuple:
        """``(train_set, val_set, train_labels, num_classes)`` of this set for ``data`` and ``views``."""
        return self.opener(data, views) if self.views else self.opener(data)


_REGISTRY: dict[str, DataSet] = {}


def register_dataset(name: str, *, tensor: bool = False, views: bool = False, splits: Sequence[str] = ("train",),
                     options: type | None = None) -> Callable[[Opener], Opener]:
    """Decorator: make the opener it decorates selectable as ``--dataset name`` (see :class:`DataSet`
    for the other facts). Registering a name twice with another opener is a programming error."""
    unknown = sorted(set(splits) - set(SPLITS))
    if "train" not in splits or unknown:
        raise ValueError(f"--dataset {name}: splits must hold 'train' and be among {', '.join(SPLITS)}, got {splits}")

    def wrap(opener: Opener) -> Opener:
        if name in _REGISTRY and _REGISTRY[name].opener is not opener:
            raise ValueError(f"--dataset {name} is registered twice ({_REGISTRY[name].opener.__name__}, "
                             f"{opener.__name__})")
        _REGISTRY[name] = DataSet(name, opener, tensor, views, tuple(splits), options)
        return opener

    return wrap


def unregister_dataset(name: str) -> None:
    """Remove ``--dataset name`` (for tests that register a set of their own)."""
    del _REGISTRY[name]


def dataset_names() -> tuple[str, ...]:
    """Every registered ``--dataset`` choice, in the order they registered."""
    return tuple(_REGISTRY)


def get_dataset(name: str) -> DataSet:
    """The registered set ``name``; an unknown name raises :class:`UserError` listing the choices."""
    if name not in _REGISTRY:
        raise UserError(f"unknown data set {name!r}: choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def tensor_sets() -> tuple[str, ...]:
    """The registered sets that ``--loader tensor`` serves."""
    return tuple(name for name, spec in _REGISTRY.items() if spec.tensor)


def sets_with_split(split: str) -> tuple[str, ...]:
    """The registered sets that have the training split ``split`` (``--split``)."""
    return tuple(name for name, spec in _REGISTRY.items() if split in spec.splits)


def option_groups() -> list[type]:
    """The option groups of the registered sets, each once, in the order the sets registered."""
    groups: list[type] = []
    for spec in _REGISTRY.values():
        if spec.options is not None and spec.options not in groups:
            groups.append(spec.options)
    return groups
