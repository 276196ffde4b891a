"""A fork of RepDistiller's ``train_student.py`` runs on this library: its ``main()`` wiring (module
and criterion lists built from RepDistiller's class names, in its order) reproduced below, then
``helper.loops.train_distill`` and ``helper.pretrain.init`` (helper/repdistiller.py) on tiny
synthetic data; the first step's loss and update are checked against this library's Distillers."""
from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.nn as nn

from common.runtime import Runtime
from crd.criterion import CRDLoss
from crd.options import NCEOptions
from dataset import ContrastNeed, DataNeeds, DataOptions, get_dataloaders
from distiller_zoo import (ABLoss, Attention, Correlation, DistillKL, FSP, FactorTransfer, HintLoss, KDSVD, NSTLoss,
                           PKT, RKDLoss, Similarity, VIDLoss, build_distiller)
from distiller_zoo.FitNet import HintOptions
from distiller_zoo.registry import NoOptions
from distiller_zoo.step import DistillStep
from helper.loops import train_distill
from helper.pretrain import init
from models import model_dict
from models.util import Connector, ConvReg, LinearEmbed, Paraphraser, Translator
from tests.tolerance import FP32, FP32_DEEP_GRAD, assert_close

METHODS = ("kd", "hint", "crd", "attention", "nst", "similarity", "rkd", "pkt", "kdsvd", "correlation", "vid",
           "abound", "fsp", "factor")
CLASSES, K = 10, 8


def repdistiller_opt(distill: str, **changes) -> argparse.Namespace:
    """RepDistiller's ``opt`` with its defaults, sized down (feat_dim, nce_k, init_epochs)."""
    opt = argparse.Namespace(print_freq=100, learning_rate=0.05, lr_decay_epochs=[150, 180, 210], lr_decay_rate=0.1,
                             weight_decay=5e-4, momentum=0.9, init_epochs=1, model_s="resnet8", distill=distill,
                             gamma=1.0, alpha=0.5, beta=1.0, kd_T=4.0, feat_dim=16, mode="exact", nce_k=K,
                             nce_t=0.07, nce_m=0.5, hint_layer=2)
    vars(opt).update(changes)
    return opt


def loaders(distill: str, batch_size: int = 10):
    """RepDistiller's batches: (input, target, index), or (..., contrast_idx) for crd; 20 images."""
    data = DataOptions(dataset="synthetic", synthetic_classes=CLASSES, synthetic_train=2, synthetic_test=1,
                       batch_size=batch_size, seed=0)
    needs = DataNeeds(index=True, contrast=ContrastNeed(K, "exact") if distill == "crd" else None)
    bundle = get_dataloaders(data, needs)
    return bundle.train_loader, bundle.n_data


class Logger:
    """A logger with RepDistiller's ``log_value(name, value, step)``, recording the calls."""

    def __init__(self) -> None:
        self.values: list[tuple[str, float, int]] = []

    def log_value(self, name: str, value: float, step: int) -> None:
        self.values.append((name, value, step))


