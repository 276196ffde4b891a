"""Evaluate a saved network on a data set's test split, without training: top-1, top-5 and loss.

    python eval_student.py --path save/student_model/<run>/resnet8x4_best.pth
    python eval_student.py --path_t save/models/resnet32x4_vanilla/ckpt_epoch_240.pth --dataset cifar100

Any checkpoint of train_teacher.py or train_student.py (``<model>_last.pth``, ``<model>_best.pth``,
``ckpt_epoch_N.pth``) or of RepDistiller (``{'model': state_dict}``, the architecture read from its
folder's name, ``resnet32x4_vanilla`` -> ``resnet32x4``); ``--path_s`` and ``--path_t`` are other
names of ``--path``. The data set is the one the checkpoint records unless ``--dataset`` is given
(cifar100 for RepDistiller's files, which record none); the network sees the view its checkpoint
records. The test is the training runs' own (:func:`engine.epoch.evaluate`), so a run's last
checkpoint gives the last test top-1 of its results.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch.nn as nn

from common.checkpoint import load_checkpoint
from common.declare import add_option_groups, options_from
from common.distributed import say
from common.errors import UserError, exit_on_user_error
from common.runtime import Runtime, RuntimeOptions
from dataset import DataNeeds, DataOptions, get_dataloaders
from dataset.registry import dataset_names
from dataset.views import network_view
from distiller_zoo.heads import network_with_head
from engine.logger import write_json
from engine.epoch import evaluate
from engine.options import Parser, default_workers
from engine.script import run_script
from models import in_channels_of
from models.teacher import load_backbone, prepare_teacher


def build_parser() -> Parser:
    parser = Parser(description="Evaluate a checkpoint on a data set's test split (top-1, top-5, loss).")
    g = parser.add_argument_group("the checkpoint")
    g.add_argument("--path", "--path_s", "--path_t", dest="path", default=None,
                   help="the checkpoint: a .pth file of train_teacher.py, train_student.py or RepDistiller")
    g.add_argument("--view", type=str, default=None,
                   help="what the network sees (rgb, gray, L, ab, paired:<folder>); default: the view its checkpoint "
                        "records (rgb for one that records none)")
    g.add_argument("--json", type=str, default=None, metavar="FILE", help="also write the results to FILE as JSON")
    add_option_groups(parser, [DataOptions, RuntimeOptions])
    parser.set_defaults(dataset=None)  # None: the checkpoint's
    for action in parser._actions:
        if action.dest == "dataset":
            action.choices = dataset_names()  # unknown names: argparse's one line
            action.help = "data set whose test split is used (default: the one the checkpoint records, else cifar100)"
    return parser


def parse_option(argv: list[str] | None = None):
    opt = build_parser().parse_args(argv)
    if not opt.path:
        raise UserError("--path is required: the checkpoint to evaluate, e.g. "
                        "save/models/resnet32x4_vanilla/ckpt_epoch_240.pth or save/student_model/<run>/<model>_best.pth")
    opt.dataset_given = opt.dataset is not None
    if opt.seed is None:
        opt.seed = 0  # nothing is drawn at random in a test; the runtime seeds anyway
    return opt


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_script(parse_option, evaluate_checkpoint, argv)


def inference_network(model: nn.Module, state: dict, path: str) -> nn.Module:
    """The network that is tested: the checkpoint's ``model`` as saved, with its own classifier;
    or, when the checkpoint holds a method's inference head (``'head'``, e.g. SimKD's projector and
    reused teacher classifier; see :mod:`distiller_zoo.heads`), ``model`` with that head
    (:class:`distiller_zoo.heads.HeadedNetwork`), as the run validated it. A corrupt head entry
    raises :class:`UserError`."""
    return network_with_head(model, state, f"'{path}'")


def evaluate_checkpoint(opt, runtime: Runtime) -> dict:
    """Load ``opt.path``, build the test loader of its data set and test it; prints one line and
    returns the results (also written to ``--json``)."""
    path = str(opt.path)
    state = load_checkpoint(path)
    model, arch, facts = load_backbone(path, state=state)
    recorded = facts.get("dataset")
    if opt.dataset is None and recorded is not None and recorded not in dataset_names():
        raise UserError(f"'{path}' records the data set {recorded!r}, which is not one of {', '.join(dataset_names())}: "
                        "say which one to test on with --dataset")
    opt.dataset = opt.dataset or recorded or "cifar100"
    dataset = (f"--dataset {opt.dataset}" if opt.dataset_given else
               f"the data set it records, {opt.dataset}," if recorded else f"{opt.dataset} (the default; see --dataset)")
    if opt.num_workers is None:
        opt.num_workers = default_workers(opt.loader, opt.dataset)
    view = network_view(opt.view, model.input_view, path)
    data = get_dataloaders(options_from(DataOptions, opt), DataNeeds(views=(view,)), device=runtime.device)
    if facts["num_classes"] != data.num_classes:
        raise UserError(f"the network in '{path}' has {facts['num_classes']} classes but {dataset} has "
                        f"{data.num_classes}: test it on the data set it was trained on, with the data flags of its "
                        "run (its args.json lists them, e.g. --synthetic_classes)")
    if in_channels_of(model) != data.layout.channels(view):
        raise UserError(f"the network in '{path}' takes {in_channels_of(model)} input channels, but view {view} has "
                        f"{data.layout.channels(view)}: give the view it was trained on with --view")
    network = prepare_teacher(inference_network(model, state, path), runtime, fast=False)  # eval mode, as saved
    stats = evaluate(runtime.forward_fn(network), data.val_loader, runtime.device, runtime)
    images = len(data.val_loader.dataset)
    on_view = "" if view == "rgb" else f" (view {view})"
    say(f"{arch} ({path}) on {opt.dataset}{on_view} test: top-1 {stats['test_acc']:.2f}  "
        f"top-5 {stats['test_acc_top5']:.2f}  loss {stats['test_loss']:.4f}  ({images} images)")
    results = {"path": path, "arch": arch, "dataset": opt.dataset, "view": view, "num_classes": data.num_classes,
               "test_images": images, **stats, "checkpoint": facts, "device": str(runtime.device), "amp": runtime.amp}
    if opt.json and runtime.dist.is_main:
        try:
            write_json(Path(opt.json), results)
        except OSError as err:
            raise UserError(f"could not write --json {opt.json} ({err.strerror or err}): is the folder there and "
                            "writable? The results were printed above") from None
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
