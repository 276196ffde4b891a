"""What makes a run the same run: the settings a checkpoint records, the check that a resume
continues a run with the settings it was made with, and the run folder's claim (a new run never
overwrites another run's checkpoints)."""
from __future__ import annotations

import difflib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Collection

from common import distributed
from common.errors import UserError
from common.files import file_mode, remove_temporaries
from engine.logger import jsonable
from engine.results import F, RUNNING
from engine.run_flags import DESCRIPTIONS, flag_name, free_flags, show  # noqa: F401 (also used from here)

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None


def run_options(opt, **extra: Any) -> dict[str, Any]:
    """Every option of the run as plain values (what a checkpoint records), with ``extra``
    identity entries (e.g. ``teachers``: digests of the teachers' weights, ``world_size``)."""
    options = {k: v for k, v in vars(opt).items() if not k.startswith("_")}
    options.update(extra)
    return jsonable(options)


def compare_options(saved: dict[str, Any], current: dict[str, Any], epochs_done: int, free: Collection[str]
                    ) -> tuple[list[str], dict[str, list[Any]]]:
    """``(refused, changed)``: the differences that would make a resumed run another run
    (``'--nce_k 16384 -> 4096'``), and the allowed ones, ``{flag: [old, new]}``.

    Allowed: the options of ``free`` (the run's :func:`engine.run_flags.free_flags`); of them
    ``--epochs`` only raised (or lowered to no fewer than the epochs done) with the step schedule:
    with the cosine schedule it shapes every epoch's learning rate, so it must stay. Options the
    checkpoint does not record are not compared.
    """
    refused, changed = [], {}
    for key in sorted(set(saved) & set(current)):
        old, new = saved[key], current[key]
        if old == new:
            continue
        if key == "epochs":
            if saved.get("lr_schedule") == "cosine":
                refused.append(f"--epochs {old} -> {new} (it sets every epoch's learning rate under "
                               "--lr_schedule cosine)")
                continue
            if new < epochs_done:
                refused.append(f"--epochs {old} -> {new} (fewer than the {epochs_done} epochs done)")
                continue
        if key in free:
            if key not in ("resume", "overwrite", "command"):  # the command itself is in the session
                changed[flag_name(key)] = [old, new]
        else:
            refused.append(f"{flag_name(key)} {show(old)} -> {show(new)}")
    return refused, changed


def checkpoint_names(prefix: str) -> tuple[str, str]:
    """RepDistiller's file names of a run's last and best checkpoints: ``<model>_last.pth``,
    ``<model>_best.pth``."""
    return f"{prefix}_last.pth", f"{prefix}_best.pth"


def resume_path(value: str | None, folder: str | os.PathLike, prefix: str) -> Path | None:
    """The checkpoint ``--resume`` names: a path, or ``auto`` for the run folder's
    ``<prefix>_last.pth`` (or ``last.pth``, the name of earlier versions); None when there is
    none yet, so the run starts fresh."""
    if not value:
        return None
    if value == "auto":
        for name in (checkpoint_names(prefix)[0], "last.pth"):
            path = Path(folder) / name
            if path.is_file():
                return path
        distributed.say(no_run_to_resume(Path(folder)))
        return None
    path = Path(value)
    if not path.is_file():
        raise UserError(f"--resume {value}: no such file; give a {checkpoint_names(prefix)[0]} path, "
                        "or 'auto' for this run's folder")
    return path


def no_run_to_resume(folder: Path) -> str:
    """The note of ``--resume auto`` finding no checkpoint in ``folder``: a new run starts there;
    when the folder does not exist, the run folders beside it whose names are closest (a flag
    that names the folder, e.g. ``-a``, differs from the run's)."""
    if folder.is_dir():
        return f"note: --resume auto: no checkpoint to continue in {folder}; a new run starts there"
    runs = [p.name for p in folder.parent.glob("*") if p.is_dir() and any(p.glob("*.pth"))] \
        if folder.parent.is_dir() else []
    close = difflib.get_close_matches(folder.name, runs, n=3, cutoff=0.5)
    hint = (f"; the closest run folders there: {', '.join(close)} (give the flags that name one of them to continue "
            "it)" if close else "")
    return f"note: --resume auto: no run folder {folder.name} in {folder.parent}, so a new run starts{hint}"


def claim_run_folder(folder: str | os.PathLike, *, resume: Path | None, overwrite: bool,
                     resume_asked: bool = False) -> None:
    """Make ``folder`` this run's, or raise :class:`UserError`: it must be a writable folder that
    no other living run holds (this process then holds its lock, :class:`FolderLock`, until
    :func:`release_run_folders`), and a new run (no ``resume``) may not start where another
    run's checkpoints are unless ``overwrite`` (which removes that run's checkpoints and records
    first). Temporary files of a crashed write are removed. Under torchrun rank 0 decides (and
    holds the lock) and every rank gets its answer."""
    error = None
    if distributed.is_main_process():
        try:
            _claim(Path(folder), resume, overwrite, resume_asked)
        except UserError as err:
            error = str(err)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise UserError(error)


