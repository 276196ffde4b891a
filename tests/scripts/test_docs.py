"""Every command in the README and docs/ works as written: the shell lines of their ```bash
blocks are extracted; training commands on the synthetic set, and evaluations of what they made, run
for real (with tiny-run flags appended), in document order in a scratch folder, so that a command
may use what an earlier one made; the others are parsed by the scripts' own parsers, and the launch
scripts run with DRY_RUN=1."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import eval_student
import train_student
import train_teacher
import transfer_student

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# appended to the commands that run for real: a couple of steps, a small validation set
TINY = ["--max_steps", "2", "--val_subset", "100", "--batch_size", "16"]
EVAL_TINY = TINY[2:]  # the same test set as the runs' validations
SCRIPTS = {"train_teacher.py": train_teacher, "train_student.py": train_student, "transfer_student.py": transfer_student}
DRY_RUN_SCRIPTS = ("run_cifar_vanilla.sh", "run_cifar_distill.sh", "run_imagenet_distill.sh")


@dataclass
class Command:
    doc: str
    line: int
    text: str
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def commands(path: Path) -> list[Command]:
    """The commands of ``path``'s ```bash blocks: continuation lines joined, comments and
    pipes to a pager dropped, leading ``VAR=value`` words split off as the environment."""
    found, block, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        if not pending:
            start = number
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        words = shlex.split(pending.split(" | ")[0], comments=True)
        text, pending = pending.strip(), ""
        if not words:
            continue
        env = {}
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        found.append(Command(path.relative_to(ROOT).as_posix(), start, text, env, words))
    return found


ALL = [c for doc in DOCS for c in commands(doc)]


def test_the_documents_have_commands():
    assert len(ALL) > 30 and {c.doc for c in ALL} >= {"README.md", "docs/usage.md", "docs/reproducing.md"}


def script_and_args(argv: list[str]) -> tuple[str, list[str]]:
    """``train_x.py`` and its arguments, from ``python train_x.py ...`` or ``torchrun ... train_x.py ...``."""
    at = next(i for i, word in enumerate(argv) if word.endswith(".py"))
    return Path(argv[at]).name, argv[at + 1:]


def runs_here(command: Command) -> bool:
    """A training command that runs on this CPU in seconds: on the synthetic set, no GPU."""
    _, args = script_and_args(command.argv)
    return "synthetic" in args and "cuda" not in args


TRAINING = [c for c in ALL if c.argv[0] in ("python", "torchrun") and script_and_args(c.argv)[0] in SCRIPTS]
EVALUATING = [c for c in ALL if c.argv[0] == "python" and c.argv[1] == "eval_student.py"]


def evaluates_here(command: Command) -> bool:
    """An evaluation on the synthetic set: given, or the data set of a synthetic run's checkpoint."""
    opt = eval_student.parse_option(command.argv[2:])
    return opt.dataset == "synthetic" or (opt.dataset is None and "_synthetic_" in opt.path)


@pytest.mark.parametrize("command", [c for c in TRAINING if not runs_here(c)], ids=str)
def test_training_commands_parse(command, capsys):
    script, args = script_and_args(command.argv)
    opt = SCRIPTS[script].parse_option(args)
    assert opt.arch and opt.learning_rate > 0


@pytest.mark.parametrize("command", [c for c in EVALUATING if not evaluates_here(c)], ids=str)
def test_evaluation_commands_parse(command):
    assert eval_student.parse_option(command.argv[2:]).path


def check_evaluation(command: Command) -> None:
    """Run an evaluation of a checkpoint that an earlier command made: a run's last (best)
    checkpoint gives the last (best) test top-1 of its results.json."""
    results = eval_student.main(command.argv[2:] + EVAL_TINY)
    assert results["test_images"] == 100, command
    path = Path(results["path"])
    recorded = json.loads((path.parent / "results.json").read_text())
    key = "best_acc" if path.name.endswith("_best.pth") else "last_acc"
    assert results["test_acc"] == recorded[key], command


