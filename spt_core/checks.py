"""Type and finiteness checks of user-given numbers, shared by every spec that reads YAML, JSON or flags.

Ordinary range checks let two kinds of bad numbers through: NaN and infinity (every comparison with NaN
is False and infinity is "greater than zero", so `cpu: .nan` passes `cpu > 0` and a sweep then waits
forever for a NaN-sized slot), and numbers written as text (YAML reads `max_concurrent: "2"` as a string,
which fails much later as a TypeError traceback). `check_fields` checks every numeric field of a
dataclass against its annotation, so each spec gives the same one-line error naming the key and the
expected type. Lives in spt_core (which imports no Ray) so TrainConfig and the spt_ray specs share it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any


def finite(value: Any, what: str) -> float:
    """`value` as a float when it is a finite number (numeric text included: YAML reads `1e-3` as text)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise ValueError(f"{what} must be a number, got {value!r} ({type(value).__name__}); "
                         "write a plain number such as 0.5")
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}; NaN and infinity are not allowed, "
                         "write a plain number such as 0.5")
    return float(number)


def integer(value: Any, what: str) -> int:
    """`value` as an int when it is one (not a bool, not text: `"2"` is a typo for 2 worth reporting)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__}); "
                         "write a whole number without quotes, such as 2")
    return int(value)


def _kind(annotation: Any) -> tuple[str | None, bool]:
    """('int' | 'float' | 'bool' | 'str' | 'ints' | 'floats' | None, optional) of a field annotation."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            return None, optional
        annotation = args[0]
    simple = {bool: "bool", int: "int", float: "float", str: "str"}
    if annotation in simple:
        return simple[annotation], optional
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple and args[:1] == (int,):
        return "ints", optional
    if origin is dict and args[1:] == (float,):
        return "floats", optional
    return None, optional


@functools.cache
def _checked_fields(cls: type) -> tuple[tuple[str, str, bool], ...]:
    hints = typing.get_type_hints(cls)
    kinds = ((f.name, *_kind(hints[f.name])) for f in dataclasses.fields(cls))
    return tuple((name, kind, optional) for name, kind, optional in kinds if kind is not None)


def check_fields(obj: Any, what: str = "") -> None:
    """Check every bool / int / float / str field of dataclass `obj` (and tuples of ints, dicts of floats)
    against its annotation; floats must be finite and are stored as floats. `what` prefixes the key."""
    for name, kind, optional in _checked_fields(type(obj)):
        value, key = getattr(obj, name), f"{what}.{name}" if what else name
        if value is None and optional:
            continue
        if kind == "float":
            value = finite(value, key)
        elif kind == "int":
            value = integer(value, key)
        elif kind == "ints":
            if not isinstance(value, (tuple, list)):
                raise ValueError(f"{key} must be a list of integers, got {value!r}; write e.g. [42, 44]")
            for i, item in enumerate(value):
                integer(item, f"{key}[{i}]")
        elif kind == "floats":
            if not isinstance(value, dict):
                raise ValueError(f"{key} must be a mapping of names to numbers, got {value!r}")
            value = {k: finite(v, f"{key}.{k}") for k, v in value.items()}
        elif kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r} ({type(value).__name__}); "
                             "write true or false without quotes")
        elif kind == "str" and not isinstance(value, str):
            raise ValueError(f"{key} must be text, got {value!r} ({type(value).__name__}); put it in quotes")
        object.__setattr__(obj, name, value)  # frozen dataclasses too: the normalised value
