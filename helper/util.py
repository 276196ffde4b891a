"""RepDistiller's module path ``helper.util``, kept so that code written for RepDistiller imports
unchanged: ``from helper.util import AverageMeter, accuracy, adjust_learning_rate``.

The names are this library's (``helper.meters``, ``helper.optim``), with RepDistiller's signatures:

- :class:`AverageMeter`: ``update(val, n=1)``; ``val``, ``sum``, ``count``, ``avg`` (floats);
- :func:`accuracy` ``(output, target, topk=(1,))``: one 1-element tensor per k, top-k accuracy in percent;
- :func:`adjust_learning_rate` ``(epoch, opt, optimizer)``: sets every parameter group's learning rate to
  ``opt.learning_rate * opt.lr_decay_rate ** (number of opt.lr_decay_epochs below epoch)`` (or the cosine
  schedule with ``opt.lr_schedule == "cosine"``). RepDistiller's returns None and leaves the rate alone
  before the first decay; this one sets the rate of every epoch (the same values when the optimizer
  was built with ``opt.learning_rate``) and returns it.
"""
from helper.meters import AverageMeter, accuracy
from helper.optim import adjust_learning_rate

__all__ = ["AverageMeter", "accuracy", "adjust_learning_rate"]
