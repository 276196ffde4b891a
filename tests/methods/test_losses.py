"""distiller_zoo's classic losses and their Distillers.

1. Against RepDistiller: tests/fixtures/repdistiller_goldens.pt (see its 'about' entry) holds, per
   case '<Loss>/<pair>', how the loss was called on the pair's seeded features, the state of the
   modules built for it, the values and the gradients w.r.t. the student-side inputs.
2. Properties: zero loss for identical student and teacher, shapes, gradients never reach the teacher.
3. Every registered classic Distiller on a same-family and two cross-architecture pairs.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.declare import options_from
from common.errors import UserError
from distiller_zoo import (
    FSP,
    KDSVD,
    PKT,
    ABLoss,
    Attention,
    Correlation,
    DistillKL,
    FactorTransfer,
    HintLoss,
    NSTLoss,
    RKDLoss,
    Similarity,
    VIDLoss,
)
import distiller_zoo.VID as VID_MODULE
from distiller_zoo.registry import Batch, NetOutput
from engine.methods import build_distiller, get_method, method_names
from models import build_model
from models.util import Connector, ConvReg, LinearEmbed, Paraphraser, Translator
from tests.tolerance import FP32, FP32_DEEP, FP32_DEEP_GRAD, FP32_EXACT, FP64, assert_close

pytestmark = pytest.mark.numeric

GOLDENS = torch.load(Path(__file__).parents[1] / "fixtures" / "repdistiller_goldens.pt", weights_only=True)
CLASSIC = ["kd", "hint", "attention", "similarity", "correlation", "vid", "rkd", "pkt", "abound",
           "factor", "fsp", "nst", "kdsvd"]


# --------------------------------------------------------------------------- 1. goldens
# Each builder takes the pair's tensors and returns (modules whose state the case holds,
# the student-side inputs, a function of those inputs giving the list of values).
Built = tuple[nn.Module, list[torch.Tensor], Callable[[list[torch.Tensor]], list[torch.Tensor]]]


def _shape(f: torch.Tensor) -> torch.Size:
    return f.shape


def _build(loss: str, p: dict) -> Built:
    fs, ft, ps, pt = p["feats_s"], p["feats_t"], p["preact_s"], p["preact_t"]
    none = nn.Module()
    if loss == "DistillKL":
        return none, [p["logits_s"]], lambda x: [DistillKL(4)(x[0], p["logits_t"])]
    if loss == "HintLoss":
        return none, [fs[2]], lambda x: [HintLoss()(x[0], ft[2])]
    if loss == "Attention":
        return none, fs[1:-1], lambda x: Attention()(x, ft[1:-1])
    if loss == "Similarity":
        return none, [fs[-2]], lambda x: Similarity()(x, [ft[-2]])
    if loss == "Correlation":
        return none, [fs[-1][:, :64]], lambda x: [Correlation()(x[0], ft[-1][:, :64])]
    if loss == "RKDLoss":
        return none, [fs[-1]], lambda x: [RKDLoss()(x[0], ft[-1])]
    if loss == "PKT":
        return none, [fs[-1]], lambda x: [PKT()(x[0], ft[-1])]
    if loss == "NSTLoss":
        return none, fs[1:-1], lambda x: NSTLoss()(x, ft[1:-1])
    if loss == "FactorTransfer":
        return none, [fs[-2]], lambda x: [FactorTransfer()(x[0], ft[-2])]
    if loss == "KDSVD":
        return none, fs[1:-1], lambda x: KDSVD()(x, ft[1:-1])
    if loss == "FSP":
        fsp = FSP([_shape(f) for f in fs[:-1]], [_shape(f) for f in ft[:-1]])
        return none, fs[:-1], lambda x: fsp(x, ft[:-1])
    if loss == "ABLoss+Connector":
        m = nn.ModuleDict({"conn": Connector([_shape(f) for f in ps[1:-1]], [_shape(f) for f in pt[1:-1]])})
        return m, ps[1:-1], lambda x: ABLoss(len(x))(m["conn"](x), pt[1:-1])
    if loss == "VIDLoss":
        vid = VIDLoss(fs[2].shape[1], ft[2].shape[1], ft[2].shape[1])
        return vid, [fs[2]], lambda x: [vid(x[0], ft[2])]
    if loss == "ConvReg+Hint":
        m = nn.ModuleDict({"reg": ConvReg(fs[2].shape, ft[2].shape)})
        return m, [fs[2]], lambda x: [HintLoss()(m["reg"](x[0]), ft[2])]
    if loss == "Paraphraser+Translator+FT":
        m = nn.ModuleDict({"para": Paraphraser(ft[-2].shape), "trans": Translator(fs[-2].shape, ft[-2].shape)})
        return m, [fs[-2]], lambda x: [FactorTransfer()(m["trans"](x[0]), m["para"](ft[-2], is_factor=True))]
    if loss == "LinearEmbed+Correlation":
        m = nn.ModuleDict({"es": LinearEmbed(fs[-1].shape[1], 128), "et": LinearEmbed(ft[-1].shape[1], 128)})
        return m, [fs[-1]], lambda x: [Correlation()(m["es"](x[0]), m["et"](ft[-1]))]
    raise KeyError(loss)


def _family_scales(loss: str, f_s: torch.Tensor) -> tuple[float | None, float | None]:
    """The sizes (value, gradient w.r.t. ``f_s`` [B, D]) of a loss whose golden values are rounding
    noise around zero, from the size of its terms; (None, None) for the others, whose values are
    sums of non-negative terms (MSE, KL, L1, kernel means) well away from zero: their own magnitude.

    PKT: on the goldens' batch of two the student's and teacher's features are each nearly
    parallel, so p_s = p_t = 1/2 and the KL is ~1e-8 of noise. Its terms p_t * log(ratio) have
    the size of mean(p_t) = 1/B; their gradients pass through cosines (gradient <= 1/|f_i|) and a
    mean over B^2 terms: size 1/(B^3 mean|f_i|).
    RKD: with B = 2 both potentials are exactly 1 (one distance over itself, the cosine of one
    difference with itself) whatever the features, so the loss is 0 up to rounding (~1e-13). Its
    terms compare potentials of size 1; their gradients pass through distances: size
    1/(B^2 mean distance).
    """
    b = f_s.shape[0]
    if loss == "PKT":
        value = 1.0 / b
        return value, value / (b * b * float(f_s.norm(dim=1).mean()))
    if loss == "RKDLoss":
        return 1.0, 1.0 / (b * b * float(torch.pdist(f_s).mean()))
    return None, None


@pytest.mark.parametrize("case", sorted(GOLDENS["cases"]))
def test_matches_repdistiller(case: str) -> None:
    loss, pair = case.split("/")
    golden = GOLDENS["cases"][case]
    modules, student_inputs, compute = _build(loss, GOLDENS["pairs"][pair])
    modules.load_state_dict(golden["module_state"], strict=True)
    modules.train()  # the goldens ran BatchNorm in training mode
    inputs = [f.clone().requires_grad_(True) for f in student_inputs]
    value_scale, grad_scale = _family_scales(loss, student_inputs[0])
    values = compute(inputs)
    assert len(values) == len(golden["values"])
    for value, expected in zip(values, golden["values"]):
        assert value.shape == expected.shape
        assert_close(value, expected, rtol=FP32_DEEP, scale=value_scale)
    sum(values).sum().backward()
    assert len(inputs) == len(golden["grads_wrt_student_inputs"])
    for x, expected in zip(inputs, golden["grads_wrt_student_inputs"]):
        assert_close(x.grad, expected, rtol=FP32_DEEP_GRAD, scale=grad_scale)


def test_every_golden_case_is_covered() -> None:
    for case in GOLDENS["cases"]:
        loss, pair = case.split("/")
        _build(loss, GOLDENS["pairs"][pair])  # raises KeyError for a case this file does not know


# --------------------------------------------------------------------------- 2. properties
def _maps(seed: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


MAPS = [(4, 8, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4)]


# (student maps, teacher maps, student vectors, teacher vectors) -> the loss
@pytest.mark.parametrize("name,loss", [
    ("KD", lambda f, g, v, w: DistillKL(4)(v, w)),
    ("hint", lambda f, g, v, w: HintLoss()(f[0], g[0])),
    ("AT", lambda f, g, v, w: sum(Attention()(f, g))),
    ("SP", lambda f, g, v, w: sum(Similarity()(f, g))),
    ("CC", lambda f, g, v, w: Correlation()(v, w)),
    ("PKT", lambda f, g, v, w: PKT()(v, w)),
    ("RKD", lambda f, g, v, w: RKDLoss()(v, w)),
    ("NST", lambda f, g, v, w: sum(NSTLoss()(f, g))),
    ("FSP", lambda f, g, v, w: sum(FSP([x.shape for x in f], [x.shape for x in g])(f, g))),
    ("FT", lambda f, g, v, w: FactorTransfer()(f[-1], g[-1])),
    ("KDSVD", lambda f, g, v, w: sum(KDSVD()(f, g))),
])
def test_zero_when_student_equals_teacher(name: str, loss: Callable) -> None:
    feats, others = _maps(0, MAPS), _maps(2, MAPS)
    vector, other = (torch.randn(4, 10, generator=torch.Generator().manual_seed(seed)) for seed in (1, 3))
    typical = float(loss(others, feats, other, vector))  # an unrelated student: the size of the loss
    assert typical > 0
    assert_close(float(loss(feats, feats, vector, vector)), 0.0, rtol=FP32, scale=typical)


def test_kd_matches_definition() -> None:
    y_s, y_t = torch.randn(3, 5), torch.randn(3, 5)
    p_t = F.softmax(y_t / 2, 1)
    expected = (p_t * (p_t.log() - F.log_softmax(y_s / 2, 1))).sum(1).mean() * 4
    assert_close(DistillKL(2)(y_s, y_t), expected, rtol=FP32)


def test_rkd_and_pkt_match_their_definitions_on_a_larger_batch() -> None:
    # The goldens' batch of 2 leaves RKD and PKT almost degenerate; check them on B = 5 directly.
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 9, generator=g)

    def psi_d(e):
        d = torch.cdist(e, e)
        return d / d[~torch.eye(5, dtype=torch.bool)].mean()

    def psi_a(e):
        cos = torch.zeros(5, 5, 5)
        for i in range(5):
            for j in range(5):
                for k in range(5):
                    if i not in (j, k):
                        cos[i, j, k] = F.cosine_similarity(e[j] - e[i], e[k] - e[i], dim=0)
        return cos

    expected = 25 * F.smooth_l1_loss(psi_d(s), psi_d(t)) + 50 * F.smooth_l1_loss(psi_a(s), psi_a(t))
    assert_close(RKDLoss()(s, t), expected, rtol=FP32)

    def prob(e):
        k = (F.cosine_similarity(e.unsqueeze(1), e.unsqueeze(0), dim=2) + 1) / 2
        return k / k.sum(1, keepdim=True)

    p_s, p_t = prob(s[:, :5]), prob(t[:, :5])
    expected = (p_t * torch.log((p_t + 1e-7) / (p_s + 1e-7))).mean()
    assert_close(PKT()(s[:, :5], t[:, :5]), expected, rtol=FP32, scale=1 / 5)  # terms of size mean(p_t) = 1/B


def test_ab_loss_layer_weights_and_margin() -> None:
    ab = ABLoss(3)
    assert ab.w == [0.25, 0.5, 1.0]
    s = torch.tensor([-2.0, -0.5, 0.5, 2.0]).view(1, 4, 1, 1)
    t_off, t_on = -torch.ones(1, 4, 1, 1), torch.ones(1, 4, 1, 1)
    # teacher off: penalise s > -1 by (s + 1)^2; teacher on: penalise s <= 1 by (s - 1)^2
    off = (0.5**2 + 1.5**2 + 3.0**2) * 3 / 1000
    on = (3.0**2 + 1.5**2 + 0.5**2) * 3 / 1000
    values = ab([s, s, s], [t_off, t_on, t_off])
    assert_close(torch.stack(values), torch.tensor([0.25 * off, 0.5 * on, off]), rtol=FP32)


def test_ab_loss_through_connector_shapes() -> None:
    s = _maps(2, [(2, 8, 16, 16), (2, 16, 4, 4)])
    t = _maps(3, [(2, 12, 8, 8), (2, 16, 8, 8)])
    connector = Connector([f.shape for f in s], [f.shape for f in t])
    losses = ABLoss(2)(connector(s), t)
    assert len(losses) == 2 and all(v.dim() == 0 and v > 0 for v in losses)


def test_fsp_shapes_and_channel_check() -> None:
    g = _maps(4, [(2, 8, 16, 16), (2, 8, 8, 8), (2, 16, 8, 8)])
    matrices = FSP.compute_fsp(g)
    assert [tuple(m.shape) for m in matrices] == [(2, 8, 8), (2, 16, 8)]
    pooled = F.adaptive_avg_pool2d(g[0], 8).flatten(2)
    assert_close(matrices[0], (g[1].flatten(2) @ pooled.transpose(1, 2)) / 64, rtol=FP32)
    t = _maps(5, [(2, 8, 32, 32), (2, 8, 16, 16), (2, 16, 16, 16)])  # other sizes, same channels
    assert len(FSP([f.shape for f in g], [f.shape for f in t])(g, t)) == 2
    with pytest.raises(ValueError):
        FSP([(2, 8, 4, 4)], [(2, 16, 4, 4)])


@pytest.mark.parametrize("s_size,t_size", [(16, 8), (8, 16), (8, 8)])
def test_vid_pools_to_the_smaller_map(s_size: int, t_size: int) -> None:
    vid = VIDLoss(6, 10, 10)
    var = F.softplus(vid.log_scale) + vid.eps
    assert_close(var, torch.full((10,), 5.0), rtol=FP32)
    assert [n for n, _ in vid.named_parameters()] == ["log_scale", "regressor.0.weight", "regressor.2.weight",
                                                      "regressor.4.weight"]
    f_s, f_t = _maps(6, [(2, 6, s_size, s_size), (2, 10, t_size, t_size)])
    assert vid(f_s, f_t).dim() == 0


@pytest.mark.parametrize("c_s, c_t, size", [(16, 24, 2), (8, 8, 6), (32, 16, 3)])
def test_nst_position_form_equals_the_kernel_means(c_s: int, c_t: int, size: int) -> None:
    """NST from the positions' Gram matrices (used when a map has fewer positions than channels)
    gives the three kernel means' value and gradient."""
    gen = torch.Generator().manual_seed(c_s + size)
    f_s = torch.randn(3, c_s, size, size, generator=gen, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(3, c_t, size, size, generator=gen, dtype=torch.float64)
    s, t = F.normalize(f_s.flatten(2), dim=2), F.normalize(f_t.flatten(2), dim=2)
    kernel = lambda a, b: torch.bmm(a, b.transpose(1, 2)).pow(2).mean()  # noqa: E731
    expected = kernel(t, t) + kernel(s, s) - 2 * kernel(s, t)
    terms = float((kernel(t, t) + kernel(s, s)).detach())  # the sizes the difference of kernel means cancels from
    (grad,) = torch.autograd.grad(expected, f_s, retain_graph=True)
    got = NSTLoss.position_form(s, t)
    assert_close(got, expected, rtol=FP64, scale=terms)
    assert_close(torch.autograd.grad(got, f_s)[0], grad, rtol=FP64)
    via_loss = NSTLoss()([f_s], [f_t])[0]  # picks a form by shape; both give the same numbers
    assert_close(via_loss.double(), expected, rtol=FP32, scale=terms)


def test_vid_matrix_product_path_equals_the_convolutions(monkeypatch) -> None:
    """On large maps VID runs its 1x1 convolutions as batched matrix products: same loss and
    gradients as the convolution modules."""
    torch.manual_seed(0)
    vid = VIDLoss(6, 10, 8)
    f_s = torch.randn(3, 6, 24, 24, requires_grad=True)
    f_t = torch.randn(3, 8, 24, 24)
    results = []
    for positions in (10**9, 1):  # convolutions, then matrix products
        monkeypatch.setattr(VID_MODULE, "BMM_POSITIONS", positions)
        vid.zero_grad()
        f_s.grad = None
        loss = vid(f_s, f_t)
        loss.backward()
        results.append([loss, f_s.grad] + [p.grad for p in vid.parameters()])
    for got, expected in zip(*results):
        assert_close(got, expected, rtol=FP32)
    var = F.softplus(vid.log_scale) + vid.eps  # the NLL as the paper writes it
    mu = vid.regressor(f_s)
    direct = (0.5 * ((mu - f_t).pow(2) / var.view(1, -1, 1, 1) + var.log().view(1, -1, 1, 1))).mean()
    assert_close(results[0][0], direct, rtol=FP32_EXACT)


def test_kdsvd_one_value_per_layer_after_the_first() -> None:
    s = _maps(7, [(2, 8, 8, 8), (2, 16, 4, 4), (2, 16, 4, 2)])
    t = _maps(8, [(2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 2, 4)])
    values = KDSVD()(s, t)
    assert len(values) == 2 and all(torch.isfinite(v) for v in values)


def test_losses_with_unequal_spatial_sizes() -> None:
    s = _maps(9, [(2, 8, 16, 16), (2, 16, 4, 4)])
    t = _maps(10, [(2, 12, 8, 8), (2, 24, 8, 8)])
    for loss in (Attention(), NSTLoss()):
        assert len(loss(s, t)) == 2
    assert FactorTransfer()(s[1], t[1]).dim() == 0


# --------------------------------------------------------------------------- 3. Distillers
PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "MobileNetV2"), ("resnet32x4", "ShuffleV1")]
PAIR_IDS = [f"{t}->{s}" for t, s in PAIRS]
SAME_WIDTHS = {"fsp", "kdsvd"}  # need equal channel counts (RepDistiller fails on other pairs)


