"""scripts/benchmark.py: the report of a tiny run has every field, its shares add up, the phased
step (hooks that cut the graph between the student and the loss) trains exactly like the real
step, a commit's code (--baseline_ref) is measured in a child process, and bad input is one error
line. No timing is asserted."""
from __future__ import annotations

import ast
import contextlib
import copy
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from engine.script import setup_runtime
from tests.tolerance import FP32, FP64, approx, assert_close
import train_student

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "benchmark.py"
spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)

# The commit before issue 13's refactor: its build_run returns the older RunParts.
BEFORE_REFACTOR = "31064c4"
# resnet8 -> resnet8, 2 timed steps after 1 warm-up, 200 images, K 32, batch 8.
SMALL = ["--pairs", "resnet8:resnet8", "--steps", "2", "--warmup", "1", "--n_data", "200", "--nce_k", "32",
         "--batch_size", "8", "--data_batches", "2", "--device", "cpu"]
# kd and crd in this process; crd's baseline the plain flags, without loader workers (fast to start).
TINY = SMALL + ["--methods", "kd,crd", "--in_process", "--flags", "--num_workers 0", "--baseline_methods", "crd",
                "--baseline_flags", "--loader torchvision --num_workers 0 --nce_scores gather --plain_teacher"]
CONFIG_FIELDS = {"name", "pair", "teacher", "student", "method", "label", "baseline", "group", "flags", "argv",
                 "device", "runtime", "loader", "num_workers", "weights", "batch_size", "nce_k", "n_data", "steps",
                 "warmup", "build_s", "images_per_s", "steps_per_s", "real_step_ms", "real_step_ms_median",
                 "phased_step_ms", "phased_over_real", "ms", "share", "peak_mem_mb", "peak_mem_kind", "peak_rss_mb",
                 "peak_mem_reset", "teacher_seen", "commit", "images_per_s_rounds"}


def commit_of(ref: str) -> str | None:
    """The full hash of ``ref`` in this checkout (None: not a git checkout, or not there)."""
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def needs_commit(ref: str):
    return pytest.mark.skipif(commit_of(ref) is None, reason=f"{ref} is not in this git checkout")


def check_result(c: dict) -> None:
    """A configuration's result: every field, positive rates, phases that add up to the step."""
    assert CONFIG_FIELDS <= set(c), CONFIG_FIELDS - set(c)
    assert set(c["ms"]) == set(benchmark.PHASES) and set(c["share"]) == set(benchmark.SHARES)
    assert c["images_per_s"] > 0 and c["steps_per_s"] > 0 and c["peak_mem_mb"] >= 0
    assert c["images_per_s"] == approx(c["steps_per_s"] * c["batch_size"], rtol=FP64)
    assert c["n_data"] == 200 and c["teacher_seen"]
    assert all(v >= 0 for v in c["ms"].values())
    # The phases are disjoint intervals of the step and "other" is the rest, so the shares sum
    # to 100 up to float rounding; each is in [0, 100].
    assert all(0 <= v <= 100 for v in c["share"].values())
    assert sum(c["share"].values()) == approx(100, rtol=FP64)


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
    assert saved["settings"]["baseline_commit"] is None
    configs = saved["configs"]
    # kd and crd measured, crd also as the baseline
    assert [(c["method"], c["baseline"]) for c in configs] == [("kd", False), ("crd", False), ("crd", True)]
    for c in configs:
        check_result(c)
        assert c["commit"] is None and c["argv"][c["argv"].index("--distill") + 1] == c["method"]
    crd = configs[1]
    assert crd["weights"] == {"gamma": 1.0, "alpha": 0.0, "beta": 0.8} and crd["nce_k"] == 32
    assert crd["loader"] == "tensor" and crd["num_workers"] == 0
    assert configs[2]["loader"] == "torchvision" and "--plain_teacher" in configs[2]["argv"]
    assert crd["group"] == configs[2]["group"] != configs[0]["group"]
    assert [(r["method"], r["same_flags"]) for r in saved["ratios"]] == [("crd", False)]
    assert saved["ratios"][0]["images_per_s_ratio"] == approx(
        crd["images_per_s"] / configs[2]["images_per_s"], rtol=FP64)
    runs = saved["loaders"]["runs"]
    assert [(r["loader"], r["contrast"]) for r in runs] == [("tensor", False), ("tensor", True),
                                                            ("torchvision", False), ("torchvision", True)]
    assert all(r["images_per_s"] > 0 and r["batches"] == 2 for r in runs)
    targets = [t["target"] for t in saved["targets"]]
    assert any(t.startswith("CRD resnet8:resnet8") for t in targets)
    assert all(not t["settings_match"] for t in saved["targets"] if "loader" not in t["target"])
    assert result["configs"][0]["name"] == saved["configs"][0]["name"]


