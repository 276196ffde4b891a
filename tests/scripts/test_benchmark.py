"""scripts/benchmark.py: the report of a tiny run has every field, its shares add up, the phased
step (hooks that cut the graph between the student and the loss) trains exactly like the real
step, a commit's code (--baseline_ref) is measured in a child process, the goals given with
--expect are checked on the measured numbers (met and not met, the exit status), and bad input is
one error line. No timing is asserted: the expectations of the tiny runs hold (or fail) whatever
the machine's speed."""
from __future__ import annotations

import ast
import contextlib
import copy
import functools
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
# Goals on the tiny run: one met whatever the speed (a ratio of two speeds is positive), one not
# met, one on a share of every measured configuration, one on the pipelines alone.
MET, UNMET = "crd resnet8:resnet8 images_per_s_ratio>0", "crd images_per_s_ratio < 0"
EXPECT = ["--expect", MET, "--expect", UNMET, "--expect", "share.loss_fwd_bwd<=100", "--expect", "loader_ratio>0"]
CHECK_FIELDS = {"expect", "subject", "metric", "op", "bound", "value", "met"}
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
        result = benchmark.main(TINY + EXPECT + ["--json", str(out)])
    return result, json.loads(out.read_text()), printed.getvalue()


def test_report_fields(report):
    result, saved, _ = report
    assert set(saved) == {"settings", "configs", "skipped", "ratios", "loaders", "expectations", "notes"}
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
    assert saved["settings"]["expect"] == [MET, UNMET, "share.loss_fwd_bwd<=100", "loader_ratio>0"]
    assert result["configs"][0]["name"] == saved["configs"][0]["name"]


def test_table_prints(report):
    text = report[2]
    assert benchmark.render(report[0]) in text
    assert "| config | images/s | steps/s | % data | % teacher fwd | % student fwd+bwd | % loss fwd+bwd" in text
    assert "crd resnet8->resnet8" in text and "vs the baseline" in text and "expectations:" in text
    expectations = text.split("expectations:")[1]
    assert f"- {MET}: crd resnet8->resnet8 [--loader tensor --num_workers 0]: images_per_s_ratio " in expectations
    assert "(expected > 0) -> met" in expectations and "(expected < 0) -> NOT met" in expectations
    assert "images/s" in text.split("data pipelines alone")[1]


def test_expectations_are_checked_on_the_measured_numbers(report):
    """Each --expect is checked on every measured configuration it names (never a baseline), with
    the value the report holds for it; met and not met as the comparison says."""
    _, saved, _ = report
    checks = saved["expectations"]
    assert all(set(c) == CHECK_FIELDS for c in checks)
    assert [(c["expect"], c["subject"]) for c in checks] == [
        (MET, "crd resnet8->resnet8 [--loader tensor --num_workers 0]"),
        (UNMET, "crd resnet8->resnet8 [--loader tensor --num_workers 0]"),
        ("share.loss_fwd_bwd<=100", "kd resnet8->resnet8 [--loader tensor --num_workers 0]"),
        ("share.loss_fwd_bwd<=100", "crd resnet8->resnet8 [--loader tensor --num_workers 0]"),
        ("loader_ratio>0", "data pipelines alone")]
    ratio = saved["ratios"][0]["images_per_s_ratio"]
    assert checks[0] == {"expect": MET, "subject": checks[0]["subject"], "metric": "images_per_s_ratio", "op": ">",
                         "bound": 0.0, "value": ratio, "met": True}
    assert checks[1]["op"] == "<" and checks[1]["value"] == ratio and checks[1]["met"] is False
    assert [c["value"] for c in checks[2:4]] == [c["share"]["loss_fwd_bwd"] for c in saved["configs"][:2]]
    assert checks[2]["met"] and checks[3]["met"]
    assert checks[4]["value"] == saved["loaders"]["ratio"] and checks[4]["met"]
    assert benchmark.exit_status(saved) == 1


def test_data_only_times_the_pipelines_alone(capsys):
    saved = benchmark.main(SMALL + ["--data_only", "--methods", "nope"])  # --methods is not read
    assert saved["configs"] == [] and saved["ratios"] == [] and saved["skipped"] == []
    assert len(saved["loaders"]["runs"]) == 4 and saved["loaders"]["ratio"] > 0
    # no --expect: nothing is checked
    assert saved["expectations"] == [] and saved["settings"]["expect"] == [] and benchmark.exit_status(saved) == 0
    out = capsys.readouterr().out
    assert "data pipelines alone" in out and "expectations:" not in out


def test_parse_expectation():
    e = benchmark.parse_expectation(" crd resnet32x4:resnet8x4 images_per_s_ratio>=1.5 ", ["crd", "kd"],
                                    ["resnet32x4:resnet8x4", "resnet56:resnet20"])
    assert (e.text, e.methods, e.pairs, e.metric, e.op, e.bound) == (
        "crd resnet32x4:resnet8x4 images_per_s_ratio>=1.5", {"crd"}, {"resnet32x4:resnet8x4"}, "images_per_s_ratio",
        ">=", 1.5)
    e = benchmark.parse_expectation("kd crd share.loss_fwd_bwd <= 10", ["crd", "kd"], ["a:b"])
    assert (e.methods, e.pairs, e.metric, e.op, e.bound) == ({"kd", "crd"}, set(), "share.loss_fwd_bwd", "<=", 10.0)
    assert e.names({"method": "kd", "pair": "a:b"}) and not e.names({"method": "hint", "pair": "a:b"})
    e = benchmark.parse_expectation("loader_ratio>5", [], ["a:b"])
    assert (e.methods, e.pairs, e.metric, e.op, e.bound) == (set(), set(), "loader_ratio", ">", 5.0)


