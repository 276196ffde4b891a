"""Loading a frozen teacher from our checkpoints or RepDistiller's, and preparing it for the
frozen-teacher fast path."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from common.checkpoint import _strip_prefixes, load_checkpoint, load_weights, nonfinite_tensors
from common.errors import UserError
from common.runtime import Runtime
from models import build_model, get_classifier, model_dict, stem_conv
from models.fold import fold_batchnorm

RGB = "rgb"


def teacher_name_from_path(path: str) -> str:
    """The architecture RepDistiller reads from a teacher path: the run folder's name up to the
    first '_' (``resnet32x4_vanilla/ckpt_epoch_240.pth`` -> ``resnet32x4``), or its first three
    parts for WRNs (``wrn_40_2_vanilla`` -> ``wrn_40_2``); in a student's folder
    (``S:wrn_16_2_T:wrn_40_2_cifar100_kd_...``) the student's model, after ``S:``."""
    name = Path(path).parent.name
    if name.startswith("S:") and "_T:" in name:  # RepDistiller's student folder: S:<model>_T:<teacher>_...
        return name[2:].split("_T:")[0]
    segments = name.split("_")
    if segments[0] != "wrn":
        return segments[0]
    return "_".join(segments[:3])


def checkpoint_view(state: dict) -> str | None:
    """The view a checkpoint's network was trained on: its ``'view'`` entry; without one, ``rgb``
    when its stem takes 3 channels (every checkpoint written before views existed, RepDistiller's),
    else None (unknown: a 1-channel network could be gray or L)."""
    if state.get("view") is not None:
        return str(state["view"])
    weights = state.get("model")
    channels = _stem_channels(weights, None) if isinstance(weights, dict) else None
    return RGB if channels in (None, 3) else None


def teacher_sources(path: str = "") -> str:
    """The two ways to get a teacher checkpoint, for a message about a missing one: RepDistiller's
    published teachers (``scripts/fetch_pretrained_teachers.sh``, installed where RepDistiller's
    scripts look) or one trained with ``train_teacher.py`` (with the model ``path``'s folder
    names, when it names one)."""
    model = teacher_name_from_path(path) if path else ""
    model = model if model in model_dict else "<model>"
    return ("get RepDistiller's published CIFAR-100 teachers with `bash scripts/fetch_pretrained_teachers.sh`, which "
            "installs them as save/models/<model>_vanilla/ckpt_epoch_240.pth (the folder RepDistiller's scripts "
            f"expect), or train one with `python train_teacher.py --model {model}`, which writes "
            f"save/models/{model}_<dataset>_lr_<lr>_decay_<wd>_trial_<trial>/ckpt_epoch_240.pth")


def read_teacher_checkpoint(path: str) -> dict:
    """The teacher checkpoint at ``path`` (``--path_t``), read by
    :func:`common.checkpoint.load_checkpoint`; none given, a missing file or a folder is a
    :class:`UserError` that says how to get a teacher (:func:`teacher_sources`)."""
    if not path:
        raise UserError(f"--path_t is required: the teacher checkpoint; {teacher_sources()}")
    if Path(path).is_dir():
        raise UserError(f"--path_t '{path}' is a folder: give the checkpoint file in it (ckpt_epoch_240.pth, or a "
                        "run's <model>_best.pth or <model>_last.pth)")
    if not Path(path).exists():
        raise UserError(f"the teacher checkpoint '{path}' does not exist: {teacher_sources(path)}")
    return load_checkpoint(path)


# the entries of a checkpoint that name something: a string each, when present
NAME_ENTRIES = {"dataset": "a data set's name", "distill": "a method's name", "model_t": "a model's name"}
DAMAGED = "the file is damaged or was not written by train_teacher.py, train_student.py or RepDistiller"


def _malformed(path: str, key: str, value: object, wanted: str) -> UserError:
    """The error for the entry ``key`` of the checkpoint at ``path`` whose ``value`` is not ``wanted``."""
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    kind = type(value).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    return UserError(f"the '{key}' entry of '{path}' is malformed: it is {article} {kind} ({shown}), not {wanted}; "
                     f"{DAMAGED}: use another checkpoint or correct that entry")


