"""Under torchrun, a rank that stops answering makes the others stop after ``--dist_timeout``
minutes with one line naming it (instead of hanging for gloo's 30 minutes): two gloo processes
on the CPU, launched as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT), rank 1 hung."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from common import distributed
from tests.datagen import SYNTHETIC

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--model", "resnet8", *SYNTHETIC, "--epochs", "1", "--dist_timeout", "0.1"]


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


TIMEOUT = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv operation")


@pytest.fixture
def store(monkeypatch):
    """Rank 0 of 3, with an in-memory store in place of torchrun's."""
    kv = dist.HashStore()
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: kv)
    monkeypatch.setattr(distributed, "current", lambda: distributed.DistInfo(0, 3, 0, "gloo"))
    return kv


def test_ranks_that_did_not_fail_are_the_ones_named(store):
    store.set(distributed._lost_key(2), "1")  # rank 2 timed out too; rank 1 never did
    lost = distributed.lost_rank_error(TIMEOUT, 0.1, grace_s=0.2)
    assert isinstance(lost, distributed.RankLost) and lost.exit_code == 1
    assert str(lost).startswith("error: rank 1 of 3 stopped answering (no reply within --dist_timeout 0.1 minutes; "
                                "rank 0 stops here)")
    assert store.check([distributed._lost_key(0)])  # this rank marked itself for the others


def test_the_rank_the_others_gave_up_on_says_it_fell_behind(store):
    for rank in (1, 2):
        store.set(distributed._lost_key(rank), "1")
    message = str(distributed.lost_rank_error(RuntimeError("Connection closed by peer [127.0.0.1]:9650"), 0.1))
    assert message.startswith("error: this rank (0 of 3) fell behind: the others gave up waiting for it"), message


def test_without_the_store_the_message_still_says_what_happened(monkeypatch):
    def gone():
        raise RuntimeError("Broken pipe")
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", gone)
    monkeypatch.setattr(distributed, "current", lambda: distributed.DistInfo(1, 2, 1, "gloo"))
    message = str(distributed.lost_rank_error(TIMEOUT, 2.0, grace_s=0.1))
    assert message == ("error: rank 1 of 2: no reply within --dist_timeout 2 minutes; another rank stopped or "
                       "crashed and it could not be told which: see the other ranks' output")


def test_only_peer_failures_count_as_collective_failures():
    assert distributed.is_collective_failure(TIMEOUT)
    assert distributed.is_collective_failure(RuntimeError("[pair.cc:561] Connection closed by peer [::1]:41"))
    assert not distributed.is_collective_failure(RuntimeError("CUDA error: an illegal memory access"))
    assert not distributed.is_collective_failure(ValueError("Timed out"))


def test_when_every_rank_fails_together_none_is_blamed(store):
    late = threading.Timer(0.1, lambda: [store.set(distributed._lost_key(r), "1") for r in (1, 2)])
    late.start()
    message = str(distributed.lost_rank_error(TIMEOUT, 0.1, grace_s=5.0))
    late.join()
    assert message.startswith("error: every rank's collective failed (no reply within --dist_timeout 0.1 minutes)")