@pytest.mark.parametrize("doc", sorted({c.doc for c in TRAINING if runs_here(c)}))
def test_synthetic_commands_run_as_written(doc, tmp_path, monkeypatch):
    """In document order, in one scratch folder: a teacher command makes the checkpoint a
    student command (or an evaluation) of the same document names."""
    monkeypatch.chdir(tmp_path)
    here = [c for c in TRAINING if c.doc == doc and runs_here(c)]
    here += [c for c in EVALUATING if c.doc == doc and evaluates_here(c)]
    for command in sorted(here, key=lambda c: c.line):
        if command in EVALUATING:
            check_evaluation(command)
            continue
        script, args = script_and_args(command.argv)
        if command.argv[0] == "torchrun":
            launcher = command.argv[1:command.argv.index(next(w for w in command.argv if w.endswith(".py")))]
            out = subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / script),
                                  *args, *TINY], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
            assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
            continue
        results = SCRIPTS[script].main(args + TINY)
        assert results["steps"] == 2 and results["last_acc"] is not None, command


@pytest.mark.parametrize("command", [c for c in ALL if c.argv[0] == "python" and c.argv[1].startswith("scripts/")],
                         ids=str)
def test_python_scripts_exist_and_parse(command, tmp_path):
    path = ROOT / command.argv[1]
    assert path.is_file(), command
    if path.name == "benchmark.py":
        import importlib.util
        spec = importlib.util.spec_from_file_location("benchmark", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_parser().parse_args(module.join_flag_values(command.argv[2:]))
    elif path.name == "summarize.py":  # on an empty folder: it runs and says there is nothing yet
        (tmp_path / "save").mkdir()
        out = subprocess.run([sys.executable, str(path), *command.argv[2:]], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode != 0 and "error: no" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("command", [c for c in ALL if c.argv[0] in ("bash", "sh")], ids=str)
def test_shell_scripts_run_dry_or_parse(command):
    path = ROOT / command.argv[1]
    assert path.is_file(), command
    if path.name in DRY_RUN_SCRIPTS:
        out = subprocess.run([command.argv[0], str(path), *command.argv[2:]], capture_output=True, text=True,
                             timeout=120, env={**os.environ, **command.env, "DRY_RUN": "1"})
        assert out.returncode == 0 and out.stdout.strip(), f"{command}\n{out.stderr}"
        runs = [shlex.split(line) for line in out.stdout.splitlines() if re.search(r"train_\w+\.py", line)]
        assert runs, out.stdout
        for argv in runs:  # each printed training command parses
            script, args = script_and_args(argv)
            assert SCRIPTS[script].parse_option(args).arch
    else:
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_make_targets_exist():
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    assert {c.argv[1] for c in ALL if c.argv[0] == "make"} <= targets


def test_every_command_is_covered():
    known = {"python", "torchrun", "bash", "sh", "make", "source", "tensorboard"}
    assert {c.argv[0] for c in ALL} <= known, [str(c) for c in ALL if c.argv[0] not in known]


# a measured time in a command's comment: "# 16 s", "# no files needed; 42 s", "# ...: 2.5-3.5 min"
TIMED = re.compile(r"#.*\b\d+(\.\d+)?(-\d+(\.\d+)?)? ?(s|min)\b")


def test_readme_commands_that_run_on_a_cpu_say_how_long_they_take():
    """The README's commands a user runs first on a CPU (the make targets, the training runs on
    the synthetic set, the evaluations of what they made) state their measured time."""
    readme = [c for c in ALL if c.doc == "README.md"]
    local = [c for c in readme if c.argv[0] == "make"
             or (c in TRAINING and runs_here(c)) or (c in EVALUATING and evaluates_here(c))]
    assert len(local) >= 8, [str(c) for c in local]
    assert not [str(c) for c in local if not TIMED.search(c.text)]
