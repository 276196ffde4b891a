"""Files a run writes: atomic replacement under names unique to the writing process, the mode
the user's umask gives, and a test hook that kills the process at a chosen point of a write."""
from __future__ import annotations

import os
import re
import signal
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

# Temporary names of an atomic write: ``.<name>.<random>.tmp`` (and ``.<name>.tmp``, the name
# earlier versions gave JSON files), removed when a run claims its folder.
TEMPORARY_PATTERNS = (".*.pth.*.tmp", ".*.json.*.tmp", ".*.json.tmp")

# Test hook: ``<point>:<file name>[@<n>]`` kills this process with SIGKILL at that point of the
# n-th write (default the first) of that file, as a power cut or kill -9 would. Points:
# ``before`` (nothing written yet), ``written`` (the temporary file complete, not renamed) and
# ``renamed`` (the file in place).
KILL_AT = "REPDISTILL_TEST_KILL_AT"
KILL_POINTS = ("before", "written", "renamed")
_writes: dict[str, int] = {}


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0o644 under the usual 022)."""
    try:  # read, not set: setting the umask to probe it would race with other threads' files
        status = Path("/proc/self/status").read_text()
        mask = int(re.search(r"^Umask:\s*([0-7]+)", status, re.MULTILINE).group(1), 8)
    except (OSError, AttributeError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def _kill_point(point: str, path: Path) -> None:
    wanted = os.environ.get(KILL_AT)
    if not wanted:
        return
    if point == "before":
        _writes[path.name] = _writes.get(path.name, 0) + 1
    where, _, count = wanted.partition("@")
    if where == f"{point}:{path.name}" and _writes.get(path.name) == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)``: into a temporary file of a name unique to this
    call in the same folder, flushed to disk, given the umask's mode and renamed over ``path``.
    A crash or a failing write (OSError, raised) never leaves a truncated ``path``: it is either
    the old file or the new one, whole. Another process writing the same name at once gets
    its own temporary file (the last rename wins)."""
    path = Path(path)
    _kill_point("before", path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        _kill_point("written", path)
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    _sync_folder(path.parent)
    _kill_point("renamed", path)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a power cut after it keeps the new name); a no-op
    where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writes cut short left in ``folder`` (see
    :data:`TEMPORARY_PATTERNS`); returns what was removed. Call it only while holding the
    folder (:func:`engine.resume.claim_run_folder`): another run's writes in progress would go."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for pattern in TEMPORARY_PATTERNS:
            for path in folder.glob(pattern):
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed
