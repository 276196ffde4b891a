"""Train one network with cross-entropy (a teacher, or a student alone).

    python train_teacher.py --model resnet32x4
    python train_teacher.py --model resnet8 --dataset synthetic --epochs 5
    python train_teacher.py --model resnet8 --dataset synthetic --view L      # on the Lab L channel

The run folder is ``<save_folder>/<model>_<dataset>_lr_<lr>_decay_<wd>_trial_<trial>/``, the
layout whose name RepDistiller's train_student.py parses for the teacher's architecture (with
``--view V`` other than rgb: ``<model>_<dataset>_view_<V>_lr_...``). Checkpoints record the view.
"""
from __future__ import annotations

import sys
from pathlib import Path

from common.declare import options_from
from common.distributed import say, wrap_ddp
from common.errors import UserError, exit_on_user_error
from common.runtime import Runtime
from common.sync_bn import convert_sync_batchnorm
from dataset import DataNeeds, DataOptions, get_dataloaders
from dataset.views import check_view
from engine.fit import Fit, FitOptions, best_line
from engine.logger import RunLog, run_summary
from engine.optim import build_optimizer
from engine.options import Parser, add_training_args, finalize_training_args, with_print_config
from engine.resume import claim_run_folder, resume_path, run_options
from engine.run_flags import free_flags
from engine.script import run_script
from engine.stage import Stage, scheduled_lr
from engine.steps import ClassifyStep
from models import build_model, resolve_model_name


def build_parser() -> Parser:
    parser = Parser(description="Train a network with cross-entropy (RepDistiller-compatible flags).")
    add_training_args(parser)
    parser.add_argument("--model", type=str, default="resnet110", help="architecture (see models.model_dict)")
    parser.add_argument("-t", "--trial", type=int, default=0, help="the experiment id")
    parser.add_argument("--view", type=str, default="rgb",
                        help="what the network sees of each image: rgb, gray, L or ab (CIE Lab channels), or "
                             "paired:<folder> (--dataset paired); the model takes its channels")
    return parser


def parse_option(argv: list[str] | None = None):
    opt = build_parser().parse_args(argv)
    if opt.split == "unlabeled":
        raise UserError("--split unlabeled: train_teacher.py trains with cross-entropy, which needs labels; "
                        "distil from a teacher on unlabelled images with train_student.py --split unlabeled")
    opt.arch = resolve_model_name(opt.model, opt.dataset)
    check_view(opt.view)
    finalize_training_args(opt, opt.model)
    view = "" if opt.view == "rgb" else f"_view_{opt.view}"
    opt.model_name = (f"{opt.model}_{opt.dataset}{view}_lr_{opt.learning_rate}"
                      f"_decay_{opt.weight_decay}_trial_{opt.trial}")
    opt.save_path = str(Path(opt.save_folder) / opt.model_name)
    return opt


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_script(with_print_config(parse_option, build_parser), train, argv)


def train(opt, runtime: Runtime) -> dict:
    data = get_dataloaders(options_from(DataOptions, opt), DataNeeds(views=(opt.view,)), device=runtime.device)
    model = runtime.place(build_model(opt.arch, num_classes=data.num_classes,
                                      in_channels=data.layout.channels(opt.view)))
    if opt.sync_bn:  # after placing: on GPUs it becomes torch's SyncBatchNorm
        model = convert_sync_batchnorm(model)
    runtime.seed_rank(opt.seed)
    optimizer = build_optimizer(model.parameters(), opt)
    resume = resume_path(opt.resume, opt.save_path, opt.model)
    run = RunLog(Path(opt.save_path), opt, active=runtime.dist.is_main,
                 extra=run_summary(opt, role="teacher", method="vanilla", model=opt.arch, model_t=None))
    step = wrap_ddp(ClassifyStep(model, runtime), runtime.device)
    stage = Stage("main", opt.epochs, step, step, optimizer, scheduled_lr(opt, optimizer))
    # a resume must find the same number of classes
    recorded = run_options(opt, num_classes=data.num_classes, world_size=runtime.dist.world_size)
    fit = Fit(options_from(FitOptions, opt), recorded, stages=[stage], modules={"model": model},
              train_loader=data.train_loader, val_loader=data.val_loader, holdout_loader=data.holdout_loader,
              runtime=runtime, run=run, prefix=opt.model,
              static={"arch": opt.arch, "dataset": opt.dataset, "num_classes": data.num_classes, "view": opt.view},
              resumable=free_flags(opt))
    if resume is not None:  # checked before anything is written: a refused resume leaves the folder as it was
        fit.resume_from(resume)
    claim_run_folder(opt.save_path, resume=resume, overwrite=opt.overwrite, resume_asked=bool(opt.resume))
    on_view = "" if opt.view == "rgb" else f" view {opt.view}"
    say(f"training {opt.arch} on {opt.dataset}{on_view} ({data.n_data} images, {data.num_classes} classes) on "
        f"{runtime.describe()}; run folder {opt.save_path}")
    results = fit()
    say(f"{best_line(results)}  last top-1 {results['last_acc']:.2f}  "
        f"last top-5 {results['last_acc_top5']:.2f}  ({results['wall_time_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
