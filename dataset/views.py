"""Views of a sample: what a network sees of an image (``--view``, ``--view_s``, ``--view_t``).

- ``rgb`` (3 channels): the image, normalised with the set's mean/std (today's pipeline).
- ``gray`` (1): ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``, normalised with the set's mean and
  std combined with the same weights.
- ``L`` (1) and ``ab`` (2): CIE Lab (sRGB companding, D65 white) of the image as CMC computes it
  (``skimage.color.rgb2lab``'s constants: :data:`RGB_TO_XYZ`, :data:`WHITE_D65`, the threshold
  :data:`LAB_EPSILON` and slope :data:`LAB_SLOPE`; see :func:`rgb_to_lab`), normalised as CMC
  does: L with mean 50 and std 50; a with mean (-86.183 + 98.233) / 2 and std (86.183 + 98.233) / 2;
  b with mean (-107.857 + 94.478) / 2 and std (107.857 + 94.478) / 2 (the centres and half-ranges
  of a and b over the sRGB gamut).
- ``paired:<name>`` (the channels of that folder's images): a paired set's other modality
  (``--dataset paired``), normalised with mean 0.5 and std 0.5 per channel (so [0, 1] -> [-1, 1];
  fixed, so that runs on different splits see the same inputs).

When a run needs several views (a teacher on L, a student on ab), the loaders' ``img`` is the
concatenation of the distinct views' channels, made after the crop and flip, so every network sees
the same crop of the same sample; :class:`ViewLayout` says which channels each view holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torchvision import transforms

from common.errors import UserError

BASE_VIEWS = {"rgb": 3, "gray": 1, "L": 1, "ab": 2}   # computed from the RGB image
PAIRED = "paired:"
LUMA = (0.299, 0.587, 0.114)
# CMC's Lab is skimage's rgb2lab, whose constants are those of the sRGB and CIE documents before
# their exact forms: the sRGB (linear) -> XYZ matrix with six digits, the D65 white point (2 degree
# observer) and the f(t) of CIE Lab with its rounded threshold and slope. The exact ones
# (0.4124564 ..., (6/29)^3, 1 / (3 (6/29)^2)) move the normalised L/ab by up to 4.8e-5.
RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
              (0.212671, 0.715160, 0.072169),
              (0.019334, 0.119193, 0.950227))
WHITE_D65 = (0.95047, 1.0, 1.08883)
LAB_EPSILON = 0.008856   # f(t) = t^(1/3) above it, LAB_SLOPE * t + 16 / 116 at and below it
LAB_SLOPE = 7.787
# (mean, std) of L, a and b (CMC's normalisation)
LAB_NORM = ((50.0, 50.0),
            ((-86.183 + 98.233) / 2, (86.183 + 98.233) / 2),
            ((-107.857 + 94.478) / 2, (107.857 + 94.478) / 2))
PAIRED_MEAN, PAIRED_STD = 0.5, 0.5


def is_view(name: object) -> bool:
    """Whether ``name`` is a view name: ``rgb``, ``gray``, ``L``, ``ab`` or ``paired:<name>``."""
    return isinstance(name, str) and (name in BASE_VIEWS or (
        name.startswith(PAIRED) and len(name) > len(PAIRED) and "/" not in name))


def check_recorded_view(view: str | None, path: str) -> None:
    """Raise :class:`UserError` blaming the checkpoint at ``path`` when the view it records is
    not a view name (None, no record, is fine)."""
    if view is not None and not is_view(view):
        raise UserError(f"the 'view' entry of '{path}' is {str(view)[:60]!r}, which is not a view (rgb, gray, L, ab, "
                        "paired:<name>); the file is damaged or was not written by train_teacher.py, train_student.py "
                        "or RepDistiller: use another checkpoint or set it to the view its network was trained on")


def check_view(name: str, flag: str = "--view") -> str:
    """``name`` if it is a view name (:func:`is_view`), else :class:`UserError` (``flag`` names
    the option in the message)."""
    if is_view(name):
        return name
    raise UserError(f"{flag} {name!r} is not a view: use rgb, gray, L, ab or paired:<folder> (with --dataset paired)")


def network_view(given: str | None, recorded: str | None, path: object) -> str:
    """The view to feed the network saved at ``path``: ``--view`` (``given``, which must agree with
    the view its checkpoint records, ``recorded``), else the recorded one; a :class:`UserError`
    when neither tells it (a checkpoint without a view whose stem does not take 3 channels)."""
    check_recorded_view(recorded, str(path))
    if given is not None:
        check_view(given, "--view")
        if recorded is not None and given != recorded:
            raise UserError(f"--view {given} contradicts '{path}', whose network was trained on view {recorded}: "
                            "leave --view out (it defaults to the checkpoint's view)")
        return given
    if recorded is None:
        raise UserError(f"'{path}' records no view and its network does not take 3 channels: say which view it was "
                        "trained on with --view")
    return recorded


def distinct(views: Sequence[str]) -> tuple[str, ...]:
    """The distinct views of ``views``, in their first order."""
    return tuple(dict.fromkeys(views))


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB companding undone: ``c / 12.92`` up to 0.04045, else ``((c + 0.055) / 1.055) ** 2.4``."""
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).pow(2.4))


