"""Checkpoints: atomic writes with the user's file mode, loading that can never run code, and
clear errors for every way a file can be unusable."""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from common.errors import UserError
from common.files import atomic_write, file_mode, remove_temporaries  # noqa: F401 (re-exported)

# The only class a checkpoint may hold besides tensors and plain types: RepDistiller's
# ``<model>_last.pth`` stores its argparse options as ``'opt'``.
SAFE_CLASSES = (argparse.Namespace,)
# What torch.load raises for a file that is not a readable checkpoint (besides UnpicklingError).
LOAD_ERRORS = (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, AttributeError,
               TypeError, IndexError, UnicodeDecodeError)


RUN_ADVICE = "Free space or choose another --save_folder, then continue with --resume auto"


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike, advice: str = RUN_ADVICE) -> None:
    """Write ``state`` to ``path`` atomically (:func:`common.files.atomic_write`: a temporary
    file of its own, flushed to disk, renamed over ``path``), so a crash, a full disk or a failing
    write never leaves a truncated file and a good checkpoint is only ever replaced by a complete
    one. A failing write raises :class:`UserError` (the old ``path`` is kept), ending with
    ``advice``: what to do."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as err:
        raise write_error(path, err, advice) from None


def copy_checkpoint(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy the checkpoint file ``source`` to ``path`` byte for byte, atomically as
    :func:`save_checkpoint` writes (a failing write raises :class:`UserError`)."""
    path = Path(path)
    try:
        with open(source, "rb") as src:
            atomic_write(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))
    except OSError as err:
        raise write_error(path, err, RUN_ADVICE) from None


def write_error(path: Path, err: Exception, advice: str) -> UserError:
    """The one line of a checkpoint write that failed (``err``), ending with ``advice``."""
    reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[-1]
    kept = "the previous one was kept" if path.is_file() else "nothing was written"
    return UserError(f"could not write the checkpoint {path} ({type(err).__name__}: {reason}): "
                     f"{kept}; is the disk full or the folder not writable? {advice}")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``: tensors and plain types only (and
    the argparse options of RepDistiller's ``<model>_last.pth``), so that no file can run code.

    A missing, unreadable or non-checkpoint file, one that holds other objects, and one whose
    ``'model'`` entry is not a state dict raise :class:`UserError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist: check the path")
    try:
        with torch.serialization.safe_globals(list(SAFE_CLASSES)), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. about the pickle protocol: we say what matters
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            raise _refused(path, str(err)) from None
        raise _unreadable(path, err) from None
    except LOAD_ERRORS as err:
        raise _unreadable(path, err) from None
    if not isinstance(state, Mapping):
        raise UserError(f"'{path}' holds a {type(state).__name__}, not a checkpoint dict with a 'model' entry")
    if "model" in state:
        check_state_dict(state["model"], f"'{path}'")
    return dict(state)


def saved_mark(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``resume['save']`` entry of the checkpoint ``path`` (which save wrote it: its number
    and files), read without loading its tensors; None when the file is missing, unreadable
    or has none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        mark = state["resume"]["save"]
    except (pickle.UnpicklingError, *LOAD_ERRORS):
        return None
    return mark if isinstance(mark, dict) else None


def _unreadable(path: Path, err: Exception) -> UserError:
    return UserError(f"'{path}' is not a readable PyTorch checkpoint ({type(err).__name__}): "
                     "it may be truncated or another kind of file")


def _refused(path: Path, message: str) -> UserError:
    found = re.search(r"GLOBAL ([\w.]+)", message)
    what = found.group(1) if found else "Python objects"
    hint = ("; if it was written by an older RepDistill (numpy random states), convert it once with "
            f"python scripts/upgrade_checkpoint.py {path}" if what.startswith("numpy") else "")
    return UserError(f"'{path}' was refused: it holds {what}, not only tensors and plain types, and loading it "
                     f"could run code (only checkpoints of trusted origin should ever be unpickled){hint}")


def check_state_dict(state_dict: Any, source: str) -> None:
    """Raise :class:`UserError` unless ``state_dict`` maps parameter names to tensors."""
    if not isinstance(state_dict, Mapping):
        raise UserError(f"the 'model' entry of {source} is a {type(state_dict).__name__}, not a state dict "
                        "(parameter name -> tensor): it is not a model checkpoint")
    bad = [str(k) for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"the 'model' entry of {source} holds {len(bad)} entries that are not named tensors "
                        f"(e.g. {bad[0]!r}): it is not a model checkpoint")


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                 what: str | None = None) -> None:
    """Load ``state_dict`` into ``model`` strictly, accepting DataParallel/DDP ('module.') and
    torch.compile ('_orig_mod.') prefixes; disagreeing keys or shapes raise :class:`UserError`
    naming them (``what`` describes the model in that message, e.g. its architecture's name)."""
    check_state_dict(state_dict, source)
    state_dict = {_strip_prefixes(k): v for k, v in state_dict.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} (file {list(state_dict[k].shape)}, model {list(expected[k].shape)})"
                   for k in expected if k in state_dict and expected[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
                parts.append(f"{label}: {shown}")
        question = ("is it a checkpoint of another architecture?" if missing or unexpected else
                    "was it trained with another number of classes, or is it another width?")
        raise UserError(f"the weights in {source} do not fit {what or 'a ' + type(model).__name__} "
                        f"({'; '.join(parts)}): {question}")
    model.load_state_dict(state_dict, strict=True)


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinity."""
    return [name for name, t in state.items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of ``module``'s state (names, dtypes, shapes and values): the identity of a set of
    weights, whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tensor.numel()};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key
