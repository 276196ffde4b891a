"""The schema of a run's ``results.json``: one record per run folder, written by
:class:`engine.logger.RunLog` (and the parts of a run that add to it: :class:`engine.fit.Fit`,
``train_student.py``, ``transfer_student.py``) and read by ``scripts/summarize.py`` and
``transfer_student.py``. Plain Python (no torch): ``scripts/summarize.py`` imports it.

:class:`Results` declares every field, with its type; :data:`F` names them (``F.last_acc`` is
``"last_acc"``; a name not declared is an AttributeError), so that writer and readers spell them
the same. :func:`problems` checks a record against the schema.

Versions (``results_version``): a file without one is version 0 (written before the field
existed); version 1 adds ``results_version`` and ``resumable``. The version changes when a field
changes its meaning or a reader needs a field to read the file; a field added beside the others
does not change it. A reader refuses a version newer than the :data:`RESULTS_VERSION` it knows.
"""
from __future__ import annotations

import re
import types
import typing
from typing import Any, Literal, TypedDict

RESULTS_VERSION = 1

# status
RUNNING, FINISHED, STOPPED, INTERRUPTED = "running", "finished", "stopped", "interrupted"
# role
TEACHER, STUDENT, TRANSFER = "teacher", "student", "transfer"
# selection: how the best epoch was chosen: by its test top-1 (RepDistiller's; also when the
# field is left out), by its top-1 on held-out training images (--val_split), or not at all (the
# last epoch is the result: a test set of other classes)
BEST_ON_TEST, BEST_ON_VAL, LAST_ONLY = "test", "val", "last"
# the method of a run trained with cross-entropy alone (a teacher, or a probe of one)
VANILLA = "vanilla"

# The options a resume could change in a file of version 0, which does not list them (version 1
# lists the run's own, ``resumable``): a fact about those files, kept as they were written.
V0_RESUMABLE = frozenset({
    "print_freq", "tb_freq", "save_freq", "num_workers", "resume", "overwrite", "save_folder", "save_path",
    "model_name", "data_folder", "download", "device", "deterministic", "compile", "channels_last",
    "max_steps", "command", "path_t", "dist_timeout", "plain_teacher", "nce_scores", "allow_modified_data",
    "epochs",
})


class Weights(TypedDict):
    """A student's loss weights ``-r -a -b`` (None for a teacher or a probe)."""
    gamma: float | None
    alpha: float | None
    beta: float | None


class Session(TypedDict, total=False):
    """One start of the run: the first, then every resume."""
    start_epoch: int
    start_step: int
    steps_before: int
    command: list[str]
    changed: dict[str, list[Any]]     # flag -> [old, new]: what this resume changed


class Epoch(TypedDict, total=False):
    """One epoch of the main stage (``history``); also ``loss_<term>``: each loss term's mean."""
    epoch: int
    session: int
    lr: float
    train_loss: float | None
    train_acc: float | None
    images_per_s: float
    test_acc: float | None
    test_acc_top5: float | None
    test_loss: float | None
    val_acc: float | None             # --val_split: the held-out training images
    val_acc_top5: float | None
    val_loss: float | None
    epoch_time_s: float
    images_skipped: int
    partial: bool                     # cut short by --max_steps (a resume finishes it)
    batches: int                      # the batches of a partial epoch


class StageEpoch(TypedDict, total=False):
    """One epoch of an earlier stage (``<stage>_history``): ``<stage>_epoch``, ``<stage>_loss``."""
    test_acc: float | None
    test_acc_top5: float | None
    test_loss: float | None
    partial: bool
    batches: int


class StageProgress(TypedDict):
    """How far a stage got (``stages``)."""
    name: str
    epochs: int
    epochs_done: int
    steps: int


class Source(TypedDict, total=False):
    """The network a linear probe probed (``transfer_student.py``)."""
    path: str
    run: str
    role: str
    method: str
    label: str
    model: str
    model_t: str | None
    trial: str
    dataset: str | None
    epoch: int | None
    num_classes: int | None
    weights: Weights
    last_acc: float | None
    best_acc: float | None


