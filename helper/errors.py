"""User-facing errors: one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user. The message says what is wrong and what to do about it."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a script's ``main`` so that a :class:`UserError` prints ``error: <message>`` on
    stderr and exits with status 2 instead of showing a traceback."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapped
