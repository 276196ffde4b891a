"""Linear-probe transfer: freeze a trained network, train a new linear classifier on its pooled
penultimate features (``feats[-1]``) on a target data set, report the test top-1. A student
saved with a method's inference head (SimKD) is probed on the head's feature: the pooled projected
map its (reused teacher) classifier reads.

    python transfer_student.py --path_s save/student_model/<run>/<model>_last.pth --dataset stl10
    python transfer_student.py --path_s save/models/<run>/<model>_last.pth --dataset synthetic --no_augment

The recipe defaults are the DCD authors' (their cifar/transfer_student.py): SGD, momentum 0.9,
weight decay 5e-4, lr 0.05 (0.01 for MobileNetV2/ShuffleV1/ShuffleV2), x0.1 at epochs 30, 60, 90,
120 epochs, batch 64, the data set's training augmentation (RandomCrop(32, 4) + flip), the
classifier initialised from N(0, 0.01^2) with zero bias (``--probe_init pytorch``: PyTorch's
default init instead); the last epoch is the result. Unlike their code the backbone is frozen for
real (eval mode, its BatchNorm statistics never updated); ``--probe_bn train`` reproduces theirs
(backbone BatchNorm in train mode, its running statistics drift; still only the classifier is
trained).

The run folder is ``<save_folder>/<source run>_<dataset>_probe_trial_<trial>/`` (results.json,
args.json and the classifier's ``probe_last.pth``).
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import load_checkpoint, save_checkpoint
from common.declare import add_option_groups, option, options_from
from common.distributed import say
from common.errors import UserError, exit_on_user_error
from common.runtime import Runtime
from dataset import DATASETS, DataNeeds, DataOptions, get_dataloaders
from dataset.skipping import sample_images
from dataset.views import network_view as probe_view
from distiller_zoo.heads import network_with_head
from engine.logger import RunLog, run_summary
from engine.methods import get_method, method_names
from engine.options import Parser, add_training_args, finalize_training_args, with_print_config
from engine.probe import (PROBE_INITS, CachedBatches, FeatureSet, LiveBatches, PassTimer, extract, linear_head,
                          one_thread, plain_train_loader, pooled, train_probe)
from engine.resume import claim_run_folder
from engine.script import run_script
from models import default_learning_rate, in_channels_of
from models.teacher import load_backbone, prepare_teacher

PROBE_FILE = "probe_last.pth"
# GPU batch of the one-off feature pass of --no_augment (eval mode: any batch gives the same features);
# a CPU uses the probe's own, which is faster there (resnet8x4: 580 images/s at 64, 330 at 256)
FEATURE_BATCH = 256


@dataclass
class ProbeOptions:
    """the linear probe"""

    path_s: str = option("", "the frozen network: a checkpoint of train_teacher.py, train_student.py or RepDistiller")
    probe_bn: str = option("eval", "eval: the backbone's BatchNorm uses its saved statistics and never changes; "
                           "train: BatchNorm in train mode as in the DCD code (batch statistics, running "
                           "statistics drift); only the classifier trains either way", choices=("eval", "train"))
    no_augment: bool = option(False, "no training augmentation: the features are computed once and the classifier "
                              "trains on the cached tensors (one forward pass plus seconds)")
    probe_init: str = option("normal", "the classifier's initial weights: normal: N(0, 0.01^2) weights and zero bias "
                             "(the DCD recipe); pytorch: PyTorch's default nn.Linear init (uniform in "
                             "+-1/sqrt(features), bias too)", choices=PROBE_INITS)
    plain_backbone: bool = option(False, "run the backbone as saved (no BatchNorm folding, no channels_last)")
    view: str | None = option(None, "what the network sees of the target images (rgb, gray, L, ab, paired:<folder>); "
                              "default: the view its checkpoint records (rgb for one that records none)")


def build_parser() -> Parser:
    parser = Parser(description="Linear probe of a frozen network's features on a target data set.")
    add_training_args(parser)
    parser.set_defaults(epochs=120, lr_decay_epochs="30,60,90", save_folder="./save/transfer")
    add_option_groups(parser, [ProbeOptions])
    for action in parser._actions:
        if action.dest == "dataset":
            action.choices = DATASETS  # unknown names: argparse's one line
    parser.add_argument("-t", "--trial", type=int, default=0, help="the experiment id")
    return parser


def parse_option(argv: list[str] | None = None):
    opt = build_parser().parse_args(argv)
    if not opt.path_s:
        raise UserError("--path_s is required: the checkpoint to probe, e.g. save/student_model/<run>/<model>_last.pth")
    if opt.resume:
        raise UserError("transfer_student.py does not resume (a probe is short): start it again with --overwrite")
    if opt.no_augment and opt.probe_bn == "train":
        raise UserError("--probe_bn train updates BatchNorm on every batch, so its features cannot be cached: "
                        "drop --no_augment (or use --probe_bn eval)")
    lr_given = opt.learning_rate is not None
    finalize_training_args(opt, "")
    opt.lr_given = lr_given
    path = Path(opt.path_s)
    opt.source_run = source_run_name(path)
    opt.model_name = f"{opt.source_run}_{opt.dataset}_probe_trial_{opt.trial}"
    opt.save_path = str(Path(opt.save_folder) / opt.model_name)
    return opt


def source_run_name(path: Path) -> str:
    """The probed run's name: its run folder's (a folder with results.json, or RepDistiller's
    ``<model>_vanilla`` / ``S:..._T:...`` folder), with the file's stem unless the file is the run's
    last checkpoint; a loose file's stem otherwise."""
    folder = path.parent
    is_run = (folder / "results.json").is_file() or re.match(r"^(S:.+_T:.+|.+_vanilla)$", folder.name)
    if not is_run:
        return path.stem
    last = path.name == "last.pth" or path.name.endswith("_last.pth")
    return folder.name if last else f"{folder.name}_{path.stem}"


