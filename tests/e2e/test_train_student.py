"""train_student.py end to end: RepDistiller teacher checkpoints, every --distill method, the
reference scripts' command lines, records and errors."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.methods import method_names
from models import build_model
from tests.scripts.test_run_scripts import WEIGHTS as TABLE_WEIGHTS
from tests.tolerance import FP32_EXACT, approx, assert_close
import train_student

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["kd", "hint", "attention", "similarity", "correlation", "vid", "crd", "kdsvd", "fsp", "rkd",
           "pkt", "abound", "factor", "nst"]
# Flags that make any command line a seconds-long run on the synthetic set.
TINY = ["--dataset", "synthetic", "--subset", "200", "--val_subset", "20", "--batch_size", "8",
        "--max_steps", "2", "--epochs", "1", "--init_epochs", "1", "--nce_k", "32", "--num_workers", "0"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """RepDistiller-format teacher checkpoints ({'model': state_dict} in <arch>_vanilla/)."""
    root = tmp_path_factory.mktemp("repo") / "save" / "models"
    paths = {}
    for arch in ("resnet32x4", "vgg13", "wrn_40_2"):
        torch.manual_seed(0)
        folder = root / f"{arch}_vanilla"
        folder.mkdir(parents=True)
        paths[arch] = folder / "ckpt_epoch_240.pth"
        torch.save({"model": build_model(arch, num_classes=100).state_dict()}, paths[arch])
    return paths


def test_every_repdistiller_method_is_registered():
    assert set(METHODS) <= set(method_names())


# --max_steps stops a run in whichever stage it runs out: an init stage (abound, factor, fsp) of
# one 2-step epoch lets --max_steps 2 reach the main stage (of 2-step epochs: 2 of them, so it stops)
INIT_STAGE_TINY = ["--subset", "16", "--epochs", "2"]


def run(args: list[str], tmp_path: Path) -> dict:
    extra = INIT_STAGE_TINY if {"abound", "factor", "fsp"} & set(args) else []
    return train_student.main(args + TINY + extra + ["--save_folder", str(tmp_path)])


@pytest.mark.parametrize("distill", METHODS)
def test_every_method_same_architecture(distill, teachers, tmp_path):
    results = run(["--path_t", str(teachers["resnet32x4"]), "--distill", distill, "--model_s", "resnet8x4"], tmp_path)
    assert results["status"] == "stopped" and results["steps"] == 2
    assert results["model_t"] == "resnet32x4" and results["method"] == distill
    # what scripts/summarize.py reads
    assert results["pair"] == "resnet32x4->resnet8x4" and results["role"] == "student"
    assert results["label"] == (f"{distill}+kd" if distill != "kd" and results["weights"]["alpha"] > 0 else distill)
    assert results["seed"] == 1 and results["trial"] == "1" and "--distill" in results["flags"]
    assert results["device"] == "cpu" and "commit" in results and results["images_per_s"] > 0
    assert results["last_acc"] is not None and results["best_acc"] is not None and results["wall_time_s"] > 0
    assert {"test_acc", "test_acc_top5", "train_loss", "lr"} <= set(results["history"][0])
    history = results["history"][0]
    if distill not in ("kd", "abound", "fsp"):  # those act through KD or the init stage only
        assert f"loss_{distill}" in history, history
    if distill in ("abound", "factor", "fsp"):
        assert len(results["init_history"]) == 1


CROSS = [("resnet32x4", "ShuffleV1"), ("vgg13", "MobileNetV2")]


@pytest.mark.parametrize("distill", METHODS)
@pytest.mark.parametrize("teacher, student", CROSS)
def test_every_method_cross_architecture(distill, teacher, student, teachers, tmp_path, capsys):
    # the teachers are untrained: their features are large, and so are CC's and RKD's losses; a
    # small learning rate keeps two steps from blowing the student up (which would stop the run)
    args = ["--path_t", str(teachers[teacher]), "--distill", distill, "--model_s", student, "--learning_rate", "0.001"]
    if distill in ("fsp", "kdsvd"):  # they need equal channel counts: a clear error, not a crash
        with pytest.raises(SystemExit) as exit_info:
            run(args, tmp_path)
        assert exit_info.value.code == 2 and distill.upper() in capsys.readouterr().err
        return
    assert run(args, tmp_path)["steps"] == 2


def reference_commands() -> list[list[str]]:
    """The distillation lines of RepDistiller's scripts/run_cifar_distill.sh."""
    base = "--path_t ./save/models/resnet32x4_vanilla/ckpt_epoch_240.pth --model_s resnet8x4 --trial 1"
    lines = ["--distill kd -r 0.1 -a 0.9 -b 0", "--distill hint -a 0 -b 100", "--distill attention -a 0 -b 1000",
             "--distill similarity -a 0 -b 3000", "--distill correlation -a 0 -b 0.02", "--distill vid -a 0 -b 1",
             "--distill rkd -a 0 -b 1", "--distill pkt -a 0 -b 30000", "--distill abound -a 0 -b 1",
             "--distill factor -a 0 -b 200", "--distill fsp -a 0 -b 50", "--distill nst -a 0 -b 50",
             "--distill crd -a 0 -b 0.8", "--distill crd -a 1 -b 0.8"]
    return [shlex.split(f"{base} {line}") for line in lines]


