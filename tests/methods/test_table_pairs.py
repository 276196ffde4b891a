"""Issue 24's methods on every pair of the published tables (and the ImageNet pairs).

Every method of :data:`NEW_METHODS` is built the way ``train_student.py`` builds it (its flags
parsed by ``train_student.parse_option``, its published ``-r -a -b``, ``build_distiller``) on
every CIFAR-100 pair of ``scripts/paper_tables.md`` (read by ``scripts/summarize.py``'s parser,
so the list cannot drift from the tables) and on the two ImageNet pairs, then trained for 2
steps of :class:`distiller_zoo.step.DistillStep` (the step the script runs) with the script's
optimiser, on images of the synthetic set (one per class, normalised as CIFAR-100's). A pair a method cannot serve must be refused at build
time with one :class:`UserError` line: :data:`REFUSED` lists those refusals, so a new refusal (or
a refusal that disappears) fails. :data:`TOO_COSTLY` lists the (method, pair) whose 2 steps do
not fit the suite's CPU budget: there only the build is checked (on the meta device), the steps
run with ``REPDISTILL_COSTLY_PAIRS=1``.

End to end: one 2-step ``train_student.main`` run per method on the synthetic set (plus each
method's extra flag variants, :data:`E2E_VARIANTS`), and ``--max_steps 2`` runs on a tiny
generated ImageNet folder (224 x 224 crops) for the methods of :data:`IMAGENET_E2E` (one per
pair: a queue, a borrowed classifier; the unit-level steps run every method on both ImageNet
pairs, at 64 x 64).

Cost (one core): the unit-level steps ~40 s, the end-to-end runs ~10 s; they replace the per-method
files' every-pair tests (3 pairs each, numeric: run twice by ``make test``) and one-step runs.
This file is not marked numeric: it checks that training runs, not values against a reference.

A new method is one word in :data:`NEW_METHODS`; its specific checks,
if any, go in :data:`CHECKS`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn

import train_student
from common.declare import options_from
from common.errors import UserError
from common.runtime import Runtime
from dataset.cifar100 import CIFAR100_MEAN, CIFAR100_STD
from dataset.synthetic import make_synthetic
from distiller_zoo.registry import Batch, BuildContext, Distiller, NetOutput
from distiller_zoo.step import DistillStep
from engine.methods import get_method
from engine.optim import build_optimizer
from models import build_model, get_classifier, resolve_model_name
from tests.datagen import SYNTHETIC, write_fake_imagenet

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import summarize  # noqa: E402

# The methods issue 24 adds; ofd and simkd join with one word each.
NEW_METHODS = ("ickd", "srrl", "itrd", "ega", "rrd", "semckd", "reviewkd", "ofd", "simkd", "dist")

TABLE_PAIRS = summarize.parse_paper_tables((ROOT / "scripts" / "paper_tables.md").read_text()).pairs
IMAGENET_PAIRS = ["ResNet34->ResNet18", "ResNet50->MobileNetV1"]

# (method, pair) -> a pattern of its one-line refusal. Today every method serves every pair.
REFUSED: dict[tuple[str, str], str] = {}

# (method, pair) -> why its 2 steps are left to REPDISTILL_COSTLY_PAIRS=1 (the build is still checked).
_SEMCKD_WIDE = ("SemCKD projects every student stage to every teacher stage through a 3x3 conv of 2 C_t channels: "
                "a 2048-channel stage makes ~850M parameters (~45 s a step and 11 GB on one core)")
_SEMCKD_VGG = ("SemCKD's 3x3 projections from the student's 4 stages to VGG13's 4 (512 channels: 1024 in the middle): "
               "~12 s for 2 steps on one core")
TOO_COSTLY: dict[tuple[str, str], str] = {("semckd", "ResNet50->MobileNetV2"): _SEMCKD_WIDE,
                                          ("semckd", "ResNet50->vgg8"): _SEMCKD_WIDE,
                                          ("semckd", "ResNet50->MobileNetV1"): _SEMCKD_WIDE,
                                          ("semckd", "vgg13->vgg8"): _SEMCKD_VGG,
                                          ("semckd", "vgg13->MobileNetV2"): _SEMCKD_VGG}
RUN_COSTLY = os.environ.get("REPDISTILL_COSTLY_PAIRS") == "1"

# Flags of the unit-level runs: small banks and queues. Per method, variants (other flags) run on the
# pairs of VARIANT_PAIRS too.
FLAGS = ["--nce_k", "16"]
VARIANTS: dict[str, list[list[str]]] = {"ickd": [["--ickd_batch_squared"]]}
VARIANT_PAIRS = ("resnet32x4->resnet8x4", "vgg13->MobileNetV2", "resnet32x4->ShuffleV1")

# Batch sizes: 4, 8 for SemCKD (its attention embeds the rows of the B x B similarity matrix into B // 4
# dimensions). The ImageNet networks see 64 x 64 images here (their stages as at 224, smaller: under a tenth
# of the cost); the end-to-end runs below use the data set's 224 x 224 crops.
BATCH: dict[str | None, int] = {None: 4, "semckd": 8}
IMAGENET_SIZE = 64
N_DATA, CLASSES = 64, 10


def _split(pair: str) -> tuple[str, str]:
    teacher, student = pair.split("->")
    return teacher, student


# ------------------------------------------------------------------ method-specific checks
# Each takes (distiller, the pair's nets, the student's and the teacher's feature shapes [B, ...], the gradients
# of the method's own terms w.r.t. the student's features) after step 1's backward.

def _check_ickd(d, nets, fs, ft, grads) -> None:
    assert (d.embed.conv.in_channels, d.embed.conv.out_channels) == (fs[-2][1], ft[-2][1])


def _check_srrl(d, nets, fs, ft, grads) -> None:
    head = get_classifier(nets.teacher)
    # the teacher's classifier is referenced, never owned: not a parameter, not in the state
    assert not {id(p) for p in head.parameters()} & {id(p) for p in d.parameters()}
    assert set(d.state_dict()) == {f"loss.transfer.{k}" for k in ("0.weight", "1.weight", "1.bias", "1.running_mean",
                                                                   "1.running_var", "1.num_batches_tracked")}
    assert d.loss.transfer[0].in_channels == fs[-1][1]
    assert d.loss.transfer[0].out_channels == ft[-1][1] == head.in_features


def _check_itrd(d, nets, fs, ft, grads) -> None:
    assert d.criterion.embed.linear.weight.shape == (ft[-1][1], fs[-1][1])


def _check_ega(d, nets, fs, ft, grads) -> None:
    assert (d.embed is None) == (fs[-1][1] == ft[-1][1])


def _check_rrd(d, nets, fs, ft, grads) -> None:
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for p in d.criterion.embed_s.parameters()}
    assert int(d.criterion.queue_ptr) == nets.batch("rrd").img.shape[0]  # the first batch was enqueued


def _check_semckd(d, nets, fs, ft, grads) -> None:
    assert (len(d.loss.query), len(d.loss.key)) == (len(fs) - 2, len(ft) - 2)
    # a smaller last batch (3 of 8): its similarity rows are zero-padded
    n = 3
    s = NetOutput(*nets.student(nets.img[:n], is_feat=True))
    t = NetOutput(*nets.cached(nets.img[:n], is_feat=True))
    loss = d(s, t, Batch(nets.img[:n], torch.zeros(n, dtype=torch.long)))["semckd"]
    assert torch.isfinite(loss) and loss > 0


def _check_reviewkd(d, nets, fs, ft, grads) -> None:
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1:])  # every level
    assert len(d.abfs) == len(fs) - 1
    for abf, f_s, f_t in zip(d.abfs, reversed(fs[1:]), reversed(ft[1:])):
        assert (abf.conv1[0].in_channels, abf.conv2[0].out_channels) == (f_s[1], f_t[1])


def _check_ofd(d, nets, fs, ft, grads) -> None:
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1:-1])  # every stage's pre-ReLU map
    assert not any(b.requires_grad for b in d.loss.margins())
    assert all(name.startswith("loss.connectors.") for name in d.state_dict())  # margins are not saved


def _check_simkd(d, nets, fs, ft, grads) -> None:
    classifier = get_classifier(nets.teacher)
    assert not {id(p) for p in classifier.parameters()} & {id(p) for p in d.parameters()}
    assert all(p.grad is None for p in classifier.parameters()), "gradient reached the teacher's classifier"
    assert all(name.startswith("transfer.") for name in d.state_dict())
    assert grads[-2] is not None and grads[-2].abs().sum() > 0


TERMS = {"ickd": ["ickd"], "srrl": ["srrl_fm", "srrl_sr"], "itrd": ["itrd_corr", "itrd_mutual"], "ega": ["ega"],
         "rrd": ["rrd"], "semckd": ["semckd"], "reviewkd": ["reviewkd"], "ofd": ["ofd"], "simkd": ["simkd"],
         "dist": ["dist_inter", "dist_intra"]}
CHECKS: dict[str, Callable] = {"ickd": _check_ickd, "srrl": _check_srrl, "itrd": _check_itrd, "ega": _check_ega,
                               "rrd": _check_rrd, "semckd": _check_semckd, "reviewkd": _check_reviewkd,
                               "ofd": _check_ofd, "simkd": _check_simkd}


# ------------------------------------------------------------------ the pairs, built once each

class _Cached(nn.Module):
    """The teacher inside DistillStep: its outputs for the pair's batch (or a first part of it),
    computed once per ``preact`` (the real teacher stays a submodule: the gradient check reads it).
    Eval mode: a sample's outputs do not depend on the others, so a part's are the rows of the whole's."""

    def __init__(self, teacher: nn.Module, img: torch.Tensor) -> None:
        super().__init__()
        self.teacher, self.img, self.outputs = teacher, img, {}

    def forward(self, img: torch.Tensor, is_feat: bool = False, preact: bool = False):
        n = img.shape[0]
        assert is_feat and img.data_ptr() == self.img.data_ptr() and torch.equal(img, self.img[:n])
        if preact not in self.outputs:
            with torch.no_grad():
                self.outputs[preact] = self.teacher(self.img, is_feat=True, preact=preact)
        feats, logits = self.outputs[preact]
        return [f[:n] for f in feats], logits[:n]


class _Recorded(nn.Module):
    """The student inside DistillStep, its last outputs kept (to check what reaches its features)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.net, self.last = student, None

    def forward(self, *args, **kwargs):
        self.last = self.net(*args, **kwargs)
        return self.last


@torch.no_grad()
def _calibrate(teacher: nn.Module, img: torch.Tensor) -> None:
    """Give a random teacher BatchNorm statistics of ``img``, as a trained one has of its data: with
    the initial ones (mean 0, variance 1) a deep random network's activations grow with its depth
    and the published weights (-b 400 for semckd) blow the first step up."""
    for m in teacher.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average: after one batch, that batch's statistics
            m.reset_running_stats()
    teacher.train()(img)
    teacher.eval()


class PairNets:
    """A pair's student (its initial weights kept), its teacher in eval mode, one batch and the
    build contexts (BuildContext.probe, once per (preact_s, preact_t))."""

    def __init__(self, pair: str) -> None:
        imagenet = pair in IMAGENET_PAIRS
        self.pair, self.dataset = pair, "imagenet" if imagenet else "cifar100"
        self.teacher_name, self.student_name = _split(pair)
        self.model_t = resolve_model_name(self.teacher_name, self.dataset)
        torch.manual_seed(0)
        self.teacher = build_model(self.teacher_name, CLASSES, dataset=self.dataset).eval()
        self.student = build_model(self.student_name, CLASSES, dataset=self.dataset)
        self.initial = {k: v.clone() for k, v in self.student.state_dict().items()}
        size = IMAGENET_SIZE if imagenet else 32
        # one training image of each class of the synthetic set, normalised as CIFAR-100's transforms do
        images, labels, _, _ = make_synthetic(num_classes=CLASSES, n_train_per_class=1, n_test_per_class=1,
                                              image_size=size)
        b = max(BATCH.values())
        pixels = torch.from_numpy(images[:b]).permute(0, 3, 1, 2).float() / 255
        self.img = (pixels - torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
        self.target = labels[:b]
        _calibrate(self.teacher, self.img)
        self.cached = _Cached(self.teacher, self.img)
        self.contexts: dict[tuple[bool, bool], BuildContext] = {}

    def batch(self, method: str) -> Batch:
        n = BATCH.get(method, BATCH[None])
        return Batch(self.img[:n], self.target[:n])

    def options(self, method: str, extra: list[str]):
        """``--distill method``'s options and ``-r -a -b`` as train_student.py parses them."""
        batch_size = str(BATCH.get(method, BATCH[None]))
        opt = train_student.parse_option(["--path_t", "unused.pth", "--distill", method, "--model_s", self.student_name,
                                          "--dataset", self.dataset, "--batch_size", batch_size, *FLAGS, *extra])
        return options_from(get_method(method).Options, opt), opt

    def context(self, method: str) -> BuildContext:
        """``method``'s BuildContext as train_student.py's build_run makes it."""
        preacts = get_method(method).preacts()
        if preacts not in self.contexts:
            self.contexts[preacts] = BuildContext.probe(self.student, self.teacher, self.img[:2], preact=preacts,
                                                        n_data=N_DATA, model_s=self.student_name, model_t=self.model_t)
        return dataclasses.replace(self.contexts[preacts], batch_size=BATCH.get(method, BATCH[None]))

    def build(self, method: str, options) -> Distiller:
        """As build_run: the method's class on the context, then bind."""
        distiller = get_method(method)(options, self.context(method))
        distiller.bind(self.student, self.teacher)
        return distiller


_CACHE: dict[str, PairNets] = {}


def _nets(pair: str) -> PairNets:
    """The pair's nets, kept while its tests run (the items are ordered by pair)."""
    if pair not in _CACHE:
        _CACHE.clear()
        _CACHE[pair] = PairNets(pair)
    return _CACHE[pair]


def test_the_tables_have_13_cifar_pairs():
    assert len(TABLE_PAIRS) == 13
    assert {"vgg13->MobileNetV2", "ResNet50->MobileNetV2", "resnet32x4->ShuffleV1", "resnet32x4->ShuffleV2",
            "wrn_40_2->ShuffleV1"} <= set(TABLE_PAIRS)
    # the same list as the launcher's
    text = (ROOT / "scripts" / "run_cifar_distill.sh").read_text()
    table = text[text.index("PAIR_TABLE=("):]
    table = table[len("PAIR_TABLE=("):table.index(")")]
    assert [p.replace(":", "->") for p in table.split()] == TABLE_PAIRS


def test_the_exception_tables_name_known_methods_and_pairs():
    for method, pair in (*REFUSED, *TOO_COSTLY):
        assert method in NEW_METHODS and pair in TABLE_PAIRS + IMAGENET_PAIRS
    assert set(VARIANT_PAIRS) <= set(TABLE_PAIRS)