REPDISTILLER_STUDENT = re.compile(r"^S:(?P<model>.+?)_T:(?P<model_t>.+?)_(?P<dataset>[^_]+)_(?P<method>[^_]+)"
                                  r"_r:(?P<gamma>[^_]+)_a:(?P<alpha>[^_]+)_b:(?P<beta>[^_]+)_(?P<trial>.+)$")


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def describe_source(path: Path, arch: str, facts: dict[str, Any]) -> dict[str, Any]:
    """What the probed network is: its run's role, method, label, model, model_t, trial, data set
    and loss weights, from the run folder's results.json when there is one, else from the
    checkpoint (``facts``) and a RepDistiller folder name."""
    source: dict[str, Any] = {"path": str(path), "run": source_run_name(path), "model": arch, "model_t": None,
                              "dataset": facts.get("dataset"), "epoch": facts.get("epoch"),
                              "num_classes": facts.get("num_classes")}
    results = path.parent / "results.json"
    recorded = None
    if results.is_file():
        try:
            recorded = json.loads(results.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = None
    if isinstance(recorded, dict):
        for key in ("role", "method", "label", "model_t", "trial", "dataset", "weights", "last_acc", "best_acc"):
            if recorded.get(key) is not None:
                source[key] = recorded[key]
        return source
    match = REPDISTILLER_STUDENT.match(path.parent.name)
    if facts.get("distill") or match:
        method = str(facts.get("distill") or match["method"])
        alpha = _float(match["alpha"]) if match else None
        source.update(role="student", method=method, model_t=facts.get("model_t") or (match and match["model_t"]),
                      label=get_method(method).run_label(alpha) if method in method_names() else method)
        if match:
            source.update(trial=match["trial"], dataset=source["dataset"] or match["dataset"],
                          weights={"gamma": _float(match["gamma"]), "alpha": alpha, "beta": _float(match["beta"])})
    else:
        source.update(role="teacher", method="vanilla", label="vanilla")
    return source


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_script(with_print_config(parse_option, build_parser), probe, argv)


def probe(opt, runtime: Runtime) -> dict:
    """Load the frozen network, build the target set's loaders, train and evaluate the linear probe."""
    if runtime.dist.enabled:
        raise UserError("transfer_student.py runs in one process: launch it with python, not torchrun")
    path = Path(opt.path_s)
    state = load_checkpoint(str(path))
    backbone, arch, facts = load_backbone(str(path), state=state)
    # a method's inference head (SimKD): the representation is what the head's classifier reads
    backbone = network_with_head(backbone, state, f"'{path}'")
    if not opt.lr_given:
        opt.learning_rate = default_learning_rate(arch)
    source = describe_source(path, arch, facts)
    view = probe_view(opt.view, backbone.input_view, path)
    data = get_dataloaders(options_from(DataOptions, opt), DataNeeds(views=(view,)), device=runtime.device)
    if in_channels_of(backbone) != data.layout.channels(view):
        raise UserError(f"the network in '{path}' takes {in_channels_of(backbone)} input channels, but view {view} "
                        f"has {data.layout.channels(view)}: give the view it was trained on with --view")
    bn_train = opt.probe_bn == "train"
    fast = not (opt.plain_backbone or bn_train)  # folded BatchNorm cannot go back to train mode
    sample = runtime.to_device(sample_images(data.val_loader.dataset))
    prepare_teacher(backbone, runtime, sample, fast=fast)
    with torch.inference_mode():
        feat_dim = pooled(backbone, sample).shape[1]
    classifier = runtime.place(linear_head(feat_dim, data.num_classes, opt.probe_init))
    augment = not opt.no_augment
    recipe = {"learning_rate": opt.learning_rate, "momentum": opt.momentum, "weight_decay": opt.weight_decay,
              "epochs": opt.epochs, "lr_schedule": opt.lr_schedule, "lr_decay_epochs": opt.lr_decay_epochs,
              "lr_decay_rate": opt.lr_decay_rate, "batch_size": opt.batch_size, "augment": augment,
              "probe_bn": opt.probe_bn, "probe_init": opt.probe_init, "backbone_fast_path": fast, "feat_dim": feat_dim,
              "view": view}
    extra = run_summary(opt, role="transfer", method=source.get("method", "vanilla"), model=arch,
                        model_t=source.get("model_t"), source=source, target=opt.dataset, recipe=recipe,
                        num_classes=data.num_classes, n_data=data.n_data)
    extra["label"] = source.get("label", "vanilla")
    try:
        claim_run_folder(opt.save_path, resume=None, overwrite=opt.overwrite)
    except UserError as err:  # a probe does not resume: only --overwrite or another --trial/--save_folder
        raise UserError(str(err).replace("continue it with --resume auto, ", "")) from None
    run = RunLog(Path(opt.save_path), opt, extra=extra, active=runtime.dist.is_main)
    say(f"probing {arch} ({path}) on {opt.dataset} ({data.n_data} images, {data.num_classes} classes, "
        f"{feat_dim} features) on {runtime.describe()}; {'augmented' if augment else 'cached features'}, "
        f"backbone BatchNorm {opt.probe_bn}; run folder {opt.save_path}")
    timer = PassTimer()
    start = time.perf_counter()
    if augment:
        batches = LiveBatches(backbone, data.train_loader, runtime, bn_train, timer)
    else:
        feature_batch = opt.batch_size if runtime.device.type == "cpu" else max(FEATURE_BATCH, opt.batch_size)
        cached = extract(backbone, plain_train_loader(data, feature_batch), runtime, timer)
        drop_last = len(cached.labels) > 1 and len(cached.labels) % opt.batch_size == 1
        batches = CachedBatches(cached, opt.batch_size, seed=opt.seed, drop_last=drop_last)
    test_timer = PassTimer()
    if bn_train:  # the drifting statistics change the test features every epoch
        def test() -> FeatureSet:
            return extract(backbone, data.val_loader, runtime, test_timer)
    else:
        test = extract(backbone, data.val_loader, runtime, test_timer)
    with one_thread(runtime if not augment and not bn_train else None):
        results = train_probe(classifier, batches, test, opt, epochs=opt.epochs, run=run, max_steps=opt.max_steps)
    wall = time.perf_counter() - start
    save_checkpoint({"classifier": classifier.state_dict(), "feat_dim": feat_dim, "num_classes": data.num_classes,
                     "arch": arch, "source": str(path), "dataset": opt.dataset, "epoch": results["epochs_done"],
                     "accuracy": results["last_acc"]}, Path(opt.save_path) / PROBE_FILE)
    summary = {k: v for k, v in results.items() if k != "history"}
    summary.update(probe_time_s=round(wall, 3), feature_images_per_s=timer.rate(),
                   feature_images=timer.images, test_feature_images_per_s=test_timer.rate(),
                   best_is="best epoch's test top-1 (reported: last_acc)")
    out = run.save(status="finished", **summary)
    run.close()
    rate = timer.rate()
    say(f"last top-1 {results['last_acc']:.2f}  best top-1 {results['best_acc']:.2f} (epoch {results['best_epoch']})  "
        f"({wall:.1f} s; feature pass {rate or 0:.0f} images/s)")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