class Results(TypedDict, total=False):
    """A run's ``results.json``; also ``<stage>_history``: the epochs of an earlier stage."""
    results_version: int
    # what the run is (engine.logger.run_summary)
    role: Literal["teacher", "student", "transfer"]
    method: str                       # "vanilla", or the --distill name
    label: str                        # the paper's row name: "crd+kd" for crd with -a > 0
    model: str
    model_s: str                      # a student's: RepDistiller's name for model
    model_t: str | None
    pair: str                         # "teacher->student", or the model alone
    dataset: str
    trial: str
    seed: int
    weights: Weights
    flags: list[str]                  # the command line
    args: dict[str, Any]              # every option, as args.json records it
    resumable: list[str]              # the options of args a resume may change
    commit: str | None
    sessions: list[Session]
    resumed: int
    # progress
    status: Literal["running", "finished", "stopped", "interrupted"]
    stopped_by: str
    wall_time_s: float
    history: list[Epoch]
    stages: list[StageProgress]
    epochs_run: int
    steps: int
    images_skipped: int
    # accuracies (test top-1/top-5, %)
    last_acc: float | None
    last_acc_top5: float | None
    best_acc: float | None
    best_acc_top5: float | None
    selection: Literal["test", "val", "last"]   # how the best epoch was chosen (left out: test)
    val_split: int
    best_val_epoch: int | None
    best_val_acc: float | None
    best_val_test_acc: float | None
    best_val_test_acc_top5: float | None
    # where it ran
    device: str
    world_size: int
    amp: str
    images_per_s: float
    # a student's
    teacher_acc: float | None | list[float | None]
    teachers: list[str]               # SHA-256 of each teacher's weights
    evaluation: str                   # why it was not tested
    # a linear probe's
    source: Source
    target: str
    recipe: dict[str, Any]
    num_classes: int
    n_data: int
    best_epoch: int
    epochs_done: int
    probe_time_s: float
    feature_images: int
    feature_images_per_s: float | None
    test_feature_images_per_s: float | None
    best_is: str


# Keys a record may hold beyond its declared fields, by pattern, with their type.
PATTERNS: dict[type, tuple[tuple[re.Pattern, Any], ...]] = {
    Results: ((re.compile(r"[a-z][a-z0-9_]*_history"), list[StageEpoch]),),
    Epoch: ((re.compile(r"loss_\w+"), float | None),),
    StageEpoch: ((re.compile(r"[a-z][a-z0-9_]*_epoch"), int), (re.compile(r"[a-z][a-z0-9_]*_loss"), float | None)),
}


class _Names:
    """The field names of a TypedDict as attributes (``F.last_acc == "last_acc"``)."""

    def __init__(self, schema: type) -> None:
        self._names = frozenset(schema.__annotations__)

    def __getattr__(self, name: str) -> str:
        if name.startswith("_") or name not in self._names:
            raise AttributeError(f"results.json declares no field {name!r} (engine/results.py)")
        return name


F = _Names(Results)


def stage_history(stage: str) -> str:
    """The field of an earlier stage's epochs: ``init_history``."""
    return f"{stage}_history"


def problems(record: Any, schema: Any = Results, where: str = "results.json") -> list[str]:
    """What in ``record`` (as read from JSON) does not match ``schema`` (a field not declared, a
    value of another type), one line each naming where; empty if it matches."""
    if typing.is_typeddict(schema):
        if not isinstance(record, dict):
            return [f"{where}: expected an object, got {type(record).__name__}"]
        hints = typing.get_type_hints(schema)
        found = []
        for key, value in record.items():
            kind = hints.get(key)
            if kind is None:
                kind = next((k for pattern, k in PATTERNS.get(schema, ()) if pattern.fullmatch(key)), None)
            if kind is None:
                found.append(f"{where}.{key}: not declared in {schema.__name__} (engine/results.py)")
            else:
                found += problems(value, kind, f"{where}.{key}")
        missing = sorted(schema.__required_keys__ - set(record))
        return found + [f"{where}: no {key}" for key in missing]
    origin, args = typing.get_origin(schema), typing.get_args(schema)
    if schema is Any:
        return []
    if origin in (typing.Union, types.UnionType):
        tried = [problems(record, option, where) for option in args]
        return [] if any(not p for p in tried) else [f"{where}: {record!r:.80} is not {_name(schema)}"]
    if origin is Literal:
        return [] if record in args else [f"{where}: {record!r:.80} is not one of {', '.join(map(repr, args))}"]
    if origin is list:
        if not isinstance(record, list):
            return [f"{where}: expected a list, got {type(record).__name__}"]
        return [line for i, item in enumerate(record) for line in problems(item, args[0], f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(record, dict):
            return [f"{where}: expected an object, got {type(record).__name__}"]
        return [line for key, value in record.items() for line in problems(value, args[1], f"{where}.{key}")]
    if schema is type(None):
        return [] if record is None else [f"{where}: {record!r:.80} is not null"]
    if schema is float:  # JSON writes 1.0 as 1.0, but an int is a number too
        ok = isinstance(record, (int, float)) and not isinstance(record, bool)
    elif schema is int:
        ok = isinstance(record, int) and not isinstance(record, bool)
    else:
        ok = isinstance(record, schema)
    return [] if ok else [f"{where}: {record!r:.80} is not {_name(schema)}"]


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
