"""The reproduction scripts in scripts/: every command they print parses with the training scripts'
own option parsers and carries the paper's method, weights and recipe; `sh scripts/x.sh` runs each
user script as bash does; gpu_check.sh without a GPU. The teacher fetch: test_fetch_teachers.py
(with this module's helpers and its release of teachers)."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import torch

from models import build_model
from tests.tolerance import FP32, assert_close
import train_student
import train_teacher

ROOT = Path(__file__).resolve().parents[2]

# The CRD paper's tables (README, "Reproducing the paper"), written out independently of the scripts.
SAME = ["wrn_40_2:wrn_16_2", "wrn_40_2:wrn_40_1", "resnet56:resnet20", "resnet110:resnet20", "resnet110:resnet32",
        "resnet32x4:resnet8x4", "vgg13:vgg8"]
DIFFERENT = ["vgg13:MobileNetV2", "ResNet50:MobileNetV2", "ResNet50:vgg8", "resnet32x4:ShuffleV1",
             "resnet32x4:ShuffleV2", "wrn_40_2:ShuffleV1"]
PAIRS = SAME + DIFFERENT
# method -> (--distill, -r, -a, -b)
WEIGHTS = {
    "kd": ("kd", 0.1, 0.9, 0.0), "hint": ("hint", 1.0, 0.0, 100.0), "attention": ("attention", 1.0, 0.0, 1000.0),
    "similarity": ("similarity", 1.0, 0.0, 3000.0), "correlation": ("correlation", 1.0, 0.0, 0.02),
    "vid": ("vid", 1.0, 0.0, 1.0), "rkd": ("rkd", 1.0, 0.0, 1.0), "pkt": ("pkt", 1.0, 0.0, 30000.0),
    "abound": ("abound", 1.0, 0.0, 1.0), "factor": ("factor", 1.0, 0.0, 200.0), "fsp": ("fsp", 1.0, 0.0, 50.0),
    "nst": ("nst", 1.0, 0.0, 50.0), "crd": ("crd", 1.0, 0.0, 0.8), "crd+kd": ("crd", 1.0, 1.0, 0.8),
    "dcd": ("dcd", 1.0, 0.0, 1.0), "dcd+kd": ("dcd", 1.0, 1.0, 1.0), "wcord+kd": ("wcord", 1.0, 1.0, 0.8),
    "dkd": ("dkd", 1.0, 0.0, 1.0), "rrd": ("rrd", 1.0, 0.0, 1.0), "rrd+kd": ("rrd", 1.0, 1.0, 1.0),
    "srrl": ("srrl", 1.0, 1.0, 1.0), "semckd": ("semckd", 1.0, 1.0, 400.0), "simkd": ("simkd", 0.0, 0.0, 1.0),
    "ickd": ("ickd", 1.0, 0.0, 2.5), "ickd+kd": ("ickd", 1.0, 1.0, 2.5), "dist": ("dist", 1.0, 0.0, 2.0),
}
LABEL = {v: k for k, v in WEIGHTS.items()}
NA = {("fsp", pair) for pair in ["wrn_40_2:wrn_40_1"] + DIFFERENT}  # the tables' n/a cells
TEACHERS = ["wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50"]
STUDENTS = ["wrn_16_2", "wrn_40_1", "resnet20", "resnet32", "resnet8x4", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"]
CLEAN_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}


def script(name: str, *args: str, check: bool = True, shell: str = "bash", **env: str) -> subprocess.CompletedProcess:
    """Run ``<shell> scripts/<name> args...`` from the repository root with only ``env`` (and PATH, HOME)."""
    out = subprocess.run([shell, f"scripts/{name}", *args], cwd=ROOT, capture_output=True, text=True,
                         env={**CLEAN_ENV, **env}, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def commands(out: subprocess.CompletedProcess, program: str) -> list[list[str]]:
    """The printed command lines that run ``program``, as argv lists from the program on."""
    found = []
    for line in out.stdout.splitlines():
        argv = shlex.split(line, comments=True)
        if program in argv:
            found.append(argv[argv.index(program) + 1:])
    return found


def distill_cells(out: subprocess.CompletedProcess) -> list[tuple[str, str, str]]:
    """(method label, teacher:student, trial) of each printed train_student.py command."""
    cells = []
    for argv in commands(out, "train_student.py"):
        opt = train_student.parse_option(argv)
        teacher = Path(opt.path_t).parent.name.removesuffix("_vanilla")
        cells.append((LABEL[(opt.distill, opt.gamma, opt.alpha, opt.beta)], f"{teacher}:{opt.model_s}", opt.trial))
    return cells


# ---------------------------------------------------------------- run_cifar_distill.sh
def test_distill_prints_every_cell_of_both_tables():
    out = script("run_cifar_distill.sh", DRY_RUN="1")
    lines = out.stdout.splitlines()
    expected = {(m, p, str(t)) for m in WEIGHTS for p in PAIRS for t in (1, 2, 3) if (m, p) not in NA}
    assert len(expected) == len(WEIGHTS) * 13 * 3 - 7 * 3  # the fsp cells the paper leaves out
    assert len(lines) == len(expected) and all(line.startswith("python train_student.py --path_t ./save/models/") for line in lines)
    cells = distill_cells(out)
    assert len(cells) == len(set(cells)) == len(expected) and set(cells) == expected
    for argv in commands(out, "train_student.py"):
        assert argv[1].endswith("_vanilla/ckpt_epoch_240.pth")  # RepDistiller's layout, where fetch/vanilla put them
    assert "skip: fsp is n/a for wrn_40_2 -> wrn_40_1" in out.stderr


def test_distill_fsp_runs_exactly_on_the_pairs_of_equal_channel_counts():
    out = script("run_cifar_distill.sh", METHODS="fsp kdsvd", TRIALS="1", DRY_RUN="1")
    printed = {(argv[argv.index("--distill") + 1], f"{Path(argv[1]).parent.name.removesuffix('_vanilla')}:"
                f"{argv[argv.index('--model_s') + 1]}") for argv in commands(out, "train_student.py")}
    channel_counts = {}
    for name in set(p.split(":")[i] for p in PAIRS for i in (0, 1)):
        with torch.no_grad():
            feats, _ = build_model(name, num_classes=100).eval()(torch.randn(2, 3, 32, 32), is_feat=True)
        channel_counts[name] = [f.shape[1] for f in feats]
    for pair in PAIRS:
        t, s = (channel_counts[n] for n in pair.split(":"))
        assert (("fsp", pair) in printed) == (t[:-1] == s[:-1]) == (("fsp", pair) not in NA)
        assert (("kdsvd", pair) in printed) == (t[1:-1] == s[1:-1])


def test_distill_lists_take_commas_as_the_issue_writes_them():
    out = script("run_cifar_distill.sh", METHODS="reviewkd,rrd", PAIRS="resnet32x4:resnet8x4,vgg13:vgg8", TRIALS="1",
                 DRY_RUN="1")
    printed = {(argv[argv.index("--distill") + 1], argv[argv.index("--model_s") + 1])
               for argv in commands(out, "train_student.py")}
    assert printed == {(m, s) for m in ("reviewkd", "rrd") for s in ("resnet8x4", "vgg8")}


def test_distill_subsets_and_old_variables():
    out = script("run_cifar_distill.sh", METHODS="crd kd", PAIRS="resnet32x4:resnet8x4 vgg13:vgg8", TRIALS="2",
                 DRY_RUN="1")
    assert sorted(distill_cells(out)) == sorted((m, p, t) for m in ("crd", "kd") for p in
                                                ("resnet32x4:resnet8x4", "vgg13:vgg8") for t in ("1", "2"))
    out = script("run_cifar_distill.sh", TEACHER="resnet32x4", TRIALS="1", DRY_RUN="1")
    assert {p for _, p, _ in distill_cells(out)} == {"resnet32x4:resnet8x4", "resnet32x4:ShuffleV1", "resnet32x4:ShuffleV2"}
    assert len(out.stdout.splitlines()) == len(WEIGHTS) * 3 - 2
    out = script("run_cifar_distill.sh", STUDENT="MobileNetV2", METHODS="crd+kd", TRIAL="7", DRY_RUN="1")
    assert sorted(distill_cells(out)) == [("crd+kd", "ResNet50:MobileNetV2", "7"), ("crd+kd", "vgg13:MobileNetV2", "7")]
    # both set: that pair even outside the tables; PATH_T and TEACHER_DIR choose the file
    out = script("run_cifar_distill.sh", TEACHER="resnet32x4", STUDENT="resnet8", METHODS="kd", TRIALS="1",
                 PATH_T="/t/my teacher.pth", DRY_RUN="1")
    (argv,) = commands(out, "train_student.py")
    assert train_student.parse_option(argv).path_t == "/t/my teacher.pth" and argv[argv.index("--model_s") + 1] == "resnet8"
    out = script("run_cifar_distill.sh", PAIRS="vgg13:vgg8", METHODS="kd", TRIALS="1", TEACHER_DIR="/teachers",
                 DRY_RUN="1")
    assert commands(out, "train_student.py")[0][1] == "/teachers/vgg13_vanilla/ckpt_epoch_240.pth"


def test_distill_passes_arguments_through_and_launch_prefixes():
    out = script("run_cifar_distill.sh", "--amp", "bf16", "--data_folder", "/da ta", "--epochs", "3",
                 PAIRS="resnet32x4:resnet8x4 wrn_40_2:ShuffleV1", TRIALS="1", DRY_RUN="1",
                 LAUNCH="torchrun --standalone --nproc_per_node 2")
    lines = out.stdout.splitlines()
    assert len(lines) == len(WEIGHTS) + len(WEIGHTS) - 1
    for line in lines:
        assert line.startswith("torchrun --standalone --nproc_per_node 2 train_student.py ")
        assert line.endswith(" --amp bf16 --data_folder '/da ta' --epochs 3")
    for argv in commands(out, "train_student.py"):
        opt = train_student.parse_option(argv)
        assert (opt.amp, opt.data_folder, opt.epochs) == ("bf16", "/da ta", 3)
        assert opt.learning_rate == (0.01 if opt.model_s == "ShuffleV1" else 0.05)


def test_distill_bad_selection_and_missing_teachers_fail_clearly(tmp_path):
    out = script("run_cifar_distill.sh", METHODS="crd nope", DRY_RUN="1", check=False)
    assert out.returncode == 2 and "unknown method 'nope'" in out.stderr and not out.stdout
    out = script("run_cifar_distill.sh", PAIRS="resnet32x4", DRY_RUN="1", check=False)
    assert out.returncode == 2 and "not teacher:student" in out.stderr
    out = script("run_cifar_distill.sh", PAIRS="vgg13:vgg8", TEACHER_DIR=str(tmp_path), PYTHON="false", check=False)
    assert out.returncode == 2 and "teacher checkpoint(s) missing" in out.stderr
    assert "fetch_pretrained_teachers.sh" in out.stderr and "run_cifar_vanilla.sh" in out.stderr


def test_distill_runs_the_commands_and_stops_or_keeps_going(tmp_path):
    ckpt = tmp_path / "vgg13_vanilla" / "ckpt_epoch_240.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    env = {"PAIRS": "vgg13:vgg8", "METHODS": "kd crd", "TRIALS": "1", "TEACHER_DIR": str(tmp_path)}
    out = script("run_cifar_distill.sh", "--epochs", "1", LAUNCH="echo ran", **env)
    ran = [line for line in out.stdout.splitlines() if line.startswith("ran train_student.py")]
    assert len(ran) == 2 and all(line.endswith("--epochs 1") for line in ran)
    out = script("run_cifar_distill.sh", LAUNCH="false", check=False, **env)
    assert out.returncode == 1 and out.stderr.count("failed (exit 1)") == 1 and "KEEP_GOING=1" in out.stderr
    out = script("run_cifar_distill.sh", LAUNCH="false", KEEP_GOING="1", check=False, **env)
    assert out.returncode == 1 and out.stderr.count("failed (exit 1)") == 2


# ---------------------------------------------------------------- run_transfer.sh
TRANSFER_ROWS = {"kd", "attention", "hint", "crd", "crd+kd", "dcd", "dcd+kd"}


def test_transfer_distils_trains_the_student_alone_and_probes_each(tmp_path):
    import transfer_student
    out = script("run_transfer.sh", "--epochs", "2", TRIALS="2", TARGETS="synthetic cifar100", DRY_RUN="1",
                 PROBE_FLAGS="--no_augment", TRAIN_FLAGS="--data_folder ./cifar")
    probes = [transfer_student.parse_option(argv) for argv in commands(out, "transfer_student.py")]
    assert all(p.no_augment and p.epochs == 2 and p.save_folder == "save/transfer" for p in probes)
    probed = {(Path(p.path_s).parent.name, p.dataset, str(p.trial)) for p in probes}
    assert len(probes) == len(probed) == 2 * 2 * (1 + 1 + 7)  # trials x targets x (teacher, student, methods)
    teacher = "./save/models/wrn_40_2_vanilla/ckpt_epoch_240.pth"
    assert {p.trial for p in probes if p.path_s == teacher} == {1, 2}
    labels = set()
    for argv in commands(out, "train_student.py"):
        opt = train_student.parse_option(argv)
        assert (opt.path_t, opt.model_s, opt.dataset, opt.data_folder, opt.epochs, opt.resume) == \
            (teacher, "wrn_16_2", "cifar100", "./cifar", 2, "auto")
        labels.add((LABEL[(opt.distill, opt.gamma, opt.alpha, opt.beta)], opt.trial))
        # the probes read the checkpoint where train_student.py writes it
        folder = train_student.run_name(opt, "wrn_40_2")
        assert {(folder, t, opt.trial) for t in ("synthetic", "cifar100")} <= probed
        assert all(p.path_s == f"./save/student_model/{folder}/wrn_16_2_last.pth"
                   for p in probes if Path(p.path_s).parent.name == folder)
    assert labels == {(m, t) for m in TRANSFER_ROWS for t in ("1", "2")}
    alone = [train_teacher.parse_option(argv) for argv in commands(out, "train_teacher.py")]
    assert [(o.model, o.dataset, o.trial) for o in alone] == [("wrn_16_2", "cifar100", 1), ("wrn_16_2", "cifar100", 2)]
    assert {(Path(o.save_path).name, "synthetic", str(o.trial)) for o in alone} <= probed
    # the defaults: both target sets of the table
    out = script("run_transfer.sh", TRIALS="1", METHODS="kd", DRY_RUN="1")
    targets = [argv[argv.index("--dataset") + 1] for argv in commands(out, "transfer_student.py")]
    assert targets == ["stl10", "tinyimagenet"]


def test_transfer_reuses_finished_runs_and_refuses_bad_selections(tmp_path):
    finished = tmp_path / "student_model" / "S:wrn_16_2_T:wrn_40_2_cifar100_crd_r:1_a:0.0_b:0.8_1"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text('{"status": "finished"}')
    (finished / "wrn_16_2_last.pth").write_bytes(b"x")
    out = script("run_transfer.sh", TRIALS="1", METHODS="crd crd+kd", TARGETS="synthetic", DRY_RUN="1",
                 STUDENT_DIR=str(tmp_path / "student_model"))
    trained = [argv[argv.index("-a") + 1] for argv in commands(out, "train_student.py")]
    assert trained == ["1"] and f"reuse: {finished}" in out.stderr  # crd reused, crd+kd trained
    assert len(commands(out, "transfer_student.py")) == 2
    out = script("run_transfer.sh", METHODS="crd nope", DRY_RUN="1", check=False)
    assert out.returncode == 2 and "unknown method 'nope'" in out.stderr and not out.stdout
    out = script("run_transfer.sh", TARGETS="mnist", DRY_RUN="1", check=False)
    assert out.returncode == 2 and "unknown target set 'mnist'" in out.stderr
    out = script("run_transfer.sh", TEACHER_DIR=str(tmp_path), PYTHON="false", check=False)
    assert out.returncode == 2 and "teacher checkpoint missing" in out.stderr


# ---------------------------------------------------------------- run_cifar_vanilla.sh
def test_vanilla_trains_every_teacher_and_student_with_the_recipe():
    out = script("run_cifar_vanilla.sh", "--amp", "bf16", DRY_RUN="1")
    runs = [train_teacher.parse_option(argv) for argv in commands(out, "train_teacher.py")]
    assert [(o.model, o.trial) for o in runs] == [(m, 0) for m in TEACHERS + STUDENTS]
    for opt in runs:
        assert (opt.epochs, opt.batch_size, opt.lr_decay_epochs, opt.weight_decay, opt.save_freq, opt.amp) == \
            (240, 64, [150, 180, 210], 5e-4, 40, "bf16")
        assert opt.learning_rate == (0.01 if opt.model in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05)
    links = [line for line in out.stdout.splitlines() if line.startswith("# link ")]
    assert [line.split()[2] for line in links] == [f"./save/models/{m}_vanilla/ckpt_epoch_240.pth" for m in TEACHERS]

    out = script("run_cifar_vanilla.sh", TEACHER_TRIALS="1", STUDENT_TRIALS="3", STUDENTS="resnet8x4 vgg8", DRY_RUN="1")
    runs = [train_teacher.parse_option(argv) for argv in commands(out, "train_teacher.py")]
    assert [(o.model, o.trial) for o in runs] == [(m, 0) for m in TEACHERS] + \
        [(m, t) for m in ("resnet8x4", "vgg8") for t in (0, 1, 2)]
    out = script("run_cifar_vanilla.sh", TRIALS="2", TEACHERS="", DRY_RUN="1")
    assert len(commands(out, "train_teacher.py")) == 2 * len(STUDENTS) and "# link" not in out.stdout


def test_vanilla_links_trial_0_where_the_distill_script_looks(tmp_path):
    """The training itself is replaced by `true`; the link step asks train_teacher.py for its run folder."""
    run_ckpt = tmp_path / "vgg13_cifar100_lr_0.05_decay_0.0005_trial_0" / "ckpt_epoch_240.pth"
    run_ckpt.parent.mkdir()
    run_ckpt.write_bytes(b"mine")
    published = tmp_path / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    published.parent.mkdir()
    published.write_bytes(b"published")
    (tmp_path / "resnet56_cifar100_lr_0.05_decay_0.0005_trial_0").mkdir()
    (tmp_path / "resnet56_cifar100_lr_0.05_decay_0.0005_trial_0" / "ckpt_epoch_240.pth").write_bytes(b"mine too")
    out = script("run_cifar_vanilla.sh", "--save_folder", str(tmp_path), TEACHERS="vgg13 resnet56 wrn_40_2",
                 STUDENTS="", TEACHER_DIR=str(tmp_path), LAUNCH="true", PYTHON=sys.executable)
    link = tmp_path / "vgg13_vanilla" / "ckpt_epoch_240.pth"
    assert link.is_symlink() and os.readlink(link) == f"../{run_ckpt.parent.name}/ckpt_epoch_240.pth"
    assert link.read_bytes() == b"mine"
    assert published.read_bytes() == b"published" and "kept the existing" in out.stderr  # a fetched teacher stays
    assert not (tmp_path / "wrn_40_2_vanilla").exists() and "wrn_40_2 not linked" in out.stderr
    # the distill script finds the linked teacher
    out = script("run_cifar_distill.sh", PAIRS="vgg13:vgg8", METHODS="kd", TRIALS="1", TEACHER_DIR=str(tmp_path),
                 LAUNCH="echo ran")
    assert f"--path_t {link}" in out.stdout


# ---------------------------------------------------------------- run_imagenet_distill.sh
def test_imagenet_commands_follow_the_recipe(tmp_path):
    teacher = tmp_path / "t.pth"
    teacher.write_bytes(b"x")
    out = script("run_imagenet_distill.sh", "--amp", "bf16", DRY_RUN="1", TEACHER=str(teacher), DATA="/data/in")
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("torchrun --standalone --nproc_per_node 8 train_student.py ")
                                   for line in lines)
    seen = []
    for argv in commands(out, "train_student.py"):
        opt = train_student.parse_option(argv)
        assert (opt.dataset, opt.data_folder, opt.model_s, opt.path_t, opt.amp) == \
            ("imagenet", "/data/in", "ResNet18", str(teacher), "bf16")
        assert (opt.epochs, opt.learning_rate, opt.lr_decay_epochs, opt.lr_decay_rate, opt.weight_decay,
                opt.momentum, opt.batch_size) == (100, 0.1, [30, 60, 90], 0.1, 1e-4, 0.9, 32)
        seen.append((opt.distill, opt.gamma, opt.alpha, opt.beta, opt.kd_T))
    assert seen == [("kd", 0.5, 0.5, 0.0, 1.0), ("crd", 1.0, 0.0, 0.8, 4.0), ("crd", 1.0, 1.0, 0.8, 4.0)]

    out = script("run_imagenet_distill.sh", DRY_RUN="1", TEACHER=str(teacher), NPROC="4", BATCH="512",
                 METHODS="dkd", TRIALS="2")
    runs = [train_student.parse_option(argv) for argv in commands(out, "train_student.py")]
    assert out.stdout.startswith("torchrun --standalone --nproc_per_node 4 ")
    assert [(o.batch_size, o.learning_rate, o.distill, o.dkd_beta, o.dkd_T, o.trial) for o in runs] == \
        [(128, 0.2, "dkd", 0.5, 1.0, "1"), (128, 0.2, "dkd", 0.5, 1.0, "2")]
    out = script("run_imagenet_distill.sh", DRY_RUN="1", NPROC="3", check=False)
    assert out.returncode == 2 and "does not split" in out.stderr


def test_imagenet_wraps_torchvision_weights_as_a_teacher(tmp_path, monkeypatch):
    import torchvision
    from models.teacher import load_teacher
    teacher = tmp_path / "ResNet34_torchvision" / "ckpt.pth"
    weights = tmp_path / "resnet34-tv.pth"
    out = script("run_imagenet_distill.sh", DRY_RUN="1", TEACHER=str(teacher), TV_WEIGHTS=str(weights))
    convert = shlex.split(out.stdout.splitlines()[0])
    assert convert[:2] == ["python", "-c"] and convert[3:] == [str(weights), str(teacher)]
    assert len(commands(out, "train_student.py")) == 3 and not teacher.exists()  # DRY_RUN: nothing written

    torch.manual_seed(0)
    reference = torchvision.models.resnet34()
    torch.save(reference.state_dict(), weights)
    monkeypatch.setattr(sys, "argv", ["-c"] + convert[3:])
    exec(convert[2], {"__name__": "__main__"})  # the script's conversion, in this process
    model, arch = load_teacher(str(teacher), 1000, "imagenet")
    assert arch == "ResNet34"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(model.eval()(x), reference.eval()(x), rtol=FP32)


# ---------------------------------------------------------------- a release of teachers (mdistiller's archive)
ARCHIVE_NAMES = ("resnet8", "resnet14")  # tiny CIFAR models stand in for the published teachers


def checkpoint_bytes(name: str, seed: int) -> bytes:
    """A RepDistiller-format teacher checkpoint of a real model, as torch.save writes it."""
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save({"model": build_model(name, num_classes=100).state_dict(), "epoch": 240}, buffer)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
               link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """mdistiller's release, in small: cifar_teachers.tar with cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth
    for ARCHIVE_NAMES (and a README), served by a local HTTP server as well as from its folder.
    Yields (folder, archive path, archive SHA-256, {name: file SHA-256}, base http URL)."""
    root = tmp_path_factory.mktemp("release")
    files = {name: checkpoint_bytes(name, seed) for seed, name in enumerate(ARCHIVE_NAMES)}
    archive = root / "cifar_teachers.tar"
    with tarfile.open(archive, "w") as tar:
        add_member(tar, "cifar_teachers", kind=tarfile.DIRTYPE)
        add_member(tar, "cifar_teachers/README.md", b"teachers\n")
        for name, data in files.items():
            add_member(tar, f"cifar_teachers/{name}_vanilla/ckpt_epoch_240.pth", data)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield (root, archive, sha256(archive.read_bytes()), {n: sha256(d) for n, d in files.items()},
           f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    thread.join()


def manifest_file(folder: Path, *lines: str) -> Path:
    path = folder / "manifest.sha256"
    path.write_text("# test manifest\n" + "".join(f"{line}\n" for line in lines))
    return path


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
