"""RRD: Giakoumoglou & Stathaki, "Relational Representation Distillation" (arXiv:2407.12073, 2024)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import distributed
from common.argtypes import positive_float
from common.declare import option
from distiller_zoo._common import fp32, to_fp32
from distiller_zoo.registry import Batch, BuildContext, Distiller, NetOutput, register

from .options import NegativesOptions

QUEUE_INITS = ("rows", "columns")


@dataclass
class RRDOptions(NegativesOptions):
    """RRD"""

    nce_t_s: float = option(0.1, "RRD: temperature of the student's similarities to the queue (default 0.1)",
                            type=positive_float)
    nce_t_t: float = option(0.02, "RRD: temperature of the teacher's similarities to the queue (default 0.02)",
                            type=positive_float)
    rrd_queue_init: str = option("rows", "RRD: the queue's random start: unit rows (rows, as every embedding it "
                                 "later holds) or the reference code's Gaussian normalised along its columns "
                                 "(columns)", choices=QUEUE_INITS)
    rrd_train_embed_t: bool = option(False, "RRD: let the loss's gradient flow through the teacher's distribution "
                                     "into the teacher's head embed_t (default: the teacher's distribution is a "
                                     "fixed target, so embed_t keeps its random initialisation, as in the "
                                     "reference code)")


class RRDLoss(nn.Module):
    """The RRD objective (Giakoumoglou & Stathaki, arXiv:2407.12073, the method section) with a
    FIFO queue of the teacher's embeddings::

        z_s = normalize(embed_s(f_s)),  z_t = normalize(embed_t(f_t))     # [B, feat_dim]
        enqueue(z_t)                                                      # Q: [K, feat_dim]
        p_s = softmax(z_s Q^T / tau_s),  p_t = softmax(z_t Q^T / tau_t)   # [B, K]
        RRD = -1/B sum_i sum_k p_t[i, k] log p_s[i, k]                  # cross-entropy H(p_t, p_s)

    i.e. KL(p_t || p_s) up to the entropy of p_t, a constant for the student. The teacher's
    distribution is the target (no gradient) unless ``train_embed_t``; then the gradient of the
    same expression also reaches ``embed_t`` through p_t (never the queue nor the teacher's
    features). A sharper teacher (tau_t 0.02 < tau_s 0.1) keeps the student on the teacher's
    nearest neighbours while it still sees the secondary similarities.

    The queue is refilled before the similarities are computed, as the reference code does: each
    batch's own teacher embeddings are among the K rows. The K rows are written in a circle from
    ``queue_ptr`` (any batch size; the reference requires K to be a multiple of it, and then writes
    the same rows); under torchrun every process's embeddings are written, in rank order, so that
    the queues stay identical and equal to one process's with the whole batch.

    Quirks of the reference (giakoumoglou/distillers ``cifar/distillers/RRD.py``, fifo memory) and
    their switches:

    - the queue's random start: ``queue_init="rows"`` (default) draws Gaussian rows normalised to
      unit length, like every embedding the queue later holds; ``"columns"`` normalises the
      Gaussian along its columns, as the reference does (rows of length about sqrt(feat_dim / K)).
    - the teacher's head ``embed_t``: ``train_embed_t=False`` (default, and the reference) detaches
      the teacher's distribution, so the head is a fixed random projection (its parameters are
      frozen here: no optimiser sees them); True trains it through p_t.

    The reference's docstring swaps the temperatures' defaults; its training script's (tau_s 0.1,
    tau_t 0.02) are used.

    s_dim, t_dim: feature sizes; feat_dim: embedding size; nce_k: K, the queue's rows.
    State dict: ``embed_s.weight``/``.bias``, ``embed_t.weight``/``.bias`` (``nn.Linear``),
    ``queue`` [K, feat_dim] and ``queue_ptr`` [1] (int64), both saved in checkpoints.
    """

    def __init__(self, s_dim: int, t_dim: int, feat_dim: int = RRDOptions.feat_dim, nce_k: int = RRDOptions.nce_k,
                 nce_t_s: float = RRDOptions.nce_t_s, nce_t_t: float = RRDOptions.nce_t_t,
                 queue_init: str = RRDOptions.rrd_queue_init, train_embed_t: bool = RRDOptions.rrd_train_embed_t):
        super().__init__()
        if queue_init not in QUEUE_INITS:
            raise ValueError(f"queue_init must be one of {QUEUE_INITS}, got {queue_init!r}")
        self.nce_t_s, self.nce_t_t = nce_t_s, nce_t_t
        self.train_embed_t = train_embed_t
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        self.embed_t.requires_grad_(train_embed_t)
        start = torch.randn(nce_k, feat_dim)  # drawn after the heads, as the reference does
        self.register_buffer("queue", F.normalize(start, dim=1 if queue_init == "rows" else 0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def embed(self, f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_s [B, s_dim], f_t [B, t_dim] (or shapes flattening to them) -> unit z_s, z_t [B, feat_dim]
        in float32 (float64 stays). No gradient is sent to ``f_t`` (the teacher is frozen)."""
        # The teacher's features may come from torch.inference_mode: use an ordinary copy then.
        f_t = f_t.clone() if f_t.is_inference() else f_t.detach()
        z_s = F.normalize(to_fp32(self.embed_s(f_s.flatten(1))), dim=1)
        z_t = F.normalize(to_fp32(self.embed_t(f_t.flatten(1))), dim=1)
        return z_s, z_t

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` [n, feat_dim] (every process's, in rank order, under torchrun) into the
        queue from ``queue_ptr`` on, wrapping around, and move the pointer past them; of more than
        K keys the last K are kept."""
        keys = distributed.all_gather_cat(keys.detach()).to(self.queue.dtype)
        k = self.queue.shape[0]
        ptr = int(self.queue_ptr[0])
        if keys.shape[0] > k:
            ptr = (ptr + keys.shape[0] - k) % k
            keys = keys[-k:]
        rows = (ptr + torch.arange(keys.shape[0], device=self.queue.device)) % k
        self.queue.index_copy_(0, rows, keys)
        self.queue_ptr[0] = (ptr + keys.shape[0]) % k

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """f_s: student features [B, s_dim]; f_t: teacher features [B, t_dim]. Enqueues the
        teacher's embeddings, then returns the scalar loss (float32)."""
        z_s, z_t = self.embed(f_s, f_t)
        self.enqueue(z_t)
        return self.relation(z_s, z_t, self.queue.clone())

    @fp32  # softmax and log-softmax at temperatures down to 0.02
    def relation(self, z_s: torch.Tensor, z_t: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        """H(p_t, p_s) averaged over the batch, for unit z_s, z_t [B, D] and the queue [K, D]."""
        log_p_s = F.log_softmax(z_s @ queue.t() / self.nce_t_s, dim=1)
        logits_t = z_t @ queue.t() / self.nce_t_t
        p_t = F.softmax(logits_t if self.train_embed_t else logits_t.detach(), dim=1)
        return -(p_t * log_p_s).sum(1).mean()


@register("rrd")
class RRD(Distiller):
    """``--distill rrd``: :class:`RRDLoss` on the pooled features ``feats[-1]`` of both nets, any
    pair (the linear heads map either width to ``--feat_dim``).

    Published weights: ``-r 1 -a 0 -b 1`` (RRD+KD: ``-a 1 -b 1``). No sample indices are needed:
    the queue (``--nce_k`` rows) is filled from the batches themselves.
    """

    Options = RRDOptions
    weights = (1.0, 0.0, 1.0)

    def __init__(self, options: RRDOptions, ctx: BuildContext):
        super().__init__()
        self.criterion = RRDLoss(ctx.s_dim, ctx.t_dim, options.feat_dim, options.nce_k, options.nce_t_s,
                                 options.nce_t_t, options.rrd_queue_init, options.rrd_train_embed_t)

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """s / t: network outputs, ``feats[-1]`` [B, C]."""
        return {"rrd": self.criterion(s.feats[-1], t.feats[-1])}
