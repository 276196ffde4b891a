"""Turn run folders into the paper-comparison table and plots.

    python scripts/summarize.py save/ [--out DIR] [--paper scripts/paper_tables.md]
                                      [--dataset NAME] [--include_running]
                                      [--group_by OPT[,OPT...] | --pool OPT[,OPT...]]

Every run of ``train_teacher.py`` and ``train_student.py`` leaves ``results.json`` in its run
folder (``engine/logger.py``). This script finds them all under the given folder, splits them by
the data set each run recorded (``dataset`` in results.json, else ``args.dataset``; ``--dataset``
keeps one), groups each data set's runs by (teacher->student pair, method label) and configuration
over trials, and writes into ``--out`` (default: the scanned folder):

- ``summary.md``: one section per data set (cifar100 first, then the others by name) with the mean
  ± sample std (ddof=1) over trials of the last-epoch and the best test top-1 and the number of
  trials; for cifar100 also the published number (``scripts/paper_tables.md``) and our last-epoch
  mean minus it; also printed;
- ``summary.csv``: the same numbers at full precision, one row per (data set, pair, method);
- ``accuracy_<pair>.png`` (bars of the last-epoch top-1 per row on an axis from 0, ± std error
  bars cut at 0 and 100, the paper's value as a black tick) and ``curves_<pair>.png`` (test top-1
  per epoch, mean over a row's runs at the epochs all of them have), if matplotlib imports;
  for a data set other than cifar100 ``accuracy_<dataset>_<pair>.png`` and ``curves_<dataset>_<pair>.png``.

A row is one configuration: runs are averaged only if they recorded the same value of every option
that changes the result (``args`` in results.json, less the trial, the seed and the options a
resume may change, which cannot change what a run computes: those results.json lists as
``resumable``, ``--epochs`` excepted), the same teacher's weights (their SHA-256, ``teachers``;
``--path_t`` is not compared) and number of processes where recorded, and the same status (a
finished run is never pooled with an unfinished one). Runs of one (pair, method) that differ are
rows of their own, each named by what sets it apart (``crd+kd (-a 0.5)``), and one line per split
says which options split it. An option only some of the runs record is not compared (the row says
it pooled over it); runs recording no options at all are a row of their own. ``--group_by`` names
the options that define a row instead (``pair,method``: the pair and method alone), ``--pool``
leaves some out; a row that pools runs of other values names them (``kd (pooled: --epochs 1/3)``).
Linear probes' rows are split the same way by their recipe and their network's loss weights and
epoch (not by the target set, a column).

Linear probes (``transfer_student.py``, role ``transfer`` in results.json) are left out of that
table and make the transfer table instead: one section per (source data set, teacher->student
pair), a row per method of the probed network's run (its label; a vanilla run of the pair's teacher
is the ``teacher`` row, of its student the ``student`` row), a column per target set (mean ± std of
the last-epoch probe top-1 over trials and n), beside the published numbers of the paper's
``transfer`` tables and the difference; ``transfer.csv`` holds the same at full precision with the
best epoch's too.

A results.json that cannot be read (not JSON, not a run record, a value out of range, not a regular
file, too large, or written by a newer version of the code: a ``results_version`` above this
script's, engine/results.py) is skipped with one warning naming it; one without a version (an older
run's) is read as version 0. The CSV files quote every text cell and put a ``'`` before text a
spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab, CR at the start).

Name mapping: a run's ``label`` (``kd``, ``crd``, ``crd+kd``, ...) is the paper's row name; a
vanilla run of model M (``train_teacher.py``) is the ``teacher`` row of every pair whose teacher
is M and the ``student`` row of every pair whose student is M; a vanilla model in none of our
pairs gets a ``vanilla`` row of its own.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import os
import re
import stat
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# plain Python, no torch: the schema of results.json, and how options are named
from engine.results import (BEST_ON_TEST, BEST_ON_VAL, F, FINISHED, LAST_ONLY, RESULTS_VERSION,  # noqa: E402
                            TRANSFER, V0_RESUMABLE)
from engine.run_flags import flag_name, show  # noqa: E402

ARROW = "->"                 # our pair spelling (results.json)
PAPER_ARROW = "→"            # the paper tables' spelling, also used for display
PAPER_DATASET = "cifar100"   # the data set of every table in paper_tables.md
DEFAULT_PAPER = Path(__file__).resolve().parent / "paper_tables.md"
MISSING = {"", "–", "—", "-", "n/a", "na", "none"}
UNKNOWN_DATASET = "unknown"  # the section of runs whose results.json names no data set
TEACHER_ROW, STUDENT_ROW = "teacher", "student"   # the paper's rows for vanilla runs
DASH = "–"


# ----------------------------------------------------------------------------- data


@dataclass
class Run:
    """One run folder's ``results.json``, reduced to what the summary needs."""
    path: Path
    label: str
    pair: str                                  # "teacher->student", or the model alone
    model: str
    model_t: str | None
    dataset: str
    trial: str
    status: str
    last_acc: float | None
    best_acc: float | None
    curve: dict[int, float] = field(default_factory=dict)   # epoch -> test top-1
    # how its best epoch was chosen: on the test set, "val" (--val_split), "last" (not tested)
    selection: str = BEST_ON_TEST
    role: str = ""                             # "transfer" for a linear probe (then dataset is the target set)
    source_dataset: str = ""                   # a probe's: the data set its network was trained on
    # what makes it the configuration it is (:func:`run_settings`): option -> value as recorded
    settings: dict[str, Any] = field(default_factory=dict)
    options_recorded: bool = True              # False: its results.json has no ``args`` (an old record)


@dataclass
class Row:
    """One line of the summary: one configuration of a (pair, method), with our statistics and the
    paper's number. ``setting`` says what sets it apart from the other rows of its (pair, method)
    (``[("epochs", 3)]``), ``pooled`` which options differ among its runs (``[("epochs", [3, 6])]``):
    :func:`describe_setting`, :func:`describe_pooled`."""
    pair: str
    method: str
    runs: list[Run]
    paper: float | None = None
    setting: list[tuple[str, Any]] = field(default_factory=list)
    pooled: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The method with what sets this row apart: ``kd (--epochs 3)``, ``kd (pooled: --epochs 3/6)``."""
        return row_name(self.method, self.setting, self.pooled)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def last(self) -> tuple[float | None, float | None]:
        return mean_std(r.last_acc for r in self.runs)

    @property
    def best(self) -> tuple[float | None, float | None]:
        return mean_std(r.best_acc for r in self.runs)

    @property
    def diff(self) -> float | None:
        mean = self.last[0]
        return None if mean is None or self.paper is None else mean - self.paper


@dataclass
class PaperTable:
    """Published numbers: ``values[(pair, method)]`` is a float, or None where the paper's cell
    is empty ("–", "n/a"); ``pairs`` and ``methods`` keep the tables' order."""
    values: dict[tuple[str, str], float | None] = field(default_factory=dict)
    pairs: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    # linear probes: (pair, method, target set) -> float or None, and the targets' order
    transfer: dict[tuple[str, str, str], float | None] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- paper tables