# The option values of these tests; each method reads those its Options declare.
OPTION_VALUES = SimpleNamespace(feat_dim=32, hint_layer=2)
N_DATA = 100


def _options(method: str, **values):
    """``--distill method``'s options: OPTION_VALUES where it declares them, then ``values``."""
    return options_from(get_method(method).Options, OPTION_VALUES, **values)


class Pair:
    """A student, a frozen teacher, one batch of 2 random images and the teacher's outputs for it."""

    def __init__(self, teacher_name: str, student_name: str, nets: dict[str, nn.Module]) -> None:
        self.student, self.teacher = nets[student_name], nets[teacher_name]
        self.student_name = student_name
        self.batch = Batch(torch.randn(2, 3, 32, 32), torch.tensor([1, 7]))
        self.teacher.eval()
        with torch.no_grad():
            self._teacher_out = {p: self.teacher(self.batch.img, is_feat=True, preact=p) for p in (False, True)}
            feats_s = self.student.eval()(self.batch.img, is_feat=True)[0]
        feats_t = self._teacher_out[False][0]
        self.equal_widths = [f.shape[1] for f in feats_s] == [f.shape[1] for f in feats_t]

    def build(self, method: str, **values):
        """``--distill method`` for this pair, its options from :func:`_options` (``values`` win)."""
        return build_distiller(method, _options(method, **values), self.student, self.teacher, self.batch.img,
                               n_data=N_DATA, model_s=self.student_name)

    def outputs(self, preact: bool, preact_t: bool | None = None) -> tuple[NetOutput, NetOutput]:
        """Student outputs with grad (train mode); the teacher's as fresh leaves that would collect
        any gradient that reached them (``preact_t``: the teacher's choice; None: ``preact``)."""
        self.student.zero_grad(set_to_none=True)
        self.student.train()
        s = NetOutput(*self.student(self.batch.img, is_feat=True, preact=preact))
        for f in s.feats:
            f.retain_grad()
        feats_t, logits_t = self._teacher_out[preact if preact_t is None else preact_t]
        t = NetOutput([f.clone().requires_grad_(True) for f in feats_t], logits_t.clone().requires_grad_(True))
        return s, t


