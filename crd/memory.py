"""CRD's memory bank and critic scores (the two views: student and teacher embeddings)."""
from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from common import distributed
from common.errors import UserError
from dataset.sampling import ContrastSampler

# Positions in the ``params`` buffer (RepDistiller's layout).
K_SLOT, T_SLOT, Z_V1_SLOT, Z_V2_SLOT, MOMENTUM_SLOT = range(5)

SCORE_MODES = ("auto", "matmul", "gather")
# Cost of one gathered bank row for one anchor (index_select + bmm forward, embedding_bag
# backward), in units of one bank row of one GEMM pass (``v @ bank.T`` forward or the
# scatter + ``@ bank`` backward), measured (see choose_score_mode).
GATHER_ROW_COST = 50.0
# Largest temporary of the scoring, in elements: anchors are processed in chunks so that a
# chunk's [c, N] matmul scores or [c, K+1, D] gathered rows stay under it (16 MB of fp32).
SCORE_CHUNK_ELEMENTS = 1 << 22


def choose_score_mode(n_data: int, n_scored: int, gemm_passes: float = 2.0, reuse: float = 0.0) -> str:
    """The cheaper exact way to score ``n_scored`` (K+1) rows per anchor of an ``n_data`` (N)-row bank.

    "matmul" scores every row, ``v @ bank.T`` ([B, N], one GEMM), and gathers the [B, K+1]
    wanted scores; its backward scatters the gradient into [B, N] and multiplies by the bank
    (a second GEMM): ``gemm_passes`` = 2 passes over the N rows per anchor. "gather" gathers
    the K+1 rows of each anchor ([c, K+1, D] chunks, then ``bmm``) and its backward is one
    ``embedding_bag``: K+1 rows at ``GATHER_ROW_COST`` each. ``reuse`` is further work per
    gathered row, in GEMM rows, that the matmul path does not repeat (CRCD scores each gathered
    row against its A anchors; its matmul path instead makes one [N, A] GEMM, in ``gemm_passes``).

    Returns "matmul" when ``N * gemm_passes <= (K+1) * (GATHER_ROW_COST + reuse)``, else "gather".
    For CRD the crossover is ``N = 25 (K+1)``: CIFAR-100 (N 50000, K 16384, N/(K+1) = 3) takes
    matmul (6x faster than gather there), ImageNet (N 1281167) takes gather for K below 51000.

    Measured: forward + backward of one view's critic, D 128, 2 threads of a 2-core AVX-512
    CPU, as gather time / matmul time at N/(K+1) (1 = the crossover):
    B 64, K 256: 2.1 at 19.5, 0.98 at 38.9, 0.63 at 77.8; K 1024: 4.9 at 9.8, 1.7 at 19.5, 1.05 at
    39; K 4096: 4.9 at 12.2, 3.4 at 24.4, 1.1 at 48.8 (B 256: 2.7, 1.4, 0.63); K 16384: 6.1 at 3.1,
    1.2 at 12.2, 1.0 at 15.3, 0.71 at 18.3, 0.53 at 24.4. The crossover lies at N/(K+1) = 15 to 50,
    lower when the bank outgrows the caches (K 16384 there means N >= 200000); 25 keeps every
    measured case within 1.5x of the faster mode.
    """
    return "matmul" if n_data * gemm_passes <= n_scored * (GATHER_ROW_COST + reuse) else "gather"