def test_reference_script_lines_parse_with_reference_meaning():
    for argv in reference_commands():
        opt = train_student.parse_option(argv)
        assert opt.model_s == "resnet8x4" and opt.trial == "1" and opt.epochs == 240
        assert opt.learning_rate == 0.05 and opt.lr_decay_epochs == [150, 180, 210] and opt.nce_k == 16384
        assert opt.gamma == (0.1 if opt.distill == "kd" else 1.0)


def test_reference_line_runs_unchanged_in_repdistiller_layout(teachers, tmp_path, monkeypatch):
    """`python train_student.py --path_t ./save/models/resnet32x4_vanilla/ckpt_epoch_240.pth
    --distill crd --model_s resnet8x4 -a 0 -b 0.8 --trial 1`, from a folder laid out as
    RepDistiller's (plus the tiny-run flags)."""
    monkeypatch.chdir(teachers["resnet32x4"].parents[3])
    argv = reference_commands()[-2]
    results = train_student.main(argv + TINY)
    # RepDistiller's folder name for this line: -r left out is its int default 1, -a/-b floats as given
    folder = Path("save/student_model/S:resnet8x4_T:resnet32x4_synthetic_crd_r:1_a:0.0_b:0.8_1")
    assert {p.name for p in folder.iterdir()} >= {"resnet8x4_last.pth", "resnet8x4_best.pth", "results.json"}
    state = torch.load(folder / "resnet8x4_last.pth")
    assert state["arch"] == "resnet8x4" and state["distill"] == "crd"
    assert {"criterion.embed_s.linear.weight", "criterion.contrast.memory_v1"} <= set(state["distiller"])
    assert state["distiller"]["criterion.contrast.memory_v1"].shape == (200, 128)
    assert results["teacher_acc"] is not None
    # the teacher's weights (SHA-256): scripts/summarize.py never pools students of other teachers
    assert len(results["teachers"]) == 1 and len(results["teachers"][0]) == 64


def test_published_weights_when_left_out(capsys):
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "crd"])
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.0, 0.8)
    assert "-a 0 -b 0.8" in capsys.readouterr().out
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "kd"])
    assert (opt.gamma, opt.alpha, opt.beta) == (0.1, 0.9, 0.0)
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "kd", "-a", "0.5", "-b", "0"])
    assert (opt.gamma, opt.alpha, opt.beta) == (1.0, 0.5, 0.0)  # RepDistiller's -r default


