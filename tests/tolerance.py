"""The tolerance policy of the whole test suite: one rule for every float comparison.

A result ``actual`` matches its reference ``expected`` when, element by element,

    |actual - expected| <= rtol * max(|expected|, magnitude)

where ``magnitude`` is the size of the quantity: by default the largest ``|expected|`` of the
tensor (or list), or ``scale``, the size of the quantity's family, where the reference itself can
be near zero by cancellation (a loss whose student and teacher nearly agree, a sum of terms of
both signs, a gradient at a near-minimum): e.g. the largest value of that loss over the cases,
or the size of the terms it is computed from. Floating-point rounding is proportional to the
size of the numbers a result is computed from, not to the result, so a reference near zero
never gets a zero absolute tolerance, and a result far from zero is checked relatively.
Elements much smaller than the magnitude get its absolute tolerance: they carry the rounding of
the large ones (a feature map whose values reach tens, a matrix product's small entries). Pass
a smaller ``scale`` for a tensor whose elements span orders of magnitude and are each computed
to a relative precision (e.g. exp of scores), to check its small elements relatively.

``rtol`` by computation (eps: 2.2e-16 in float64, 1.2e-7 in float32, 3.9e-3 in bf16):

- :data:`FP64` 1e-10: float64 ops and reductions, the same formula written two ways.
- :data:`FP32_EXACT` 1e-6: float32, the same arithmetic where only the order of a few short sums
  may differ (inference mode vs no_grad, one teacher vs two identical ones, the same pixels
  normalised by two pipelines).
- :data:`FP32` 1e-5: float32 ops and reductions (a GEMM's sums of ~1000 products), exp, log and
  normalisations of their results, a few layers; the same values from another kernel or order
  (CPU ISAs, oneDNN vs MKL, chunks, matmul vs gather, GPU vs CPU).
- :data:`FP32_DEEP` 1e-4: float32 through whole networks or long chains of ops, and results
  made by other code (RepDistiller's goldens, torchvision's models, folded BatchNorm).
  Gradients through such chains: :data:`FP32_DEEP_GRAD` 1e-3 (a gradient is the difference of
  nearly equal sums more often than a forward value is).
- :data:`AMP` 2e-2: a loss under bf16 or fp16 autocast against its fp32 value on the same batch
  (the README's bound: the networks run in 16 bits, the losses' sensitive parts in fp32).

Exact results (integer counts, bitwise reproducibility, the same ops on the same inputs) are
checked with ``torch.equal`` / ``==``, not here; convergence bounds (Sinkhorn's marginals, power
iteration) and statistical ones (sampling counts) are not rounding, and the tests state them
where they are used.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import pytest
import torch

FP64 = 1e-10
FP32_EXACT = 1e-6
FP32 = 1e-5
FP32_DEEP = 1e-4
FP32_DEEP_GRAD = 1e-3
AMP = 2e-2

Number = Union[int, float]
Value = Union[torch.Tensor, Number, Sequence[Number]]


def magnitude(expected: Value, scale: float | None = None) -> float:
    """The size of a quantity: the largest ``|expected|`` (float64), or ``scale`` when larger.
    Raises ValueError when both are zero: a zero reference needs its family's ``scale``."""
    ref = torch.as_tensor(expected, dtype=torch.float64) if not isinstance(expected, torch.Tensor) \
        else expected.detach().to("cpu", torch.float64)
    finite = ref[torch.isfinite(ref)]
    size = float(finite.abs().max()) if finite.numel() else 0.0
    if scale is not None:
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be positive and finite, got {scale}")
        size = max(size, float(scale))
    if size == 0.0:
        raise ValueError("the reference is zero: give scale=, the size of the quantity's terms or family")
    return size


def assert_close(actual: Value, expected: Value, *, rtol: float, scale: float | None = None,
                 msg: str | None = None) -> None:
    """Assert ``|actual - expected| <= rtol * max(|expected|, magnitude)`` elementwise (the module's
    policy; ``magnitude`` is :func:`magnitude` of ``expected`` and ``scale``). Shapes must be equal,
    and dtypes when both are tensors; devices may differ (both are compared on the CPU in float64).
    NaN or infinity must sit at the same places with the same values."""
    prefix = f"{msg}: " if msg else ""
    if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{prefix}dtype {actual.dtype} != {expected.dtype}"
    got = torch.as_tensor(actual.detach() if isinstance(actual, torch.Tensor) else actual).to("cpu", torch.float64)
    ref = torch.as_tensor(expected.detach() if isinstance(expected, torch.Tensor) else expected).to("cpu", torch.float64)
    assert got.shape == ref.shape, f"{prefix}shape {tuple(got.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    same_special = torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(got[torch.isinf(ref)],
                                                                                  ref[torch.isinf(ref)])
    assert same_special and torch.isfinite(got[finite]).all(), f"{prefix}non-finite values differ"
    size = magnitude(ref, scale)
    allowed = rtol * torch.clamp(ref[finite].abs(), min=size)
    error = (got[finite] - ref[finite]).abs()
    bad = error > allowed
    if bad.any():
        worst = int((error / allowed).argmax())
        position = tuple(int(i) for i in torch.nonzero(finite)[worst]) if ref.dim() else ()
        raise AssertionError(
            f"{prefix}{int(bad.sum())} of {error.numel()} elements differ beyond rtol {rtol:g} of "
            f"max(|expected|, {size:.3g}); worst at {position}: {float(got[finite][worst]):.9g} vs "
            f"{float(ref[finite][worst]):.9g} (error {float(error[worst]):.3g}, allowed {float(allowed[worst]):.3g})")


def approx(expected: Number | Sequence[Number], *, rtol: float, scale: float | None = None):
    """``pytest.approx`` with the module's policy, for Python floats (and sequences of them):
    ``x == approx(e, rtol=...)`` holds when ``|x - e| <= rtol * max(|e|, magnitude)``."""
    return pytest.approx(expected, rel=rtol, abs=rtol * magnitude(expected, scale))

