"""SemCKD: Chen et al., "Cross-Layer Distillation with Semantic Calibration" (AAAI 2021)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.declare import option
from common.errors import UserError

from ._common import fp32
from .registry import Batch, BuildContext, Distiller, NetOutput, register

SMALL_BATCH = ("pad", "skip")


@dataclass
class SemCKDOptions:
    """SemCKD's cross-layer attention"""

    semckd_small_batch: str = option(
        "pad", "SemCKD: a batch smaller than --batch_size (the last one): 'pad' its B' x B' similarity rows "
        "with zeros to --batch_size columns (default), or 'skip' it (SemCKD term 0, as the reference's loops "
        "skip such batches)", choices=SMALL_BATCH)


class SimilarityEmbed(nn.Module):
    """The query / key embedding psi of a stage: a row a_b of the batch similarity matrix
    A = R(F) R(F)^T [B, B] goes through

        psi(a) = l2norm(W2 relu(W1 a + b1) + b2),   W1: [2 * B // factor, B], W2: [B // factor, 2 * B // factor]

    (the reference's MLPEmbed; its unused ``regressor`` branch is left out)."""

    def __init__(self, batch_size: int, factor: int = 4) -> None:
        super().__init__()
        dim_out = batch_size // factor
        self.linear1 = nn.Linear(batch_size, 2 * dim_out)
        self.linear2 = nn.Linear(2 * dim_out, dim_out)

    def forward(self, similarity: torch.Tensor) -> torch.Tensor:
        """similarity: [b, B] -> unit rows [b, B // factor]."""
        hidden = F.relu(self.linear1(similarity))
        out = self.linear2(hidden)
        return out / out.norm(dim=1, keepdim=True)


class StageProjection(nn.Module):
    """The student-to-teacher channel projection of one (student stage, teacher stage) pair:
    conv1x1(C_s -> 2 C_t) - BN - ReLU - conv3x3(2 C_t -> 2 C_t) - BN - ReLU - conv1x1(2 C_t -> C_t),
    without biases (``regressor`` Sequential, indices 0..6)."""

    def __init__(self, s_channels: int, t_channels: int) -> None:
        super().__init__()
        mid = 2 * t_channels
        self.regressor = nn.Sequential(
            nn.Conv2d(s_channels, mid, kernel_size=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, t_channels, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, C_s, H, W] -> [b, C_t, H, W]."""
        return self.regressor(x)


class SemCKDLoss(nn.Module):
    """Cross-layer distillation with semantic calibration. For student stages l = 1..L_s and
    teacher stages m = 1..L_t (feature maps F, flattened per sample by R):

        A_s^l = R(F_s^l) R(F_s^l)^T,  A_t^m = R(F_t^m) R(F_t^m)^T            (b x b, per batch)
        q_b^l = psi_Q^l(A_s^l[b]),    k_b^m = psi_K^m(A_t^m[b])
        alpha_b^{l,m} = softmax_m(q_b^l . k_b^m / soft)                        (not detached)
        L = 1 / (b L_s) * sum_b sum_{l,m} alpha_b^{l,m} * mean_{chw} (Proj^{l,m}(F_s^l)_b - F_t^m_b)^2

    where the map with the larger spatial size is average-pooled to the other's before Proj
    (psi: :class:`SimilarityEmbed`, Proj: :class:`StageProjection`).

    Batch size: psi embeds rows of the b x b similarity matrix, so its input width is the training
    batch size B, fixed at build time (the paper's formulation; the reference sizes its MLPs by
    ``--batch_size`` too). The paper does not say what happens to a smaller batch b' < B (the last
    one of an epoch); ``small_batch``:

    - ``"pad"`` (default): the b' x b' similarity rows are padded with zeros to B columns (the absent
      samples count as zero similarity; ``psi`` then uses the first b' columns of W1), so every batch
      is distilled and a full batch is computed exactly as the paper states it;
    - ``"skip"``: the loss is 0 for that batch (the reference's loops skip a smaller batch altogether;
      here the rest of the step, CE and KD, still runs).

    A batch larger than B is refused.
    """

    def __init__(self, batch_size: int, s_channels: list[int], t_channels: list[int], soft: float = 1.0,
                 factor: int = 4, small_batch: str = "pad") -> None:
        super().__init__()
        if small_batch not in SMALL_BATCH:
            raise UserError(f"--semckd_small_batch {small_batch!r}: use one of {', '.join(SMALL_BATCH)}")
        self.batch_size, self.soft, self.small_batch = batch_size, soft, small_batch
        self.s_len, self.t_len = len(s_channels), len(t_channels)
        self.query = nn.ModuleList(SimilarityEmbed(batch_size, factor) for _ in s_channels)
        self.key = nn.ModuleList(SimilarityEmbed(batch_size, factor) for _ in t_channels)
        self.proj = nn.ModuleList(nn.ModuleList(StageProjection(cs, ct) for ct in t_channels) for cs in s_channels)

    def _similarity(self, f: torch.Tensor) -> torch.Tensor:
        """f: [b, ...] -> R(f) R(f)^T [b, b], zero-padded to [b, B] columns."""
        flat = f.reshape(f.shape[0], -1)
        sim = flat @ flat.t()
        return F.pad(sim, (0, self.batch_size - f.shape[0]))

    def attention(self, feats_s: list[torch.Tensor], feats_t: list[torch.Tensor]) -> torch.Tensor:
        """The stage-matching weights alpha [b, L_s, L_t] (rows sum to 1)."""
        query = torch.stack([q(self._similarity(f)) for q, f in zip(self.query, feats_s)], 1)  # [b, L_s, d]
        key = torch.stack([k(self._similarity(f)) for k, f in zip(self.key, feats_t)], 2)  # [b, d, L_t]
        return F.softmax(torch.bmm(query, key) / self.soft, dim=-1)

    @fp32  # similarity matrices of whole maps, a softmax and squared differences
    def forward(self, feats_s: list[torch.Tensor], feats_t: list[torch.Tensor]) -> torch.Tensor:
        """feats_s: L_s maps [b, C_s^l, H, W]; feats_t: L_t maps [b, C_t^m, H, W] -> scalar."""
        b = feats_s[0].shape[0]
        if b > self.batch_size:
            raise UserError(f"SemCKD was built for batches of {self.batch_size} samples and got {b}")
        if b < self.batch_size and self.small_batch == "skip":
            return feats_s[0].sum() * 0.0 + sum(p.sum() * 0.0 for p in self.parameters())
        weight = self.attention(feats_s, feats_t)
        per_pair = []
        for i, f_s in enumerate(feats_s):
            for j, f_t in enumerate(feats_t):
                h_s, h_t = f_s.shape[2], f_t.shape[2]
                if h_s > h_t:
                    source, target = F.adaptive_avg_pool2d(f_s, (h_t, h_t)), f_t
                else:
                    source, target = f_s, F.adaptive_avg_pool2d(f_t, (h_s, h_s))
                diff = self.proj[i][j](source) - target
                per_pair.append(diff.pow(2).reshape(b, -1).mean(1))
        distances = torch.stack(per_pair, 1).view(b, self.s_len, self.t_len)
        return (weight * distances).sum() / (b * self.s_len)


@register("semckd")
class SemCKDDistiller(Distiller):
    """``--distill semckd``: SemCKD between every pair of the student's and the teacher's stage maps
    ``feats[1:-1]`` (after ReLU), its attention embeddings sized by the training batch size
    (``BuildContext.batch_size``; see :class:`SemCKDLoss` for a smaller last batch)."""

    Options = SemCKDOptions
    weights = (1.0, 1.0, 400.0)

    def __init__(self, options: SemCKDOptions, ctx: BuildContext) -> None:
        super().__init__()
        stages_s, stages_t = ctx.feats_s[1:-1], ctx.feats_t[1:-1]
        if not stages_s or not stages_t or any(len(s) != 4 for s in (*stages_s, *stages_t)):
            raise UserError(f"--distill semckd needs stage feature maps [B, C, H, W] in feats[1:-1]; "
                            f"{ctx.model_s or 'the student'} / {ctx.model_t or 'the teacher'} have none or others")
        if ctx.batch_size is None or ctx.batch_size < 4:
            raise UserError(f"--distill semckd needs a training batch size of at least 4 (its attention embeds "
                            f"rows of the B x B similarity matrix into B // 4 dimensions), got {ctx.batch_size}")
        self.loss = SemCKDLoss(ctx.batch_size, [int(s[1]) for s in stages_s], [int(s[1]) for s in stages_t],
                               small_batch=options.semckd_small_batch)

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {"semckd": self.loss(s.feats[1:-1], [f.detach() for f in t.feats[1:-1]])}
