"""Options from and to configuration files: the values a file (``--config``: YAML, or a run's
``args.json``, read by :func:`engine.config_file.load_config`) gives a parser's options, each
checked and converted as the command line converts its flag, and ``--print_config``, which
prints a command line's resolved options as such a file."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import sys
from typing import TYPE_CHECKING, Any, Callable, Collection

import yaml

from common.argtypes import SHOWN_CHARS, shown
from engine.config_file import ConfigError
from engine.logger import ONE_INVOCATION, derived_options

if TYPE_CHECKING:
    from engine.options import Parser

# Options written comma-separated on the command line: a configuration file may give a list.
COMMA_LISTS = frozenset({"lr_decay_epochs", "path_t"})
# Entries of a run's args.json that are derived or recorded values, not options (this version
# records the first four; earlier ones also wrote n_data, num_classes and model_t; print_config
# is False in a run that a script's parse_option made without its main): a replay ignores them.
RECORDED_KEYS = frozenset({"arch", "model_name", "save_path", "command", "n_data", "num_classes", "model_t",
                           "print_config", "derived"})
# Flags about the configuration itself: not options of a run, never in a configuration file.
CONFIG_FLAGS = ("config", "print_config")
# What --print_config prints: the options of the run's method (and the shared ones), or all.
PRINT_CONFIG = ("method", "all")


def _value_parts(value: Any):
    """The pieces of :func:`value_text`'s rendering of ``value``, produced lazily."""
    if isinstance(value, str):
        yield shown(value)
    elif value is None or isinstance(value, bool):
        yield json.dumps(value)
    elif isinstance(value, dict):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            yield ", " if i else ""
            yield from _value_parts(key)
            yield ": "
            yield from _value_parts(item)
        yield "}"
    elif isinstance(value, (list, tuple, set)):
        yield "["
        for i, item in enumerate(value):
            yield ", " if i else ""
            yield from _value_parts(item)
        yield "]"
    elif isinstance(value, (bytes, bytearray)):
        yield f"{bytes(value[:SHOWN_CHARS])!r}..." if len(value) > SHOWN_CHARS else repr(bytes(value))
    else:  # a number, or a date (YAML timestamps)
        try:
            yield str(value)
        except ValueError:  # an integer beyond Python's digit limit for str()
            yield "(an integer too long to show)"


def value_text(value: Any, limit: int = 2 * SHOWN_CHARS) -> str:
    """``value`` (from a configuration file) as a message shows it: JSON's ``true``, ``null``
    and lists, strings quoted as the flags' messages quote them, cut after about ``limit``
    characters. The rendering stops there: a huge value costs no more than a small one."""
    text = ""
    for part in _value_parts(value):
        text += part
        if len(text) > limit:
            return text[:limit] + "..."
    return text


def config_value(action: argparse.Action, value: Any, recorded: bool = False) -> Any:
    """The configuration file's ``value`` for ``action``'s flag, checked and converted as the
    command line converts the flag's text (its ``type=`` function and ``choices``); a switch
    takes ``true``/``false``, ``null`` is accepted where the flag's default is None, and a list
    where the flag is comma-separated. ``recorded``: the file is a run's args.json, whose
    integers stay integers (see below). Raises ValueError with the reason."""
    if action.nargs == 0:  # a switch (store_true)
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false (a switch), got {value_text(value)}")
        return value
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f"expected a value, got null (leave the key out for the default, {action.default!r})")
    if isinstance(value, list) and action.dest in COMMA_LISTS:
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError(f"expected a list of values, got {value_text(value)}")
        value = ",".join(str(v) for v in value)
    if isinstance(value, (bool, list, dict)):
        raise ValueError(f"expected one value, got {value_text(value)}")
    text = value if isinstance(value, str) else str(value)
    parse = action.type or str
    try:
        result = parse(text)
    except argparse.ArgumentTypeError as err:
        raise ValueError(str(err)) from None
    except (TypeError, ValueError):
        raise ValueError(f"invalid {getattr(parse, '__name__', 'value')} value: {shown(text)}") from None
    if action.choices is not None and result not in action.choices:
        raise ValueError(f"invalid choice: {value_text(result)} (choose from {', '.join(map(repr, action.choices))})")
    # A number in a file is the flag given on the command line: `b: 0` is -b 0, 0.0 (folder name
    # 'b:0.0'), `r: 1` is -r 1, 1.0. An integer stays one only where it is what the run itself
    # recorded (args.json: a left-out -r is RepDistiller's int 1, folder 'r:1') or the flag's own
    # integer default (kd_T: 4), which is what leaving the key out gives.
    if type(value) is int and isinstance(result, float) and result == value and (
            recorded or (type(action.default) is int and action.default == value)):
        return value
    return result


def seed_of_trial(trial: Any) -> int:
    """The seed a run gets when ``--seed`` is left out: its ``--trial`` if that is an integer,
    else the sum of the trial name's character codes."""
    trial = str(trial)
    return int(trial) if trial.lstrip("-").isdigit() else sum(map(ord, trial))


