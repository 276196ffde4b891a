"""The ``--distill`` registry and the Distiller contract every method implements.

A method is one file: its options (a dataclass of :func:`common.declare.option` fields, from
which its flags are made), its loss class(es) and a :class:`Distiller` subclass decorated with
``@register("name")``. The training loop only talks to this interface:

    ctx = BuildContext.probe(student, teacher, sample_images, preact=cls.preacts(), n_data=..., labels=...)
    distiller = cls(options, ctx)                                        # or build_distiller(...)
    loader = ...batches as cls.data_needs(options) says...
    preact_s, preact_t = distiller.preacts()
    s = NetOutput(*student(img, is_feat=True, preact=preact_s))
    t = NetOutput(*teacher(img, is_feat=True, preact=preact_t))   # no grad
    terms = distiller(s, t, Batch(img, target, index, contrast_idx))   # {name: loss}
    loss = gamma * CE + alpha * KL + beta * sum(terms.values())

This module knows the methods that were imported; the complete list (this package's and
``crd``'s) is :mod:`engine.methods`.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from common.declare import option_groups
from common.errors import UserError
from dataset.needs import DataNeeds


@dataclass
class NetOutput:
    """What a network returned for a batch: ``feats`` (see models/__init__.py) and ``logits`` [B, C].
    ``head``: for the student of a method with an inference head, what the head computed
    (a :class:`distiller_zoo.heads.HeadOutput`; ``logits`` are then its logits), set by the step so
    that the method's loss reuses it instead of running the head twice; None otherwise."""

    feats: list[torch.Tensor]
    logits: torch.Tensor
    head: Any = None


@dataclass
class Batch:
    """A training batch: images [B, C, H, W], labels [B], and when the method asks for them the
    samples' positions in the training set [B] and contrastive indices [B, K+1]."""

    img: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor | None = None
    contrast_idx: torch.Tensor | None = None


@dataclass
class NoOptions:
    """A method without options of its own."""


@dataclass(frozen=True)
class BuildContext:
    """What a method may size itself by, besides its options: the shapes of both networks'
    features (``feats``, batch dimension included, as probed by :meth:`probe`), the number of
    classes, the training set (its size ``n_data`` and its labels [n_data]; needed by methods
    with memory banks), the device, the architectures' names (for messages and recipes), and the
    training batch size ``batch_size`` (per process; None where unknown), for methods whose modules
    are sized by the batch (SemCKD's attention embeds rows of the B x B similarity matrix)."""

    feats_s: tuple[torch.Size, ...]
    feats_t: tuple[torch.Size, ...]
    num_classes: int
    n_data: int | None = None
    labels: torch.Tensor | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_s: str = ""
    model_t: str = ""
    batch_size: int | None = None

    @classmethod
    @torch.no_grad()
    def probe(cls, student: nn.Module, teacher: nn.Module, sample: torch.Tensor, *,
              preact: bool | tuple[bool, bool] = False, sample_t: torch.Tensor | None = None,
              **facts) -> "BuildContext":
        """The context of ``student`` and ``teacher``, their feature shapes read from one eval-mode
        forward of ``sample`` [b, C, H, W] (b >= 2, an input of the data's size) with ``preact``
        (one flag for both networks, or ``(student's, teacher's)`` as :meth:`Distiller.preacts`
        gives them); ``sample_t``: the teacher's input when it sees another view (default
        ``sample``); ``facts`` fill the other fields (``n_data``, ``labels``, ``model_s``, ...)."""
        preact_s, preact_t = (preact, preact) if isinstance(preact, bool) else preact
        feats_s, logits_s = probe_features(student, sample, preact_s)
        feats_t, _ = probe_features(teacher, sample if sample_t is None else sample_t, preact_t)
        facts.setdefault("device", sample.device)
        return cls(tuple(f.shape for f in feats_s), tuple(f.shape for f in feats_t), int(logits_s.shape[1]),
                   **facts)

    @property
    def s_dim(self) -> int:
        """Size of the student's pooled feature ``feats[-1]`` (flattened)."""
        return math.prod(self.feats_s[-1][1:])

    @property
    def t_dim(self) -> int:
        """Size of the teacher's pooled feature ``feats[-1]`` (flattened)."""
        return math.prod(self.feats_t[-1][1:])

    def training_set_size(self, method: str) -> int:
        """``n_data``, which methods with a memory bank need (one row per training sample)."""
        if not self.n_data:
            raise UserError(f"--distill {method} needs the number of training samples (n_data of its "
                            "BuildContext): its memory bank has one row per sample")
        return int(self.n_data)


