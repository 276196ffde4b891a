"""Under torchrun, a rank that stops answering makes the others stop after ``--dist_timeout``
minutes with one line naming it (instead of hanging for gloo's 30 minutes): two gloo processes
on the CPU, launched as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT), rank 1 hung."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "resnet8", "--dataset", "synthetic", "--synthetic_classes", "4", "--synthetic_train", "16",
        "--synthetic_test", "4", "--batch_size", "8", "--epochs", "1", "--num_workers", "0", "--device", "cpu",
        "--dist_timeout", "0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_survivor_names_the_rank_that_stopped_answering(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "STALL_S": "300"}
    cmd = [sys.executable, "tests/ddp_stall_driver.py", *ARGS, "--save_folder", str(tmp_path / "runs")]
    log1 = tmp_path / "rank1.txt"
    with open(log1, "w") as out1:
        stalled = subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": "1", "LOCAL_RANK": "1"}, stdout=out1,
                                   stderr=subprocess.STDOUT)
        survivor = subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": "0", "LOCAL_RANK": "0"},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for line in survivor.stdout:  # printed by rank 0 just before the first step
                if line.startswith("training resnet8"):
                    break
            started = time.monotonic()
            _, err = survivor.communicate(timeout=120)
            waited = time.monotonic() - started
        finally:
            for proc in (survivor, stalled):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert "stalling" in log1.read_text(), "rank 1 never reached its hung step"
    lines = [line for line in err.splitlines() if line.strip()]
    assert survivor.returncode == 1 and "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: rank 1 of 2 stopped answering (no reply within --dist_timeout 0.1 minutes; "
                               "rank 0 stops here)"), lines[0]
    # 6 s of timeout, about 1 s for the other ranks to check in, and the steps before it: not 30 minutes
    assert waited < 30, waited
