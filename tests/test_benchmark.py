"""scripts/benchmark.py: the report of a tiny run has every field, its shares add up, and the
phased step (hooks that cut the graph between the student and the loss) trains exactly like the
real step. No timing is asserted."""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import subprocess
from pathlib import Path

import pytest
import torch

import train_student
from helper.runtime import setup_runtime
from tests.tolerance import FP32, FP64, approx, assert_close

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)

# resnet8 -> resnet8, 2 timed steps after 1 warm-up, 200 images, K 32, batch 8; the baseline
# without loader workers (fast to start); a flag that does not exist is dropped with a note.
TINY = ["--pairs", "resnet8:resnet8", "--methods", "kd,crd", "--in_process", "--steps", "2", "--warmup", "1",
        "--n_data", "200", "--nce_k", "32", "--batch_size", "8", "--data_batches", "2", "--device", "cpu",
        "--flags", "--num_workers 0", "--baseline_methods", "crd", "--baseline_flags", "--loader torchvision --num_workers 0 --no_such_flag 3"]
CONFIG_FIELDS = {"name", "pair", "teacher", "student", "method", "label", "baseline", "flags", "argv", "device",
                 "runtime", "loader", "num_workers", "weights", "batch_size", "nce_k", "n_data", "steps", "warmup",
                 "build_s", "images_per_s", "steps_per_s", "real_step_ms", "real_step_ms_median", "phased_step_ms",
                 "phased_over_real",
                 "ms", "share", "peak_mem_mb", "peak_mem_kind", "peak_rss_mb", "peak_mem_reset", "teacher_seen",
                 "dropped_flags", "commit", "images_per_s_rounds"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = benchmark.main(TINY + ["--json", str(out)])
    return result, json.loads(out.read_text()), printed.getvalue()


def test_report_fields(report):
    result, saved, _ = report
    assert set(saved) == {"settings", "configs", "skipped", "ratios", "loaders", "targets", "notes"}
    assert saved["skipped"] == []
    assert saved["settings"]["n_data"] == 200 and saved["settings"]["device"] == "cpu"
    configs = saved["configs"]
    # kd and crd measured, crd also as the baseline
    assert [(c["method"], c["baseline"]) for c in configs] == [("kd", False), ("crd", False), ("crd", True)]
    for c in configs:
        assert CONFIG_FIELDS <= set(c), CONFIG_FIELDS - set(c)
        assert set(c["ms"]) == set(benchmark.PHASES)
        assert set(c["share"]) == set(benchmark.SHARES)
        assert c["images_per_s"] > 0 and c["steps_per_s"] > 0 and c["peak_mem_mb"] >= 0
        assert c["n_data"] == 200 and c["teacher_seen"]
        assert all(v >= 0 for v in c["ms"].values())
        # The phases are disjoint intervals of the step and "other" is the rest, so the shares
        # sum to 100 up to float rounding; each is in [0, 100].
        assert all(0 <= v <= 100 for v in c["share"].values())
        assert sum(c["share"].values()) == approx(100, rtol=FP64)
    crd = next(c for c in configs if c["method"] == "crd" and not c["baseline"])
    assert crd["weights"] == {"gamma": 1.0, "alpha": 0.0, "beta": 0.8} and crd["nce_k"] == 32
    assert "--no_such_flag" not in configs[2]["argv"] and "torchvision" in configs[2]["argv"]
    assert any("--no_such_flag 3" in note for note in saved["notes"])
    assert [r["method"] for r in saved["ratios"]] == ["crd"]
    assert all(r["images_per_s_ratio"] > 0 for r in saved["ratios"])
    assert saved["loaders"]["runs"] and all(r["images_per_s"] > 0 for r in saved["loaders"]["runs"])
    targets = [t["target"] for t in saved["targets"]]
    assert any(t.startswith("CRD resnet8:resnet8") for t in targets)
    assert all(not t["settings_match"] for t in saved["targets"] if "loader" not in t["target"])
    assert result["configs"][0]["name"] == saved["configs"][0]["name"]


def test_table_prints(report):
    text = report[2]
    assert benchmark.render(report[0]) in text
    assert "| config | images/s | steps/s | % data | % teacher fwd | % student fwd+bwd | % loss fwd+bwd" in text
    assert "crd resnet8->resnet8" in text and "vs the plain baseline" in text and "targets:" in text
    assert "images/s" in text.split("data pipelines alone")[1]


def test_flag_values_may_start_with_a_dash():
    args = benchmark.build_parser().parse_args(benchmark.join_flag_values(["--flags", "--channels_last",
                                                                           "--baseline_flags", "--loader torchvision"]))
    assert args.flags == "--channels_last" and args.baseline_flags == "--loader torchvision"


def test_median_round():
    runs = [{"images_per_s": v, "round": i} for i, v in enumerate([30.0, 10.0, 20.0, 40.0])]
    chosen = benchmark.median_round(runs)
    assert chosen["round"] == 2 and chosen["images_per_s_rounds"] == [30.0, 10.0, 20.0, 40.0]


def test_parser_flags_keeps_known_flags_only():
    parser = train_student.build_parser()
    kept, dropped = benchmark.parser_flags(parser, ["--channels_last", "--amp", "bf16", "--nope", "1",
                                                     "--mode", "wrong", "--nce_t=0.1", "--lr_decay_rate", "-1"])
    assert kept == ["--channels_last", "--amp", "bf16", "--nce_t=0.1", "--lr_decay_rate", "-1"]
    assert dropped == ["--nope", "1", "--mode", "wrong"]


@pytest.mark.parametrize("method", ["crd", "hint"])
def test_phased_step_gives_the_real_gradients(method, tmp_path):
    """The hook split (loss backward to detached copies of the student's outputs, then the
    student's backward from their gradients) gives the gradients of one plain backward."""
    teacher = benchmark.teacher_checkpoint("resnet8", tmp_path, 100)
    opt = train_student.parse_option(["--path_t", str(teacher), "--model_s", "resnet8", "--distill", method,
                                      "--dataset", "synthetic", "--synthetic_train", "2", "--synthetic_test", "1",
                                      "--batch_size", "8", "--nce_k", "16", "--num_workers", "0", "--device", "cpu",
                                      "--save_folder", str(tmp_path)])
    runtime = setup_runtime(opt)
    parts = train_student.build_run(opt, runtime)
    raw = next(iter(parts.data.train_loader))
    grads = []
    for split in (False, True):
        step = copy.deepcopy(parts.step).train()
        hooks = benchmark.PhaseHooks(step.student, list(step.teachers), benchmark.Clock(runtime.device)) if split else None
        _, _, terms = step(step.batch(raw))
        sum(terms.values()).backward()
        if split:
            outs = [(o, leaf.grad) for o, leaf in hooks.cut if leaf.grad is not None]
            torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])
            hooks.remove()
            assert hooks.calls == {"student_fwd": 1, "teacher_fwd": 1}
        grads.append([p.grad.clone() for p in step.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        assert_close(a, b, rtol=FP32)


@pytest.mark.skipif(subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0,
                    reason="not a git checkout")
def test_baseline_ref_runs_the_code_of_a_commit_in_a_child_process(tmp_path):
    """--baseline_ref: the commit's tree is exported (git archive) and measured by a child process
    with that tree's modules (built like its train_student.py, with or without build_run)."""
    args = benchmark.build_parser().parse_args(["--steps", "1", "--warmup", "0", "--n_data", "200", "--batch_size", "8"])
    code = tmp_path / "code"
    commit = benchmark.export_ref("HEAD", code)
    assert len(commit) == 40 and (code / "train_student.py").is_file() and (code / "helper" / "steps.py").is_file()
    (tmp_path / "runs").mkdir()
    config = benchmark.Config("resnet8", "resnet8", "kd", ["--num_workers", "0", "--no_such_flag"], "baseline",
                              True, commit)
    result = benchmark.measure_isolated(config, args, tmp_path / "teachers", str(tmp_path / "runs"), code)
    assert result["commit"] == commit and result["dropped_flags"] == ["--no_such_flag"]
    assert result["images_per_s"] > 0 and sum(result["share"].values()) == approx(100, rtol=FP64)


def test_child_reports_a_user_error(tmp_path):
    """A configuration the training script refuses (here a K larger than the data allows) is
    written as {"error": ...} by the child, which measure_isolated raises as a UserError."""
    args = benchmark.build_parser().parse_args(["--n_data", "200", "--batch_size", "8", "--nce_k", "100000"])
    bad = benchmark.Config("resnet8", "resnet8", "crd", ["--num_workers", "0"], "bad", False)
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"config": bad.to_dict(), "args": vars(args), "teacher_dir": str(tmp_path / "t"),
                                "save_folder": str(tmp_path)}))
    benchmark.run_child(str(spec), str(out))
    assert "--nce_k 100000" in json.loads(out.read_text())["error"]