def test_our_teacher_checkpoint_loads_by_arch_key(tmp_path):
    import train_teacher
    train_teacher.main(["--model", "resnet8", "--dataset", "synthetic", "--subset", "100", "--val_subset", "20",
                        "--max_steps", "1", "--epochs", "1", "--batch_size", "10", "--num_workers", "0",
                        "--save_folder", str(tmp_path / "t")])
    path = next((tmp_path / "t").glob("*/resnet8_best.pth"))
    renamed = tmp_path / "no_arch_in_this_name" / "best.pth"
    renamed.parent.mkdir()
    renamed.write_bytes(path.read_bytes())
    results = run(["--path_t", str(renamed), "--distill", "kd", "--model_s", "resnet8"], tmp_path / "s")
    assert results["model_t"] == "resnet8"


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_student.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("make_args, expected, in_process", [
    (lambda t, p: ["--path_t", str(p / "missing.pth")], "does not exist", False),
    (lambda t, p: ["--path_t", str(t["vgg13"]), "--distill", "magic"], "unknown --distill 'magic'; choose one of: ",
     True),
    (lambda t, p: ["--path_t", str(t["vgg13"]), "--model_s", "resnet9000"], "unknown model 'resnet9000'", True),
    (lambda t, p: ["--path_t", str(t["wrn_40_2"]).replace("wrn_40_2_vanilla", "resnet8_vanilla")],
     "do not fit", True),
])
def test_bad_teacher_or_flags_is_one_line(make_args, expected, in_process, teachers, tmp_path, capfd):
    """One line on stderr and exit status 2, no traceback: the first case through the real script
    (a process of its own), the others through the same ``main`` in this process."""
    if "resnet8_vanilla" in " ".join(make_args(teachers, tmp_path)):
        wrong = teachers["wrn_40_2"].parents[1] / "resnet8_vanilla"
        wrong.mkdir(exist_ok=True)
        (wrong / "ckpt_epoch_240.pth").write_bytes(teachers["wrn_40_2"].read_bytes())
    argv = [*make_args(teachers, tmp_path), *TINY, "--save_folder", str(tmp_path)]
    if in_process:
        with pytest.raises(SystemExit) as exit_:
            train_student.main(argv)
        returncode, stderr = exit_.value.code, capfd.readouterr().err
    else:
        out = script(*argv)
        returncode, stderr = out.returncode, out.stderr
    lines = stderr.strip().splitlines()
    assert returncode == 2 and len(lines) == 1 and expected in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("distill", ["crd", "hint", "factor"])
def test_optimizer_holds_student_and_method_modules_never_the_teacher(distill, teachers, tmp_path):
    run(["--path_t", str(teachers["resnet32x4"]), "--distill", distill, "--model_s", "resnet8x4"], tmp_path)
    state = torch.load(next(tmp_path.glob("S:*/*_last.pth")), weights_only=True)
    student = build_model("resnet8x4", num_classes=100)
    n_student = len(list(student.parameters()))
    n_optimised = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    distiller_params = {k for k in state["distiller"] if "memory" not in k and "params" not in k
                        and "running" not in k and "num_batches" not in k}
    n_teacher = len(list(build_model("resnet32x4", num_classes=100).parameters()))
    assert n_student < n_optimised < n_student + n_teacher
    if distill == "factor":  # the paraphraser is trained only in the init stage
        assert n_optimised == n_student + len([k for k in distiller_params if k.startswith("translator")])
    else:
        assert n_optimised == n_student + len(distiller_params)


def test_ensemble_of_identical_teachers_equals_single_teacher_kd(teachers, tmp_path):
    path = str(teachers["resnet32x4"])
    args = ["--distill", "kd", "--model_s", "resnet8", "-r", "0.1", "-a", "0.9", "-b", "0"]
    single = run(["--path_t", path, *args], tmp_path / "one")
    double = run(["--path_t", f"{path},{path}", *args], tmp_path / "two")
    assert double["model_t"] == "resnet32x4+resnet32x4" and len(double["teacher_acc"]) == 2
    assert double["teachers"] == single["teachers"] * 2
    assert single["history"][0]["loss_kd"] == approx(double["history"][0]["loss_kd"], rtol=FP32_EXACT)
    w_one = torch.load(next((tmp_path / "one").glob("S:*/*_last.pth")), weights_only=True)["model"]
    w_two = torch.load(next((tmp_path / "two").glob("S:*/*_last.pth")), weights_only=True)["model"]
    for key in w_one:
        if w_two[key].is_floating_point():
            assert_close(w_one[key], w_two[key], rtol=FP32_EXACT, msg=key)
        else:
            assert torch.equal(w_one[key], w_two[key]), key


def test_ensemble_crd_has_a_head_and_bank_per_teacher(teachers, tmp_path):
    paths = f"{teachers['resnet32x4']},{teachers['wrn_40_2']}"
    results = run(["--path_t", paths, "--distill", "crd", "--model_s", "resnet8x4"], tmp_path)
    assert results["model_t"] == "resnet32x4+wrn_40_2" and "loss_crd" in results["history"][0]
    state = torch.load(next(tmp_path.glob("S:*/*_last.pth")), weights_only=True)["distiller"]
    assert state["0.criterion.embed_t.linear.weight"].shape == (128, 256)  # resnet32x4's feature size
    assert state["1.criterion.embed_t.linear.weight"].shape == (128, 128)  # wrn_40_2's
    assert state["0.criterion.contrast.memory_v1"].shape == state["1.criterion.contrast.memory_v1"].shape == (200, 128)


