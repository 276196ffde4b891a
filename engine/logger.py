"""What a run leaves behind: console lines, TensorBoard scalars, args.json and results.json."""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from tensorboard.summary.writer import event_file_writer
from torch.utils.tensorboard import SummaryWriter

from common.errors import UserError
from common.files import atomic_write
from engine.results import F, RESULTS_VERSION, RUNNING, stage_history
from engine.run_flags import free_flags


# Flags that act on one invocation (continue the run, or delete it and start again), not
# settings of the run: never recorded in args.json, so a replay (--config args.json) cannot
# repeat them.
ONE_INVOCATION = frozenset({"resume", "overwrite"})
# The options a script filled in because they were left out (the seed from --trial, the learning
# rate from the model, the published loss weights, ...): an attribute of the options, a dict
# name -> value. args.json lists their names under "derived": a replay derives them again.
DERIVED = "_derived"


def set_derived(opt, name: str, value: Any) -> None:
    """Fill in the left-out option ``name`` of ``opt`` with ``value``, remembered as derived."""
    setattr(opt, name, value)
    derived = vars(opt).setdefault(DERIVED, {})
    derived[name] = value


def derived_options(opt) -> dict[str, Any]:
    """The options of ``opt`` that were derived (:func:`set_derived`), with their values."""
    return dict(vars(opt).get(DERIVED) or {})


def quiet_writer_threads() -> None:
    """TensorBoard's writer thread prints the traceback of a failed write, then the writer
    raises the same error in the main thread at its next call, where RunLog makes it one line:
    from now on such a thread's OSError is not reported twice (any other goes to the hook that was
    in place). Called when a writer is made, so that it wraps whatever hook is current then (a
    test runner's, say), once."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.thread, event_file_writer._AsyncWriterThread) and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook.quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def jsonable(value: Any) -> Any:
    """``value`` with paths, tuples and non-finite floats made JSON-safe."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON through a temporary file of this write's own and a rename
    (:func:`common.files.atomic_write`); raises OSError."""
    text = (json.dumps(jsonable(data), indent=2) + "\n").encode()
    atomic_write(Path(path), lambda f: f.write(text))


def recorded_args(args: dict[str, Any]) -> dict[str, Any]:
    """A run's options as ``args.json`` and ``results.json`` record them: every option with the
    value the run used, without the flags that act once (:data:`ONE_INVOCATION`), and
    ``derived``: the names of those it filled in (replaying the file derives them again)."""
    recorded = {k: v for k, v in args.items() if k not in ONE_INVOCATION and not k.startswith("_")}
    recorded["derived"] = sorted(args.get(DERIVED) or {})
    return recorded


def console_line(record: dict[str, Any]) -> str:
    """``key value`` pairs on one line, floats to 4 significant digits."""
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())


def git_commit() -> str | None:
    """The code's git commit, or None outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_summary(opt, *, role: str, method: str, model: str, model_t: str | None,
                weights: tuple[float, float, float] | None = None, label: str | None = None,
                **more: Any) -> dict[str, Any]:
    """The fields of ``results.json`` that say what a run was, for ``scripts/summarize.py``
    (:class:`engine.results.Results`): ``role`` (teacher, student or transfer), ``method``
    (``vanilla`` for cross-entropy alone, else the ``--distill`` name), ``label`` (the paper's
    row name, default ``method``; a student's says so, e.g. ``crd+kd``: see
    :meth:`distiller_zoo.registry.Distiller.run_label`), ``model``, ``model_t``, ``pair``
    (``teacher->student``, or the model alone), ``dataset``, ``trial``, ``seed``, the loss
    ``weights`` ``(gamma, alpha, beta)`` of a student, the command-line ``flags``
    (``opt.command``) and the ``more`` fields given."""
    gamma, alpha, beta = weights or (None, None, None)
    return {F.role: role, F.method: method, F.label: label or method, F.model: model, F.model_t: model_t,
            F.pair: f"{model_t}->{model}" if model_t else model, F.dataset: opt.dataset,
            F.trial: str(opt.trial), F.seed: opt.seed, F.weights: {"gamma": gamma, "alpha": alpha, "beta": beta},
            F.flags: list(opt.command), **more}


