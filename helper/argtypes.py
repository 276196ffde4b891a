"""Checked ``type=`` functions for command-line flags: each parses one value and refuses, with a
message naming the valid range, values outside it, NaN and infinities. argparse turns the
refusal into ``argument --flag: <message>``, which the scripts' parser prints as one
``error: ...`` line (exit status 2).

This module imports nothing of the project, so every layer (the methods' declared options
included) can use it.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable


def _number(text: str, kind: type) -> float | int:
    try:
        return kind(text)
    except (TypeError, ValueError):
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None


def float_in(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
             high_open: bool = False, name: str | None = None) -> Callable[[str], float]:
    """A ``type=`` function for a finite float between ``low`` and ``high`` (each end included
    unless ``low_open`` / ``high_open``; an infinite end means no bound on that side)."""
    bounds = []
    if low > -math.inf:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high < math.inf:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    if low > -math.inf and high < math.inf:
        wanted = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    else:
        wanted = " ".join(["a finite number"] + bounds)

    def parse(text: str) -> float:
        value = float(_number(text, float))
        too_low = value < low or (low_open and value == low)
        too_high = value > high or (high_open and value == high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = name or "float"
    parse.wanted = wanted  # type: ignore[attr-defined]  (for help texts and tests)
    return parse


def int_at_least(low: int, *, name: str | None = None) -> Callable[[str], int]:
    """A ``type=`` function for an integer ``>= low``."""

    def parse(text: str) -> int:
        value = int(_number(text, int))
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
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
                                         f"{' or '.join(bad)}; got {text!r}")
    return text


def nonfinite_floats(namespace: argparse.Namespace) -> list[tuple[str, float]]:
    """``(dest, value)`` of every float in ``namespace`` (or in a list value) that is NaN or
    infinite."""
    found = []
    for dest, value in vars(namespace).items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                found.append((dest, item))
                break
    return found
