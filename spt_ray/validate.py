"""Small helpers that turn plain dicts (YAML, CLI) into validated dataclasses with clear errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


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
