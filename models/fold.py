"""BatchNorm folded into the convolution before it, for frozen networks in eval mode.

In eval mode a BatchNorm is an affine map per channel with its running statistics, so
``bn(conv(x))`` equals ``conv'(x)`` with::

    s  = gamma / sqrt(running_var + eps)
    w' = w * s                      (per output channel)
    b' = (b - running_mean) * s + beta

(computed in float64, stored in the convolution's dtype). The BatchNorm is then replaced by
``nn.Identity``, which removes one pass over every feature map from the forward.

Which BatchNorms can be folded is read from the network's own computation, not from names: the
model is run once per forward variant (``model(x)``, and with ``is_feat=True`` and
``preact=False/True`` when its ``forward`` takes them) on a sample input with autograd recording,
and a BatchNorm is folded into a convolution only if, in every call, its input is that
convolution's output and nothing else uses that output (no other layer, no in-place change, no
returned feature). E.g. in the WRNs the pre-activation blocks' ``bn1`` read a residual sum (or the
stem convolution's output, which is also a feature and the shortcut) and stay; every other
BatchNorm of the model zoo follows its convolution and is folded. ``torch.fx`` cannot be used
here: the models' ``forward`` branches on ``is_feat``/``preact`` in Python.

Only for networks that stay in eval mode (frozen teachers): after folding, ``train()`` would not
bring batch statistics back.
"""
from __future__ import annotations

import inspect
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ["FoldPair", "find_foldable", "fold_batchnorm", "forward_variants"]


@dataclass(frozen=True)
class FoldPair:
    """A convolution and the BatchNorm that only ever reads its output (module names in the model)."""

    conv: str
    bn: str


def forward_variants(model: nn.Module) -> list[dict[str, bool]]:
    """The keyword arguments of every forward path of ``model``: ``{}``, and with the model
    contract's flags ``{'is_feat': True}`` and ``{'is_feat': True, 'preact': True}``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return [{}]
    variants: list[dict[str, bool]] = [{}]
    if "is_feat" in params:
        variants.append({"is_feat": True})
        if "preact" in params:
            variants.append({"is_feat": True, "preact": True})
    return variants


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) forward output."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _default_sample(model: nn.Module) -> torch.Tensor:
    """Two CIFAR-sized images [2, C, 32, 32] from a private generator (the global RNG is untouched),
    ``C`` the input channels of ``model``'s first convolution (3 without one)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    return torch.randn(2, channels, 32, 32, generator=torch.Generator().manual_seed(0))


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, _ConvNd) and not module.transposed


def _is_foldable_bn(module: nn.Module) -> bool:
    return (isinstance(module, _BatchNorm) and not module.training
            and module.running_mean is not None and module.running_var is not None)


def find_foldable(model: nn.Module, sample: torch.Tensor | None = None) -> list[FoldPair]:
    """The (convolution, BatchNorm) pairs of ``model`` (in eval mode) that :func:`fold_batchnorm`
    folds, found by running ``sample`` [B, C, H, W] (default: two random 32x32 images) through
    every forward variant with autograd recording: a BatchNorm qualifies if in every call its
    input is the output of one and the same convolution, with as many channels, that output has
    no other use (another layer, an in-place op, or being returned), and every call of that
    convolution feeds it."""
    return _trace(model, sample)[0]


