"""The ``--distill`` registry and the Distiller contract every method implements.

A method is one file: its loss class(es) and a :class:`Distiller` subclass decorated with
``@register("name")``. The training loop only talks to this interface:

    distiller = build_distiller(opt.distill, opt, student, teacher, sample_images)
    s = NetOutput(*student(img, is_feat=True, preact=distiller.preact))
    t = NetOutput(*teacher(img, is_feat=True, preact=distiller.preact))   # no grad
    terms = distiller(s, t, Batch(img, target, index, contrast_idx))   # {name: loss}
    loss = gamma * CE + alpha * KL + beta * sum(terms.values())
"""
from __future__ import annotations

import abc
import argparse
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from helper.errors import UserError

# The packages whose modules register methods when imported.
METHOD_PACKAGES = ("distiller_zoo", "crd")


@dataclass
class NetOutput:
    """What a network returned for a batch: ``feats`` (see models/__init__.py) and ``logits`` [B, C]."""

    feats: list[torch.Tensor]
    logits: torch.Tensor


@dataclass
class Batch:
    """A training batch: images [B, 3, H, W], labels [B], and when the method asks for them the
    samples' positions in the training set [B] and contrastive indices [B, K+1]."""

    img: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor | None = None
    contrast_idx: torch.Tensor | None = None


class Distiller(nn.Module, abc.ABC):
    """Base class of the methods selectable with ``--distill``.

    A Distiller owns the method's extra modules (embeds, regressors, memory banks) and
    computes the method's loss terms (unweighted; the loop multiplies them by ``-b``).
    Subclasses set the class attributes that declare what they need and their published
    weights, and implement ``__init__(opt, feats_s, feats_t)`` and ``forward``.

    Class attributes:
        preact: take stage features before their last ReLU.
        needs_index / needs_contrast_idx: the data loader must supply ``index`` / ``contrast_idx``.
        weights: published ``(gamma, alpha, beta)`` for ``-r -a -b`` (used when left out).
        has_init_stage: the method pre-trains in an init stage of ``--init_epochs`` (see :meth:`init_loss`).
    """

    name: str = ""
    preact: bool = False
    needs_index: bool = False
    needs_contrast_idx: bool = False
    weights: tuple[float, float, float] = (1.0, 0.0, 1.0)
    has_init_stage: bool = False

    @abc.abstractmethod
    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """The method's loss terms for one batch (gradients flow into the student and this module)."""

    epoch: int = 1  # the current (1-based) training epoch, kept up to date by start_epoch

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the method's own command-line flags (named ``--<method>_<what>``) to ``parser``."""

    def start_epoch(self, epoch: int) -> None:
        """Called by the training loop before each epoch (e.g. for warm-up schedules)."""
        self.epoch = epoch

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Called once after construction with the two networks, for methods that read their
        weights (e.g. a classifier); keep them out of this module's submodules and state."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the main-stage optimiser updates (frozen parts excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def init_modules(self) -> list[nn.Module]:
        """Modules of this Distiller trained in the init stage (besides the student, if any)."""
        return []

    def init_trains_student(self) -> bool:
        """Whether the init stage also updates the student."""
        return False

    def init_learning_rate(self, opt) -> float:
        """Learning rate of the init stage (RepDistiller: ``--learning_rate``)."""
        return opt.learning_rate

    def init_loss(self, s: NetOutput, t: NetOutput, batch: Batch) -> torch.Tensor:
        """The init stage's loss (methods with ``has_init_stage`` override this)."""
        raise TypeError(f"--distill {self.name} has no init stage")

    def after_init_stage(self) -> None:
        """Called once the init stage is over (e.g. to freeze a pre-trained module)."""


_REGISTRY: dict[str, type[Distiller]] = {}


def register(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator: make a Distiller selectable as ``--distill name``."""

    def wrap(cls: type[Distiller]) -> type[Distiller]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"--distill {name} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_methods() -> None:
    for package in METHOD_PACKAGES:
        importlib.import_module(package)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Every registered method's own flags, in one argument group per method."""
    for name in method_names():
        _REGISTRY[name].add_arguments(parser.add_argument_group(f"--distill {name}"))


def method_names() -> list[str]:
    """Every ``--distill`` choice."""
    _load_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Distiller]:
    """The Distiller class of ``--distill name``; unknown names raise :class:`UserError`."""
    _load_methods()
    if name not in _REGISTRY:
        raise UserError(f"unknown --distill '{name}'; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


@torch.no_grad()
def probe_features(model: nn.Module, sample: torch.Tensor, preact: bool) -> list[torch.Tensor]:
    """Features of ``model`` for ``sample`` [2, 3, H, W] in eval mode (for sizing modules)."""
    was_training = model.training
    model.eval()
    feats, _ = model(sample, is_feat=True, preact=preact)
    model.train(was_training)
    return feats


def build_distiller(name: str, opt, student: nn.Module, teacher: nn.Module, sample: torch.Tensor) -> Distiller:
    """Build ``--distill name`` for this student/teacher pair; ``sample`` [2, 3, H, W] is an input
    of the data's size, used to read the feature shapes."""
    cls = get_method(name)
    feats_s = probe_features(student, sample, cls.preact)
    feats_t = probe_features(teacher, sample, cls.preact)
    distiller = cls(opt, feats_s, feats_t)
    distiller.bind(student, teacher)
    return distiller