class Distiller(nn.Module, abc.ABC):
    """Base class of the methods selectable with ``--distill``.

    A Distiller owns the method's extra modules (embeds, regressors, memory banks) and
    computes the method's loss terms (unweighted; the loop multiplies them by ``-b``).
    Subclasses set the class attributes that declare what they need and their published
    weights, and implement ``__init__(options, ctx)`` (``options``: an ``Options`` instance;
    ``ctx``: the :class:`BuildContext`) and ``forward``; :meth:`data_needs` says what their
    batches must carry.

    Class attributes:
        Options: the dataclass of the method's options (its flags; shared groups are inherited).
        preact: take stage features before their last ReLU (both networks).
        preact_s, preact_t: the student's, the teacher's choice where it differs from ``preact``
            (None: ``preact``); the loop, the probe and the tests read the pair from :meth:`preacts`.
        weights: published ``(gamma, alpha, beta)`` for ``-r -a -b`` (used when left out).
        has_init_stage: the method pre-trains in an init stage of ``--init_epochs`` (see :meth:`init_loss`).
        kd_is_own_loss: the step's ``-a`` term (KD) is the method's own loss (KD itself), so
            ``-a`` > 0 adds nothing to its name in the tables (:meth:`run_label`).
        reads_teacher_batchnorm: :meth:`bind` reads the teacher's BatchNorms (or the teacher runs
            them in train mode), so the loop keeps them: the teacher is not folded (fast path off).

    :meth:`teacher_train_mode` says whether the loop runs the teacher in train mode.

    :meth:`label_need` says whether (and why) the method needs the training labels.
    """

    name: str = ""
    Options: type = NoOptions
    preact: bool = False
    preact_s: bool | None = None
    preact_t: bool | None = None
    weights: tuple[float, float, float] = (1.0, 0.0, 1.0)
    has_init_stage: bool = False
    kd_is_own_loss: bool = False
    reads_teacher_batchnorm: bool = False

    @abc.abstractmethod
    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """The method's loss terms for one batch (gradients flow into the student and this module)."""

    @classmethod
    def preacts(cls) -> tuple[bool, bool]:
        """``(student, teacher)``: whether each network's stage features are taken before their
        last ReLU (``preact_s`` / ``preact_t`` where set, else ``preact``)."""
        return (cls.preact if cls.preact_s is None else cls.preact_s,
                cls.preact if cls.preact_t is None else cls.preact_t)

    epoch: int = 1  # the current (1-based) training epoch, kept up to date by start_epoch

    @classmethod
    def data_needs(cls, options) -> DataNeeds:
        """What the training batches must carry for this method with ``options`` (default: nothing
        beyond images and labels)."""
        return DataNeeds()

    @classmethod
    def label_need(cls, options) -> str | None:
        """Why this method with ``options`` needs the training labels (a clause for the error that
        refuses it on an unlabelled training split, ``--split unlabeled``), or None when it does
        not. Default: a contrastive need in ``relax`` mode draws each positive from the anchor's
        class; override for methods that read ``batch.target`` or otherwise use classes."""
        contrast = cls.data_needs(options).contrast
        if contrast is not None and contrast.mode == "relax":
            return "--mode relax draws each positive from the anchor's class (use --mode exact)"
        return None

    @classmethod
    def run_label(cls, alpha: float | None) -> str:
        """What the paper's tables call a run of this method with KD weight ``alpha`` (``-a``):
        its name, with ``+kd`` when ``-a`` > 0 adds KD to another method's loss (``crd+kd``)."""
        return f"{cls.name}+kd" if not cls.kd_is_own_loss and (alpha or 0) > 0 else cls.name

    def start_epoch(self, epoch: int) -> None:
        """Called by the training loop before each epoch (e.g. for warm-up schedules)."""
        self.epoch = epoch

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Called once after construction with the two networks, for methods that read their
        weights (e.g. a classifier); keep them out of this module's submodules and state."""

    def inference_head(self) -> nn.Module | None:
        """The method's inference head (a :class:`distiller_zoo.heads.InferenceHead`), or None (the
        default: the student is tested with its own classifier). A method whose student is tested
        through a head of its own (SimKD: the projector and the teacher's classifier) returns it,
        available once :meth:`bind` ran. The step then trains with the head's logits (its CE and
        KD terms read them), validation tests backbone + head, and every student checkpoint saves
        it under ``'head'`` (:func:`distiller_zoo.heads.head_entry`; ``'model'`` stays the backbone),
        which ``eval_student.py`` and ``transfer_student.py`` rebuild. The head's trained parts are
        this Distiller's modules (saved and resumed with it); frozen parts it reads from the
        networks (the teacher's classifier) are restored with them. One teacher only."""
        return None

    def teacher_train_mode(self) -> bool:
        """Whether the loop runs the teacher in train mode (still without gradient): its
        BatchNorms normalise by the batch's statistics and update their running statistics.
        Default False (a frozen teacher in eval mode); a method that returns True must set
        ``reads_teacher_batchnorm`` (a folded teacher has no BatchNorms left to run)."""
        return False

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the main-stage optimiser updates (frozen parts excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def init_modules(self) -> list[nn.Module]:
        """Modules of this Distiller trained in the init stage (besides the student, if any)."""
        return []

    def init_trains_student(self) -> bool:
        """Whether the init stage also updates the student."""
        return False

    def init_learning_rate(self, learning_rate: float) -> float:
        """Learning rate of the init stage, given the main stage's (RepDistiller: the same)."""
        return learning_rate

    def init_loss(self, s: NetOutput, t: NetOutput, batch: Batch) -> torch.Tensor:
        """The init stage's loss (methods with ``has_init_stage`` override this)."""
        raise TypeError(f"--distill {self.name} has no init stage")

    def after_init_stage(self) -> None:
        """Called once the init stage is over (e.g. to freeze a pre-trained module)."""


_REGISTRY: dict[str, type[Distiller]] = {}


def registrar(table: dict[str, type], key: str, attr: str, what: str) -> Callable[[type], type]:
    """A class decorator that files the class in ``table`` under ``key`` and sets its ``attr`` to
    ``key``; another class under a taken key raises ``ValueError`` (``what`` names the key)."""

    def wrap(cls: type) -> type:
        if key in table and table[key] is not cls:
            raise ValueError(f"{what} is registered twice ({table[key].__name__}, {cls.__name__})")
        setattr(cls, attr, key)
        table[key] = cls
        return cls

    return wrap


def register(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator: make a Distiller selectable as ``--distill name``."""
    return registrar(_REGISTRY, name, "name", f"--distill {name}")


def method_names() -> list[str]:
    """Every registered ``--distill`` choice."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Distiller]:
    """The Distiller class of ``--distill name``; unknown names raise :class:`UserError`."""
    if name not in _REGISTRY:
        raise UserError(f"unknown --distill '{name}'; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_option_groups() -> list[tuple[type, str]]:
    """Every option group of the registered methods, each once, with a title naming the methods
    that use it (e.g. ``memory bank (--distill crd, wcord)``)."""
    users: dict[type, list[str]] = {}
    for name in method_names():
        for group in option_groups([_REGISTRY[name].Options]):
            users.setdefault(group, []).append(name)
    titled = []
    for group, names in users.items():
        what = (group.__doc__ or group.__name__).strip().splitlines()[0]
        titled.append((group, f"{what} (--distill {', '.join(names)})"))
    return titled


def method_option_names(name: str | None = None) -> set[str]:
    """The options (flag names) of method ``name``'s ``Options``, its shared groups included
    (``crd``: ``nce_k``, ``feat_dim``, ...); None: of every registered method."""
    names = method_names() if name is None else [name]
    return {f.name for each in names for f in dataclasses.fields(get_method(each).Options)}


@torch.no_grad()
def probe_features(model: nn.Module, sample: torch.Tensor, preact: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Features and logits of ``model`` for ``sample`` [b, C, H, W] in eval mode (for sizing modules)."""
    was_training = model.training
    model.eval()
    feats, logits = model(sample, is_feat=True, preact=preact)
    model.train(was_training)
    return feats, logits


def build_distiller(method: str | type[Distiller], options, student: nn.Module, teacher: nn.Module,
                    sample: torch.Tensor, **facts) -> Distiller:
    """Build ``method`` (a ``--distill`` name or a Distiller class) with ``options`` (its
    ``Options``; None: the defaults) for this student/teacher pair: ``sample`` [b, 3, H, W] is an
    input of the data's size, used to read the feature shapes, and ``facts`` are the other fields
    of the :class:`BuildContext` (``n_data``, ``labels``, ``model_s``, ``model_t``, ``batch_size``)."""
    cls = get_method(method) if isinstance(method, str) else method
    ctx = BuildContext.probe(student, teacher, sample, preact=cls.preacts(), **facts)
    distiller = cls(cls.Options() if options is None else options, ctx)
    distiller.bind(student, teacher)
    return distiller
