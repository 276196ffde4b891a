"""scripts/summarize.py: paper-table parser, grouping, Markdown/CSV tables and plots on fake runs."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import summarize  # noqa: E402
from engine.results import RESULTS_VERSION  # noqa: E402

PAIR = "resnet32x4->resnet8x4"
CRD_LAST = [75.0, 75.5, 76.0]
CRD_BEST = [75.4, 76.0, 76.1]
KD_LAST = [73.1, 73.6]


def write_run(folder: Path, *, label: str, model: str, model_t: str | None, trial: int, last: float,
              best: float, status: str = "finished", dataset: str = "cifar100", epochs: int = 3,
              args: dict | None = None, **fields) -> None:
    """A results.json as engine/logger.py writes it, with a history that ends at ``last``; ``args``
    (the recorded options; none by default, as in records older than them) and other ``fields``."""
    role = "student" if model_t else "teacher"
    name = f"S:{model}_T:{model_t}_{dataset}_{label}_{trial}" if model_t else f"{model}_{dataset}_trial_{trial}"
    history = [{"epoch": e, "test_acc": last - 2.0 * (epochs - e), "test_acc_top5": 95.0, "train_loss": 1.0 / e}
               for e in range(1, epochs + 1)]
    data = {"role": role, "method": label.split("+")[0] if model_t else "vanilla", "label": label,
            "model": model, "model_t": model_t, "pair": f"{model_t}->{model}" if model_t else model,
            "dataset": dataset, "trial": str(trial), "seed": trial, "status": status, "history": history,
            "last_acc": last, "best_acc": best, "last_acc_top5": 95.0, "best_acc_top5": 95.0,
            "wall_time_s": 1.0, "images_per_s": 100.0, "commit": None, "device": "cpu", **fields}
    if args is not None:
        data["args"] = {"epochs": epochs, "trial": trial, "seed": trial, "dataset": dataset, **args}
    (folder / name).mkdir(parents=True)
    (folder / name / "results.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("save")
    for trial, (last, best) in enumerate(zip(CRD_LAST, CRD_BEST)):
        write_run(root / "student_model", label="crd", model="resnet8x4", model_t="resnet32x4", trial=trial,
                  last=last, best=best)
    for trial, last in enumerate(KD_LAST):
        write_run(root / "student_model", label="kd", model="resnet8x4", model_t="resnet32x4", trial=trial,
                  last=last, best=last + 0.2)
    write_run(root / "models", label="vanilla", model="resnet32x4", model_t=None, trial=0, last=79.0, best=79.3)
    write_run(root / "models", label="vanilla", model="resnet8x4", model_t=None, trial=0, last=72.0, best=72.4)
    write_run(root / "models", label="vanilla", model="resnet56", model_t=None, trial=0, last=72.0, best=72.5)
    # a pair the paper does not have
    write_run(root / "student_model", label="crd+kd", model="resnet8", model_t="resnet14", trial=0,
              last=60.0, best=61.0)
    # left out: still running, another data set; skipped with a warning: broken JSON
    write_run(root / "student_model", label="crd", model="resnet8x4", model_t="resnet32x4", trial=9,
              last=10.0, best=10.0, status="running")
    write_run(root / "student_model", label="crd", model="resnet8x4", model_t="resnet32x4", trial=0,
              last=40.0, best=41.0, dataset="synthetic")
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text('{"label": "crd", "pair": ')
    return root


@pytest.fixture(scope="module")
def summary(runs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert summarize.main([str(runs_dir), "--out", str(out)]) == 0
    md = (out / "summary.md").read_text()
    with open(out / "summary.csv", newline="") as f:
        rows = {(r["dataset"], r["pair"], r["method"]): r for r in csv.DictReader(f)}
    return out, md, rows


def md_section(md: str, dataset: str) -> str:
    """The section of summary.md for one data set (from its heading to the next)."""
    parts = md.split("\n## ")
    found = [part for part in parts[1:] if part.startswith(f"{dataset}: ")]
    assert len(found) == 1, f"no section {dataset} in\n{md}"
    return "## " + found[0]


def md_row(md: str, pair: str, method: str) -> list[str]:
    """The cells of the Markdown row for (pair, method)."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:2] == [pair.replace("->", "→"), method]:
            return cells
    raise AssertionError(f"no row {pair} {method} in\n{md}")


def test_paper_table_parser():
    paper = summarize.parse_paper_tables((ROOT / "scripts" / "paper_tables.md").read_text())
    assert summarize.paper_value(paper, "wrn_40_2->wrn_16_2", "dkd") == 76.24
    assert summarize.paper_value(paper, "resnet32x4->resnet8x4", "crd") == 75.51
    assert summarize.paper_value(paper, "resnet32x4->resnet8x4", "crd+kd") == 75.46
    assert summarize.paper_value(paper, "resnet32x4->ShuffleV2", "rrd+kd") == 76.83
    assert summarize.paper_value(paper, "resnet32x4->resnet8x4", "srrl") == 75.39
    assert summarize.paper_value(paper, "vgg13->vgg8", "srrl") is None  # published for another student only
    assert summarize.paper_value(paper, "vgg13->vgg8", "ickd+kd") == 73.88
    assert summarize.paper_value(paper, "resnet32x4->resnet8x4", "simkd") == 78.08
    assert summarize.paper_value(paper, "ResNet50->MobileNetV2", "teacher") == 79.34
    assert ("wrn_40_2->wrn_40_1", "fsp") in paper.values                       # "n/a" cell
    assert summarize.paper_value(paper, "wrn_40_2->wrn_40_1", "fsp") is None
    assert summarize.paper_value(paper, "resnet110->resnet32", "wcord+kd") is None  # "–" cell
    assert summarize.paper_value(paper, "vgg13->MobileNetV2", "fsp") is None       # no such row
    assert len(paper.pairs) == 13 and paper.pairs[0] == "wrn_40_2->wrn_16_2"
    assert paper.methods[:3] == ["teacher", "student", "kd"] and "dkd" in paper.methods
    # a model alone: its teacher/student number where the columns agree
    assert summarize.paper_value(paper, "resnet56", "vanilla") == 72.34
    assert summarize.paper_value(paper, "resnet14", "vanilla") is None