@pytest.fixture(scope="module")
def pairs() -> dict[str, Pair]:
    torch.manual_seed(0)
    nets = {name: build_model(name, num_classes=10) for pair in PAIRS for name in pair}
    return {pair_id: Pair(*pair, nets) for pair_id, pair in zip(PAIR_IDS, PAIRS)}


def _check_gradients(s: NetOutput, t: NetOutput, modules: list[nn.Module]) -> None:
    assert all(f.grad is None for f in t.feats) and t.logits.grad is None, "gradient reached the teacher"
    assert any(f.grad is not None and f.grad.abs().sum() > 0 for f in s.feats), "no gradient on the student"
    for module in modules:
        params = list(module.parameters())
        assert all(p.grad is not None for p in params), f"{type(module).__name__} got no gradient"


def test_every_classic_method_is_registered() -> None:
    assert set(CLASSIC) <= set(method_names())


@pytest.mark.parametrize("pair_id", PAIR_IDS)
@pytest.mark.parametrize("method", CLASSIC)
def test_distiller_forward_backward(method: str, pair_id: str, pairs) -> None:
    pair = pairs[pair_id]
    if method in SAME_WIDTHS and not pair.equal_widths:
        with pytest.raises(UserError, match=f"{method.upper()} needs"):
            pair.build(method)
        return
    distiller = pair.build(method).train()
    s, t = pair.outputs(distiller.preact)
    terms = distiller(s, t, pair.batch)
    assert all(isinstance(k, str) and v.dim() == 0 and torch.isfinite(v) for k, v in terms.items())
    if method in ("kd", "abound", "fsp"):
        assert terms == {}  # kd: the loop's KL is the method; abound, fsp: init stage only
        return
    assert list(terms) == [method]
    (F.cross_entropy(s.logits, pair.batch.target) + sum(terms.values())).backward()
    trainable = {id(p) for p in distiller.trainable_parameters()}
    own = [m for m in distiller.children() if any(id(p) in trainable for p in m.parameters())]
    assert own or method in ("attention", "similarity", "rkd", "pkt", "nst", "kdsvd")
    _check_gradients(s, t, own)


