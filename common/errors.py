"""User-facing errors: one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user. The message says what is wrong and what to do about it."""


class Stopped(Exception):
    """The run stopped on purpose (a signal); its message is printed and the process exits with
    ``exit_code`` (128 + the signal's number, the shell's convention)."""

    exit_code = 1


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a script's ``main`` so that a :class:`UserError` prints ``error: <message>`` on
    stderr and exits with status 2 instead of showing a traceback (a :class:`Stopped` run prints
    its message and exits with its own status)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except Stopped as stop:
            print(str(stop), file=sys.stderr, flush=True)
            sys.exit(stop.exit_code)

    return wrapped
