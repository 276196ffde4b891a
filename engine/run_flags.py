"""Which recorded options a resume may change, and how messages name options. Plain Python (no
torch): ``engine/resume.py`` checks a resume with these, ``scripts/summarize.py`` names options
with them."""
from __future__ import annotations

from typing import Any

from common.declare import RESUMABLE

# What a script records beside the options (the run folder's name and path, the command line):
# never settings of the run, so a resume may find them changed.
RECORDED = frozenset({"save_path", "model_name", "command"})


def free_flags(opt) -> frozenset[str]:
    """The options of ``opt`` that a resume may change, because they cannot change what the run
    computes (beyond float rounding), and results.json records the change: those declared
    resumable where they are declared (``option(..., resumable=True)``, ``resumable(add_argument(...))``;
    the scripts' parser lists them on ``opt``, :func:`common.declare.record_resumable`) and
    :data:`RECORDED`. ``--epochs`` is one, checked on its own (``engine/resume.py``). Every
    other option must stay as it was."""
    return frozenset(vars(opt).get(RESUMABLE) or ()) | RECORDED

# How the options that are not flags of their own name are shown in messages.
DESCRIPTIONS = {
    "gamma": "-r", "alpha": "-a", "beta": "-b", "arch": "the architecture", "n_data": "the training set's size",
    "num_classes": "the number of classes", "model_t": "the teacher's architecture",
    "teachers": "the teacher's weights", "world_size": "the number of processes",
}


def flag_name(key: str) -> str:
    """How messages name the option ``key``: its flag (``--nce_k``, ``-a``) or a description."""
    return DESCRIPTIONS.get(key, f"--{key}")


def show(value: Any) -> str:
    """An option's value in a message: a list comma-separated (``(none)`` when empty)."""
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return str(value)
