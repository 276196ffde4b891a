"""RepDistiller's module path ``helper.pretrain``, kept for forks of its ``train_student.py``:
``from helper.pretrain import init`` gives :func:`helper.repdistiller.init`, the init stage of
abound, factor and fsp with RepDistiller's signature ``init(model_s, model_t, init_modules,
criterion, train_loader, logger, opt)``. This library's scripts run init stages through
``engine.fit.Fit`` instead."""
from helper.repdistiller import init

__all__ = ["init"]
