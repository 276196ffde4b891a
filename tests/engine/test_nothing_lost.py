"""Nothing lost: a kill -9 at every point of an epoch's save sequence, two runs started in one
folder at once, replaying a run made with --overwrite, and a full disk under TensorBoard.

The killed and the racing runs are real processes: forks of this one (the training script's
``main`` in a child that SIGKILLs itself at the chosen point of a write, see
``common.files.KILL_AT``), so that no process pays the start-up of Python and torch again."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from common.files import KILL_AT, atomic_write
from engine import resume as resume_mod
import train_teacher

pytestmark = pytest.mark.e2e

DATA = ["--dataset", "synthetic", "--synthetic_classes", "4", "--synthetic_train", "4", "--synthetic_test", "4",
        "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--deterministic"]
RUN = ["--model", "resnet8", *DATA, "--epochs", "2", "--save_freq", "1"]
FOLDER = "resnet8_synthetic_lr_0.05_decay_0.0005_trial_0"
SAVED = ["resnet8_last.pth", "resnet8_best.pth", "ckpt_epoch_1.pth", "ckpt_epoch_2.pth"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, in this process and its forks (a fork must not inherit a busy
    OpenMP pool; equal thread counts give equal floats)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fork_main(argv: list[str], env: dict[str, str] | None = None, log: Path | None = None,
              start: int | None = None) -> int:
    """Run ``train_teacher.main(argv)`` in a forked child with ``env`` set (its stdout and stderr
    to ``log``; after reading one byte from the pipe ``start``, if given); returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        if log is not None:  # pytest's capture replaced sys.stdout and sys.stderr: replace them again
            sys.stdout = sys.stderr = open(log, "w", buffering=1)
        os.environ.update(env or {})
        if start is not None:
            os.read(start, 1)
        train_teacher.main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must never return into pytest
        code = 4
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int, timeout: float = 120.0) -> tuple[str, int]:
    """``('killed', signal)`` or ``('exited', status)`` of the child ``pid`` (killed, and the
    test failed, if it has not ended within ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {pid} still running after {timeout:.0f} s")
        time.sleep(0.02)
    if os.WIFSIGNALED(status):
        return "killed", os.WTERMSIG(status)
    return "exited", os.WEXITSTATUS(status)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The run uninterrupted."""
    save = tmp_path_factory.mktemp("whole")
    torch.set_num_threads(1)
    train_teacher.main(RUN + ["--save_folder", str(save)])
    return save / FOLDER


# Every write of the save sequence at the end of epoch 1 (best and ckpt_epoch_1 are written
# too), and the end of the last epoch: killed once last.pth is in place, the resume finds the
# run complete and must still write ckpt_epoch_2.pth (the file tables use as --path_t).
KILLS = [f"{point}:{name}" for name in ("resnet8_last.pth", "resnet8_best.pth", "ckpt_epoch_1.pth")
         for point in ("before", "written", "renamed")] + ["written:results.json@2", "renamed:resnet8_last.pth@2"]


@pytest.mark.parametrize("kill_at", KILLS)
def test_a_kill_in_the_save_sequence_loses_nothing(kill_at, whole, tmp_path, capsys):
    args = RUN + ["--save_folder", str(tmp_path)]
    assert wait(fork_main(args, {KILL_AT: kill_at})) == ("killed", signal.SIGKILL)
    folder = tmp_path / FOLDER
    results = train_teacher.main(args + ["--resume", "auto"])
    assert results["status"] == "finished" and [h["epoch"] for h in results["history"]] == [1, 2]
    assert not list(folder.glob(".*.tmp")), "temporary files of the killed write are removed"
    for name in SAVED:
        ours, reference = torch.load(folder / name), torch.load(whole / name)
        assert (ours["epoch"], ours["best_acc"]) == (reference["epoch"], reference["best_acc"]), name
        for key, tensor in reference["model"].items():
            assert torch.equal(ours["model"][key], tensor), (name, key)
    expected = json.loads((whole / "results.json").read_text())
    assert [h["test_acc"] for h in results["history"]] == [h["test_acc"] for h in expected["history"]]
    if kill_at.startswith("renamed:resnet8_last.pth"):
        assert "wrote" in capsys.readouterr().out  # the resume said which files it completed


def test_two_runs_started_at_once_in_one_folder(tmp_path):
    """Both processes start together: one trains, the other is refused naming the first; the
    folder holds one run (one TensorBoard file, its results)."""
    args = ["--model", "resnet8", *DATA, "--synthetic_train", "64", "--epochs", "3", "--save_folder", str(tmp_path)]
    read, write = os.pipe()
    pids = [fork_main(args, log=tmp_path / f"log{i}", start=read) for i in range(2)]
    os.write(write, b"go")
    ends = {pid: wait(pid) for pid in pids}
    os.close(read)
    os.close(write)
    assert sorted(ends.values()) == [("exited", 0), ("exited", 2)], ends
    winner, loser = sorted(pids, key=lambda pid: ends[pid][1])
    err = (tmp_path / f"log{pids.index(loser)}").read_text()
    assert f"is in use by another run (pid {winner} on host " in err and "Traceback" not in err, err
    assert err.count("error:") == 1
    folder = tmp_path / FOLDER
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "finished" and len(results["history"]) == 3
    assert not list(folder.glob(".*.tmp"))


def hold(folder: Path) -> tuple[int, int]:
    """A child process that locks ``folder`` as a run does and holds it until its pipe is
    closed: (pid, pipe)."""
    ready, done = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(done[1])  # so that the parent's close is an end of file here
            resume_mod.FolderLock(folder).acquire()
            os.write(ready[1], b"1")
            os.read(done[0], 1)
        finally:
            os._exit(0)
    os.close(done[0])
    os.read(ready[0], 1)
    os.close(ready[0])
    os.close(ready[1])
    return pid, done[1]


