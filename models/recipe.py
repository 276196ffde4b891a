"""A backbone's training-recipe facts, declared beside its constructor with :func:`recipe`."""
from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

LEARNING_RATE = 0.05  # RepDistiller's --learning_rate, for a backbone that declares none


def recipe(*, learning_rate: float) -> Callable[[F], F]:
    """Decorator: the network of the constructor it decorates trains at ``learning_rate`` when
    ``--learning_rate`` is left out (read back by :func:`models.default_learning_rate`)."""

    def wrap(constructor: F) -> F:
        constructor.learning_rate = learning_rate  # type: ignore[attr-defined]
        return constructor

    return wrap
