"""transfer_student.py (linear probe) on the synthetic set: a trained network probes far above a
random one, the backbone stays bit-identical, the cached and per-batch paths agree, results.json
says what was probed, and bad input is one line."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.runtime import Runtime
from dataset import DataOptions, get_dataloaders
from dataset.skipping import sample_images
from dataset.tensor_loader import TensorLoader
from models import build_model
from models.teacher import load_backbone, prepare_teacher
import engine.probe
import train_teacher
import transfer_student

ROOT = Path(__file__).resolve().parents[2]
DATA = ["--dataset", "synthetic", "--synthetic_classes", "10", "--synthetic_train", "40", "--synthetic_test", "10",
        "--synthetic_difficulty", "0.3", "--device", "cpu"]
PROBE = [*DATA, "--epochs", "15", "--lr_decay_epochs", "10"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A resnet8 trained 3 epochs on the synthetic set, and the same network untrained."""
    root = tmp_path_factory.mktemp("sources")
    train_teacher.main(["--model", "resnet8", *DATA, "--epochs", "3", "--batch_size", "16",
                        "--save_folder", str(root / "models")])
    trained = root / "models" / "resnet8_synthetic_lr_0.05_decay_0.0005_trial_0" / "resnet8_last.pth"
    torch.manual_seed(0)
    random_net = root / "random" / "resnet8_random.pth"
    random_net.parent.mkdir()
    torch.save({"model": build_model("resnet8", num_classes=10).state_dict(), "arch": "resnet8",
                "num_classes": 10}, random_net)
    return {"trained": trained, "random": random_net, "root": root}


def probe(path: Path, save: Path, *extra: str) -> dict:
    return transfer_student.main(["--path_s", str(path), *PROBE, "--save_folder", str(save), *extra])


def test_trained_features_probe_far_above_random(sources, tmp_path):
    trained = probe(sources["trained"], tmp_path, "--no_augment")
    random_net = probe(sources["random"], tmp_path, "--no_augment")
    # measured: 75 % against 17 % (10 classes: chance 10 %; 15 epochs on cached features)
    assert trained["last_acc"] >= random_net["last_acc"] + 30, (trained["last_acc"], random_net["last_acc"])
    assert trained["last_acc"] >= 50


def test_results_json_fields(sources, tmp_path):
    out = probe(sources["trained"], tmp_path, "--no_augment", "--trial", "3")
    folder = tmp_path / "resnet8_synthetic_lr_0.05_decay_0.0005_trial_0_synthetic_probe_trial_3"
    saved = json.loads((folder / "results.json").read_text())
    assert saved == json.loads(json.dumps(out))
    assert saved["role"] == "transfer" and saved["target"] == "synthetic" and saved["status"] == "finished"
    assert saved["model"] == "resnet8" and saved["label"] == "vanilla" and saved["trial"] == "3"
    source = saved["source"]
    assert source["path"] == str(sources["trained"]) and source["role"] == "teacher" and source["method"] == "vanilla"
    assert source["trial"] == "0" and source["dataset"] == "synthetic" and source["epoch"] == 3
    recipe = saved["recipe"]
    assert recipe == {**recipe, "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 0.0005, "epochs": 15,
                      "lr_decay_epochs": [10], "batch_size": 64, "augment": False, "probe_bn": "eval", "feat_dim": 64,
                      "probe_init": "normal"}
    history = saved["history"]
    assert [h["epoch"] for h in history] == list(range(1, 16))
    assert [h["lr"] for h in history] == pytest.approx([0.05] * 10 + [0.005] * 5)
    assert saved["last_acc"] == history[-1]["test_acc"] and saved["best_acc"] == max(h["test_acc"] for h in history)
    assert saved["feature_images"] == 400 and saved["feature_images_per_s"] > 0
    state = torch.load(folder / transfer_student.PROBE_FILE, weights_only=True)
    assert state["classifier"]["weight"].shape == (10, 64) and state["epoch"] == 15
    # the same run folder again is refused (one line), --overwrite starts it again
    with pytest.raises(SystemExit) as stop:
        probe(sources["trained"], tmp_path, "--no_augment", "--trial", "3")
    assert stop.value.code == 2
    probe(sources["trained"], tmp_path, "--no_augment", "--trial", "3", "--overwrite", "--epochs", "1")


