"""Command-line flags shared by train_teacher.py and train_student.py (RepDistiller's, plus ours);
the data's flags come from :class:`dataset.DataOptions`, declared once. Option values can also
come from a configuration file (``--config``: YAML, or a run's ``args.json``; see
:mod:`engine.config`), which the flags given on the command line override; ``--print_config``
prints a command line's resolved options as such a file."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from common.argtypes import FLOAT32_MAX, nonfinite_floats, positive_int
from common.declare import add_option_groups, add_options, record_resumable, resumable
from common.errors import UserError
from common.runtime import RuntimeOptions
from dataset import DataOptions
from dataset.registry import dataset_names, tensor_sets
from engine.config import CONFIG_FLAGS, PRINT_CONFIG, option_values, rederived, seed_of_trial
from engine.config import with_print_config  # noqa: F401  (the scripts import it from here)
from engine.config_file import ConfigError, load_config
from engine.logger import ONE_INVOCATION, derived_options, set_derived
from engine.optim import OptimOptions
from engine.state import FitOptions
from models import default_learning_rate

# The longest error line the scripts print (the rest is cut): a message never repeats a whole input.
MAX_MESSAGE_CHARS = 1000


class GivenOnce(argparse.Action):
    """Store the flag's value, refusing a second occurrence (``--config`` names one file)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} may be given once")
        setattr(namespace, self.dest, values)


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
        """The option values of the configuration file ``path``, by ``dest``: read by
        :func:`engine.config_file.load_config`, checked and converted by
        :func:`engine.config.option_values`, a run's args.json's derived options left out
        (:func:`engine.config.rederived`). Any problem is one ``error:`` line naming the file and
        the key (exit status 2)."""
        where = f"--config {path}"
        self._replayed_seed = None
        try:
            data, recorded = load_config(path)
            derived, self._replayed_seed = rederived(data, where) if recorded else (set(), None)
            return option_values(data, self.option_actions(), where, recorded, derived)
        except ConfigError as err:
            self.error(str(err))

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
        record_resumable(self, namespace)
        flags = {action.dest: "/".join(action.option_strings) for action in self._actions}
        for dest, value in nonfinite_floats(namespace, float32=True):
            self.error(f"argument {flags.get(dest) or dest}: expected a finite number that float32 holds "
                       f"(|x| <= {FLOAT32_MAX:.4g}), got {value!r}")
        return namespace, extras


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


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(loader: str = "torchvision", dataset: str | None = None) -> int:
    """``--num_workers`` when not given: 0 for the tensor pipeline (it needs no workers), which
    serves ``dataset`` (None: any of the sets it serves); else one core left to the training
    process, at most 8, and at least 1 when there are two cores."""
    if loader == "tensor" and (dataset is None or dataset in tensor_sets()):
        return 0
    cores = available_cores()
    return min(8, cores - 1) if cores > 1 else 0


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Flags for optimisation, data, device and run control, with RepDistiller's defaults."""
    g = parser.add_argument_group("RepDistiller flags")
    add_options(g, FitOptions, "print_freq", "tb_freq", "save_freq")
    # a resume may raise it (engine/resume.py checks how far, and not under the cosine schedule)
    resumable(g.add_argument("--epochs", type=positive_int, default=240, help="number of training epochs"))

    g = parser.add_argument_group("RepDistill flags")
    add_options(g, FitOptions, "max_steps")
    resumable(g.add_argument("--save_folder", type=str, default="./save/models",
                             help="parent folder of the run folder"))
    resumable(g.add_argument("--resume", type=str, default=None,
                             help="continue a run from its <model>_last.pth: a path, or 'auto' for this run's folder "
                                  "(fresh start if none); the settings that shape training must be the ones it was "
                                  "made with"))
    resumable(g.add_argument("--overwrite", action="store_true",
                             help="start the run again in a run folder that already holds its checkpoints (they are "
                                  "deleted); without it such a start is refused"))

    add_option_groups(parser, [OptimOptions, DataOptions, RuntimeOptions])
    add_config_args(parser)


def finalize_training_args(opt: argparse.Namespace, model_name: str) -> argparse.Namespace:
    """Check the shared flags and fill in derived values (learning rate, decay epochs, seed, data
    folder); those filled in because they were left out are recorded as derived (:func:`set_derived`)."""
    if opt.dataset not in dataset_names():
        raise UserError(f"unknown --dataset '{opt.dataset}'; choose one of: {', '.join(dataset_names())}")
    try:
        opt.lr_decay_epochs = [int(e) for e in str(opt.lr_decay_epochs).split(",") if e.strip()]
    except ValueError:
        raise UserError(f"--lr_decay_epochs must be comma-separated integers, got '{opt.lr_decay_epochs}'") from None
    if any(e < 0 for e in opt.lr_decay_epochs):
        raise UserError(f"--lr_decay_epochs cannot hold negative epochs, got {opt.lr_decay_epochs}")
    if opt.learning_rate is None:
        set_derived(opt, "learning_rate", default_learning_rate(model_name))
    if opt.num_workers is None:
        set_derived(opt, "num_workers", default_workers(opt.loader, opt.dataset))
    if opt.seed is None:
        set_derived(opt, "seed", seed_of_trial(opt.trial))
    opt.save_folder = str(Path(opt.save_folder))
    return opt