def normalise_pair(text: str) -> str:
    """A pair in our spelling: ``resnet32x4→resnet8x4`` -> ``resnet32x4->resnet8x4``."""
    return text.strip().replace(PAPER_ARROW, ARROW).replace(" ", "")


def display_pair(pair: str) -> str:
    """A pair in the paper's spelling, for the Markdown table and plot titles."""
    return pair.replace(ARROW, PAPER_ARROW)


def md_text(value: str) -> str:
    """Text from a results.json as one Markdown table cell or heading: ``|`` escaped, line breaks
    as spaces (a label such as ``a|b`` would otherwise split its row)."""
    return re.sub(r"[\r\n]+", " ", value).replace("|", "\\|")


def split_pair(pair: str) -> tuple[str | None, str]:
    """(teacher, student) of ``t->s``; (None, model) for a model alone."""
    if ARROW in pair:
        teacher, student = pair.split(ARROW, 1)
        return teacher, student
    return None, pair


def parse_cell(text: str) -> float | None:
    """A table cell as a number, or None for an empty one ("–", "n/a", ...)."""
    text = text.strip().strip("*")
    if text.lower() in MISSING:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def table_cells(line: str) -> list[str]:
    """The cells of a Markdown table line ``| a | b |``."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


TRANSFER_HEADER = "transfer "   # first header cell of a transfer table: "transfer <teacher→student>"


def target_name(text: str) -> str:
    """A target set's column heading as our data set's name: ``Tiny-ImageNet`` -> ``tinyimagenet``."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def parse_paper_tables(text: str) -> PaperTable:
    """Every Markdown table of ``text`` whose columns after the first are teacher→student pairs;
    the first column holds the method names (lower-cased). A table whose first heading is
    ``transfer <teacher→student>`` holds linear-probe numbers, its columns target sets
    (``PaperTable.transfer``)."""
    paper = PaperTable()
    header: list[str] | None = None
    transfer_pair: str | None = None
    for line in text.splitlines():
        if not line.strip().startswith("|"):
            header = None
            continue
        cells = table_cells(line)
        if header is None and cells[0].lower().startswith(TRANSFER_HEADER):
            transfer_pair = normalise_pair(cells[0][len(TRANSFER_HEADER):])
            header = [target_name(c) for c in cells[1:]]
            paper.targets += [t for t in header if t not in paper.targets]
            continue
        if header is None:
            transfer_pair = None
            pairs = cells[1:]
            header = [normalise_pair(c) for c in pairs] if pairs and all(
                PAPER_ARROW in c or ARROW in c for c in pairs) else []
            paper.pairs += [p for p in header if p not in paper.pairs]
            continue
        if not header or set("".join(cells)) <= set("-: "):   # not a pair table, or the |---| line
            continue
        method = cells[0].strip().lower()
        if transfer_pair is not None:
            for target, cell in zip(header, cells[1:]):
                paper.transfer[(transfer_pair, method, target)] = parse_cell(cell)
            continue
        if method not in paper.methods:
            paper.methods.append(method)
        for pair, cell in zip(header, cells[1:]):
            paper.values[(pair, method)] = parse_cell(cell)
    return paper


def load_paper(path: Path | None) -> PaperTable | None:
    """The published tables from ``path``, or None (with a warning) if it cannot be read."""
    if path is None:
        return None
    try:
        return parse_paper_tables(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        warn(f"no paper column: cannot read {path} ({err.strerror or err})")
        return None


def paper_value(paper: PaperTable | None, pair: str, method: str) -> float | None:
    """The published number for ``method`` on ``pair``. For a model alone (a vanilla row of its
    own) it is the model's teacher/student number if all the paper's columns agree on it."""
    if paper is None:
        return None
    if ARROW in pair:
        return paper.values.get((pair, method))
    found = {v for (p, m), v in paper.values.items() if v is not None and (
        (m == TEACHER_ROW and split_pair(p)[0] == pair) or (m == STUDENT_ROW and split_pair(p)[1] == pair))}
    return found.pop() if len(found) == 1 else None


# ----------------------------------------------------------------------------- runs


def warn(message: str) -> None:
    """One line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


MAX_RESULTS_BYTES = 64 << 20   # a results.json holds a few KB per epoch: anything larger is not one
MAX_INT_DIGITS = 18            # integers a results.json holds (epochs, trials, seeds, steps) fit in 64 bits


def number(value) -> float | None:
    """``value`` as a float, None for none (missing, not a number, NaN or infinite); ValueError if
    it is a number outside [0, 100] (every value read with it is a top-1 percentage)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)   # ints are bounded by MAX_INT_DIGITS: no OverflowError
    if not math.isfinite(value):
        return None
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"an accuracy of {value:.6g}, not a top-1 percentage in [0, 100]")
    return value


def text(value, name: str) -> str:
    """A text field as a string ("" for none); ValueError for a list, an object or another type."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, (int, float)):   # e.g. a trial written as a number
        return str(value)
    raise ValueError(f"its {name} is a JSON {'array' if isinstance(value, list) else 'object'}, not a string"
                     if isinstance(value, (list, dict)) else f"its {name} is not a string")


def bounded_int(digits: str) -> int:
    """A JSON integer, refused (ValueError) beyond :data:`MAX_INT_DIGITS` digits."""
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits (larger than any results.json holds)")
    return int(digits)


FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_regular(mode: int) -> str | None:
    """What a file of ``mode`` is when it is not a regular file ("a FIFO", ...), else None."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in FILE_KINDS if test(mode)), "not a regular file")


