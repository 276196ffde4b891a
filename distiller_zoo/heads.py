"""Inference heads: what a method puts on top of the student's backbone at test time.

Most methods train a student that is tested as it is (its own classifier). A method may declare
an *inference head* (:meth:`distiller_zoo.registry.Distiller.inference_head`): a module that reads
the student's features and gives the logits the student is trained with (its CE/KD terms) and
tested with. SimKD's head is its projector followed by the teacher's frozen classifier.

A head is saved with the student, in plain types and tensors only (``torch.load(...,
weights_only=True)`` reads it): the checkpoint's ``'model'`` stays the backbone's state dict
(RepDistiller's layout) and ``'head'`` holds :func:`head_entry`: ``{"kind": str, "config": {plain
types}, "state": state_dict}``. :func:`register_head` makes a kind rebuildable from such an entry
(:func:`head_from_entry`), and :class:`HeadedNetwork` is backbone + head as one network
(``eval_student.py``, ``transfer_student.py``, the validation of a training run).
"""
from __future__ import annotations

import abc
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn

from common.checkpoint import load_weights
from common.errors import UserError

from .registry import registrar


class HeadOutput(NamedTuple):
    """What a head computed for a batch: ``maps`` (its intermediate map, e.g. SimKD's projected
    student map [B, C_t, H, W]; None when it has none), ``feature`` (the vector its classifier
    reads, [B, D]: the network's representation, ``feats[-1]`` of a :class:`HeadedNetwork`) and
    ``logits`` [B, classes]."""

    maps: torch.Tensor | None
    feature: torch.Tensor
    logits: torch.Tensor


class InferenceHead(nn.Module, abc.ABC):
    """Base class of inference heads. ``kind`` names it in checkpoints (set by
    :func:`register_head`); :meth:`config` gives the plain-typed arguments :meth:`from_config`
    rebuilds it from (its state is loaded afterwards); ``forward(feats) -> HeadOutput`` reads the
    backbone's features (``feats`` as ``model(x, is_feat=True)`` returns them)."""

    kind: str = ""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The head's constructor arguments, as plain types (ints, floats, strings, lists)."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: dict[str, Any]) -> "InferenceHead":
        """A head built from :meth:`config`'s dict (weights not loaded)."""

    @abc.abstractmethod
    def forward(self, feats: list[torch.Tensor]) -> HeadOutput:
        """The head on the backbone's ``feats``."""


_HEADS: dict[str, type[InferenceHead]] = {}


def register_head(kind: str) -> Callable[[type[InferenceHead]], type[InferenceHead]]:
    """Class decorator: make an :class:`InferenceHead` rebuildable from checkpoints as ``kind``."""
    return registrar(_HEADS, kind, "kind", f"inference head '{kind}'")


def head_entry(head: InferenceHead) -> dict[str, Any]:
    """The checkpoint entry ``'head'`` of ``head``: its kind, config and state (detached CPU copies)."""
    return {"kind": head.kind, "config": head.config(),
            "state": {k: v.detach().to("cpu", copy=True) for k, v in head.state_dict().items()}}


def head_from_entry(entry: Any, source: str) -> InferenceHead:
    """The head saved as ``entry`` (:func:`head_entry`) in ``source``; a missing, unknown or
    corrupt entry raises :class:`UserError` (one line)."""
    if not isinstance(entry, dict) or not {"kind", "config", "state"} <= set(entry):
        raise UserError(f"{source} has a corrupt 'head' entry (it needs kind, config and state): the method's "
                        "inference head cannot be rebuilt; use another checkpoint of the run")
    kind, config = entry["kind"], entry["config"]
    if kind not in _HEADS:
        raise UserError(f"{source} holds an inference head of unknown kind {kind!r} (known: "
                        f"{', '.join(sorted(_HEADS)) or 'none'}): it was written by another version")
    if not isinstance(config, dict):
        raise UserError(f"{source} has a corrupt 'head' entry (its config is not a dict)")
    try:
        head = _HEADS[kind].from_config(config)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{source} has a corrupt 'head' entry: its {kind} config {config!r} does not build "
                        f"({type(err).__name__}: {err})") from None
    load_weights(head, entry["state"], f"{source} ('head')", what=f"the {kind} inference head")
    return head


class HeadedNetwork(nn.Module):
    """A backbone with an inference head, as one network: ``forward(x)`` gives the head's logits;
    ``forward(x, is_feat=True)`` gives ``(feats, logits)`` where ``feats`` are the backbone's with
    the last (its pooled feature) replaced by the head's ``feature`` (what the head's classifier
    reads: the representation a linear probe trains on). The head reads the backbone's
    post-activation features (no ``preact``). ``input_view`` is the backbone's."""

    def __init__(self, backbone: nn.Module, head: InferenceHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        if hasattr(backbone, "input_view"):
            self.input_view = backbone.input_view

    def forward(self, x: torch.Tensor, is_feat: bool = False):
        feats, _ = self.backbone(x, is_feat=True)
        out = self.head(feats)
        if is_feat:
            return [*feats[:-1], out.feature], out.logits
        return out.logits


def network_with_head(model: nn.Module, state: dict[str, Any], source: str) -> nn.Module:
    """``model`` (the checkpoint's backbone) with the inference head its checkpoint ``state``
    holds (a :class:`HeadedNetwork`), or ``model`` itself when the checkpoint has no ``'head'``."""
    if state.get("head") is None:
        return model
    head = head_from_entry(state["head"], source)
    device = next(model.parameters()).device
    return HeadedNetwork(model, head.to(device))