@pytest.mark.parametrize("method,pair_id", [("abound", PAIR_IDS[1]), ("abound", PAIR_IDS[0]),
                                            ("factor", PAIR_IDS[0]), ("fsp", PAIR_IDS[0])])
def test_init_stage_losses(method: str, pair_id: str, pairs) -> None:
    pair = pairs[pair_id]
    distiller = pair.build(method).train()
    assert distiller.has_init_stage
    s, t = pair.outputs(distiller.preact)
    loss = distiller.init_loss(s, t, pair.batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert distiller.init_trains_student() == (method != "factor")
    if distiller.init_trains_student():
        _check_gradients(s, t, distiller.init_modules())
    else:  # factor: only the paraphraser learns, from the teacher's features alone
        assert all(f.grad is None for f in s.feats + t.feats)
        assert all(p.grad is not None for p in distiller.paraphraser.parameters())
    if method == "abound":  # the connectors serve the init stage only
        assert distiller.trainable_parameters() == []


def test_factor_init_learning_rate_and_freeze(pairs) -> None:
    for pair_id, lr in [(PAIR_IDS[0], 0.01), (PAIR_IDS[1], 0.05)]:
        distiller = pairs[pair_id].build("factor")
        assert distiller.init_learning_rate(0.05) == lr
    paraphraser = {id(p) for p in distiller.paraphraser.parameters()}
    assert not paraphraser & {id(p) for p in distiller.trainable_parameters()}
    distiller.after_init_stage()
    assert not any(p.requires_grad for p in distiller.paraphraser.parameters())
    assert {id(p) for p in distiller.trainable_parameters()} == {id(p) for p in distiller.translator.parameters()}


def test_published_weights_and_preact() -> None:
    expected = {"kd": (0.1, 0.9, 0), "hint": (1, 0, 100), "attention": (1, 0, 1000), "similarity": (1, 0, 3000),
                "correlation": (1, 0, 0.02), "vid": (1, 0, 1), "rkd": (1, 0, 1), "pkt": (1, 0, 30000),
                "abound": (1, 0, 1), "factor": (1, 0, 200), "fsp": (1, 0, 50), "nst": (1, 0, 50),
                "kdsvd": (1, 0, 1)}
    for name, weights in expected.items():
        cls = get_method(name)
        assert tuple(cls.weights) == weights, name
        assert cls.preact == (name == "abound")
        assert cls.has_init_stage == (name in ("abound", "factor", "fsp"))


@pytest.mark.parametrize("layer", [4, -1])
def test_hint_layer_the_student_lacks(layer: int, pairs) -> None:
    # 4 is the pooled vector of a ResNet, not a map
    with pytest.raises(UserError, match="--hint_layer"):
        pairs[PAIR_IDS[0]].build("hint", hint_layer=layer)


def test_method_modules_are_sized_from_the_features(pairs) -> None:
    hint = pairs[PAIR_IDS[2]].build("hint")  # ShuffleV1 8x8 -> resnet32x4 16x16
    assert isinstance(hint.conv_reg, ConvReg) and isinstance(hint.conv_reg.conv, nn.ConvTranspose2d)
    cc = pairs[PAIR_IDS[1]].build("correlation")
    assert cc.embed_s.linear.weight.shape == (32, 1280) and cc.embed_t.linear.weight.shape == (32, 512)
    vid = pairs[PAIR_IDS[1]].build("vid")
    assert [v.regressor[0].in_channels for v in vid.vid_losses] == [12, 16, 48, 160]
    assert [v.regressor[4].out_channels for v in vid.vid_losses] == [128, 256, 512, 512]
