#!/usr/bin/env bash
# The static checks CI runs before the tests, each failing the run when it fails:
# ruff (lint and format), mypy --strict over the package, and the import-linter contracts.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
mypy --strict ablauf_lang
lint-imports
