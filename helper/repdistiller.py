"""RepDistiller's ``train_distill`` (``helper/loops.py``) and ``init`` (``helper/pretrain.py``), for
forks of RepDistiller's ``train_student.py``: its ``main()`` builds ``module_list`` and
``criterion_list`` from RepDistiller's classes (which this library exports under the same names)
and calls these two with RepDistiller's signatures. They are re-exported as
``helper.loops.train_distill`` and ``helper.pretrain.init``.

This library's own scripts do not use this module: there a method is a Distiller
(``distiller_zoo.build_distiller``) and the loop never names one. Here, as in RepDistiller, the
method's modules are found by their position and ``opt.distill`` picks the branch:

- ``module_list``: ``[student, <the method's modules>, teacher]`` in RepDistiller's order (hint:
  the ConvReg; crd: ``embed_s``, ``embed_t``; correlation: two LinearEmbeds; abound: the Connector;
  factor: the Translator, then the Paraphraser);
- ``criterion_list``: ``[criterion_cls, criterion_div, criterion_kd]`` (vid: a ModuleList of
  VIDLosses; crd: ``CRDLoss(opt)``, called on the pooled features);
- batches: ``(input, target, index)``, or ``(input, target, index, contrast_idx)`` for crd;
- ``opt``: ``distill``, ``gamma``, ``alpha``, ``beta``, ``hint_layer``; ``init`` also reads
  ``model_s``, ``learning_rate``, ``momentum``, ``weight_decay``, ``init_epochs``.

The epochs run on this library's epoch loop (:func:`engine.epoch.train_one_epoch`) on the
student's device, so a non-finite loss stops with ``engine.guards.NonFiniteLoss``. The branches
are those of RepDistiller's current ``train_student.py`` (``--distill`` choices below); its
older ``contrast`` branch (``CRDLoss(opt, n_data)`` with separate embeds) is not provided.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from engine.epoch import EpochContext, evaluate, train_one_epoch

# opt.distill values of RepDistiller's train_distill, and those its init pre-trains
DISTILL_METHODS = ("kd", "hint", "crd", "attention", "nst", "similarity", "rkd", "pkt", "kdsvd", "correlation",
                   "vid", "abound", "fsp", "factor")
INIT_METHODS = ("abound", "factor", "fsp")
# students whose factor init stage RepDistiller runs at a learning rate of 0.01
FACTOR_INIT_LR_001 = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                      "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")


class _Modes(nn.Module):
    """What the epoch loop puts in training mode: ``train()`` calls ``set_modes`` (RepDistiller's
    mode settings) instead of switching every module."""

    def __init__(self, set_modes: Callable[[], None]) -> None:
        super().__init__()
        self._set_modes = set_modes

    def train(self, mode: bool = True) -> "_Modes":
        self._set_modes()
        return self




def _batch(data: tuple, device: torch.device, distill: str) -> tuple[torch.Tensor, ...]:
    """``(input, target, index, contrast_idx)`` on ``device`` (index and contrast_idx None when absent)."""
    items = [t.to(device, non_blocking=True) for t in data]
    items += [None] * (4 - len(items))
    if distill == "crd" and items[2] is None:
        raise ValueError("opt.distill 'crd' needs batches (input, target, index, contrast_idx), as "
                         "dataset.cifar100.get_cifar100_dataloaders_sample gives")
    return items[0].float(), items[1], items[2], items[3]


def _method_loss(opt, feat_s: list[torch.Tensor], feat_t: list[torch.Tensor], module_list: nn.ModuleList,
                 criterion_kd: Any, index: torch.Tensor | None, contrast_idx: torch.Tensor | None):
    """RepDistiller's ``loss_kd`` of ``opt.distill``, or None where it is 0 (kd, abound, fsp)."""
    distill = opt.distill
    if distill in ("kd", "abound", "fsp"):
        return None
    if distill == "hint":
        return criterion_kd(module_list[1](feat_s[opt.hint_layer]), feat_t[opt.hint_layer])
    if distill == "crd":
        return criterion_kd(feat_s[-1], feat_t[-1], index, contrast_idx)
    if distill in ("attention", "nst", "kdsvd"):
        return sum(criterion_kd(feat_s[1:-1], feat_t[1:-1]))
    if distill == "similarity":
        return sum(criterion_kd([feat_s[-2]], [feat_t[-2]]))
    if distill in ("rkd", "pkt"):
        return criterion_kd(feat_s[-1], feat_t[-1])
    if distill == "correlation":
        return criterion_kd(module_list[1](feat_s[-1]), module_list[2](feat_t[-1]))
    if distill == "vid":
        return sum(vid(f_s, f_t) for f_s, f_t, vid in zip(feat_s[1:-1], feat_t[1:-1], criterion_kd))
    if distill == "factor":
        return criterion_kd(module_list[1](feat_s[-2]), module_list[2](feat_t[-2], is_factor=True))
    raise ValueError(f"unknown opt.distill {distill!r}; RepDistiller's are {', '.join(DISTILL_METHODS)}")


