"""How a run executes: device, mixed precision, memory format, compilation, determinism, seeds
and the random-number states a resume restores."""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from common.argtypes import float_in
from common.declare import option
from common.distributed import DistInfo
from common.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU; asking for ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is visible: use --device cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device '{name}': use auto, cpu or cuda") from None


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# --dist_timeout is not float32 arithmetic: it becomes a datetime.timedelta (at most 999,999,999
# days), which torch hands the process group in whole milliseconds (less than 1 ms would be 0).
timeout_minutes = float_in(1 / 60000, datetime.timedelta.max / datetime.timedelta(minutes=1), float32=False,
                           name="timeout_minutes")


@dataclass
class RuntimeOptions:
    """device and speed"""

    device: str = option("auto", "auto, cpu or cuda (auto: cuda when available)", resumable=True)
    deterministic: bool = option(False, "deterministic kernels, no cuDNN autotuning (exact resume on CPU)",
                                 resumable=True)
    amp: str = option("off", "mixed precision of the forward passes (fp16 with loss scaling); NCE, KL and Sinkhorn "
                      "stay fp32", choices=tuple(AMP_DTYPES))
    channels_last: bool = option(False, "channels_last memory format for the networks and images",
                                 resumable=True)
    compile: bool = option(False, "torch.compile the networks (the first steps are slow)", resumable=True)
    sync_bn: bool = option(False, "under torchrun, BatchNorm statistics over all processes' batches (SyncBatchNorm)")
    dist_timeout: float = option(10.0, "under torchrun: minutes a process waits for the others (in a collective) "
                                 "before it stops and names the rank that stopped answering (at least 1 ms)",
                                 type=timeout_minutes, resumable=True)


@dataclass
class Runtime:
    """How a run executes: its ``device``, mixed precision (``amp``: off, bf16 or fp16),
    ``channels_last`` memory format, ``compile``, its place among ``torchrun``'s processes and
    how long (minutes) it waits for the others in a collective (``dist_timeout``)."""

    device: torch.device
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    dist: DistInfo = field(default_factory=DistInfo)
    dist_timeout: float | None = None

    def autocast(self):
        """The autocast context of the forward passes (a no-op with ``amp`` off). Losses that need
        fp32 (NCE, softmax/KL, Sinkhorn) turn it off locally."""
        dtype = AMP_DTYPES[self.amp]
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler for fp16 (a pass-through otherwise)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the run's device; image batches in channels_last when asked for."""
        tensor = tensor.to(self.device, non_blocking=True)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def place(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device (and channels_last memory format); returns it."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def seed_rank(self, seed: int) -> None:
        """After the models are built (with the same seed on every rank), give ranks other than 0
        their own random stream for augmentation and sampling."""
        if self.dist.rank > 0:
            set_seed(seed + 1_000_003 * self.dist.rank)

    def describe(self) -> str:
        """E.g. ``cpu``, ``cuda:0 (bf16, channels_last)`` or ``4 processes (nccl), ...``."""
        flags = [f for f, on in (("bf16", self.amp == "bf16"), ("fp16", self.amp == "fp16"),
                                 ("channels_last", self.channels_last), ("compile", self.compile)) if on]
        where = str(self.device)
        if self.dist.enabled:
            where = f"{self.dist.world_size} processes ({self.dist.backend}, {self.device.type})"
        return where + (f" ({', '.join(flags)})" if flags else "")

    def forward_fn(self, model: nn.Module):
        """What to call for ``model``'s forward: ``torch.compile(model)`` with ``--compile``, else
        ``model``. Weights stay in ``model`` (saved without compile's prefixes)."""
        return torch.compile(model) if self.compile else model


def set_deterministic(on: bool, device: torch.device) -> None:
    """``--deterministic``: deterministic kernels (warning where none exists) and no cuDNN
    autotuning; otherwise cuDNN picks the fastest convolution algorithms on GPUs."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = device.type == "cuda" and not on


def rng_state() -> dict:
    """The states of every random number generator a run draws from (Python, numpy, torch CPU
    and CUDA), for an exact resume, as tensors and plain numbers (a checkpoint holds nothing else)."""
    state = {**plain_rng_states(random.getstate(), np.random.get_state()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def plain_rng_states(python_state: tuple, numpy_state: tuple) -> dict:
    """``random.getstate()`` and ``np.random.get_state()`` as tensors and numbers (what
    :func:`set_rng_state` reads)."""
    version, words, gauss = python_state
    kind, keys, pos, has_gauss, cached = numpy_state
    return {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
