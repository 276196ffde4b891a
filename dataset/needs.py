"""What a method needs its training batches to carry, declared by the method and given to the loaders."""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("exact", "relax")


@dataclass(frozen=True)
class ContrastNeed:
    """``contrast_idx`` [B, k + 1] per batch: column 0 the positive (``mode`` ``exact``: the sample
    itself; ``relax``: a sample of its class), then ``k`` distinct negatives of other classes."""

    k: int
    mode: str = "exact"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"contrast mode {self.mode!r}: use one of {', '.join(MODES)}")


@dataclass(frozen=True)
class DataNeeds:
    """What the training batches carry beyond ``(img, target)``: ``index`` [B], the samples'
    positions in the training set (``index``), and, with ``contrast``, the contrastive indices.
    ``views``: the views ``img`` carries, concatenated as channels in this order (see
    :class:`dataset.views.ViewLayout`); ``("rgb",)`` is the image as it always was."""

    index: bool = False
    contrast: ContrastNeed | None = None
    views: tuple[str, ...] = ("rgb",)

    @property
    def with_index(self) -> bool:
        """Whether batches carry ``index`` (``contrast`` implies it)."""
        return self.index or self.contrast is not None
