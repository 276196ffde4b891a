"""`sh scripts/x.sh` (dash on Debian) runs each user script as bash does, and scripts/gpu_check.sh
without a GPU says so and writes its summary."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts.test_fetch_teachers import manifest_file, release, sha256  # noqa: F401  (release: a fixture)
from tests.scripts.test_run_scripts import ROOT, commands, script
import train_teacher


# ---------------------------------------------------------------- `sh scripts/x.sh` (dash on Debian)
DASH = shutil.which("dash")
USER_SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.sh") if p.name != "common.sh")
GUARD = 'if [ -z "${BASH_VERSION:-}" ]; then'


def sh_cases(release_root: Path) -> dict[str, tuple[tuple[str, ...], dict[str, str]]]:
    """For each user script: arguments and environment of a run that prints its work (with arguments
    that need quoting, to check they pass through unchanged)."""
    return {
        "run_cifar_distill.sh": (("--data_folder", "/da ta", "--epochs", "3"),
                                 dict(PAIRS="resnet32x4:resnet8x4 vgg13:vgg8", METHODS="kd crd", TRIALS="1",
                                      DRY_RUN="1", LAUNCH="torchrun --standalone --nproc_per_node 2")),
        "run_cifar_vanilla.sh": (("--amp", "bf16", "--data_folder", "it's here"), dict(TEACHERS="vgg13", STUDENTS="vgg8",
                                                                          DRY_RUN="1")),
        "run_imagenet_distill.sh": (("--amp", "bf16",), dict(DRY_RUN="1", TEACHER="/t/teacher.pth", NPROC="4",
                                                             METHODS="kd crd")),
        "run_transfer.sh": (("--device", "it's cpu"), dict(DRY_RUN="1", TRIALS="1", METHODS="teacher student crd+kd")),
        "run_crossmodal.sh": (("--device", "it's cpu"), dict(DRY_RUN="1", METHODS="crd alone")),
        "fetch_pretrained_teachers.sh": ((), dict(NAMES="resnet8 resnet14 bad-name",
                                                  ARCHIVE_URL=str(release_root / "cifar_teachers.tar"))),
    }


def test_every_user_script_starts_with_the_bash_guard():
    assert USER_SCRIPTS == ["fetch_pretrained_teachers.sh", "gpu_check.sh", "run_cifar_distill.sh",
                            "run_cifar_vanilla.sh", "run_crossmodal.sh", "run_imagenet_distill.sh", "run_transfer.sh"]
    for name in USER_SCRIPTS:
        lines = (ROOT / "scripts" / name).read_text().splitlines()
        code = [i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")]
        assert lines[code[0]].startswith(GUARD), name  # the first command, before any bash-only syntax
        end = next(i for i in code if lines[i] == "fi")
        if DASH:  # the lines dash reads before it hands over to bash are POSIX
            head = "\n".join(lines[:end + 1]) + "\n"
            assert subprocess.run([DASH, "-n"], input=head, text=True, capture_output=True).returncode == 0, name


@pytest.mark.skipif(DASH is None, reason="dash is not installed: `sh scripts/x.sh` as on Debian cannot be run")
@pytest.mark.parametrize("name", [n for n in USER_SCRIPTS if n != "gpu_check.sh"])  # its output holds timings
def test_sh_runs_each_script_as_bash_does(name, release, tmp_path):
    args, env = sh_cases(release[0])[name]
    env = {**env, "DEST": str(tmp_path / "bash")} if name.startswith("fetch") else env
    by_bash = script(name, *args, check=False, **env)
    if name.startswith("fetch"):
        env["DEST"] = str(tmp_path / "dash")
    by_dash = script(name, *args, check=False, shell=DASH, **env)
    if name.startswith("fetch"):  # refuses the unverified teachers, and a bad name
        assert by_bash.returncode == 1 and "'bad-name' is not a model name" in by_bash.stderr
        by_dash = subprocess.CompletedProcess(by_dash.args, by_dash.returncode, by_dash.stdout,
                                              by_dash.stderr.replace(str(tmp_path / "dash"), str(tmp_path / "bash")))
    else:
        assert by_bash.returncode == 0 and by_bash.stdout.count("\n") >= 2
    assert (by_dash.returncode, by_dash.stdout, by_dash.stderr) == (by_bash.returncode, by_bash.stdout, by_bash.stderr)
    if name == "run_cifar_distill.sh":
        assert all(line.endswith(" --data_folder '/da ta' --epochs 3") and line.startswith("torchrun ")
                   for line in by_dash.stdout.splitlines())
    if name == "run_cifar_vanilla.sh":
        assert [train_teacher.parse_option(argv).model for argv in commands(by_dash, "train_teacher.py")] == \
            ["vgg13", "vgg8"] and "--data_folder 'it'\\''s here'" in by_dash.stdout


@pytest.mark.skipif(DASH is None, reason="dash is not installed")
def test_sh_installs_a_teacher_and_says_when_bash_is_missing(release, tmp_path):
    root, archive, archive_sha, file_sha, _ = release
    manifest = manifest_file(tmp_path, f"{archive_sha}  cifar_teachers.tar")
    out = script("fetch_pretrained_teachers.sh", shell=DASH, check=False, NAMES="resnet8", ARCHIVE_URL=str(archive),
                 DEST=str(tmp_path / "models"), CHECKSUMS=str(manifest))
    assert out.returncode == 0, out.stderr
    assert sha256((tmp_path / "models" / "resnet8_vanilla" / "ckpt_epoch_240.pth").read_bytes()) == file_sha["resnet8"]
    no_bash = tmp_path / "bin"
    no_bash.mkdir()
    out = subprocess.run([DASH, "scripts/run_cifar_distill.sh"], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": str(no_bash), "DRY_RUN": "1"}, timeout=60)
    assert out.returncode == 2 and out.stderr == "error: scripts/run_cifar_distill.sh needs bash, which is not installed\n"


def test_gpu_check_without_a_gpu_says_so_and_writes_its_summary(tmp_path):
    """The prepared GPU check, run here (no GPU): the cuda tests are collected and skipped, the GPU
    runs are skipped and said so, and the summary is written; nothing fails."""
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible: the check would run for real")
    out = subprocess.run([DASH or "bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout + out.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "NO GPU" in summary and "PASS  cuda tests" in summary and "skipped" in summary
    assert "gpu_check: 0 part(s) failed" in summary
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what the device tool brings back
