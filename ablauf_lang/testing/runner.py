"""Finding and checking test files: what `ablauf test` and the pytest plugin share.

`collect` turns the paths given (files, or directories searched for `*.abltest`) into
test files; `check_file` reads one and checks it by its kind (`session`: replayed
through the reducer; `faults`: its schedule run again against the invariants). A file
that cannot be read or is not a test file raises `TestFileError` (exit 2); a test that
does not hold is a `TestOutcome` with `passed` false (exit 1).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ablauf_lang.testing import faults, session
from ablauf_lang.testing.outcome import SUFFIX, TestFileError, TestOutcome

__all__ = ["check_file", "collect"]


def collect(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The test files named: a file as it is (whatever its suffix: reading it says
    whether it is one), a directory as every `*.abltest` below it, in name order.
    TestFileError for a path that does not exist or a directory with no test file."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(p for p in path.rglob(f"*{SUFFIX}") if p.is_file())
            if not inside:
                raise TestFileError(f"{path}: no {SUFFIX} files in this directory")
            found.extend(inside)
        elif path.exists():
            found.append(path)
        else:
            raise TestFileError(f"{path}: no such file or directory")
    return list(dict.fromkeys(found))


def check_file(path: str | os.PathLike[str]) -> TestOutcome:
    """Check one test file by its kind; TestFileError when it is broken."""
    name = os.fspath(path)
    data = session.load_test(name)
    if data["kind"] == faults.KIND:
        return faults.check_faults_file(data, name)
    return session.check_session(data, name)
