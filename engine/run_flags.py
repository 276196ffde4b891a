"""Which recorded options make a run what it is, and how messages name them. Plain Python (no
torch): ``engine/resume.py`` checks a resume with these, ``scripts/summarize.py`` groups runs
into table rows with them."""
from __future__ import annotations

from typing import Any

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


def flag_name(key: str) -> str:
    """How messages name the option ``key``: its flag (``--nce_k``, ``-a``) or a description."""
    return DESCRIPTIONS.get(key, f"--{key}")


def show(value: Any) -> str:
    """An option's value in a message: a list comma-separated (``(none)`` when empty)."""
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return str(value)
