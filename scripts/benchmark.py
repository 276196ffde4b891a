"""Time the real training step of ``train_student.py`` on synthetic batches.

    python scripts/benchmark.py                                   # CRD and KD, resnet32x4 -> resnet8x4, CPU or GPU
    python scripts/benchmark.py --methods all --steps 10          # every --distill method on that pair
    python scripts/benchmark.py --pairs resnet56:resnet20,vgg13:vgg8 --methods crd --device cuda --json out.json
    python scripts/benchmark.py --baseline_ref 67003d6 --rounds 3 # baseline: the code of a commit
    python scripts/benchmark.py --data_only                       # the data pipelines alone

Every configuration (teacher, student, method, loader) is built by ``train_student.build_run``
from a ``train_student.py`` command line on the synthetic set (``--dataset synthetic``, CIFAR-shaped,
``--n_data`` training images; the teachers have random weights whose BatchNorm statistics are set
on one batch, saved in RepDistiller's layout ``<arch>_vanilla/ckpt_epoch_240.pth``, or your
checkpoints with ``--teacher_dir``). Then, after ``--warmup`` steps of each kind, ``--steps`` real
steps and ``--steps`` phased steps, alternating (so that both see the same machine load):

* **real step**: one step of ``helper.loops.train_one_epoch`` itself (the code ``train_student.py``
  runs: autocast, the ``DistillStep``, the finite check, ``zero_grad``, backward, optimiser step,
  accuracy) on the run's own train loader. Their wall time gives images/s and steps/s.
* **phased step**: the same ``DistillStep.forward``, timed by part: forward hooks on the student
  and the teachers time their forwards, and the student's hook hands the loss detached copies
  of its outputs, so that the backward runs in two calls: ``loss.backward()`` (the loss terms'
  backward down to the student's outputs, and into the Distillers' heads) and then
  ``torch.autograd.backward(student outputs, their gradients)`` (the student's backward). The
  gradients are those of one backward (chain rule; ``tests/test_benchmark.py`` checks it); the
  phases are disjoint intervals of the step, so with ``other`` (accuracy) their shares sum to
  100%. ``phased/real`` (mean phased step over mean real step) checks that the split step costs
  what a real step costs.

Phases: ``data`` (next batch from the loader, moved to the device), ``teacher_fwd``,
``student_fwd``, ``loss_fwd`` (everything in ``DistillStep.forward`` besides the two networks:
CE, KD and the method's Distillers, memory-bank update included; summing the terms and their
finite check), ``loss_bwd``, ``student_bwd``, ``optimizer`` (``zero_grad`` + ``step``), ``other``.
On CUDA every phase boundary synchronises the device.

Each configuration is compared with a **plain baseline** in the same run: the same pair and
method with ``--baseline_flags`` (default ``--loader torchvision --nce_scores gather
--plain_teacher``: torchvision's loader, memory-bank rows gathered, the teacher as loaded, default
memory format), or, with ``--baseline_ref COMMIT``, the code of that git commit (e.g. the
one before the fast paths: exported with ``git archive`` into a tmp folder, the repository is not
touched). Flags the measured code's parser does not accept are dropped, with a note. Finally the
data pipelines alone are timed (``--loader`` tensor and torchvision, each with its default
``--num_workers``, batches with augmentation moved to the device), and the issue's targets are
checked and printed.

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
import contextlib
import gc
import io
import inspect
import itertools
import json
import os
import platform
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
CODE_ROOT = Path(os.environ.get("BENCHMARK_CODE_ROOT") or ROOT)
sys.path.insert(0, str(CODE_ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import train_student  # noqa: E402
from helper.errors import UserError  # noqa: E402
from helper.logger import write_json  # noqa: E402
from helper.loops import StepBudget, check_finite, train_one_epoch  # noqa: E402
from helper.meters import accuracy  # noqa: E402
from helper.optim import adjust_learning_rate  # noqa: E402
from helper.runtime import Runtime, resolve_device, setup_runtime  # noqa: E402
from models import build_model  # noqa: E402

# Flags of the plain baseline path; those the measured code's parser does not accept are dropped
# (with a note), so older commits (--baseline_ref) and newer switches both work.
BASELINE_FLAGS = "--loader torchvision --nce_scores gather --plain_teacher"
PHASES = ("data", "teacher_fwd", "student_fwd", "loss_fwd", "loss_bwd", "student_bwd", "optimizer", "other")
# The table's shares (percent of the phased step); they sum to 100.
SHARES = {"data": ("data",), "teacher_fwd": ("teacher_fwd",), "student_fwd_bwd": ("student_fwd", "student_bwd"),
          "loss_fwd_bwd": ("loss_fwd", "loss_bwd"), "optimizer": ("optimizer",), "other": ("other",)}
# The targets (CPU, resnet32x4 -> resnet8x4, batch 64, K 16384, N 50000).
TARGET_PAIR, TARGET_SETTINGS = "resnet32x4:resnet8x4", {"batch_size": 64, "nce_k": 16384, "n_data": 50000}
CRD_SPEEDUP, LOSS_SHARE, LOADER_SPEEDUP = 2.5, 10.0, 5.0


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


def parser_flags(parser: argparse.ArgumentParser, tokens: list[str]) -> tuple[list[str], list[str]]:
    """Split ``tokens`` (``--flag [values]`` groups) into those ``parser`` accepts and those it
    does not know (or whose value is not one of its choices): ``(kept, dropped)``."""
    groups: list[list[str]] = []
    for token in tokens:
        if token.startswith("-") and not _is_number(token) or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    kept, dropped = [], []
    actions = parser._option_string_actions  # noqa: SLF001 (argparse has no public lookup)
    for group in groups:
        flag = group[0].split("=", 1)[0]
        action = actions.get(flag)
        values = group[1:] + group[0].split("=", 1)[1:]
        ok = action is not None and (action.choices is None or all(
            _convert(action, v) in action.choices for v in values))
        (kept if ok else dropped).extend(group)
    return kept, dropped


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _convert(action: argparse.Action, value: str) -> Any:
    try:
        return action.type(value) if callable(action.type) else value
    except (TypeError, ValueError):
        return value


def _load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


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


# ---------------------------------------------------------------- one configuration
class Config:
    """One measured configuration: a teacher/student pair, a method, ``train_student.py`` flags
    (those the measured code's parser does not accept are dropped) and, for ``--baseline_ref``,
    the git commit whose code is measured (None: this checkout)."""

    def __init__(self, teacher: str, student: str, method: str, flags: list[str], label: str, baseline: bool,
                 commit: str | None = None):
        self.teacher, self.student, self.method = teacher, student, method
        self.flags, self.label, self.baseline, self.commit = flags, label, baseline, commit

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @property
    def pair(self) -> str:
        return f"{self.teacher}:{self.student}"

    @property
    def name(self) -> str:
        return f"{self.method} {self.teacher}->{self.student} [{self.label}]"


def base_argv(args: argparse.Namespace, teacher_path: Path, config: Config, save_folder: str,
              flags: list[str]) -> list[str]:
    """The ``train_student.py`` command line of ``config`` on the synthetic set."""
    per_class = max(1, args.n_data // args.classes)
    return ["--path_t", str(teacher_path), "--model_s", config.student, "--distill", config.method,
            "--dataset", "synthetic", "--synthetic_classes", str(args.classes),
            "--synthetic_train", str(per_class), "--synthetic_test", "1",
            "--batch_size", str(args.batch_size), "--nce_k", str(args.nce_k), "--device", args.device,
            "--epochs", "1", "--seed", "1", "--save_folder", save_folder, *flags]


def build_parts(opt, runtime: Runtime):
    """What train_student.py trains with: ``train_student.build_run``, or for code from before it
    existed (``--baseline_ref``), the same construction as that code's ``train()``."""
    if hasattr(train_student, "build_run"):
        return train_student.build_run(opt, runtime)
    from dataset import get_dataloaders
    from distiller_zoo.registry import build_distiller, get_method
    from helper.optim import build_optimizer
    from helper.steps import DistillStep
    from helper.teacher import load_teacher

    method = get_method(opt.distill)
    data = get_dataloaders(opt, instance=method.needs_index, contrast=method.needs_contrast_idx)
    opt.num_classes, opt.n_data = data.num_classes, data.n_data
    student = runtime.place(build_model(opt.arch, num_classes=data.num_classes))
    teachers = []
    for path in opt.path_t.split(","):
        teacher, arch = load_teacher(path.strip(), data.num_classes, opt.dataset)
        teachers.append((runtime.place(teacher).eval().requires_grad_(False), arch, path.strip()))
    sample = runtime.to_device(torch.stack([data.val_loader.dataset[i][0] for i in range(2)]))
    distillers = nn.ModuleList([build_distiller(opt.distill, opt, student, teacher, sample)
                                for teacher, _, _ in teachers])
    runtime.place(distillers)
    runtime.seed_rank(opt.seed)
    step = DistillStep(student, [t for t, _, _ in teachers], distillers, opt, runtime)
    extra = [p for distiller in distillers for p in distiller.trainable_parameters()]
    optimizer = build_optimizer(list(student.parameters()) + extra, opt)
    return SimpleNamespace(method=method, data=data, student=student, teachers=teachers, distillers=distillers,
                           step=step, optimizer=optimizer)


def batches_forever(loader, first_epoch: int = 1) -> Iterator:
    """The loader's batches, epoch after epoch (``set_epoch`` as ``Fit`` does)."""
    sampler = getattr(loader, "sampler", None)
    for epoch in itertools.count(first_epoch):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader


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


def phased_step(step: nn.Module, batches: Iterator, optimizer: torch.optim.Optimizer, scaler, runtime: Runtime,
                hooks: PhaseHooks, clock: Clock, number: int) -> dict[str, float]:
    """One training step as train_one_epoch runs it, timed by phase (seconds)."""
    hooks.reset()
    t0 = clock()
    raw = next(batches)
    batch = step.batch(raw) if hasattr(step, "batch") else raw
    t1 = clock()
    with runtime.autocast():
        logits, target, terms = step(batch)
    loss = sum(terms.values())
    check_finite({name: term.item() for name, term in terms.items()}, "the benchmark", number)
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


def measure(config: Config, args: argparse.Namespace, teacher_dir: Path, save_folder: str) -> dict[str, Any]:
    """Build ``config`` as train_student.py does and time its steps (see the module docstring)."""
    gc.collect()  # the previous configuration's modules and tensors (cycles) go before measuring
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    before_mb = PeakMemory.rss_mb()
    teacher_path = teacher_checkpoint(config.teacher, teacher_dir, args.classes)
    flags, dropped = parser_flags(train_student.build_parser(), config.flags)
    argv = base_argv(args, teacher_path, config, save_folder, flags)
    quiet = contextlib.redirect_stdout(io.StringIO()) if not args.verbose else contextlib.nullcontext()
    with quiet:
        opt = train_student.parse_option(argv)
        runtime = setup_runtime(opt)
        built = time.perf_counter()
        parts = build_parts(opt, runtime)
        build_s = time.perf_counter() - built
    clock = Clock(runtime.device)
    memory = PeakMemory(runtime.device, before_mb)
    step, optimizer = parts.step, parts.optimizer
    scaler = runtime.grad_scaler()
    scaler = scaler if scaler.is_enabled() else None
    adjust_learning_rate(1, opt, optimizer)
    for distiller in parts.distillers:
        distiller.start_epoch(1)
    batches = batches_forever(parts.data.train_loader)
    step.train()

    def real_step() -> float:  # one step of train_one_epoch itself, as train_student.py runs it
        start = clock()
        train_one_epoch(1, itertools.islice(batches, 1), step, step, optimizer, StepBudget(None),
                        scaler=scaler, autocast=runtime.autocast, device=runtime.device)
        return clock() - start

    def timed_phases(number: int) -> dict[str, float]:
        hooks = PhaseHooks(step.student, list(step.teachers), clock)
        try:
            return phased_step(step, batches, optimizer, scaler, runtime, hooks, clock, number)
        finally:
            hooks.remove()

    # Real and phased steps alternate, so that both see the same conditions (a busy machine).
    for i in range(args.warmup):
        real_step()
        timed_phases(i + 1)
    memory.start()
    real, phased = [], []
    for i in range(args.steps):
        real.append(real_step())
        phased.append(timed_phases(i + 1))
    peak_mb, peak_rss_mb = memory.peak_mb()

    ms = {phase: 1000 * sum(t[phase] for t in phased) / len(phased) for phase in PHASES}
    phased_ms = 1000 * sum(t["total"] for t in phased) / len(phased)
    real_s = sum(real)
    real_ms = 1000 * real_s / args.steps
    share = {name: 100 * sum(ms[p] for p in parts_) / phased_ms for name, parts_ in SHARES.items()}
    result = {
        "name": config.name, "pair": config.pair, "teacher": config.teacher, "student": config.student,
        "method": config.method, "label": config.label, "baseline": config.baseline,
        "flags": flags, "dropped_flags": dropped, "commit": config.commit, "argv": argv,
        "device": str(runtime.device), "runtime": runtime.describe(),
        "loader": getattr(opt, "loader", "torchvision"), "num_workers": getattr(opt, "num_workers", None),
        "weights": {"gamma": opt.gamma, "alpha": opt.alpha, "beta": opt.beta},
        "batch_size": opt.batch_size, "nce_k": opt.nce_k, "n_data": parts.data.n_data,
        "steps": args.steps, "warmup": args.warmup, "build_s": build_s,
        "images_per_s": args.steps * opt.batch_size / real_s, "steps_per_s": args.steps / real_s,
        "real_step_ms": real_ms, "real_step_ms_median": 1000 * statistics.median(real),
        "phased_step_ms": phased_ms, "phased_over_real": phased_ms / real_ms,
        "ms": ms, "share": share,
        "peak_mem_mb": peak_mb, "peak_mem_kind": memory.kind, "peak_rss_mb": peak_rss_mb,
        "peak_mem_reset": memory.reset_ok,
        "teacher_seen": all(t["teacher_seen"] for t in phased),
    }
    return result


# ---------------------------------------------------------------- the data pipelines alone
def measure_loader(loader_name: str | None, args: argparse.Namespace, teacher_dir: Path, save_folder: str,
                   contrast: bool) -> dict[str, Any]:
    """Images/s of iterating the train loader of ``--loader loader_name`` (plain batches, or CRD's
    with ``index`` and ``contrast_idx``), each batch moved to the device."""
    from dataset import get_dataloaders

    config = Config("resnet8", "resnet8", "crd" if contrast else "kd",
                    ["--loader", loader_name] if loader_name else [], loader_name or "default", False)
    argv = base_argv(args, teacher_checkpoint("resnet8", teacher_dir, args.classes), config, save_folder,
                     config.flags)
    quiet = contextlib.redirect_stdout(io.StringIO()) if not args.verbose else contextlib.nullcontext()
    with quiet:
        opt = train_student.parse_option(argv)
        runtime = setup_runtime(opt)
        device_kw = {"device": runtime.device} if "device" in inspect.signature(get_dataloaders).parameters else {}
        data = get_dataloaders(opt, instance=contrast, contrast=contrast, **device_kw)
    clock = Clock(runtime.device)
    batches = batches_forever(data.train_loader)
    for _ in range(args.warmup):
        [runtime.to_device(t) for t in next(batches)]
    start, images = clock(), 0
    for _ in range(args.data_batches):
        batch = [runtime.to_device(t) for t in next(batches)]
        images += batch[0].shape[0]
    seconds = clock() - start
    return {"loader": getattr(opt, "loader", "torchvision"), "contrast": contrast,
            "num_workers": getattr(opt, "num_workers", None), "batches": args.data_batches,
            "batch_size": opt.batch_size, "images_per_s": images / seconds, "device": str(runtime.device)}


# ---------------------------------------------------------------- report
def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of one configuration's rounds, the one with the median images/s (the lower middle one for
    an even count), with every round's images/s added as ``images_per_s_rounds``."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["images_per_s_rounds"] = [r["images_per_s"] for r in runs]
    return chosen


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| config | images/s | steps/s | % data | % teacher fwd | % student fwd+bwd | % loss fwd+bwd "
             "| % optimizer | % other | peak mem (MB) | phased/real |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["share"]
        lines.append(f"| {r['name']} | {r['images_per_s']:.0f} | {r['steps_per_s']:.2f} | {s['data']:.1f} "
                     f"| {s['teacher_fwd']:.1f} | {s['student_fwd_bwd']:.1f} | {s['loss_fwd_bwd']:.1f} "
                     f"| {s['optimizer']:.1f} | {s['other']:.1f} | {r['peak_mem_mb']:.0f} | {r['phased_over_real']:.2f} |")
    return "\n".join(lines)


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measured configuration against the baseline of its pair and method."""
    base = {(r["pair"], r["method"]): r for r in results if r["baseline"]}
    out = []
    for r in results:
        b = base.get((r["pair"], r["method"]))
        if r["baseline"] or b is None:
            continue
        out.append({"name": r["name"], "pair": r["pair"], "method": r["method"], "label": r["label"],
                    "images_per_s": r["images_per_s"], "baseline_images_per_s": b["images_per_s"],
                    "images_per_s_ratio": r["images_per_s"] / b["images_per_s"],
                    "loss_share": r["share"]["loss_fwd_bwd"], "baseline_loss_share": b["share"]["loss_fwd_bwd"],
                    "peak_mem_mb": r["peak_mem_mb"], "baseline_peak_mem_mb": b["peak_mem_mb"]})
    return out


def targets(args: argparse.Namespace, device: str, results: list[dict[str, Any]], compared: list[dict[str, Any]],
            loaders: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked on what this run measured (``settings_match`` says whether the
    run used the targets' CPU / batch / K / N settings)."""
    settings = {"batch_size": args.batch_size, "nce_k": args.nce_k, "n_data": args.n_data}
    match = device == "cpu" and settings == TARGET_SETTINGS
    found = []
    for c in compared:
        if c["method"] == "crd":
            found.append({"target": f"CRD {c['pair']} [{c['label']}]: images/s vs plain baseline >= {CRD_SPEEDUP}x",
                          "value": c["images_per_s_ratio"], "met": c["images_per_s_ratio"] >= CRD_SPEEDUP,
                          "settings_match": match and c["pair"] == TARGET_PAIR})
    for r in results:
        if not r["baseline"]:
            found.append({"target": f"{r['method']} {r['pair']} [{r['label']}]: loss share <= {LOSS_SHARE:g}% of the step",
                          "value": r["share"]["loss_fwd_bwd"], "met": r["share"]["loss_fwd_bwd"] <= LOSS_SHARE,
                          "settings_match": match and r["pair"] == TARGET_PAIR})
    if loaders.get("ratio") is not None:
        found.append({"target": f"tensor loader alone vs torchvision DataLoader: images/s >= {LOADER_SPEEDUP}x",
                      "value": loaders["ratio"], "met": loaders["ratio"] >= LOADER_SPEEDUP,
                      "settings_match": device == "cpu"})
    return found


# ---------------------------------------------------------------- isolation
def export_ref(ref: str, dest: Path) -> str:
    """Write the tree of git ``ref`` of this checkout into ``dest`` (``git archive``; the
    repository is not touched); returns the commit."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                                capture_output=True, text=True, check=True).stdout.strip()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"error: --baseline_ref {ref}: not a commit of the git checkout {ROOT} ({err})") from None
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return commit


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


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Time train_student.py's training step on synthetic batches.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pairs", default=TARGET_PAIR, help="comma-separated teacher:student pairs")
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
    p.add_argument("--baseline_flags", default=BASELINE_FLAGS,
                   help="train_student.py flags of the plain baseline (unknown ones are dropped)")
    p.add_argument("--baseline_ref", default=None,
                   help="measure the baselines on the code of this git commit (e.g. the one before the fast "
                        "paths), exported to a tmp folder and run in a child process")
    p.add_argument("--in_process", action="store_true",
                   help="measure every configuration in this process (quicker to start; peak-memory deltas "
                        "and the allocator's state then carry over between configurations)")
    p.add_argument("--baseline_methods", default="all",
                   help="methods that get a baseline run: 'all', 'none' or a comma-separated list")
    p.add_argument("--data_batches", type=int, default=50, help="batches of the loader-alone timing")
    p.add_argument("--no_loader_check", action="store_true", help="skip the loader-alone timing")
    p.add_argument("--data_only", action="store_true", help="time the data pipelines alone, nothing else")
    p.add_argument("--teacher_dir", default=None,
                   help="folder with <arch>_vanilla/ckpt_epoch_240.pth teachers (default: random ones in a tmp folder)")
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


def resolve_methods(spec: str) -> list[str]:
    from distiller_zoo.registry import method_names
    if spec == "all":
        return method_names()
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    known = set(method_names())
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return methods


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--_child"]:
        run_child(argv[1], argv[2])
        return None
    args = build_parser().parse_args(join_flag_values(argv))
    if args.steps < 1 or args.warmup < 0 or args.data_batches < 1 or args.rounds < 1:
        raise SystemExit("error: --steps, --rounds and --data_batches must be at least 1, --warmup at least 0")
    training_parser = train_student.build_parser()
    notes: list[str] = []
    loader_flag = "--loader" in training_parser._option_string_actions  # noqa: SLF001
    if loader_flag:
        loaders = ["tensor", "torchvision"] if args.loader == "both" else [args.loader]
    else:
        loaders = [None]
        notes.append("train_student.py has no --loader flag yet: the measured configurations use its only loader")
    extra, baseline = shlex.split(args.flags), shlex.split(args.baseline_flags)
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit("error: --pairs takes teacher:student pairs, e.g. resnet32x4:resnet8x4")
    methods = [] if args.data_only else resolve_methods(args.methods)
    with_baseline = (set(methods) if args.baseline_methods == "all" else set() if args.baseline_methods == "none"
                     else {m.strip() for m in args.baseline_methods.split(",")})

    configs = []
    for teacher, student in pairs:
        for method in methods:
            for loader in loaders:
                flags = (["--loader", loader] if loader else []) + extra
                label = " ".join(flags) or "defaults"
                configs.append(Config(teacher, student, method, flags, label, baseline=False))
            if method in with_baseline:
                label = "baseline: " + (" ".join(baseline) or "defaults") + (f" @ {args.baseline_ref}"
                                                                             if args.baseline_ref else "")
                configs.append(Config(teacher, student, method, baseline, label, baseline=True))

    device = str(resolve_device(args.device))
    load_before = _load_average()
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    loader_results: dict[str, Any] = {}
    baseline_commit = None
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        teacher_dir = Path(args.teacher_dir) if args.teacher_dir else Path(tmp) / "teachers"
        save_folder = str(Path(tmp) / "runs")
        Path(save_folder).mkdir(parents=True)
        ref_root = None
        if args.baseline_ref and with_baseline:
            ref_root = Path(tmp) / "baseline_code"
            baseline_commit = export_ref(args.baseline_ref, ref_root)
        rounds: dict[int, list[dict[str, Any]] | None] = {}
        for round_number, (index, config) in itertools.product(range(1, args.rounds + 1), enumerate(configs)):
            if index in rounds and rounds[index] is None:
                continue  # skipped in an earlier round
            where = f" (round {round_number} of {args.rounds})" if args.rounds > 1 else ""
            print(f"measuring {config.name}{where} ...", flush=True)
            try:
                if config.baseline and ref_root is not None:
                    config.commit = baseline_commit
                    r = measure_isolated(config, args, teacher_dir, save_folder, ref_root)
                elif args.in_process:
                    r = measure(config, args, teacher_dir, save_folder)
                else:
                    r = measure_isolated(config, args, teacher_dir, save_folder)
            except UserError as err:  # a pair the method cannot serve, a K the data cannot give, ...
                skipped.append({"name": config.name, "pair": config.pair, "method": config.method,
                                "baseline": config.baseline, "error": str(err)})
                print(f"  skipped: {err}", flush=True)
                rounds[index] = None
                continue
            rounds.setdefault(index, []).append(r)
            print(f"  {r['images_per_s']:.0f} images/s, loss {r['share']['loss_fwd_bwd']:.1f}% of the step, "
                  f"phased/real {r['phased_over_real']:.2f}", flush=True)
        for index, config in enumerate(configs):
            if not rounds.get(index):
                continue
            r = median_round(rounds[index])
            results.append(r)
            if r["dropped_flags"]:
                note = (f"[{config.label}]: dropped flags that its train_student.py does not accept: "
                        f"{' '.join(r['dropped_flags'])}")
                notes += [note] if note not in notes else []
            if not r["teacher_seen"]:
                notes.append(f"{config.name}: the teacher forward was not observed by the hooks "
                             "(its time is counted in the loss)")
        if not args.no_loader_check:
            names = ["tensor", "torchvision"] if loader_flag else [None]
            runs = []
            for name in names:
                for contrast in (False, True):
                    print(f"measuring the {name or 'default'} loader alone ({'crd batches' if contrast else 'plain'}) ...",
                          flush=True)
                    try:
                        runs.append(measure_loader(name, args, teacher_dir, save_folder, contrast))
                    except UserError as err:
                        notes.append(f"the {name or 'default'} loader alone ({'crd batches' if contrast else 'plain'})"
                                     f" was not measured: {err}")
            loader_results["runs"] = runs
            by = {(r["loader"], r["contrast"]): r["images_per_s"] for r in runs}
            if ("tensor", False) in by and ("torchvision", False) in by:
                loader_results["ratio"] = by[("tensor", False)] / by[("torchvision", False)]
            if ("tensor", True) in by and ("torchvision", True) in by:
                loader_results["ratio_contrast"] = by[("tensor", True)] / by[("torchvision", True)]

    load_after = _load_average()
    busy = max(load_before or 0.0, load_after or 0.0)
    if device == "cpu" and busy > (os.cpu_count() or 1):
        notes.append(f"the 1-minute load average reached {busy:.1f} on {os.cpu_count()} cores: other processes "
                     "shared the CPU, so these timings are slower and noisier than on an idle machine")
    compared = ratios(results)
    checked = targets(args, device, results, compared, loader_results)
    report = {
        "settings": {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "cpu_count": os.cpu_count(), "machine": platform.machine(), "pairs": args.pairs,
                     "methods": methods, "loaders": [name or "default" for name in loaders], "steps": args.steps,
                     "warmup": args.warmup, "rounds": args.rounds, "batch_size": args.batch_size, "nce_k": args.nce_k,
                     "n_data": args.n_data, "flags": extra, "baseline_flags": baseline,
                     "baseline_ref": args.baseline_ref, "baseline_commit": baseline_commit,
                     "isolated": not args.in_process,
                     "data_batches": args.data_batches, "load_average_before": load_before,
                     "load_average_after": load_after},
        "configs": results, "skipped": skipped, "ratios": compared, "loaders": loader_results, "targets": checked, "notes": notes,
    }
    print(render(report), flush=True)
    if args.json:
        write_json(Path(args.json), report)
    return report


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    out = [f"\nRepDistill benchmark: {s['device']} ({s['threads']} threads), torch {s['torch']}, batch {s['batch_size']}, "
           f"K {s['nce_k']}, N {s['n_data']}, {s['steps']} timed steps after {s['warmup']} warm-up", ""]
    if report["configs"]:
        out += [table(report["configs"]), ""]
        out.append("shares: percent of the phased step; images/s and steps/s: the real loop "
                   "(train_one_epoch); peak mem: " + report["configs"][0]["peak_mem_kind"].replace("_", " "))
    for skip in report["skipped"]:
        out.append(f"skipped {skip['name']}: {skip['error']}")
    if report["ratios"]:
        out += ["", "vs the plain baseline (same pair and method):"]
        for c in report["ratios"]:
            out.append(f"- {c['name']}: {c['images_per_s_ratio']:.2f}x images/s ({c['images_per_s']:.0f} vs "
                       f"{c['baseline_images_per_s']:.0f}); loss {c['loss_share']:.1f}% of the step "
                       f"(baseline {c['baseline_loss_share']:.1f}%); peak mem {c['peak_mem_mb']:.0f} vs "
                       f"{c['baseline_peak_mem_mb']:.0f} MB")
    loaders = report["loaders"]
    if loaders.get("runs"):
        out += ["", "data pipelines alone (train batches with augmentation, moved to the device):"]
        for r in loaders["runs"]:
            out.append(f"- {r['loader']} ({'crd batches' if r['contrast'] else 'plain'}, num_workers "
                       f"{r['num_workers']}): {r['images_per_s']:.0f} images/s")
        if loaders.get("ratio") is not None:
            contrast = loaders.get("ratio_contrast")
            out.append(f"- tensor / torchvision: {loaders['ratio']:.2f}x (plain)"
                       + (f", {contrast:.2f}x (crd batches)" if contrast is not None else ""))
    if report["targets"]:
        out += ["", "targets:"]
        for t in report["targets"]:
            where = "" if t["settings_match"] else " (not the target's settings)"
            out.append(f"- {t['target']}: {t['value']:.2f} -> {'met' if t['met'] else 'NOT met'}{where}")
    if report["notes"]:
        out += ["", "notes:"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out)


if __name__ == "__main__":
    main()
