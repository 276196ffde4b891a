"""Checked ``type=`` functions for command-line flags: each parses one value and refuses, with a
message naming the valid range, values outside it, NaN and infinities, and (for the floats that
training computes with) values that float32 cannot hold. argparse turns the
refusal into ``argument --flag: <message>``, which the scripts' parser prints as one
``error: ...`` line (exit status 2).

This module imports nothing of the project, so every layer (the methods' declared options
included) can use it.
"""
from __future__ import annotations

import argparse
import math
import struct
from typing import Any, Callable

# The largest finite float32 (torch.finfo(torch.float32).max): the learning rate, the loss weights,
# the temperatures and the methods' constants all end up in float32 tensor arithmetic.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 2.0**-149  # its smallest positive number (a subnormal): anything below half of it becomes 0
# How many characters of a value a message shows (a value is never repeated whole: it may be huge).
SHOWN_CHARS = 40


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``repr(text)``, cut to its first ``limit`` characters (then ``...`` and the full length):
    what a message shows of a value, however long the value is."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


def to_float32(value: float) -> float | None:
    """``value`` rounded to float32 (to nearest, as torch rounds a Python float), or None where
    it is beyond float32's finite range."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return None


def _number(text: str, kind: type) -> float | int:
    try:
        return kind(text)
    except (TypeError, ValueError):
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {name}, got {shown(text)}") from None


def float_in(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
             high_open: bool = False, name: str | None = None, float32: bool = True) -> Callable[[str], float]:
    """A ``type=`` function for a finite float between ``low`` and ``high`` (each end included
    unless ``low_open`` / ``high_open``; an infinite end means no bound on that side). With
    ``float32`` (the default: the value is used in float32 arithmetic) the value must also stay
    in that range once rounded to float32: at most :data:`FLOAT32_MAX` in size, and not a
    positive number that becomes 0 (or an end that the range leaves out, e.g. 0.99999999999
    becomes 1) in float32."""
    bounds = []
    if low > -math.inf:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high < math.inf:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    if low > -math.inf and high < math.inf:
        wanted = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    else:
        wanted = " ".join(["a finite number"] + bounds)

    def inside(value: float) -> bool:
        return (value > low or (not low_open and value == low)) and (value < high or (not high_open and value == high))

    def parse(text: str) -> float:
        value = float(_number(text, float))
        if not math.isfinite(value) or not inside(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {shown(text)}")
        if float32:
            rounded = to_float32(value)
            if rounded is None:
                raise argparse.ArgumentTypeError(f"expected {wanted} that float32 holds (|x| <= {FLOAT32_MAX:.4g}), "
                                                 f"got {shown(text)}")
            if not inside(rounded):
                smallest = f" (its smallest positive number is {FLOAT32_TINY:.4g})" if rounded == 0 else ""
                raise argparse.ArgumentTypeError(f"expected {wanted}, got {shown(text)}, which is {rounded:g} in "
                                                 f"float32{smallest}")
        return value

    parse.__name__ = name or "float"
    parse.wanted = wanted  # type: ignore[attr-defined]  (for help texts and tests)
    return parse


def int_at_least(low: int, *, name: str | None = None) -> Callable[[str], int]:
    """A ``type=`` function for an integer ``>= low``."""

    def parse(text: str) -> int:
        value = int(_number(text, int))
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {shown(text)}")
        return value

    parse.__name__ = name or "int"
    parse.wanted = f"an integer >= {low}"  # type: ignore[attr-defined]
    return parse


finite_float = float_in(name="finite_float")
positive_float = float_in(0.0, low_open=True, name="positive_float")
nonnegative_float = float_in(0.0, name="nonnegative_float")
unit_interval = float_in(0.0, 1.0, name="unit_interval")  # [0, 1]
momentum_float = float_in(0.0, 1.0, high_open=True, name="momentum_float")  # [0, 1)
positive_int = int_at_least(1, name="positive_int")
nonnegative_int = int_at_least(0, name="nonnegative_int")

# Characters that would make a name a path of several parts (or end it early, for NUL).
PATH_SEPARATORS = ("/", "\\", "\0")


def path_part(text: str) -> str:
    """A ``type=`` function for a value that becomes part of a file or folder name (e.g.
    ``--trial``): no path separator (``/``, ``\\``) and no NUL, so the name stays inside
    its parent folder."""
    bad = [repr(c) for c in PATH_SEPARATORS if c in text]
    if bad:
        raise argparse.ArgumentTypeError(f"becomes part of the run folder's name, so it cannot hold "
                                         f"{' or '.join(bad)}; got {shown(text)}")
    return text


def nonfinite_floats(namespace: argparse.Namespace, float32: bool = False) -> list[tuple[str, Any]]:
    """``(dest, value)`` of every float in ``namespace`` (or in a list value) that is NaN or
    infinite, or with ``float32`` also beyond float32's finite range (see :func:`to_float32`)."""
    found = []
    for dest, value in vars(namespace).items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and (not math.isfinite(item) or (float32 and to_float32(item) is None)):
                found.append((dest, item))
                break
    return found
