"""scripts/fetch_pretrained_teachers.sh: the teacher fetch verifies checksums and installs files
train_student.py loads, from RepDistiller's files or mdistiller's archive; a full or read-only
destination stops in one line and leaves no partial file."""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from models import build_model
from tests.scripts.test_run_scripts import (ARCHIVE_NAMES, CLEAN_ENV, ROOT, TEACHERS, add_member,  # noqa: F401
                                            checkpoint_bytes, manifest_file, release, script, sha256)
import train_student


# ---------------------------------------------------------------- fetch_pretrained_teachers.sh
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A fake download server (a folder for file:// URLs) holding a RepDistiller-format resnet32x4
    teacher, and a manifest with its true SHA-256."""
    root = tmp_path_factory.mktemp("server")
    path = root / "resnet32x4_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.manual_seed(0)
    torch.save({"model": build_model("resnet32x4", num_classes=100).state_dict(), "epoch": 240}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = root / "good.sha256"
    manifest.write_text(f"# a comment\n{digest}  resnet32x4_vanilla/ckpt_epoch_240.pth\n")
    assert subprocess.run(["sha256sum", "-c", str(manifest)], cwd=root, capture_output=True).returncode == 0
    return root, digest, manifest


def fetch(dest: Path, manifest: Path | None = None, check: bool = False, **env: str) -> subprocess.CompletedProcess:
    if manifest is not None:
        env["CHECKSUMS"] = str(manifest)
    return script("fetch_pretrained_teachers.sh", DEST=str(dest), check=check, **env)


def test_fetch_installs_a_verified_teacher_that_train_student_loads(server, tmp_path):
    root, digest, manifest = server
    dest = tmp_path / "models"
    out = fetch(dest, manifest, NAMES="resnet32x4", BASE_URL=f"file://{root}")
    assert out.returncode == 0, out.stderr
    installed = dest / "resnet32x4_vanilla" / "ckpt_epoch_240.pth"
    assert "SHA-256 verified" in out.stdout and hashlib.sha256(installed.read_bytes()).hexdigest() == digest
    assert [p.name for p in dest.iterdir()] == ["resnet32x4_vanilla"]  # no temporary file left
    results = train_student.main(["--path_t", str(installed), "--dataset", "synthetic", "--synthetic_classes", "100",
                                  "--synthetic_train", "2", "--synthetic_test", "1", "--model_s", "resnet8",
                                  "--distill", "kd", "--batch_size", "8", "--max_steps", "1", "--epochs", "1",
                                  "--num_workers", "0", "--device", "cpu", "--save_folder", str(tmp_path / "runs")])
    assert results["status"] == "stopped" and results["model_t"] == "resnet32x4"

    again = fetch(dest, manifest, NAMES="resnet32x4", BASE_URL="file:///nowhere")  # verified: not downloaded again
    assert again.returncode == 0 and "already there and verified" in again.stdout


def test_fetch_refuses_a_wrong_checksum(server, tmp_path):
    root, digest, _ = server
    wrong = tmp_path / "wrong.sha256"
    wrong.write_text(f"{'0' * 64}  resnet32x4_vanilla/ckpt_epoch_240.pth\n")
    out = fetch(tmp_path / "models", wrong, NAMES="resnet32x4", BASE_URL=f"file://{root}")
    assert out.returncode == 1 and "checksum mismatch" in out.stderr and digest in out.stderr
    assert not any(p.is_file() for p in (tmp_path / "models").rglob("*"))  # nothing installed, no temporary left


def test_fetch_failed_download_names_the_url_and_the_ways_out(server, tmp_path):
    _, _, manifest = server
    out = fetch(tmp_path / "models", manifest, NAMES="resnet32x4", BASE_URL=f"file://{tmp_path}/empty")
    assert out.returncode == 1
    assert f"could not download file://{tmp_path}/empty/resnet32x4_vanilla/ckpt_epoch_240.pth" in out.stderr
    assert "BASE_URL" in out.stderr and "run_cifar_vanilla.sh" in out.stderr
    assert not any(p.is_file() for p in (tmp_path / "models").rglob("*"))


def test_fetch_without_a_known_checksum_refuses_unless_allowed(server, tmp_path):
    root, digest, _ = server
    dest = tmp_path / "models"
    out = fetch(dest, NAMES="resnet32x4", BASE_URL=f"file://{root}")  # the shipped manifest: no checksums known
    assert out.returncode == 1 and "no checksum for resnet32x4_vanilla/ckpt_epoch_240.pth" in out.stderr
    assert "ALLOW_UNVERIFIED=1" in out.stderr and not dest.exists()
    out = fetch(dest, NAMES="resnet32x4", BASE_URL=f"file://{root}", ALLOW_UNVERIFIED="1")
    assert out.returncode == 0 and "UNVERIFIED" in out.stdout
    assert f"{digest}  resnet32x4_vanilla/ckpt_epoch_240.pth" in out.stdout.splitlines()  # the line to add
    assert (dest / "resnet32x4_vanilla" / "ckpt_epoch_240.pth").is_file()


def test_fetch_leaves_an_existing_own_teacher_alone(server, tmp_path):
    root, _, manifest = server
    own = tmp_path / "models" / "resnet32x4_vanilla" / "ckpt_epoch_240.pth"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"my own teacher")
    out = fetch(tmp_path / "models", manifest, NAMES="resnet32x4", BASE_URL=f"file://{root}")
    assert out.returncode == 0 and "not the published file" in out.stdout and own.read_bytes() == b"my own teacher"
    out = fetch(tmp_path / "models", manifest, NAMES="resnet32x4", BASE_URL=f"file://{root}", FORCE="1")
    assert out.returncode == 0 and "SHA-256 verified" in out.stdout and own.read_bytes() != b"my own teacher"


def test_shipped_manifest_claims_no_checksum_it_does_not_have():
    lines = (ROOT / "scripts" / "teachers.sha256").read_text().splitlines()
    entries = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            digest, path = line.split()
            assert len(digest) == 64 and int(digest, 16) >= 0, line
            entries[path] = digest
    known = [f"{name}_vanilla/ckpt_epoch_240.pth" for name in TEACHERS] + ["cifar_teachers.tar"]
    for path in known:  # each teacher and the archive: a checksum, or said plainly to be unknown (none is yet)
        assert (path in entries) != (f"# not yet known  {path}" in lines)
    assert set(entries) <= set(known)


# ---------------------------------------------------------------- fetch_pretrained_teachers.sh, SOURCE=mdistiller
def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def test_fetch_archive_verified_unpacks_the_names_asked_and_train_student_loads_them(release, tmp_path):
    root, archive, archive_sha, file_sha, url = release
    dest = tmp_path / "models"
    own = dest / "resnet14_vanilla" / "ckpt_epoch_240.pth"  # already there, no per-file checksum: left alone
    own.parent.mkdir(parents=True)
    own.write_bytes(b"my own teacher")
    manifest = manifest_file(tmp_path, f"{archive_sha}  cifar_teachers.tar")
    out = fetch(dest, manifest, NAMES="resnet8 resnet14", ARCHIVE_URL=f"{url}/cifar_teachers.tar")
    assert out.returncode == 0, out.stderr
    installed = dest / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    assert f"fetching {url}/cifar_teachers.tar" in out.stdout  # downloaded to a temporary file...
    assert f"SHA-256 of cifar_teachers.tar: {archive_sha}" in out.stdout
    assert "verified by the SHA-256 of cifar_teachers.tar" in out.stdout
    assert sha256(installed.read_bytes()) == file_sha["resnet8"] and oct(installed.stat().st_mode)[-3:] == "644"
    assert own.read_bytes() == b"my own teacher" and "skip resnet14" in out.stdout
    assert files_under(dest) == ["resnet14_vanilla/ckpt_epoch_240.pth", "resnet8_vanilla/ckpt_epoch_240.pth"]  # ...removed
    line = f"{file_sha['resnet8']}  resnet8_vanilla/ckpt_epoch_240.pth"
    assert line in out.stdout.splitlines()  # so that later runs can verify the installed file itself
    results = train_student.main(["--path_t", str(installed), "--dataset", "synthetic", "--synthetic_classes", "100",
                                  "--synthetic_train", "2", "--synthetic_test", "1", "--model_s", "resnet8",
                                  "--distill", "kd", "--batch_size", "8", "--max_steps", "1", "--epochs", "1",
                                  "--num_workers", "0", "--device", "cpu", "--save_folder", str(tmp_path / "runs")])
    assert results["status"] == "stopped" and results["model_t"] == "resnet8"

    # a local path (no copy, no download) and file:// read in place; per-file lines verify
    manifest = manifest_file(tmp_path, line, f"{file_sha['resnet14']}  resnet14_vanilla/ckpt_epoch_240.pth")
    out = fetch(dest, manifest, NAMES="resnet8 resnet14", ARCHIVE_URL=str(archive), FORCE="1")
    assert out.returncode == 0, out.stderr
    assert f"reading {archive}" in out.stdout and out.stdout.count("(SHA-256 verified)") == 2
    assert sha256(own.read_bytes()) == file_sha["resnet14"]  # FORCE: replaced by the published file
    out = fetch(dest, manifest, NAMES="resnet8 resnet14", ARCHIVE_URL=f"file://{archive}")
    assert out.returncode == 0 and out.stdout.count("already there and verified") == 2


def test_fetch_archive_without_any_checksum_refuses_unless_allowed(release, tmp_path):
    root, archive, archive_sha, file_sha, url = release
    dest = tmp_path / "models"
    out = fetch(dest, NAMES="resnet8", ARCHIVE_URL=f"{url}/cifar_teachers.tar")  # the shipped manifest
    assert out.returncode == 1 and "no checksum for resnet8_vanilla/ckpt_epoch_240.pth" in out.stderr
    assert "ALLOW_UNVERIFIED=1" in out.stderr and "fetching" not in out.stdout and not dest.exists()
    out = fetch(dest, NAMES="resnet8 resnet14", ARCHIVE_URL=f"{url}/cifar_teachers.tar", ALLOW_UNVERIFIED="1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert out.stdout.count("UNVERIFIED") == 2 and f"{archive_sha}  cifar_teachers.tar" in lines
    for name in ARCHIVE_NAMES:
        assert f"{file_sha[name]}  {name}_vanilla/ckpt_epoch_240.pth" in lines
        assert sha256((dest / f"{name}_vanilla" / "ckpt_epoch_240.pth").read_bytes()) == file_sha[name]
    assert len(files_under(dest)) == 2  # the downloaded archive was a temporary file


def test_fetch_archive_checksums_decide(release, tmp_path):
    root, archive, archive_sha, file_sha, url = release
    # one teacher has a per-file line, the archive none: that one is installed, the other refused up front
    manifest = manifest_file(tmp_path, f"{file_sha['resnet14']}  resnet14_vanilla/ckpt_epoch_240.pth")
    out = fetch(tmp_path / "a", manifest, NAMES="resnet8 resnet14", ARCHIVE_URL=str(archive))
    assert out.returncode == 1 and "no checksum for resnet8_vanilla/ckpt_epoch_240.pth" in out.stderr
    assert files_under(tmp_path / "a") == ["resnet14_vanilla/ckpt_epoch_240.pth"] and "SHA-256 verified" in out.stdout
    # a wrong archive checksum: nothing installed
    manifest = manifest_file(tmp_path, f"{'0' * 64}  cifar_teachers.tar")
    out = fetch(tmp_path / "b", manifest, NAMES="resnet8", ARCHIVE_URL=str(archive))
    assert out.returncode == 1 and "checksum mismatch for cifar_teachers.tar" in out.stderr and archive_sha in out.stderr
    assert files_under(tmp_path / "b") == []
    # the archive verifies but a file's own line does not: that file is refused
    manifest = manifest_file(tmp_path, f"{archive_sha}  cifar_teachers.tar", f"{'1' * 64}  resnet8_vanilla/ckpt_epoch_240.pth")
    out = fetch(tmp_path / "c", manifest, NAMES="resnet8 resnet14", ARCHIVE_URL=str(archive))
    assert out.returncode == 1 and "checksum mismatch for resnet8_vanilla/ckpt_epoch_240.pth" in out.stderr
    assert files_under(tmp_path / "c") == ["resnet14_vanilla/ckpt_epoch_240.pth"]


def test_fetch_archive_unpacks_only_expected_regular_members(tmp_path):
    escape = tmp_path / "escaped"
    evil = tmp_path / "evil" / "cifar_teachers.tar"
    evil.parent.mkdir()
    good = checkpoint_bytes("resnet20", 3)
    with tarfile.open(evil, "w") as tar:
        add_member(tar, "../escaped/evil.pth", b"x")
        add_member(tar, f"{escape}/absolute.pth", b"x")
        add_member(tar, "cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add_member(tar, "cifar_teachers/resnet14_vanilla/ckpt_epoch_240.pth", kind=tarfile.LNKTYPE,
                   link="../escaped/evil.pth")
        add_member(tar, "cifar_teachers/resnet20_vanilla/../../escaped/ckpt_epoch_240.pth", b"x")
        add_member(tar, "./cifar_teachers/resnet20_vanilla/ckpt_epoch_240.pth", good)
    dest = tmp_path / "models"
    out = fetch(dest, NAMES="resnet8 resnet14 resnet20 resnet32", ARCHIVE_URL=str(evil), ALLOW_UNVERIFIED="1")
    assert out.returncode == 1 and "4 teacher(s)" not in out.stderr and "3 teacher(s) not installed" in out.stderr
    assert out.stderr.count("a link or other non-regular member") == 2
    assert "has no cifar_teachers/resnet32_vanilla/ckpt_epoch_240.pth" in out.stderr
    assert files_under(dest) == ["resnet20_vanilla/ckpt_epoch_240.pth"]  # no link, nothing else
    assert (dest / "resnet20_vanilla" / "ckpt_epoch_240.pth").read_bytes() == good
    assert not escape.exists() and files_under(tmp_path / "evil") == ["cifar_teachers.tar"]

    page = tmp_path / "page" / "cifar_teachers.tar"  # e.g. an error page saved under the archive's name
    page.parent.mkdir()
    page.write_text("<html>rate limited</html>")
    out = fetch(tmp_path / "m2", NAMES="resnet8 resnet14", ARCHIVE_URL=str(page), ALLOW_UNVERIFIED="1")
    assert out.returncode == 1 and "not a readable tar archive" in out.stderr and "2 teacher(s)" in out.stderr
    assert files_under(tmp_path / "m2") == []


def test_fetch_archive_download_failure_and_source_choice(release, tmp_path, server):
    root, archive, archive_sha, file_sha, url = release
    manifest = manifest_file(tmp_path, f"{archive_sha}  cifar_teachers.tar")
    out = fetch(tmp_path / "m", manifest, NAMES="resnet8", ARCHIVE_URL=f"{url}/missing/cifar_teachers.tar")
    assert out.returncode == 1 and f"could not download {url}/missing/cifar_teachers.tar" in out.stderr
    assert "ARCHIVE_URL=/path/to/cifar_teachers.tar" in out.stderr and "SOURCE=repdistiller" in out.stderr
    assert files_under(tmp_path / "m") == []  # the partial download removed
    out = fetch(tmp_path / "m", manifest, NAMES="resnet8", ARCHIVE_URL=str(tmp_path / "nowhere.tar"))
    assert out.returncode == 1 and f"the archive {tmp_path / 'nowhere.tar'} does not exist" in out.stderr
    out = fetch(tmp_path / "m", manifest, SOURCE="nope")
    assert out.returncode == 2 and "SOURCE must be mdistiller or repdistiller" in out.stderr
    # SOURCE=repdistiller reads BASE_URL even when ARCHIVE_URL is set
    server_root, digest, server_manifest = server
    out = fetch(tmp_path / "r", server_manifest, SOURCE="repdistiller", NAMES="resnet32x4",
                BASE_URL=f"file://{server_root}", ARCHIVE_URL=str(archive))
    assert out.returncode == 0 and "SHA-256 verified" in out.stdout and "cifar_teachers.tar" not in out.stdout


FULL = ("is the disk full or the folder not writable? Free space or choose another destination (DEST=<folder>); "
        "no partial file was left\n")


def fetch_after(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The fetch script run by ``bash -c '<command> && exec bash scripts/fetch_pretrained_teachers.sh'``."""
    return subprocess.run(["bash", "-c", f"{command} && exec bash scripts/fetch_pretrained_teachers.sh"], cwd=ROOT,
                          capture_output=True, text=True, env={**CLEAN_ENV, **env}, timeout=60)


def test_fetch_into_a_full_destination_stops_in_one_line_and_leaves_no_partial_file(release, tmp_path):
    root, archive, archive_sha, file_sha, _ = release
    dest = tmp_path / "models"
    installed = dest / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    installed.parent.mkdir(parents=True)
    installed.write_bytes(b"a good teacher")
    env = {"DEST": str(dest), "NAMES": "resnet8 resnet14", "ARCHIVE_URL": str(archive), "FORCE": "1",
           "CHECKSUMS": str(manifest_file(tmp_path, f"{archive_sha}  cifar_teachers.tar"))}
    # a file size limit of 64 KiB: the unpacking's write fails (EFBIG: Python ignores SIGXFSZ) as on a full disk
    out = fetch_after("ulimit -f 64", env)
    assert (out.returncode, out.stderr) == (1, f"error: could not write {installed} (File too large): {FULL}")
    assert installed.read_bytes() == b"a good teacher" and files_under(dest) == ["resnet8_vanilla/ckpt_epoch_240.pth"]
    # the same code on a full disk (/dev/full: every write fails with ENOSPC)
    unpack = re.search(r"^UNPACK='\n(.*?)^'$", (ROOT / "scripts" / "fetch_pretrained_teachers.sh").read_text(),
                       re.MULTILINE | re.DOTALL).group(1)
    member = "cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth"
    out = subprocess.run([sys.executable, "-c", unpack, str(archive), member, "/dev/full"], capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode, out.stderr) == (6, "No space left on device\n")
    # a download that curl cannot write (its exit status 23): the same line, the partial download removed
    stub = tmp_path / "bin" / "curl"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\nhead -c 1000 /dev/zero > "$2"\n'
                    'echo "curl: (23) Failure writing output to destination" >&2\nexit 23\n')
    stub.chmod(0o755)
    out = fetch_after("true", {**env, "PATH": f"{stub.parent}:{CLEAN_ENV['PATH']}",
                               "ARCHIVE_URL": "https://example.invalid/cifar_teachers.tar"})
    assert (out.returncode, out.stderr) == (1, f"error: could not write the download of cifar_teachers.tar in {dest} "
                                               f"(curl: (23) Failure writing output to destination): {FULL}")
    assert installed.read_bytes() == b"a good teacher" and files_under(dest) == ["resnet8_vanilla/ckpt_epoch_240.pth"]


