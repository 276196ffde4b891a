"""models/util.py against RepDistiller: the goldens' module states load strictly into our modules.

tests/fixtures/repdistiller_goldens.pt was made with RepDistiller's code (see its 'about' entry);
each case's 'call' says how its modules were built from the pair's feature tensors.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.util import (
    Connector,
    ConnectorV2,
    ConvReg,
    Embed,
    Flatten,
    LinearEmbed,
    MLPEmbed,
    Normalize,
    Paraphraser,
    PoolEmbed,
    Regress,
    Translator,
)
from tests.tolerance import FP32, FP32_DEEP, assert_close

pytestmark = pytest.mark.numeric

GOLDENS = torch.load(Path(__file__).parents[1] / "fixtures" / "repdistiller_goldens.pt", weights_only=True)
PAIRS = list(GOLDENS["pairs"])


def _case(kind: str, pair: str) -> dict:
    return GOLDENS["cases"][f"{kind}/{pair}"]


def _load(module: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """Load the entries of ``state`` under ``prefix`` into ``module`` with strict=True."""
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    module.load_state_dict(own, strict=True)
    return module


def test_goldens_have_the_expected_cases():
    for pair in PAIRS:
        for kind in ("ConvReg+Hint", "Paraphraser+Translator+FT", "ABLoss+Connector", "LinearEmbed+Correlation"):
            assert f"{kind}/{pair}" in GOLDENS["cases"]


@pytest.mark.parametrize("pair", PAIRS)
def test_convreg_loads_and_maps_to_teacher_shape(pair):
    case, feats = _case("ConvReg+Hint", pair), GOLDENS["pairs"][pair]
    assert case["call"].startswith("HintLoss()(ConvReg(shape_s[2], shape_t[2])")
    f_s, f_t = feats["feats_s"][2], feats["feats_t"][2]
    reg = _load(ConvReg(f_s.shape, f_t.shape), case["module_state"], "reg.")
    assert set(case["module_state"]) == {f"reg.{k}" for k in reg.state_dict()}
    out = reg(f_s)  # train mode, as the golden was made
    assert out.shape == f_t.shape
    # HintLoss is plain MSE: this pins the regressor's computation
    assert_close(F.mse_loss(out, f_t), case["values"][0], rtol=FP32_DEEP)


@pytest.mark.parametrize("pair", PAIRS)
def test_paraphraser_translator_load_and_shapes(pair):
    case, feats = _case("Paraphraser+Translator+FT", pair), GOLDENS["pairs"][pair]
    assert "Translator(shape_s[-2], shape_t[-2])" in case["call"] and "Paraphraser(shape_t[-2])" in case["call"]
    f_s, f_t = feats["feats_s"][-2], feats["feats_t"][-2]
    para = _load(Paraphraser(f_t.shape), case["module_state"], "para.")
    trans = _load(Translator(f_s.shape, f_t.shape), case["module_state"], "trans.")
    n_keys = len(para.state_dict()) + len(trans.state_dict())
    assert n_keys == len(case["module_state"])

    factor_s = trans(f_s)
    factor_t = para(f_t, is_factor=True)
    b, c, h, w = f_t.shape
    assert factor_t.shape == (b, int(c * 0.5), h, w)
    assert factor_s.shape == (f_s.shape[0], int(c * 0.5), f_s.shape[2], f_s.shape[3])
    factor, rec = para(f_t)
    assert factor.shape == factor_t.shape and rec.shape == f_t.shape

    # the FT value from these factors (maps of equal size here) pins both modules' computation
    def squash(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    assert_close((squash(factor_s) - squash(factor_t)).abs().mean(), case["values"][0], rtol=FP32_DEEP)


@pytest.mark.parametrize("pair", PAIRS)
def test_connector_loads_and_maps_to_teacher_shapes(pair):
    case, feats = _case("ABLoss+Connector", pair), GOLDENS["pairs"][pair]
    assert "Connector(shapes of preact_s[1:-1], preact_t[1:-1])" in case["call"]
    g_s, g_t = feats["preact_s"][1:-1], feats["preact_t"][1:-1]
    conn = _load(Connector([f.shape for f in g_s], [f.shape for f in g_t]), case["module_state"], "conn.")
    assert len(conn.state_dict()) == len(case["module_state"])
    out = conn(g_s)
    assert [o.shape for o in out] == [t.shape for t in g_t]
    for s, t, module in zip(g_s, g_t, conn.connectors):
        same = s.shape[1] == t.shape[1] and s.shape[2] == t.shape[2]
        assert isinstance(module, ConvReg) != same
        if isinstance(module, ConvReg):
            assert not module.use_relu


@pytest.mark.parametrize("pair", PAIRS)
def test_linear_embeds_load_and_shapes(pair):
    case, feats = _case("LinearEmbed+Correlation", pair), GOLDENS["pairs"][pair]
    assert "LinearEmbed(d_s, 128)" in case["call"] and "LinearEmbed(d_t, 128)" in case["call"]
    f_s, f_t = feats["feats_s"][-1], feats["feats_t"][-1]
    embed_s = _load(LinearEmbed(f_s.shape[1], 128), case["module_state"], "es.")
    embed_t = _load(LinearEmbed(f_t.shape[1], 128), case["module_state"], "et.")
    e_s, e_t = embed_s(f_s), embed_t(f_t)
    assert e_s.shape == e_t.shape == (f_s.shape[0], 128)
    # Correlation (CC) is mean(sum(d[:-1] * d[1:], 1)) with d = |e_s - e_t|
    delta = (e_s - e_t).abs()
    assert_close((delta[:-1] * delta[1:]).sum(1).mean(), case["values"][0], rtol=FP32_DEEP)


def test_convreg_branches():
    x = torch.randn(2, 8, 16, 16)
    down = ConvReg((2, 8, 16, 16), (2, 12, 8, 8))
    assert down.conv.stride == (2, 2) and down.conv.kernel_size == (3, 3)
    assert down(x).shape == (2, 12, 8, 8)
    up = ConvReg((2, 8, 16, 16), (2, 12, 32, 32))
    assert isinstance(up.conv, nn.ConvTranspose2d) and up.conv.kernel_size == (4, 4)
    assert up(x).shape == (2, 12, 32, 32)
    same = ConvReg((2, 8, 16, 16), (2, 12, 16, 16))
    assert same.conv.kernel_size == (1, 1) and same(x).shape == (2, 12, 16, 16)
    shrink = ConvReg((2, 8, 16, 16), (2, 12, 12, 12))
    assert shrink.conv.kernel_size == (5, 5) and shrink(x).shape == (2, 12, 12, 12)
    assert (ConvReg((2, 8, 16, 16), (2, 12, 8, 8))(x) >= 0).all()
    assert (ConvReg((2, 8, 16, 16), (2, 12, 8, 8), use_relu=False)(x) < 0).any()
    with pytest.raises(ValueError, match="ConvReg"):
        ConvReg((2, 8, 4, 4), (2, 12, 32, 32))
    assert set(down.state_dict()) == {
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked",
    }


def test_connectors_v2_and_embeds():
    shapes_s = [(2, 8, 16, 16), (2, 16, 8, 8)]
    shapes_t = [(2, 32, 16, 16), (2, 64, 8, 8)]
    conn = ConnectorV2(shapes_s, shapes_t)
    out = conn([torch.randn(*s) for s in shapes_s])
    assert [tuple(o.shape) for o in out] == shapes_t
    assert list(conn.state_dict())[:2] == ["connectors.0.0.weight", "connectors.0.1.weight"]

    x = torch.randn(4, 64, 1, 1)
    for module in (Embed(64, 16), MLPEmbed(64, 16)):
        e = module(x)
        assert e.shape == (4, 16)
        assert_close(e.norm(dim=1), torch.ones(4), rtol=FP32)
    assert set(Embed(64, 16).state_dict()) == {"linear.weight", "linear.bias"}
    assert set(MLPEmbed(64, 16).state_dict()) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    assert LinearEmbed(64, 16)(x).shape == (4, 16)
    assert (Regress(64, 10)(x) >= 0).all() and Regress(64, 10)(x).shape == (4, 10)
    assert Flatten()(x).shape == (4, 64)
    assert_close(Normalize(2)(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]), rtol=FP32)

    pool = PoolEmbed(layer=2, dim_out=16)
    assert pool(torch.randn(2, 32, 16, 16)).shape == (2, 16)
    assert "embed.Linear.weight" in pool.state_dict()
    assert PoolEmbed(layer=4, dim_out=16)(torch.randn(2, 64)).shape == (2, 16)


def test_paraphraser_with_bn_and_translator_without():
    para = Paraphraser((2, 16, 8, 8), use_bn=True)
    assert "encoder.1.running_mean" in para.state_dict() and "decoder.7.weight" in para.state_dict()
    trans = Translator((2, 8, 8, 8), (2, 16, 8, 8), use_bn=False)
    assert set(trans.state_dict()) == {f"encoder.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    assert trans(torch.randn(2, 8, 8, 8)).shape == (2, 8, 8, 8)
