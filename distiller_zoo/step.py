"""The steps of ``train_student.py`` as modules, so that one object holds everything a step
trains (and DDP can wrap it): ``step(raw_batch) -> (logits, target, {term: loss})``. The
distillation step of the main stage, and the init stage's step of the methods that have one."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from common.runtime import Runtime

from .KD import DistillKL
from .registry import Batch, Distiller, NetOutput


def channels(img: torch.Tensor, part: slice | None) -> torch.Tensor:
    """The channels ``part`` of an image batch ``[B, C, H, W]`` (a network's view, see
    ``dataset.views.ViewLayout``); the batch itself when ``part`` is None."""
    return img if part is None else img[:, part]


def ordinary_tensors(out: NetOutput) -> NetOutput:
    """A teacher's output computed under ``torch.inference_mode`` as ordinary tensors (copies,
    made outside it; cheap next to the forward): autograd cannot save inference tensors for the
    backward of the losses that use them (FitNet's regressor target, CRD's and CC's teacher
    embeddings, FT's paraphraser, VID, ...). The copies are contiguous (a channels_last teacher's
    feature maps are not), as the losses' ``view`` calls expect."""
    return NetOutput([f.clone(memory_format=torch.contiguous_format) for f in out.feats],
                     out.logits.clone(memory_format=torch.contiguous_format))


class DistillStep(nn.Module):
    """One distillation step (``train_student.py``): the weighted terms
    ``gamma * CE + alpha * KL_T + beta * method`` of the student against frozen teacher(s).

    With several teachers, KD's target is their averaged logits and every other term is the
    mean over one Distiller per teacher. Terms whose weight is 0 are not computed. The teachers
    stay in eval mode, run under ``torch.inference_mode`` and are never trained (prepare them with
    ``models.teacher.prepare_teacher``); the Distillers get ordinary copies of their outputs.
    Where a teacher's Distiller asks for it (:meth:`Distiller.teacher_train_mode`), that teacher
    follows the step's mode instead (train mode while training: its BatchNorms use the batch's
    statistics and update their running ones), still without gradient; it must not be folded.
    ``weights``: ``(gamma, alpha, beta)``; ``kd_T``: KD's temperature. ``input_s`` and
    ``inputs_t`` (one per teacher): the channels of ``img`` each network sees (its view, when the
    batch carries several); None: all of them. When the Distiller declares an inference head
    (:meth:`Distiller.inference_head`; one teacher only) the student's logits are the head's:
    CE, KD and the returned logits (training accuracy) read them, and the Distiller gets the
    head's output in ``s.head``.
    """

    def __init__(self, student: nn.Module, teachers: list[nn.Module], distillers: nn.ModuleList,
                 weights: tuple[float, float, float], kd_T: float, runtime: Runtime,
                 input_s: slice | None = None, inputs_t: Sequence[slice | None] | None = None):
        super().__init__()
        self.input_s = input_s
        self.inputs_t = tuple(inputs_t) if inputs_t is not None else (None,) * len(teachers)
        if len(self.inputs_t) != len(teachers):
            raise ValueError(f"{len(self.inputs_t)} teacher inputs for {len(teachers)} teachers")
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        self.distillers = distillers
        self.gamma, self.alpha, self.beta = weights
        self.kd = DistillKL(kd_T)
        self.preact_s, self.preact_t = distillers[0].preacts()
        heads = [d.inference_head() for d in distillers]
        if any(h is not None for h in heads) and len(teachers) > 1:
            raise UserError(f"--distill {distillers[0].name} tests the student through an inference head built on "
                            f"one teacher (its classifier): give one --path_t, not {len(teachers)}")
        # a tuple: the head's modules are the Distiller's and the teacher's, registered there
        self._head = (heads[0],)
        # teachers run in train mode by their Distiller's declaration (none by default)
        self.teacher_trains = tuple(bool(d.teacher_train_mode()) for d in distillers)
        for trains, teacher in zip(self.teacher_trains, teachers):
            if trains and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in teacher.modules()):
                raise UserError(f"--distill {distillers[0].name} runs the teacher's BatchNorms in train mode, but the "
                                "teacher has none left (folded by the fast teacher path): use --plain_teacher")
        self.runtime = runtime
        # tuples: compiled wrappers must not be registered as submodules (their weights are saved once)
        self._student_fn = (runtime.forward_fn(student),)
        self._teacher_fns = tuple(runtime.forward_fn(t) for t in teachers)

    def train(self, mode: bool = True) -> "DistillStep":
        super().train(mode)
        self.teachers.training = mode and any(self.teacher_trains)  # the container as before: eval unless declared
        for trains, teacher in zip(self.teacher_trains, self.teachers):
            teacher.train(mode and trains)
        return self

    def batch(self, raw: tuple) -> Batch:
        return Batch(*(self.runtime.to_device(t) for t in raw))

    def forward(self, raw: tuple) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        batch = raw if isinstance(raw, Batch) else self.batch(raw)
        feats_s, logits_s = self._student_fn[0](channels(batch.img, self.input_s), is_feat=True, preact=self.preact_s)
        # no_grad where a teacher trains its BatchNorms (their running statistics stay ordinary tensors)
        with torch.no_grad() if any(self.teacher_trains) and self.training else torch.inference_mode():
            outs_t = [NetOutput(*fn(channels(batch.img, part), is_feat=True, preact=self.preact_t))
                      for fn, part in zip(self._teacher_fns, self.inputs_t)]
        outs_t = [ordinary_tensors(t) for t in outs_t]
        head = self._head[0]
        s = NetOutput(feats_s, logits_s)
        if head is not None:  # the student is trained and tested through the method's head
            out = head(feats_s)
            logits_s = out.logits
            s = NetOutput(feats_s, logits_s, head=out)
        terms = {}
        if self.gamma:
            terms["ce"] = self.gamma * F.cross_entropy(logits_s, batch.target)
        if self.alpha:
            terms["kd"] = self.alpha * self.kd(logits_s, torch.stack([t.logits for t in outs_t]).mean(0))
        if self.beta:
            per_teacher = [distiller(s, t, batch) for distiller, t in zip(self.distillers, outs_t)]
            terms.update({name: self.beta * torch.stack([p[name] for p in per_teacher]).mean()
                          for name in per_teacher[0]})
        if not terms:
            raise UserError("-r, -a and -b are all 0 (or the method has no term): nothing to train")
        return logits_s, batch.target, terms