def check_entries(state: dict, path: str) -> None:
    """Raise :class:`UserError` naming ``path`` and the entry when an entry this library reads from
    a checkpoint (``arch``, ``num_classes``, ``view``, ``dataset``, ``distill``, ``model_t``) is
    present (not None) but of the wrong type or value; absent entries are fine. A ``view`` is
    checked for its type here, for its name by :func:`dataset.views.check_recorded_view`."""
    arch = state.get("arch")
    if arch is not None:
        if not isinstance(arch, str):
            raise _malformed(path, "arch", arch, "a model name (a string such as resnet32x4)")
        if arch not in model_dict:
            raise UserError(f"the 'arch' entry of '{path}' is {arch!r}, which is not a model name; {DAMAGED}: "
                            "use another checkpoint or set it to the model the file holds, one of: "
                            + ", ".join(model_dict))
    classes = state.get("num_classes")
    if classes is not None:
        if not isinstance(classes, int) or isinstance(classes, bool):
            raise _malformed(path, "num_classes", classes, "a number of classes (a positive int)")
        if classes < 1:
            raise UserError(f"the 'num_classes' entry of '{path}' is {classes}, which is not a positive number of "
                            f"classes; {DAMAGED}: use another checkpoint or correct that entry")
    view = state.get("view")
    if view is not None and not isinstance(view, str):  # its name is checked by dataset.views.check_recorded_view
        raise _malformed(path, "view", view, "a view's name (rgb, gray, L, ab, paired:<name>)")
    for key, wanted in NAME_ENTRIES.items():
        if state.get(key) is not None and not isinstance(state[key], str):
            raise _malformed(path, key, state[key], f"{wanted} (a string)")


def checkpoint_arch(state: dict, path: str) -> str:
    """The architecture of the checkpoint ``state`` read from ``path``, its entries checked
    (:func:`check_entries`): its ``'arch'`` entry, else the one its folder name gives
    (:func:`teacher_name_from_path`, RepDistiller's files); :class:`UserError` when neither names one."""
    check_entries(state, path)
    if state.get("arch") is not None:
        return state["arch"]
    arch = teacher_name_from_path(path)
    if arch not in model_dict:
        raise UserError(f"cannot tell the network's architecture: '{path}' has no 'arch' entry and its folder "
                        f"name gives '{arch}', which is not a model name; name the folder <model>_... as "
                        f"RepDistiller does (e.g. resnet32x4_vanilla)")
    return arch


def _stem_channels(weights: dict, stem: str | None) -> int | None:
    """The input channels of the stem weight ``stem`` (e.g. ``conv1.weight``) in a state dict
    (DataParallel/compile prefixes allowed); with ``stem`` None, of its first 4-d weight."""
    for key, value in weights.items():
        name = key
        for prefix in ("module.", "_orig_mod."):
            while name.startswith(prefix):
                name = name[len(prefix):]
        if torch.is_tensor(value) and value.dim() == 4 and (stem is None or name == stem):
            return int(value.shape[1])
    return None


def load_teacher(path: str, num_classes: int, dataset: str = "cifar100",
                 state: dict | None = None) -> tuple[nn.Module, str]:
    """Build and load the teacher saved at ``path``; returns ``(model, arch)``.

    The architecture is the checkpoint's ``'arch'`` entry (our checkpoints) or, for RepDistiller's
    ``{'model': state_dict}`` files, the one its folder name gives. The network takes the input
    channels of the checkpoint's stem weight; the view it was trained on
    (:func:`checkpoint_view`: ``'rgb'``, ``'L'``, ..., None when unknown) is recorded as
    ``model.input_view``. ``state``: the checkpoint, when already read. Every problem (missing
    file, not a checkpoint, unknown architecture, weights of another architecture or class
    count) raises :class:`UserError`.
    """
    state = read_teacher_checkpoint(path) if state is None else state
    if "model" not in state:
        raise UserError(f"'{path}' has no 'model' entry: it is not a checkpoint of train_teacher.py or RepDistiller")
    arch = checkpoint_arch(state, path)
    saved_classes = state.get("num_classes")
    if saved_classes is not None and saved_classes != num_classes:
        raise UserError(f"the teacher in '{path}' has {saved_classes} classes but --dataset {dataset} has "
                        f"{num_classes}: use a teacher trained on this data set")
    with torch.random.fork_rng(devices=[]):  # the weights are replaced: leave the run's RNG untouched
        model = build_model(arch, num_classes=num_classes, dataset=dataset)
        in_channels = _stem_channels(state["model"], stem_conv(model)[0] + ".weight") if isinstance(
            state["model"], dict) else None
        if in_channels not in (None, 3):
            model = build_model(arch, num_classes=num_classes, dataset=dataset, in_channels=in_channels)
    if state.get("arch") is not None:
        load_weights(model, state["model"], f"'{path}'", f"{arch}, the architecture its 'arch' entry names")
    else:
        try:
            load_weights(model, state["model"], f"'{path}'",
                         f"{arch}, the architecture its folder name '{Path(path).parent.name}' gives")
        except UserError as err:
            raise UserError(f"{err} A RepDistiller checkpoint names its architecture only in its folder's name: "
                            f"put it in <model>_vanilla/ with the model it holds") from None
    check_finite_weights(model, path)
    model.input_view = checkpoint_view(state)
    return model, arch