def read_results(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file (symlinks followed) of at most
    :data:`MAX_RESULTS_BYTES`; ValueError otherwise. A FIFO, socket or device is never opened
    (opening a FIFO blocks); the file is opened non-blocking and checked again once open, in case
    it was replaced in between."""
    kind = not_regular(os.stat(path).st_mode)
    if kind is None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            kind = not_regular(os.fstat(f.fileno()).st_mode)
            data = f.read(MAX_RESULTS_BYTES + 1) if kind is None else b""
    if kind is not None:
        raise ValueError(f"{kind}, not a regular file")
    if len(data) > MAX_RESULTS_BYTES:
        raise ValueError(f"over {MAX_RESULTS_BYTES / 2**20:g} MiB: too large for a results.json")
    return data


def load_run(path: Path) -> Run:
    """Read one ``results.json``; ValueError (or OSError) if it is not a run record. A run still in
    progress has no ``last_acc``/``best_acc`` yet: they then come from its history."""
    try:
        data = json.loads(read_results(path).decode("utf-8"), parse_int=bounded_int)
    except RecursionError:
        raise ValueError("nested too deeply to be a results.json") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    resumable = resumable_options(data, results_version(data))
    model = text(data.get(F.model) or data.get(F.model_s), "model")
    model_t = text(data.get(F.model_t), "model_t") or None
    pair = text(data.get(F.pair), "pair") or (f"{model_t}{ARROW}{model}" if model_t else model)
    label = text(data.get(F.label) or data.get(F.method), "label")
    if not pair or not label:
        raise ValueError("no pair/label fields (written before engine/logger.py's run_summary?)")
    curve = {}
    for record in data.get(F.history) or []:
        acc = number(record.get("test_acc")) if isinstance(record, dict) else None
        if acc is not None and isinstance(record.get("epoch"), int):
            curve[record["epoch"]] = acc
    last = number(data.get(F.last_acc))
    best = number(data.get(F.best_acc))
    selection = data.get(F.selection) if data.get(F.selection) in (BEST_ON_VAL, LAST_ONLY) else BEST_ON_TEST
    if selection == BEST_ON_VAL:  # the test top-1 of the epoch chosen on the held-out images
        best = number(data.get(F.best_val_test_acc))
    if last is None and curve:
        last = curve[max(curve)]
    if best is None and curve:
        best = max(curve.values())
    source = data.get(F.source) if isinstance(data.get(F.source), dict) else {}
    args = data.get(F.args) if isinstance(data.get(F.args), dict) else {}
    status = text(data.get(F.status), "status") or "unknown"
    role = text(data.get(F.role), "role")
    return Run(path=path, label=label.lower(), pair=pair, model=model or split_pair(pair)[1],
               model_t=model_t, dataset=text(data.get(F.dataset) or args.get("dataset"), "dataset"),
               trial=text(data.get(F.trial), "trial"), status=status,
               last_acc=last, best_acc=best, curve=curve, selection=selection, role=role,
               source_dataset=text(source.get("dataset"), "source dataset"),
               settings=run_settings(data, args, source, status, role, resumable),
               options_recorded=isinstance(data.get(F.args), dict))


def results_version(data: dict) -> int:
    """The schema version of a results.json (``results_version``; 0 without one: an older run's);
    ValueError for one that is not a version number, or newer than this script reads
    (:data:`engine.results.RESULTS_VERSION`)."""
    version = data.get(F.results_version, 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"its {F.results_version} {shown_json(version)} is not a version number")
    if version > RESULTS_VERSION:
        raise ValueError(f"written by a newer version of the code ({F.results_version} {version}; this "
                         f"summarize.py reads up to {RESULTS_VERSION}): update the code to summarize it")
    return version


def resumable_options(data: dict, version: int) -> frozenset[str]:
    """The options a resume of the run could change (they cannot change what it computes): the
    list its results.json records (``resumable``), or for a version-0 file, which has none, the
    options that were resumable when it was written; ValueError for a list that is not one."""
    if version == 0:
        return V0_RESUMABLE
    names = data.get(F.resumable)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"its {F.resumable} is not a list of option names")
    return frozenset(names)


def shown_json(value) -> str:
    """A JSON value for a one-line message: a scalar as JSON writes it (cut to 40 characters),
    else what it is."""
    if isinstance(value, (list, dict)):
        return "(a JSON array)" if isinstance(value, list) else "(a JSON object)"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:39] + "…"


# Recorded options that never make two runs different configurations: the trial and seed (what
# the rows average over), the data set (one section each; a probe's is its target set, a column of
# its table), and the options a resume may change, which cannot change what a run computes (the
# run's ``resumable``), but --epochs (a 3-epoch and a 240-epoch run are different rows).
NOT_SETTINGS = frozenset({"trial", "seed", "dataset"})
CHANGES_RESULT = "epochs"
# ... and for a linear probe also the network it probes (its trials are the probes' trials) and the
# flags that only say how it runs (as --plain_teacher) or were derived from others
NOT_PROBE_SETTINGS = NOT_SETTINGS | {"path_s", "source_run", "lr_given", "plain_backbone"}
# identity a results.json records beside its args: the teachers' weights (SHA-256, train_student.py),
# the number of processes; a probe's network: its loss weights, checkpoint epoch and classes
IDENTITY = (F.teachers, F.world_size)
SOURCE_IDENTITY = ("epoch", "num_classes")
STATUS = "status"   # always part of a row's configuration: a finished run is never pooled with an unfinished one


def run_settings(data: dict, args: dict, source: dict, status: str, role: str,
                 resumable: frozenset[str]) -> dict[str, Any]:
    """What makes a run the configuration it is: every recorded option (``args``) but those of
    :data:`NOT_SETTINGS` (:data:`NOT_PROBE_SETTINGS` for a probe) and of ``resumable`` (but
    ``--epochs``), the :data:`IDENTITY` fields it records, for a probe its network's loss weights
    and epoch (``source.alpha``, ``source.epoch``), and its status. ValueError for a value nested
    too deeply to compare."""
    skip = (NOT_PROBE_SETTINGS if role == TRANSFER else NOT_SETTINGS) | (resumable - {CHANGES_RESULT})
    settings = {k: v for k, v in args.items() if k not in skip}
    settings.update({k: data[k] for k in IDENTITY if data.get(k) is not None})
    if role == TRANSFER:
        weights = source.get("weights") if isinstance(source.get("weights"), dict) else {}
        settings.update({f"source.{k}": v for k, v in weights.items() if v is not None})
        settings.update({f"source.{k}": source[k] for k in SOURCE_IDENTITY if source.get(k) is not None})
    settings[STATUS] = status
    try:
        for value in settings.values():
            frozen(value)
    except RecursionError:
        raise ValueError("an option nested too deeply to compare") from None
    return settings


def collect_runs(folder: Path) -> list[Run]:
    """Every readable ``results.json`` under ``folder`` (recursively); any other (not JSON, not a
    run record, a value out of range, not a regular file, too large) is skipped with a one-line
    warning naming it."""
    runs = []
    for path in sorted(Path(folder).rglob("results.json")):
        try:
            runs.append(load_run(path))
        except OSError as err:
            warn(f"skipped {path}: {err.strerror or err}")
        except (ValueError, TypeError, AttributeError, OverflowError) as err:
            warn(f"skipped {path}: {err}")
    return runs


def dataset_name(dataset: str) -> str:
    """A run's data set for display: its name, or "unknown" when its results.json gives none."""
    return dataset or UNKNOWN_DATASET


def select_runs(runs: list[Run], dataset: str | None, include_running: bool) -> tuple[list[Run], list[str]]:
    """The runs that count: of ``dataset`` (None: of any data set), finished (or any status with
    ``include_running``), with a last-epoch accuracy. Also notes saying what was left out and why."""
    kept, notes = [], []
    if dataset is not None:
        other = [r for r in runs if r.dataset != dataset]
        if other:
            names = sorted({dataset_name(r.dataset) for r in other})
            notes.append(f"{len(other)} run(s) of another data set left out ({', '.join(names)}; see --dataset)")
        runs = [r for r in runs if r.dataset == dataset]
    unfinished = [r for r in runs if r.status != FINISHED]
    if unfinished and not include_running:
        notes.append(f"{len(unfinished)} unfinished run(s) left out (see --include_running)")
        runs = [r for r in runs if r.status == FINISHED]
    for run in runs:
        if run.last_acc is None:
            why = ("not tested (its test set has other classes; evaluate it with a linear probe)"
                   if run.selection == LAST_ONLY else "no test accuracy yet")
            notes.append(f"{run.path} left out: {why}")
        else:
            kept.append(run)
    chosen = [r for r in kept if r.selection == BEST_ON_VAL]
    if chosen:
        notes.append(f"best of {len(chosen)} of the {len(kept)} run(s): the test top-1 of the epoch with the best "
                     "top-1 on held-out training images (--val_split), not the best test top-1"
                     + ("" if len(chosen) == len(kept) else "; of the others: the best test top-1"))
    return kept, notes


# ----------------------------------------------------------------------------- grouping


def split_by_dataset(runs: list[Run]) -> dict[str, list[Run]]:
    """The runs by the data set they recorded: cifar100 (the paper's) first, then the others by name."""
    split: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        split[run.dataset].append(run)
    return {name: split[name] for name in sorted(split, key=lambda d: (d != PAPER_DATASET, d == "", d.lower()))}


def group_runs(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs by (pair, paper method name) over trials. Distillation runs go to (pair, label); a
    vanilla run of M goes to the teacher row of each of our pairs whose teacher is M and to the
    student row of each whose student is M, or to (M, "vanilla") if M is in none."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    pairs = sorted({r.pair for r in runs if ARROW in r.pair})
    for run in runs:
        if ARROW in run.pair:
            groups[(run.pair, run.label)].append(run)
            continue
        keys = [(p, TEACHER_ROW) for p in pairs if split_pair(p)[0] == run.model]
        keys += [(p, STUDENT_ROW) for p in pairs if split_pair(p)[1] == run.model]
        for key in keys or [(run.pair, run.label)]:
            groups[key].append(run)
    return dict(groups)


def warn_shared_trials(pair: str, name: str, runs: list[Run]) -> None:
    """Warn when several runs of one row share a trial name (each still counts as one trial)."""
    trials = [r.trial for r in runs]
    if len(set(trials)) < len(trials):
        warn(f"{display_pair(pair)} {name}: several runs share a trial name ({', '.join(sorted(trials))}); "
             "each counts as one trial")


# ----------------------------------------------------------------------------- configurations


NOT_RECORDED = "not recorded"
OPTION_ALIASES = {"r": "gamma", "a": "alpha", "b": "beta"}   # -r/-a/-b, as train_student.py spells them
ROW_NAMES = {"pair", "method"}                             # always define a row
MAX_SHOWN = 60                                             # characters of an option's value in a row's name


@dataclass(frozen=True)
class Grouping:
    """Which recorded options define a row besides the pair and method (and the status, always):
    ``by`` (``--group_by``; None: every option that changes the result, :func:`run_settings`),
    less ``pool`` (``--pool``)."""
    by: frozenset[str] | None = None
    pool: frozenset[str] = frozenset()


class _Missing:
    """An option a run does not record (sorts first, shows as "not recorded")."""
    def __repr__(self) -> str:
        return NOT_RECORDED


UNRECORDED = _Missing()


def frozen(value):
    """A recorded value in a form that can be compared and hashed (lists as tuples, objects as
    sorted item tuples, NaN as text); equal numbers are equal whatever their type (1 == 1.0)."""
    if isinstance(value, list):
        return tuple(frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), frozen(v)) for k, v in value.items()))
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def order_key(value) -> tuple:
    """Sorts recorded values of mixed types: not recorded, none, booleans, numbers, text, the rest."""
    value = frozen(value)
    if value is UNRECORDED:
        return (0, 0)
    if value is None:
        return (1, 0)
    if isinstance(value, bool):
        return (2, value)
    if isinstance(value, (int, float)):
        return (3, value)
    return (4, value) if isinstance(value, str) else (5, repr(value))