class InitStep(nn.Module):
    """One step of a Distiller's init stage (AB, FT, FSP; RepDistiller's ``helper/pretrain.py``):
    the term ``init``, ``distiller.init_loss`` of the student against the frozen ``teacher``.

    It trains :meth:`trained_parameters`: ``distiller.init_modules()`` and, when
    ``distiller.init_trains_student()``, the student's feature layers. In training mode the
    student is in eval mode except for those layers; the teacher stays in eval mode and runs
    without gradient. The networks run as they are (not compiled), under the loop's autocast.
    ``input_s``, ``input_t``: the channels of ``img`` each network sees (None: all)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, distiller: Distiller, runtime: Runtime,
                 input_s: slice | None = None, input_t: slice | None = None):
        super().__init__()
        self.input_s, self.input_t = input_s, input_t
        self.student, self.teacher, self.distiller = student, teacher, distiller
        modules = list(distiller.init_modules())
        if distiller.init_trains_student():
            modules.append(student.get_feat_modules())
        self.trained = nn.ModuleList(modules)
        self.runtime = runtime

    def trained_parameters(self) -> list[nn.Parameter]:
        """The parameters the init stage updates (frozen ones left out)."""
        return [p for m in self.trained for p in m.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "InitStep":
        super().train(mode)
        self.student.eval()
        self.teacher.eval()
        for module in self.trained:
            module.train(mode)
        return self

    def forward(self, raw: tuple) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        batch = Batch(*(self.runtime.to_device(t) for t in raw))
        preact_s, preact_t = self.distiller.preacts()
        feats_s, logits_s = self.student(channels(batch.img, self.input_s), is_feat=True, preact=preact_s)
        with torch.no_grad():
            feats_t, logits_t = self.teacher(channels(batch.img, self.input_t), is_feat=True, preact=preact_t)
        loss = self.distiller.init_loss(NetOutput(feats_s, logits_s), NetOutput(feats_t, logits_t), batch)
        return logits_s, batch.target, {"init": loss}
