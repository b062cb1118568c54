"""Errors a user reads: one line each, saying what is wrong, where, and what to do."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a YAML file: `path:line: key: message`."""

    path: Path
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else f"{self.path}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """A configuration that must not be used; carries every issue found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))

    def one_line(self) -> str:
        first = str(self.issues[0])
        more = len(self.issues) - 1
        return first if more == 0 else f"{first} (and {more} more; run `otactl validate` to see all)"


class Refused(Exception):
    """A request the engine turns down; `status` is the HTTP-style code to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def partition_moving() -> Refused:
    """A device call no worker may answer now: the device's partition is between workers."""
    return Refused(503, "this device's partition is moving between workers; try again in a few seconds")
