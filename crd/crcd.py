"""CRCD: "Complementary Relation Contrastive Distillation" (Zhu et al., CVPR 2021), and its
``--distill crcd`` Distiller.

Instead of contrasting samples (CRD), CRCD contrasts *relations* between a sample and anchors.
With the batch's own memory rows of the other network as anchors ``a`` (the paper's
anchor-based relation estimation, §3), the student-side relation of sample ``i`` to anchor ``a``
and the teacher-side relation of bank sample ``k`` to the same anchor are::

    r_s(i, a) = normalize(e_s[i] - m_t[a]),      r_t(k, a) = normalize(m_t[k] - m_t[a])

and the critic (CRD's, applied to relations) scores them ``exp(<r_t(k, a), r_s(i, a)> / T) / Z``
for the positive ``k = i`` and K negatives. CRD's NCE loss (Tian et al., ICLR 2020, Eq. 18) is
averaged over all pairs ``(i, a)`` and mirrored on the teacher side (``e_t`` against the
student's bank). The complementary element (the paper's gradient relations) applies the same
loss to the gradients of the cross-entropy with respect to the penultimate features, with their
own embedding heads and banks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.argtypes import nonnegative_float, positive_float, positive_int
from common.declare import option
from common.errors import UserError
from dataset.needs import DataNeeds
from distiller_zoo._common import fp32
from distiller_zoo.registry import Batch, BuildContext, Distiller, NetOutput, register
from models import get_classifier
from models.util import Embed

from .loss import ContrastLoss
from .memory import T_SLOT, Z_V1_SLOT, Z_V2_SLOT, ContrastMemory, matmul_nt
from .options import BankOptions

# Floor of the squared length of a relation vector before 1/sqrt (a zero relation is masked).
SQUARED_NORM_EPS = 1e-12


def relation_scores(e: torch.Tensor, anchors: torch.Tensor, rows: torch.Tensor,
                    row_ids: torch.Tensor | None = None,
                    anchor_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Cosines ``<normalize(rows[i, k] - anchors[a]), normalize(e[i] - anchors[a])>`` from dot products.

    With ``u = rows[i, k]``, ``v = anchors[a]``, ``x = e[i]``::

        <u - v, x - v> = <u, x> - <u, v> - <v, x> + |v|^2
        |u - v|^2 = |u|^2 + |v|^2 - 2 <u, v>,    |x - v|^2 = |x|^2 + |v|^2 - 2 <x, v>

    so the largest tensor is ``[B, A, K+1]`` (never ``[B, A, K+1, D]``); for unit vectors the
    norms reduce to ``2 - 2 u.v``, but exact norms are used (a bank's initial rows are not unit).
    A relation whose bank row *is* the anchor (``row_ids[i, k] == anchor_ids[a]``) is the zero
    vector; it scores 0, as ``F.normalize`` of a zero vector does, with no gradient.
    Constant-only intermediates are computed in place: forward and backward of both sides of
    one term keep about 12 ``[B, A, K+1]`` float tensors alive at the peak (measured).

    e: [B, D] this view's embeddings (the only input that receives gradients);
    anchors: [A, D] and rows: [B, K+1, D] (bank rows scored for each ``i``): constants;
    row_ids: [B, K+1] and anchor_ids: [A] the sample indices of ``rows`` and ``anchors``.
    Returns the cosines [B, A, K+1].
    """
    anchors, rows = anchors.detach(), rows.detach()
    anchor_rows = torch.matmul(anchors, rows.transpose(1, 2))          # <u, v>  [B, A, K+1]
    rows_e = torch.bmm(rows, e.unsqueeze(2)).squeeze(2)                  # <u, x>  [B, K+1]
    sq_rows = rows.pow(2).sum(2)                                         # |u|^2   [B, K+1]
    return _relation_cosines(e, anchors, anchor_rows, rows_e, sq_rows, row_ids, anchor_ids)


