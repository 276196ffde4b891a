"""The methods' options (issue 13): each method declares its ``Options`` dataclass once, the
flags of train_student.py are generated from it (shared groups once), and ``options_from``
reads the dataclass back from a parsed command line."""
from __future__ import annotations

import argparse
import dataclasses
from collections import Counter

import pytest
import torch

from common.declare import add_option_groups, option, options_from
from common.errors import UserError
from crd.options import BankOptions, NCEOptions
from distiller_zoo.options import EmbedOptions
from distiller_zoo.registry import BuildContext
from engine.methods import build_distiller, get_method, method_names
from models import build_model
import train_student

# The flags of the option groups several methods share.
SHARED_FLAGS = ["--feat_dim", "--nce_m", "--nce_scores", "--nce_k", "--nce_t", "--nce_z_momentum", "--mode"]


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return train_student.build_parser()


def _actions_by_flag(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_every_method_declares_a_dataclass_whose_fields_are_flags(parser):
    actions = _actions_by_flag(parser)
    defaults = parser.parse_args([])
    names = method_names()
    assert {"kd", "hint", "crd", "wcord", "crcd", "dcd", "dkd"} <= set(names)  # both packages' methods
    for name in names:
        cls = get_method(name).Options
        assert dataclasses.is_dataclass(cls), name
        for f in dataclasses.fields(cls):
            action = actions.get(f"--{f.name}")
            assert action is not None, f"--distill {name}: option {f.name} is not a flag"
            assert action.dest == f.name and action.default == f.default, (name, f.name, action.default, f.default)
        # nothing given on the command line: the declared defaults
        assert options_from(cls, defaults) == cls(), name


@pytest.mark.parametrize("method, argv, expected", [
    ("crd", ["--nce_k", "32", "--nce_t", "0.1", "--mode", "relax"], dict(nce_k=32, nce_t=0.1, mode="relax")),
    ("crd", ["--feat_dim", "64", "--nce_m", "0.25", "--nce_z_momentum", "0.99", "--nce_scores", "gather"],
     dict(feat_dim=64, nce_m=0.25, nce_z_momentum=0.99, nce_scores="gather")),
    ("dkd", ["--dkd_T", "2"], dict(dkd_T=2.0)),
    ("hint", ["--hint_layer", "1"], dict(hint_layer=1)),
    ("crcd", ["--crcd_k", "7", "--feat_dim", "16"], dict(crcd_k=7, feat_dim=16)),
    ("wcord", ["--wcord_iters", "30", "--nce_k", "8"], dict(wcord_iters=30, nce_k=8)),
])
def test_options_from_reads_the_command_line(parser, method, argv, expected):
    cls = get_method(method).Options
    options = options_from(cls, parser.parse_args(["--distill", method, *argv]))
    # the given values, the declared defaults for the rest (the namespace holds every method's flags)
    assert options == cls(**expected)
    for name, value in expected.items():
        got = getattr(options, name)
        assert got == value and type(got) is type(value), (name, got)  # parsed to the field's type


def test_options_from_keeps_defaults_for_missing_values_and_takes_overrides():
    assert options_from(NCEOptions, argparse.Namespace()) == NCEOptions()
    options = options_from(NCEOptions, argparse.Namespace(nce_k=5, mode="relax"), nce_k=9)
    assert options == NCEOptions(nce_k=9, mode="relax")


@dataclasses.dataclass
class _Left:
    """left"""

    width: int = option(3, "a width")


@dataclasses.dataclass
class _Right:
    """right"""

    width: int = option(4, "another width")


def test_a_flag_declared_by_two_unrelated_groups_is_a_type_error():
    with pytest.raises(TypeError, match=r"--width is declared twice \(_Left, _Right\)"):
        add_option_groups(argparse.ArgumentParser(), [_Left, _Right])
    # groups that share it through a common base declare it once
    parser = argparse.ArgumentParser()
    add_option_groups(parser, [NCEOptions, BankOptions, EmbedOptions, get_method("crcd").Options,
                               get_method("dcd").Options])
    assert Counter(flag for a in parser._actions for flag in a.option_strings)["--feat_dim"] == 1
    assert parser.parse_args(["--feat_dim", "12"]).feat_dim == 12


def test_shared_flags_appear_once(parser):
    counts = Counter(flag for action in parser._actions for flag in action.option_strings)
    for flag in SHARED_FLAGS:
        assert counts[flag] == 1, flag
    assert max(counts.values()) == 1  # no flag at all twice
    # each shared group is one argument group, titled with every method that uses it
    titles = {action.dest: group.title for group in parser._action_groups for action in group._group_actions}
    assert titles["feat_dim"] == "the embedding heads (--distill correlation, crcd, crd, dcd, rrd, wcord)"
    assert titles["nce_m"] == titles["nce_scores"] == "the memory banks (--distill crcd, crd, wcord)"
    assert titles["mode"] == "CRD's NCE critic (--distill crd, wcord)"
    assert titles["nce_k"] == "the negatives (CRD's drawn samples, RRD's queue) (--distill crd, rrd, wcord)"


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return build_model("resnet8", num_classes=10), build_model("resnet14", num_classes=10).eval()


@pytest.mark.parametrize("method", ["crd", "wcord", "crcd"])
def test_a_bank_method_without_n_data_is_a_user_error(pair, method):
    student, teacher = pair
    sample = torch.randn(2, 3, 32, 32)
    with pytest.raises(UserError, match=f"--distill {method} needs the number of training samples"):
        build_distiller(method, None, student, teacher, sample)
    negatives = {"crcd_k": 8} if method == "crcd" else {"nce_k": 8}  # fewer than the 20 samples
    distiller = build_distiller(method, get_method(method).Options(**negatives), student, teacher, sample, n_data=20)
    assert distiller.criterion.contrast.memory_v1.shape[0] == 20  # one bank row per sample


def test_training_set_size():
    ctx = BuildContext((torch.Size([2, 64]),), (torch.Size([2, 64]),), num_classes=10)
    with pytest.raises(UserError, match="--distill crd needs"):
        ctx.training_set_size("crd")
    assert dataclasses.replace(ctx, n_data=50).training_set_size("crd") == 50
    assert ctx.s_dim == ctx.t_dim == 64 and ctx.n_data is None
