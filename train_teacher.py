"""Train one network with cross-entropy (a teacher, or a student alone).

    python train_teacher.py --model resnet32x4
    python train_teacher.py --model resnet8 --dataset synthetic --epochs 5

The run folder is ``<save_folder>/<model>_<dataset>_lr_<lr>_decay_<wd>_trial_<trial>/``, the
layout whose name RepDistiller's train_student.py parses for the teacher's architecture.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch.nn.functional as F

from dataset import get_dataloaders
from helper.errors import exit_on_user_error
from helper.logger import RunLog
from helper.loops import fit
from helper.optim import build_optimizer
from helper.options import Parser, add_training_args, finalize_training_args
from helper.runtime import resolve_device, set_seed
from models import build_model, resolve_model_name


def build_parser() -> Parser:
    parser = Parser(description="Train a network with cross-entropy (RepDistiller-compatible flags).")
    add_training_args(parser)
    parser.add_argument("--model", type=str, default="resnet110", help="architecture (see models.model_dict)")
    parser.add_argument("-t", "--trial", type=int, default=0, help="the experiment id")
    return parser


def parse_option(argv: list[str] | None = None):
    opt = build_parser().parse_args(argv)
    opt.arch = resolve_model_name(opt.model, opt.dataset)
    finalize_training_args(opt, opt.model)
    opt.model_name = (f"{opt.model}_{opt.dataset}_lr_{opt.learning_rate}"
                      f"_decay_{opt.weight_decay}_trial_{opt.trial}")
    opt.save_path = str(Path(opt.save_folder) / opt.model_name)
    return opt


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    opt = parse_option(argv)
    device = resolve_device(opt.device)
    set_seed(opt.seed)
    data = get_dataloaders(opt)
    opt.num_classes = data.num_classes
    model = build_model(opt.arch, num_classes=data.num_classes).to(device)
    optimizer = build_optimizer(model.parameters(), opt)
    run = RunLog(Path(opt.save_path), opt, extra={"role": "teacher", "model": opt.arch, "dataset": opt.dataset})
    print(f"training {opt.arch} on {opt.dataset} ({data.n_data} images, {data.num_classes} classes) "
          f"on {device}; run folder {opt.save_path}", flush=True)

    def train_step(batch):
        images = batch[0].to(device, non_blocking=True)
        target = batch[1].to(device, non_blocking=True)
        logits = model(images)
        return logits, target, {"ce": F.cross_entropy(logits, target)}

    results = fit(opt, model=model, trainable=model, optimizer=optimizer, train_loader=data.train_loader,
                  val_loader=data.val_loader, train_step=train_step, device=device, run=run)
    print(f"best top-1 {results['best_acc']:.2f}  last top-1 {results['last_acc']:.2f}  "
          f"last top-5 {results['last_acc_top5']:.2f}  ({results['wall_time_s']:.0f} s)", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