def relation_scores_from_bank(memory: ContrastMemory, e: torch.Tensor, bank_name: str,
                              anchor_ids: torch.Tensor, row_ids: torch.Tensor,
                              mode: str | None = None) -> torch.Tensor:
    """:func:`relation_scores` for ``anchors = bank[anchor_ids]`` and ``rows = bank[row_ids]`` of
    ``memory``'s bank ``bank_name``, by the cheaper exact method (``mode``, default from
    :meth:`ContrastMemory.resolved_score_mode` with the anchors' reuse of each gathered row):

    - "gather": :func:`relation_scores` on the gathered rows [B, K+1, D];
    - "matmul": every dot product with the bank's rows at once, ``bank @ anchors.T`` [N, A] and
      ``e @ bank.T`` [B, N] (:meth:`ContrastMemory.bank_scores`, whose backward is a GEMM too),
      and ``|u|^2`` for all N rows, then gathers the [B, A, K+1] and [B, K+1] wanted ones; no
      [B, K+1, D] tensor.

    Per sample, matmul makes 2 + A/B passes over the N rows (e's scores forward and backward,
    its share of the anchors' GEMM); gather gathers K+1 rows and scores each against A anchors.
    At CRCD's defaults (B = A = 64, K 500, N 50000) that picks gather, which measured faster
    (CRCDLoss forward + backward, both terms, 2 CPU threads: gather 180 ms, matmul 214 ms); the
    two are even at K 1000 (363 and 348 ms) and at K 2000 it picks matmul (634 against 751 ms).

    Same values and gradients (to float rounding). Returns the cosines [B, A, K+1]."""
    bank = getattr(memory, bank_name)
    if mode is None:
        mode = memory.resolved_score_mode(row_ids.shape[1], gemm_passes=2 + len(anchor_ids) / len(row_ids),
                                          reuse=len(anchor_ids))
    if mode == "gather":
        return relation_scores(e, bank[anchor_ids], bank[row_ids], row_ids, anchor_ids)
    anchors = bank[anchor_ids]                                                         # [A, D]
    flat_ids = row_ids.flatten()
    anchor_rows = matmul_nt(bank, anchors).index_select(0, flat_ids)                   # <u, v>  [B (K+1), A]
    anchor_rows = anchor_rows.view(*row_ids.shape, -1).transpose(1, 2)                 # [B, A, K+1]
    rows_e = memory.bank_scores(e, bank_name, row_ids, mode="matmul")                  # <u, x>  [B, K+1]
    sq_rows = torch.einsum("nd,nd->n", bank, bank).index_select(0, flat_ids).view(row_ids.shape)  # |u|^2
    return _relation_cosines(e, anchors, anchor_rows, rows_e, sq_rows, row_ids, anchor_ids)


def _relation_cosines(e: torch.Tensor, anchors: torch.Tensor, anchor_rows: torch.Tensor,
                      rows_e: torch.Tensor, sq_rows: torch.Tensor, row_ids: torch.Tensor | None,
                      anchor_ids: torch.Tensor | None) -> torch.Tensor:
    """The cosines of :func:`relation_scores` from the dot products with the rows: ``anchor_rows``
    <u, v> [B, A, K+1] (a constant, overwritten here), ``rows_e`` <u, x> [B, K+1] (differentiable
    in e) and ``sq_rows`` |u|^2 [B, K+1]."""
    anchors_e = e @ anchors.t()                                          # <x, v>  [B, A]
    sq_anchors = anchors.pow(2).sum(1)[None, :, None]                    # |v|^2   [1, A, 1]
    sq_rows = sq_rows[:, None, :]                                        # |u|^2   [B, 1, K+1]
    sq_e = e.pow(2).sum(1)                                               # |x|^2   [B]
    base = sq_anchors - anchor_rows                                      # |v|^2 - <u, v>, constant
    # 1 / |u - v| in place of <u, v> (constants only: no autograd history to keep)
    inv_rel_rows = anchor_rows.mul_(-2.0).add_(sq_rows).add_(sq_anchors).clamp_min_(SQUARED_NORM_EPS).rsqrt_()
    if row_ids is not None and anchor_ids is not None:
        degenerate = row_ids[:, None, :] == anchor_ids[None, :, None]  # [B, A, K+1]
        inv_rel_rows.masked_fill_(degenerate, 0.0)
    inner = torch.add(base, rows_e[:, None, :]).sub_(anchors_e[:, :, None])  # <u - v, x - v>
    del base
    sq_rel_e = sq_e[:, None] + sq_anchors[:, :, 0] - 2.0 * anchors_e     # |x - v|^2  [B, A]
    inv_rel_e = sq_rel_e.clamp_min(SQUARED_NORM_EPS).rsqrt()
    cos = inner.mul_(inv_rel_rows) * inv_rel_e[:, :, None]
    return cos


