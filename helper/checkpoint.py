"""Checkpoints: atomic writes, loading with clear errors."""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from helper.errors import UserError


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder is written,
    flushed to disk and renamed over ``path``, so a crash never leaves a truncated file and a
    good checkpoint is only ever replaced by a complete one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file; a missing, unreadable or non-checkpoint file raises :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist: check the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise UserError(f"'{path}' is not a readable PyTorch checkpoint ({type(err).__name__}): "
                        "it may be truncated or another kind of file") from None
    if not isinstance(state, dict):
        raise UserError(f"'{path}' holds a {type(state).__name__}, not a checkpoint dict with a 'model' entry")
    return state


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                 what: str | None = None) -> None:
    """Load ``state_dict`` into ``model`` strictly, accepting DataParallel/DDP ('module.') and
    torch.compile ('_orig_mod.') prefixes; disagreeing keys or shapes raise :class:`UserError`
    naming them (``what`` describes the model in that message, e.g. its architecture's name)."""
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


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key