def _two_steps(nets: PairNets, method: str, extra: list[str]) -> None:
    """Build ``method`` for the pair as train_student does and train 2 steps; check every term is
    finite, the method's own terms reach the student's features and its own modules, nothing
    reaches the teacher, and the student's weights moved."""
    options, opt = nets.options(method, extra)
    key = (method, nets.pair)
    if key in REFUSED:
        with pytest.raises(UserError, match=REFUSED[key]) as err:
            nets.build(method, options)
        assert "\n" not in str(err.value)
        return
    if key in TOO_COSTLY and not RUN_COSTLY:
        with torch.device("meta"):  # the build only: module shapes without memory or init
            get_method(method)(options, nets.context(method))
        pytest.skip(f"{method} on {nets.pair}: built; its 2 steps are left to REPDISTILL_COSTLY_PAIRS=1: "
                    f"{TOO_COSTLY[key]}")
    student, teacher = nets.student, nets.teacher
    student.load_state_dict(nets.initial)
    distiller = nets.build(method, options)
    weights = (opt.gamma, opt.alpha, opt.beta)
    assert weights == get_method(method).weights  # the published ones, filled in by parse_option
    recorded = _Recorded(student)
    step = DistillStep(recorded, [nets.cached], nn.ModuleList([distiller]), weights, opt.kd_T,
                       Runtime(torch.device("cpu"))).train()
    optimizer = build_optimizer(list(student.parameters()) + distiller.trainable_parameters(), opt)
    before = [p.detach().clone() for p in student.parameters()]
    for p in teacher.parameters():
        p.grad = None
    expected = (["ce"] if weights[0] else []) + (["kd"] if weights[1] else []) + TERMS.get(method, [])
    batch = nets.batch(method)
    for i in range(2):
        optimizer.zero_grad(set_to_none=True)
        _, _, terms = step(batch)
        assert all(v.dim() == 0 and torch.isfinite(v) for v in terms.values()), terms
        if method in TERMS:
            assert list(terms) == expected
        if i == 0:  # the method's own terms reach the student's features
            feats = recorded.last[0]
            own = sum(v for k, v in terms.items() if k not in ("ce", "kd"))
            grads = torch.autograd.grad(own, feats, retain_graph=True, allow_unused=True)
            assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{method}'s terms miss the student"
        sum(terms.values()).backward()
        assert all(p.grad is None for p in teacher.parameters()), "gradient reached the teacher"
        if i == 0:
            missing = [n for n, p in distiller.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, f"{method}: no gradient reached {missing}"
            if method in CHECKS:
                CHECKS[method](distiller, nets, [f.shape for f in feats], nets.context(method).feats_t, grads)
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters())), "the student did not move"


CASES = [(pair, method) for pair in TABLE_PAIRS + IMAGENET_PAIRS for method in NEW_METHODS]


@pytest.mark.parametrize("pair, method", CASES, ids=[f"{m}-{p}" for p, m in CASES])
def test_two_steps_on_every_pair(pair: str, method: str) -> None:
    nets = _nets(pair)
    _two_steps(nets, method, [])
    for extra in VARIANTS.get(method, []) if pair in VARIANT_PAIRS else []:
        _two_steps(nets, method, extra)


# ------------------------------------------------------------------ end to end