def test_a_living_runs_folder_is_refused_and_a_killed_runs_is_not(tmp_path, capsys):
    args = RUN + ["--save_folder", str(tmp_path), "--epochs", "1"]
    train_teacher.main(args)
    folder = tmp_path / FOLDER
    before = {p.name: digest(p) for p in folder.iterdir() if p.name != ".lock"}
    pid, release = hold(folder)
    try:
        for extra in ([], ["--resume", "auto", "--epochs", "2"], ["--overwrite"]):
            capsys.readouterr()
            with pytest.raises(SystemExit) as stop:
                train_teacher.main(args + extra)
            err = capsys.readouterr().err
            assert stop.value.code == 2 and err.count("\n") == 1, err
            assert f"{folder} is in use by another run (pid {pid} on host " in err and "--trial" in err
        assert {p.name: digest(p) for p in folder.iterdir() if p.name != ".lock"} == before
    finally:
        os.close(release)
        assert wait(pid) == ("exited", 0)
    # the holder is gone (as a kill -9 would end it): its lock went with it
    results = train_teacher.main(args + ["--resume", "auto", "--epochs", "2"])
    assert results["status"] == "finished" and results["epochs_run"] == 2


def test_a_file_system_without_locks_is_said(tmp_path, capsys, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    resume_mod.claim_run_folder(tmp_path / "run", resume=None, overwrite=False)
    resume_mod.release_run_folders()
    err = capsys.readouterr().err
    assert err.startswith(f"warning: cannot lock the run folder {tmp_path / 'run'} (No locks available): a second run")


def test_temporary_names_are_unique_to_each_write(tmp_path):
    """A write of the same file that starts while another is under way (another process's,
    say) gets a temporary file of its own; each rename is of a whole file."""
    path = tmp_path / "results.json"
    seen = []

    def outer(f):
        f.write(b"outer")
        atomic_write(path, lambda g: (seen.extend(p.name for p in tmp_path.glob(".results.json.*.tmp")),
                                      g.write(b"inner")))

    atomic_write(path, outer)
    assert len(seen) == 2 and len(set(seen)) == 2, seen
    assert path.read_bytes() == b"outer" and not list(tmp_path.glob(".*.tmp"))


def test_records_of_a_run_killed_before_its_first_checkpoint_are_replaced(tmp_path, capsys):
    """A run killed before it saved anything leaves args.json, TensorBoard events and a
    'running' results.json: a new start there replaces them (one events file, not two)."""
    args = RUN + ["--save_folder", str(tmp_path), "--epochs", "1"]
    assert wait(fork_main(args, {KILL_AT: "before:resnet8_last.pth"})) == ("killed", signal.SIGKILL)
    folder = tmp_path / FOLDER
    assert json.loads((folder / "results.json").read_text())["status"] == "running"
    train_teacher.main(args)
    out = capsys.readouterr().out
    assert "note: removed results.json, args.json, events.out.tfevents." in out
    assert "a run that stopped before its first checkpoint" in out
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1


def test_replaying_a_run_made_with_overwrite_deletes_nothing(tmp_path, capsys):
    args = RUN + ["--save_folder", str(tmp_path), "--epochs", "1"]
    train_teacher.main(args + ["--overwrite"])
    folder = tmp_path / FOLDER
    recorded = json.loads((folder / "args.json").read_text())
    assert "overwrite" not in recorded and "resume" not in recorded
    config = str(folder / "args.json")
    before = {p.name: digest(p) for p in folder.glob("*.pth")}
    with pytest.raises(SystemExit) as stop:  # a replay alone: the folder holds the run
        train_teacher.main(["--config", config])
    assert stop.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert {p.name: digest(p) for p in folder.glob("*.pth")} == before
    # the documented way to continue it
    results = train_teacher.main(["--config", config, "--resume", "auto", "--epochs", "2"])
    assert results["status"] == "finished" and results["epochs_run"] == 2 and results["resumed"] == 1
    # an args.json of an earlier version, which recorded "overwrite": true, deletes nothing either
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({**recorded, "overwrite": True, "resume": None}))
    before = {p.name: digest(p) for p in folder.glob("*.pth")}
    with pytest.raises(SystemExit) as stop:
        train_teacher.main(["--config", str(legacy)])
    assert stop.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert {p.name: digest(p) for p in folder.glob("*.pth")} == before
    # a YAML file may not say it either: only the command line deletes
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("overwrite: true\n")
    with pytest.raises(SystemExit) as stop:
        train_teacher.main(["--config", str(yaml_file)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "'overwrite' cannot be set in a configuration file" in err
    assert "give --overwrite on the command line" in err


@pytest.mark.parametrize("fail_from", [1, 3], ids=["at-start", "mid-run"])
def test_full_disk_under_tensorboard_is_one_line(fail_from, tmp_path, capsys, monkeypatch):
    """The events file's writes fail with ENOSPC from its first write (the writer's creation)
    or later (an epoch's flush): one line, no traceback from TensorBoard's writer thread."""
    from tensorboard.compat.tensorflow_stub.io import gfile

    calls = {"n": 0}

    def full(self, filename, file_content, binary_mode=False):
        calls["n"] += 1
        if calls["n"] >= fail_from:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(self, filename, file_content, binary_mode)

    real_append = gfile.LocalFileSystem.append
    monkeypatch.setattr(gfile.LocalFileSystem, "append", full)
    monkeypatch.setattr(gfile.LocalFileSystem, "write", full)
    with pytest.raises(SystemExit) as stop:
        train_teacher.main(RUN + ["--save_folder", str(tmp_path), "--epochs", "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "could not write the TensorBoard events" in err and "No space left on device" in err
    assert "--resume auto" in err
