"""The other libraries' method goldens (``tests/fixtures/method_goldens.pt``; what each holds and how
it was made: ``tests/fixtures/method_goldens.md``): the reference code's inputs, module states,
outputs and gradients per method. Large tensors are stored as a numpy seed recipe plus a digest:
:func:`tensor` rebuilds them (and checks the digest), :func:`assert_matches` compares a computed
tensor with a stored tensor or a digest."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

PATH = Path(__file__).parent / "fixtures" / "method_goldens.pt"


@lru_cache(maxsize=1)
def _all() -> dict[str, Any]:
    return torch.load(PATH, weights_only=True)


def method(name: str) -> dict[str, Any]:
    """The golden entry of ``name`` as the file names it (``"ITRD"``, ``"ReviewKD"``, ...)."""
    return _all()["methods"][name]


def from_recipe(recipe: dict[str, Any]) -> torch.Tensor:
    """``x = RandomState(seed).standard_normal(prod(shape))``, scaled (``scale``, or ``scale /
    sqrt(fan_in)`` when ``fan_in_scaled``) and shifted in float64, cast to float32, clamped at 0
    when ``relu`` (the storage rule of method_goldens.md)."""
    shape = list(recipe["shape"])
    x = np.random.RandomState(recipe["seed"]).standard_normal(int(np.prod(shape))).reshape(shape)
    if recipe.get("fan_in_scaled"):
        x = x * recipe["scale"] / np.sqrt(np.prod(shape[1:]))
    else:
        x = x * recipe["scale"] + recipe["shift"]
    t = torch.from_numpy(x.astype(np.float32))
    return t.clamp(min=0) if recipe.get("relu") else t


def tensor(value: Any) -> torch.Tensor:
    """A stored tensor as it is, or one rebuilt from its recipe (checked against its digest)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    t = from_recipe(value["recipe"])
    assert_matches(t, value["digest"], rtol=1e-6)
    return t


def inputs(entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every input of a method's entry as a tensor."""
    return {name: tensor(value) for name, value in entry["inputs"].items()}


def state(entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The reference module's state before the call, by its state_dict names."""
    return {name: tensor(value) for name, value in entry["state"].items()}


def assert_matches(got: torch.Tensor, want: Any, rtol: float = 1e-3, what: str = "") -> float:
    """``got`` equals ``want`` (a tensor, or a digest) within ``rtol`` of ``want``'s largest magnitude
    (a digest: its sums within ``rtol`` of its absolute sum, its sample elementwise); returns the
    largest difference relative to that magnitude."""
    got = got.detach().float()
    if isinstance(want, dict) and "digest" in want:
        want = want["digest"]
    if isinstance(want, dict):
        assert list(got.shape) == list(want["shape"]), f"{what}: shape {list(got.shape)} != {want['shape']}"
        scale = max(want["max_abs"], 1e-12)
        sample = got.flatten()[::want["stride"]]
        err = (sample - want["sample"].float()).abs().max().item() / scale
        d64 = got.double()
        sums = [(d64.sum().item(), want["sum"]), (d64.abs().sum().item(), want["abs_sum"]),
                (d64.pow(2).sum().item(), want["sq_sum"])]
        for value, ref in sums:
            assert abs(value - ref) <= rtol * max(want["abs_sum"], 1e-12) + 1e-6, f"{what}: sum {value} != {ref}"
        assert err <= rtol, f"{what}: sample differs by {err:.3g} of max |x|"
        return err
    want = want.float()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(want.abs().max().item(), 1e-12)
    err = (got - want).abs().max().item() / scale
    assert err <= rtol, f"{what}: differs by {err:.3g} of max |x| ({scale:.3g})"
    return err
