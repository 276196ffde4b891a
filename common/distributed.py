"""Multi-process training with ``torchrun`` (PyTorch DDP): process-group set-up, the collectives
the loop and the memory banks need, and the samplers that shard the data across ranks.

One process per device. ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without
them (a plain ``python train_student.py``) everything here is a no-op for a world of one.
"""
from __future__ import annotations

import datetime
import math
import os
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Sampler

from common.errors import Stopped, UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device, timeout_min: float | None = None) -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes (``nccl`` for CUDA, ``gloo`` for the CPU)
    and return this process's :class:`DistInfo` and device (``cuda:LOCAL_RANK`` on GPUs).
    ``timeout_min`` (``--dist_timeout``): minutes a collective waits for the other ranks before it
    fails (None: torch's default). Without ``torchrun`` (``WORLD_SIZE`` unset or 1) returns a
    world of one and ``device``."""
    if dist.is_available() and dist.is_initialized():
        return current(), device
    if not launched_by_torchrun():
        return DistInfo(), device
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed: run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                            "use --nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_min) if timeout_min else None
    dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout else {}))
    return current(), device


def current() -> DistInfo:
    """The :class:`DistInfo` of this process (a world of one when no process group is up)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    dist.get_backend())


class RankLost(Stopped):
    """Under torchrun, a collective failed because another rank stopped answering (it hung,
    crashed or fell behind by more than ``--dist_timeout``); the message names it."""

    exit_code = 1


# What gloo, NCCL and torch's store say when a collective times out or a peer's connection drops
# (other backend errors, e.g. this rank's own CUDA fault, are not about another rank).
_PEER_LOST = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "remote process exited")


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because of another rank (a timeout, or a
    peer whose connection dropped) rather than an error of this rank's own."""
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _PEER_LOST)


def _lost_key(rank: int) -> str:
    return f"repdistill/collective_failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def lost_rank_error(err: BaseException, timeout_min: float | None, grace_s: float | None = None) -> RankLost:
    """The one-line :class:`RankLost` for a collective that failed with ``err`` on this rank.

    Every rank whose collective fails marks itself in the process group's store (torchrun's),
    then waits up to ``grace_s`` (default: a tenth of the timeout, 1 to 10 s) for the other ranks'
    marks: those that did not fail are not in a collective at all, so they are the ones that
    stopped answering. When every other rank had already given up, this rank is the one that
    fell behind. (Call it while the process group is still up.)"""
    info = current()
    if "imed out" not in str(err):
        wait = "a connection between ranks dropped: a rank ended or crashed"
    elif timeout_min:
        wait = f"no reply within --dist_timeout {timeout_min:g} minutes"
    else:
        wait = "a collective timed out"
    if grace_s is None:
        grace_s = min(10.0, max(1.0, 6.0 * (timeout_min or 1.0)))
    try:
        store = dist.distributed_c10d._get_default_store()  # noqa: SLF001 (torchrun's store; no public getter)
        others = [r for r in range(info.world_size) if r != info.rank]
        already = [r for r in others if store.check([_lost_key(r)])]
        store.set(_lost_key(info.rank), "1")
        if others and len(already) == len(others):
            return RankLost(f"error: this rank ({info.rank} of {info.world_size}) fell behind: the others gave up "
                            f"waiting for it ({wait}); see why it was slow, or raise --dist_timeout")
        deadline = time.monotonic() + grace_s
        missing = others
        while time.monotonic() < deadline:
            missing = [r for r in others if not store.check([_lost_key(r)])]
            if not missing:
                break
            time.sleep(0.1)
    except Exception:  # the store lives with rank 0 or torchrun's agent: it may be gone too
        return RankLost(f"error: rank {info.rank} of {info.world_size}: {wait}; another rank stopped or crashed "
                        "and it could not be told which: see the other ranks' output")
    if not missing:
        return RankLost(f"error: every rank's collective failed ({wait}): the ranks lost contact with each other "
                        "(network?) or disagree on the collectives they run")
    names = ", ".join(str(r) for r in missing)
    which = f"rank{'s' if len(missing) > 1 else ''} {names} of {info.world_size}"
    return RankLost(f"error: {which} stopped answering ({wait}; rank {info.rank} stops here): see "
                    f"{'their' if len(missing) > 1 else 'its'} output for a crash or a hang, or raise "
                    "--dist_timeout if it is only slow")


def is_main_process() -> bool:
    """True on rank 0 (by torchrun's ``RANK`` before the process group is up), and in any
    process that is not launched by torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def say(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushed), so that a line is not repeated once per process."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor; ``tensor`` itself in a world of one)."""
    if not current().enabled:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (any first-dimension size per rank) from all ranks along dim 0, in
    rank order; no gradient. In a world of one, ``tensor`` itself."""
    if not current().enabled:
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes_list = [int(s) for s in sizes]
    longest = max(sizes_list)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes_list)])


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one rank (every rank gets the same answer)."""
    if not current().enabled:
        return flag
    return bool(all_reduce_sum(torch.tensor([int(flag)], device=device)).item() > 0)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a world of one)."""
    if not current().enabled:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself in a world of one)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, so that each rank validates and
    saves the same model; the DDP wrapper leaves them per rank (``forward_sync_buffers=False``)."""
    if not current().enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def average_gradients(params) -> None:
    """Average the gradients of ``params`` over ranks (for stages that are not DDP-wrapped)."""
    if not current().enabled:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel when running under torchrun, else ``module`` itself.

    Buffers are broadcast from rank 0 once, at the start, not at every forward: the memory banks are kept identical by their own
    all-gather (see ``crd.memory``), and BatchNorm statistics are copied from rank 0 before each
    validation (:func:`broadcast_buffers`)."""
    if not current().enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False,
                                               find_unused_parameters=find_unused_parameters)


class EpochSampler(Sampler[int]):
    """The training order: a permutation of ``range(n)`` drawn from ``seed + epoch`` (the same on
    every rank), of which rank ``r`` of ``W`` takes positions ``r, r + W, ...`` after padding the
    permutation with its own head to a multiple of ``W`` (as ``DistributedSampler`` does).

    Because the order depends only on ``(seed, epoch)``, a resumed run sees the same order;
    :meth:`skip` makes the next pass start after the first ``count`` indices (resuming mid-epoch).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, int(seed), rank, world_size, shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, count: int) -> None:
        """Leave out the first ``count`` indices of the next pass only."""
        self._skip = count

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n)
        padded = math.ceil(self.n / self.world_size) * self.world_size
        if padded > self.n:
            order = torch.cat([order, order[: padded - self.n]])
        mine = order[self.rank::self.world_size].tolist()
        skip, self._skip = self._skip, 0
        return iter(mine[skip:])


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``W`` takes the indices ``r, r + W, ...`` of ``range(n)``, in order, without
    padding, so that the per-rank sums of a validation add up to the whole set exactly once."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