@fp32  # a softmax, and its product with the weight kept in float32 under autocast
def ce_feature_grad(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient element of CRCD (``dCE/df``) in closed form for a linear classifier.

    For ``logits = f W^T + b`` and ``CE = mean_i cross_entropy(logits_i, y_i)``,
    ``dCE/df_i = (softmax(logits_i) - onehot(y_i)) W / B``; this returns it rescaled by B (the
    gradient of sample i's own loss), so its size does not depend on the batch size.
    It is differentiable in ``logits`` and ``weight``: it is the very function of (f, W, b) that
    ``torch.autograd.grad(CE, f, create_graph=True)`` would build, times B.

    logits: [B, C]; target: [B] class indices; weight: [C, d] the classifier's weight.
    Returns [B, d] in float32 (or the weight's wider dtype).
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    probs = F.softmax(logits.to(dtype), dim=1)
    residual = probs - F.one_hot(target, logits.shape[1]).to(dtype)
    return residual @ weight.to(dtype)


def _frozen(x: torch.Tensor) -> torch.Tensor:
    """A teacher tensor without gradient (an ordinary copy of an inference-mode tensor, which
    autograd could not save for the embedding's backward)."""
    return x.clone() if x.is_inference() else x.detach()


@dataclass
class CRCDOptions(BankOptions):
    """CRCD"""

    crcd_k: int = option(500, "CRCD: negatives per relation, drawn from the other samples", type=positive_int)
    crcd_t: float = option(0.05, "CRCD: temperature of the relation critic", type=positive_float)
    crcd_grad_weight: float = option(1.0, "CRCD: weight of the gradient-relation term (0: feature relations only)",
                                     type=nonnegative_float)


class CRCDLoss(nn.Module):
    """The CRCD objective of "Complementary Relation Contrastive Distillation" (Zhu, Tang, Chen,
    Yu, Liu, Yang, Rong & Wang, CVPR 2021, §3; a relation is the normalised difference to an
    anchor, as in the authors' code), built on CRD's modules::

        e_s = embed_s(f_s), e_t = embed_t(f_t)                       # unit vectors [B, feat_dim]
        crcd = NCE(relations of e_s to the teacher bank's anchors)   # student side
             + NCE(relations of e_t to the student bank's anchors)   # teacher side (mirror)
        crcd_grad = grad_weight * (the same on g_s, g_t through embed_grad_s / embed_grad_t
                                   and the bank contrast_grad)

    For each side, anchors are the other view's bank rows of the batch, ``m[idx]``; for every
    pair ``(i, a)`` with ``a != i`` the critic scores ``out[i, a, k] = exp(cos(m[k] - m[a],
    e[i] - m[a]) / T) / Z`` for ``k`` in ``contrast_idx[i]`` (column 0 the positive), computed by
    :func:`relation_scores`. The pair ``a = i`` is left out: its positive teacher relation
    ``m[i] - m[i]`` is the zero vector. ``Z = mean(out) * N`` is estimated on the first batch
    and then frozen (as in CRD); :class:`ContrastLoss` (``m = K``, ``Pn = 1/N``) averages the
    NCE loss over the ``B (B - 1)`` pairs. Memory is O(B^2 K). After scoring, each bank's rows
    of the batch move towards the new embeddings (momentum ``nce_m``), as in CRD.

    s_dim, t_dim: feature sizes; n_data: N; options (:class:`CRCDOptions`): ``feat_dim``,
    ``crcd_k`` (K, default 500), ``crcd_t`` (T, default 0.05), ``nce_m`` (bank momentum, default
    0.5), ``nce_scores``, ``crcd_grad_weight`` (default 1; 0 leaves the gradient element out, and
    its modules).
    State dict: ``embed_s.linear.*``, ``embed_t.linear.*``, ``contrast.{params,memory_v1,memory_v2}``
    and, with the gradient element, ``embed_grad_s.linear.*``, ``embed_grad_t.linear.*``,
    ``contrast_grad.{params,memory_v1,memory_v2}`` (``memory_v1`` the student's, ``memory_v2``
    the teacher's).
    """

    def __init__(self, s_dim: int, t_dim: int, n_data: int, options: CRCDOptions | None = None):
        super().__init__()
        options = options or CRCDOptions()
        k = options.crcd_k
        if not 0 < k <= n_data - 1:
            raise UserError(f"--crcd_k {k}: CRCD needs between 1 and {n_data - 1} negatives "
                            f"(the other samples of a training set of {n_data})")
        feat_dim, temperature, momentum, scores = options.feat_dim, options.crcd_t, options.nce_m, options.nce_scores
        self.grad_weight = options.crcd_grad_weight
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, n_data, k, temperature, momentum, score_mode=scores)
        if self.grad_weight:
            # The gradient element has the features' size: the classifier's input.
            self.embed_grad_s = Embed(s_dim, feat_dim)
            self.embed_grad_t = Embed(t_dim, feat_dim)
            self.contrast_grad = ContrastMemory(feat_dim, n_data, k, temperature, momentum,
                                                score_mode=scores)
        self.criterion = ContrastLoss(n_data)

    @property
    def K(self) -> int:
        """Negatives per relation."""
        return self.contrast.K

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None, grad_s: torch.Tensor | None = None,
                grad_t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """f_s: student features [B, s_dim]; f_t: teacher features [B, t_dim] (no gradient is sent
        to them); idx: the samples' indices in the training set [B]; contrast_idx: [B, K+1],
        column 0 the positive; when None or with another number of columns, K negatives are drawn
        uniformly (without replacement) from the other samples. grad_s [B, s_dim] / grad_t
        [B, t_dim]: the gradient elements (:func:`ce_feature_grad`), needed when ``grad_weight``
        is not 0 (gradients flow into ``grad_s``, never into ``grad_t``).

        Returns ``{"crcd": feature-relation loss}`` and, when ``grad_weight`` is not 0,
        ``"crcd_grad": grad_weight * gradient-relation loss`` (scalars)."""
        if contrast_idx is None or contrast_idx.shape[1] != self.K + 1:
            contrast_idx = self.contrast.draw_contrast_idx(idx)
        terms = {"crcd": self._relation_nce(self.contrast, self.embed_s(f_s), self.embed_t(_frozen(f_t)),
                                            idx, contrast_idx)}
        if self.grad_weight:
            if grad_s is None or grad_t is None:
                raise ValueError("CRCDLoss with crcd_grad_weight != 0 needs the gradient elements "
                                 "grad_s and grad_t")
            loss_grad = self._relation_nce(self.contrast_grad, self.embed_grad_s(grad_s),
                                           self.embed_grad_t(_frozen(grad_t)), idx, contrast_idx)
            terms["crcd_grad"] = self.grad_weight * loss_grad
        return terms

    def _relation_nce(self, memory: ContrastMemory, e_s: torch.Tensor, e_t: torch.Tensor,
                      idx: torch.Tensor, contrast_idx: torch.Tensor) -> torch.Tensor:
        """Both sides' relation NCE losses on ``memory`` (e_s, e_t: [B, D] unit vectors; idx: [B];
        contrast_idx: [B, K+1]), then the momentum update of the batch's bank rows."""
        bank_dtype = memory.memory_v1.dtype
        pairs = idx[:, None] != idx[None, :]  # [B, B]: every anchor but the sample itself
        # exp(cos / 0.05) reaches 4.9e8: score in the bank's precision even under autocast.
        with torch.autocast(device_type=e_s.device.type, enabled=False):
            e_s, e_t = e_s.to(bank_dtype), e_t.to(bank_dtype)
            temperature = memory.params[T_SLOT].clone()  # a copy: params changes in place below
            loss = e_s.new_zeros(())
            sides = ((e_s, "memory_v2", Z_V1_SLOT),   # student relations, teacher bank
                     (e_t, "memory_v1", Z_V2_SLOT))   # teacher relations, student bank
            for e, bank_name, z_slot in sides:
                if not bool(pairs.any()):  # a batch of one sample has no relation
                    continue
                cos = relation_scores_from_bank(memory, e, bank_name, idx, contrast_idx)  # [B, B, K+1]
                scaled = cos.div_(temperature)
                with torch.no_grad():
                    log_z = memory._partition(z_slot, scaled[pairs].exp()).log()
                # exp(cos / T) / Z, as one tensor kept for backward; the loss over the pairs only
                loss = loss + self.criterion(scaled.sub_(log_z).exp_(), rows=pairs)
            memory.update_memory(e_s.detach(), e_t.detach(), idx)
        return loss


@register("crcd")
class CRCD(Distiller):
    """``--distill crcd``: :class:`CRCDLoss` on the pooled features ``feats[-1]`` and on the
    gradients of the cross-entropy with respect to them.

    The gradient elements use the classifiers given to :meth:`bind` (``logits = head(feats[-1])``):
    the teacher's ``g_t = (softmax(z_t) - onehot(y)) W_t`` from its logits and labels, without
    gradient; the student's ``g_s = (softmax(z_s) - onehot(y)) W_s`` from its own logits and
    weight *with* gradient, so the term trains the student's features (through ``z_s``) and
    its classifier (through ``z_s`` and ``W_s``) exactly as differentiating
    ``torch.autograd.grad(CE, f_s, create_graph=True)`` would (the authors' code), without a
    second backward pass.

    Published weights ``-r 1 -a 0.9 -b 1``: CRCD with KD, the defaults of the authors' released
    training script (github.com/Lechatelia/CRCD, with K=500, T=0.05). The loader supplies
    ``index``; CRCD's ``--crcd_k`` negatives per anchor are drawn by its own bank (uniform over
    the other samples, positive = the sample), so the loader draws no ``contrast_idx`` and
    ``--nce_k``, ``--nce_t`` and ``--mode`` do not apply (``--feat_dim`` and ``--nce_m`` do).
    """

    Options = CRCDOptions
    weights = (1.0, 0.9, 1.0)

    @classmethod
    def data_needs(cls, options: CRCDOptions) -> DataNeeds:
        return DataNeeds(index=True)

    @classmethod
    def label_need(cls, options: CRCDOptions) -> str | None:
        if options.crcd_grad_weight:
            return ("its gradient element is the cross-entropy's gradient at each sample's label (use "
                    "--crcd_grad_weight 0 to leave it out)")
        return None

    def __init__(self, options: CRCDOptions, ctx: BuildContext):
        super().__init__()
        self.criterion = CRCDLoss(ctx.s_dim, ctx.t_dim, ctx.training_set_size(self.name), options)
        self.s_dim, self.t_dim = ctx.s_dim, ctx.t_dim
        # References to the networks' classifiers, in a tuple so that nn.Module does not register
        # them: they stay out of this module's parameters, state_dict and .to().
        self._classifiers: tuple[nn.Linear, nn.Linear] | None = None

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Keep references to the student's and teacher's final linear layers."""
        heads = (get_classifier(student), get_classifier(teacher))
        for who, head, dim in zip(("student", "teacher"), heads, (self.s_dim, self.t_dim)):
            if head.in_features != dim:
                raise UserError(f"--distill crcd needs logits = Linear(feats[-1]); the {who}'s last linear "
                                f"layer takes {head.in_features} inputs, its feats[-1] has {dim}")
        self._classifiers = heads

    def forward(self, s: NetOutput, t: NetOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """s / t: network outputs, ``feats[-1]`` [B, C] and ``logits`` [B, classes]; batch:
        ``index`` [B], ``target`` [B], optional ``contrast_idx`` [B, crcd_k + 1]."""
        if batch.index is None:
            raise ValueError("--distill crcd needs the batch's sample indices (index)")
        grad_s = grad_t = None
        if self.criterion.grad_weight:
            if self._classifiers is None:
                raise RuntimeError("--distill crcd: call bind(student, teacher) before forward")
            head_s, head_t = self._classifiers
            grad_s = ce_feature_grad(s.logits, batch.target, head_s.weight)
            with torch.no_grad():
                grad_t = ce_feature_grad(_frozen(t.logits), batch.target, head_t.weight.detach())
        return self.criterion(s.feats[-1].flatten(1), t.feats[-1].flatten(1), batch.index,
                              batch.contrast_idx, grad_s, grad_t)