class RunLog:
    """The run folder's records: ``args.json`` when training starts (:meth:`open`), TensorBoard
    scalars (per epoch, and every ``--tb_freq`` steps: :meth:`step`), one console line per epoch,
    and ``results.json`` (rewritten after each epoch, so an interrupted run keeps its history;
    its fields: :class:`engine.results.Results`, with ``results_version`` and ``resumable``, the
    options a resume of it may change).
    ``sessions`` lists each start of the run (the first, then every resume: where it started, its
    command line and the flags it changed); each epoch's record names the session that ran it.
    Under torchrun only rank 0's is ``active``; the others keep the history in memory and write
    and print nothing."""

    def __init__(self, folder: Path, opt, extra: dict[str, Any] | None = None, active: bool = True) -> None:
        self.folder = Path(folder)
        self.active = active
        self.start = time.time()
        self.writer = None
        self.history: list[dict[str, Any]] = []
        self.sessions: list[dict[str, Any]] = [{"start_epoch": 1, "start_step": 1, "steps_before": 0,
                                                "command": list(vars(opt).get("command") or []),
                                                "changed": {}}]
        self.results: dict[str, Any] = {F.results_version: RESULTS_VERSION, F.args: vars(opt),
                                        F.commit: git_commit(), **(extra or {}), F.sessions: self.sessions}
        self._args = vars(opt)
        self._resumable = free_flags(opt)

    def open(self) -> None:
        """Write ``args.json`` and start the TensorBoard writer (once; the first record does it,
        so a run refused before it trains leaves nothing behind)."""
        if not self.active or self.writer is not None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.folder / "args.json", recorded_args(self._args))
        except OSError as err:
            raise UserError(f"cannot write into the run folder {self.folder} ({err.strerror or err}): choose "
                            "a writable --save_folder") from None
        with self._tensorboard():
            quiet_writer_threads()
            self.writer = SummaryWriter(log_dir=str(self.folder))

    @contextlib.contextmanager
    def _tensorboard(self) -> Iterator[None]:
        """A failing TensorBoard write (its own, or its writer thread's, which it re-raises here)
        becomes one :class:`UserError` line."""
        try:
            yield
        except OSError as err:
            raise UserError(f"could not write the TensorBoard events in {self.folder} ({type(err).__name__}: "
                            f"{err.strerror or err}): is the disk full or the folder not writable? The checkpoints "
                            "written so far were kept; free space, then continue with --resume auto") from None

    def _scalars(self, values: dict[str, Any], step: int, skip: tuple[str, ...]) -> None:
        """The numbers of ``values`` (but ``skip``) as TensorBoard scalars at ``step``, flushed."""
        with self._tensorboard():
            for key, value in values.items():
                if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def step(self, values: dict[str, float], global_step: int, tag: str = "step") -> None:
        """Step-level TensorBoard scalars ``<tag>/<name>`` at optimiser step ``global_step``
        (``--tb_freq``); not flushed here (the next epoch's record flushes the writer)."""
        if not self.active:
            return
        self.open()
        with self._tensorboard():
            for name, value in values.items():
                self.writer.add_scalar(f"{tag}/{name}", value, global_step)

    def elapsed(self) -> float:
        """Seconds of this run so far (across resumes)."""
        return time.time() - self.start

    def restore(self, history: list[dict[str, Any]], stage_histories: dict[str, list | None], elapsed: float,
                sessions: list[dict[str, Any]] | None = None, session: dict[str, Any] | None = None) -> None:
        """Continue a resumed run's records: its epochs so far, those of its earlier stages
        (``stage_histories``: stage name -> records; a trailing epoch cut short by ``--max_steps``
        is dropped: the resumed run finishes it and records it whole), its wall time, and its
        sessions, to which this one (``session``: where it starts and what it changed) is added."""
        self.history = [h for h in history if not h.get("partial")]
        for name, records in stage_histories.items():
            if records:
                self.results[stage_history(name)] = [r for r in records if not r.get("partial")]
        self.start = time.time() - elapsed
        self.results[F.resumed] = self.results.get(F.resumed, 0) + 1
        current = {**self.sessions[-1], **(session or {})}
        self.sessions[:] = [*(sessions or [self.sessions[0]]), current]

    def epoch(self, record: dict[str, Any], show: bool = True) -> None:
        """Log one epoch's ``record`` (must hold 'epoch'; numbers become TensorBoard scalars);
        it is tagged with the current session's number. ``show``: print its console line."""
        record = {**record, "session": len(self.sessions) - 1}
        self.history.append(record)
        if not self.active:
            return
        self.open()
        self._scalars(record, record["epoch"], skip=("epoch", "session"))
        if show:
            print(console_line(record), flush=True)
        self.save(status=RUNNING)

    def stage_epoch(self, name: str, record: dict[str, Any]) -> None:
        """Log one epoch of a stage before the main one (e.g. ``init``: ``record`` holds
        'init_epoch'); kept in ``<name>_history``, ``results.json`` rewritten."""
        key = f"{name}_epoch"
        self.results.setdefault(stage_history(name), []).append(record)
        if not self.active:
            return
        self.open()
        self._scalars(record, record[key], skip=(key,))
        print(console_line(record), flush=True)
        self.save(status=RUNNING)

    def save(self, status: str, **summary: Any) -> dict[str, Any]:
        """Rewrite ``results.json`` with the history so far, ``status`` and ``summary`` entries."""
        args = recorded_args(self._args)
        self.results.update(summary)
        self.results.update({F.status: status, F.wall_time_s: round(time.time() - self.start, 3),
                             F.history: self.history, F.args: args,
                             F.resumable: sorted(self._resumable & set(args))})
        if self.active:
            self.open()
            path = self.folder / "results.json"
            try:
                write_json(path, self.results)
            except OSError as err:
                raise UserError(f"could not write {path} ({type(err).__name__}: {err.strerror or err}): is the "
                                "disk full or the folder not writable? The checkpoints were kept; continue with "
                                "--resume auto once it is fixed") from None
        return self.results

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with self._tensorboard():
                writer.close()


def is_interactive() -> bool:
    """True when stderr is a terminal (live progress bars); logs get one line per epoch."""
    return sys.stderr.isatty()


def is_terminal_output() -> bool:
    """True when stdout is a terminal; otherwise (a cluster's log file) the loop prints a
    progress line every ``--print_freq`` steps."""
    return sys.stdout.isatty()