def test_markdown_rows(summary):
    _, whole, _ = summary
    md = md_section(whole, "cifar100")
    n, last, best, paper, diff = md_row(md, PAIR, "crd")[2:]
    assert (n, last, paper, diff) == ("3", "75.50 ± 0.50", "75.51", "-0.01")
    assert best == f"{statistics.fmean(CRD_BEST):.2f} ± {statistics.stdev(CRD_BEST):.2f}"
    assert md_row(md, PAIR, "kd")[2:] == ["2", "73.35 ± 0.35", "73.55 ± 0.35", "73.33", "+0.02"]
    # vanilla runs are the teacher and student rows; one trial has no spread
    assert md_row(md, PAIR, "teacher")[2:] == ["1", "79.00 ± –", "79.30 ± –", "79.42", "-0.42"]
    assert md_row(md, PAIR, "student")[2:] == ["1", "72.00 ± –", "72.40 ± –", "72.50", "-0.50"]
    # a paper method we did not run, and a paper cell that is empty: gaps, not errors
    assert md_row(md, PAIR, "fsp")[2:] == ["0", "–", "–", "72.62", "–"]
    assert md_row(md, "resnet14->resnet8", "crd+kd")[2:] == ["1", "60.00 ± –", "61.00 ± –", "–", "–"]
    # a vanilla model in none of our pairs: a row of its own, with its paper number
    assert md_row(md, "resnet56", "vanilla")[2:] == ["1", "72.00 ± –", "72.50 ± –", "72.34", "-0.34"]
    # only the pairs we ran; the paper's order of methods
    assert "wrn_40_2→wrn_16_2" not in md
    methods = [line.split("|")[2].strip() for line in md.splitlines() if line.startswith(f"| {PAIR.replace('->', '→')} ")]
    assert methods[:4] == ["teacher", "student", "kd", "hint"] and methods[-6:] == ["srrl", "semckd", "simkd", "ickd", "ickd+kd", "dist"]
    assert len(methods) == 28 and md_row(md, PAIR, "rrd")[2:] == ["0", "–", "–", "74.48", "–"]
    assert "ddof=1" in whole and "- 1 unfinished run(s) left out" in whole and "another data set" not in whole
    assert "- 10 run(s) counted from" in whole and "(cifar100 9, synthetic 1)" in whole


def test_one_section_per_dataset(summary):
    _, md, rows = summary
    assert [line for line in md.splitlines() if line.startswith("## ")] == [
        "## cifar100: 9 run(s), beside the published numbers (scripts/paper_tables.md)", "## synthetic: 1 run(s)"]
    synthetic = md_section(md, "synthetic")
    header = next(line for line in synthetic.splitlines() if line.startswith("| pair"))
    assert "paper" not in header  # paper_tables.md is CIFAR-100's
    assert md_row(synthetic, PAIR, "crd")[2:] == ["1", "40.00 ± –", "41.00 ± –"]
    assert md_row(md_section(md, "cifar100"), PAIR, "crd")[2] == "3"  # the synthetic run is not a cifar100 trial
    assert rows[("synthetic", PAIR, "crd")]["last_mean"] == "40.0" and rows[("synthetic", PAIR, "crd")]["paper"] == ""
    assert {d for d, _, _ in rows} == {"cifar100", "synthetic"}


def test_csv_values(summary):
    _, _, all_rows = summary
    rows = {(pair, method): row for (dataset, pair, method), row in all_rows.items() if dataset == "cifar100"}
    crd = rows[(PAIR, "crd")]
    assert int(crd["n"]) == 3 and crd["trials"] == "0;1;2"
    assert float(crd["last_mean"]) == statistics.fmean(CRD_LAST)
    assert float(crd["last_std"]) == statistics.stdev(CRD_LAST)
    assert float(crd["best_mean"]) == statistics.fmean(CRD_BEST)
    assert float(crd["best_std"]) == statistics.stdev(CRD_BEST)
    assert float(crd["paper"]) == 75.51
    assert float(crd["diff"]) == statistics.fmean(CRD_LAST) - 75.51
    assert (crd["teacher"], crd["student"]) == ("resnet32x4", "resnet8x4")
    teacher = rows[(PAIR, "teacher")]
    assert float(teacher["last_mean"]) == 79.0 and teacher["last_std"] == "" and float(teacher["paper"]) == 79.42
    fsp = rows[(PAIR, "fsp")]
    assert fsp["n"] == "0" and fsp["last_mean"] == "" and fsp["diff"] == "" and float(fsp["paper"]) == 72.62
    assert rows[("resnet14->resnet8", "crd+kd")]["paper"] == ""


