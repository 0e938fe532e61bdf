"""Small helpers that turn plain dicts (YAML, CLI) into validated dataclasses with clear errors.

The numeric checks (`check_fields`, `finite`, `integer`) live in spt_core.checks, which TrainConfig
uses too; they are re-exported here so every spt_ray spec imports its checks from one place.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from spt_core.checks import check_fields, finite, integer

__all__ = ["check_fields", "check_keys", "finite", "integer", "read_yaml_mapping"]


def check_keys(data: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    """Raise a ValueError naming every unknown key (with a close match when there is one)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what}: expected a mapping, got {type(data).__name__}")
    allowed = list(allowed)
    unknown = [k for k in data if k not in allowed]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{what}: unknown key(s) {', '.join(hints)}; allowed: {', '.join(sorted(allowed))}")


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; syntax errors become one line naming the line and column."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist; pass the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{what} {path}: invalid YAML{where} ({problem}); check indentation, colons and "
                         "brackets there") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not a text file; pass a YAML file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: the top level is a {type(data).__name__}, not a mapping; write "
                         "`key: value` lines")
    return data