class FolderLock:
    """An exclusive lock on a run folder, held while this process lives: ``flock`` on the
    folder's ``.lock`` file, which the operating system releases when the process ends, however
    it ends (a killed run never leaves a stale lock). The file names the holder (pid, host, start
    time) for the message a second run gets. On NFS, Linux emulates ``flock`` with byte-range
    locks that every client sees; where the file system cannot lock (e.g. Lustre mounted without
    ``-o flock``) :meth:`acquire` says so and the run goes on without the lock."""

    NAME = ".lock"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`UserError` naming the run that holds it."""
        path = self.folder / self.NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as err:
            raise UserError(f"cannot create the lock file {path} ({err.strerror or err}): choose a writable "
                            "--save_folder") from None
        if fcntl is None:
            os.close(fd)
            return _unlocked(self.folder, "this system has no flock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(f"{self.folder} is in use by another run ({holder}): wait for it to end, or give "
                            "another --trial or --save_folder") from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP, ENOSYS: the file system has no locks
            os.close(fd)
            return _unlocked(self.folder, err.strerror or str(err))
        self.fd = fd
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the lock
            self.fd = None


def _unlocked(folder: Path, reason: str) -> None:
    print(f"warning: cannot lock the run folder {folder} ({reason}): a second run started in it would not be "
          "refused; start one run per folder", file=sys.stderr, flush=True)


def _holder(fd: int, wait: float = 1.0) -> str:
    """Who holds the lock, from the lock file (``pid 12 on host node3, started ...``); the
    holder writes it just after locking, so an empty file is read again for up to ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        try:
            record = json.loads(os.pread(fd, 4096, 0).decode())
            return f"pid {record['pid']} on host {record['host']}, started {record['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "a process that has not said which"
            time.sleep(0.05)


_held: dict[Path, FolderLock] = {}


def release_run_folders() -> None:
    """Release the run folders this process holds (at the end of a run; the process's end
    releases them anyway)."""
    for lock in _held.values():
        lock.release()
    _held.clear()


RUN_FILES = ("*.pth", "results.json", "args.json", "events.out.tfevents.*")


def _claim(folder: Path, resume: Path | None, overwrite: bool, resume_asked: bool) -> None:
    if overwrite and resume_asked:
        raise UserError("--overwrite and --resume contradict each other: --resume continues the run in "
                        f"{folder}, --overwrite starts it again; give one of them")
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"{blocker} is a file, not a folder, so the run folder {folder} cannot be made there: "
                        "choose another --save_folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write into the run folder {folder} ({err.strerror or err}): choose a writable "
                        "--save_folder") from None
    key = folder.resolve()
    if key not in _held:
        lock = FolderLock(folder)
        lock.acquire()
        _held[key] = lock
    try:
        _check_and_clear(folder, resume, overwrite, resume_asked)
    except UserError:
        _held.pop(key).release()
        raise


def _check_and_clear(folder: Path, resume: Path | None, overwrite: bool, resume_asked: bool) -> None:
    remove_temporaries(folder)
    held = sorted(p.name for p in folder.glob("*.pth"))
    if resume is not None:
        if held and resume.resolve().parent != folder.resolve():
            raise UserError(f"--resume {resume} continues into {folder}, which holds another run's checkpoints "
                            f"({', '.join(held[:3])}): resume in that run's own folder (--save_folder), or move them")
        return
    if not held:
        if _ended_status(folder) is None:
            _delete(folder, "the records of a run that stopped before its first checkpoint")
            return
        held = ["results.json"]  # a run's results whose checkpoints were deleted
    if not overwrite and resume_asked:
        raise UserError(f"{folder} holds checkpoints ({', '.join(held[:3])}) but none to continue from: start the "
                        "run again with --overwrite (they are deleted), or give another --trial or --save_folder")
    if not overwrite:
        raise UserError(f"{folder} already holds a run ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
                        "continue it with --resume auto, start it again with --overwrite (its checkpoints and "
                        "results are deleted), or give another --trial or --save_folder")
    _delete(folder)


def _ended_status(folder: Path) -> str | None:
    """The status of the run whose ``results.json`` is in ``folder``, unless it is none or
    ``running`` (a run that was killed: with no checkpoint, nothing of it can be continued)."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text()).get(F.status)
    except (OSError, ValueError, AttributeError):
        return "unreadable"
    return None if status == RUNNING else str(status)


def _delete(folder: Path, what: str | None = None) -> None:
    """Delete the run files of ``folder`` (:data:`RUN_FILES`); ``what`` they are, when they are
    the remains of a killed run rather than a run given up with ``--overwrite`` (a note says so)."""
    found = [path for pattern in RUN_FILES for path in sorted(folder.glob(pattern))]
    for path in found:
        try:
            path.unlink()
        except OSError as err:
            raise UserError(f"{'--overwrite: ' if what is None else ''}cannot delete {path} "
                            f"({err.strerror or err})") from None
    if found and what is not None:
        distributed.say(f"note: removed {', '.join(p.name for p in found)} from {folder}: {what}")