def can_mount_in_a_namespace() -> bool:
    """Whether ``unshare -rm`` may mount a tmpfs here (user namespaces; CI runners often forbid them)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True, timeout=10).returncode == 0


@pytest.mark.skipif(not can_mount_in_a_namespace(), reason="no tmpfs can be mounted (unshare -rm) to fill up")
@pytest.mark.parametrize("options, written, reason", [("size=128k", "models/resnet8_vanilla/ckpt_epoch_240.pth",
                                                       "No space left on device"),
                                                      ("ro", "models", "Read-only file system")])
def test_fetch_onto_a_full_or_read_only_filesystem(options, written, reason, release, tmp_path):
    """A real full disk (a 128 KiB tmpfs) and a read-only one, each mounted in a user namespace."""
    root, archive, archive_sha, _, _ = release
    mount = tmp_path / "mnt"
    mount.mkdir()
    env = {"DEST": str(mount / "models"), "NAMES": "resnet8", "ARCHIVE_URL": str(archive),
           "CHECKSUMS": str(manifest_file(tmp_path, f"{archive_sha}  cifar_teachers.tar"))}
    inside = (f"mount -t tmpfs -o {options} tmpfs {mount} && {{ bash scripts/fetch_pretrained_teachers.sh; "
              f"status=$?; find {mount} -type f -printf 'left: %p\\n'; exit $status; }}")
    out = subprocess.run(["unshare", "-rm", "bash", "-c", inside], cwd=ROOT, capture_output=True, text=True,
                         env={**CLEAN_ENV, **env}, timeout=60)
    assert (out.returncode, out.stderr) == (1, f"error: could not write {mount / written} ({reason}): {FULL}")
    assert "left:" not in out.stdout   # no partial file, no temporary
