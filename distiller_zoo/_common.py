"""Small helpers shared by the losses: shapes, and float32 islands for mixed precision."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F

LOW_PRECISION = (torch.float16, torch.bfloat16)
Fn = TypeVar("Fn", bound=Callable[..., Any])


def pool_to_smaller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool whichever of two maps [B, C, H, W] is taller to the other's spatial size
    (RepDistiller's rule for AT, FT, NST, VID and FSP; channel counts are left alone)."""
    if a.shape[2] > b.shape[2]:
        a = F.adaptive_avg_pool2d(a, b.shape[2:])
    elif a.shape[2] < b.shape[2]:
        b = F.adaptive_avg_pool2d(b, a.shape[2:])
    return a, b


def detached(feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The teacher's features cut from any graph: distillation never trains the teacher."""
    return [f.detach() for f in feats]


def channels(shapes: Sequence[Sequence[int]]) -> list[int]:
    """Channel counts of a list of map shapes [B, C, H, W]."""
    return [int(shape[1]) for shape in shapes]


def to_fp32(x: Any) -> Any:
    """``x`` with every fp16/bf16 tensor cast to float32 (looking into lists and tuples); float32
    and float64 tensors, integer tensors and other values are returned unchanged."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in LOW_PRECISION else x
    if type(x) in (list, tuple):
        return type(x)(to_fp32(v) for v in x)
    return x


def _first_tensor(values: Sequence[Any]) -> torch.Tensor | None:
    """The first tensor in ``values``, looking into lists and tuples (None if there is none)."""
    for v in values:
        found = v if isinstance(v, torch.Tensor) else _first_tensor(v) if isinstance(v, (list, tuple)) else None
        if found is not None:
            return found
    return None


def fp32(fn: Fn) -> Fn:
    """Decorator for the numerically sensitive part of a loss (softmax / KL, exp and log of
    similarities, Gram matrices, normalisations, distances, SVD): ``fn`` runs with autocast off
    and its fp16/bf16 tensor arguments (also inside lists and tuples) cast to float32, so under
    ``torch.autocast`` it computes and returns float32. Without autocast and with float32 inputs
    it changes nothing (not a single value)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = tuple(to_fp32(a) for a in args)
        kwargs = {k: to_fp32(v) for k, v in kwargs.items()}
        first = _first_tensor(args + tuple(kwargs.values()))
        with torch.autocast(device_type="cpu" if first is None else first.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
