"""The run builder of ``train_student.py``: from its flags, everything a distillation run trains
with (:func:`build_run`: data, student, frozen teachers, one Distiller per teacher, the step, the
optimiser), its init stages, the published weights and RepDistiller's folder name."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from common.checkpoint import weights_digest
from common.declare import options_from
from common.distributed import say
from common.errors import UserError
from common.runtime import Runtime
from common.sync_bn import convert_sync_batchnorm
from dataset import DataBundle, DataOptions, get_dataloaders
from dataset.skipping import sample_images
from dataset.views import ViewLayout, check_recorded_view, distinct
from distiller_zoo.registry import BuildContext, Distiller
from distiller_zoo.step import DistillStep, InitStep, channels
from engine.logger import set_derived
from engine.epoch import evaluate
from engine.methods import get_method, method_option_names
from engine.optim import build_optimizer
from engine.stage import Stage, constant_lr
from models import build_model, in_channels_of
from models.teacher import (check_entries, checkpoint_arch, checkpoint_classes, checkpoint_view, load_teacher,
                            prepare_teacher, read_teacher_checkpoint)


def check_unlabeled(opt, method: type[Distiller]) -> None:
    """``--split unlabeled``: the images have no labels, so there is no cross-entropy term (``-r``
    defaults to 0 and a positive one is refused) and a method that needs labels (its
    :meth:`Distiller.label_need`) is refused."""
    if opt.gamma:
        raise UserError(f"-r {opt.gamma:g}: --split unlabeled has no labels, so there is no cross-entropy term; "
                        "leave -r out (it is 0 there)")
    why = method.label_need(options_from(method.Options, opt))
    if why:
        raise UserError(f"--distill {opt.distill} needs labels, which --split unlabeled has not: {why}")
    if opt.gamma is None:
        set_derived(opt, "gamma", 0)
        say("--split unlabeled: no labels, so no cross-entropy term (-r 0)")


def teacher_class_count(path: str, state: dict) -> int:
    """The number of classes of the teacher checkpoint ``state`` read from ``path`` (see
    :func:`models.teacher.checkpoint_classes`)."""
    return checkpoint_classes(state, checkpoint_arch(state, path), path)


def fill_weights(opt, published: tuple[float, float, float]) -> None:
    """``-r -a -b`` left out take the method's published weights (printed); ``-r`` alone left
    out is 1, as in RepDistiller (an int there, which its folder names show as ``r:1``)."""
    if opt.alpha is not None and opt.beta is not None:
        if opt.gamma is None:
            set_derived(opt, "gamma", 1)
        return
    filled = []
    for flag, attr, value in zip(("-r", "-a", "-b"), ("gamma", "alpha", "beta"), published):
        if getattr(opt, attr) is None:
            # as if given on the command line (a float), except -r 1, which is RepDistiller's default 1
            set_derived(opt, attr, 1 if attr == "gamma" and value == 1 else float(value))
            filled.append(f"{flag} {value:g}")
    say(f"--distill {opt.distill}: using its published weights {' '.join(filled)}")


def run_name(opt, model_t: str, views_t: list[str] | None = None) -> str:
    """RepDistiller's student folder name for the same command line: the weights as its argparse
    leaves them (floats as given, ``r:1`` for a left-out ``-r``); when a network sees another view
    than rgb, ``_view_s:<view>_view_t:<views>`` is added, and ``_split:unlabeled`` for a run on an
    unlabelled split (so that it never shares a folder with the labelled run of the same flags)."""
    views_t = views_t or ["rgb"]
    views = "" if {opt.view_s, *views_t} == {"rgb"} else f"_view_s:{opt.view_s}_view_t:{'+'.join(views_t)}"
    split = "" if opt.split == "train" else f"_split:{opt.split}"
    return (f"S:{opt.model_s}_T:{model_t}_{opt.dataset}_{opt.distill}"
            f"_r:{opt.gamma}_a:{opt.alpha}_b:{opt.beta}{views}{split}_{opt.trial}")


def other_methods_options(opt) -> set[str]:
    """The options of the methods other than ``--distill``'s (they do nothing in its run):
    ``--print_config`` leaves them out where they hold their defaults."""
    return method_option_names() - method_option_names(opt.distill)


@dataclass
class RunParts:
    """What a distillation run trains with (built by :func:`build_run`): the ``--distill`` class
    and its options, the data, the student, the teachers as ``(model, arch, path)``, one Distiller
    per teacher, the training step, the optimiser of the student and the Distillers' trainable
    parameters, the digests of the teachers' weights as loaded (what a resume must find again), the
    teachers' views, and the channels of the batches' ``img`` the student and each teacher see
    (None: all of them; the batches carry several views only when the networks' views differ)."""

    method: type[Distiller]
    options: object
    data: DataBundle
    student: nn.Module
    teachers: list[tuple[nn.Module, str, str]]
    distillers: nn.ModuleList
    step: DistillStep
    optimizer: torch.optim.Optimizer
    teacher_digests: list[str] = field(default_factory=list)
    views_t: list[str] = field(default_factory=list)
    input_s: slice | None = None
    inputs_t: list[slice | None] = field(default_factory=list)
    num_classes: int | None = None  # the student's (None: the data's)

    @property
    def tested(self) -> bool:
        """Whether the test set has the student's classes, so that its test top-1 means something
        (not so after ``--split unlabeled`` with a teacher of another data set's classes)."""
        return self.num_classes is None or self.num_classes == self.data.num_classes

    @property
    def student_classes(self) -> int:
        """The number of classes the student predicts."""
        return self.data.num_classes if self.num_classes is None else self.num_classes

    @property
    def model_t(self) -> str:
        """The teachers' architectures, joined by ``+`` (RepDistiller's ``model_t``, for one)."""
        return "+".join(arch for _, arch, _ in self.teachers)


def teacher_paths(opt) -> list[str]:
    """The teacher checkpoints of ``--path_t`` (comma-separated for an ensemble)."""
    return [path.strip() for path in opt.path_t.split(",")] if opt.path_t else [""]


def teacher_views(opt, paths: list[str], states: list[dict | None]) -> list[str]:
    """The view of each teacher: ``--view_t`` (one for all, or one per teacher), else the view its
    checkpoint records (rgb for one that records none and takes 3 channels). An explicit view that
    contradicts the recorded one, or a teacher whose view cannot be told, is a :class:`UserError`."""
    given = [v.strip() for v in opt.view_t.split(",")] if opt.view_t else []
    if given and len(given) not in (1, len(paths)):
        raise UserError(f"--view_t gives {len(given)} views for {len(paths)} teachers: give one for all of them "
                        "or one per teacher, comma-separated in the order of --path_t")
    views = []
    for i, (path, state) in enumerate(zip(paths, states)):
        recorded = checkpoint_view(state) if state is not None else "rgb"
        view = given[i if len(given) > 1 else 0] if given else recorded
        if view is None:
            raise UserError(f"the teacher in '{path}' records no view and does not take 3 channels: "
                            "say which view it was trained on with --view_t")
        if recorded is not None and view != recorded:
            raise UserError(f"--view_t {view} contradicts the teacher in '{path}', which was trained on view "
                            f"{recorded}: leave --view_t out (it defaults to the checkpoint's view) or use that view")
        views.append(view)
    return views


def load_teachers(opt, num_classes: int, runtime: Runtime, sample: torch.Tensor,
                  states: list[dict | None] | None = None, views: list[str] | None = None,
                  layout: ViewLayout = ViewLayout(), fast: bool = True
                  ) -> tuple[list[tuple[nn.Module, str, str]], list[str]]:
    """The teachers of ``--path_t`` (comma-separated for an ensemble) as ``(model, arch, path)``,
    frozen and (unless ``--plain_teacher``, or ``fast`` False: a method that reads or runs their
    BatchNorms) on the fast path, and the digests of their weights.
    ``states``: their checkpoints, when already read; ``views``: their views in ``layout`` (the
    views the batches carry; ``sample`` has them all), checked against their input channels."""
    teachers, digests = [], []
    paths = teacher_paths(opt)
    for i, path in enumerate(paths):
        teacher, arch = load_teacher(path, num_classes, opt.dataset, state=states[i] if states else None)
        view = views[i] if views else "rgb"
        if in_channels_of(teacher) != layout.channels(view):
            raise UserError(f"the teacher in '{path}' takes {in_channels_of(teacher)} input channels, but its view "
                            f"{view} has {layout.channels(view)}: give the view it was trained on with --view_t")
        digests.append(weights_digest(teacher))
        own = sample[:, layout.slice(view)] if len(layout.views) > 1 else sample
        # frozen: eval, no grad; fast: BatchNorm folded into its convolution (exact in eval mode), channels_last
        teachers.append((prepare_teacher(teacher, runtime, own, fast=fast and not opt.plain_teacher), arch, path))
    return teachers, digests


def build_run(opt, runtime: Runtime) -> RunParts:
    """Build everything a run of ``opt`` trains with, on ``runtime``'s device, without training,
    logging or validating (``train`` runs it; ``scripts/benchmark.py`` times its steps)."""
    method = get_method(opt.distill)
    options = options_from(method.Options, opt)
    paths = teacher_paths(opt)
    states = [read_teacher_checkpoint(path) if path else None for path in paths]
    for path, state in zip(paths, states):
        if state is not None:  # before their views and classes are read
            check_entries(state, path)
            check_recorded_view(state.get("view"), path)
    views_t = teacher_views(opt, paths, states)
    needs = replace(method.data_needs(options), views=distinct([opt.view_s, *views_t]))
    data = get_dataloaders(options_from(DataOptions, opt), needs, device=runtime.device)
    layout = data.layout
    # images without labels have no classes of their own: the student predicts the teacher's
    classes = teacher_class_count(paths[0], states[0]) if opt.split == "unlabeled" else data.num_classes
    # first: its init depends on the seed only
    student = runtime.place(build_model(opt.arch, num_classes=classes, in_channels=layout.channels(opt.view_s)))
    if opt.sync_bn:  # after placing: on GPUs it becomes torch's SyncBatchNorm
        student = convert_sync_batchnorm(student)
    sample = runtime.to_device(sample_images(data.val_loader.dataset))  # every view's channels
    # a method that reads the teachers' BatchNorms (or runs them in train mode) keeps them: no folding
    teachers, digests = load_teachers(opt, classes, runtime, sample, states, views_t, layout,
                                      fast=not method.reads_teacher_batchnorm)
    several = len(layout.views) > 1
    input_s = layout.slice(opt.view_s) if several else None
    inputs_t = [layout.slice(view) if several else None for view in views_t]
    # One Distiller (heads, banks) per teacher; their terms are averaged.
    distillers = nn.ModuleList()
    for (teacher, arch, _), input_t in zip(teachers, inputs_t):
        ctx = BuildContext.probe(student, teacher, channels(sample, input_s), preact=method.preacts(),
                                 sample_t=channels(sample, input_t), n_data=data.n_data,
                                 labels=data.train_labels, model_s=opt.model_s, model_t=arch,
                                 batch_size=opt.batch_size)
        distillers.append(method(options, ctx))
        distillers[-1].bind(student, teacher)
    runtime.place(distillers)
    runtime.seed_rank(opt.seed)
    step = DistillStep(student, [t for t, _, _ in teachers], distillers, (opt.gamma, opt.alpha, opt.beta),
                       opt.kd_T, runtime, input_s=input_s, inputs_t=inputs_t)
    extra_params = [p for distiller in distillers for p in distiller.trainable_parameters()]
    optimizer = build_optimizer(list(student.parameters()) + extra_params, opt)
    return RunParts(method, options, data, student, teachers, distillers, step, optimizer, digests, views_t,
                    input_s, inputs_t, classes)


def init_stages(opt, parts: RunParts, runtime: Runtime) -> list[Stage]:
    """The init stages of a method that has one (abound, factor, fsp; none with ``-b 0`` or
    ``--init_epochs 0``), as RepDistiller's ``helper/pretrain.py``: one per teacher, in turn, each
    training its Distiller's init modules (and the student's feature layers, where the method says
    so) for ``--init_epochs`` epochs with SGD at the method's init learning rate, in sample orders
    of their own (sampler epochs -1, -2, ...), then ``after_init_stage()``. Not DDP-wrapped: the
    loop averages their gradients over ranks; no fp16 loss scaling."""
    if not (parts.method.has_init_stage and opt.beta != 0 and opt.init_epochs > 0):
        return []
    stages = []
    for distiller, (teacher, _, _), input_t in zip(parts.distillers, parts.teachers, parts.inputs_t):
        step = InitStep(parts.student, teacher, distiller, runtime, input_s=parts.input_s, input_t=input_t)
        optimizer = torch.optim.SGD(step.trained_parameters(), lr=distiller.init_learning_rate(opt.learning_rate),
                                    momentum=opt.momentum, weight_decay=opt.weight_decay)
        stages.append(Stage("init", opt.init_epochs, step, step, optimizer, constant_lr(optimizer), validates=False,
                            on_end=distiller.after_init_stage, sampler_epoch=lambda epoch: -epoch,
                            sync_gradients=True, loss_scaling=False))
    return stages


def validate_teachers(parts: RunParts, runtime: Runtime) -> list[float | None]:
    """Each teacher's test top-1 (printed); None when the test set's classes are not the teacher's."""
    if not parts.tested:
        return [None] * len(parts.teachers)
    accs = []
    for (teacher, arch, path), input_t in zip(parts.teachers, parts.inputs_t):
        accs.append(evaluate(teacher, parts.data.val_loader, runtime.device, runtime, inputs=input_t)["test_acc"])
        say(f"teacher {arch} ({path}): test top-1 {accs[-1]:.2f}")
    return accs