# what load_backbone reports about a checkpoint besides its weights (plain values only)
CHECKPOINT_FACTS = ("arch", "dataset", "num_classes", "distill", "model_t", "epoch", "accuracy", "best_acc", "view")


def checkpoint_classes(state: dict, arch: str, path: str) -> int:
    """The number of classes of the network saved in ``state`` (a loaded checkpoint of ``arch``):
    its ``'num_classes'`` entry (our checkpoints), else the output size of the classifier's weight
    in its ``'model'`` state dict (RepDistiller's ``{'model': state_dict}`` files)."""
    saved = state.get("num_classes")
    if isinstance(saved, int) and not isinstance(saved, bool) and saved > 0:
        return saved
    with torch.random.fork_rng(devices=[]):
        probe = build_model(arch, num_classes=1, dataset=state.get("dataset") or "cifar100")
    head = get_classifier(probe)
    name = next(n for n, m in probe.named_modules() if m is head)
    weights = {_strip_prefixes(k): v for k, v in state["model"].items()}
    weight = weights.get(f"{name}.weight")
    if weight is None or weight.dim() != 2:
        raise UserError(f"cannot tell the number of classes of the network in '{path}': it has no 'num_classes' "
                        f"entry and no classifier weight '{name}.weight' of {arch}; is it a checkpoint of {arch}?")
    return int(weight.shape[0])


def load_backbone(path: str, state: dict | None = None) -> tuple[nn.Module, str, dict]:
    """Build and load any network checkpoint of ours or RepDistiller's (teacher or student) with
    the checkpoint's own number of classes (:func:`checkpoint_classes`); the architecture is read
    as for a teacher (:func:`load_teacher`). ``state``: the checkpoint, when already read. Returns
    ``(model, arch, facts)``, ``facts`` being the checkpoint's plain entries of
    :data:`CHECKPOINT_FACTS` that it has. Every problem raises :class:`UserError`."""
    if not path:
        raise UserError("no checkpoint given: name a .pth file of train_teacher.py, train_student.py or RepDistiller")
    state = load_checkpoint(path) if state is None else state
    if "model" not in state:
        raise UserError(f"'{path}' has no 'model' entry: it is not a checkpoint of train_teacher.py, "
                        "train_student.py or RepDistiller")
    arch = checkpoint_arch(state, path)
    num_classes = checkpoint_classes(state, arch, path)
    model, arch = load_teacher(path, num_classes, state.get("dataset") or "cifar100", state=state)
    facts = {k: state[k] for k in CHECKPOINT_FACTS
             if isinstance(state.get(k), (str, int, float)) and not isinstance(state.get(k), bool)}
    facts.update(arch=arch, num_classes=num_classes)
    return model, arch, facts


def check_finite_weights(model: nn.Module, path: str) -> None:
    """Raise :class:`UserError` naming ``path`` and the tensors (weights or BatchNorm statistics)
    of ``model`` that hold NaN or infinite values: such a teacher's outputs are meaningless."""
    state = model.state_dict()
    bad = nonfinite_tensors(state)
    if bad:
        total = sum(1 for t in state.values() if t.is_floating_point())
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        holds = "holds" if len(bad) == 1 else "hold"
        raise UserError(f"the teacher in '{path}' has non-finite weights: {len(bad)} of its {total} tensors {holds} "
                        f"NaN or inf ({shown}), so its outputs are meaningless (was it saved from a run that "
                        "diverged?): use another checkpoint of that run (e.g. an earlier ckpt_epoch_N.pth) or train "
                        "it again")


def prepare_teacher(model: nn.Module, runtime: Runtime, sample: torch.Tensor | None = None,
                    fast: bool = True) -> nn.Module:
    """The frozen teacher (in place; returns ``model``): eval mode, no parameter requiring
    gradients, on the run's device (channels_last when the runtime asks). With ``fast`` (the
    default; ``--plain_teacher`` turns it off) every BatchNorm that follows a convolution is folded
    into it (exact in eval mode, see models/fold.py; ``sample`` [B, C, H, W] is an input of the
    data's size, for finding them) and the weights are channels_last, whose convolutions are
    faster on CPUs and on GPUs' tensor cores whatever the input's layout.

    The teacher must stay in eval mode afterwards (``DistillStep`` keeps it so) and is run under
    ``torch.inference_mode`` by ``DistillStep``."""
    model.eval().requires_grad_(False)
    runtime.place(model)
    if fast:
        fold_batchnorm(model, sample)
        model.to(memory_format=torch.channels_last)
    return model
