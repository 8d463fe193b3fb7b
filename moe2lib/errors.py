"""Errors that name where bad input came from."""

from __future__ import annotations

import operator


class Moe2Error(Exception):
    """Base class of the errors moe2lib raises on bad input or a missing resource."""


class InputError(Moe2Error, ValueError):
    """Bad input, located by file and (where it applies) line or parameter."""

    def __init__(self, message: str, *, path=None, line: int | None = None, param: str | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.param = param
        where = []
        if self.path is not None:
            where.append(self.path if line is None else f"{self.path}:{line}")
        if param is not None:
            where.append(f"parameter {param!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class ResourceUnavailable(Moe2Error, RuntimeError):
    """A model, data set or service cannot be had here; the message says what to do."""


def check_int(value, param: str, *, low: int = 1, high: int | None = None, none: bool = False) -> int | None:
    """``value`` as an int when it is an integer (numpy's too, not a bool) in ``low..high`` (``high`` None: no
    upper end), or None where ``none`` allows it; else an InputError naming ``param``, e.g. "must be a
    positive integer, got 0". The one check of integer parameters and their ranges."""
    if value is None and none:
        return None
    try:
        v = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        v = None
    if v is None or v < low or (high is not None and v > high):
        what = (f"an integer in {low}..{high}" if high is not None else
                {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer >= {low}"))
        raise InputError(f"must be {what}{' or None' if none else ''}, got {value!r}", param=param)
    return v