def option_name(key: str) -> str:
    """How a table names a recorded option: its flag (``--epochs``, ``-a``), a description, or
    for a probe's network ``the probed network's -a``."""
    if key == STATUS:
        return "status"
    if key.startswith("source."):
        return f"the probed network's {option_name(key[len('source.'):]).removeprefix('--')}"
    return flag_name(key)


def show_value(key: str, value) -> str:
    """A recorded value for a row's name: digests cut to 8 characters, long values cut short."""
    if value is UNRECORDED:
        return NOT_RECORDED
    if key == "teachers" and isinstance(value, list):
        value = [str(v)[:8] for v in value]
    shown = re.sub(r"\s+", " ", show(value))   # one line
    return shown if len(shown) <= MAX_SHOWN else shown[:MAX_SHOWN - 1] + "…"


OPTIONS = "options"   # in a setting: whether the runs' results.json record their options at all


def describe_setting(items: list[tuple[str, Any]], for_csv: bool = False) -> str:
    """What sets a row apart, for its name (``--epochs 3, -a 0.5``) or the CSV (``epochs=3; alpha=0.5``)."""
    if for_csv:
        return "; ".join(f"{k}={NOT_RECORDED if k == OPTIONS else show_value(k, v)}" for k, v in items)
    return ", ".join(f"options {NOT_RECORDED}" if k == OPTIONS else f"{option_name(k)} {show_value(k, v)}"
                     for k, v in items)


def describe_pooled(items: list[tuple[str, Any]], for_csv: bool = False) -> str:
    """The options a row pools over with their values (``--epochs 3/6``; CSV: ``epochs=3/6``); for
    :data:`OPTIONS` the number of its runs that record none."""
    parts = []
    for key, values in items:
        shown = f"{NOT_RECORDED} by {values} run(s)" if key == OPTIONS else "/".join(show_value(key, v) for v in values)
        parts.append(f"{key}={shown}" if for_csv else f"{'options' if key == OPTIONS else option_name(key)} {shown}")
    return ("; " if for_csv else ", ").join(parts)


def row_name(method: str, setting: list[tuple[str, Any]], pooled: list[tuple[str, Any]]) -> str:
    """A row's method with what sets it apart and what it pools over."""
    return (method + (f" ({describe_setting(setting)})" if setting else "")
            + (f" (pooled: {describe_pooled(pooled)})" if pooled else ""))


@dataclass
class Configuration:
    """The runs of one row of a (pair, method): ``setting`` and ``pooled`` as in :class:`Row`."""
    runs: list[Run]
    setting: list[tuple[str, Any]] = field(default_factory=list)
    pooled: list[tuple[str, Any]] = field(default_factory=list)


def value_of(run: Run, key: str):
    return run.settings.get(key, UNRECORDED)


def distinct(values) -> list:
    """The different values among ``values`` (compared :func:`frozen`), sorted."""
    seen: dict = {}
    for value in values:
        seen.setdefault(frozen(value), value)
    return sorted(seen.values(), key=order_key)


def describe_values(key: str, values, sep: str = ", ") -> str:
    return sep.join(show_value(key, v) for v in values)


