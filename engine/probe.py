"""The linear probe's parts: a frozen backbone's pooled features as data sources (computed once
and cached, or per batch with the training augmentation) and the training of a linear head on
them by the engine's epoch code (:func:`engine.epoch.train_one_epoch` and
:func:`engine.epoch.evaluate`). ``transfer_student.py`` is the script around them."""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.distributed import EpochSampler, ShardSampler
from common.errors import UserError
from common.runtime import Runtime
from dataset.loaders import DataBundle, IndexedDataset
from dataset.skipping import SkippingLoader, SkipUnreadable
from dataset.tensor_loader import TensorLoader
from engine.epoch import EpochContext, evaluate, train_one_epoch
from engine.guards import StepBudget
from engine.logger import RunLog, is_interactive, is_terminal_output
from engine.optim import build_optimizer, lr_at_epoch, set_lr

# Without a terminal (a log file), the probe prints the line of its first epoch, of every tenth and of its last.
PRINT_EVERY_EPOCHS = 10
# Largest batch of cached test features per forward pass (a power of two: see FeatureSet.batches).
TEST_BATCH = 1024
# The DCD recipe's initial classifier: weights from N(0, PROBE_INIT_STD^2), zero bias.
PROBE_INIT_STD = 0.01
PROBE_INITS = ("normal", "pytorch")


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


