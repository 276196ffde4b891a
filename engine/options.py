"""Command-line flags shared by train_teacher.py and train_student.py (RepDistiller's, plus ours);
the data's flags come from :class:`dataset.DataOptions`, declared once. Option values can also
come from a configuration file (``--config``: YAML, or a run's ``args.json``), which the flags
given on the command line override; ``--print_config`` prints a command line's resolved options
as such a file."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Collection

import yaml

from common.argtypes import FLOAT32_MAX, SHOWN_CHARS, nonfinite_floats, positive_int, shown
from common.declare import add_option_groups, add_options
from common.errors import UserError
from common.runtime import RuntimeOptions
from dataset import DATASETS, TENSOR_DATASETS, DataOptions
from engine.logger import ONE_INVOCATION, derived_options, set_derived
from engine.optim import OptimOptions
from engine.state import FitOptions

# RepDistiller trains these students with lr 0.01 instead of 0.05.
SMALL_LR_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")

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
# A configuration file is flat (option: value, a value a scalar or a short list): bounds that no
# real one comes near, so that a hostile or broken file is refused before it costs time or memory.
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB
MAX_CONFIG_DEPTH = 10  # lists and mappings inside each other (a file needs 2)
MAX_CONFIG_NODES = 5000  # keys, values and list items of a YAML file (a file needs a few hundred)
# The longest error line the scripts print (the rest is cut): a message never repeats a whole input.
MAX_MESSAGE_CHARS = 1000


class ConfigRefused(yaml.MarkedYAMLError):
    """Valid YAML that a configuration file may not hold (an alias, nesting deeper than
    :data:`MAX_CONFIG_DEPTH`)."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data, no objects) with these changes for option values: only
    ``true``/``false`` are booleans (YAML 1.2's rule: ``amp: off`` is the string 'off', not
    YAML 1.1's False), a key given twice is refused instead of the last one silently winning, and
    aliases (``*name``: the "billion laughs" expand a few hundred bytes into gigabytes), nesting
    deeper than :data:`MAX_CONFIG_DEPTH` and more than :data:`MAX_CONFIG_NODES` values are
    refused (:class:`ConfigRefused`) as the document is composed, before anything is built."""

    _depth = 0
    _nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            name = event.anchor if len(event.anchor) <= SHOWN_CHARS else event.anchor[:SHOWN_CHARS] + "..."
            raise ConfigRefused(None, None, f"a YAML alias (*{name}) cannot be used in a configuration file; write "
                                            "the value out", event.start_mark)
        nested = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        if nested and self._depth >= MAX_CONFIG_DEPTH:
            raise ConfigRefused(None, None, f"lists or mappings nested deeper than {MAX_CONFIG_DEPTH} levels; a "
                                            "configuration file holds option: value lines", event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_CONFIG_NODES:
            raise ConfigRefused(None, None, f"more than {MAX_CONFIG_NODES:,} keys, values and list items; a "
                                            "configuration file holds option: value lines", event.start_mark)
        self._depth += nested
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= nested

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {shown(key)} given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


BOOL_TAG = "tag:yaml.org,2002:bool"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


class GivenOnce(argparse.Action):
    """Store the flag's value, refusing a second occurrence (``--config`` names one file)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} may be given once")
        setattr(namespace, self.dest, values)


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


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``error: ...``) with exit status 2. With
    ``--config FILE`` (see :func:`add_config_args`) the file's values replace the defaults and
    the flags given on the command line override them."""

    def error(self, message: str):
        """Print ``message`` as one ``error:`` line (its line breaks joined, cut to
        :data:`MAX_MESSAGE_CHARS`) and exit with status 2."""
        message = " ".join(message.splitlines())
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "... (cut)"
        self.exit(2, f"error: {message} (see --help)\n")

    def option_actions(self) -> list[argparse.Action]:
        """The actions of the options a configuration file may set (not ``--help``, ``--config``,
        ``--print_config``, nor the flags that act on one invocation, ``--resume`` and ``--overwrite``)."""
        return [a for a in self._actions
                if a.option_strings and a.dest not in (*CONFIG_FLAGS, *ONE_INVOCATION, "help")]

    def read_config(self, path: str) -> dict[str, Any]:
        """The option values of the configuration file ``path``, by ``dest``, each checked and
        converted by :func:`config_value`. A key is a flag's name (``nce_k``, ``gamma``) or
        any spelling of the flag without its dashes (``r`` for ``-r``). A ``.json`` file is read
        as a run's ``args.json``: its :data:`RECORDED_KEYS` and ``resume``/``overwrite`` (acts of one
        invocation, recorded by earlier versions) are ignored; a YAML file may give them only as
        null/false. Any problem is one ``error:`` line naming the file and the key (exit status
        2); so is a file larger than :data:`MAX_CONFIG_BYTES`, YAML aliases, and nesting deeper
        than :data:`MAX_CONFIG_DEPTH`."""
        where = f"--config {path}"
        file = Path(path)
        if not file.is_file():
            self.error(f"{where}: {'is a folder, not a file' if file.is_dir() else 'no such file'}")
        recorded = file.suffix.lower() == ".json"
        too_deep = (f"{where}: lists or objects nested deeper than {MAX_CONFIG_DEPTH} levels; a configuration file "
                    "holds option: value pairs")
        try:
            with file.open("rb") as stream:
                raw = stream.read(MAX_CONFIG_BYTES + 1)
            if len(raw) > MAX_CONFIG_BYTES:
                self.error(f"{where}: larger than {MAX_CONFIG_BYTES // 2**20} MiB; a configuration file holds "
                           "option: value lines (is it the right file?)")
            text = raw.decode("utf-8")
            # json.loads recurses once per level: deep JSON raises RecursionError, or is refused below.
            data = json.loads(text, object_pairs_hook=_unique_keys) if recorded else yaml.load(text, ConfigLoader)
        except OSError as err:
            self.error(f"{where}: cannot read it ({err.strerror or err})")
        except UnicodeDecodeError:
            self.error(f"{where}: not a text file (UTF-8)")
        except RecursionError:
            self.error(too_deep)
        except json.JSONDecodeError as err:
            self.error(f"{where}: not valid JSON ({err.msg}, line {err.lineno}, column {err.colno})")
        except ConfigRefused as err:
            mark = err.problem_mark
            self.error(f"{where}: line {mark.line + 1}, column {mark.column + 1}: {err.problem}")
        except yaml.YAMLError as err:
            self.error(f"{where}: not valid YAML ({_yaml_problem(err)})")
        except ValueError as err:  # a JSON key given twice; an integer beyond Python's digit limit
            if "digits" in str(err):
                self.error(f"{where}: an integer of more than {sys.get_int_max_str_digits()} digits; no option "
                           "takes one")
            self.error(f"{where}: {err}")
        if recorded and deeper_than(data, MAX_CONFIG_DEPTH):
            self.error(too_deep)
        if data is None:  # an empty file
            data = {}
        if not isinstance(data, dict):
            self.error(f"{where}: expected a mapping of option names to values (nce_k: 4096), "
                       f"got {type(data).__name__}")
        by_key = {}
        for action in self.option_actions():
            by_key[action.dest] = action
            by_key.update((flag.lstrip("-"), action) for flag in action.option_strings)
        values: dict[str, Any] = {}
        keys: dict[str, str] = {}
        rederived = self._rederived(data, where) if recorded else set()
        for key, value in data.items():
            key = str(key)
            if (recorded and key in RECORDED_KEYS) or key in rederived:
                continue
            if key in ONE_INVOCATION:  # recorded by earlier versions (args.json, --print_config): never replayed
                if recorded or value in (None, False):
                    continue
                self.error(f"{where}: '{key}' cannot be set in a configuration file: it acts on one invocation "
                           f"(give --{key} on the command line)")
            if key in CONFIG_FLAGS:
                self.error(f"{where}: '{key}' cannot be set in a configuration file (give --{key} on the command line)")
            action = by_key.get(key)
            if action is None:
                close = difflib.get_close_matches(key, list(by_key), n=1) if len(key) <= 100 else []
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self.error(f"{where}: unknown option {shown(key)}{hint} (keys are the flags' names, e.g. nce_k for "
                           "--nce_k)")
            if action.dest in keys:
                self.error(f"{where}: '{keys[action.dest]}' and '{key}' both set {'/'.join(action.option_strings)}")
            keys[action.dest] = key
            try:
                values[action.dest] = config_value(action, value, recorded)
            except ValueError as err:
                self.error(f"{where}: {key} ({'/'.join(action.option_strings)}): {err}")
        return values

    def _rederived(self, data: dict[str, Any], where: str) -> set[str]:
        """The options a run's args.json lists as derived (filled in because they were left
        out): a replay leaves them out, so that they are derived again (a new ``--trial`` gets its
        own seed). An args.json of an earlier version has no list: its seed is taken as derived
        when it is the one its trial gives and its command line did not give ``--seed``. A seed
        the replay keeps is remembered, to warn when another trial would repeat it."""
        self._replayed_seed = None
        listed = data.get("derived")
        if listed is not None:
            if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
                self.error(f"{where}: 'derived' is not a list of option names (a run's args.json has one)")
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
        if "seed" not in names and data.get("seed") is not None:
            self._replayed_seed = (data.get("trial"), data["seed"])
        return names

    def resolved_options(self, opt: argparse.Namespace) -> dict[str, Any]:
        """The values of ``opt`` for this parser's options, in the parser's order: what
        ``--print_config`` prints and ``--config`` reads back. Derived options (filled in
        because they were left out, see :func:`engine.logger.set_derived`) are null there: read
        back, they are derived again, as for the command line that left them out."""
        derived = derived_options(opt)
        return {a.dest: None if a.dest in derived else getattr(opt, a.dest)
                for a in self.option_actions() if hasattr(opt, a.dest)}

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parsing, with a ``--config`` file's values in place of the defaults (so
        that the flags given override them; ``opt`` keeps the values, not the file's name), then
        a check that no float option is NaN, infinite or beyond float32's range (flags with a
        checked ``type=`` from :mod:`common.argtypes` refuse them already; this covers any other)."""
        args = list(sys.argv[1:] if args is None else args)
        given = vars(namespace) if namespace is not None else {}
        self._replayed_seed = None
        namespace, extras = super().parse_known_args(args, argparse.Namespace(**given))
        path = getattr(namespace, "config", None)
        if path is not None:
            preset = argparse.Namespace(**{**given, **self.read_config(path)})
            namespace, extras = super().parse_known_args(args, preset)
            in_order = {a.dest: None for a in self._actions if hasattr(namespace, a.dest)}
            namespace = argparse.Namespace(**{**in_order, **vars(namespace)})  # the parser's order, as without a file
            replayed = getattr(self, "_replayed_seed", None)
            if replayed is not None and namespace.seed == replayed[1] and str(namespace.trial) != str(replayed[0]):
                print(f"warning: --config {path}: --trial {namespace.trial} runs with seed {namespace.seed}, the seed of "
                      f"its trial {replayed[0]}, so it repeats that run's draws; give --seed for another one",
                      file=sys.stderr, flush=True)
        if hasattr(namespace, "config"):
            del namespace.config
        flags = {action.dest: "/".join(action.option_strings) for action in self._actions}
        for dest, value in nonfinite_floats(namespace, float32=True):
            self.error(f"argument {flags.get(dest) or dest}: expected a finite number that float32 holds "
                       f"(|x| <= {FLOAT32_MAX:.4g}), got {value!r}")
        return namespace, extras


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key given twice (ValueError)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"key {shown(key)} given twice")
        data[key] = value
    return data


