"""The pytest plugin: every `*.abltest` file pytest finds is a test.

Installed with the package (the `pytest11` entry point `ablauf`), so `pytest` alone
collects the test files in its paths; `-p no:ablauf` turns it off, `-p
ablauf_lang.testing.pytest_plugin` turns it on where plugins are not auto-loaded. A
failing test shows what `ablauf test` shows: the first restart that differs, side by
side, with source lines; a broken file shows what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ablauf_lang.testing.outcome import SUFFIX, TestFileError, TestOutcome
from ablauf_lang.testing.runner import check_file

__all__ = ["AbltestFile", "AbltestItem", "pytest_collect_file"]


class WorkflowTestFailed(Exception):
    """A workflow test that does not hold (its outcome says why)."""

    def __init__(self, outcome: TestOutcome) -> None:
        super().__init__(outcome.message)
        self.outcome = outcome


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> AbltestFile | None:
    if file_path.suffix == SUFFIX:
        return AbltestFile.from_parent(parent, path=file_path)
    return None


class AbltestFile(pytest.File):
    """One test file: one test, named after the file."""

    def collect(self) -> list[AbltestItem]:
        return [AbltestItem.from_parent(self, name=self.path.stem)]


class AbltestItem(pytest.Item):
    """One workflow test: a recorded session replayed, or a fault schedule run again."""

    def runtest(self) -> None:
        outcome = check_file(self.path)
        if not outcome.passed:
            raise WorkflowTestFailed(outcome)

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: Any = None,
    ) -> str:
        error = excinfo.value
        if isinstance(error, WorkflowTestFailed):
            outcome = error.outcome
            lines = [f"{outcome.name}: {outcome.message}"]
            if outcome.diff:
                lines.append(outcome.diff)
            return "\n".join(lines)
        if isinstance(error, TestFileError):
            return f"broken test file: {error.message}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"ablauf test: {self.name}"
