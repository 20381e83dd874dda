"""The import contracts in pyproject.toml hold (engine free of I/O libraries, one-way pipeline)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports")
    cmd = [exe] if exe else [sys.executable, "-m", "importlinter.cli"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BROKEN" not in proc.stdout


def test_importing_the_package_loads_no_repl_cli_or_driver() -> None:
    code = (
        "import sys, ablauf_lang; "
        "bad = [m for m in ('prompt_toolkit', 'psycopg', 'click', 'ablauf_lang.cli', "
        "'ablauf_lang.repl', 'sqlite3') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"