def split_configurations(runs: list[Run], grouping: Grouping) -> tuple[list[Configuration], list[str]]:
    """The runs of one (pair, method) as rows, one per configuration, and notes saying what split
    them and what each row pools over.

    A configuration is the value of every option that defines a row (:class:`Grouping`; by
    default every option the runs record that changes the result, :func:`run_settings`) and the
    status. By default an option only some of the runs record is not compared (a run recorded by
    an older version lacks the options added since; the row says it pooled over it), and runs
    whose results.json records no options at all are a row of their own."""
    recorded = [r for r in runs if r.options_recorded]
    if grouping.by is not None:
        keys = sorted(grouping.by | {STATUS})
    else:
        common = set.intersection(*(set(r.settings) for r in recorded)) if recorded else {STATUS}
        keys = sorted((common - grouping.pool) | {STATUS})
    separate_unrecorded = grouping.by is None

    parts: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        unrecorded = separate_unrecorded and not run.options_recorded
        parts[(unrecorded, tuple(frozen(value_of(run, k)) for k in keys))].append(run)
    members = list(parts.values())
    with_options = [m for m in members if m[0].options_recorded or not separate_unrecorded]

    def values(key: str) -> list:   # the rows' values of an option (the status: of every row)
        return distinct(value_of(m[0], key) for m in (members if key == STATUS else with_options))

    differ = [k for k in keys if len(values(k)) > 1]
    configurations, notes = [], []
    for part in members:
        if len(members) == 1:
            setting = []
        elif part[0].options_recorded or not separate_unrecorded:
            setting = [(k, value_of(part[0], k)) for k in differ]
        else:
            setting = [(OPTIONS, UNRECORDED)] if with_options else []
            setting += [(STATUS, part[0].status) for k in differ if k == STATUS]
        configurations.append(Configuration(part, setting, pooled_over(part, keys)))
    configurations.sort(key=lambda c: (c.runs[0].status != FINISHED, not c.runs[0].options_recorded,
                                       [order_key(value_of(c.runs[0], k)) for k in differ]))
    if len(configurations) > 1:
        said = "; ".join(f"{option_name(k)} ({describe_values(k, values(k))})" for k in differ)
        if separate_unrecorded and len(with_options) < len(members):
            said = "; ".join(filter(None, [said, "whether their results.json records the options"]))
        notes.append(f"{len(configurations)} rows: their runs differ in {said}"
                     + (" (--pool or --group_by pools them)" if grouping.by is None else ""))
    for configuration in configurations:
        if configuration.pooled:
            of = f" of {describe_setting(configuration.setting)}" if configuration.setting else ""
            notes.append(f"{len(configuration.runs)} runs{of} pooled over {describe_pooled(configuration.pooled)}")
    return configurations, notes


def pooled_over(runs: list[Run], keys: list[str]) -> list[tuple[str, Any]]:
    """The options (not in ``keys``) whose values differ among ``runs``, with their values
    (``[("epochs", [3, 6])]``), and how many of them record no options at all (:data:`OPTIONS`)."""
    recorded = [r for r in runs if r.options_recorded]
    names = sorted({k for r in recorded for k in r.settings} - set(keys))
    pooled = [(k, values) for k in names if len(values := distinct(value_of(r, k) for r in recorded)) > 1]
    if recorded and len(recorded) < len(runs):
        pooled.append((OPTIONS, len(runs) - len(recorded)))
    return pooled


def option_key(name: str) -> str:
    """The recorded option a ``--group_by``/``--pool`` name stands for: ``epochs``, ``--epochs``,
    ``-a`` (alpha)."""
    bare = name.strip().lstrip("-")
    return OPTION_ALIASES.get(bare, bare) if name.strip().startswith("-") and len(bare) == 1 else bare


def parse_grouping(group_by: str | None, pool: str | None, runs: list[Run]) -> Grouping:
    """The :class:`Grouping` of the command line's ``--group_by``/``--pool`` lists; ValueError
    (one line) for a name no run records, or for pooling over the status."""
    known = {k for r in runs for k in r.settings} | set(IDENTITY) | ROW_NAMES

    def names(flag: str, value: str) -> frozenset[str]:
        keys = [option_key(n) for n in value.split(",") if n.strip()]
        for key in keys:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                raise ValueError(f"{flag} {key}: no run records such an option"
                                 + (f" (did you mean {close[0]}?)" if close else ""))
            if key == STATUS and flag == "--pool":
                raise ValueError("--pool status: a finished run is never pooled with an unfinished one")
        if not keys:
            raise ValueError(f"{flag} names no option (e.g. {flag} epochs)")
        return frozenset(keys) - ROW_NAMES

    return Grouping(by=None if group_by is None else names("--group_by", group_by),
                    pool=frozenset() if pool is None else names("--pool", pool))


def pair_order(pairs: Iterable[str], paper: PaperTable | None) -> list[str]:
    """The paper's column order first, then other pairs, then models alone (each sorted)."""
    pairs = set(pairs)
    known = [p for p in (paper.pairs if paper else []) if p in pairs]
    rest = sorted(pairs - set(known), key=lambda p: (ARROW not in p, p.lower()))
    return known + rest


def build_rows(groups: dict[tuple[str, str], list[Run]], paper: PaperTable | None,
               grouping: Grouping = Grouping(), dataset: str | None = None) -> tuple[list[Row], list[str]]:
    """One row per configuration (:func:`split_configurations`) of each (pair, method) that we ran,
    and one per (pair, method) that the paper lists for a pair we ran, in the paper's order (its
    pairs, then its methods), our other pairs and methods after; and the notes on the splits."""
    rows, notes = [], []
    where = f" ({dataset_name(dataset)})" if dataset is not None else ""
    for pair in pair_order((p for p, _ in groups), paper):
        ours = {m for p, m in groups if p == pair}
        order = paper.methods if paper else [TEACHER_ROW, STUDENT_ROW]
        listed = [m for m in order if m in ours or (paper is not None and (pair, m) in paper.values)]
        for method in listed + sorted(ours - set(listed)):
            value = paper_value(paper, pair, method)
            if (pair, method) not in groups:
                rows.append(Row(pair, method, [], value))
                continue
            configurations, said = split_configurations(groups[(pair, method)], grouping)
            notes += [f"{display_pair(pair)} {method}{where}: {line}" for line in said]
            for c in configurations:
                rows.append(Row(pair, method, c.runs, value, c.setting, c.pooled))
                warn_shared_trials(pair, rows[-1].name, c.runs)
    return rows, notes


# ----------------------------------------------------------------------------- statistics and text


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1) of the numbers; std is None for one value."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(value: float | None, signed: bool = False) -> str:
    """Two decimals, "–" for none; ``signed`` puts "+" before positive numbers."""
    if value is None:
        return DASH
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    return "0.00" if text in ("-0.00", "+0.00") else text


def fmt_mean_std(stats: tuple[float | None, float | None], n: int) -> str:
    """``mean ± std``; ``mean ± –`` for one trial (no spread); "–" for no runs."""
    mean, std = stats
    if mean is None:
        return DASH
    return f"{fmt(mean)} ± {fmt(std) if n > 1 else DASH}"


