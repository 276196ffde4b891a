"""RepDistiller's module path ``helper.loops``, kept for code written for it (re-exports of :mod:`helper.repdistiller`)."""
from helper.repdistiller import train_distill, train_vanilla, validate

__all__ = ["train_distill", "train_vanilla", "validate"]