def _lab64(rgb: torch.Tensor) -> torch.Tensor:
    """CIE Lab of ``rgb`` ``[B, 3, H, W]`` in float64 (see :func:`rgb_to_lab`)."""
    lin = srgb_to_linear(rgb.double())
    r, g, b = lin[:, 0], lin[:, 1], lin[:, 2]

    def f(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t > LAB_EPSILON, t.clamp(min=LAB_EPSILON).pow(1 / 3), t * LAB_SLOPE + 16 / 116)

    fx, fy, fz = (f((m[0] * r + m[1] * g + m[2] * b) / white) for m, white in zip(RGB_TO_XYZ, WHITE_D65))
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE Lab ``[B, 3, H, W]`` (L in [0, 100]) of sRGB images ``[B, 3, H, W]`` in [0, 1], as
    ``skimage.color.rgb2lab`` (CMC's conversion) computes it: linear ``c = srgb_to_linear(rgb)``,
    ``(X, Y, Z) = RGB_TO_XYZ c / WHITE_D65``, ``f(t) = t^(1/3)`` for ``t > 0.008856`` else
    ``7.787 t + 16/116``, and ``L = 116 f(Y) - 16``, ``a = 500 (f(X) - f(Y))``,
    ``b = 200 (f(Y) - f(Z))``. Computed in float64 (as skimage does), returned in ``rgb``'s dtype
    and on its device. Per pixel, with weighted sums (no matrix product), so a pixel's value does
    not depend on the batch it is in."""
    return _lab64(rgb).to(rgb.dtype)


def normalised_lab(rgb: torch.Tensor) -> torch.Tensor:
    """:func:`rgb_to_lab` normalised as CMC does, ``(lab_c - mean_c) / std_c`` with
    :data:`LAB_NORM`, in float64 and then cast to ``rgb``'s dtype (so the views of float32
    images equal CMC's float64 ones to float32 rounding)."""
    lab = _lab64(rgb)
    return torch.stack([(lab[:, c] - LAB_NORM[c][0]) / LAB_NORM[c][1] for c in range(3)], dim=1).to(rgb.dtype)


def rgb_to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``[B, 1, H, W]`` of ``[B, 3, H, W]`` images."""
    return (LUMA[0] * rgb[:, 0] + LUMA[1] * rgb[:, 1] + LUMA[2] * rgb[:, 2]).unsqueeze(1)


@dataclass(frozen=True)
class ViewLayout:
    """The channels of a batch that carries several views: ``views`` (distinct, in order) are
    concatenated along dimension 1, each taking :meth:`channels` of them (:meth:`slice`).

    ``sources`` are the channels of the images the views are made from, as ``(folder, channels)``:
    ``(("rgb", 3),)`` for every set but a paired one, whose images carry e.g. ``(("rgb", 3),
    ("depth", 1))``. ``rgb``, ``gray``, ``L`` and ``ab`` are made from the ``rgb`` source,
    ``paired:<name>`` is source ``<name>``.
    """

    views: tuple[str, ...] = ("rgb",)
    sources: tuple[tuple[str, int], ...] = (("rgb", 3),)

    def __post_init__(self) -> None:
        object.__setattr__(self, "views", tuple(self.views))
        object.__setattr__(self, "sources", tuple((str(n), int(c)) for n, c in self.sources))
        if not self.views or len(set(self.views)) != len(self.views):
            raise ValueError(f"a layout needs distinct views, got {self.views}")
        names = dict(self.sources)
        for view in self.views:
            check_view(view)
            source = view[len(PAIRED):] if view.startswith(PAIRED) else "rgb"
            if source not in names:
                raise UserError(f"view {view} needs the images' {source!r} channels, which this data set does not "
                                f"have" + (": use --dataset paired with a folder of that name" if source != "rgb"
                                           else ""))
            if source == "rgb" and names["rgb"] != 3:
                raise UserError(f"view {view} needs 3-channel rgb images, got {names['rgb']} channels")

    @property
    def plain(self) -> bool:
        """Whether this is the single ``rgb`` view of RGB images (today's pipeline)."""
        return self.views == ("rgb",) and self.sources == (("rgb", 3),)

    def channels(self, view: str) -> int:
        """The number of channels of ``view``."""
        if view.startswith(PAIRED):
            return dict(self.sources)[view[len(PAIRED):]]
        return BASE_VIEWS[view]

    def slice(self, view: str) -> slice:
        """The channels of ``view`` in the concatenated batch."""
        if view not in self.views:
            raise KeyError(f"view {view!r} is not in this layout {self.views}")
        start = sum(self.channels(v) for v in self.views[:self.views.index(view)])
        return slice(start, start + self.channels(view))

    @property
    def total(self) -> int:
        """The channels of the concatenated batch."""
        return sum(self.channels(v) for v in self.views)

    @property
    def source_channels(self) -> int:
        """The channels of the source images."""
        return sum(c for _, c in self.sources)

    def source_slice(self, name: str) -> slice:
        """The channels of source ``name`` in the source images."""
        start = 0
        for source, count in self.sources:
            if source == name:
                return slice(start, start + count)
            start += count
        raise KeyError(name)

    def make(self, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """The concatenated, normalised views ``[B, total, H, W]`` of float source images
        ``[B, source_channels, H, W]`` in [0, 1] (any device; float32 in, float32 out); ``mean`` and
        ``std`` are the rgb normalisation (the set's, 3 values each)."""
        rgb = images[:, self.source_slice("rgb")] if "rgb" in dict(self.sources) else None
        lab = normalised_lab(rgb) if rgb is not None and ("L" in self.views or "ab" in self.views) else None
        parts = []
        for view in self.views:
            if view == "rgb":
                parts += [(rgb[:, c:c + 1] - mean[c]) / std[c] for c in range(3)]
            elif view == "gray":
                gray_mean = sum(w * m for w, m in zip(LUMA, mean))
                gray_std = sum(w * s for w, s in zip(LUMA, std))
                parts.append((rgb_to_gray(rgb) - gray_mean) / gray_std)
            elif view == "L":
                parts.append(lab[:, 0:1])
            elif view == "ab":
                parts.append(lab[:, 1:3])
            else:
                parts.append((images[:, self.source_slice(view[len(PAIRED):])] - PAIRED_MEAN) / PAIRED_STD)
        return torch.cat(parts, dim=1)


class ToViews:
    """The torchvision transform that replaces ``Normalize`` after ``ToTensor``: a float image
    ``[C, H, W]`` in [0, 1] -> its layout's concatenated views (``mean``, ``std``: the rgb
    normalisation). The tensor pipeline recognises it (``dataset.tensor_loader.tensor_source``)."""

    def __init__(self, layout: ViewLayout, mean: Sequence[float], std: Sequence[float]):
        self.layout = layout
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.layout.make(img.unsqueeze(0), self.mean, self.std)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(views={self.layout.views}, mean={self.mean}, std={self.std})"


def with_views(transform: Any, views: Sequence[str]) -> Any:
    """``transform`` (a ``Compose`` ending in ``Normalize``) giving ``views`` instead: its
    ``Normalize`` replaced by :class:`ToViews` with the same mean/std. ``transform`` itself when
    ``views`` is ``("rgb",)`` (unchanged, bit for bit) or when it already ends in ``ToViews`` of
    these views; :class:`UserError` when it cannot give them."""
    views = distinct(views)
    steps = list(getattr(transform, "transforms", [transform]))
    last = steps[-1] if steps else None
    if isinstance(last, ToViews):
        if last.layout.views != views:
            raise ValueError(f"this set's transform gives views {last.layout.views}, not {views}")
        return transform
    if views == ("rgb",):
        return transform
    if not isinstance(last, transforms.Normalize) or len(last.mean) != 3:
        raise UserError(f"views {', '.join(views)} need a data set of RGB images normalised per channel")
    layout = ViewLayout(views)
    return transforms.Compose(steps[:-1] + [ToViews(layout, last.mean, last.std)])