def test_table_prints(report):
    text = report[2]
    assert benchmark.render(report[0]) in text
    assert "| config | images/s | steps/s | % data | % teacher fwd | % student fwd+bwd | % loss fwd+bwd" in text
    assert "crd resnet8->resnet8" in text and "vs the baseline" in text and "targets:" in text
    assert "images/s" in text.split("data pipelines alone")[1]


def test_data_only_times_the_pipelines_alone(capsys):
    saved = benchmark.main(SMALL + ["--data_only", "--methods", "nope"])  # --methods is not read
    assert saved["configs"] == [] and saved["ratios"] == [] and saved["skipped"] == []
    assert len(saved["loaders"]["runs"]) == 4 and saved["loaders"]["ratio"] > 0
    assert "data pipelines alone" in capsys.readouterr().out


def test_make_configs_pairs_each_configuration_with_its_baseline():
    args = benchmark.build_parser().parse_args(["--loader", "both", "--flags=--channels_last", "--methods", "kd,crd",
                                                "--baseline_methods", "crd"])
    pairs = [("resnet56", "resnet20")]
    plain = benchmark.make_configs(args, pairs, ["kd", "crd"], None)
    assert [(c.method, c.baseline, c.flags) for c in plain] == [
        ("kd", False, ["--loader", "tensor", "--channels_last"]),
        ("kd", False, ["--loader", "torchvision", "--channels_last"]),
        ("crd", False, ["--loader", "tensor", "--channels_last"]),
        ("crd", False, ["--loader", "torchvision", "--channels_last"]),
        ("crd", True, benchmark.BASELINE_FLAGS.split())]
    assert len({c.group for c in plain[2:]}) == 1 and plain[0].group != plain[2].group
    # on a commit: each configuration's own command line, paired one to one
    ref = benchmark.make_configs(args, pairs, ["crd"], "a" * 40)
    assert [(c.flags, c.baseline, c.commit) for c in ref] == [
        (ref[0].flags, False, None), (ref[1].flags, False, None), (ref[0].flags, True, "a" * 40),
        (ref[1].flags, True, "a" * 40)]
    assert ref[0].group == ref[2].group != ref[1].group == ref[3].group
    assert ref[2].label == "baseline: --loader tensor --channels_last @ aaaaaaaaaa"
    # --baseline_flags with a commit: those flags on it, once per pair and method
    args.baseline_flags = "--plain_teacher"
    ref = benchmark.make_configs(args, pairs, ["crd"], "a" * 40)
    assert [(c.flags, c.commit) for c in ref if c.baseline] == [(["--plain_teacher"], "a" * 40)]


def test_rounds_alternate_and_keep_the_median(monkeypatch, capsys):
    """A B A B ...; each configuration's median round; one refused is skipped in every later round."""
    args = benchmark.build_parser().parse_args(["--rounds", "3"])
    configs = [benchmark.Config("t", "s", m, [], m) for m in ("a", "b", "bad")]
    calls, speeds = [], iter([10.0, 5.0, 30.0, 7.0, 20.0, 6.0])

    def fake(config, *rest):
        calls.append(config.method)
        if config.method == "bad":
            raise UserError("K too large")
        return {"name": config.name, "images_per_s": next(speeds), "share": {"loss_fwd_bwd": 1.0},
                "phased_over_real": 1.0}

    monkeypatch.setattr(benchmark, "measure_one", fake)
    results, skipped = benchmark.measure_rounds(configs, args, Path("t"), "s", None)
    assert calls == ["a", "b", "bad", "a", "b", "a", "b"]
    assert [r["images_per_s"] for r in results] == [20.0, 6.0]
    assert results[0]["images_per_s_rounds"] == [10.0, 30.0, 20.0]
    assert [s["method"] for s in skipped] == ["bad"] and skipped[0]["error"] == "K too large"
    assert "skipped: K too large" in capsys.readouterr().out


def test_flag_values_may_start_with_a_dash():
    args = benchmark.build_parser().parse_args(benchmark.join_flag_values(["--flags", "--channels_last",
                                                                           "--baseline_flags", "--loader torchvision"]))
    assert args.flags == "--channels_last" and args.baseline_flags == "--loader torchvision"


def test_median_round():
    runs = [{"images_per_s": v, "round": i} for i, v in enumerate([30.0, 10.0, 20.0, 40.0])]
    chosen = benchmark.median_round(runs)
    assert chosen["round"] == 2 and chosen["images_per_s_rounds"] == [30.0, 10.0, 20.0, 40.0]