def test_epoch_lines_in_a_log_and_a_bar_on_a_terminal(sources, tmp_path, capsys, monkeypatch):
    """Not on a terminal (capsys), a 12-epoch probe prints the lines of epochs 1, 10 and 12; every
    epoch is in results.json, and --tb_freq 20 over its 84 steps writes 4 step records (the tags of
    train_teacher.py's: the loss and its one term ce). On a terminal, a bar (on stderr) and no epoch lines."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = probe(sources["trained"], tmp_path, "--no_augment", "--epochs", "12", "--tb_freq", "20")
    printed = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert printed == ["epoch 1", "epoch 10", "epoch 12"]
    assert [h["epoch"] for h in out["history"]] == list(range(1, 13)) and out["steps"] == 84
    events = EventAccumulator(str(tmp_path / f"{out['source']['run']}_synthetic_probe_trial_0"),
                              size_guidance={"scalars": 0})
    events.Reload()
    assert {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if "/" in tag} == {
        f"step/{name}": [20, 40, 60, 80] for name in ("loss", "ce", "lr", "top1")}
    # on a terminal (train_probe on a few cached features: no backbone needed)
    monkeypatch.setattr(engine.probe, "is_interactive", lambda: True)
    monkeypatch.setattr(engine.probe, "is_terminal_output", lambda: True)
    cached = transfer_student.FeatureSet(torch.randn(16, 4), torch.arange(16) % 3)
    recipe = argparse.Namespace(learning_rate=0.05, momentum=0.9, weight_decay=5e-4, lr_decay_epochs=[],
                                lr_decay_rate=0.1, lr_schedule="step", epochs=12)
    run = transfer_student.RunLog(tmp_path / "terminal", recipe)
    transfer_student.train_probe(torch.nn.Linear(4, 3), transfer_student.CachedBatches(cached, 8, 0, False), cached,
                                 recipe, epochs=12, run=run)
    run.close()
    seen = capsys.readouterr()
    assert len(run.history) == 12 and seen.out == ""
    assert "probe:" in seen.err and "/12 [" in seen.err and "epoch/s" in seen.err and "test_top1=" in seen.err


@pytest.mark.parametrize("flags, bn_changes", [((), False), (("--plain_backbone",), False),
                                               (("--probe_bn", "train"), True)])
def test_backbone_frozen(sources, tmp_path, monkeypatch, flags, bn_changes):
    """Every parameter and buffer of the backbone as it is run (after folding, on the fast path)
    is bit-identical after an augmented probe; with --probe_bn train the BatchNorm statistics drift."""
    seen = {}

    def prepare(model, runtime, sample=None, fast=True):
        out = prepare_teacher(model, runtime, sample, fast)
        seen.update(model=model, before={k: v.clone() for k, v in model.state_dict().items()})
        return out

    monkeypatch.setattr(transfer_student, "prepare_teacher", prepare)
    transfer_student.main(["--path_s", str(sources["trained"]), *DATA, "--epochs", "1",
                           "--save_folder", str(tmp_path), *flags])
    after = seen["model"].state_dict()
    changed = sorted(k for k, v in seen["before"].items() if not torch.equal(v, after[k]))
    params = {k for k, _ in seen["model"].named_parameters()}
    assert not params & set(changed)
    if bn_changes:
        assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("running_var") for k in changed)
    else:
        assert changed == []


def test_linear_head_starts_from_the_dcd_recipe():
    """The probe's classifier: weights from N(0, 0.01^2) and a zero bias (the DCD recipe), drawn
    from torch's seeded generator; --probe_init pytorch gives PyTorch's default init."""
    torch.manual_seed(0)
    head = engine.probe.linear_head(2048, 1000)
    weight, bias = head.weight.detach(), head.bias.detach()
    assert weight.shape == (1000, 2048) and bias.shape == (1000,)
    # 2,048,000 draws: the sample std's and mean's standard errors are 5e-6 and 7e-6
    assert abs(float(weight.std()) - 0.01) < 3e-5 and abs(float(weight.mean())) < 5e-5
    # a normal's mean |w|, 0.00798, not that of a uniform of the same std (0.00866)
    assert abs(float(weight.abs().mean()) - 0.01 * (2 / torch.pi) ** 0.5) < 2e-5
    assert torch.equal(bias, torch.zeros(1000))
    torch.manual_seed(0)
    assert torch.equal(engine.probe.linear_head(2048, 1000).weight, head.weight)     # seeded: the same draws
    default = engine.probe.linear_head(2048, 1000, "pytorch").requires_grad_(False)
    bound = 1 / 2048 ** 0.5
    assert float(default.weight.abs().max()) <= bound and float(default.bias.abs().max()) > 0
    assert abs(float(default.weight.std()) - bound / 3 ** 0.5) < 1e-5 * 3
    with pytest.raises(transfer_student.UserError, match="--probe_init 'xavier'"):
        engine.probe.linear_head(4, 3, "xavier")


@pytest.mark.parametrize("init", ["normal", "pytorch"])
def test_probe_run_starts_from_its_init(sources, tmp_path, monkeypatch, init):
    """A probe run builds its classifier with linear_head and --probe_init (normal by default),
    the same one for the same --seed, and trains it."""
    made = []

    def head(feat_dim, num_classes, how="normal"):
        out = engine.probe.linear_head(feat_dim, num_classes, how)
        made.append((how, out.weight.detach().clone(), out.bias.detach().clone(), out))
        return out

    monkeypatch.setattr(transfer_student, "linear_head", head)
    flags = [] if init == "normal" else ["--probe_init", init]
    for trial in (0, 1):
        out = probe(sources["trained"], tmp_path, "--no_augment", "--epochs", "2", "--seed", "7",
                    "--trial", str(trial), *flags)
        assert out["recipe"]["probe_init"] == init and out["last_acc"] is not None
    (how, weight, bias, trained), (_, weight_again, bias_again, _) = made
    assert how == init and weight.shape == (10, 64)
    assert torch.equal(weight, weight_again) and torch.equal(bias, bias_again)
    if init == "normal":
        assert torch.equal(bias, torch.zeros(10)) and 0.007 < float(weight.std()) < 0.013   # 640 draws
    else:
        assert float(bias.abs().max()) > 0 and float(weight.abs().max()) <= 1 / 64 ** 0.5
    assert not torch.equal(trained.weight.detach(), weight)


def test_flag_reference_documents_every_flag():
    reference = (ROOT / "docs" / "usage.md").read_text()
    reference = reference[reference.index("## Flag reference"):]
    probe_flags = reference[reference.index("`transfer_student.py` trains a linear probe"):]
    for action in transfer_student.build_parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}" in reference, f"docs/usage.md's flag reference lacks {flag}"
    for flag in ("--path_s", "--view", "--probe_init", "--probe_bn", "--no_augment", "--plain_backbone", "--trial"):
        assert f"`{flag}" in probe_flags, flag


def test_cached_and_per_batch_paths_agree(sources):
    """Without augmentation, features cached once and features computed per batch (same order)
    train the same classifier."""
    runtime = Runtime(torch.device("cpu"))
    backbone, _, _ = load_backbone(str(sources["trained"]))
    data = get_dataloaders(DataOptions(dataset="synthetic", synthetic_classes=10, synthetic_train=40,
                                       synthetic_test=10, synthetic_difficulty=0.3, seed=5))
    prepare_teacher(backbone, runtime, sample_images(data.val_loader.dataset))
    recipe = argparse.Namespace(learning_rate=0.05, momentum=0.9, weight_decay=5e-4, lr_decay_epochs=[3],
                                lr_decay_rate=0.1, lr_schedule="step", epochs=4)
    timer = transfer_student.PassTimer()
    test = transfer_student.extract(backbone, data.val_loader, runtime, timer)
    cached = transfer_student.extract(backbone, transfer_student.plain_train_loader(data, 256), runtime, timer)
    train = data.train_loader
    plain = TensorLoader(train.dataset, 64, train.sampler, augment=None, seed=train.seed, drop_last=train.drop_last)
    paths = {"cached": transfer_student.CachedBatches(cached, 64, seed=5, drop_last=train.drop_last),
             "per_batch": transfer_student.LiveBatches(backbone, plain, runtime, False, timer)}
    weights = {}
    for name, batches in paths.items():
        torch.manual_seed(1)
        classifier = torch.nn.Linear(cached.feats.shape[1], 10)
        transfer_student.train_probe(classifier, batches, test, recipe, epochs=4)
        weights[name] = torch.cat([classifier.weight.detach().flatten(), classifier.bias.detach()])
    scale = weights["cached"].abs().max()
    assert torch.allclose(weights["cached"], weights["per_batch"], rtol=0, atol=1e-4 * float(scale))
    torch.manual_seed(1)
    untouched = torch.nn.Linear(cached.feats.shape[1], 10).weight.detach().flatten()
    assert (weights["cached"][:untouched.numel()] - untouched).abs().max() > 100 * 1e-4 * scale  # it trained


def test_repdistiller_student_checkpoint(tmp_path):
    """A RepDistiller {'model': sd} student file: architecture from its folder, classes from its classifier."""
    folder = tmp_path / "S:resnet8_T:resnet32x4_cifar100_crd_r:1_a:0.9_b:0.8_1"
    folder.mkdir()
    torch.save({"model": build_model("resnet8", num_classes=7).state_dict(), "epoch": 240}, folder / "ckpt_epoch_240.pth")
    model, arch, facts = load_backbone(str(folder / "ckpt_epoch_240.pth"))
    assert arch == "resnet8" and facts["num_classes"] == 7 and model.fc.out_features == 7
    source = transfer_student.describe_source(folder / "ckpt_epoch_240.pth", arch, facts)
    assert source["role"] == "student" and source["label"] == "crd+kd" and source["model_t"] == "resnet32x4"
    assert source["trial"] == "1" and source["run"] == f"{folder.name}_ckpt_epoch_240"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "transfer_student.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_bad_input_one_line(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:300])  # truncated
    cases = {
        "missing": (["--path_s", str(tmp_path / "none.pth"), *DATA], "does not exist"),
        "corrupt": (["--path_s", str(corrupt), *DATA], "not a readable PyTorch checkpoint"),
        "unknown set": (["--path_s", str(corrupt), "--dataset", "mnist"], "invalid choice: 'mnist'"),
        "no path": (DATA, "--path_s is required"),
        "unknown init": (["--path_s", str(corrupt), *DATA, "--probe_init", "xavier"], "invalid choice: 'xavier'"),
        "cache with drift": (["--path_s", str(corrupt), *DATA, "--no_augment", "--probe_bn", "train"],
                             "cannot be cached"),
    }
    capsys.readouterr()
    for name, (args, expected) in cases.items():
        with pytest.raises(SystemExit) as stop:
            transfer_student.main([*args, "--save_folder", str(tmp_path / "save")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, lines)
        assert expected in lines[0], (name, lines[0])
    # the real script: the same line and status, no traceback
    done = run_cli(*cases["corrupt"][0], "--save_folder", str(tmp_path / "save"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "not a readable PyTorch checkpoint" in lines[0]