def wire_like_repdistiller(opt, model_s, model_t, train_loader, n_data, logger):
    """RepDistiller's ``train_student.py`` ``main()`` from the probe to the optimizer: returns
    ``(module_list, criterion_list, optimizer, extra)``, ``extra`` naming the method's modules."""
    data = torch.randn(2, 3, 32, 32)
    model_t.eval()
    model_s.eval()
    feat_t, _ = model_t(data, is_feat=True)
    feat_s, _ = model_s(data, is_feat=True)
    module_list, trainable_list = nn.ModuleList([model_s]), nn.ModuleList([model_s])
    extra = {}

    def add(*modules, trainable=True):
        for module in modules:
            module_list.append(module)
            if trainable:
                trainable_list.append(module)

    criterion_cls, criterion_div = nn.CrossEntropyLoss(), DistillKL(opt.kd_T)
    d = opt.distill
    if d == "kd":
        criterion_kd = DistillKL(opt.kd_T)
    elif d == "hint":
        criterion_kd = HintLoss()
        extra["regress"] = ConvReg(feat_s[opt.hint_layer].shape, feat_t[opt.hint_layer].shape)
        add(extra["regress"])
    elif d == "crd":
        opt.s_dim, opt.t_dim, opt.n_data = feat_s[-1].shape[1], feat_t[-1].shape[1], n_data
        criterion_kd = CRDLoss(opt)
        add(criterion_kd.embed_s, criterion_kd.embed_t)
    elif d == "correlation":
        criterion_kd = Correlation()
        add(LinearEmbed(feat_s[-1].shape[1], opt.feat_dim), LinearEmbed(feat_t[-1].shape[1], opt.feat_dim))
    elif d == "vid":
        criterion_kd = nn.ModuleList([VIDLoss(fs.shape[1], ft.shape[1], ft.shape[1])
                                      for fs, ft in zip(feat_s[1:-1], feat_t[1:-1])])
        trainable_list.append(criterion_kd)
    elif d == "abound":
        connector = Connector([f.shape for f in feat_s[1:-1]], [f.shape for f in feat_t[1:-1]])
        criterion_kd = ABLoss(len(feat_s[1:-1]))
        extra["connector"] = connector
        extra["before_init"] = copy.deepcopy(model_s.state_dict())
        init(model_s, model_t, nn.ModuleList([connector, model_s.get_feat_modules()]), criterion_kd, train_loader,
             logger, opt)
        add(connector, trainable=False)
    elif d == "factor":
        paraphraser = Paraphraser(feat_t[-2].shape)
        translator = Translator(feat_s[-2].shape, feat_t[-2].shape)
        extra["paraphraser"] = paraphraser
        extra["before_init"] = copy.deepcopy(paraphraser.state_dict())
        init(model_s, model_t, nn.ModuleList([paraphraser]), nn.MSELoss(), train_loader, logger, opt)
        criterion_kd = FactorTransfer()
        add(translator)
        add(paraphraser, trainable=False)
    elif d == "fsp":
        criterion_kd = FSP([s.shape for s in feat_s[:-1]], [t.shape for t in feat_t[:-1]])
        extra["before_init"] = copy.deepcopy(model_s.state_dict())
        init(model_s, model_t, nn.ModuleList([model_s.get_feat_modules()]), criterion_kd, train_loader, logger, opt)
    else:  # the losses without modules of their own
        criterion_kd = {"attention": Attention, "nst": NSTLoss, "similarity": Similarity, "rkd": RKDLoss,
                        "pkt": PKT, "kdsvd": KDSVD}[d]()
    criterion_list = nn.ModuleList([criterion_cls, criterion_div, criterion_kd])
    optimizer = torch.optim.SGD(trainable_list.parameters(), lr=opt.learning_rate, momentum=opt.momentum,
                                weight_decay=opt.weight_decay)
    module_list.append(model_t)  # after the optimizer, as RepDistiller does
    return module_list, criterion_list, optimizer, extra


def networks(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return model_dict["resnet8"](num_classes=CLASSES), model_dict["resnet14"](num_classes=CLASSES)


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(before[name], value) for name, value in module.state_dict().items())


@pytest.mark.parametrize("distill", METHODS)
def test_a_repdistiller_fork_trains_every_method(distill):
    model_s, model_t = networks()
    train_loader, n_data = loaders(distill)
    opt, logger = repdistiller_opt(distill), Logger()
    teacher_before = copy.deepcopy(model_t.state_dict())
    module_list, criterion_list, optimizer, extra = wire_like_repdistiller(opt, model_s, model_t, train_loader,
                                                                           n_data, logger)
    student_before = copy.deepcopy(model_s.state_dict())

    top1, loss = train_distill(1, train_loader, module_list, criterion_list, optimizer, opt)

    assert isinstance(top1, float) and isinstance(loss, float)
    assert 0.0 <= top1 <= 100.0 and torch.isfinite(torch.tensor(loss)) and loss > 0
    assert changed(student_before, model_s), "the student did not train"
    assert not changed(teacher_before, model_t), "the teacher changed"
    assert not model_t.training and model_s.training
    if distill in ("abound", "factor", "fsp"):  # the init stage ran, logged and trained its modules
        assert [(name, step) for name, _, step in logger.values] == [("init_train_loss", 1)]
        assert torch.isfinite(torch.tensor(logger.values[0][1]))
        assert changed(extra["before_init"], extra.get("paraphraser", model_s))
    else:
        assert logger.values == []
    if distill == "factor":  # the paraphraser is frozen in eval mode in the main stage
        assert module_list[2] is extra["paraphraser"] and not extra["paraphraser"].training
    if distill == "abound":  # so is the connector
        assert not extra["connector"].training


def our_distiller(distill: str, opt, model_s, model_t, n_data, module_list, criterion_list):
    """This library's Distiller of ``distill`` with the fork's module weights."""
    options = {"kd": NoOptions(), "attention": NoOptions(), "hint": HintOptions(hint_layer=opt.hint_layer),
               "crd": NCEOptions(feat_dim=opt.feat_dim, nce_k=opt.nce_k, nce_t=opt.nce_t, nce_m=opt.nce_m)}[distill]
    distiller = build_distiller(distill, options, model_s, model_t, torch.randn(2, 3, 32, 32), n_data=n_data)
    if distill == "hint":
        distiller.conv_reg.load_state_dict(module_list[1].state_dict())
    elif distill == "crd":
        distiller.criterion.load_state_dict(criterion_list[2].state_dict())
    return distiller