@dataclass
class Section:
    """The summary of one data set: its rows, and the file its paper numbers came from (None: no paper column)."""
    dataset: str
    rows: list[Row]
    paper_source: str | None = None
    runs: int = 0


def markdown_table(section: Section) -> list[str]:
    """One data set's section of ``summary.md``: a heading and the table; the paper and difference
    columns only with a ``paper_source``."""
    with_paper = section.paper_source is not None
    title = f"## {md_text(dataset_name(section.dataset))}: {section.runs} run(s)"
    if with_paper:
        title += f", beside the published numbers ({section.paper_source})"
    header = ["pair", "method", "n", "last top-1", "best top-1"] + (["paper", "Δ (last − paper)"] if with_paper else [])
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in section.rows:
        cells = [md_text(display_pair(row.pair)), md_text(row.name), str(row.n), fmt_mean_std(row.last, row.n),
                 fmt_mean_std(row.best, row.n)]
        if with_paper:
            cells += [fmt(row.paper), fmt(row.diff, signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_document(sections: list[Section], *, folder: Path | str, notes: Iterable[str] = ()) -> str:
    """The summary as Markdown: a title, lines saying what the numbers are, the notes, then one
    section per data set."""
    lines = [f"# Test top-1 (%) of the runs under {folder}",
             "",
             "Columns: last = test top-1 after the last epoch (what the papers report), best = the best epoch's; "
             "each is the mean ± the sample standard deviation (ddof=1) over the n trials "
             f"(\"± {DASH}\": one trial, no spread). {DASH} = no value."]
    if any(section.paper_source is not None for section in sections):
        lines[-1] += (f" paper = the published last-epoch top-1 ({PAPER_DATASET} only); "
                      "Δ = our last-epoch mean − paper; the teacher/student rows are the vanilla runs of the pair's models.")
    lines += [""] + [f"- {note}" for note in notes]
    for section in sections:
        lines += [""] + markdown_table(section)
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["dataset", "pair", "teacher", "student", "method", "n", "last_mean", "last_std", "best_mean", "best_std",
              "paper", "diff", "trials", "setting", "pooled"]


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")   # what makes a spreadsheet read a cell as a formula (OWASP)
PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value):
    """A CSV cell: empty for None, numbers as they are (floats at full precision), text neutralised
    as OWASP's CSV-injection guidance says: text starting with ``= + - @``, a tab or a carriage
    return gets a ``'`` in front, so that no spreadsheet runs it as a formula, unless it is a plain
    number (e.g. a trial named ``-1``). The writers quote every text cell (``csv_writer``), so no
    separator inside one (``;``, ``,``) can start a new cell."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_writer(f):
    """A CSV writer that quotes every text cell and leaves numbers bare (see :func:`csv_cell`)."""
    return csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)


def write_csv(sections: list[Section], path: Path) -> None:
    """The summary as CSV, one row per (data set, pair, method, configuration), numbers at full
    precision, empty cells for none (an unknown data set too); ``setting`` and ``pooled`` as in
    :class:`Row`, as ``option=value`` (``epochs=3; alpha=0.5``, ``epochs=3/6``)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv_writer(f)
        writer.writerow(CSV_FIELDS)
        for section in sections:
            for row in section.rows:
                teacher, student = split_pair(row.pair)
                (last_mean, last_std), (best_mean, best_std) = row.last, row.best
                writer.writerow([csv_cell(v) for v in (section.dataset, row.pair, teacher, student, row.method, row.n,
                                                   last_mean, last_std, best_mean, best_std, row.paper, row.diff,
                                                   ";".join(r.trial for r in row.runs), describe_setting(row.setting, True),
                                                   describe_pooled(row.pooled, True))])


# ----------------------------------------------------------------------------- transfer (linear probes)


@dataclass
class TransferRow:
    """One configuration of a method of a transfer table (the probes' recipe and their network's
    loss weights and epoch, :func:`split_configurations`): its probes by target set, and the
    published numbers; ``setting`` and ``pooled`` as in :class:`Row`."""
    method: str
    runs: dict[str, list[Run]]                  # target set -> probes (over trials)
    paper: dict[str, float | None]              # target set -> published top-1
    setting: list[tuple[str, Any]] = field(default_factory=list)
    pooled: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return row_name(self.method, self.setting, self.pooled)


@dataclass
class TransferTable:
    """The linear probes of one (source data set, teacher->student pair)."""
    source_dataset: str
    pair: str
    targets: list[str]
    rows: list[TransferRow]
    with_paper: bool
    notes: list[str] = field(default_factory=list)   # what split its methods' rows, what they pool over


def group_transfer(runs: list[Run], paper: PaperTable | None, grouping: Grouping = Grouping()) -> list[TransferTable]:
    """The probes by (source data set, pair), then by method and configuration (a row each:
    :func:`split_configurations`, the target set left out: it is the column), then by target: a
    probe of a distilled network goes to its own pair and label; a probe of a vanilla network of
    model M to the ``teacher`` row of every pair (of the probes' and the paper's, for the same
    source set) whose teacher is M and to the ``student`` row of every pair whose student is M, or
    to its own (M, "vanilla") row if none. Published numbers only for the paper's source set (cifar100)."""
    cells: dict[tuple[str, str], dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    paper_pairs = sorted({p for p, _, _ in (paper.transfer if paper else {})})
    for source in sorted({r.source_dataset for r in runs}):
        members = [r for r in runs if r.source_dataset == source]
        pairs = sorted({r.pair for r in members if ARROW in r.pair} | set(paper_pairs if source == PAPER_DATASET else ()))
        for run in members:
            if ARROW in run.pair:
                keys = [(run.pair, run.label)]
            else:
                keys = [(p, TEACHER_ROW) for p in pairs if split_pair(p)[0] == run.model]
                keys += [(p, STUDENT_ROW) for p in pairs if split_pair(p)[1] == run.model]
            for pair, method in keys or [(run.pair, run.label)]:
                cells[(source, pair)][method].append(run)
    tables = []
    for (source, pair) in sorted(cells, key=lambda k: (k[0] != PAPER_DATASET, k[0], ARROW not in k[1], k[1])):
        by_method = cells[(source, pair)]
        published = {(m, t): v for (p, m, t), v in (paper.transfer if paper else {}).items()
                     if p == pair and source == PAPER_DATASET}
        ran_targets = {r.dataset for probes in by_method.values() for r in probes}
        paper_targets = [t for t in (paper.targets if paper else []) if any(k[1] == t for k in published)]
        targets = paper_targets + sorted(ran_targets - set(paper_targets))
        paper_methods = list(dict.fromkeys(m for m, _ in published))
        methods = paper_methods + sorted(set(by_method) - set(paper_methods))
        rows, notes = [], []
        for m in methods:
            published_row = {t: published.get((m, t)) for t in targets}
            if m not in by_method:
                rows.append(TransferRow(m, {t: [] for t in targets}, published_row))
                continue
            configurations, said = split_configurations(by_method[m], grouping)
            notes += [f"transfer {display_pair(pair)} {m} (trained on {dataset_name(source)}): {line}" for line in said]
            for c in configurations:
                rows.append(TransferRow(m, {t: [r for r in c.runs if r.dataset == t] for t in targets}, published_row,
                                        c.setting, c.pooled))
                for t in targets:
                    warn_shared_trials(pair, f"{rows[-1].name} on {t}", rows[-1].runs[t])
        tables.append(TransferTable(source, pair, targets, rows, bool(published), notes))
    return tables


def transfer_markdown(tables: list[TransferTable], paper_source: str | None) -> list[str]:
    """The transfer tables as Markdown: per table a heading, then per target set the mean ± std
    of the last-epoch probe top-1 with n, and (for the paper's pairs) paper and Δ."""
    lines: list[str] = []
    for table in tables:
        count = sum(len(v) for row in table.rows for v in row.runs.values())
        title = (f"## transfer: {md_text(display_pair(table.pair))} trained on "
                 f"{md_text(dataset_name(table.source_dataset))}, "
                 f"linear probes: {count} run(s)")
        if table.with_paper and paper_source:
            title += f", beside the published numbers ({paper_source})"
        header = ["method"]
        for target in table.targets:
            header += [f"{md_text(target)} (n)"] + (["paper", "Δ"] if table.with_paper else [])
        lines += ["", title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in table.rows:
            cells = [md_text(row.name)]
            for target in table.targets:
                runs = row.runs[target]
                stats = mean_std(r.last_acc for r in runs)
                cells.append(f"{fmt_mean_std(stats, len(runs))} ({len(runs)})" if runs else DASH)
                if table.with_paper:
                    paper = row.paper[target]
                    cells += [fmt(paper), fmt(None if stats[0] is None or paper is None else stats[0] - paper,
                                              signed=True)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


TRANSFER_CSV_FIELDS = ["source_dataset", "pair", "teacher", "student", "method", "target", "n", "last_mean", "last_std",
                       "best_mean", "best_std", "paper", "diff", "trials", "setting", "pooled"]


def write_transfer_csv(tables: list[TransferTable], path: Path) -> None:
    """The transfer tables as CSV, one row per (source data set, pair, method, configuration, target set)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv_writer(f)
        writer.writerow(TRANSFER_CSV_FIELDS)
        for table in tables:
            teacher, student = split_pair(table.pair)
            for row in table.rows:
                for target in table.targets:
                    runs = row.runs[target]
                    (last_mean, last_std), (best_mean, best_std) = (mean_std(r.last_acc for r in runs),
                                                                    mean_std(r.best_acc for r in runs))
                    paper = row.paper[target]
                    diff = None if last_mean is None or paper is None else last_mean - paper
                    writer.writerow([csv_cell(v) for v in (table.source_dataset, table.pair, teacher, student, row.method,
                                                       target, len(runs), last_mean, last_std, best_mean, best_std,
                                                       paper, diff, ";".join(r.trial for r in runs),
                                                       describe_setting(row.setting, True),
                                                       describe_pooled(row.pooled, True))])


# ----------------------------------------------------------------------------- plots


def safe_name(pair: str) -> str:
    """A file-name-safe form of a pair: ``S:a->b`` -> ``S_a_to_b``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", pair.replace(ARROW, "_to_")).strip("_") or "runs"


def plot_text(value: str) -> str:
    """Text from a results.json for a plot: ``$`` escaped (matplotlib would parse ``$...$`` as maths,
    and fail on a label such as ``$\\foo$``)."""
    return value.replace("$", r"\$")


def mean_curve(runs: list[Run]) -> tuple[list[int], list[float], bool]:
    """Test top-1 per epoch averaged over the runs with a history, at the epochs every one of them
    has (a run cut short ends the curve at its last epoch), and whether some run had more epochs."""
    curves = [r.curve for r in runs if r.curve]
    if not curves:
        return [], [], False
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    cut = any(len(c) > len(epochs) for c in curves)
    return epochs, [statistics.fmean(c[e] for c in curves) for e in epochs], cut


def plot_stem(dataset: str, pair: str) -> str:
    """The plots' file-name part for a pair: ``<pair>``, prefixed by the data set unless it is cifar100."""
    return safe_name(pair) if dataset == PAPER_DATASET else f"{safe_name(dataset_name(dataset))}_{safe_name(pair)}"


@dataclass
class Bars:
    """What the accuracy chart of a pair draws: per row with runs its tick label, mean last-epoch
    top-1 and error bar below and above (the std over trials, cut at 0 and 100; 0 for one trial),
    the paper's values as ``(position, value)``, the y range (from 0) and whether a bar was cut."""
    labels: list[str]
    means: list[float]
    below: list[float]
    above: list[float]
    marks: list[tuple[int, float]]
    ylim: tuple[float, float]
    clipped: bool


def bar_chart(rows: list[Row]) -> Bars:
    """The numbers of a pair's accuracy chart (:class:`Bars`): the axis starts at 0 and reaches 5
    points above the highest bar, error bar or paper value (at most 100); an error bar is cut to
    stay within [0, 100]."""
    ran = [r for r in rows if r.n and r.last[0] is not None]
    means = [r.last[0] for r in ran]
    spreads = [r.last[1] or 0.0 for r in ran]
    below = [min(s, m) for m, s in zip(means, spreads)]
    above = [min(s, 100.0 - m) for m, s in zip(means, spreads)]
    marks = [(i, r.paper) for i, r in enumerate(ran) if r.paper is not None]
    top = max([m + a for m, a in zip(means, above)] + [v for _, v in marks] + [0.0])
    return Bars([tick_label(r) for r in ran], means, below, above, marks, (0.0, min(100.0, top + 5.0)),
                any(b < s or a < s for b, a, s in zip(below, above, spreads)))


def tick_label(row: Row) -> str:
    """A bar's label: the method, then each option that sets its row apart and what it pools over
    on a line of its own, then n."""
    lines = [row.method] + [describe_setting([item]) for item in row.setting]
    lines += [f"pooled: {describe_pooled([item])}" for item in row.pooled]
    return "\n".join(lines + [f"(n={row.n})"])


def accuracy_figure(pair: str, rows: list[Row], dataset: str = PAPER_DATASET):
    """The bar chart of one pair's rows (:func:`bar_chart`): bars of the mean last-epoch top-1 with
    std error bars, the paper's values as black ticks. Returns the matplotlib Figure (not saved)."""
    import matplotlib.pyplot as plt

    bars = bar_chart(rows)
    x = list(range(len(bars.means)))
    widest = max((len(line) for label in bars.labels for line in label.splitlines()), default=0)
    fig, ax = plt.subplots(figsize=(max(4.0, len(x) * max(0.8, 0.06 * widest) + 3.5), 4.5))
    ax.bar(x, bars.means, color="tab:blue", alpha=0.8, label="ours (mean of n)")
    spread = [i for i in x if bars.below[i] or bars.above[i]]
    if spread:
        ax.errorbar(spread, [bars.means[i] for i in spread],
                    yerr=[[bars.below[i] for i in spread], [bars.above[i] for i in spread]], fmt="none",
                    ecolor="dimgray", capsize=4,
                    label="± std over trials" + (" (cut at 0/100)" if bars.clipped else ""))
    if bars.marks:
        ax.scatter([i for i, _ in bars.marks], [v for _, v in bars.marks], marker="_", s=600, linewidths=2.5,
                   color="black", zorder=3, label="paper")
    ax.set_ylim(*bars.ylim)
    ax.set_xticks(x, [plot_text(label) for label in bars.labels], fontsize=8)
    ax.set_ylabel("last-epoch test top-1 (%)")
    ax.set_title(plot_text(f"{display_pair(pair)} ({dataset_name(dataset)})"))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the bars, never over them
    fig.tight_layout()
    return fig


def curves_figure(pair: str, rows: list[Row], dataset: str = PAPER_DATASET):
    """The training curves of one pair's rows: per row the mean test top-1 per epoch over its runs,
    at the epochs all of them have (:func:`mean_curve`). Returns the matplotlib Figure (not saved)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        epochs, accs, cut = mean_curve(row.runs)
        if epochs:
            n = sum(1 for r in row.runs if r.curve)
            ax.plot(epochs, accs, marker="." if len(epochs) < 30 else None,
                    label=plot_text(f"{row.name} (n={n}{', epochs all runs have' if cut else ''})"))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test top-1 (%), mean over trials")
    ax.set_title(plot_text(f"{display_pair(pair)} ({dataset_name(dataset)})"))
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_pair(pair: str, rows: list[Row], out: Path, dataset: str = PAPER_DATASET) -> list[Path]:
    """``accuracy_<stem>.png`` (:func:`accuracy_figure`) and ``curves_<stem>.png``
    (:func:`curves_figure`) for one pair's rows of ``dataset`` (the stem: :func:`plot_stem`)."""
    import matplotlib.pyplot as plt

    ran = [r for r in rows if r.n]
    written = []
    for kind, make in (("accuracy", accuracy_figure), ("curves", curves_figure)):
        fig = make(pair, ran, dataset)
        written.append(out / f"{kind}_{plot_stem(dataset, pair)}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def write_plots(sections: list[Section], out: Path) -> list[Path]:
    """The two plots for every pair with runs of every data set; nothing (and a note) if matplotlib
    is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        print("matplotlib is not importable: plots skipped (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    for section in sections:
        by_pair: dict[str, list[Row]] = defaultdict(list)
        for row in section.rows:
            by_pair[row.pair].append(row)
        written += [p for pair, pair_rows in by_pair.items() if any(r.n for r in pair_rows)
                    for p in plot_pair(pair, pair_rows, out, section.dataset)]
    return written


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Summarise run folders (results.json) into a table "
                                     "beside the published CIFAR-100 numbers, and plots.")
    parser.add_argument("folder", type=Path, help="folder to scan recursively for results.json (e.g. save/)")
    parser.add_argument("--out", type=Path, default=None, help="where to write summary.md/.csv and plots "
                        "(default: the scanned folder)")
    parser.add_argument("--paper", type=Path, default=DEFAULT_PAPER,
                        help="Markdown file with the published tables (default: scripts/paper_tables.md)")
    parser.add_argument("--dataset", default=None,
                        help="only runs of this data set (default: every data set, one section each); the "
                        f"paper column is shown for {PAPER_DATASET} only")
    parser.add_argument("--include_running", action="store_true",
                        help="also count running, interrupted and stopped runs (their last logged epoch), in rows "
                        "of their own")
    parser.add_argument("--no_plots", action="store_true", help="write the tables only")
    rows = parser.add_mutually_exclusive_group()
    rows.add_argument("--group_by", metavar="OPT[,OPT...]",
                      help="the options that define a row besides the pair and method, as recorded in results.json "
                      "args (epochs, synthetic_classes, alpha or -a, teachers, ...): runs that differ only in others "
                      "are pooled into one row, which names the options it pooled over; 'pair,method' pools every "
                      "configuration of a method. Default: every option that changes the result, apart from the "
                      "trial and seed (one row per configuration). Finished and unfinished runs are never pooled")
    rows.add_argument("--pool", metavar="OPT[,OPT...]",
                      help="pool runs that differ only in these options (e.g. --pool teachers: students of "
                      "different teachers' weights in one row); the row names them")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Scan, group, write ``summary.md``, ``summary.csv`` and the plots; print the table.
    Returns 0, or 1 (with a message) when there is nothing to summarise."""
    args = parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 1
    runs = collect_runs(args.folder)
    probes = [r for r in runs if r.role == TRANSFER]
    runs = [r for r in runs if r.role != TRANSFER]
    kept, notes = select_runs(runs, args.dataset, args.include_running)
    probes, probe_notes = select_runs(probes, None, args.include_running)
    notes += [f"linear probes: {note}" for note in probe_notes]
    if not kept and not probes:
        of = f" of {args.dataset}" if args.dataset is not None else ""
        print(f"error: no {'' if args.include_running else 'finished '}runs{of} under "
              f"{args.folder} ({len(runs)} results.json read)" + "".join(f"; {n}" for n in notes), file=sys.stderr)
        return 1
    try:
        grouping = parse_grouping(args.group_by, args.pool, kept + probes)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    split = split_by_dataset(kept)
    wants_paper = PAPER_DATASET in split or any(r.source_dataset == PAPER_DATASET for r in probes)
    paper = load_paper(args.paper) if wants_paper else None
    source = None if paper is None else "scripts/paper_tables.md" if args.paper == DEFAULT_PAPER else str(args.paper)
    sections, row_notes = [], []
    for dataset, members in split.items():
        rows, said = build_rows(group_runs(members), paper if dataset == PAPER_DATASET else None, grouping, dataset)
        sections.append(Section(dataset, rows, source if dataset == PAPER_DATASET else None, len(members)))
        row_notes += said
    transfer = group_transfer(probes, paper, grouping)
    row_notes += [note for table in transfer for note in table.notes]

    out = args.out or args.folder
    out.mkdir(parents=True, exist_ok=True)
    counts = ", ".join(f"{dataset_name(s.dataset)} {s.runs}" for s in sections)
    notes.insert(0, f"{len(kept)} run(s) counted from {args.folder} ({counts})")
    if probes:
        notes.insert(1, f"{len(probes)} linear probe(s) counted (transfer tables; transfer.csv)")
    notes += row_notes
    text = markdown_document(sections, folder=args.folder, notes=notes)
    if transfer:
        text += "\n".join(transfer_markdown(transfer, source)) + "\n"
        write_transfer_csv(transfer, out / "transfer.csv")
    (out / "summary.md").write_text(text, encoding="utf-8")
    write_csv(sections, out / "summary.csv")
    print(text)
    plots = [] if args.no_plots else write_plots(sections, out)
    print(f"wrote {out / 'summary.md'}, {out / 'summary.csv'}" + (f" and {len(plots)} plots" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
