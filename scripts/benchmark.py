"""Time the real training step of ``train_student.py`` on synthetic batches, compare it with a
baseline, and check the goals given with ``--expect``.

    python scripts/benchmark.py                                   # CRD and KD, resnet32x4 -> resnet8x4, CPU or GPU
    python scripts/benchmark.py --methods all --steps 10          # every --distill method on that pair
    python scripts/benchmark.py --pairs resnet56:resnet20,vgg13:vgg8 --methods crd --device cuda --json out.json
    python scripts/benchmark.py --baseline_ref 31064c4 --rounds 3 # each configuration also on a commit's code
    python scripts/benchmark.py --data_only                       # the data pipelines alone
    python scripts/benchmark.py --methods crd --expect "crd images_per_s_ratio>=1.2"   # a goal, checked

The file reads in parts: the measured code (imported from this checkout or a commit's tree),
small tools (clock, peak memory), teachers, a configuration and its run, one step timed by phase,
one configuration, the data pipelines alone, isolation (child processes, ``--baseline_ref``),
comparisons, expectations, the report, the command line, and ``main``.

Every configuration (teacher, student, method, flags) is a ``train_student.py`` command line on the
synthetic set (``--dataset synthetic``, CIFAR-shaped, ``--n_data`` training images), read by
``train_student.parse_option``, its runtime set up by ``engine.script.setup_runtime`` (as
``train_student.py`` does) and built by ``train_student.build_run``: the benchmark builds no part
of a run itself. The teachers have random weights whose BatchNorm statistics are set on one batch,
saved in RepDistiller's layout ``<arch>_vanilla/ckpt_epoch_240.pth`` (or your checkpoints with
``--teacher_dir``). Then, after ``--warmup`` steps of each kind, ``--steps`` real steps and
``--steps`` phased steps, alternating (so that both see the same machine load):

* **real step**: one step of ``engine.epoch.train_one_epoch`` itself (the code ``train_student.py``
  runs: autocast, the ``DistillStep``, the finite check, ``zero_grad``, backward, optimiser step,
  accuracy) on the run's own train loader. Their wall time gives images/s and steps/s.
* **phased step**: the same ``DistillStep.forward``, timed by part: forward hooks on the student
  and the teachers time their forwards, and the student's hook hands the loss detached copies
  of its outputs, so that the backward runs in two calls: ``loss.backward()`` (the loss terms'
  backward down to the student's outputs, and into the Distillers' heads) and then
  ``torch.autograd.backward(student outputs, their gradients)`` (the student's backward). The
  gradients are those of one backward (chain rule; ``tests/scripts/test_benchmark.py`` checks it); the
  phases are disjoint intervals of the step, so with ``other`` (accuracy) their shares sum to
  100%. ``phased/real`` (mean phased step over mean real step) checks that the split step costs
  what a real step costs.

Phases: ``data`` (next batch from the loader, moved to the device), ``teacher_fwd``,
``student_fwd``, ``loss_fwd`` (everything in ``DistillStep.forward`` besides the two networks:
CE, KD and the method's Distillers, memory-bank update included; summing the terms and their
finite check), ``loss_bwd``, ``student_bwd``, ``optimizer`` (``zero_grad`` + ``step``), ``other``.
On CUDA every phase boundary synchronises the device.

Each configuration is compared with a **baseline** in the same run:

* by default, the same pair and method with ``--baseline_flags`` on this code (default
  ``--loader torchvision --nce_scores gather --plain_teacher``: torchvision's loader, memory-bank
  rows gathered, the teacher as loaded, default memory format);
* with ``--baseline_ref COMMIT``, the same command line on the code of that git commit (exported
  with ``git archive`` into a tmp folder and measured in a child process; the repository is not
  touched), so that each configuration is timed on both codes; with ``--baseline_flags`` too,
  those flags on that commit, once per pair and method. The commit's ``train_student.py`` must
  define or import ``build_run`` (1564697 and later; an older commit is refused in one error
  line); of what it returns, only the parts that every version of it has are used (``step``,
  ``data.train_loader``, ``optimizer``, ``student``, ``teachers``, ``distillers``).

A flag that the measured code's ``train_student.py`` refuses is one error line before anything is
measured (on a ``--baseline_ref`` commit, that configuration is skipped with the commit's message).
Finally the data pipelines alone are timed (``--loader`` tensor and torchvision, each with its
default ``--num_workers``, plain batches and CRD's, from the train loader that ``build_run`` builds,
moved to the device).

**Expectations.** Performance goals are ratios measured here, stated by whoever asks for them:
``--expect '[METHOD ...] [TEACHER:STUDENT ...] METRIC OP NUMBER'`` (repeatable; OP one of ``>=``,
``<=``, ``>``, ``<``) is checked on every measured configuration (never a baseline) of the named
methods and pairs, all of them when none is named. METRIC is a number of the configuration's
result (``images_per_s``, ``phased_over_real``, ``peak_mem_mb``, ``share.loss_fwd_bwd``,
``ms.teacher_fwd``, ...), of its comparison with its baseline (``images_per_s_ratio``,
``peak_mem_ratio``, ``loss_share``, ...), or of the pipelines alone (``loader_ratio``,
``loader_ratio_contrast``: tensor over torchvision images/s). Each check is printed and written to
the report's ``expectations`` as met or not met, and the exit status is 1 when one is not met.
Without ``--expect`` nothing is checked. An expectation the run cannot check (a method or pair it
does not measure, a ratio without a baseline, ...) is refused before anything is measured.

Each configuration runs in a fresh Python process (``--in_process``: all in this one), so that
peak memory and the allocator's state do not carry over. ``--rounds N`` measures the whole list N
times, A B A B ..., and keeps each configuration's round of median images/s: on a machine shared
with other jobs the numbers move a lot from minute to minute (the run notes the load average).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps; on the CPU the
peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) during the timed steps
minus the resident size before the configuration was built (data, models, banks, activations;
data-loader worker processes not included).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import gc
import io
import itertools
import json
import importlib
import operator
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
# The code that is measured: this checkout, or (in a --baseline_ref child process) an exported tree.
# Only modules that every commit with train_student.build_run has are imported here.
CODE_ROOT = Path(os.environ.get("BENCHMARK_CODE_ROOT") or ROOT)
sys.path.insert(0, str(CODE_ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import train_student  # noqa: E402
from models import build_model  # noqa: E402

BASELINE_FLAGS = "--loader torchvision --nce_scores gather --plain_teacher"
DEFAULT_PAIRS = "resnet32x4:resnet8x4"
PHASES = ("data", "teacher_fwd", "student_fwd", "loss_fwd", "loss_bwd", "student_bwd", "optimizer", "other")
# The table's shares (percent of the phased step); they sum to 100.
SHARES = {"data": ("data",), "teacher_fwd": ("teacher_fwd",), "student_fwd_bwd": ("student_fwd", "student_bwd"),
          "loss_fwd_bwd": ("loss_fwd", "loss_bwd"), "optimizer": ("optimizer",), "other": ("other",)}
# The pair whose runs give the loader-alone timing (only their train loader is used).
LOADER_PAIR = ("resnet8", "resnet8")


# ---------------------------------------------------------------- the measured code
def _measured(*paths: str) -> Any:
    """A module of the measured code by its path in this layout (the first of ``paths``), or, for a
    commit from before it (``--baseline_ref``), by the first of its older paths that the commit has."""
    for name in paths[:-1]:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            pass
    return importlib.import_module(paths[-1])


UserError = _measured("common.errors", "helper.errors").UserError
exit_on_user_error = _measured("common.errors", "helper.errors").exit_on_user_error
accuracy = _measured("common.meters", "helper.meters").accuracy
resolve_device = _measured("common.runtime", "helper.runtime").resolve_device
write_json = _measured("engine.logger", "helper.logger").write_json
adjust_learning_rate = _measured("engine.optim", "helper.optim").adjust_learning_rate
setup_runtime = _measured("engine.script", "helper.runtime").setup_runtime
# The training loop's modules: the two functions below are the only users of train_one_epoch,
# StepBudget and check_finite.
_epoch = _measured("engine.epoch", "engine.loops", "helper.loops")
_guards = _measured("engine.guards", "engine.loops", "helper.loops")


def loop_step(step: nn.Module, batches: Iterator, optimizer: torch.optim.Optimizer, scaler, runtime) -> None:
    """One step of the measured code's own loop: ``train_one_epoch`` over the next batch of ``batches``."""
    one_batch = itertools.islice(batches, 1)
    if hasattr(_epoch, "EpochContext"):
        ctx = _epoch.EpochContext(step, step, optimizer, _guards.StepBudget(None), scaler=scaler,
                                  autocast=runtime.autocast, device=runtime.device)
        _epoch.train_one_epoch(ctx, 1, one_batch)
    else:  # a commit from before the epoch's context (its keyword arguments)
        _epoch.train_one_epoch(1, one_batch, step, step, optimizer, _guards.StepBudget(None),
                               scaler=scaler, autocast=runtime.autocast, device=runtime.device)


