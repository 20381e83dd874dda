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


def test_contracts_cover_every_module_and_ignore_nothing() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = config["contracts"]
    assert not any("ignore_imports" in c for c in contracts)
    top = [c for c in contracts if c["type"] == "layers" and c.get("containers") == ["ablauf_lang"]]
    assert len(top) == 1
    assert top[0]["exhaustive"] is True
    # every package inside ablauf_lang with more than one module has its own exhaustive layers
    layered = {c["containers"][0] for c in contracts if c["type"] == "layers"}
    independent = {m.rsplit(".", 1)[0] for c in contracts if c["type"] == "independence"
                   for m in c["modules"]}  # fmt: skip
    package = ROOT / "ablauf_lang"
    for init in package.rglob("__init__.py"):
        folder = init.parent
        name = ".".join(folder.relative_to(ROOT).parts)
        modules = [p for p in folder.iterdir() if p.suffix == ".py" and p.name != "__init__.py"]
        modules += [p for p in folder.iterdir() if (p / "__init__.py").exists()]
        if len(modules) > 1:
            assert name in layered | independent, f"{name} has no contract of its own"


def test_no_module_is_imported_by_a_string() -> None:
    # The one run-time choice is the store backend (`stores/backend.py`, plain imports inside
    # a function); the action registry loads the user's own --actions module, not ours.
    allowed = {ROOT / "ablauf_lang" / "stdlib" / "registry.py"}
    for path in (ROOT / "ablauf_lang").rglob("*.py"):
        text = path.read_text()
        if path in allowed:
            continue
        for needle in ("import_module(", "__import__(", "spec_from_file_location("):
            assert needle not in text, f"{path}: {needle}"