def _trace(model: nn.Module, sample: torch.Tensor | None) -> tuple[list[FoldPair], list[list[torch.Tensor]]]:
    """:func:`find_foldable`'s pairs, and the (detached) outputs of each forward variant."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    convs = [m for m in model.modules() if _is_conv(m)]
    bns = [m for m in model.modules() if _is_foldable_bn(m)]
    if not convs or not bns:
        return [], []

    conv_of_node: dict[int, nn.Module] = {}      # id(grad_fn of a conv output) -> that conv
    conv_calls: dict[int, list[int]] = defaultdict(list)  # id(conv) -> ids of its output nodes
    bn_calls: dict[int, list[tuple[int, int]]] = defaultdict(list)  # id(bn) -> (input node, output node)
    consumers: dict[int, list[int]] = defaultdict(list)  # id(node) -> ids of the nodes that read it
    keep: list[Any] = []  # every node seen stays alive, so that ids are never reused

    def on_conv(module: nn.Module, args: tuple, output: Any) -> None:
        node = output.grad_fn if isinstance(output, torch.Tensor) else None
        if node is not None:
            keep.append(node)
            conv_of_node[id(node)] = module
            conv_calls[id(module)].append(id(node))
        else:  # untracked output: this conv can never be shown to feed a BN alone
            conv_calls[id(module)].append(-1)

    def on_bn(module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0] if args else None
        in_node = x.grad_fn if isinstance(x, torch.Tensor) else None
        out_node = output.grad_fn if isinstance(output, torch.Tensor) else None
        keep.extend(n for n in (in_node, out_node) if n is not None)
        bn_calls[id(module)].append((id(in_node) if in_node is not None else -1,
                                     id(out_node) if out_node is not None else -2))

    device, dtype = _model_device_dtype(model)
    x = (_default_sample(model) if sample is None else sample).detach().to(device, dtype).requires_grad_(True).clone()
    handles = [m.register_forward_hook(on_conv) for m in convs] + [m.register_forward_hook(on_bn) for m in bns]
    results: list[list[torch.Tensor]] = []
    try:
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            for kwargs in forward_variants(model):
                outputs = list(_tensors(model(x, **kwargs)))
                keep.extend(outputs)
                results.append([t.detach() for t in outputs])
                stack = []
                for t in outputs:
                    if t.grad_fn is not None:
                        consumers[id(t.grad_fn)].append(0)  # 0: returned (a root of the graph)
                        stack.append(t.grad_fn)
                seen = {id(n) for n in stack}
                while stack:
                    node = stack.pop()
                    keep.append(node)
                    for nxt, _ in node.next_functions:
                        if nxt is None:
                            continue
                        consumers[id(nxt)].append(id(node))
                        if id(nxt) not in seen:
                            seen.add(id(nxt))
                            stack.append(nxt)
    finally:
        for h in handles:
            h.remove()

    pairs = []
    folded_convs: set[int] = set()
    for bn in bns:
        calls = bn_calls.get(id(bn))
        if not calls:
            continue  # never called in any variant: leave it alone
        sources = {id(conv_of_node[i]) if i in conv_of_node else None for i, _ in calls}
        if len(sources) != 1 or None in sources:
            continue
        conv = conv_of_node[calls[0][0]]
        if (conv.out_channels != bn.num_features or id(conv) in folded_convs
                or sorted(conv_calls[id(conv)]) != sorted(i for i, _ in calls)
                or any(consumers[i] != [o] for i, o in calls)):
            continue
        folded_convs.add(id(conv))
        pairs.append(FoldPair(names[id(conv)], names[id(bn)]))
    return pairs, results


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: _BatchNorm) -> None:
    """Rewrite ``conv``'s weight and bias (in place; the bias is created if absent) to include ``bn``."""
    w = conv.weight.double()
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.double()) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    conv.weight.copy_(w * scale.reshape(-1, *([1] * (w.dim() - 1))))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered as a child in ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)


def _outputs_match(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
    if len(reference) != len(outputs):
        return False
    for ref, out in zip(reference, outputs):
        if ref.shape != out.shape:
            return False
        scale = ref.abs().max().item() if ref.numel() else 0.0
        if ref.numel() and (ref - out).abs().max().item() > 1e-3 * scale + 1e-5:
            return False
    return True


def fold_batchnorm(model: nn.Module, sample: torch.Tensor | None = None) -> nn.Module:
    """Fold every BatchNorm that only reads a convolution's output into that convolution
    (see :func:`find_foldable`; ``sample`` [B, C, H, W] is an input of the data's size, default
    two random 32x32 images) and replace it by ``nn.Identity``. ``model`` must be in eval mode
    and stay in it; it is changed in place and returned. Logits and every feature are those of
    the unfolded model up to float rounding; this is checked on ``sample``, and should it fail
    (e.g. a BatchNorm also called through a reference the model does not register) the folding
    is undone with a warning."""
    if any(m.training for m in model.modules()):
        raise ValueError("fold_batchnorm: the model must be in eval mode (folding uses the running "
                         "statistics; a network that trains its BatchNorms cannot be folded)")
    sample = _default_sample(model) if sample is None else sample
    pairs, reference = _trace(model, sample)
    if not pairs:
        return model
    modules = dict(model.named_modules())
    device, dtype = _model_device_dtype(model)
    x = sample.detach().to(device, dtype)
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
        undo = []
        for pair in pairs:
            conv, bn, identity = modules[pair.conv], modules[pair.bn], nn.Identity()
            bias = None if conv.bias is None else conv.bias.detach().clone()
            undo.append((conv, conv.weight.detach().clone(), bias, bn, identity))
            _fold_into(conv, bn)
            _replace(model, bn, identity)
        for kw, ref in zip(forward_variants(model), reference):
            if not _outputs_match(ref, list(_tensors(model(x, **kw)))):
                for conv, weight, bias, bn, identity in undo:
                    conv.weight.copy_(weight)
                    if bias is None:
                        conv.bias = None
                    else:
                        conv.bias.copy_(bias)
                    _replace(model, identity, bn)
                warnings.warn(f"fold_batchnorm: {type(model).__name__} computed something else with its "
                              f"BatchNorms folded (forward{kw or ''}); it is left unfolded", stacklevel=2)
                break
    return model