def train_distill(epoch: int, train_loader, module_list: nn.ModuleList, criterion_list: nn.ModuleList,
                  optimizer: torch.optim.Optimizer, opt) -> tuple[float, float]:
    """One epoch of distillation, as RepDistiller's ``train_distill``: every module of
    ``module_list`` in training mode but the teacher (``module_list[-1]``), abound's Connector
    (``[1]``) and factor's Paraphraser (``[2]``); the teacher runs without gradient (pre-activations
    for abound); each step minimises ``opt.gamma * CE + opt.alpha * KL + opt.beta * loss_kd`` with
    ``criterion_list`` and ``optimizer``. The learning rate is left as it is (the script calls
    ``adjust_learning_rate`` first). Returns ``(top1, loss)``, each averaged over the samples."""
    distill = opt.distill
    if distill not in DISTILL_METHODS:
        raise ValueError(f"train_distill has no opt.distill {distill!r} (RepDistiller's are "
                         f"{', '.join(DISTILL_METHODS)}); other methods train with train_student.py --distill <method>")
    model_s, model_t = module_list[0], module_list[-1]
    criterion_cls, criterion_div, criterion_kd = criterion_list[0], criterion_list[1], criterion_list[2]
    device = _device_of(model_s)
    preact = distill == "abound"

    def set_modes() -> None:
        for module in module_list:
            module.train()
        model_t.eval()
        if distill == "abound":
            module_list[1].eval()
        elif distill == "factor":
            module_list[2].eval()

    def step(data: tuple) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        image, target, index, contrast_idx = _batch(data, device, distill)
        feat_s, logit_s, feat_t, logit_t = _forward(model_s, model_t, image, preact)
        terms = {"ce": opt.gamma * criterion_cls(logit_s, target), "kd": opt.alpha * criterion_div(logit_s, logit_t)}
        loss_kd = _method_loss(opt, feat_s, feat_t, module_list, criterion_kd, index, contrast_idx)
        if loss_kd is not None:
            terms[distill] = opt.beta * loss_kd
        return logit_s, target, terms

    ctx = EpochContext(_Modes(set_modes), step, optimizer, print_freq=getattr(opt, "print_freq", 0) or 0)
    stats = train_one_epoch(ctx, epoch, train_loader)
    return stats["train_acc"], stats["train_loss"]


def _forward(model_s: nn.Module, model_t: nn.Module, image: torch.Tensor, preact: bool) -> tuple:
    """``(feat_s, logit_s, feat_t, logit_t)``: the student's forward, and the teacher's without
    gradients (its features detached), as RepDistiller's loops run them."""
    feat_s, logit_s = model_s(image, is_feat=True, preact=preact)
    with torch.no_grad():
        feat_t, logit_t = model_t(image, is_feat=True, preact=preact)
        feat_t = [f.detach() for f in feat_t]
    return feat_s, logit_s, feat_t, logit_t