def option_values(data: dict[str, Any], actions: list[argparse.Action], where: str, recorded: bool,
                  derived: Collection[str] = ()) -> dict[str, Any]:
    """The values ``data`` (a configuration file's mapping; ``where`` names the file) gives the
    options of ``actions``, by ``dest``, each checked and converted by :func:`config_value`. A
    key is a flag's name (``nce_k``, ``gamma``) or any spelling of the flag without its dashes
    (``r`` for ``-r``). Keys ignored: ``derived`` (see :func:`rederived`), and in a run's record
    (``recorded``) its :data:`RECORDED_KEYS` and ``resume``/``overwrite`` (acts of one
    invocation, recorded by earlier versions), which a YAML file may give only as null/false.
    A problem raises :class:`ConfigError` naming the key."""
    by_key = {}
    for action in actions:
        by_key[action.dest] = action
        by_key.update((flag.lstrip("-"), action) for flag in action.option_strings)
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for key, value in data.items():
        key = str(key)
        if (recorded and key in RECORDED_KEYS) or key in derived:
            continue
        if key in ONE_INVOCATION:  # recorded by earlier versions (args.json, --print_config): never replayed
            if recorded or value in (None, False):
                continue
            raise ConfigError(f"{where}: '{key}' cannot be set in a configuration file: it acts on one invocation "
                              f"(give --{key} on the command line)")
        if key in CONFIG_FLAGS:
            raise ConfigError(f"{where}: '{key}' cannot be set in a configuration file (give --{key} on the command "
                              "line)")
        action = by_key.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(by_key), n=1) if len(key) <= 100 else []
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown option {shown(key)}{hint} (keys are the flags' names, e.g. nce_k "
                              "for --nce_k)")
        if action.dest in keys:
            raise ConfigError(f"{where}: '{keys[action.dest]}' and '{key}' both set "
                              f"{'/'.join(action.option_strings)}")
        keys[action.dest] = key
        try:
            values[action.dest] = config_value(action, value, recorded)
        except ValueError as err:
            raise ConfigError(f"{where}: {key} ({'/'.join(action.option_strings)}): {err}") from None
    return values


def rederived(data: dict[str, Any], where: str) -> tuple[set[str], tuple[Any, Any] | None]:
    """The options a run's args.json (``data``) lists as derived (filled in because they were
    left out): a replay leaves them out, so that they are derived again (a new ``--trial`` gets
    its own seed). An args.json of an earlier version has no list: its seed is taken as derived
    when it is the one its trial gives and its command line did not give ``--seed``. Second: the
    ``(trial, seed)`` of a seed the replay keeps, to warn when another trial would repeat it."""
    listed = data.get("derived")
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
            raise ConfigError(f"{where}: 'derived' is not a list of option names (a run's args.json has one)")
        names = set(listed)
    else:
        command = data.get("command") if isinstance(data.get("command"), list) else []
        explicit = any(str(arg).split("=")[0] == "--seed" for arg in command)
        names = set()
        if "seed" in data and "trial" in data and not explicit:
            try:
                names = {"seed"} if data["seed"] == seed_of_trial(data["trial"]) else set()
            except (TypeError, ValueError):
                names = set()
    kept = (data.get("trial"), data["seed"]) if "seed" not in names and data.get("seed") is not None else None
    return names, kept


def with_print_config(parse_option: Callable[[list[str] | None], argparse.Namespace],
                      build_parser: Callable[[], Parser],
                      not_used: Callable[[argparse.Namespace], Collection[str]] | None = None
                      ) -> Callable[[list[str] | None], argparse.Namespace]:
    """A script's ``parse_option`` that, for ``--print_config``, prints the options it resolved
    (finalised as for a run: published weights, learning rate, seed, ...) as YAML that
    ``--config`` accepts, the notes it printed while parsing as comments on top, and exits with
    status 0 before anything is built or written. ``print_config`` is removed from the options.

    ``not_used(opt)``: the options that do nothing in the run of ``opt`` (train_student.py: the
    other methods' options); ``--print_config`` leaves out those that hold their defaults (the
    file then reads back to the same options), ``--print_config all`` prints them too."""

    def parse(argv: list[str] | None = None) -> argparse.Namespace:
        notes, opt = io.StringIO(), None
        try:
            with contextlib.redirect_stdout(notes):
                opt = parse_option(argv)
        finally:
            printing = getattr(opt, "print_config", False)  # False, "method" or "all"
            if not printing:
                sys.stdout.write(notes.getvalue())
        if hasattr(opt, "print_config"):
            del opt.print_config
        if printing:
            comments = "".join(f"# {line}\n" for line in notes.getvalue().splitlines())
            derived = derived_options(opt)
            if derived:  # printed as null: read back, they are derived again
                comments += ("# left out, so derived when it runs (null below): "
                             + ", ".join(f"{name} {value}" for name, value in derived.items()) + "\n")
            parser = build_parser()
            options = parser.resolved_options(opt)
            if printing != "all" and not_used is not None:
                left_out = set(not_used(opt))
                defaults = vars(parser.parse_args([]))  # as parsed: a default's text converted by its type
                options = {k: v for k, v in options.items()
                           if k not in left_out or not _same(v, defaults.get(k))}
            sys.stdout.write(comments + config_text(options))
            sys.stdout.flush()
            raise SystemExit(0)
        return opt

    return parse


def _same(value: Any, default: Any) -> bool:
    """Whether an option's ``value`` is its ``default`` (of the same type: 1 and 1.0 differ)."""
    return type(value) is type(default) and value == default


class ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that writes a value shared by two options out twice: never an alias,
    which :class:`ConfigLoader` refuses."""

    def ignore_aliases(self, data):
        return True


def config_text(options: dict[str, Any]) -> str:
    """``options`` as the YAML text of a configuration file (lists on one line)."""
    return yaml.dump(options, Dumper=ConfigDumper, sort_keys=False, default_flow_style=None, allow_unicode=True)
