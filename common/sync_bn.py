"""Synchronised BatchNorm that also runs on CPU (gloo), for ``--sync_bn`` under DDP.

``torch.nn.SyncBatchNorm`` only accepts GPU tensors ("SyncBatchNorm expected input tensor to be on
GPU"), so DDP runs on CPU with the gloo backend could not synchronise BatchNorm. This module adds

- ``CPUSyncBatchNorm``: a BatchNorm whose training-mode batch statistics are taken over the samples
  of all ranks, with differentiable all-reduces, so that W processes with batch B each compute the
  same outputs, gradients (after DDP's averaging) and running statistics as one process with plain
  BatchNorm on the concatenated batch of W*B samples;
- ``convert_sync_batchnorm(module, process_group=None)``: replaces the BatchNorm layers of a model
  by ``torch.nn.SyncBatchNorm`` when the model is on CUDA, and by ``CPUSyncBatchNorm`` otherwise.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CPUSyncBatchNorm", "convert_sync_batchnorm", "all_reduce_sum"]


class _AllReduceSum(torch.autograd.Function):
    """Sum of a tensor over the ranks of a process group, differentiable.

    Forward: every rank gets ``sum_r x_r``. Backward: the gradient for ``x_r`` is the sum over ranks
    of the incoming gradients, ``sum_r' dL_r'/dy``, i.e. the gradient of the sum of all ranks' losses
    (the same rule as ``torch.distributed.nn.functional.all_reduce``, which torch 2.14 deprecates
    with a FutureWarning on every call).
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # type: ignore[override]
        return _AllReduceSum.apply(grad_output, ctx.group), None


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """Differentiable all-reduce (sum) of ``tensor`` over ``group`` (default: the whole world).

    Returns a new tensor; the input is left unchanged. Its backward all-reduces the gradient.
    """
    return _AllReduceSum.apply(tensor, dist.group.WORLD if group is None else group)