@pytest.mark.parametrize("bad, message", [
    (["--flags", "--no_such_flag 3"], "error: [--loader tensor --no_such_flag 3]: train_student.py refuses the flags: "
                                      "unrecognized arguments: --no_such_flag 3"),
    (["--methods", "kd,nope"], "error: unknown method(s) nope; choose from"),
    (["--pairs", "resnet8"], "error: --pairs takes teacher:student pairs"),
    (["--steps", "0"], "error: --steps, --rounds and --data_batches must be at least 1"),
])
def test_bad_input_is_one_error_line_before_measuring(bad, message, capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark.main(SMALL + bad)
    captured = capsys.readouterr()
    assert stop.value.code == 2 and captured.err.startswith(message) and captured.err.count("\n") == 1
    assert "measuring" not in captured.out


def test_a_tree_without_build_run_is_refused(tmp_path):
    (tmp_path / "train_student.py").write_text("def train(opt):\n    pass\n")
    with pytest.raises(UserError, match="no build_run"):
        benchmark.require_build_run(tmp_path, "old")
    (tmp_path / "train_student.py").write_text("def build_run(opt, runtime):\n    pass\n")
    benchmark.require_build_run(tmp_path, "new")


@needs_commit("1564697^")
def test_a_commit_without_build_run_is_refused_in_one_line():
    """The parent of the commit that brought build_run (RepDistiller-style code) cannot be a baseline."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--baseline_ref", "1564697^", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.startswith("error: --baseline_ref 1564697^: its train_student.py has no build_run")
    assert done.stderr.count("\n") == 1


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


@needs_commit("HEAD")
def test_baseline_ref_runs_the_code_of_a_commit_in_a_child_process(tmp_path):
    """--baseline_ref: the commit's tree is exported (git archive) and measured by a child process
    with that tree's modules, through its own train_student.build_run (HEAD's here; 31064c4's, the
    RunParts from before issue 13, in the next test)."""
    args = benchmark.build_parser().parse_args(SMALL + ["--steps", "1", "--warmup", "0"])
    code = tmp_path / "code"
    commit = benchmark.export_ref("HEAD", code)
    assert commit == commit_of("HEAD") and (code / "train_student.py").is_file()
    (tmp_path / "runs").mkdir()
    config = benchmark.Config("resnet8", "resnet8", "crd", ["--num_workers", "0"], "baseline", True, "g", commit)
    result = benchmark.measure_isolated(config, args, tmp_path / "teachers", str(tmp_path / "runs"), code)
    assert result["commit"] == commit and result["method"] == "crd" and result["steps"] == 1
    assert result["images_per_s"] > 0 and sum(result["share"].values()) == approx(100, rtol=FP64)


@needs_commit(BEFORE_REFACTOR)
def test_script_times_each_configuration_on_a_commit_too(tmp_path):
    """The script end to end, each configuration in a child process: measured on this code and
    again, same command line, on the code of 31064c4 (whose build_run returns the RunParts from
    before issue 13), and compared with it."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), *SMALL, "--methods", "crd", "--flags", "--num_workers 0",
                           "--baseline_ref", BEFORE_REFACTOR, "--no_loader_check", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads(out.read_text())
    commit = commit_of(BEFORE_REFACTOR)
    assert saved["settings"]["baseline_commit"] == commit and saved["loaders"] == {}
    assert [(c["baseline"], c["commit"]) for c in saved["configs"]] == [(False, None), (True, commit)]
    for c in saved["configs"]:
        check_result(c)
    assert saved["configs"][0]["flags"] == saved["configs"][1]["flags"] == ["--loader", "tensor", "--num_workers", "0"]
    assert [r["same_flags"] for r in saved["ratios"]] == [True]
    assert not any(t["target"].startswith("CRD") for t in saved["targets"])  # no plain baseline: no speed-up target
    assert f"@ {commit[:10]}" in done.stdout and "vs the baseline" in done.stdout


def test_child_reports_a_user_error(tmp_path):
    """A configuration the training script refuses (here a K larger than the data allows) is
    written as {"error": ...} by the child, which measure_isolated raises as a UserError."""
    args = benchmark.build_parser().parse_args(["--n_data", "200", "--batch_size", "8", "--nce_k", "100000"])
    bad = benchmark.Config("resnet8", "resnet8", "crd", ["--num_workers", "0"], "bad")
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"config": bad.to_dict(), "args": vars(args), "teacher_dir": str(tmp_path / "t"),
                                "save_folder": str(tmp_path)}))
    benchmark.run_child(str(spec), str(out))
    assert "--nce_k 100000" in json.loads(out.read_text())["error"]


def test_no_function_is_longer_than_60_lines():
    tree = ast.parse(SCRIPT.read_text())
    spans = {node.name: node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1
             for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert len(spans) > 20 and "main" in spans
    assert {name: n for name, n in spans.items() if n > 60} == {}
