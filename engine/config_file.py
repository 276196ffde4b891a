"""Reading a configuration file (``--config``: YAML, or a run's ``args.json``) safely: plain data
only, within bounds that no real one comes near; a problem is a :class:`ConfigError` whose
message is one line."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from common.argtypes import SHOWN_CHARS, shown

# A configuration file is flat (option: value, a value a scalar or a short list): bounds that no
# real one comes near, so that a hostile or broken file is refused before it costs time or memory.
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB
MAX_CONFIG_DEPTH = 10  # lists and mappings inside each other (a file needs 2)
MAX_CONFIG_NODES = 5000  # keys, values and list items of a YAML file (a file needs a few hundred)


class ConfigError(Exception):
    """A configuration file that cannot be used; the message (one line) names the file and the
    problem, and the parser prints it as its ``error:`` line."""


class ConfigRefused(yaml.MarkedYAMLError):
    """Valid YAML that a configuration file may not hold (an alias, nesting deeper than
    :data:`MAX_CONFIG_DEPTH`)."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data, no objects) with these changes for option values: only
    ``true``/``false`` are booleans (YAML 1.2's rule: ``amp: off`` is the string 'off', not
    YAML 1.1's False), a key given twice is refused instead of the last one silently winning, and
    aliases (``*name``: the "billion laughs" expand a few hundred bytes into gigabytes), nesting
    deeper than :data:`MAX_CONFIG_DEPTH` and more than :data:`MAX_CONFIG_NODES` values are
    refused (:class:`ConfigRefused`) as the document is composed, before anything is built."""

    _depth = 0
    _nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            name = event.anchor if len(event.anchor) <= SHOWN_CHARS else event.anchor[:SHOWN_CHARS] + "..."
            raise ConfigRefused(None, None, f"a YAML alias (*{name}) cannot be used in a configuration file; write "
                                            "the value out", event.start_mark)
        nested = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        if nested and self._depth >= MAX_CONFIG_DEPTH:
            raise ConfigRefused(None, None, f"lists or mappings nested deeper than {MAX_CONFIG_DEPTH} levels; a "
                                            "configuration file holds option: value lines", event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_CONFIG_NODES:
            raise ConfigRefused(None, None, f"more than {MAX_CONFIG_NODES:,} keys, values and list items; a "
                                            "configuration file holds option: value lines", event.start_mark)
        self._depth += nested
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= nested

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {shown(key)} given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


BOOL_TAG = "tag:yaml.org,2002:bool"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key given twice (ValueError)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"key {shown(key)} given twice")
        data[key] = value
    return data


def deeper_than(value: Any, levels: int) -> bool:
    """Whether lists and mappings nest in ``value`` more than ``levels`` deep (the walk goes no
    deeper than that)."""
    if not isinstance(value, (dict, list)):
        return False
    if levels == 0:
        return True
    items = value.values() if isinstance(value, dict) else value
    return any(deeper_than(item, levels - 1) for item in items)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (line, column)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    if len(problem) > 2 * SHOWN_CHARS:  # e.g. a tag of the whole input
        problem = problem[:2 * SHOWN_CHARS] + "..."
    return f"{problem}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_config(path: str) -> tuple[dict[str, Any], bool]:
    """The mapping held by the configuration file ``path`` and whether it is a run's record
    (a ``.json`` file, read as ``args.json``; else YAML, read by :class:`ConfigLoader`). Raises
    :class:`ConfigError` for a missing or unreadable file, one larger than
    :data:`MAX_CONFIG_BYTES`, invalid JSON or YAML, YAML aliases, nesting deeper than
    :data:`MAX_CONFIG_DEPTH` and anything but a mapping (an empty file is an empty one)."""
    where = f"--config {path}"
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{where}: {'is a folder, not a file' if file.is_dir() else 'no such file'}")
    recorded = file.suffix.lower() == ".json"
    too_deep = (f"{where}: lists or objects nested deeper than {MAX_CONFIG_DEPTH} levels; a configuration file "
                "holds option: value pairs")
    try:
        with file.open("rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES // 2**20} MiB; a configuration file holds "
                              "option: value lines (is it the right file?)")
        text = raw.decode("utf-8")
        # json.loads recurses once per level: deep JSON raises RecursionError, or is refused below.
        data = json.loads(text, object_pairs_hook=_unique_keys) if recorded else yaml.load(text, ConfigLoader)
    except OSError as err:
        raise ConfigError(f"{where}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a text file (UTF-8)") from None
    except RecursionError:
        raise ConfigError(too_deep) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err.msg}, line {err.lineno}, column {err.colno})") from None
    except ConfigRefused as err:
        mark = err.problem_mark
        raise ConfigError(f"{where}: line {mark.line + 1}, column {mark.column + 1}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(err)})") from None
    except ValueError as err:  # a JSON key given twice; an integer beyond Python's digit limit
        if "digits" in str(err):
            raise ConfigError(f"{where}: an integer of more than {sys.get_int_max_str_digits()} digits; no option "
                              "takes one") from None
        raise ConfigError(f"{where}: {err}") from None
    if recorded and deeper_than(data, MAX_CONFIG_DEPTH):
        raise ConfigError(too_deep)
    if data is None:  # an empty file
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of option names to values (nce_k: 4096), "
                          f"got {type(data).__name__}")
    return data, recorded
