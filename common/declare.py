"""Options declared once, as dataclasses, from which command-line flags are generated.

A group of options is a dataclass whose fields are made with :func:`option`::

    @dataclass
    class BankOptions:
        \"\"\"the memory bank\"\"\"
        nce_k: int = option(16384, "negatives per anchor", type=positive_int)

The field's name is the flag (``--nce_k``), its default the flag's default, ``type`` the
checked parser of :mod:`common.argtypes`. Groups compose by inheritance: a method's options
subclass the shared groups they use (the memory bank's, the embedding's), and
:func:`add_option_groups` adds each group's own fields once, however many methods share it.
:func:`options_from` reads a group back from a parsed namespace: that and the scripts' parsing
are the only places that read ``opt``. An option that a resumed run may change says so where it
is declared: ``option(..., resumable=True)``, or :func:`resumable` around a flag added with
``add_argument``; :func:`resumable_options` lists a parser's.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, *, type: Callable[[str], Any] | None = None,
           choices: Sequence[Any] | None = None, resumable: bool = False) -> Any:
    """A dataclass field that is also a command-line flag ``--<field name>``: ``default``, its
    ``help`` text, the ``type=`` function that parses it (default: the field's annotation) and its
    ``choices``. A ``bool`` field defaulting to False becomes a switch (``store_true``).
    ``resumable``: a resumed run may give it another value (it cannot change what the run
    computes, beyond float rounding); see :func:`resumable`."""
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "choices": choices,
                                                        "resumable": resumable})


# The attribute of a parsed namespace that lists its resumable options (:func:`record_resumable`);
# private (a leading ``_``), so never recorded as an option of the run.
RESUMABLE = "_resumable"


def resumable(action: argparse.Action) -> argparse.Action:
    """Mark the flag that ``parser.add_argument(...)`` returned (``action``) as one a resumed run
    may change, as :func:`option`'s ``resumable=True`` marks a declared option; returns it."""
    action.resumable = True
    return action


def resumable_options(parser: argparse.ArgumentParser) -> frozenset[str]:
    """The options of ``parser`` marked resumable where they are declared."""
    return frozenset(a.dest for a in parser._actions if getattr(a, "resumable", False))


def record_resumable(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> None:
    """Record on ``namespace`` (parsed by ``parser``) the names of its resumable options, as
    :data:`RESUMABLE`: what a resume may change and what a run's results.json lists."""
    setattr(namespace, RESUMABLE, sorted(resumable_options(parser)))


def own_fields(cls: type) -> list[dataclasses.Field]:
    """The fields that ``cls`` declares itself (not those it inherits from a dataclass base)."""
    inherited = {name for base in cls.__mro__[1:] for name in getattr(base, "__dataclass_fields__", {})}
    return [f for f in dataclasses.fields(cls) if f.name not in inherited]


def option_groups(classes: Iterable[type]) -> list[type]:
    """Every dataclass of ``classes`` and of their bases, each once, bases first."""
    groups: list[type] = []
    for cls in classes:
        for base in reversed(cls.__mro__):
            if dataclasses.is_dataclass(base) and base not in groups:
                groups.append(base)
    return groups


_PARSERS = {int: int, float: float, str: str, "int": int, "float": float, "str": str}


def _parser_of(f: dataclasses.Field) -> Callable[[str], Any]:
    declared = f.metadata.get("type")
    if declared is not None:
        return declared
    annotation = f.type
    if isinstance(annotation, str):
        annotation = annotation.split("|")[0].strip()
    if annotation not in _PARSERS:
        raise TypeError(f"option {f.name}: give type= (its annotation {f.type!r} has no parser)")
    return _PARSERS[annotation]


def _is_switch(f: dataclasses.Field) -> bool:
    return f.default is False and f.type in (bool, "bool")


def add_option_group(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """Add the flags of ``cls``'s own fields to ``parser``, in an argument group titled ``title``
    (default: the first line of ``cls``'s docstring)."""
    fields = own_fields(cls)
    if not fields:
        return
    heading = title or (cls.__doc__ or cls.__name__).strip().splitlines()[0]
    group = parser.add_argument_group(heading)
    for f in fields:
        _add_flag(group, cls, f)


def add_options(group: Any, cls: type, *names: str) -> None:
    """Add the flags of ``cls``'s fields ``names``, in that order, to ``group`` (a parser or one
    of its argument groups): for options declared in a dataclass whose flags sit among others."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        _add_flag(group, cls, fields[name])


def _add_flag(group: Any, cls: type, f: dataclasses.Field) -> None:
    meta = f.metadata
    if "help" not in meta:
        raise TypeError(f"{cls.__name__}.{f.name} is not declared with option()")
    if _is_switch(f):
        action = group.add_argument(f"--{f.name}", action="store_true", help=meta["help"])
    else:
        action = group.add_argument(f"--{f.name}", type=_parser_of(f), default=f.default, choices=meta.get("choices"),
                                    help=meta["help"])
    if meta.get("resumable"):
        resumable(action)


def add_option_groups(parser: argparse.ArgumentParser, classes: Iterable[type],
                      titles: dict[type, str] | None = None) -> None:
    """Add the flags of every group of ``classes`` (see :func:`option_groups`), each group once.
    Two groups declaring the same option name is a programming error (:class:`TypeError`)."""
    seen: dict[str, type] = {}
    for cls in option_groups(classes):
        for f in own_fields(cls):
            if f.name in seen:
                raise TypeError(f"option --{f.name} is declared twice ({seen[f.name].__name__}, {cls.__name__}): "
                                "declare it in one group and inherit that group")
            seen[f.name] = cls
        add_option_group(parser, cls, (titles or {}).get(cls))


def options_from(cls: type[T], namespace: Any, **overrides: Any) -> T:
    """An instance of the options dataclass ``cls`` with the values of the parsed ``namespace``
    (an argparse namespace, or any object with those attributes); a value ``namespace`` lacks
    keeps its declared default. ``overrides`` win over both."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(namespace, f.name):
            values[f.name] = getattr(namespace, f.name)
    values.update(overrides)
    return cls(**values)