def init(model_s: nn.Module, model_t: nn.Module, init_modules: nn.ModuleList, criterion: nn.Module, train_loader,
         logger, opt) -> None:
    """RepDistiller's init stage (``helper/pretrain.py``) of abound, factor and fsp: ``opt.init_epochs``
    epochs of SGD (``opt.momentum``, ``opt.weight_decay``; learning rate ``opt.learning_rate``, or 0.01
    for factor with a ResNet or WRN student) on ``init_modules``, with both networks in eval mode
    but ``init_modules``:

    - abound: ``sum(criterion(init_modules[0](feat_s[1:-1]), feat_t[1:-1]))`` on pre-activations;
    - factor: ``criterion(reconstruction, feat_t[-2])``, the reconstruction of ``init_modules[0]``;
    - fsp: ``sum(criterion(feat_s[:-1], feat_t[:-1]))``.

    The networks and ``init_modules`` are moved to CUDA when available (as RepDistiller does), else
    to the student's device. Each epoch's mean loss goes to ``logger.log_value('init_train_loss',
    loss, epoch)`` (``logger`` None: not logged)."""
    distill = opt.distill
    if distill not in INIT_METHODS:
        raise ValueError(f"init has no init stage for opt.distill {distill!r} (RepDistiller's are "
                         f"{', '.join(INIT_METHODS)})")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
    else:
        device = _device_of(model_s)
    for module in (model_s, model_t, init_modules):
        module.to(device)
    lr = 0.01 if distill == "factor" and opt.model_s in FACTOR_INIT_LR_001 else opt.learning_rate
    optimizer = torch.optim.SGD(init_modules.parameters(), lr=lr, momentum=opt.momentum,
                                weight_decay=opt.weight_decay)
    preact = distill == "abound"

    def set_modes() -> None:
        model_t.eval()
        model_s.eval()
        init_modules.train()

    def step(data: tuple) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        image, target, _, _ = _batch(data, device, distill)
        feat_s, logit_s, feat_t, _ = _forward(model_s, model_t, image, preact)
        if distill == "abound":
            loss = sum(criterion(init_modules[0](feat_s[1:-1]), feat_t[1:-1]))
        elif distill == "factor":
            _, reconstruction = init_modules[0](feat_t[-2])
            loss = criterion(reconstruction, feat_t[-2])
        else:  # fsp
            loss = sum(criterion(feat_s[:-1], feat_t[:-1]))
        return logit_s, target, {"init": loss}

    ctx = EpochContext(_Modes(set_modes), step, optimizer, label="init epoch")
    for epoch in range(1, opt.init_epochs + 1):
        stats = train_one_epoch(ctx, epoch, train_loader)
        if logger is not None:
            logger.log_value("init_train_loss", stats["train_loss"], epoch)


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer), else the CPU."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def validate(*args: Any, **kwargs: Any) -> dict[str, float] | tuple[float, float, float]:
    """Test a model; two call forms, told apart by the first argument:

    - ``validate(model, loader, device, runtime=None)``: this library's, :func:`evaluate`'s dict
      (``test_acc``, ``test_acc_top5``, ``test_loss``);
    - ``validate(val_loader, model, criterion, opt)``: RepDistiller's (``helper/loops.py``), for code
      written for it: ``(top1, top5, loss)`` as floats, the accuracies in percent and the loss the
      size-weighted mean of ``criterion(logits, target)`` over the batches, on the model's device
      (``opt`` is accepted and not used: RepDistiller reads only its ``print_freq``).
    """
    repdistiller = "val_loader" in kwargs or "criterion" in kwargs or (args and not isinstance(args[0], nn.Module))
    if not repdistiller:
        return evaluate(*args, **kwargs)
    return _validate_repdistiller(*args, **kwargs)


def _validate_repdistiller(val_loader, model: nn.Module, criterion, opt=None) -> tuple[float, float, float]:
    stats = evaluate(model, val_loader, _device_of(model), criterion=criterion)
    return stats["test_acc"], stats["test_acc_top5"], stats["test_loss"]


def train_vanilla(epoch: int, train_loader, model: nn.Module, criterion, optimizer: torch.optim.Optimizer,
                  opt=None) -> tuple[float, float]:
    """RepDistiller's ``train_vanilla`` (``helper/loops.py``), on this library's epoch loop
    (:func:`train_one_epoch`): one pass over ``train_loader`` (batches ``(img, target, ...)``)
    training ``model`` with ``criterion(logits, target)`` and ``optimizer`` on the model's device;
    a non-finite loss stops with :class:`NonFiniteLoss`. The learning rate is left as it is (call
    ``adjust_learning_rate`` first, as RepDistiller's scripts do); ``opt`` is accepted and not used.

    Returns ``(top1, loss)``: the training top-1 (%) and loss, each averaged over the samples."""
    device = _device_of(model)

    def step(batch: tuple) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        images, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        logits = model(images)
        return logits, target, {"loss": criterion(logits, target)}

    stats = train_one_epoch(EpochContext(model, step, optimizer), epoch, train_loader)
    return stats["train_acc"], stats["train_loss"]