# per method, further (flags, terms logged) runs besides the default one
E2E_VARIANTS: dict[str, list[tuple[list[str], list[str]]]] = {"rrd": [(["-a", "1"], ["ce", "kd", "rrd"])]}
E2E = [(m, [], [*(["ce"] if get_method(m).weights[0] else []), *(["kd"] if get_method(m).weights[1] else []),
             *TERMS.get(m, [])]) for m in NEW_METHODS]
E2E += [(m, flags, terms) for m in NEW_METHODS for flags, terms in E2E_VARIANTS.get(m, [])]


@pytest.mark.e2e
@pytest.mark.parametrize("method, flags, terms", E2E, ids=[" ".join([m, *f]) for m, f, _ in E2E])
def test_train_student_two_steps(method: str, flags: list[str], terms: list[str], teacher, tmp_path) -> None:
    results = train_student.main(["--path_t", str(teacher), "--model_s", "resnet8", "--distill", method, *flags,
                                  *SYNTHETIC, "--nce_k", "16", "--max_steps", "2", "--epochs", "1",
                                  "--save_folder", str(tmp_path)])
    assert results["steps"] == 2
    history = results["history"][0]
    for term in terms:
        assert f"loss_{term}" in history and math.isfinite(history[f"loss_{term}"]), history


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A tiny ImageNet folder (3 classes of 4 training images, 1 validation image each, 224 x 224 crops)
    and random-weight teachers of the ImageNet pairs (their BatchNorm statistics from random images),
    saved with the entries train_teacher.py writes and load_teacher reads (``model``, ``arch``,
    ``num_classes``, ``dataset``)."""
    root = tmp_path_factory.mktemp("imagenet")
    data = write_fake_imagenet(root / "data", classes=3, train_per_class=(4,), val_per_class=1)
    teachers = {}
    for pair in IMAGENET_PAIRS:
        name = _split(pair)[0]
        arch = resolve_model_name(name, "imagenet")
        torch.manual_seed(0)
        model = build_model(arch, 3, dataset="imagenet")
        _calibrate(model, torch.randn(4, 3, 224, 224))  # as a trained teacher: BatchNorm statistics of its inputs
        path = root / f"{name}_last.pth"
        torch.save({"model": model.state_dict(), "arch": arch, "num_classes": 3, "dataset": "imagenet", "epoch": 1},
                   path)
        teachers[name] = path
    return data, teachers


# one run per pair: a queue (rrd) and the teacher's classifier (srrl); with REPDISTILL_COSTLY_PAIRS=1 every method
# on both pairs (SemCKD with a ResNet50 teacher: ~850M parameters). Every method runs 2 steps on both ImageNet pairs
# in test_two_steps_on_every_pair, and end to end on the synthetic set above.
IMAGENET_E2E = [("rrd", "ResNet34->ResNet18"), ("srrl", "ResNet50->MobileNetV1")]
if RUN_COSTLY:
    IMAGENET_E2E = [(m, p) for p in IMAGENET_PAIRS for m in NEW_METHODS]
# SemCKD from the random ResNet50 (2048 channels, 849M projection parameters): the term is so large that MobileNetV1
# blows up within 2 steps even at lr 0.01, and the guard stops the run with its one line. Not checked with a
# trained teacher (no ImageNet here).
BLOWS_UP = {("semckd", "ResNet50->MobileNetV1")}


@pytest.mark.e2e
@pytest.mark.parametrize("method, pair", [
    pytest.param(m, p, marks=[pytest.mark.xfail(raises=SystemExit, strict=True)] if (m, p) in BLOWS_UP else [])
    for m, p in IMAGENET_E2E], ids=[f"{m}-{p}" for m, p in IMAGENET_E2E])
def test_train_student_on_imagenet(method: str, pair: str, imagenet, tmp_path) -> None:
    data, teachers = imagenet
    name, student = _split(pair)
    results = train_student.main(["--path_t", str(teachers[name]), "--model_s", student, "--distill", method,
                                  "--dataset", "imagenet", "--data_folder", str(data), "--batch_size", "4",
                                  "--num_workers", "0", "--device", "cpu", "--nce_k", "8", "--max_steps", "2",
                                  "--epochs", "1", "--save_folder", str(tmp_path),
                                  # random teachers: ImageNet's lr 0.1 at batch 4 blows up OFD's and SemCKD's
                                  # MobileNetV1 in 2 steps (the guard stops the run with one line)
                                  "--learning_rate", "0.01"])
    assert results["steps"] == 2
    history = results["history"][0]
    assert all(math.isfinite(history[f"loss_{term}"]) for term in TERMS[method]), history