def check_terms(terms: dict[str, float], number: int) -> None:
    """The loop's finite check of the loss terms of step ``number`` (raises as the loop does)."""
    _guards.check_finite(terms, "the benchmark", number)


# ---------------------------------------------------------------- small tools
class Clock:
    """``perf_counter`` that first waits for the device's queued work (CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the timed steps: CUDA's max allocated bytes, or the CPU's peak RSS minus
    ``before_mb``, the RSS before the configuration was built (see the module docstring)."""

    def __init__(self, device: torch.device, before_mb: float):
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_peak_rss_delta"
        self.before_mb = before_mb
        self.reset_ok = True  # False: the CPU peak could not be reset (it is the process's lifetime peak)

    @staticmethod
    def rss_mb() -> float:
        kb = _proc_status_kb("VmRSS")
        return kb / 1024 if kb is not None else 0.0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.reset_ok = False

    def peak_mb(self) -> tuple[float, float | None]:
        """(peak in MB as ``kind`` says, absolute peak RSS in MB or None on CUDA)."""
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20, None
        hwm = _proc_status_kb("VmHWM")
        if hwm is None:
            import resource  # ru_maxrss: the process's lifetime peak, in kB on Linux
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = hwm / 1024
        return max(peak - self.before_mb, 0.0), peak


def _load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _quiet(verbose: bool):
    """Hide the training code's console output unless ``--verbose``."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


# ---------------------------------------------------------------- teachers
def teacher_checkpoint(arch: str, folder: Path, num_classes: int, image_size: int = 32) -> Path:
    """``folder/<arch>_vanilla/ckpt_epoch_240.pth`` in RepDistiller's layout ``{'model': sd}``; made
    with random weights (BatchNorm statistics of one random batch) when it does not exist."""
    path = folder / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(arch, num_classes=num_classes)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:  # statistics of one batch, so that features have the scale of a trained net
            m.reset_running_stats()
            m.momentum = None
        with torch.no_grad():
            model.train()(torch.randn(32, 3, image_size, image_size))
        for m in norms:
            m.momentum = 0.1
    torch.save({"model": model.state_dict()}, path)
    return path


# ---------------------------------------------------------------- a configuration and its run
class Config:
    """One measured configuration: a teacher/student pair, a method, its ``train_student.py``
    flags, and the git commit whose code is measured (None: this checkout). A configuration and
    its baseline share ``group``. (A plain class: a dataclass needs its module in ``sys.modules``,
    which a script loaded from its path is not.)"""

    def __init__(self, teacher: str, student: str, method: str, flags: list[str], label: str,
                 baseline: bool = False, group: str = "", commit: str | None = None):
        self.teacher, self.student, self.method = teacher, student, method
        self.flags, self.label, self.baseline, self.group, self.commit = flags, label, baseline, group, commit

    def to_dict(self) -> dict[str, Any]:
        """The fields, as ``Config(**d)`` takes them back."""
        return dict(vars(self))

    @property
    def pair(self) -> str:
        return f"{self.teacher}:{self.student}"

    @property
    def name(self) -> str:
        return f"{self.method} {self.teacher}->{self.student} [{self.label}]"


def training_argv(args: argparse.Namespace, config: Config, teacher_path: Path, save_folder: str) -> list[str]:
    """The ``train_student.py`` command line of ``config`` on the synthetic set."""
    per_class = max(1, args.n_data // args.classes)
    return ["--path_t", str(teacher_path), "--model_s", config.student, "--distill", config.method,
            "--dataset", "synthetic", "--synthetic_classes", str(args.classes),
            "--synthetic_train", str(per_class), "--synthetic_test", "1",
            "--batch_size", str(args.batch_size), "--nce_k", str(args.nce_k), "--device", args.device,
            "--epochs", "1", "--seed", "1", "--save_folder", save_folder, *config.flags]


def parse_training(argv: list[str], verbose: bool = False):
    """``train_student.parse_option(argv)``; its parser's one-line refusal (exit 2) is raised as a
    :class:`UserError`."""
    errors = io.StringIO()
    try:
        with _quiet(verbose), contextlib.redirect_stderr(errors):
            return train_student.parse_option(argv)
    except SystemExit as stop:
        message = errors.getvalue().strip().removeprefix("error: ") or f"exit status {stop.code}"
        raise UserError(f"train_student.py refuses the flags: {message}") from None


def build(config: Config, args: argparse.Namespace, teacher_dir: Path, save_folder: str) -> SimpleNamespace:
    """``config`` as ``train_student.py`` builds it: its options, its runtime and
    ``train_student.build_run``'s parts (``build_s``: seconds of ``build_run``)."""
    argv = training_argv(args, config, teacher_checkpoint(config.teacher, teacher_dir, args.classes), save_folder)
    opt = parse_training(argv, args.verbose)
    with _quiet(args.verbose):
        runtime = setup_runtime(opt)
        start = time.perf_counter()
        parts = train_student.build_run(opt, runtime)
    return SimpleNamespace(argv=argv, opt=opt, runtime=runtime, parts=parts, build_s=time.perf_counter() - start)