def _chunks(total: int, per_chunk: int) -> list[slice]:
    """Slices of ``range(total)`` of ``per_chunk`` (at least 1) elements."""
    step = max(1, per_chunk)
    return [slice(start, min(start + step, total)) for start in range(0, total, step)]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _matmul_chunks(idx: torch.Tensor, bank: torch.Tensor) -> list[slice]:
    """Chunks of anchors whose [c, N] score matrix stays under ``SCORE_CHUNK_ELEMENTS``."""
    return _chunks(len(idx), SCORE_CHUNK_ELEMENTS // bank.shape[0])


# oneDNN's GEMM for ``a @ b.T`` on CPU in float32 (False once it failed: then torch.mm).
_onednn_gemm = True


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for a [M, D] and b [N, D], without copying either (b may be a transposed view).

    On CPU in float32 this calls oneDNN's GEMM (``torch.ops.mkldnn._linear_pointwise``, the
    kernel PyTorch's compiler uses for linear layers; it reads b in place): for the skinny
    products here (M = 64 against a 50000-row bank, either way round) it took half the time of
    ``torch.mm`` (MKL) on the 2-core AVX-512 CPU this was written on (1 thread: 5.9 against
    13.9 ms forward, 5.7 against 11.5 ms backward), with the same values up to float rounding.
    Anywhere else, or if that operator is missing or fails, ``torch.mm``.
    """
    global _onednn_gemm
    if (_onednn_gemm and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        try:
            return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
        except (AttributeError, RuntimeError, NotImplementedError):
            _onednn_gemm = False
    return a @ b.T


def _scores_matmul(v: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``<bank[idx[b, k]], v[b]>`` [B, K+1] from ``v @ bank.T`` (chunks of anchors), no autograd."""
    return _cat([matmul_nt(v[rows], bank).gather(1, idx[rows]) for rows in _matmul_chunks(idx, bank)])


def _scores_gather(v: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``<bank[idx[b, k]], v[b]>`` [B, K+1] from the gathered rows (chunks of anchors), no autograd."""
    per_chunk = SCORE_CHUNK_ELEMENTS // (idx.shape[1] * bank.shape[1])
    return _cat([torch.bmm(bank.index_select(0, idx[rows].flatten()).view(*idx[rows].shape, -1),
                           v[rows].unsqueeze(2)).squeeze(2)
                 for rows in _chunks(len(idx), per_chunk)])


def _critic(v: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, temperature: torch.Tensor | None,
            mode: str, partition: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """``<bank[idx[b, k]], v[b]>`` [B, K+1], or ``exp(<bank[idx[b, k]], v[b]> / T)`` and then
    divided by ``partition(out)`` (Z, a constant), by ``mode``; no autograd."""
    scores = (_scores_matmul if mode == "matmul" else _scores_gather)(v, bank, idx)
    if temperature is None:
        return scores
    out = scores.div_(temperature).exp_()
    return out if partition is None else out.div_(partition(out))


class _Revision:
    """One state of a memory bank, so that a backward pass can use the rows as they were scored.

    Scores are computed from the bank and :meth:`ContrastMemory.update_memory` then overwrites
    rows in place (before backward). Each update fills the bank's current revision with the rows
    it overwrote and their old values and starts the next revision, so walking from the
    revision a score saw to the newest one yields every row changed since and its old value.
    A revision keeps only its successors alive: the chain is freed with the autograd graphs.
    """

    __slots__ = ("bank", "version", "rows", "old", "next")

    def __init__(self, bank: torch.Tensor):
        self.bank = weakref.ref(bank)
        self.version = -1 if bank.is_inference() else bank._version  # inference tensors have no version
        self.rows: torch.Tensor | None = None
        self.old: torch.Tensor | None = None
        self.next: _Revision | None = None

    def is_current(self, bank: torch.Tensor) -> bool:
        return (self.next is None and self.bank() is bank
                and self.version == (-1 if bank.is_inference() else bank._version))

    def record(self, bank: torch.Tensor, rows: torch.Tensor, old: torch.Tensor) -> _Revision:
        """Note that ``rows`` held ``old`` in this revision; returns the new current revision."""
        self.rows, self.old, self.next = rows, old, _Revision(bank)
        return self.next

    def changes(self, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows [R] sorted and distinct, old - current values [R, D]) of the rows changed since
        this revision, or None."""
        rows, old, revision = [], [], self
        while revision.next is not None:
            rows.append(revision.rows)
            old.append(revision.old)
            revision = revision.next
        if not revision.is_current(bank):
            raise RuntimeError("a memory bank was changed in place outside ContrastMemory.update_memory "
                               "between a forward pass that scored it and its backward")
        if not rows:
            return None
        rows, first = first_occurrences(torch.cat(rows))  # the oldest value of a row changed twice
        return rows, torch.cat(old)[first] - bank[rows]


class _BankScores(torch.autograd.Function):
    """``s[b, k] = <bank[idx[b, k]], v[b]>`` [B, K+1], or ``exp(s / T) / Z`` when a temperature
    (and a ``partition`` giving the constant Z) is given, by ``mode`` ("matmul" or "gather");
    differentiable in ``v`` only. The backward uses the bank's rows as they were when scored
    (``revision``), though it reads the bank after :meth:`ContrastMemory.update_memory` moved
    rows: no copy of the bank or of the gathered rows is kept."""

    @staticmethod
    def forward(ctx, v, bank, idx, temperature, mode, revision, partition):
        with torch.no_grad():
            scores = _critic(v, bank, idx, temperature, mode, partition)
        ctx.bank, ctx.mode, ctx.revision = bank, mode, revision  # the bank changes in place after this
        ctx.save_for_backward(idx, temperature, scores if temperature is not None else None)
        return scores

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        idx, temperature, out = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        if out is not None:  # d (exp(s / T) / Z) / ds = out / T
            grad = (grad * out).div_(temperature)
        bank, changes = ctx.bank, ctx.revision.changes(ctx.bank)
        if ctx.mode == "matmul":  # scatter into [c, N], then one GEMM per chunk of anchors
            parts = []
            for rows in _matmul_chunks(idx, bank):
                full = grad.new_zeros(rows.stop - rows.start, bank.shape[0]).scatter_add_(1, idx[rows], grad[rows])
                part = matmul_nt(full, bank.T)  # full @ bank
                if changes is not None:  # the rows scored were old = current + delta
                    part += full[:, changes[0]] @ changes[1]
                parts.append(part)
            grad_v = _cat(parts)
        else:  # sum_k grad[b, k] bank[idx[b, k]] without gathering the rows
            grad_v = F.embedding_bag(idx, bank, per_sample_weights=grad, mode="sum")
            if changes is not None:
                rows, delta = changes
                where = torch.full((bank.shape[0],), len(rows), dtype=idx.dtype, device=idx.device)
                where[rows] = torch.arange(len(rows), dtype=idx.dtype, device=idx.device)
                delta = torch.cat([delta, delta.new_zeros(1, delta.shape[1])])  # row R: unchanged rows
                grad_v += F.embedding_bag(where[idx], delta, per_sample_weights=grad, mode="sum")
        return grad_v, None, None, None, None, None, None


class ContrastMemory(nn.Module):
    """Memory bank and critic of "Contrastive Representation Distillation" (Tian, Krishnan &
    Isola, ICLR 2020, §3 and its NCE implementation), with RepDistiller's buffers.

    Each training sample ``i`` has a row in ``memory_v1`` (the student's embedding of it) and in
    ``memory_v2`` (the teacher's). For anchors ``b`` and the samples ``idx[b, :]`` (column 0 the
    positive, then K negatives) the critic's unnormalised scores use the *other* view's bank::

        out_v1[b, k] = exp(<memory_v2[idx[b, k]], v1[b]> / T) / Z_v1      (student anchor)
        out_v2[b, k] = exp(<memory_v1[idx[b, k]], v2[b]> / T) / Z_v2      (teacher anchor)

    ``Z = mean(out) * N`` is the Monte-Carlo estimate of the partition function, taken on the
    first batch and then frozen (the paper); with ``z_momentum`` set (e.g. 0.99) it is instead
    an exponential moving average, ``Z <- z_momentum * Z + (1 - z_momentum) * mean(out) * N``,
    updated on every batch before the scores are divided by it. Z never receives gradients.

    After the scores, the batch's rows are moved towards the new embeddings and renormalised,
    ``mem[y] = normalize(momentum * mem[y] + (1 - momentum) * v)``, without gradients.

    The scores are computed by the cheaper exact method for the shapes (``score_mode``, see
    :func:`choose_score_mode`): one GEMM of the batch against the whole bank and a gather of the
    [B, K+1] scores, or a gather of the [B, K+1, D] rows; the same numbers either way, up to
    float rounding, with gradients to match (the bank never receives gradients).

    Args:
        inputSize: embedding size D.
        outputSize: N, the number of training samples (bank rows).
        K: negatives per anchor.
        T: temperature.
        momentum: memory update momentum.
        labels: optional LongTensor [N] of the samples' classes, used only when ``forward`` draws
            the negatives itself (``idx=None``): negatives are then drawn from other classes.
        z_momentum: None (frozen Z, the paper) or the momentum of an EMA of Z.
        score_mode: "auto" (:func:`choose_score_mode` on N and K+1), "matmul" or "gather"; also an
            attribute, which tests and benchmarks may set.

    Buffers (RepDistiller's names): ``params`` = [K, T, Z_v1, Z_v2, momentum] (Z = -1 until
    estimated), ``memory_v1`` and ``memory_v2`` [N, D], initialised uniform in ±1/sqrt(D/3).
    """

    def __init__(self, inputSize: int, outputSize: int, K: int, T: float = 0.07, momentum: float = 0.5,
                 labels: torch.Tensor | None = None, z_momentum: float | None = None,
                 score_mode: str = "auto"):
        super().__init__()
        if z_momentum is not None and not 0.0 <= z_momentum < 1.0:
            raise UserError(f"the momentum of Z (nce_z_momentum) must be in [0, 1), got {z_momentum}")
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        self.score_mode = score_mode
        self._revisions: dict[str, _Revision] = {}  # per bank: its current revision
        if labels is not None and torch.as_tensor(labels).numel() != outputSize:
            raise ValueError(f"labels has {torch.as_tensor(labels).numel()} entries "
                             f"for a bank of {outputSize} rows")
        self.n_data = outputSize
        self.K = K
        self.z_momentum = z_momentum
        self.labels = None if labels is None else torch.as_tensor(labels).long().flatten()
        self._sampler: ContrastSampler | None = None
        self.register_buffer("params", torch.tensor([K, T, -1.0, -1.0, momentum]))
        bound = 1.0 / math.sqrt(inputSize / 3)
        self.register_buffer("memory_v1", torch.rand(outputSize, inputSize) * (2 * bound) - bound)
        self.register_buffer("memory_v2", torch.rand(outputSize, inputSize) * (2 * bound) - bound)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor,
                idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """v1: student embeddings [B, D]; v2: teacher embeddings [B, D] (unit vectors);
        y: the anchors' sample indices [B]; idx: sample indices to score [B, K+1], column 0 the
        positive (drawn here when None, see :meth:`draw_contrast_idx`).
        Returns (out_v1, out_v2), each [B, K+1, 1]."""
        if idx is None:
            idx = self.draw_contrast_idx(y)
        bank_dtype = self.memory_v1.dtype
        # exp(s / 0.07) reaches 1.6e6: score in the bank's precision even under autocast.
        with torch.autocast(device_type=v1.device.type, enabled=False):
            v1, v2 = v1.to(bank_dtype), v2.to(bank_dtype)
            temperature = self.params[T_SLOT].clone()  # a copy: params changes in place below
            out_v1 = self.bank_scores(v1, "memory_v2", idx, temperature, Z_V1_SLOT).unsqueeze(2)  # [B, K+1, 1]
            out_v2 = self.bank_scores(v2, "memory_v1", idx, temperature, Z_V2_SLOT).unsqueeze(2)
            self.update_memory(v1, v2, y)
        return out_v1, out_v2

    def resolved_score_mode(self, n_scored: int, gemm_passes: float = 2.0, reuse: float = 0.0) -> str:
        """``score_mode``, with "auto" resolved by :func:`choose_score_mode` for ``n_scored`` rows
        per anchor."""
        if self.score_mode == "auto":
            return choose_score_mode(self.n_data, n_scored, gemm_passes, reuse)
        if self.score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}")
        return self.score_mode

    def bank_scores(self, v: torch.Tensor, bank_name: str, idx: torch.Tensor,
                    temperature: torch.Tensor | None = None, z_slot: int | None = None,
                    mode: str | None = None) -> torch.Tensor:
        """``<bank[idx[b, k]], v[b]>`` [B, K+1] (``exp(... / temperature)`` when given a 0-dim
        tensor, divided by Z (:meth:`_partition` of ``z_slot``) when given a slot of ``params``)
        for the bank ``memory_v1`` or ``memory_v2`` and v [B, D] in the bank's dtype, by
        ``mode`` (default: :meth:`resolved_score_mode`). Differentiable in ``v`` only; the
        backward uses the rows as they are now, even after :meth:`update_memory` moved them."""
        bank, idx = getattr(self, bank_name), idx.long()
        mode = mode or self.resolved_score_mode(idx.shape[1])
        partition = None if z_slot is None else (lambda out: self._partition(z_slot, out))
        if not (torch.is_grad_enabled() and v.requires_grad):
            with torch.no_grad():
                return _critic(v, bank, idx, temperature, mode, partition)
        return _BankScores.apply(v, bank, idx, temperature, mode, self._revision(bank_name), partition)

    def _revision(self, bank_name: str) -> _Revision:
        """The current revision of a bank (a new one if the bank was replaced or changed elsewhere)."""
        bank = getattr(self, bank_name)
        revision = self._revisions.get(bank_name)
        if revision is None or not revision.is_current(bank):
            revision = self._revisions[bank_name] = _Revision(bank)
        return revision

    def __getstate__(self):
        state = super().__getstate__()
        state["_revisions"] = {}  # a copy has banks of its own
        return state

    @torch.no_grad()
    def _partition(self, slot: int, out: torch.Tensor) -> torch.Tensor:
        """Z for one view (0-dim, no gradient): estimated from ``out`` [B, K+1] on the first
        batch, then frozen or (with ``z_momentum``) an EMA; stored in ``params[slot]``."""
        if distributed.current().enabled:  # the mean over every rank's scores: Z is the same on all ranks
            sums = distributed.all_reduce_sum(torch.stack([out.sum(dtype=torch.float64),
                                                           out.new_tensor(out.numel(), dtype=torch.float64)]))
            estimate = (sums[0] / sums[1]).to(out.dtype) * self.n_data
        else:
            estimate = out.mean() * self.n_data
        z = self.params[slot]
        if self.z_momentum is None:
            z_new = torch.where(z < 0, estimate, z)
        else:
            z_new = torch.where(z < 0, estimate, self.z_momentum * z + (1.0 - self.z_momentum) * estimate)
        self.params[slot] = z_new
        return z_new

    @torch.no_grad()
    def update_memory(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor) -> None:
        """Momentum update of the rows ``y`` [B] with v1 / v2 [B, D]:
        ``mem[y] = normalize(m * mem[y] + (1 - m) * v)``. Under torchrun the rows and indices
        of every rank are gathered first, so that every rank's bank stays identical (a sample
        that two ranks hold, from the sampler's padding, takes the first rank's update)."""
        if distributed.current().enabled:
            y, v1, v2 = distributed.all_gather_cat(y), distributed.all_gather_cat(v1), distributed.all_gather_cat(v2)
            y, first = first_occurrences(y)
            v1, v2 = v1[first], v2[first]
        m = self.params[MOMENTUM_SLOT]
        for name, v in (("memory_v1", v1), ("memory_v2", v2)):
            bank, revision = getattr(self, name), self._revision(name)
            old = bank.index_select(0, y)
            bank.index_copy_(0, y, F.normalize(old * m + v.to(bank.dtype) * (1 - m), dim=1))
            self._revisions[name] = revision.record(bank, y, old)  # for backward passes still to come

    def draw_contrast_idx(self, y: torch.Tensor) -> torch.Tensor:
        """Draw ``idx`` [B, K+1] for anchors ``y`` [B]: column 0 is ``y``, then K distinct
        negatives drawn uniformly, without replacement, from the samples other than the anchor,
        or, when the bank was given ``labels``, from the samples of other classes.

        RepDistiller's fallback draws uniformly over all N with replacement (so an anchor can
        be its own negative); the data loader's ``contrast_idx`` (``--mode exact|relax``) is the
        usual source and never hits this path."""
        if self._sampler is None:
            if self.labels is None and self.K > self.n_data - 1:
                raise UserError(f"--nce_k {self.K} is more negatives than the {self.n_data - 1} other samples: "
                                f"use --nce_k {self.n_data - 1} or less")
            classes = self.labels if self.labels is not None else torch.arange(self.n_data)
            self._sampler = ContrastSampler(classes, self.K, mode="exact")
        if self._sampler.labels.device != y.device:
            self._sampler.to(y.device)
        return self._sampler(y)


def first_occurrences(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``y`` [B] and the position of each one's first occurrence."""
    values, inverse = torch.unique(y, return_inverse=True)
    positions = torch.arange(y.numel(), device=y.device)
    first = torch.full_like(values, y.numel()).scatter_reduce(0, inverse, positions, reduce="amin")
    return values, first


class AliasMethod:
    """RepDistiller's name for its sampler of a discrete distribution (``crd.memory.AliasMethod``),
    kept so that code written for RepDistiller imports and runs unchanged; this library draws its
    negatives with :class:`dataset.sampling.ContrastSampler` instead.

    ``AliasMethod(probs).draw(N)`` returns N indices [N] (LongTensor) drawn independently, with
    replacement, index i with probability ``probs[i] / probs.sum()`` (RepDistiller builds Walker's
    alias tables for this; here ``torch.multinomial`` draws from the same distribution, for up to
    2**24 categories).
    ``cuda()`` / ``to(device)`` move the distribution, and the draws, to a device.
    """

    def __init__(self, probs: torch.Tensor):
        probs = torch.as_tensor(probs, dtype=torch.float64)
        if probs.dim() != 1 or probs.numel() == 0:
            raise ValueError(f"probs must be a non-empty 1-D tensor, got shape {tuple(probs.shape)}")
        if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or not probs.sum() > 0:
            raise ValueError("probs must be finite, non-negative and not all zero")
        self.probs = probs / probs.sum()

    def to(self, device: torch.device | str) -> "AliasMethod":
        """Draw on ``device`` from now on; returns self."""
        self.probs = self.probs.to(device)
        return self

    def cuda(self) -> "AliasMethod":
        """Draw on the current CUDA device from now on; returns self."""
        return self.to("cuda")

    def draw(self, N: int) -> torch.Tensor:
        """N indices [N] drawn with replacement from the distribution."""
        return torch.multinomial(self.probs, N, replacement=True)