def test_plots(summary):
    from PIL import Image
    out, _, _ = summary
    for name in ("accuracy_resnet32x4_to_resnet8x4.png", "curves_resnet32x4_to_resnet8x4.png",
                 "accuracy_resnet14_to_resnet8.png", "curves_resnet56.png",
                 "accuracy_synthetic_resnet32x4_to_resnet8x4.png", "curves_synthetic_resnet32x4_to_resnet8x4.png"):
        path = out / name
        assert path.stat().st_size > 0, name
        with Image.open(path) as image:
            image.verify()
    with Image.open(out / "curves_resnet32x4_to_resnet8x4.png") as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_command_line(runs_dir, tmp_path):
    folder = tmp_path / "save"
    subprocess.run(["cp", "-r", str(runs_dir), str(folder)], check=True)
    done = subprocess.run([sys.executable, "scripts/summarize.py", str(folder)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| resnet32x4→resnet8x4 | crd | 3 | 75.50 ± 0.50 |" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "broken" in warnings[0]
    assert {"summary.md", "summary.csv", "accuracy_resnet32x4_to_resnet8x4.png"} <= {p.name for p in folder.iterdir()}


def test_dataset_filter_and_running(runs_dir, tmp_path):
    assert summarize.main([str(runs_dir), "--out", str(tmp_path / "syn"), "--dataset", "synthetic"]) == 0
    md = (tmp_path / "syn" / "summary.md").read_text()
    assert [line for line in md.splitlines() if line.startswith("## ")] == ["## synthetic: 1 run(s)"]
    header = next(line for line in md.splitlines() if line.startswith("| pair"))
    assert "paper" not in header and md_row(md, PAIR, "crd")[2:] == ["1", "40.00 ± –", "41.00 ± –"]
    assert "10 run(s) of another data set left out (cifar100; see --dataset)" in md
    assert sorted(p.name for p in (tmp_path / "syn").glob("*.png")) == [
        "accuracy_synthetic_resnet32x4_to_resnet8x4.png", "curves_synthetic_resnet32x4_to_resnet8x4.png"]
    assert summarize.main([str(runs_dir), "--out", str(tmp_path / "c"), "--dataset", "cifar100", "--no_plots"]) == 0
    md = (tmp_path / "c" / "summary.md").read_text()
    assert [line.split(":")[0] for line in md.splitlines() if line.startswith("## ")] == ["## cifar100"]
    assert "1 run(s) of another data set left out (synthetic; see --dataset)" in md
    assert summarize.main([str(runs_dir), "--out", str(tmp_path / "all"), "--include_running", "--no_plots"]) == 0
    md = (tmp_path / "all" / "summary.md").read_text()
    # a finished run is never pooled with an unfinished one: the running run is a row of its own
    assert md_row(md_section(md, "cifar100"), PAIR, "crd (status finished)")[2:4] == ["3", "75.50 ± 0.50"]
    assert md_row(md_section(md, "cifar100"), PAIR, "crd (status running)")[2:4] == ["1", "10.00 ± –"]
    assert summarize.main([str(runs_dir), "--out", str(tmp_path / "none"), "--dataset", "imagenet"]) == 1


def test_dataset_from_args_and_unknown(tmp_path):
    """Runs that record the data set only in ``args``, or not at all, get sections of their own."""
    write_run(tmp_path / "runs", label="kd", model="resnet8", model_t="resnet14", trial=0, last=50.0, best=51.0,
              dataset="imagenet")
    write_run(tmp_path / "runs", label="kd", model="resnet8", model_t="resnet14", trial=1, last=30.0, best=31.0,
              dataset="old")
    for folder, args in (("imagenet", {"dataset": "imagenet"}), ("old", {})):
        path = next((tmp_path / "runs").glob(f"*_{folder}_kd_*")) / "results.json"
        data = json.loads(path.read_text())
        del data["dataset"]
        data["args"] = args
        path.write_text(json.dumps(data))
    assert summarize.main([str(tmp_path / "runs"), "--no_plots"]) == 0
    md = (tmp_path / "runs" / "summary.md").read_text()
    assert [line for line in md.splitlines() if line.startswith("## ")] == ["## imagenet: 1 run(s)",
                                                                           "## unknown: 1 run(s)"]
    assert md_row(md_section(md, "imagenet"), "resnet14->resnet8", "kd")[2:] == ["1", "50.00 ± –", "51.00 ± –"]
    assert md_row(md_section(md, "unknown"), "resnet14->resnet8", "kd")[2:] == ["1", "30.00 ± –", "31.00 ± –"]


def test_plots_skipped_without_matplotlib(runs_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    assert summarize.main([str(runs_dir), "--out", str(tmp_path)]) == 0
    assert "plots skipped" in capsys.readouterr().err
    assert (tmp_path / "summary.md").exists() and not list(tmp_path.glob("*.png"))


def write_probe(folder: Path, *, label: str, model: str, model_t: str | None, target: str, trial: int, last: float,
                best: float | None = None, source_dataset: str = "cifar100", status: str = "finished") -> None:
    """A results.json as transfer_student.py writes it (role transfer; dataset = the target set)."""
    source_role = "student" if model_t else "teacher"
    name = f"{model_t}_{model}_{label}_{target}_probe_trial_{trial}_{source_dataset}"
    data = {"role": "transfer", "method": label.split("+")[0], "label": label, "model": model, "model_t": model_t,
            "pair": f"{model_t}->{model}" if model_t else model, "dataset": target, "target": target,
            "trial": str(trial), "status": status, "last_acc": last, "best_acc": best if best is not None else last,
            "history": [{"epoch": 1, "test_acc": last}],
            "source": {"role": source_role, "label": label, "model": model, "model_t": model_t,
                       "dataset": source_dataset}}
    (folder / name).mkdir(parents=True)
    (folder / name / "results.json").write_text(json.dumps(data))


def test_transfer_table(tmp_path):
    root = tmp_path / "save"
    pair = "wrn_40_2->wrn_16_2"
    stl = {"crd": [71.0, 72.0, 73.0], "kd": [70.0]}
    for label, values in stl.items():
        for trial, last in enumerate(values):
            write_probe(root / "transfer", label=label, model="wrn_16_2", model_t="wrn_40_2", target="stl10",
                        trial=trial, last=last, best=last + 1)
    write_probe(root / "transfer", label="crd+kd", model="wrn_16_2", model_t="wrn_40_2", target="tinyimagenet",
                trial=0, last=35.0)
    # vanilla networks: the pair's teacher and its student trained alone
    write_probe(root / "transfer", label="vanilla", model="wrn_40_2", model_t=None, target="stl10", trial=0, last=68.0)
    write_probe(root / "transfer", label="vanilla", model="wrn_16_2", model_t=None, target="stl10", trial=0, last=69.0)
    # a probe of a network trained on another set, and a running one (left out)
    write_probe(root / "transfer", label="kd", model="resnet8", model_t="resnet14", target="synthetic", trial=0,
                last=50.0, source_dataset="synthetic")
    write_probe(root / "transfer", label="crd", model="wrn_16_2", model_t="wrn_40_2", target="stl10", trial=9,
                last=1.0, status="running")
    # an ordinary distillation run: its table is as before, the probes are not in it
    write_run(root / "student_model", label="crd", model="resnet8x4", model_t="resnet32x4", trial=0, last=75.0,
              best=75.4)
    out = tmp_path / "out"
    assert summarize.main([str(root), "--out", str(out), "--no_plots"]) == 0
    md = (out / "summary.md").read_text()
    assert "stl10" not in md_section(md, "cifar100") and md_row(md_section(md, "cifar100"), PAIR, "crd")[2] == "1"
    section = md.split("## transfer: wrn_40_2→wrn_16_2 trained on cifar100")[1].split("\n## ")[0]
    rows = {cells[0]: cells for cells in (table_cells for table_cells in
            ([c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
             if line.startswith("|")))}
    assert rows["method"] == ["method", "stl10 (n)", "paper", "Δ", "tinyimagenet (n)", "paper", "Δ"]
    assert rows["crd"] == ["crd", "72.00 ± 1.00 (3)", "71.60", "+0.40", "–", "35.60", "–"]
    assert rows["kd"][1:4] == ["70.00 ± – (1)", "70.90", "-0.90"]
    assert rows["teacher"][1:4] == ["68.00 ± – (1)", "68.60", "-0.60"]
    assert rows["student"][1:4] == ["69.00 ± – (1)", "69.70", "-0.70"]
    assert rows["crd+kd"][4:] == ["35.00 ± – (1)", "35.50", "-0.50"]
    assert rows["dcd+kd"] == ["dcd+kd", "–", "72.50", "–", "–", "36.20", "–"]       # published, not run
    assert [name for name in rows if name not in ("method", "---")][:3] == ["teacher", "student", "kd"]   # the paper's order
    assert "## transfer: resnet14→resnet8 trained on synthetic" in md
    with open(out / "transfer.csv", newline="") as f:
        table = {(r["source_dataset"], r["pair"], r["method"], r["target"]): r for r in csv.DictReader(f)}
    crd = table[("cifar100", pair, "crd", "stl10")]
    assert crd["n"] == "3" and float(crd["last_mean"]) == 72.0 and float(crd["best_mean"]) == 73.0
    assert float(crd["diff"]) == pytest.approx(0.4) and crd["trials"] == "0;1;2"
    assert table[("synthetic", "resnet14->resnet8", "kd", "synthetic")]["paper"] == ""
    paper = summarize.parse_paper_tables((ROOT / "scripts" / "paper_tables.md").read_text())
    assert paper.transfer[(pair, "hint", "tinyimagenet")] == 33.5 and paper.targets == ["stl10", "tinyimagenet"]
    assert (pair, "teacher") in paper.values and paper.values[(pair, "teacher")] == 75.61  # the CIFAR table unchanged


@contextlib.contextmanager
def fails_after(seconds: int):
    """Fail the test instead of hanging if the block blocks (e.g. opening a FIFO) for ``seconds``."""
    def blocked(signum, frame):
        pytest.fail(f"blocked for {seconds} s (a FIFO opened?)")
    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def set_fields(path: Path, **fields) -> None:
    """Change fields of a results.json written by :func:`write_run`."""
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def test_bad_results_files_are_skipped_with_one_warning_each(tmp_path, capsys, monkeypatch):
    root = tmp_path / "save"
    write_run(root, label="kd", model="resnet8x4", model_t="resnet32x4", trial=0, last=73.0, best=73.5)
    (good,) = root.glob("*/results.json")
    base = good.read_text()[:-1]   # the good record without its closing brace, to append a field to
    bad = {   # folder -> (contents, or a maker) and what its warning says
        "huge_int": (base + ', "last_acc": 1' + "0" * 5000 + "}", "an integer of 5001 digits"),
        "int_as_float_overflows": (base + ', "best_acc": 1' + "0" * 400 + "}", "an integer of 401 digits"),
        "float_out_of_range": (base + ', "last_acc": 1e308}', "not a top-1 percentage"),
        "deep": ('{"label": "kd", "pair": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        "label_list": (base + ', "label": ["kd"]}', "its label is a JSON array"),
        "not_utf8": (b'{"label": "\xff"}', "can't decode"),
        "broken": ('{"label": "crd", "pair": ', "Expecting value"),
        "too_large": (base + ', "pad": "' + "x" * 300_000 + '"}', "over 0.25 MiB: too large for a results.json"),
        "fifo": (lambda p: os.mkfifo(p), "a FIFO, not a regular file"),
        "link_to_fifo": (lambda p: p.symlink_to(root / "fifo" / "results.json"), "a FIFO, not a regular file"),
        "folder": (lambda p: p.mkdir(), "a folder, not a regular file"),
    }
    for name, (contents, _) in bad.items():
        (root / name).mkdir()
        path = root / name / "results.json"
        if callable(contents):
            contents(path)
        else:
            (path.write_bytes if isinstance(contents, bytes) else path.write_text)(contents)
    monkeypatch.setattr(summarize, "MAX_RESULTS_BYTES", 256 << 10)
    with fails_after(20):
        assert summarize.main([str(root), "--out", str(tmp_path / "out"), "--no_plots"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(bad), err
    for name, (_, reason) in bad.items():
        (line,) = [w for w in warnings if f"{root / name / 'results.json'}:" in w]
        assert reason in line, line
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md_row(md, PAIR, "kd")[2:5] == ["1", "73.00 ± –", "73.50 ± –"] and "- 1 run(s) counted from" in md


def test_text_cells_are_neutralised_in_csv_and_markdown(tmp_path):
    root = tmp_path / "save"
    labels = ["=1+2", "+cmd", "-2+3", "@sum(a1)", "\tkd", "\rkd", "a|b\nc"]
    for trial, label in enumerate(labels):
        write_run(root / str(trial), label="crd", model="resnet8", model_t="resnet14", trial=trial, last=60.0,
                  best=61.0)
        (path,) = (root / str(trial)).glob("*/results.json")
        set_fields(path, label=label, trial=str(-trial) if trial < 2 else f"{trial};=x")
    write_run(root, label="kd", model="resnet8x4", model_t="resnet32x4", trial=0, last=73.0, best=73.5)
    assert summarize.main([str(root), "--out", str(tmp_path / "out"), "--no_plots"]) == 0
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    for label in labels:
        expected = label if label[0] not in "=+-@\t\r" else "'" + label
        assert expected in rows, sorted(rows)
    assert rows["'=1+2"]["trials"] == "0" and rows["'+cmd"]["trials"] == "-1"   # a plain number stays a number
    assert rows["'-2+3"]["trials"] == "2;=x" and rows["'@sum(a1)"]["trials"] == "3;=x"   # quoted: one cell
    raw = (tmp_path / "out" / "summary.csv").read_text()
    assert '"\'=1+2"' in raw and ',"2;=x"' in raw and '"resnet32x4->resnet8x4"' in raw
    kd = next(line for line in raw.splitlines() if ',"kd",' in line)
    assert ",1,73.0,\"\",73.5," in kd and float(rows["kd"]["diff"]) < 0 and ",-0.3" in kd   # numbers stay bare
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| resnet14→resnet8 | a\\|b c | 1 |" in md and "| resnet14→resnet8 | =1+2 | 1 |" in md


# ----------------------------------------------------------------------------- one row per configuration

PAIR_T = "resnet14->resnet8"   # the teacher rows are the vanilla resnet14 runs
TEACHER_ARGS = {"model": "resnet14", "synthetic_classes": 100, "learning_rate": 0.05, "print_freq": 100,
                "save_folder": "save/models", "num_workers": 0, "device": "auto", "command": ["--epochs", "6"]}
STUDENT_ARGS = {"model_s": "resnet8", "distill": "crd", "gamma": 1.0, "alpha": 1.0, "beta": 0.8, "nce_k": 4096,
                "synthetic_classes": 100, "path_t": "save/demo/teacher/resnet14_last.pth", "save_folder": "save"}


@pytest.fixture(scope="module")
def configurations_dir(tmp_path_factory) -> Path:
    """The issue's examples: three resnet14 teachers of other class counts and epochs, CRD+KD at
    -a 1 (3 trials, from two teacher files with the same weights) and a -a 0.5 smoke run, a KD run
    that records no options (an old record), and a KD run recording an option the others do not."""
    root = tmp_path_factory.mktemp("configs")
    teachers = [("demo", 6, 100, 72.35), ("transfer", 5, 20, 20.0), ("try", 3, 100, 9.5)]
    for folder, epochs, classes, last in teachers:
        write_run(root / folder, label="vanilla", model="resnet14", model_t=None, trial=0, last=last, best=last,
                  dataset="synthetic", epochs=epochs, args={**TEACHER_ARGS, "synthetic_classes": classes,
                                                            "save_folder": f"save/{folder}"})
    for trial, last in zip((1, 2, 3), (57.0, 58.0, 59.0)):   # trials differ in trial, seed and free flags only
        write_run(root / "crdkd", label="crd+kd", model="resnet8", model_t="resnet14", trial=trial, last=last,
                  best=last, dataset="synthetic", teachers=["ab" * 32],
                  args={**STUDENT_ARGS, "num_workers": trial, "path_t": f"copy{trial}/resnet14_last.pth"})
    write_run(root / "smoke", label="crd+kd", model="resnet8", model_t="resnet14", trial=0, last=30.0, best=31.0,
              dataset="synthetic", teachers=["ab" * 32], args={**STUDENT_ARGS, "alpha": 0.5})
    write_run(root / "kd_old", label="kd", model="resnet8", model_t="resnet14", trial=0, last=50.0, best=50.0,
              dataset="synthetic")
    for trial, extra in ((1, {}), (2, {"new_option": 3})):
        write_run(root / "kd", label="kd", model="resnet8", model_t="resnet14", trial=trial, last=52.0 + trial,
                  best=54.0, dataset="synthetic", args={**STUDENT_ARGS, "distill": "kd", **extra})
    return root


def summarize_into(folder: Path, out: Path, *flags: str) -> tuple[str, dict]:
    """Run the summary of ``folder`` into ``out``: summary.md and the CSV rows by (pair, method, setting)."""
    assert summarize.main([str(folder), "--out", str(out), "--no_plots", *flags]) == 0
    with open(out / "summary.csv", newline="") as f:
        rows = {(r["pair"], r["method"], r["setting"]): r for r in csv.DictReader(f)}
    return (out / "summary.md").read_text(), rows


def test_runs_of_other_configurations_are_rows_of_their_own(configurations_dir, tmp_path, capsys):
    md, rows = summarize_into(configurations_dir, tmp_path)
    printed = capsys.readouterr().out
    # the row "33.94 ± 23.80" pooled three teachers: now one row each, named by what differs
    assert md_row(md, PAIR_T, "teacher (--epochs 3, --synthetic_classes 100)")[2:4] == ["1", "9.50 ± –"]
    assert md_row(md, PAIR_T, "teacher (--epochs 5, --synthetic_classes 20)")[2:4] == ["1", "20.00 ± –"]
    assert md_row(md, PAIR_T, "teacher (--epochs 6, --synthetic_classes 100)")[2:4] == ["1", "72.35 ± –"]
    note = ("- resnet14→resnet8 teacher (synthetic): 3 rows: their runs differ in --epochs (3, 5, 6); --synthetic_classes "
            "(20, 100) (--pool or --group_by pools them)")
    assert note in md.splitlines() and note in printed.splitlines()
    # the -a 0.5 smoke run is not averaged with CRD+KD; trials (trial, seed, --num_workers, --path_t) are
    pair = PAIR_T
    assert md_row(md, pair, "crd+kd (-a 1.0)")[2:4] == ["3", "58.00 ± 1.00"]
    assert md_row(md, pair, "crd+kd (-a 0.5)")[2:4] == ["1", "30.00 ± –"]
    assert "- resnet14→resnet8 crd+kd (synthetic): 2 rows: their runs differ in -a (0.5, 1.0) (--pool" in md
    # a record without options is a row of its own; an option only some runs record is pooled over, and said
    assert md_row(md, pair, "kd (options not recorded)")[2:4] == ["1", "50.00 ± –"]
    assert md_row(md, pair, "kd (pooled: --new_option not recorded/3)")[2:4] == ["2", "53.50 ± 0.71"]
    assert "- resnet14→resnet8 kd (synthetic): 2 runs pooled over --new_option not recorded/3" in md
    crd = rows[(pair, "crd+kd", "alpha=1.0")]
    assert crd["n"] == "3" and crd["trials"] == "1;2;3" and crd["pooled"] == "" and float(crd["last_mean"]) == 58.0
    assert rows[(pair, "kd", "")]["pooled"] == "new_option=not recorded/3"   # CSV: option=value
    assert rows[(pair, "kd", "options=not recorded")]["n"] == "1"
    assert {k[2] for k in rows if k[1] == "teacher"} == {"epochs=3; synthetic_classes=100",
                                                        "epochs=5; synthetic_classes=20",
                                                        "epochs=6; synthetic_classes=100"}


def test_other_teacher_weights_and_epochs_split_rows(configurations_dir, tmp_path):
    root = tmp_path / "save"
    subprocess.run(["cp", "-r", str(configurations_dir / "crdkd"), str(root)], check=True)
    write_run(root / "other", label="crd+kd", model="resnet8", model_t="resnet14", trial=4, last=40.0, best=40.0,
              dataset="synthetic", teachers=["cd" * 32], args=STUDENT_ARGS)
    write_run(root / "short", label="crd+kd", model="resnet8", model_t="resnet14", trial=1, last=20.0, best=20.0,
              dataset="synthetic", teachers=["ab" * 32], args=STUDENT_ARGS, epochs=1)
    md, _ = summarize_into(root, tmp_path / "out")
    pair = PAIR_T
    assert md_row(md, pair, "crd+kd (--epochs 1, the teacher's weights abababab)")[2:4] == ["1", "20.00 ± –"]
    assert md_row(md, pair, "crd+kd (--epochs 3, the teacher's weights abababab)")[2:4] == ["3", "58.00 ± 1.00"]
    assert md_row(md, pair, "crd+kd (--epochs 3, the teacher's weights cdcdcdcd)")[2:4] == ["1", "40.00 ± –"]
    md, _ = summarize_into(root, tmp_path / "pooled", "--pool", "teachers")
    assert md_row(md, pair, "crd+kd (--epochs 3) (pooled: the teacher's weights abababab/cdcdcdcd)")[2:4] == [
        "4", f"53.50 ± {statistics.stdev([57.0, 58.0, 59.0, 40.0]):.2f}"]


def test_group_by_pools_rows_and_names_what_it_pooled(configurations_dir, tmp_path):
    md, rows = summarize_into(configurations_dir, tmp_path / "pm", "--group_by", "pair,method")
    cells = md_row(md, PAIR_T, "teacher (pooled: --epochs 3/5/6, --synthetic_classes 20/100)")
    assert cells[2:4] == ["3", f"{statistics.fmean([72.35, 20.0, 9.5]):.2f} ± {statistics.stdev([72.35, 20.0, 9.5]):.2f}"]
    assert "- resnet14→resnet8 teacher (synthetic): 3 runs pooled over --epochs 3/5/6, --synthetic_classes 20/100" in md
    assert md_row(md, PAIR_T, "crd+kd (pooled: -a 0.5/1.0)")[2] == "4"
    assert md_row(md, PAIR_T, "kd (pooled: --new_option not recorded/3, options not recorded by 1 "
                                           "run(s))")[2] == "3"
    assert rows[(PAIR_T, "teacher", "")]["pooled"] == "epochs=3/5/6; synthetic_classes=20/100"
    # a row by the options named: --synthetic_classes, -a (as train_student.py spells it, or alpha)
    md, _ = summarize_into(configurations_dir, tmp_path / "e", "--group_by", "synthetic_classes,-a")
    assert md_row(md, PAIR_T, "teacher (--synthetic_classes 20)")[2:4] == ["1", "20.00 ± –"]
    assert md_row(md, PAIR_T, "teacher (--synthetic_classes 100) (pooled: --epochs 3/6)")[2] == "2"
    assert md_row(md, PAIR_T, "crd+kd (-a 0.5)")[2] == "1" and md_row(md, PAIR_T, "crd+kd (-a 1.0)")[2] == "3"
    # the record without options
    assert md_row(md, PAIR_T, "kd (-a not recorded, --synthetic_classes not recorded)")[2] == "1"
    assert md_row(md, PAIR_T, "kd (-a 1.0, --synthetic_classes 100) (pooled: --new_option not recorded/3)")[2] == "2"


def test_bad_group_by_is_one_line(configurations_dir, tmp_path, capsys):
    for flags, message in ((["--group_by", "epoch"], "error: --group_by epoch: no run records such an option "
                                                     "(did you mean epochs?)"),
                           (["--pool=--nce_kk"], "error: --pool nce_kk: no run records such an option "
                                                 "(did you mean nce_k?)"),
                           (["--pool", "status"], "error: --pool status: a finished run is never pooled with an "
                                                  "unfinished one"),
                           (["--group_by", ","], "error: --group_by names no option (e.g. --group_by epochs)")):
        assert summarize.main([str(configurations_dir), "--out", str(tmp_path), "--no_plots", *flags]) == 2
        printed = capsys.readouterr()
        assert (printed.err.splitlines(), printed.out) == ([message], ""), flags
    assert not list(tmp_path.iterdir())   # nothing written
    done = subprocess.run([sys.executable, "scripts/summarize.py", str(configurations_dir), "--group_by", "epoch"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "error: --group_by epoch: no run records such an option (did you mean epochs?)"]


def test_transfer_rows_by_probe_recipe(tmp_path):
    root = tmp_path / "save"
    recipe = {"epochs": 120, "learning_rate": 0.05, "batch_size": 64, "path_s": "x/wrn_16_2_last.pth",
              "source_run": "x", "no_augment": False}
    for folder, target, trial, last, epochs in (("a", "stl10", 0, 71.0, 120), ("a", "stl10", 1, 73.0, 120),
                                                ("a", "tinyimagenet", 0, 35.0, 120), ("b", "stl10", 0, 40.0, 10)):
        write_probe(root / folder, label="crd", model="wrn_16_2", model_t="wrn_40_2", target=target, trial=trial,
                    last=last)
        (path,) = (root / folder).glob(f"*_{target}_probe_trial_{trial}_*/results.json")
        set_fields(path, args={**recipe, "epochs": epochs, "dataset": target, "trial": trial,
                               "path_s": f"run{trial}/wrn_16_2_last.pth", "source_run": f"run{trial}"})
    out = tmp_path / "out"
    assert summarize.main([str(root), "--out", str(out), "--no_plots"]) == 0
    md = (out / "summary.md").read_text()
    section = md.split("## transfer: wrn_40_2→wrn_16_2 trained on cifar100")[1]
    rows = {c[0]: c for c in ([x.strip() for x in line.strip().strip("|").split("|")] for line in section.splitlines()
                              if line.startswith("|"))}
    # one row per recipe; the target set is the column, the probed network (path_s) the trial
    assert rows["crd (--epochs 10)"][1:2] == ["40.00 ± – (1)"]
    assert rows["crd (--epochs 120)"][1:2] == ["72.00 ± 1.41 (2)"] and rows["crd (--epochs 120)"][4] == "35.00 ± – (1)"
    assert "- transfer wrn_40_2→wrn_16_2 crd (trained on cifar100): 2 rows: their runs differ in --epochs (10, 120)" in md
    with open(out / "transfer.csv", newline="") as f:
        table = [(r["method"], r["setting"], r["target"], r["n"]) for r in csv.DictReader(f) if r["method"] == "crd"]
    assert table == [("crd", "epochs=10", "stl10", "1"), ("crd", "epochs=10", "tinyimagenet", "0"),
                     ("crd", "epochs=120", "stl10", "2"), ("crd", "epochs=120", "tinyimagenet", "1")]


# ----------------------------------------------------------------------------- plots' numbers


def fake_run(last: float, epochs: int = 3, trial: str = "0") -> summarize.Run:
    return summarize.Run(path=Path("r"), label="kd", pair=PAIR, model="resnet8x4", model_t="resnet32x4",
                         dataset="cifar100", trial=trial, status="finished", last_acc=last, best_acc=last,
                         curve={e: last - (epochs - e) for e in range(1, epochs + 1)})


def test_curve_averages_only_the_epochs_every_run_has():
    runs = [fake_run(50.0, epochs=3), fake_run(60.0, epochs=5)]
    epochs, accs, cut = summarize.mean_curve(runs)
    assert epochs == [1, 2, 3] and accs == [(48.0 + 56.0) / 2, (49.0 + 57.0) / 2, (50.0 + 58.0) / 2] and cut
    assert summarize.mean_curve([fake_run(50.0), fake_run(52.0)])[2] is False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = summarize.curves_figure(PAIR, [summarize.Row(PAIR, "kd", runs)])
    (line,) = fig.axes[0].lines
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == accs
    assert line.get_label() == "kd (n=2, epochs all runs have)"
    plt.close(fig)


def test_bar_chart_starts_at_zero_and_keeps_error_bars_inside():
    high = summarize.Row(PAIR, "crd", [fake_run(v, trial=str(i)) for i, v in enumerate((99.0, 100.0, 95.0))], paper=75.5)
    low = summarize.Row(PAIR, "kd", [fake_run(v, trial=str(i)) for i, v in enumerate((0.5, 5.0, 0.0))])
    one = summarize.Row(PAIR, "fitnet", [fake_run(30.0)])
    bars = summarize.bar_chart([high, low, one, summarize.Row(PAIR, "fsp", [], paper=72.6)])
    std_high, std_low = statistics.stdev([99.0, 100.0, 95.0]), statistics.stdev([0.5, 5.0, 0.0])
    assert bars.labels == ["crd\n(n=3)", "kd\n(n=3)", "fitnet\n(n=1)"] and bars.ylim == (0.0, 100.0)
    assert bars.means == [98.0, pytest.approx(11 / 6), 30.0]
    assert bars.above == [pytest.approx(2.0), pytest.approx(std_low), 0.0]         # cut at 100
    assert bars.below == [pytest.approx(std_high), pytest.approx(11 / 6), 0.0]    # cut at 0
    assert bars.marks == [(0, 75.5)] and bars.clipped
    assert summarize.bar_chart([one]).ylim == (0.0, 35.0)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = summarize.accuracy_figure(PAIR, [high, low, one])
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 100.0)
    (bars_drawn,) = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    (segments,) = [lines.get_segments() for lines in bars_drawn.lines[2]]
    assert len(segments) == 2 and all(0.0 <= y <= 100.0 for segment in segments for _, y in segment)
    assert [tuple(y for _, y in s) for s in segments] == [pytest.approx((98.0 - std_high, 100.0)),
                                                          pytest.approx((0.0, 11 / 6 + std_low))]
    assert any("cut at 0/100" in label for label in ax.get_legend_handles_labels()[1])
    plt.close(fig)


# ----------------------------------------------------------------------------- the schema's version


def test_a_newer_results_version_is_skipped_with_one_line_and_older_files_are_read(tmp_path, capsys):
    """A results.json written by a newer version of the code (results_version above the one
    summarize knows) may mean its fields differently: it is skipped with one warning naming it and
    the fix; a version that is not a number likewise. A file without a version is version 0."""
    for trial, version in ((0, None), (1, 1), (2, RESULTS_VERSION + 1), (3, "1")):
        fields = {} if version is None else {"results_version": version, "resumable": []}
        write_run(tmp_path / "runs", label="kd", model="resnet8", model_t="resnet14", trial=trial, last=50.0 + trial,
                  best=60.0, **fields)
    assert summarize.main([str(tmp_path / "runs"), "--no_plots"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err
    newer = next(w for w in warnings if "_kd_2" in w)
    assert (f"written by a newer version of the code (results_version {RESULTS_VERSION + 1}; this summarize.py "
            f"reads up to {RESULTS_VERSION}): update the code to summarize it") in newer
    assert 'its results_version "1" is not a version number' in next(w for w in warnings if "_kd_3" in w)
    md = (tmp_path / "runs" / "summary.md").read_text()
    assert md_row(md, "resnet14->resnet8", "kd")[2:4] == ["2", "50.50 ± 0.71"]   # trials 0 (version 0) and 1


def test_a_run_says_which_of_its_options_a_resume_may_change(tmp_path):
    """Runs are pooled over the options their results.json lists as resumable (they cannot change
    what a run computes), and split by the others; a file without the list (version 0) is read with
    the options that were resumable when it was written (e.g. --num_workers)."""
    def run(trial: int, folder: str, resumable: list[str] | None, **args) -> None:
        fields = {} if resumable is None else {"results_version": 1, "resumable": resumable}
        write_run(tmp_path / folder, label="kd", model="resnet8", model_t="resnet14", trial=trial, last=50.0 + trial,
                  best=60.0, args=args, **fields)

    run(0, "listed", ["new_flag"], new_flag=1, num_workers=2)
    run(1, "listed", ["new_flag"], new_flag=2, num_workers=2)
    md, rows = summarize_into(tmp_path / "listed", tmp_path / "out1")
    assert md_row(md, "resnet14->resnet8", "kd")[2:4] == ["2", "50.50 ± 0.71"]
    run(0, "unlisted", [], new_flag=1, num_workers=2)
    run(1, "unlisted", [], new_flag=2, num_workers=2)
    md, rows = summarize_into(tmp_path / "unlisted", tmp_path / "out2")
    assert md_row(md, "resnet14->resnet8", "kd (--new_flag 1)")[2:4] == ["1", "50.00 ± –"]
    assert md_row(md, "resnet14->resnet8", "kd (--new_flag 2)")[2:4] == ["1", "51.00 ± –"]
    run(0, "old", None, num_workers=0)
    run(1, "old", None, num_workers=4)
    md, rows = summarize_into(tmp_path / "old", tmp_path / "out3")
    assert md_row(md, "resnet14->resnet8", "kd")[2:4] == ["2", "50.50 ± 0.71"]