def batches_forever(loader) -> Iterator:
    """The loader's batches, epoch after epoch (``set_epoch`` as ``Fit`` does)."""
    sampler = getattr(loader, "sampler", None)
    for epoch in itertools.count(1):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader


# ---------------------------------------------------------------- one step, timed by phase
class PhaseHooks:
    """Forward hooks that time the student's and the teachers' forwards and cut the autograd graph
    between the student's outputs and the loss (see the module docstring)."""

    def __init__(self, student: nn.Module, teachers: list[nn.Module], clock: Clock):
        self.clock = clock
        self.seconds = {"student_fwd": 0.0, "teacher_fwd": 0.0}
        self.calls = {"student_fwd": 0, "teacher_fwd": 0}
        self.depth = {"student_fwd": 0, "teacher_fwd": 0}
        self.started = {"student_fwd": 0.0, "teacher_fwd": 0.0}
        self.cut: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = []
        for module, role in [(student, "student_fwd")] + [(t, "teacher_fwd") for t in teachers]:
            self.handles.append(module.register_forward_pre_hook(self._pre(role)))
            self.handles.append(module.register_forward_hook(self._post(role)))

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)
        self.cut = []

    def _pre(self, role: str) -> Callable:
        def hook(module, args):
            if self.depth[role] == 0:
                self.started[role] = self.clock()
            self.depth[role] += 1
        return hook

    def _post(self, role: str) -> Callable:
        def hook(module, args, output):
            self.depth[role] -= 1
            if self.depth[role] > 0:
                return None
            if role == "student_fwd":
                output = self._detach(output)
            self.seconds[role] += self.clock() - self.started[role]
            self.calls[role] += 1
            return output
        return hook

    def _detach(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if not value.requires_grad:
                return value
            leaf = value.detach().requires_grad_(True)
            self.cut.append((value, leaf))
            return leaf
        if isinstance(value, (list, tuple)):
            return type(value)(self._detach(v) for v in value)
        return value

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def phased_step(step: nn.Module, batches: Iterator, optimizer: torch.optim.Optimizer, scaler, runtime,
                hooks: PhaseHooks, clock: Clock, number: int) -> dict[str, float]:
    """One training step as train_one_epoch runs it, timed by phase (seconds)."""
    hooks.reset()
    t0 = clock()
    batch = step.batch(next(batches))
    t1 = clock()
    with runtime.autocast():
        logits, target, terms = step(batch)
    loss = sum(terms.values())
    check_terms({name: term.item() for name, term in terms.items()}, number)
    t2 = clock()
    optimizer.zero_grad(set_to_none=True)
    t3 = clock()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    t4 = clock()
    pairs = [(out, leaf.grad) for out, leaf in hooks.cut if leaf.grad is not None]
    if pairs:
        torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
    t5 = clock()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    t6 = clock()
    accuracy(logits.detach().float(), target)[0].item()
    t7 = clock()
    if hooks.calls["student_fwd"] != 1:
        raise RuntimeError(f"the benchmark saw {hooks.calls['student_fwd']} student forwards in a step (expected 1): "
                           "scripts/benchmark.py needs updating for this DistillStep")
    net = hooks.seconds["student_fwd"] + hooks.seconds["teacher_fwd"]
    times = {"data": t1 - t0, "teacher_fwd": hooks.seconds["teacher_fwd"], "student_fwd": hooks.seconds["student_fwd"],
             "loss_fwd": (t2 - t1) - net, "loss_bwd": t4 - t3, "student_bwd": t5 - t4,
             "optimizer": (t3 - t2) + (t6 - t5)}
    times["other"] = max((t7 - t0) - sum(times.values()), 0.0)
    times["total"] = t7 - t0
    times["teacher_seen"] = float(hooks.calls["teacher_fwd"] > 0)
    return times


# ---------------------------------------------------------------- one configuration
class StepTimer:
    """The two timed steps of a built run (:func:`build`): a real one (``train_one_epoch`` over
    one batch) and a phased one, drawing from one stream of the run's training batches."""

    def __init__(self, built: SimpleNamespace):
        parts, self.runtime = built.parts, built.runtime
        self.clock = Clock(self.runtime.device)
        self.step, self.optimizer = parts.step, parts.optimizer
        self.student, self.teachers = parts.student, [teacher for teacher, _, _ in parts.teachers]
        scaler = self.runtime.grad_scaler()
        self.scaler = scaler if scaler.is_enabled() else None
        adjust_learning_rate(1, built.opt, self.optimizer)
        for distiller in parts.distillers:
            distiller.start_epoch(1)
        self.batches = batches_forever(parts.data.train_loader)
        self.step.train()

    def real(self) -> float:
        """Seconds of one step of ``train_one_epoch`` itself, as ``train_student.py`` runs it."""
        start = self.clock()
        loop_step(self.step, self.batches, self.optimizer, self.scaler, self.runtime)
        return self.clock() - start

    def phased(self, number: int) -> dict[str, float]:
        """Seconds of each phase of one step (:func:`phased_step`)."""
        hooks = PhaseHooks(self.student, self.teachers, self.clock)
        try:
            return phased_step(self.step, self.batches, self.optimizer, self.scaler, self.runtime, hooks,
                               self.clock, number)
        finally:
            hooks.remove()


def measure(config: Config, args: argparse.Namespace, teacher_dir: Path, save_folder: str) -> dict[str, Any]:
    """Build ``config`` as train_student.py does and time its steps (see the module docstring)."""
    gc.collect()  # the previous configuration's modules and tensors (cycles) go before measuring
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    before_mb = PeakMemory.rss_mb()
    built = build(config, args, teacher_dir, save_folder)
    timer = StepTimer(built)
    memory = PeakMemory(built.runtime.device, before_mb)
    # Real and phased steps alternate, so that both see the same conditions (a busy machine).
    for i in range(args.warmup):
        timer.real()
        timer.phased(i + 1)
    memory.start()
    real, phased = [], []
    for i in range(args.steps):
        real.append(timer.real())
        phased.append(timer.phased(i + 1))
    return summarize(config, args, built, real, phased, memory)


def summarize(config: Config, args: argparse.Namespace, built: SimpleNamespace, real: list[float],
              phased: list[dict[str, float]], memory: PeakMemory) -> dict[str, Any]:
    """One configuration's result: images/s and steps/s of the real steps, the phases' mean ms and
    shares of the phased step, peak memory, and what was built."""
    opt, runtime = built.opt, built.runtime
    peak_mb, peak_rss_mb = memory.peak_mb()
    ms = {phase: 1000 * sum(t[phase] for t in phased) / len(phased) for phase in PHASES}
    phased_ms = 1000 * sum(t["total"] for t in phased) / len(phased)
    real_s = sum(real)
    real_ms = 1000 * real_s / len(real)
    share = {name: 100 * sum(ms[p] for p in parts) / phased_ms for name, parts in SHARES.items()}
    return {
        "name": config.name, "pair": config.pair, "teacher": config.teacher, "student": config.student,
        "method": config.method, "label": config.label, "baseline": config.baseline, "group": config.group,
        "flags": config.flags, "commit": config.commit, "argv": built.argv,
        "device": str(runtime.device), "runtime": runtime.describe(),
        "loader": opt.loader, "num_workers": opt.num_workers,
        "weights": {"gamma": opt.gamma, "alpha": opt.alpha, "beta": opt.beta},
        "batch_size": opt.batch_size, "nce_k": opt.nce_k, "n_data": built.parts.data.n_data,
        "steps": len(real), "warmup": args.warmup, "build_s": built.build_s,
        "images_per_s": len(real) * opt.batch_size / real_s, "steps_per_s": len(real) / real_s,
        "real_step_ms": real_ms, "real_step_ms_median": 1000 * statistics.median(real),
        "phased_step_ms": phased_ms, "phased_over_real": phased_ms / real_ms,
        "ms": ms, "share": share,
        "peak_mem_mb": peak_mb, "peak_mem_kind": memory.kind, "peak_rss_mb": peak_rss_mb,
        "peak_mem_reset": memory.reset_ok,
        "teacher_seen": all(t["teacher_seen"] for t in phased),
    }


# ---------------------------------------------------------------- the data pipelines alone
def measure_loader(loader_name: str, args: argparse.Namespace, teacher_dir: Path, save_folder: str,
                   contrast: bool) -> dict[str, Any]:
    """Images/s of iterating the train loader that ``build_run`` builds for ``--loader
    loader_name`` (KD's plain batches, or CRD's with ``index`` and ``contrast_idx``), each batch
    moved to the device."""
    config = Config(*LOADER_PAIR, "crd" if contrast else "kd", ["--loader", loader_name], loader_name)
    built = build(config, args, teacher_dir, save_folder)
    runtime, opt = built.runtime, built.opt
    clock = Clock(runtime.device)
    batches = batches_forever(built.parts.data.train_loader)
    for _ in range(args.warmup):
        [runtime.to_device(t) for t in next(batches)]
    start, images = clock(), 0
    for _ in range(args.data_batches):
        batch = [runtime.to_device(t) for t in next(batches)]
        images += batch[0].shape[0]
    seconds = clock() - start
    return {"loader": opt.loader, "contrast": contrast, "num_workers": opt.num_workers,
            "batches": args.data_batches, "batch_size": opt.batch_size, "images_per_s": images / seconds,
            "device": str(runtime.device)}


def loader_timing(args: argparse.Namespace, teacher_dir: Path, save_folder: str, notes: list[str]) -> dict[str, Any]:
    """Both pipelines alone, plain and with CRD's batches, and the tensor / torchvision ratios."""
    runs = []
    for name, contrast in itertools.product(("tensor", "torchvision"), (False, True)):
        kind = "crd batches" if contrast else "plain"
        print(f"measuring the {name} loader alone ({kind}) ...", flush=True)
        try:
            runs.append(measure_loader(name, args, teacher_dir, save_folder, contrast))
        except UserError as err:
            notes.append(f"the {name} loader alone ({kind}) was not measured: {err}")
    found: dict[str, Any] = {"runs": runs}
    by = {(r["loader"], r["contrast"]): r["images_per_s"] for r in runs}
    for key, contrast in (("ratio", False), ("ratio_contrast", True)):
        if ("tensor", contrast) in by and ("torchvision", contrast) in by:
            found[key] = by[("tensor", contrast)] / by[("torchvision", contrast)]
    return found


# ---------------------------------------------------------------- isolation: child processes, --baseline_ref
def export_ref(ref: str, dest: Path) -> str:
    """Write the tree of git ``ref`` of this checkout into ``dest`` (``git archive``; the
    repository is not touched) and return the commit; refused (:class:`UserError`) when it is not
    a commit or its ``train_student.py`` has no ``build_run``."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                                capture_output=True, text=True, check=True).stdout.strip()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise UserError(f"--baseline_ref {ref}: not a commit of the git checkout {ROOT}") from None
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    require_build_run(dest, ref)
    return commit


def require_build_run(code: Path, ref: str) -> None:
    """Refuse (:class:`UserError`) a code tree whose ``train_student.py`` neither defines nor imports
    ``build_run``: the benchmark builds every run with it."""
    source = code / "train_student.py"
    try:
        body = ast.parse(source.read_text()).body if source.is_file() else []
    except SyntaxError:
        body = []
    names = [n.name for n in body if isinstance(n, ast.FunctionDef)]
    names += [a.asname or a.name for n in body if isinstance(n, ast.ImportFrom) for a in n.names]
    if "build_run" not in names:
        raise UserError(f"--baseline_ref {ref}: its train_student.py has no build_run (commits from 1564697 on "
                        "have it), and the benchmark builds every run with it: choose a later commit")


def measure_isolated(config: Config, args: argparse.Namespace, teacher_dir: Path, save_folder: str,
                     code_root: Path | None = None) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (this script with ``--_child``), on this checkout's
    code or ``code_root``'s; a :class:`UserError` there is raised here again."""
    work = Path(tempfile.mkdtemp(prefix="child_", dir=save_folder))
    spec, out = work / "spec.json", work / "result.json"
    write_json(spec, {"config": config.to_dict(), "args": vars(args), "teacher_dir": str(teacher_dir),
                      "save_folder": save_folder})
    env = dict(os.environ, BENCHMARK_CODE_ROOT=str(code_root or ROOT))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", str(spec), str(out)],
                          cwd=str(code_root or ROOT), env=env, capture_output=not args.verbose, text=True)
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join((done.stderr or "").strip().splitlines()[-15:])
        raise RuntimeError(f"measuring {config.name} in a child process failed (exit {done.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    if "error" in result:
        raise UserError(result["error"])
    return result


def run_child(spec_path: str, out_path: str) -> None:
    """The ``--_child`` entry point: measure one configuration described by ``spec_path`` and
    write the result (or ``{"error": ...}`` for a :class:`UserError`) to ``out_path``."""
    spec = json.loads(Path(spec_path).read_text())
    config = Config(**spec["config"])
    try:
        result = measure(config, argparse.Namespace(**spec["args"]), Path(spec["teacher_dir"]), spec["save_folder"])
    except UserError as err:
        result = {"error": str(err)}
    write_json(Path(out_path), result)


# ---------------------------------------------------------------- comparisons
def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of one configuration's rounds, the one with the median images/s (the lower middle one for
    an even count), with every round's images/s added as ``images_per_s_rounds``."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["images_per_s_rounds"] = [r["images_per_s"] for r in runs]
    return chosen


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measured configuration against the baseline of its group (``same_flags``: the baseline
    is the same command line, on another commit's code)."""
    base = {r["group"]: r for r in results if r["baseline"]}
    out = []
    for r in results:
        b = base.get(r["group"])
        if r["baseline"] or b is None:
            continue
        out.append({"name": r["name"], "pair": r["pair"], "method": r["method"], "label": r["label"],
                    "baseline_label": b["label"], "baseline_commit": b["commit"], "same_flags": r["flags"] == b["flags"],
                    "images_per_s": r["images_per_s"], "baseline_images_per_s": b["images_per_s"],
                    "images_per_s_ratio": r["images_per_s"] / b["images_per_s"],
                    "peak_mem_ratio": r["peak_mem_mb"] / b["peak_mem_mb"] if b["peak_mem_mb"] > 0 else None,
                    "loss_share": r["share"]["loss_fwd_bwd"], "baseline_loss_share": b["share"]["loss_fwd_bwd"],
                    "peak_mem_mb": r["peak_mem_mb"], "baseline_peak_mem_mb": b["peak_mem_mb"]})
    return out


# ---------------------------------------------------------------- expectations (--expect)
# What an expectation may name: a number of a measured configuration's result (``ms.<phase>`` and
# ``share.<share>`` for the nested ones), of its comparison with its baseline, or of the pipelines
# alone (by its key in the report's ``loaders``).
RESULT_METRICS = ("images_per_s", "steps_per_s", "real_step_ms", "real_step_ms_median", "phased_step_ms",
                  "phased_over_real", "peak_mem_mb", "build_s", *(f"ms.{p}" for p in PHASES),
                  *(f"share.{s}" for s in SHARES))
RATIO_METRICS = ("images_per_s_ratio", "peak_mem_ratio", "baseline_images_per_s", "loss_share",
                 "baseline_loss_share", "baseline_peak_mem_mb")
LOADER_METRICS = {"loader_ratio": "ratio", "loader_ratio_contrast": "ratio_contrast"}
OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
EXPECT_FORM = re.compile(r"(?:(?P<select>.*\S)\s+)?(?P<metric>[A-Za-z_][\w.]*)\s*(?P<op>>=|<=|>|<)\s*(?P<bound>\S+)")
EXPECT_HELP = ("[METHOD ...] [TEACHER:STUDENT ...] METRIC OP NUMBER with OP one of >= <= > <, e.g. "
               "'crd resnet32x4:resnet8x4 images_per_s_ratio>=1.5'")


class Expectation:
    """A goal given with ``--expect``: ``metric op bound`` must hold for every measured configuration
    (not a baseline) of ``methods`` and ``pairs`` (all of them when empty), or for the pipelines alone
    when ``metric`` is one of :data:`LOADER_METRICS`."""

    def __init__(self, text: str, methods: set[str], pairs: set[str], metric: str, op: str, bound: float):
        self.text, self.methods, self.pairs = text, methods, pairs
        self.metric, self.op, self.bound = metric, op, bound

    def names(self, result: dict[str, Any]) -> bool:
        """Whether ``result`` (a configuration's) is one that the expectation is checked on."""
        return ((not self.methods or result["method"] in self.methods)
                and (not self.pairs or result["pair"] in self.pairs))

    def check(self, subject: str | None, value: float | None) -> dict[str, Any]:
        """The report's entry for ``value`` measured on ``subject`` (None: nothing measured)."""
        met = value is not None and OPERATORS[self.op](value, self.bound)
        return {"expect": self.text, "subject": subject, "metric": self.metric, "op": self.op, "bound": self.bound,
                "value": value, "met": met}


def metric_names() -> str:
    """The metrics an expectation may name, for error messages and ``--help``."""
    plain = [m for m in RESULT_METRICS if "." not in m]
    return ", ".join([*plain, "ms.<phase>", "share.<share>", *RATIO_METRICS, *LOADER_METRICS])


def parse_expectation(text: str, methods: list[str], pairs: list[str]) -> Expectation:
    """``--expect``'s ``text`` as an :class:`Expectation`; refused (:class:`UserError`) when it is
    not of the form, or names an unknown metric, or a method or pair (``teacher:student``) that is
    not measured."""
    where = f"--expect {text!r}"
    form = EXPECT_FORM.fullmatch(text.strip())
    if form is None:
        raise UserError(f"{where}: write {EXPECT_HELP}")
    metric, select = form["metric"], (form["select"] or "").split()
    if metric not in (*RESULT_METRICS, *RATIO_METRICS, *LOADER_METRICS):
        raise UserError(f"{where}: unknown metric {metric}; choose from {metric_names()} "
                        f"(phases: {', '.join(PHASES)}; shares: {', '.join(SHARES)})")
    try:
        bound = float(form["bound"])
    except ValueError:
        raise UserError(f"{where}: {form['bound']} is not a number") from None
    if metric in LOADER_METRICS and select:
        raise UserError(f"{where}: {metric} is a number of the data pipelines alone: name no method or pair")
    chosen_pairs = {s for s in select if ":" in s}
    chosen_methods = set(select) - chosen_pairs
    unknown = sorted(chosen_methods - set(methods)) + sorted(chosen_pairs - set(pairs))
    if unknown:
        raise UserError(f"{where}: {', '.join(unknown)} not measured (methods: {', '.join(methods) or 'none'}; "
                        f"pairs: {', '.join(pairs)})")
    return Expectation(text.strip(), chosen_methods, chosen_pairs, metric, form["op"], bound)


def read_expectations(args: argparse.Namespace, methods: list[str], pairs: list[tuple[str, str]]
                      ) -> list[Expectation]:
    """The ``--expect`` goals; each one that this run could not check is refused
    (:class:`UserError`) before anything is measured."""
    found = []
    for text in args.expect:
        e = parse_expectation(text, methods, [f"{teacher}:{student}" for teacher, student in pairs])
        named = [m for m in methods if not e.methods or m in e.methods]
        if e.metric in LOADER_METRICS and args.no_loader_check:
            raise UserError(f"--expect {text!r}: {e.metric} needs the pipelines alone, which --no_loader_check skips")
        if e.metric not in LOADER_METRICS and not named:
            raise UserError(f"--expect {text!r}: no configuration is measured (--data_only)")
        if e.metric in RATIO_METRICS and not set(named) & baseline_methods(args, methods):
            raise UserError(f"--expect {text!r}: {e.metric} compares with a baseline, and --baseline_methods "
                            f"gives none to {', '.join(named)}")
        found.append(e)
    return found


def check_expectations(expectations: list[Expectation], results: list[dict[str, Any]],
                       compared: list[dict[str, Any]], loaders: dict[str, Any]) -> list[dict[str, Any]]:
    """Each expectation checked on what was measured: one entry per configuration it names (with its
    comparison, for the ratio metrics) or one for the pipelines alone; where nothing it names was
    measured (skipped configurations), one entry without a subject, not met."""
    comparison = {c["name"]: c for c in compared}
    checks = []
    for e in expectations:
        if e.metric in LOADER_METRICS:
            value = loaders.get(LOADER_METRICS[e.metric])
            subjects = [("data pipelines alone", value)] if value is not None else []
        else:
            rows = [{**r, **comparison.get(r["name"], {})} for r in results if not r["baseline"] and e.names(r)]
            subjects = [(row["name"], functools.reduce(operator.getitem, e.metric.split("."), row)) for row in rows
                        if e.metric not in RATIO_METRICS or row["name"] in comparison]
        checks += [e.check(subject, value) for subject, value in subjects] or [e.check(None, None)]
    return checks


def exit_status(report: dict[str, Any] | None) -> int:
    """The script's exit status: 1 when an expectation is not met, else 0."""
    return int(bool(report) and any(not c["met"] for c in report["expectations"]))


# ---------------------------------------------------------------- the report
def load_note(device: str, loads: tuple[float | None, float | None]) -> list[str]:
    """A note when the CPU was shared with other processes during the run."""
    busy = max(load or 0.0 for load in loads)
    if device == "cpu" and busy > (os.cpu_count() or 1):
        return [f"the 1-minute load average reached {busy:.1f} on {os.cpu_count()} cores: other processes "
                "shared the CPU, so these timings are slower and noisier than on an idle machine"]
    return []


def make_report(args: argparse.Namespace, device: str, methods: list[str], configs: list[Config],
                measured: dict[str, Any], loads: tuple[float | None, float | None],
                expectations: list[Expectation]) -> dict[str, Any]:
    """The whole report (what ``--json`` writes) from the measured configurations and pipelines, with
    each expectation checked on them."""
    results, loaders = measured["configs"], measured["loaders"]
    notes = measured["notes"] + [f"{r['name']}: the teacher forward was not observed by the hooks (its time is "
                                 "counted in the loss)" for r in results if not r["teacher_seen"]]
    notes += load_note(device, loads)
    compared = ratios(results)
    baselines = [c for c in configs if c.baseline]
    settings = {
        "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "pairs": args.pairs, "methods": methods,
        "loaders": ["tensor", "torchvision"] if args.loader == "both" else [args.loader], "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "batch_size": args.batch_size, "nce_k": args.nce_k,
        "n_data": args.n_data, "flags": shlex.split(args.flags),
        "baseline_flags": sorted({" ".join(c.flags) for c in baselines}), "baseline_ref": args.baseline_ref,
        "baseline_commit": next((c.commit for c in baselines if c.commit), None), "isolated": not args.in_process,
        "data_batches": args.data_batches, "load_average_before": loads[0], "load_average_after": loads[1],
        "expect": [e.text for e in expectations],
    }
    return {"settings": settings, "configs": results, "skipped": measured["skipped"], "ratios": compared,
            "loaders": loaders, "expectations": check_expectations(expectations, results, compared, loaders),
            "notes": notes}


def table(results: list[dict[str, Any]]) -> str:
    """The configurations as a Markdown table."""
    lines = ["| config | images/s | steps/s | % data | % teacher fwd | % student fwd+bwd | % loss fwd+bwd "
             "| % optimizer | % other | peak mem (MB) | phased/real |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["share"]
        lines.append(f"| {r['name']} | {r['images_per_s']:.0f} | {r['steps_per_s']:.2f} | {s['data']:.1f} "
                     f"| {s['teacher_fwd']:.1f} | {s['student_fwd_bwd']:.1f} | {s['loss_fwd_bwd']:.1f} "
                     f"| {s['optimizer']:.1f} | {s['other']:.1f} | {r['peak_mem_mb']:.0f} | {r['phased_over_real']:.2f} |")
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The report as text: the table, skipped configurations, ratios, pipelines, expectations, notes."""
    s = report["settings"]
    out = [f"\nRepDistill benchmark: {s['device']} ({s['threads']} threads), torch {s['torch']}, batch {s['batch_size']}, "
           f"K {s['nce_k']}, N {s['n_data']}, {s['steps']} timed steps after {s['warmup']} warm-up", ""]
    if report["configs"]:
        out += [table(report["configs"]), ""]
        out.append("shares: percent of the phased step; images/s and steps/s: the real loop "
                   "(train_one_epoch); peak mem: " + report["configs"][0]["peak_mem_kind"].replace("_", " "))
    out += [f"skipped {skip['name']}: {skip['error']}" for skip in report["skipped"]]
    if report["ratios"]:
        out += ["", "vs the baseline (same pair and method):"]
        for c in report["ratios"]:
            out.append(f"- {c['name']} vs [{c['baseline_label']}]: {c['images_per_s_ratio']:.2f}x images/s "
                       f"({c['images_per_s']:.0f} vs {c['baseline_images_per_s']:.0f}); loss {c['loss_share']:.1f}% "
                       f"of the step (baseline {c['baseline_loss_share']:.1f}%); peak mem {c['peak_mem_mb']:.0f} vs "
                       f"{c['baseline_peak_mem_mb']:.0f} MB")
    out += render_loaders(report["loaders"])
    out += render_expectations(report["expectations"])
    if report["notes"]:
        out += ["", "notes:"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out)


def render_loaders(loaders: dict[str, Any]) -> list[str]:
    """The lines of the loader-alone timing (none when it did not run)."""
    if not loaders.get("runs"):
        return []
    out = ["", "data pipelines alone (train batches with augmentation, moved to the device):"]
    for r in loaders["runs"]:
        out.append(f"- {r['loader']} ({'crd batches' if r['contrast'] else 'plain'}, num_workers "
                   f"{r['num_workers']}): {r['images_per_s']:.0f} images/s")
    if loaders.get("ratio") is not None:
        contrast = loaders.get("ratio_contrast")
        out.append(f"- tensor / torchvision: {loaders['ratio']:.2f}x (plain)"
                   + (f", {contrast:.2f}x (crd batches)" if contrast is not None else ""))
    return out


def render_expectations(checks: list[dict[str, Any]]) -> list[str]:
    """The lines of the expectations' checks (none without ``--expect``)."""
    if not checks:
        return []
    out = ["", "expectations:"]
    for c in checks:
        if c["subject"] is None:
            out.append(f"- {c['expect']}: nothing it names was measured -> NOT met")
            continue
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        out.append(f"- {c['expect']}: {c['subject']}: {c['metric']} {value} (expected {c['op']} {c['bound']:g}) "
                   f"-> {'met' if c['met'] else 'NOT met'}")
    return out


# ---------------------------------------------------------------- the command line
def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (the parent process's only: a child gets them as a namespace)."""
    from engine.options import Parser  # this checkout's parser (one-line errors)

    p = Parser(description="Time train_student.py's training step on synthetic batches.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pairs", default=DEFAULT_PAIRS, help="comma-separated teacher:student pairs")
    p.add_argument("--methods", default="crd,kd", help="comma-separated --distill methods, or 'all'")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each loop (real and phased)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (and loader batches) first")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure the list of configurations this many times, one after the other (A B A B ...), "
                        "and report each one's round of median images/s: robust to other jobs on the machine")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--nce_k", type=int, default=16384, help="negatives of the contrastive methods")
    p.add_argument("--n_data", type=int, default=50000, help="training images (memory-bank rows)")
    p.add_argument("--classes", type=int, default=100, help="classes of the synthetic set")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--loader", default="tensor", choices=("tensor", "torchvision", "both"),
                   help="data pipeline(s) of the measured configurations")
    p.add_argument("--flags", default="", help="extra train_student.py flags of the measured configurations "
                                               "(e.g. '--channels_last --amp bf16')")
    p.add_argument("--baseline_flags", default=None,
                   help=f"train_student.py flags of the baseline (default without --baseline_ref: '{BASELINE_FLAGS}'; "
                        "with it: each configuration's own flags)")
    p.add_argument("--baseline_ref", default=None,
                   help="measure the baselines on the code of this git commit (one with train_student.build_run), "
                        "exported to a tmp folder and run in a child process")
    p.add_argument("--in_process", action="store_true",
                   help="measure every configuration of this code in this process (quicker to start; peak-memory "
                        "deltas and the allocator's state then carry over between configurations)")
    p.add_argument("--baseline_methods", default="all",
                   help="methods that get a baseline run: 'all', 'none' or a comma-separated list")
    p.add_argument("--data_batches", type=int, default=50, help="batches of the loader-alone timing")
    p.add_argument("--no_loader_check", action="store_true", help="skip the loader-alone timing")
    p.add_argument("--data_only", action="store_true", help="time the data pipelines alone, nothing else")
    p.add_argument("--teacher_dir", default=None,
                   help="folder with <arch>_vanilla/ckpt_epoch_240.pth teachers (default: random ones in a tmp folder)")
    p.add_argument("--expect", action="append", default=[], metavar="GOAL",
                   help=f"a goal checked on the measured numbers, repeatable: {EXPECT_HELP}; METRIC: "
                        f"{metric_names()}; printed and written to the report as met or not met, exit status 1 "
                        "when one is not met")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--verbose", action="store_true", help="show the training scripts' own output")
    return p


def join_flag_values(argv: list[str]) -> list[str]:
    """``--flags --channels_last`` as ``--flags=--channels_last``: argparse would take a value
    that starts with a dash (and has no space) for an option of its own."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--flags", "--baseline_flags") and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def check_args(args: argparse.Namespace) -> None:
    """Refuse counts out of range (:class:`UserError`)."""
    if args.steps < 1 or args.warmup < 0 or args.data_batches < 1 or args.rounds < 1:
        raise UserError("--steps, --rounds and --data_batches must be at least 1, --warmup at least 0")
    if min(args.batch_size, args.nce_k, args.n_data, args.classes) < 1:
        raise UserError("--batch_size, --nce_k, --n_data and --classes must be at least 1")


def resolve_methods(spec: str) -> list[str]:
    """The ``--methods`` list (``all``: every registered method)."""
    from engine.methods import method_names  # this checkout's list of every method

    known = method_names()
    if spec == "all":
        return known
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return methods


def resolve_pairs(spec: str) -> list[tuple[str, str]]:
    """The ``--pairs`` list as ``(teacher, student)`` tuples."""
    pairs = [tuple(p.strip().split(":")) for p in spec.split(",") if p.strip()]
    if not pairs or any(len(p) != 2 or not all(p) for p in pairs):
        raise UserError("--pairs takes teacher:student pairs, e.g. resnet32x4:resnet8x4")
    return pairs


def baseline_methods(args: argparse.Namespace, methods: list[str]) -> set[str]:
    """The methods that get a baseline run (``--baseline_methods``)."""
    if args.baseline_methods == "all":
        return set(methods)
    if args.baseline_methods == "none":
        return set()
    return {m.strip() for m in args.baseline_methods.split(",")}


def make_configs(args: argparse.Namespace, pairs: list[tuple[str, str]], methods: list[str],
                 commit: str | None) -> list[Config]:
    """Every configuration to measure, each followed by its baseline: ``--baseline_flags`` (on this
    code or on ``commit``) once per pair and method, or, on ``commit`` without ``--baseline_flags``,
    each configuration's own flags."""
    loaders = ["tensor", "torchvision"] if args.loader == "both" else [args.loader]
    extra = shlex.split(args.flags)
    base_flags = args.baseline_flags if args.baseline_flags is not None or commit else BASELINE_FLAGS
    chosen = baseline_methods(args, methods)
    at = f" @ {commit[:10]}" if commit else ""
    configs = []
    for (teacher, student), method in itertools.product(pairs, methods):
        group = f"{method} {teacher}:{student}"
        measured = [Config(teacher, student, method, ["--loader", loader] + extra,
                           " ".join(["--loader", loader] + extra), group=group) for loader in loaders]
        configs += measured
        if method not in chosen:
            continue
        if base_flags is not None:
            flags = shlex.split(base_flags)
            configs.append(Config(teacher, student, method, flags, f"baseline: {' '.join(flags) or 'defaults'}{at}",
                                  True, group, commit))
            continue
        for config in measured:  # the same command line on the commit's code
            config.group = f"{group} {config.label}"
            configs.append(Config(teacher, student, method, config.flags, f"baseline: {config.label}{at}", True,
                                  config.group, commit))
    return configs


def check_flags(configs: list[Config], args: argparse.Namespace) -> None:
    """Parse each command line of this code's configurations once before measuring anything, so
    that a flag ``train_student.py`` refuses is one error line at once (:class:`UserError`)."""
    for flags in {tuple(c.flags) for c in configs if c.commit is None}:
        config = next(c for c in configs if tuple(c.flags) == flags)
        try:
            parse_training(training_argv(args, config, Path("teacher.pth"), "."))
        except UserError as err:
            raise UserError(f"[{config.label}]: {err}") from None


# ---------------------------------------------------------------- main
def measure_one(config: Config, args: argparse.Namespace, teacher_dir: Path, save_folder: str,
                code_root: Path | None) -> dict[str, Any]:
    """One round of ``config``: a commit's code always in a child process, this code in one unless
    ``--in_process``."""
    if config.commit is not None:
        return measure_isolated(config, args, teacher_dir, save_folder, code_root)
    if args.in_process:
        return measure(config, args, teacher_dir, save_folder)
    return measure_isolated(config, args, teacher_dir, save_folder)


def measure_rounds(configs: list[Config], args: argparse.Namespace, teacher_dir: Path, save_folder: str,
                   code_root: Path | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``--rounds`` passes over the configurations (A B A B ...): each one's median round, and those
    skipped (a :class:`UserError`: a pair the method cannot serve, a K the data cannot give, ...)."""
    runs: dict[int, list[dict[str, Any]] | None] = {index: [] for index in range(len(configs))}
    skipped = []
    for round_number, (index, config) in itertools.product(range(1, args.rounds + 1), enumerate(configs)):
        if runs[index] is None:
            continue
        where = f" (round {round_number} of {args.rounds})" if args.rounds > 1 else ""
        print(f"measuring {config.name}{where} ...", flush=True)
        try:
            r = measure_one(config, args, teacher_dir, save_folder, code_root)
        except UserError as err:
            skipped.append({"name": config.name, "pair": config.pair, "method": config.method,
                            "baseline": config.baseline, "commit": config.commit, "error": str(err)})
            print(f"  skipped: {err}", flush=True)
            runs[index] = None
            continue
        runs[index].append(r)
        print(f"  {r['images_per_s']:.0f} images/s, loss {r['share']['loss_fwd_bwd']:.1f}% of the step, "
              f"phased/real {r['phased_over_real']:.2f}", flush=True)
    return [median_round(r) for r in runs.values() if r], skipped


def run_all(args: argparse.Namespace, pairs: list[tuple[str, str]], methods: list[str], tmp: Path
            ) -> tuple[list[Config], dict[str, Any]]:
    """Export the baseline commit (if any), check every command line, make the teachers, then
    measure the configurations and the pipelines alone."""
    code_root, commit = None, None
    if args.baseline_ref and methods and args.baseline_methods != "none":
        code_root = tmp / "baseline_code"
        commit = export_ref(args.baseline_ref, code_root)
    configs = make_configs(args, pairs, methods, commit)
    check_flags(configs, args)
    teacher_dir = Path(args.teacher_dir) if args.teacher_dir else tmp / "teachers"
    for arch in sorted({c.teacher for c in configs} | {LOADER_PAIR[0]}):  # one file for both codes
        teacher_checkpoint(arch, teacher_dir, args.classes)
    save_folder = tmp / "runs"
    save_folder.mkdir(parents=True)
    results, skipped = measure_rounds(configs, args, teacher_dir, str(save_folder), code_root)
    notes: list[str] = []
    loaders = {} if args.no_loader_check else loader_timing(args, teacher_dir, str(save_folder), notes)
    return configs, {"configs": results, "skipped": skipped, "loaders": loaders, "notes": notes}


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Measure, print the report and write it to ``--json``; returns it."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        run_child(argv[1], argv[2])
        return None
    args = build_parser().parse_args(join_flag_values(argv))
    check_args(args)
    pairs = resolve_pairs(args.pairs)
    methods = [] if args.data_only else resolve_methods(args.methods)
    expectations = read_expectations(args, methods, pairs)
    device = str(resolve_device(args.device))
    load_before = _load_average()
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        configs, measured = run_all(args, pairs, methods, Path(tmp))
    report = make_report(args, device, methods, configs, measured, (load_before, _load_average()), expectations)
    print(render(report), flush=True)
    if args.json:
        write_json(Path(args.json), report)
    return report


if __name__ == "__main__":
    sys.exit(exit_status(main()))