def test_distill_script_dry_run_prints_parsable_commands():
    out = subprocess.run(["bash", "scripts/run_cifar_distill.sh", "--epochs", "3"], cwd=ROOT, capture_output=True,
                         text=True, env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin", "TEACHER": "resnet32x4",
                                              "STUDENT": "resnet8x4", "TRIALS": "1"}, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(TABLE_WEIGHTS)  # the tables' methods (tests/scripts/test_run_scripts.py checks every pair)
    seen = set()
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == ["python", "train_student.py"]
        opt = train_student.parse_option(argv[2:])
        assert opt.epochs == 3 and opt.model_s == "resnet8x4" and opt.path_t.endswith("resnet32x4_vanilla/ckpt_epoch_240.pth")
        seen.add((opt.distill, opt.alpha, opt.beta))
    assert {("crd", 1.0, 0.8), ("dcd", 0.0, 1.0), ("dcd", 1.0, 1.0), ("kd", 0.9, 0.0)} <= seen
    assert {d for d, _, _ in seen} == {name for name, *_ in TABLE_WEIGHTS.values()}


def test_nce_z_momentum_flag_reaches_the_memory():
    from engine.methods import build_distiller, get_method
    from common.declare import options_from
    opt = train_student.parse_option(["--path_t", "t.pth", "--distill", "crd", "--nce_z_momentum", "0.99",
                                      "--nce_k", "16"])
    options = options_from(get_method("crd").Options, opt)
    sample = torch.randn(2, 3, 32, 32)
    distiller = build_distiller("crd", options, build_model("resnet8", 100), build_model("resnet8", 100), sample,
                                n_data=64)
    assert distiller.criterion.contrast.z_momentum == 0.99
    assert train_student.parse_option(["--path_t", "t.pth", "--distill", "crd"]).nce_z_momentum is None


@pytest.mark.parametrize("plain", [False, True])
def test_fast_path_flags_reach_the_teacher_and_the_bank(plain, teachers, tmp_path):
    """--plain_teacher keeps the teacher as loaded; --nce_scores picks the bank's scoring; the
    default folds the teacher's BatchNorms, stores it channels_last and scores by auto."""
    from engine.script import setup_runtime

    flags = ["--plain_teacher", "--nce_scores", "gather"] if plain else []
    opt = train_student.parse_option(["--path_t", str(teachers["resnet32x4"]), "--distill", "crd",
                                      "--model_s", "resnet8x4", *TINY, "--save_folder", str(tmp_path), *flags])
    parts = train_student.build_run(opt, setup_runtime(opt))
    teacher = parts.teachers[0][0]
    batchnorms = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert (len(batchnorms) > 0) == plain
    assert teacher.conv1.weight.is_contiguous(memory_format=torch.channels_last) != plain
    assert parts.distillers[0].criterion.contrast.score_mode == ("gather" if plain else "auto")
    assert parts.data.train_loader.dataset.images.device.type == "cpu"


def test_nce_k_sets_both_the_loader_and_the_bank(teachers, tmp_path):
    """One flag, one place: ``--nce_k 12`` gives the loader's contrast_idx 13 columns (the
    positive and 12 negatives) and the memory bank K = 12, through CRD's declared DataNeeds."""
    from engine.script import setup_runtime

    opt = train_student.parse_option(["--path_t", str(teachers["resnet32x4"]), "--distill", "crd",
                                      "--model_s", "resnet8x4", *TINY, "--nce_k", "12",
                                      "--save_folder", str(tmp_path)])
    parts = train_student.build_run(opt, setup_runtime(opt))
    img, target, index, contrast_idx = next(iter(parts.data.train_loader))
    assert contrast_idx.shape == (img.shape[0], 13) and torch.equal(contrast_idx[:, 0], index)
    assert parts.distillers[0].criterion.contrast.K == 12
    assert parts.data.n_data == 200 and parts.model_t == "resnet32x4"