@pytest.mark.parametrize("distill", ["kd", "hint", "crd", "attention"])
def test_the_forks_first_step_is_our_distillers(distill):
    """On one batch and equal weights: train_distill's loss is DistillStep's, and its SGD step
    moves the student to the same weights."""
    model_s, model_t = networks(1)
    train_loader, n_data = loaders(distill)
    batch = next(iter(train_loader))
    opt = repdistiller_opt(distill, beta={"kd": 0.0, "hint": 100.0, "crd": 0.8, "attention": 1000.0}[distill])
    module_list, criterion_list, optimizer, _ = wire_like_repdistiller(opt, model_s, model_t, train_loader, n_data,
                                                                       Logger())
    ours_s = copy.deepcopy(model_s)
    distiller = our_distiller(distill, opt, ours_s, model_t, n_data, module_list, criterion_list)
    step = DistillStep(ours_s, [model_t], nn.ModuleList([distiller]), (opt.gamma, opt.alpha, opt.beta), opt.kd_T,
                       Runtime(torch.device("cpu")))
    ours_optimizer = torch.optim.SGD([*ours_s.parameters(), *distiller.trainable_parameters()], lr=opt.learning_rate,
                                     momentum=opt.momentum, weight_decay=opt.weight_decay)

    _, loss = train_distill(1, [batch], module_list, criterion_list, optimizer, opt)

    step.train()
    _, _, terms = step(batch)
    expected = sum(terms.values())
    assert set(terms) == {"ce", "kd"} | ({distill} if distill != "kd" else set())
    assert_close(loss, expected.item(), rtol=FP32)  # the same ops on the same weights; only the sums' order differs
    ours_optimizer.zero_grad()
    expected.backward()
    ours_optimizer.step()
    for (name, got), want in zip(model_s.named_parameters(), ours_s.parameters()):
        # the update is lr * gradient: compared at the size of the weights it moved
        assert_close(got.detach(), want.detach(), rtol=FP32_DEEP_GRAD, msg=name)


def test_init_pretrains_factors_paraphraser_at_repdistillers_rate():
    """helper.pretrain.init on one batch: the paraphraser takes one SGD step on the teacher map's
    reconstruction MSE at 0.01 (RepDistiller's rate for ResNet students), and the logged loss is that MSE."""
    model_s, model_t = networks(2)
    train_loader, _ = loaders("factor")
    batch = next(iter(train_loader))
    opt, logger = repdistiller_opt("factor", learning_rate=0.05), Logger()
    model_t.eval()
    with torch.no_grad():
        f_t = model_t(batch[0], is_feat=True)[0][-2]
    paraphraser = Paraphraser(f_t.shape)
    reference = copy.deepcopy(paraphraser)
    student_before = copy.deepcopy(model_s.state_dict())

    init(model_s, model_t, nn.ModuleList([paraphraser]), nn.MSELoss(), [batch], logger, opt)

    loss = nn.functional.mse_loss(reference(f_t)[1], f_t)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=opt.momentum, weight_decay=opt.weight_decay)
    loss.backward()
    sgd.step()
    assert [(name, step) for name, _, step in logger.values] == [("init_train_loss", 1)]
    assert_close(logger.values[0][1], loss.item(), rtol=FP32)
    for (name, got), want in zip(paraphraser.named_parameters(), reference.parameters()):
        assert_close(got.detach(), want.detach(), rtol=FP32_DEEP_GRAD, msg=name)
    assert not changed(student_before, model_s)  # the student is not an init module of factor


def test_unsupported_branches_are_refused_clearly():
    model_s, model_t = networks()
    lists = (nn.ModuleList([model_s, model_t]), nn.ModuleList([nn.CrossEntropyLoss(), DistillKL(4), DistillKL(4)]))
    optimizer = torch.optim.SGD(model_s.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'dkd'.*train_student.py --distill"):
        train_distill(1, [], *lists, optimizer, repdistiller_opt("dkd"))
    with pytest.raises(ValueError, match="no init stage for opt.distill 'hint'"):
        init(model_s, model_t, nn.ModuleList(), nn.MSELoss(), [], None, repdistiller_opt("hint"))
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))  # crd without index and contrast_idx
    with pytest.raises(ValueError, match="crd.*index"):
        train_distill(1, [batch], *lists, optimizer, repdistiller_opt("crd"))
