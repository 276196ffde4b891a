"""Linear-probe transfer: freeze a trained network, train a new linear classifier on its pooled
penultimate features (``feats[-1]``) on a target data set, report the test top-1.

    python transfer_student.py --path_s save/student_model/<run>/<model>_last.pth --dataset stl10
    python transfer_student.py --path_s save/models/<run>/<model>_last.pth --dataset synthetic --no_augment

The recipe defaults are the DCD authors' (their cifar/transfer_student.py): SGD, momentum 0.9,
weight decay 5e-4, lr 0.05 (0.01 for MobileNetV2/ShuffleV1/ShuffleV2), x0.1 at epochs 30, 60, 90,
120 epochs, batch 64, the data set's training augmentation (RandomCrop(32, 4) + flip); the last
epoch is the result. Unlike their code the backbone is frozen for real (eval mode, its BatchNorm
statistics never updated); ``--probe_bn train`` reproduces theirs (backbone BatchNorm in train mode,
its running statistics drift; still only the classifier is trained).

The run folder is ``<save_folder>/<source run>_<dataset>_probe_trial_<trial>/`` (results.json,
args.json and the classifier's ``probe_last.pth``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.checkpoint import save_checkpoint
from common.declare import add_option_groups, option, options_from
from common.distributed import EpochSampler, ShardSampler, say
from common.errors import UserError, exit_on_user_error
from common.runtime import Runtime
from dataset import DATASETS, DataNeeds, DataOptions, get_dataloaders
from dataset.loaders import DataBundle, IndexedDataset
from dataset.skipping import SkippingLoader, SkipUnreadable, sample_images
from dataset.tensor_loader import TensorLoader
from dataset.views import network_view as probe_view
from engine.logger import RunLog, is_interactive, is_terminal_output, run_summary
from engine.optim import build_optimizer, lr_at_epoch, set_lr
from engine.options import Parser, add_training_args, finalize_training_args, with_print_config
from engine.resume import claim_run_folder
from engine.script import run_script
from models import default_learning_rate, in_channels_of
from models.teacher import load_backbone, prepare_teacher

PROBE_FILE = "probe_last.pth"
# GPU batch of the one-off feature pass of --no_augment (eval mode: any batch gives the same features);
# a CPU uses the probe's own, which is faster there (resnet8x4: 580 images/s at 64, 330 at 256)
FEATURE_BATCH = 256
# Without a terminal (a log file), the probe prints the line of its first epoch, of every tenth and of its last.
PRINT_EVERY_EPOCHS = 10


@dataclass
class ProbeOptions:
    """the linear probe"""

    path_s: str = option("", "the frozen network: a checkpoint of train_teacher.py, train_student.py or RepDistiller")
    probe_bn: str = option("eval", "eval: the backbone's BatchNorm uses its saved statistics and never changes; "
                           "train: BatchNorm in train mode as in the DCD code (batch statistics, running "
                           "statistics drift); only the classifier trains either way", choices=("eval", "train"))
    no_augment: bool = option(False, "no training augmentation: the features are computed once and the classifier "
                              "trains on the cached tensors (one forward pass plus seconds)")
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
                      label=f"{method}+kd" if method != "kd" and (alpha or 0) > 0 else method)
        if match:
            source.update(trial=match["trial"], dataset=source["dataset"] or match["dataset"],
                          weights={"gamma": _float(match["gamma"]), "alpha": alpha, "beta": _float(match["beta"])})
    else:
        source.update(role="teacher", method="vanilla", label="vanilla")
    return source


# ----------------------------------------------------------------------------- features


def pooled(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled penultimate features ``feats[-1]`` [B, D]."""
    feats, _ = backbone(images, is_feat=True)
    return feats[-1].flatten(1)


def frozen_features(backbone: nn.Module, images: torch.Tensor, bn_train: bool) -> torch.Tensor:
    """``pooled`` features as an ordinary tensor (usable by autograd), computed without gradients:
    under ``torch.inference_mode`` with the backbone in eval mode, or with its BatchNorm in train
    mode (``bn_train``, the DCD code's: running statistics updated) under ``torch.no_grad``."""
    if bn_train:
        backbone.train()
        with torch.no_grad():
            feats = pooled(backbone, images)
        backbone.eval()
        return feats
    with torch.inference_mode():
        feats = pooled(backbone, images)
    return feats.clone()  # an inference tensor cannot be saved for the classifier's backward


