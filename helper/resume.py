"""What makes a run the same run: the settings a checkpoint records, the check that a resume
continues a run with the settings it was made with, and the run folder's claim (a new run never
overwrites another run's checkpoints)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from helper import distributed
from helper.checkpoint import remove_temporaries
from helper.errors import UserError
from helper.logger import jsonable

# Flags that cannot change what a run computes (beyond float rounding): a resume may change
# them, and results.json records the change. Every other option must stay as it was.
FREE_FLAGS = frozenset({
    "print_freq", "tb_freq", "save_freq", "num_workers", "resume", "overwrite", "save_folder", "save_path",
    "model_name", "data_folder", "download", "device", "deterministic", "compile", "channels_last",
    "max_steps", "command", "path_t", "dist_timeout", "plain_teacher", "nce_scores", "allow_modified_data",
    "epochs",  # checked on its own: it may grow with the step schedule
})

# How the options that are not flags of their own name are shown in messages.
DESCRIPTIONS = {
    "gamma": "-r", "alpha": "-a", "beta": "-b", "arch": "the architecture", "n_data": "the training set's size",
    "num_classes": "the number of classes", "model_t": "the teacher's architecture",
    "teachers": "the teacher's weights", "world_size": "the number of processes",
}


def run_options(opt, **extra: Any) -> dict[str, Any]:
    """Every option of the run as plain values (what a checkpoint records), with ``extra``
    identity entries (e.g. ``teachers``: digests of the teachers' weights, ``world_size``)."""
    options = {k: v for k, v in vars(opt).items() if not k.startswith("_")}
    options.update(extra)
    return jsonable(options)


def flag_name(key: str) -> str:
    return DESCRIPTIONS.get(key, f"--{key}")


def show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return str(value)


def compare_options(saved: dict[str, Any], current: dict[str, Any], epochs_done: int
                    ) -> tuple[list[str], dict[str, list[Any]]]:
    """``(refused, changed)``: the differences that would make a resumed run another run
    (``'--nce_k 16384 -> 4096'``), and the allowed ones, ``{flag: [old, new]}``.

    Allowed: the :data:`FREE_FLAGS`, and ``--epochs`` raised (or lowered to no fewer than the
    epochs done) with the step schedule; with the cosine schedule ``--epochs`` shapes every
    epoch's learning rate, so it must stay. Options the checkpoint does not record are not compared.
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
        if key in FREE_FLAGS:
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
        return None
    path = Path(value)
    if not path.is_file():
        raise UserError(f"--resume {value}: no such file; give a {checkpoint_names(prefix)[0]} path, "
                        "or 'auto' for this run's folder")
    return path


def claim_run_folder(folder: str | os.PathLike, *, resume: Path | None, overwrite: bool,
                     resume_asked: bool = False) -> None:
    """Make ``folder`` this run's, or raise :class:`UserError`: it must be a writable folder, and
    a new run (no ``resume``) may not start where another run's checkpoints are unless
    ``overwrite`` (which removes that run's checkpoints and records first). Temporary files of a
    crashed write are removed. Under torchrun rank 0 decides and every rank gets its answer."""
    error = None
    if distributed.is_main_process():
        try:
            _claim(Path(folder), resume, overwrite, resume_asked)
        except UserError as err:
            error = str(err)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise UserError(error)


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
    remove_temporaries(folder)
    held = sorted(p.name for p in folder.glob("*.pth"))
    if resume is not None:
        if held and resume.resolve().parent != folder.resolve():
            raise UserError(f"--resume {resume} continues into {folder}, which holds another run's checkpoints "
                            f"({', '.join(held[:3])}): resume in that run's own folder (--save_folder), or move them")
        return
    if not held:
        return
    if not overwrite and resume_asked:
        raise UserError(f"{folder} holds checkpoints ({', '.join(held[:3])}) but none to continue from: start the "
                        "run again with --overwrite (they are deleted), or give another --trial or --save_folder")
    if not overwrite:
        raise UserError(f"{folder} already holds a run ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
                        "continue it with --resume auto, start it again with --overwrite (its checkpoints and "
                        "results are deleted), or give another --trial or --save_folder")
    for pattern in RUN_FILES:
        for path in folder.glob(pattern):
            try:
                path.unlink()
            except OSError as err:
                raise UserError(f"--overwrite: cannot delete {path} ({err.strerror or err})") from None
