"""Reading values: YAML config files, ``--set`` text by the key's type, numbers, and the hint for
a value that YAML typed differently from what was meant.

A ``--set section.key=TEXT`` value means what was typed: a string key takes TEXT as it is (no
YAML, so ``#`` or ``: `` in a path stay), an integer, number or boolean key parses TEXT strictly,
and only list and mapping keys go through YAML. Torch-free, like the rest of the config package.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml

from diloco.errors import ConfigError

__all__ = ["as_float", "hint_of", "override_value", "read_yaml", "yaml_problem", "yaml_surprise"]

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")
_BOOLEANS = {"true": True, "false": False}


def as_float(value: Any) -> float | None:
    """``value`` as a float if it is a number, or a numeric string such as ``3e-4``.

    PyYAML follows YAML 1.1, which reads ``3e-4`` (no dot) as a string, so those are accepted.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return None


def override_value(override: str, text: str, hint: Any) -> Any:
    """The value of ``--set key=text`` for a key of type ``hint`` (None: an unknown key).

    Text that is not of the key's type is returned as it is, so that validation names it
    (``outer.sync_every must be an integer, got 'four' (str)``).
    """
    if hint is str or hint is None:
        return text
    stripped = text.strip()
    if hint is bool:
        return _BOOLEANS.get(stripped.lower(), text)
    if hint is int:
        return int(stripped) if _INTEGER.fullmatch(stripped) else text
    if hint is float:
        number = as_float(stripped)
        return text if number is None else number
    try:  # lists and mappings: YAML flow syntax, e.g. [0.9, 0.95] or {stage: 2}
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {override!r}: invalid YAML value: {yaml_problem(exc)}") from None


def read_yaml(path: Path) -> Any:
    """Parse the YAML file at ``path``; missing, unreadable or malformed files raise ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: '{path}'") from None
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {yaml_problem(exc)}") from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What a YAML parser error complains about, on one line and without its location."""
    problem = getattr(exc, "problem", None) or str(exc)
    return " ".join(problem.split())


def yaml_surprise(value: Any, hint: Any) -> str:
    """A hint for a text key that YAML gave a non-text ``value`` (``off`` read as false, a
    bare number, an empty value), or ``""``."""
    if hint is not str or isinstance(value, str):
        return ""
    if isinstance(value, bool):
        read = "an unquoted yes/no/on/off/true/false as a boolean"
    elif isinstance(value, (int, float)):
        read = "an unquoted number as a number"
    elif value is None:
        read = "an empty value (or null, ~) as null"
    else:
        return ""
    return f"; YAML reads {read}: put the value in quotes"


def hint_of(types: dict[str, dict[str, Any]], section: str, key: str) -> Any:
    """The type of ``section.key`` (``str`` for an enum), or None for an unknown key."""
    hint = types.get(section, {}).get(key)
    return hint if typing.get_origin(hint) is None else typing.get_origin(hint)