class CPUSyncBatchNorm(_BatchNorm):
    r"""BatchNorm over the samples of all ranks, for any device (CPU with gloo included).

    Input ``[N, C]``, ``[N, C, L]``, ``[N, C, H, W]`` or ``[N, C, D, H, W]``; parameters and buffers
    are those of ``nn.BatchNorm{1,2,3}d`` (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``, same shapes), so state dicts load either way.

    In training mode (batch statistics in use) with ``torch.distributed`` initialised and more
    than one rank in ``process_group`` (default: the whole world), each rank packs per channel
    ``[sum(x), sum(x*x)]`` and its count of values per channel, in float64, and one differentiable
    all-reduce sums them over ranks. With the global count ``n``:
    ``mean = S1 / n``, ``var = S2 / n - mean^2`` (biased, clamped at 0),
    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, and, when tracking running statistics,
    ``running_mean = (1 - f) * running_mean + f * mean`` and
    ``running_var = (1 - f) * running_var + f * var * n / (n - 1)``, with ``f = momentum`` or, when
    ``momentum`` is None, ``1 / num_batches_tracked`` (cumulative average), exactly as
    ``nn.BatchNorm2d`` updates them, ``num_batches_tracked`` included. The backward of the
    all-reduce sums the gradients over ranks, so after DDP averages the parameter gradients every
    rank holds the gradient of the mean loss over all W*B samples: W ranks with batch B match one
    process with plain BatchNorm on the concatenated batch (up to float rounding).

    Otherwise (not distributed, world size 1, eval mode) it is exactly ``nn.BatchNorm2d``'s forward
    (``F.batch_norm``). In eval mode nothing is synchronised (as ``nn.SyncBatchNorm``), also when
    ``track_running_stats=False`` makes eval use the local batch statistics.

    Every rank must call every synchronised layer in the same order (the all-reduces are
    collectives); a rank with an empty batch still takes part (it contributes zeros).

    Like ``nn.SyncBatchNorm`` it derives from ``_BatchNorm``, not ``nn.BatchNorm2d`` (so
    ``isinstance(m, nn.BatchNorm2d)`` is False after conversion, on CPU as on CUDA), and it is not
    an ``nn.SyncBatchNorm``: DDP refuses CPU modules holding one ("SyncBatchNorm layers only work
    with GPU modules"). It also runs on CUDA tensors (with nccl), only slower than torch's kernel.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _sync_group(self) -> Optional[Any]:
        """The process group to synchronise over, or None when there is nothing to synchronise."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` with the global batch statistics (training, distributed) or as
        ``nn.BatchNorm2d`` does (otherwise); see the class docstring."""
        group = self._sync_group() if self.training else None
        if group is None:
            return super().forward(input)  # _BatchNorm.forward: exactly nn.BatchNorm2d
        self._check_input_dim(input)
        if input.size(1) != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got input of shape "
                             f"{tuple(input.shape)}")

        # the running-statistics factor, as _BatchNorm.forward computes it
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)

        c = input.size(1)
        dims = [0] + list(range(2, input.dim()))
        local_count = input.numel() // c if c else 0
        xd = input.to(torch.float64)
        packed = torch.cat([xd.sum(dims), (xd * xd).sum(dims),
                            xd.new_full((1,), float(local_count))])
        packed = all_reduce_sum(packed, group)
        total = packed[2 * c]
        n = float(total.detach())
        if n <= 1:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{int(n)} over all ranks (local input size {list(input.size())})")
        mean = packed[:c] / n
        var = (packed[c:2 * c] / n - mean * mean).clamp_min(0.0)

        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                rm, rv = self.running_mean, self.running_var
                rm.copy_(rm.to(torch.float64) * (1.0 - factor) + mean.detach() * factor)
                rv.copy_(rv.to(torch.float64) * (1.0 - factor)
                         + var.detach() * (n / (n - 1.0)) * factor)

        cdt = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        shape = [1, c] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(cdt)
        if self.weight is not None:
            scale = scale * self.weight.to(cdt)
        out = (input.to(cdt) - mean.to(cdt).view(shape)) * scale.view(shape)
        if self.bias is not None:
            out = out + self.bias.to(cdt).view(shape)
        return out.to(input.dtype)


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _on_cuda(module: nn.Module) -> bool:
    return any(t.is_cuda for t in module.parameters()) or any(t.is_cuda for t in module.buffers())


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[Any] = None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by a synchronised BatchNorm.

    On CUDA (any parameter or buffer of ``module`` on a CUDA device) this is torch's own
    ``nn.SyncBatchNorm.convert_sync_batchnorm``; otherwise each plain BatchNorm becomes a
    ``CPUSyncBatchNorm`` with the same ``num_features``, ``eps``, ``momentum``, ``affine``, bias,
    ``track_running_stats`` and training flag, and the *same* ``weight``/``bias`` Parameters (so
    ``requires_grad`` and an optimizer built before the conversion still apply) and the same
    ``running_mean``/``running_var``/``num_batches_tracked`` buffers; layers already synchronised
    (``CPUSyncBatchNorm``, ``nn.SyncBatchNorm``) are left alone. Hooks registered on a replaced
    layer are not carried over (as in torch). Returns the converted module: ``module`` itself
    unless ``module`` is a BatchNorm layer, in which case the new layer is returned.

    The device decides, so convert after moving the model to its device to get torch's fused
    ``nn.SyncBatchNorm`` on CUDA (a model converted on CPU keeps ``CPUSyncBatchNorm``, which works
    on CUDA too, more slowly; converting it again once on CUDA swaps in ``nn.SyncBatchNorm``).
    """
    if _on_cuda(module):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert_cpu(module, process_group)


def _convert_cpu(module: nn.Module, process_group: Optional[Any]) -> nn.Module:
    out = module
    if isinstance(module, _PLAIN_BN):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group,
                               bias=module.bias is not None)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child, process_group))
    return out