def deeper_than(value: Any, levels: int) -> bool:
    """Whether lists and mappings nest in ``value`` more than ``levels`` deep (the walk goes no
    deeper than that)."""
    if not isinstance(value, (dict, list)):
        return False
    if levels == 0:
        return True
    items = value.values() if isinstance(value, dict) else value
    return any(deeper_than(item, levels - 1) for item in items)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (line, column)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    if len(problem) > 2 * SHOWN_CHARS:  # e.g. a tag of the whole input
        problem = problem[:2 * SHOWN_CHARS] + "..."
    return f"{problem}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--print_config`` (handled by :class:`Parser` and :func:`with_print_config`)."""
    g = parser.add_argument_group("configuration files")
    g.add_argument("--config", action=GivenOnce, default=None, metavar="FILE",
                   help="option values from a YAML file, or a run's args.json (replays that run); "
                        "flags given on the command line override them")
    g.add_argument("--print_config", nargs="?", const="method", default=False, choices=PRINT_CONFIG,
                   help="print the resolved options as YAML (what --config reads) and exit without running; "
                        "train_student.py prints the options of the chosen --distill method only (other methods' "
                        "ones where they differ from their defaults), --print_config all every method's")


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


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(loader: str = "torchvision", dataset: str = "cifar100") -> int:
    """``--num_workers`` when not given: 0 for the tensor pipeline (it needs no workers); else
    one core left to the training process, at most 8, and at least 1 when there are two cores."""
    if loader == "tensor" and dataset in TENSOR_DATASETS:
        return 0
    cores = available_cores()
    return min(8, cores - 1) if cores > 1 else 0


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Flags for optimisation, data, device and run control, with RepDistiller's defaults."""
    g = parser.add_argument_group("RepDistiller flags")
    add_options(g, FitOptions, "print_freq", "tb_freq", "save_freq")
    g.add_argument("--epochs", type=positive_int, default=240, help="number of training epochs")

    g = parser.add_argument_group("RepDistill flags")
    add_options(g, FitOptions, "max_steps")
    g.add_argument("--save_folder", type=str, default="./save/models", help="parent folder of the run folder")
    g.add_argument("--resume", type=str, default=None,
                   help="continue a run from its <model>_last.pth: a path, or 'auto' for this run's folder (fresh start "
                        "if none); the settings that shape training must be the ones it was made with")
    g.add_argument("--overwrite", action="store_true",
                   help="start the run again in a run folder that already holds its checkpoints (they are deleted); "
                        "without it such a start is refused")

    add_option_groups(parser, [OptimOptions, DataOptions, RuntimeOptions])
    add_config_args(parser)


