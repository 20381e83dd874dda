"""What one workflow test file gives: passed or not, why, and where it first differs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ablauf_lang.errors import AblaufError

FORMAT_KEY = "ablauf-test"
FORMAT_VERSION = 1
SUFFIX = ".abltest"


class TestFileError(AblaufError):
    """A test file that cannot be read or is not a test file (exit 2)."""

    __test__ = False  # not a pytest class


@dataclass(frozen=True, slots=True)
class TestOutcome:
    """The outcome of one test file."""

    __test__ = False

    path: str
    name: str
    passed: bool
    message: str
    diff: str | None = None  # the first restart that differs, side by side
    restart: int | None = None  # that restart's number

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "passed": self.passed,
            "message": self.message,
            "diff": self.diff,
            "restart": self.restart,
        }
