"""One rank of a stalled-rank test (tests/engine/test_dist_timeout.py): run ``train_teacher.main`` with the
command-line flags, as torchrun's rank ``RANK`` (its environment variables set by the test); on
rank 1 the second training step first sleeps ``STALL_S`` seconds, as a hung process would."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# the repository root instead of tests/, whose folders (engine/, models/, ...) are named like the
# packages they test and would hide those without an __init__.py (engine/, common/)
sys.path[0] = str(Path(__file__).resolve().parents[1])

from engine import steps  # noqa: E402
import train_teacher  # noqa: E402


def stall_second_step(seconds: float) -> None:
    """Make the second call of ``ClassifyStep.forward`` in this process sleep ``seconds`` first."""
    original = steps.ClassifyStep.forward
    calls = {"n": 0}

    def forward(self, raw):
        calls["n"] += 1
        if calls["n"] == 2:
            print("stalling", flush=True)
            time.sleep(seconds)
        return original(self, raw)

    steps.ClassifyStep.forward = forward


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        stall_second_step(float(os.environ.get("STALL_S", "300")))
    train_teacher.main(sys.argv[1:])
