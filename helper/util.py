"""RepDistiller's module path ``helper.util``, kept for code written for it: ``AverageMeter(update(val, n=1);
val, sum, count, avg)``, ``accuracy(output, target, topk=(1,))`` (one 1-element tensor per k, in percent) and
``adjust_learning_rate(epoch, opt, optimizer)`` (sets the rate of every epoch, step or cosine rule, and returns
it; RepDistiller's returns None and leaves it alone before the first decay), re-exported from
:mod:`common.meters` and :mod:`engine.optim`."""
from common.meters import AverageMeter, accuracy
from engine.optim import adjust_learning_rate

__all__ = ["AverageMeter", "accuracy", "adjust_learning_rate"]
