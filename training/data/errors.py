"""The single error type for malformed dataset files.

Loaders raise it with the file and line so a user can open the file and fix the input,
instead of getting a pandas traceback from deep inside a conversion.
"""

from __future__ import annotations

from os import PathLike


class DataFormatError(ValueError):
    """A dataset file is missing or malformed.

    path: the file as the caller named it; line: 1-based line number, or None when the
    problem is not tied to one line (missing file, empty file); problem: what is wrong.
    """

    def __init__(self, path: str | PathLike[str], line: int | None, problem: str) -> None:
        # Passing every field to ValueError keeps the error picklable (e.g. across processes).
        super().__init__(path, line, problem)
        self.path = path
        self.line = line
        self.problem = problem

    def __str__(self) -> str:
        where = f"{self.path}" if self.line is None else f"{self.path} line {self.line}"
        return f"{where}: {self.problem}"