def test_check_expectations_on_given_numbers():
    """One entry per configuration named (baselines never); a ratio only where there is a baseline;
    nothing measured (skipped) or no value is not met; no expectation, no entry."""
    def result(method, pair, speed, baseline=False):
        return {"name": f"{method} {pair}{' base' if baseline else ''}", "method": method, "pair": pair,
                "baseline": baseline, "images_per_s": speed, "share": {"loss_fwd_bwd": 4.0}}

    results = [result("crd", "a:b", 30.0), result("crd", "a:b", 10.0, True), result("kd", "a:b", 50.0),
               result("crd", "c:d", 20.0)]
    compared = [{"name": "crd a:b", "images_per_s_ratio": 3.0, "peak_mem_ratio": None}]
    parse = functools.partial(benchmark.parse_expectation, methods=["crd", "kd", "hint"], pairs=["a:b", "c:d", "e:f"])
    expectations = [parse("crd images_per_s>=25"), parse("images_per_s_ratio>=2.5"), parse("peak_mem_ratio<1"),
                    parse("hint images_per_s>1"), parse("e:f share.loss_fwd_bwd<5"), parse("kd share.loss_fwd_bwd<5"),
                    parse("loader_ratio_contrast>=2")]
    checks = benchmark.check_expectations(expectations, results, compared, {"ratio": 4.0})
    assert [(c["subject"], c["value"], c["met"]) for c in checks] == [
        ("crd a:b", 30.0, True), ("crd c:d", 20.0, False),  # the baseline (10) is not checked
        ("crd a:b", 3.0, True),                            # crd c:d and kd have no baseline
        ("crd a:b", None, False),                          # no value (a baseline without peak memory)
        (None, None, False), (None, None, False),          # hint, e:f: nothing measured
        ("kd a:b", 4.0, True),
        (None, None, False)]                               # the pipelines' crd-batch ratio is missing
    assert benchmark.check_expectations([], results, compared, {"ratio": 4.0}) == []
    assert benchmark.exit_status({"expectations": checks[:1]}) == 0
    assert benchmark.exit_status({"expectations": checks[:2]}) == 1 and benchmark.exit_status(None) == 0


def test_an_unmet_expectation_is_exit_status_1(tmp_path):
    """The script run as a command: the report is printed and written, and the exit status is 1."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), *SMALL, "--steps", "1", "--warmup", "0", "--methods", "kd",
                           "--in_process", "--flags", "--num_workers 0", "--no_loader_check", "--expect",
                           "kd images_per_s>0", "--expect", "kd images_per_s<0", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert [c["met"] for c in json.loads(out.read_text())["expectations"]] == [True, False]
    assert "kd images_per_s<0: kd resnet8->resnet8 [--loader tensor --num_workers 0]: images_per_s " in done.stdout


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
    (["--expect", "crd images_per_s_ratio=>1.5"], "error: --expect 'crd images_per_s_ratio=>1.5': write [METHOD ...] "
                                                  "[TEACHER:STUDENT ...] METRIC OP NUMBER"),
    (["--expect", "crd speed>=2"], "error: --expect 'crd speed>=2': unknown metric speed; choose from images_per_s,"),
    (["--expect", "kd images_per_s>=fast"], "error: --expect 'kd images_per_s>=fast': fast is not a number"),
    (["--expect", "hint resnet8:resnet20 images_per_s>1"], "error: --expect 'hint resnet8:resnet20 images_per_s>1': "
                                                           "hint, resnet8:resnet20 not measured (methods: crd, kd;"),
    (["--expect", "kd loader_ratio>=5"], "error: --expect 'kd loader_ratio>=5': loader_ratio is a number of the data "
                                         "pipelines alone: name no method or pair"),
    (["--expect", "kd images_per_s_ratio>=1", "--baseline_methods", "crd"],
     "error: --expect 'kd images_per_s_ratio>=1': images_per_s_ratio compares with a baseline, and --baseline_methods "
     "gives none to kd"),
    (["--expect", "loader_ratio>=5", "--no_loader_check"], "error: --expect 'loader_ratio>=5': loader_ratio needs the "
                                                           "pipelines alone, which --no_loader_check skips"),
    (["--expect", "images_per_s>=1", "--data_only"], "error: --expect 'images_per_s>=1': no configuration is measured"),
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
    # the layered layout: train_student.py imports it from engine.student
    (tmp_path / "train_student.py").write_text("from engine.student import (build_run, run_name)\n")
    benchmark.require_build_run(tmp_path, "layered")
    for text in ("import engine.student\n", "def build_run(:\n"):  # not the name itself; not Python
        (tmp_path / "train_student.py").write_text(text)
        with pytest.raises(UserError, match="no build_run"):
            benchmark.require_build_run(tmp_path, "other")


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
                           "--baseline_ref", BEFORE_REFACTOR, "--no_loader_check", "--expect", MET, "--json", str(out)],
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
    # the expectation is checked against the commit's code, the same command line
    assert [(c["expect"], c["value"], c["met"]) for c in saved["expectations"]] == [
        (MET, saved["ratios"][0]["images_per_s_ratio"], True)]
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


def test_the_training_loop_is_named_in_one_place():
    """train_one_epoch, StepBudget and check_finite (whose home may move) are used by loop_step and
    check_terms alone, so that a change of the loop's interface is a change there."""
    tree = ast.parse(SCRIPT.read_text())
    users = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
             for sub in ast.walk(node) if isinstance(sub, (ast.Attribute, ast.Name))
             and {getattr(sub, "attr", None), getattr(sub, "id", None)} & {"train_one_epoch", "StepBudget", "check_finite"}}
    assert users == {"loop_step", "check_terms"}