@dataclass
class FeatureSet:
    """Cached features ``[N, D]`` and labels ``[N]`` (on the run's device)."""

    feats: torch.Tensor
    labels: torch.Tensor


class PassTimer:
    """Images and seconds spent in the backbone's forward passes (for images/s)."""

    def __init__(self) -> None:
        self.images, self.seconds = 0, 0.0

    def rate(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None


def extract(backbone: nn.Module, loader, runtime: Runtime, timer: PassTimer) -> FeatureSet:
    """The eval-mode features and labels of every batch of ``loader``, in its order."""
    feats, labels = [], []
    for raw in loader:
        images, target = runtime.to_device(raw[0]), runtime.to_device(raw[1])
        start = time.perf_counter()
        feats.append(frozen_features(backbone, images, bn_train=False))
        _sync(runtime)
        timer.seconds += time.perf_counter() - start
        timer.images += images.shape[0]
        labels.append(target)
    if not feats:
        raise UserError("the data set gave no images to compute features from")
    return FeatureSet(torch.cat(feats), torch.cat(labels))


def _sync(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def plain_train_loader(data: DataBundle, batch_size: int):
    """The training set without augmentation, in its order: the test transform's images."""
    loader = data.train_loader
    if isinstance(loader, TensorLoader):
        return TensorLoader(loader.dataset, batch_size, ShardSampler(len(loader.dataset)))
    view, val_view = loader.dataset, data.val_loader.dataset
    base = copy.copy(view.base)
    if not hasattr(base, "transform") or not hasattr(val_view.base, "transform"):
        raise UserError("--no_augment needs a data set with a test transform; run without it")
    base.transform = val_view.base.transform
    plain = IndexedDataset(base, view.indices)
    return SkippingLoader(plain, batch_size=batch_size, sampler=ShardSampler(len(plain)),
                          num_workers=loader.num_workers, collate_fn=SkipUnreadable())


class CachedBatches:
    """Training mini-batches of cached features: each epoch a permutation from ``(seed, epoch)``
    (the training loader's :class:`EpochSampler`), cut into batches as the loader cuts it."""

    def __init__(self, cached: FeatureSet, batch_size: int, seed: int, drop_last: bool):
        self.cached, self.batch_size, self.drop_last = cached, batch_size, drop_last
        self.order = EpochSampler(len(cached.labels), seed)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.order.set_epoch(epoch)
        order = torch.as_tensor(list(self.order), dtype=torch.long, device=self.cached.labels.device)
        end = (len(order) // self.batch_size) * self.batch_size if self.drop_last else len(order)
        for start in range(0, end, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.cached.feats[index], self.cached.labels[index]


class LiveBatches:
    """Training mini-batches whose features are computed per batch from ``loader``'s images (with
    its augmentation) by the frozen backbone."""

    def __init__(self, backbone: nn.Module, loader, runtime: Runtime, bn_train: bool, timer: PassTimer):
        self.backbone, self.loader, self.runtime, self.bn_train, self.timer = backbone, loader, runtime, bn_train, timer

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for raw in self.loader:
            images, target = self.runtime.to_device(raw[0]), self.runtime.to_device(raw[1])
            start = time.perf_counter()
            feats = frozen_features(self.backbone, images, self.bn_train)
            _sync(self.runtime)
            self.timer.seconds += time.perf_counter() - start
            self.timer.images += images.shape[0]
            yield feats, target


# ----------------------------------------------------------------------------- the probe


@contextlib.contextmanager
def one_thread(runtime: Runtime | None) -> Iterator[None]:
    """Run the block with one torch thread on the CPU (``runtime`` None: unchanged). Training a
    linear layer on cached features is a stream of tiny ops, for which splitting over threads only
    costs synchronisations (ruinous when other processes hold the cores)."""
    before = torch.get_num_threads()
    if runtime is None or runtime.device.type != "cpu" or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)



def evaluate(classifier: nn.Linear, test: FeatureSet, batch_size: int = 1024) -> dict[str, float]:
    """Test loss, top-1 and top-5 (%) of ``classifier`` on cached features."""
    loss, top1, top5 = 0.0, 0, 0
    k = min(5, classifier.out_features)
    with torch.no_grad():
        for start in range(0, len(test.labels), batch_size):
            feats, labels = test.feats[start:start + batch_size], test.labels[start:start + batch_size]
            logits = classifier(feats)
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            best = logits.topk(k, dim=1).indices
            top1 += int((best[:, 0] == labels).sum())
            top5 += int((best == labels[:, None]).any(dim=1).sum())
    n = len(test.labels)
    return {"test_loss": loss / n, "test_acc": 100.0 * top1 / n, "test_acc_top5": 100.0 * top5 / n}


def train_probe(classifier: nn.Linear, batches, test, opt, *, epochs: int, run: RunLog | None = None,
                max_steps: int = 0) -> dict[str, Any]:
    """Train ``classifier`` with SGD and the step schedule of ``opt`` on ``batches.epoch(e)``
    for ``e`` = 1..epochs, evaluating after each epoch on ``test`` (a :class:`FeatureSet`, or a
    callable returning one: the test features when they change, with ``--probe_bn train``).
    Returns last/best top-1 and the per-epoch history.

    Every epoch's record goes to ``run``; on a terminal a progress bar shows the epochs, otherwise
    the record's line is printed for the first epoch, every :data:`PRINT_EVERY_EPOCHS`-th and the
    last. Every ``opt.tb_freq`` steps (if set) the step's ``step/loss``, ``step/lr`` and
    ``step/top1`` go to TensorBoard."""
    optimizer = build_optimizer(classifier.parameters(), opt)
    history, best, steps = [], -math.inf, 0
    tb_freq = getattr(opt, "tb_freq", 0)
    bar = tqdm(range(1, epochs + 1), desc="probe", unit="epoch", leave=False, disable=not is_interactive())
    lines = bar.disable or not is_terminal_output()  # the bar shows the progress where the lines would
    for epoch in bar:
        lr = lr_at_epoch(epoch, opt)
        set_lr(optimizer, lr)
        classifier.train()
        total, seen, correct = 0.0, 0, 0
        for feats, labels in batches.epoch(epoch):
            logits = classifier(feats)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value, right = loss.item(), int((logits.argmax(1) == labels).sum())
            total += value * len(labels)
            seen += len(labels)
            correct += right
            steps += 1
            if run is not None and tb_freq and steps % tb_freq == 0:
                run.step({"loss": value, "lr": lr, "top1": 100.0 * right / len(labels)}, steps)
            if max_steps and steps >= max_steps:
                break
        classifier.eval()
        record = {"epoch": epoch, "lr": lr, "train_loss": total / max(seen, 1),
                  "train_acc": 100.0 * correct / max(seen, 1),
                  **evaluate(classifier, test() if callable(test) else test)}
        best = max(best, record["test_acc"])
        history.append(record)
        stopping = bool(max_steps and steps >= max_steps)
        if run is not None:
            run.epoch(record, show=lines and (epoch in (1, epochs) or epoch % PRINT_EVERY_EPOCHS == 0 or stopping))
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", test_top1=f"{record['test_acc']:.2f}")
        if stopping:
            break
    return {"last_acc": history[-1]["test_acc"], "last_acc_top5": history[-1]["test_acc_top5"],
            "best_acc": best, "best_epoch": max(history, key=lambda r: r["test_acc"])["epoch"],
            "epochs_done": len(history), "steps": steps, "history": history}


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_script(with_print_config(parse_option, build_parser), probe, argv)


def probe(opt, runtime: Runtime) -> dict:
    """Load the frozen network, build the target set's loaders, train and evaluate the linear probe."""
    if runtime.dist.enabled:
        raise UserError("transfer_student.py runs in one process: launch it with python, not torchrun")
    path = Path(opt.path_s)
    backbone, arch, facts = load_backbone(str(path))
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
    classifier = runtime.place(nn.Linear(feat_dim, data.num_classes))
    augment = not opt.no_augment
    recipe = {"learning_rate": opt.learning_rate, "momentum": opt.momentum, "weight_decay": opt.weight_decay,
              "epochs": opt.epochs, "lr_schedule": opt.lr_schedule, "lr_decay_epochs": opt.lr_decay_epochs,
              "lr_decay_rate": opt.lr_decay_rate, "batch_size": opt.batch_size, "augment": augment,
              "probe_bn": opt.probe_bn, "backbone_fast_path": fast, "feat_dim": feat_dim, "view": view}
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
