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
from pathlib import Path

import torch
import torch.nn as nn

from common.argtypes import nonnegative_float, nonnegative_int, path_part, positive_float
from common.declare import add_option_group, options_from, resumable
from common.distributed import say, wrap_ddp
from common.errors import UserError, exit_on_user_error
from common.runtime import Runtime
from dataset.views import check_view
from distiller_zoo.heads import HeadedNetwork, head_entry
from distiller_zoo.step import channels
from engine.fit import Fit, FitOptions, best_line
from engine.logger import RunLog, run_summary
from engine.methods import get_method, method_names, method_option_groups
from engine.options import Parser, add_training_args, finalize_training_args, with_print_config
from engine.resume import claim_run_folder, resume_path, run_options
from engine.run_flags import free_flags
from engine.script import run_script
from engine.stage import Stage, scheduled_lr
from engine.student import (build_run, check_unlabeled, fill_weights, init_stages, other_methods_options, run_name,
                            validate_teachers)
from models import resolve_model_name
from models.teacher import teacher_sources


def build_parser() -> Parser:
    parser = Parser(description="Distil a student from a teacher (RepDistiller-compatible flags).")
    add_training_args(parser)
    parser.set_defaults(save_folder="./save/student_model")
    g = parser.add_argument_group("distillation")
    g.add_argument("--init_epochs", type=nonnegative_int, default=30,
                   help="init-stage epochs of abound, factor and fsp")
    g.add_argument("--model_s", type=str, default="resnet8", help="student architecture")
    # another path to the same weights may be given on resume (the weights' digests are checked)
    resumable(g.add_argument("--path_t", type=str, default=None,
                             help="teacher checkpoint; several comma-separated ones distil from their ensemble"))
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
    resumable(g.add_argument("--plain_teacher", action="store_true",
                             help="run the teacher as loaded (BatchNorm kept, default memory format) instead of "
                                  "the frozen-teacher fast path (BatchNorm folded into the convolutions, "
                                  "channels_last)"))
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


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_script(with_print_config(parse_option, build_parser, other_methods_options), train, argv)


def train(opt, runtime: Runtime) -> dict:
    parts = build_run(opt, runtime)
    data, distillers = parts.data, parts.distillers
    folder = Path(opt.save_folder) / run_name(opt, parts.model_t, parts.views_t)
    resume = resume_path(opt.resume, folder, opt.model_s)
    run = RunLog(folder, opt, active=runtime.dist.is_main,
                 extra=run_summary(opt, role="student", method=opt.distill, model=opt.arch, model_t=parts.model_t,
                                   weights=(opt.gamma, opt.alpha, opt.beta), model_s=opt.arch,
                                   label=get_method(opt.distill).run_label(opt.alpha)))
    ddp_step = wrap_ddp(parts.step, runtime.device, find_unused_parameters=True)
    # a test set of other classes than the student's (--split unlabeled) says nothing: no validation,
    # the last checkpoint is the result and a linear probe (transfer_student.py) evaluates it
    main = Stage("main", opt.epochs, ddp_step, ddp_step, parts.optimizer, scheduled_lr(opt, parts.optimizer),
                 validates=parts.tested, on_epoch_start=lambda epoch: [d.start_epoch(epoch) for d in distillers])
    # what the run's data and teachers turned out to be: a resume must find them again
    recorded = run_options(opt, teachers=parts.teacher_digests, n_data=data.n_data,
                           num_classes=parts.student_classes, model_t=parts.model_t, world_size=runtime.dist.world_size)
    # a method's inference head (SimKD): the student is validated with it and every checkpoint saves it
    head = distillers[0].inference_head()
    fit = Fit(options_from(FitOptions, opt), recorded, stages=[*init_stages(opt, parts, runtime), main],
              modules={"model": parts.student, "distiller": distillers[0] if len(distillers) == 1 else distillers},
              train_loader=data.train_loader, val_loader=data.val_loader, holdout_loader=data.holdout_loader,
              runtime=runtime, run=run, prefix=opt.model_s,
              static={"arch": opt.arch, "dataset": opt.dataset, "num_classes": parts.student_classes,
                      "distill": opt.distill, "model_t": parts.model_t, "view": opt.view_s},
              inputs=parts.input_s, resumable=free_flags(opt),
              evaluated=None if head is None else HeadedNetwork(parts.student, head),
              entries=None if head is None else {"head": lambda: head_entry(head)})
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