def percent_exact(n: int) -> bool:
    """Whether the loop's top-k percent of a batch of ``n`` (float32 ``count * (100 / n)``, times
    ``n`` again when summed) gives back the count exactly: ``n``'s odd part divides 25."""
    return 25 % (n // (n & -n)) == 0


@dataclass
class FeatureSet:
    """Cached features ``[N, D]`` and labels ``[N]`` (on the run's device)."""

    feats: torch.Tensor
    labels: torch.Tensor

    def batches(self, size: int = TEST_BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``(features, labels)`` batches in order (views): ``size`` (a power of two) at a
        time, the rest in one batch when the loop counts it exactly (:func:`percent_exact`), else
        in power-of-two batches, so that the accuracies :func:`evaluate` sums are exact counts."""
        n = len(self.labels)
        sizes, rest = [size] * (n // size), n % size
        if rest and percent_exact(rest):
            sizes.append(rest)
        elif rest:
            sizes += [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]
        out, start = [], 0
        for step in sizes:
            out.append((self.feats[start:start + step], self.labels[start:start + step]))
            start += step
        return out


class PassTimer:
    """Images and seconds spent in the backbone's forward passes (for images/s)."""

    def __init__(self) -> None:
        self.images, self.seconds = 0, 0.0

    def rate(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    def features(self, backbone: nn.Module, images: torch.Tensor, runtime: Runtime, bn_train: bool) -> torch.Tensor:
        """:func:`frozen_features` of ``images``, timed (the device synchronised)."""
        start = time.perf_counter()
        feats = frozen_features(backbone, images, bn_train)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        self.seconds += time.perf_counter() - start
        self.images += images.shape[0]
        return feats


def extract(backbone: nn.Module, loader, runtime: Runtime, timer: PassTimer) -> FeatureSet:
    """The eval-mode features and labels of every batch of ``loader``, in its order."""
    feats, labels = [], []
    for raw in loader:
        images, target = runtime.to_device(raw[0]), runtime.to_device(raw[1])
        feats.append(timer.features(backbone, images, runtime, bn_train=False))
        labels.append(target)
    if not feats:
        raise UserError("the data set gave no images to compute features from")
    return FeatureSet(torch.cat(feats), torch.cat(labels))


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


# ----------------------------------------------------------------------------- data sources


class CachedBatches:
    """Training mini-batches ``(features, labels)`` of cached features, a data source as a loader
    is: after :meth:`set_epoch`, a permutation from ``(seed, epoch)`` (the training loader's
    :class:`EpochSampler`), cut into batches as the loader cuts it."""

    def __init__(self, cached: FeatureSet, batch_size: int, seed: int, drop_last: bool):
        self.cached, self.batch_size, self.drop_last = cached, batch_size, drop_last
        self.order = EpochSampler(len(cached.labels), seed)

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.cached.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(list(self.order), dtype=torch.long, device=self.cached.labels.device)
        end = len(self) * self.batch_size if self.drop_last else len(order)
        for start in range(0, end, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.cached.feats[index], self.cached.labels[index]


class LiveBatches:
    """Training mini-batches ``(features, labels)`` whose features are computed per batch from
    ``loader``'s images (with its augmentation) by the frozen backbone; :meth:`set_epoch` sets
    the loader's sampler."""

    def __init__(self, backbone: nn.Module, loader, runtime: Runtime, bn_train: bool, timer: PassTimer):
        self.backbone, self.loader, self.runtime, self.bn_train, self.timer = backbone, loader, runtime, bn_train, timer

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for raw in self.loader:
            images, target = self.runtime.to_device(raw[0]), self.runtime.to_device(raw[1])
            yield self.timer.features(self.backbone, images, self.runtime, self.bn_train), target


# ----------------------------------------------------------------------------- the probe


def linear_head(feat_dim: int, num_classes: int, init: str = "normal") -> nn.Linear:
    """The probe's classifier ``z = W f + b`` (``nn.Linear(feat_dim, num_classes)``), initialised
    as the DCD recipe does (``init="normal"``): ``W_ij ~ N(0, 0.01^2)`` (:data:`PROBE_INIT_STD`),
    ``b = 0``; ``init="pytorch"``: PyTorch's default, ``W_ij, b_i ~ U(-1/sqrt(feat_dim),
    1/sqrt(feat_dim))``. The draws come from torch's global generator, which the script seeds with
    ``--seed``."""
    if init not in PROBE_INITS:
        raise UserError(f"--probe_init {init!r} is not one of {', '.join(PROBE_INITS)}")
    head = nn.Linear(feat_dim, num_classes)
    if init == "normal":
        with torch.no_grad():
            head.weight.normal_(0.0, PROBE_INIT_STD)
            head.bias.zero_()
    return head



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


def head_step(head: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The training step of a head on a batch ``(features, labels)``: its logits and term ``ce``."""
    logits = head(batch[0])
    return logits, batch[1], {"ce": F.cross_entropy(logits, batch[1])}


def head_epoch(epoch: int, source, head: nn.Module, optimizer: torch.optim.Optimizer, budget: StepBudget,
               run: RunLog | None = None, tb_freq: int = 0) -> dict[str, float]:
    """One epoch of ``head`` on ``source`` (:meth:`set_epoch`, then its batches) by the training
    loop's epoch code; returns its averages (``train_loss``, ``train_acc``, ...)."""
    source.set_epoch(epoch)
    ctx = EpochContext(head, lambda batch: head_step(head, batch), optimizer, budget, fresh_run=True, run=run,
                       tb_freq=tb_freq)
    return train_one_epoch(ctx, epoch, source)


def train_probe(classifier: nn.Module, batches, test, opt, *, epochs: int, run: RunLog | None = None,
                max_steps: int = 0) -> dict[str, Any]:
    """Train ``classifier`` with SGD and the learning rates of ``opt`` (:func:`lr_at_epoch`) on the
    data source ``batches`` (:class:`CachedBatches` or :class:`LiveBatches`) for epochs
    1..``epochs`` (:func:`head_epoch`), testing it after each epoch on ``test`` (a
    :class:`FeatureSet`, or a callable returning one: the test features when they change, with
    ``--probe_bn train``) by :func:`evaluate`. Returns last/best top-1 and the per-epoch history.

    Every epoch's record goes to ``run``; on a terminal a progress bar shows the epochs, otherwise
    the record's line is printed for the first epoch, every :data:`PRINT_EVERY_EPOCHS`-th and the
    last. Every ``opt.tb_freq`` steps (if set) the step's ``step/loss``, ``step/ce``, ``step/lr``
    and ``step/top1`` go to TensorBoard."""
    optimizer = build_optimizer(classifier.parameters(), opt)
    device = next(classifier.parameters()).device
    budget = StepBudget(max_steps)
    history, best = [], -math.inf
    tb_freq = getattr(opt, "tb_freq", 0)
    bar = tqdm(range(1, epochs + 1), desc="probe", unit="epoch", leave=False, disable=not is_interactive())
    lines = bar.disable or not is_terminal_output()  # the bar shows the progress where the lines would
    for epoch in bar:
        lr = lr_at_epoch(epoch, opt)
        set_lr(optimizer, lr)
        trained = head_epoch(epoch, batches, classifier, optimizer, budget, run, tb_freq)
        tested = evaluate(classifier, (test() if callable(test) else test).batches(), device)
        record = {"epoch": epoch, "lr": lr, "train_loss": trained["train_loss"], "train_acc": trained["train_acc"],
                  **{key: tested[key] for key in ("test_loss", "test_acc", "test_acc_top5")}}
        best = max(best, record["test_acc"])
        history.append(record)
        if run is not None:
            show = epoch in (1, epochs) or epoch % PRINT_EVERY_EPOCHS == 0 or budget.exhausted
            run.epoch(record, show=lines and show)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", test_top1=f"{record['test_acc']:.2f}")
        if budget.exhausted:
            break
    return {"last_acc": history[-1]["test_acc"], "last_acc_top5": history[-1]["test_acc_top5"],
            "best_acc": best, "best_epoch": max(history, key=lambda r: r["test_acc"])["epoch"],
            "epochs_done": len(history), "steps": budget.done, "history": history}
