"""Errors that name where bad input came from."""

from __future__ import annotations


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
