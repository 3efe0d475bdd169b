"""Exceptions that tell the user which file, row and field went wrong."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: object, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` with the known name nearest to a mistyped one, or "" when none is close."""
    found = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean '{found[0]}'?)" if found else ""


def yaml_problem(e: Exception) -> str:
    """A YAML parser's error in one line: where (line, column) and what, without its source excerpts."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if mark is None or not problem:
        return " ".join(str(e).split())
    context = getattr(e, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")


class ClipguardError(Exception):
    """Base class: every error we raise on purpose, so the CLI can print it without a traceback."""


class DataError(ClipguardError):
    """Bad input data, located as precisely as we can."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None):
        self.file, self.row, self.field = file, row, field
        where = []
        if file is not None:
            where.append(f"file {file}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class ConfigError(ClipguardError):
    """An option or combination of options that cannot work."""


class OutputError(ClipguardError):
    """An output that cannot be written (a directory in the way, a read-only folder, a full disk).

    The message names the path; the previous content of that path is left as it was."""

    def __init__(self, message: str, *, path: str | None = None):
        self.path = path
        super().__init__(f"cannot write {path}: {message}" if path is not None else message)
