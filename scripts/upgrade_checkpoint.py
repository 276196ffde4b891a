"""Convert checkpoints written by RepDistill before version 0.2 (numpy random states inside, which
``torch.load(weights_only=True)`` refuses) into the current format (tensors and plain types only).

    python scripts/upgrade_checkpoint.py save/models/<run>/last.pth [more files ...]

Each file is read with ``weights_only=True`` and numpy's array types allowed (still no code can
run), its random states are stored as tensors, and it is written back atomically; the original is
kept beside it as ``<file>.orig``. Files already in the current format are left alone. A file that
is not such a checkpoint (not a dict, no ``resume['per_rank'][i]['rng']``, random states that do not
restore, numpy objects elsewhere) is refused with one line and left as it is: nothing is written
unless the converted checkpoint loads with ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import io
import random
import re
import shutil
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.checkpoint import SAFE_CLASSES, save_checkpoint  # noqa: E402
from common.errors import UserError, exit_on_user_error  # noqa: E402
from common.runtime import plain_rng_states  # noqa: E402

try:  # numpy 2; numpy 1 names the module numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import _reconstruct

# numpy arrays, as the random states of older checkpoints hold them
NUMPY_ARRAY_TYPES = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct]
RNG_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError)


def tensor_rng(state: dict) -> dict:
    """A ``common.runtime.rng_state`` dict of the older format (Python and numpy states as their
    own tuples) in the current one (tensors and numbers)."""
    if isinstance(state.get("python"), dict):
        return state
    return {**state, **plain_rng_states(state["python"], state["numpy"])}


def load(source, allowed: list) -> object:
    """``torch.load(weights_only=True)`` of ``source`` with the classes ``allowed`` besides
    tensors and plain types (none of which can run code)."""
    with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(source, map_location="cpu", weights_only=True)


def refused(path: Path, why: str) -> UserError:
    return UserError(f"'{path}' is not an older RepDistill checkpoint that can be upgraded: {why}; "
                     "the file was left as it is")


def reason(err: Exception) -> str:
    """An exception as ``Type: its last line`` (a KeyError as the entry it missed)."""
    text = f"no {err.args[0]!r} entry" if isinstance(err, KeyError) and err.args else str(err).strip()
    return f"{type(err).__name__}: {(text.splitlines() or [''])[-1][:200]}"


def forbidden(err: Exception) -> str | None:
    """The class a ``weights_only`` load refused, named in its message (None if none is)."""
    found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(err))
    return (found.group(1) or found.group(2)) if found else None


def kind(value) -> str:
    return f"a {type(value).__name__}"


def checked_rng(rng, where: str, path: Path) -> dict:
    """``rng`` (the random states of one process) in the current format, after checking that each
    state restores into a fresh generator as ``common.runtime.set_rng_state`` will restore it."""
    if not isinstance(rng, dict):
        raise refused(path, f"{where} is {kind(rng)}, not a dict of random states")
    try:
        new = tensor_rng(rng)
        py, npy = new["python"], new["numpy"]
        random.Random().setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
        np.random.RandomState().set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                                           npy["has_gauss"], npy["cached_gaussian"]))
        torch.Generator().set_state(new["torch"])
        if not all(torch.is_tensor(s) and s.dtype == torch.uint8 for s in new.get("cuda", [])):
            raise TypeError("the CUDA states are not byte tensors")
    except RNG_ERRORS as err:
        raise refused(path, f"{where} is not a random state RepDistill wrote ({reason(err)})") from None
    return new


def upgraded(state: Mapping, path: Path) -> dict:
    """``state`` with the random states of every process (``resume['per_rank'][i]['rng']``) in
    the current format; :class:`UserError` for anything else than what RepDistill wrote."""
    resume = state.get("resume")
    if not isinstance(resume, dict):
        raise refused(path, "it has no 'resume' entry (where the random states to convert are)" if resume is None
                      else f"its 'resume' entry is {kind(resume)}, not a dict")
    per_rank = resume.get("per_rank")
    if not isinstance(per_rank, list) or not per_rank:
        raise refused(path, "its 'resume' entry has no 'per_rank' (one entry per process)" if per_rank is None
                      else "its resume['per_rank'] is empty" if isinstance(per_rank, list)
                      else f"its resume['per_rank'] is {kind(per_rank)}, not a list of one entry per process")
    ranks = []
    for i, rank in enumerate(per_rank):
        where = f"resume['per_rank'][{i}]"
        if not isinstance(rank, dict) or "rng" not in rank:
            raise refused(path, f"{where} has no 'rng' entry" if isinstance(rank, dict)
                          else f"{where} is {kind(rank)}, not a dict")
        ranks.append({**rank, "rng": checked_rng(rank["rng"], f"{where}['rng']", path)})
    return {**state, "resume": {**resume, "per_rank": ranks}}


def upgrade(path: Path) -> bool:
    """Rewrite ``path`` in the current format; False when it already is. Nothing is written unless
    the converted checkpoint loads with ``weights_only=True`` (checked in memory first)."""
    try:
        state, current = load(path, list(SAFE_CLASSES)), True
    except Exception:  # noqa: BLE001 - any refusal: try with numpy's array types allowed
        current = False
    if not current:
        try:
            state = load(path, list(SAFE_CLASSES) + NUMPY_ARRAY_TYPES)
        except Exception as err:  # noqa: BLE001
            name = forbidden(err)
            raise refused(path, f"it holds {name}, which is never read (only tensors, plain types and numpy arrays, "
                          "so that no code can run)" if name else f"it cannot be read ({reason(err)})") from None
    if not isinstance(state, Mapping):
        raise refused(path, f"it holds {kind(state)}, not a checkpoint dict")
    if current:
        return False
    state = upgraded(state, path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        load(buffer, list(SAFE_CLASSES))
    except Exception as err:  # noqa: BLE001
        raise refused(path, f"it holds {forbidden(err) or 'objects'} outside the random states this script "
                      "converts") from None
    original = path.with_name(path.name + ".orig")
    try:
        shutil.copy2(path, original)
    except OSError as err:
        original.unlink(missing_ok=True)
        raise UserError(f"could not keep the original of '{path}' as '{original}' ({err.strerror or err}): "
                        "nothing was changed; free space or make the folder writable") from None
    save_checkpoint(state, path, advice="Free space, then run this script again")
    return True


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="checkpoints to convert in place")
    args = parser.parse_args(argv)
    for path in args.files:
        if not path.is_file():
            raise UserError(f"'{path}' is not a regular file" if path.exists() else f"'{path}' does not exist")
        print(f"{path}: {'upgraded (original kept as ' + path.name + '.orig)' if upgrade(path) else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
