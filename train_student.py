"""Distil a student from a frozen teacher with any ``--distill`` method.

    python train_student.py --path_t ./save/models/resnet32x4_vanilla/ckpt_epoch_240.pth \
        --distill crd --model_s resnet8x4 -a 0 -b 0.8 --trial 1

The loss is ``gamma * CE + alpha * KL_T + beta * method`` (``-r -a -b``); a term whose weight is
0 is not computed. With ``--split unlabeled`` there is no cross-entropy term (``-r 0``), methods
that need labels are refused, and the student gets the teacher's classes. ``--view_s`` and
``--view_t`` let the student and the teacher(s) see different views of the same samples
(cross-modal distillation, e.g. teacher on L, student on ab). Methods come from the registry
(distiller_zoo/registry.py): this script never names one.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from dataset import DataBundle, DataOptions, get_dataloaders
from dataset.skipping import sample_images
from dataset.views import ViewLayout, check_recorded_view, check_view, distinct
from distiller_zoo.registry import BuildContext, Distiller
from distiller_zoo.step import DistillStep, InitStep, channels
from helper.argtypes import nonnegative_float, nonnegative_int, path_part, positive_float
from helper.checkpoint import weights_digest
from helper.cli.methods import get_method, method_names, method_option_groups, method_option_names
from helper.cli.options import Parser, add_training_args, finalize_training_args, with_print_config
from helper.declare import add_option_group, options_from
from helper.distributed import say, wrap_ddp
from helper.errors import UserError, exit_on_user_error
from helper.logger import RunLog, run_summary, set_derived
from helper.loops import Fit, Stage, best_line, constant_lr, scheduled_lr, validate
from helper.optim import build_optimizer
from helper.resume import claim_run_folder, resume_path
from helper.runtime import Runtime, run_script
from helper.sync_bn import convert_sync_batchnorm
from models import build_model, in_channels_of, resolve_model_name
from models.teacher import (check_entries, checkpoint_arch, checkpoint_classes, checkpoint_view, load_teacher,
                            prepare_teacher, read_teacher_checkpoint, teacher_sources)


def build_parser() -> Parser:
    parser = Parser(description="Distil a student from a teacher (RepDistiller-compatible flags).")
    add_training_args(parser)
    parser.set_defaults(save_folder="./save/student_model")
    g = parser.add_argument_group("distillation")
    g.add_argument("--init_epochs", type=nonnegative_int, default=30,
                   help="init-stage epochs of abound, factor and fsp")
    g.add_argument("--model_s", type=str, default="resnet8", help="student architecture")
    g.add_argument("--path_t", type=str, default=None,
                   help="teacher checkpoint; several comma-separated ones distil from their ensemble")
    g.add_argument("--distill", type=str, default="kd", help="method: " + ", ".join(method_names()))
    g.add_argument("--trial", type=path_part, default="1", help="trial id")
    g.add_argument("-r", "--gamma", type=nonnegative_float, default=None, help="weight of cross-entropy (default 1)")
    g.add_argument("-a", "--alpha", type=nonnegative_float, default=None,
                   help="weight of KD (default: the method's published one)")
    g.add_argument("-b", "--beta", type=nonnegative_float, default=None,
                   help="weight of the method's loss (default: published)")
    g.add_argument("--kd_T", type=positive_float, default=4, help="temperature of KD")
    g.add_argument("--view_s", type=str, default="rgb",
                   help="what the student sees of each image: rgb, gray, L or ab (CIE Lab channels), or "
                        "paired:<folder> (--dataset paired)")
    g.add_argument("--view_t", type=str, default=None,
                   help="what the teacher sees (default: the view its checkpoint records, rgb for one that records "
                        "none); with several teachers, one view for all or one per teacher, comma-separated")
    g.add_argument("--plain_teacher", action="store_true",
                   help="run the teacher as loaded (BatchNorm kept, default memory format) instead of the "
                        "frozen-teacher fast path (BatchNorm folded into the convolutions, channels_last)")
    for group, title in method_option_groups():
        add_option_group(parser, group, title)
    return parser


def parse_option(argv: list[str] | None = None):
    opt = build_parser().parse_args(argv)

    method = get_method(opt.distill)
    if not opt.path_t:
        raise UserError(f"--path_t is required: the teacher checkpoint; {teacher_sources()}")
    opt.arch = resolve_model_name(opt.model_s, opt.dataset)
    check_view(opt.view_s, "--view_s")
    for view in (opt.view_t or "rgb").split(","):
        check_view(view.strip(), "--view_t")
    finalize_training_args(opt, opt.model_s)
    if opt.split == "unlabeled":
        check_unlabeled(opt, method)
    fill_weights(opt, method.weights)
    return opt


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


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_script(with_print_config(parse_option, build_parser, other_methods_options), train, argv)


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
                  layout: ViewLayout = ViewLayout()
                  ) -> tuple[list[tuple[nn.Module, str, str]], list[str]]:
    """The teachers of ``--path_t`` (comma-separated for an ensemble) as ``(model, arch, path)``,
    frozen and (unless ``--plain_teacher``) on the fast path, and the digests of their weights.
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
        teachers.append((prepare_teacher(teacher, runtime, own, fast=not opt.plain_teacher), arch, path))
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
    teachers, digests = load_teachers(opt, classes, runtime, sample, states, views_t, layout)
    several = len(layout.views) > 1
    input_s = layout.slice(opt.view_s) if several else None
    inputs_t = [layout.slice(view) if several else None for view in views_t]
    # One Distiller (heads, banks) per teacher; their terms are averaged.
    distillers = nn.ModuleList()
    for (teacher, arch, _), input_t in zip(teachers, inputs_t):
        ctx = BuildContext.probe(student, teacher, channels(sample, input_s), preact=method.preact,
                                 sample_t=channels(sample, input_t), n_data=data.n_data,
                                 labels=data.train_labels, model_s=opt.model_s, model_t=arch)
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
        accs.append(validate(teacher, parts.data.val_loader, runtime.device, runtime, inputs=input_t)["test_acc"])
        say(f"teacher {arch} ({path}): test top-1 {accs[-1]:.2f}")
    return accs


def train(opt, runtime: Runtime) -> dict:
    parts = build_run(opt, runtime)
    data, distillers = parts.data, parts.distillers
    folder = Path(opt.save_folder) / run_name(opt, parts.model_t, parts.views_t)
    resume = resume_path(opt.resume, folder, opt.model_s)
    run = RunLog(folder, opt, active=runtime.dist.is_main,
                 extra=run_summary(opt, role="student", method=opt.distill, model=opt.arch, model_t=parts.model_t,
                                   weights=(opt.gamma, opt.alpha, opt.beta), model_s=opt.arch))
    ddp_step = wrap_ddp(parts.step, runtime.device, find_unused_parameters=True)
    # a test set of other classes than the student's (--split unlabeled) says nothing: no validation,
    # the last checkpoint is the result and a linear probe (transfer_student.py) evaluates it
    main = Stage("main", opt.epochs, ddp_step, ddp_step, parts.optimizer, scheduled_lr(opt, parts.optimizer),
                 validates=parts.tested, on_epoch_start=lambda epoch: [d.start_epoch(epoch) for d in distillers])
    fit = Fit(opt, stages=[*init_stages(opt, parts, runtime), main],
              modules={"model": parts.student, "distiller": distillers[0] if len(distillers) == 1 else distillers},
              train_loader=data.train_loader, val_loader=data.val_loader, holdout_loader=data.holdout_loader,
              runtime=runtime, run=run, prefix=opt.model_s,
              static={"arch": opt.arch, "dataset": opt.dataset, "num_classes": parts.student_classes,
                      "distill": opt.distill, "model_t": parts.model_t, "view": opt.view_s},
              inputs=parts.input_s,
              # what the run's data and teachers turned out to be: a resume must find them again
              identity={"teachers": parts.teacher_digests, "n_data": data.n_data,
                        "num_classes": parts.student_classes, "model_t": parts.model_t})
    if resume is not None:  # checked before anything is written: a refused resume leaves the folder as it was
        fit.resume_from(resume)
    claim_run_folder(folder, resume=resume, overwrite=opt.overwrite, resume_asked=bool(opt.resume))
    teacher_accs = validate_teachers(parts, runtime)
    run.results["teacher_acc"] = teacher_accs[0] if len(teacher_accs) == 1 else teacher_accs
    run.results["teachers"] = parts.teacher_digests  # which teachers (scripts/summarize.py: one table row per teacher)
    if not parts.tested:
        run.results["evaluation"] = (f"not tested: the test set has {data.num_classes} classes, the student (as its "
                                     f"teacher) {parts.student_classes}; the last checkpoint is the result: evaluate "
                                     "it with a linear probe (transfer_student.py)")
        say(f"note: {run.results['evaluation']}")
    say(f"distilling {parts.model_t} -> {opt.arch} with {opt.distill} (-r {opt.gamma:g} -a {opt.alpha:g} "
        f"-b {opt.beta:g}) on {opt.dataset} ({data.n_data} images) on {runtime.describe()}; run folder {folder}")
    results = fit()
    if not parts.tested:
        say(f"student not tested (no test set of its classes): its last checkpoint is in {folder}  "
            f"({results['wall_time_s']:.0f} s)")
        return results
    student = ("stopped in the init stage" if results["last_acc"] is None else
               f"student {best_line(results)}  last top-1 {results['last_acc']:.2f}")
    say(f"teacher top-1 {', '.join(f'{a:.2f}' for a in teacher_accs)}; {student}  ({results['wall_time_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