def seed_of_trial(trial: Any) -> int:
    """The seed a run gets when ``--seed`` is left out: its ``--trial`` if that is an integer,
    else the sum of the trial name's character codes."""
    trial = str(trial)
    return int(trial) if trial.lstrip("-").isdigit() else sum(map(ord, trial))


def finalize_training_args(opt: argparse.Namespace, model_name: str) -> argparse.Namespace:
    """Check the shared flags and fill in derived values (learning rate, decay epochs, seed, data
    folder); those filled in because they were left out are recorded as derived (:func:`set_derived`)."""
    if opt.dataset not in DATASETS:
        raise UserError(f"unknown --dataset '{opt.dataset}'; choose one of: {', '.join(DATASETS)}")
    try:
        opt.lr_decay_epochs = [int(e) for e in str(opt.lr_decay_epochs).split(",") if e.strip()]
    except ValueError:
        raise UserError(f"--lr_decay_epochs must be comma-separated integers, got '{opt.lr_decay_epochs}'") from None
    if any(e < 0 for e in opt.lr_decay_epochs):
        raise UserError(f"--lr_decay_epochs cannot hold negative epochs, got {opt.lr_decay_epochs}")
    if opt.learning_rate is None:
        set_derived(opt, "learning_rate", 0.01 if model_name in SMALL_LR_MODELS else 0.05)
    if opt.num_workers is None:
        set_derived(opt, "num_workers", default_workers(opt.loader, opt.dataset))
    if opt.seed is None:
        set_derived(opt, "seed", seed_of_trial(opt.trial))
    opt.save_folder = str(Path(opt.save_folder))
    return opt
