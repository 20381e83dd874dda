"""Named SQL queries: a `.sql` file split at its `-- name: NAME` headers, loaded once.

    -- name: lock_run
    -- Lock the run's row for this transaction.
    SELECT id FROM ablauf.runs WHERE run_id = %s FOR NO KEY UPDATE;

As procrastinate does (`procrastinate/sql/queries.sql`): every statement a module runs is in
one file a reader sees whole, and Python code calls a query by its name
(`QUERIES["lock_run"]`) with positional parameters. The `-- ` lines right below a header
are its comment; a trailing `;` is dropped. Used by the shared SQL store (`stores/sql.sql`,
written with `?`), the PostgreSQL store (`stores/postgres/queries.sql`, `%s`, a literal `%`
written `%%`) and the queue (`queue/queries.sql`).

A part that several queries share is written once under `-- fragment: NAME` and put in
a query as `{{NAME}}` (a fragment is not a query of its own).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType

from ablauf_lang.errors import InternalError

_HEADER = re.compile(r"^-- (name|fragment): ([a-z0-9_]+)[ \t]*\n((?:--[^\n]*\n)*)", re.MULTILINE)
_USE = re.compile(r"\{\{([a-z0-9_]+)\}\}")


def load_queries(package: str, filename: str) -> Mapping[str, str]:
    """The named queries of `filename` in `package` (read-only; InternalError for a name
    given twice, a header without a query, or an unknown fragment)."""
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    found: dict[str, str] = {}
    fragments: dict[str, str] = {}
    headers = list(_HEADER.finditer(text))
    for i, header in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        body = text[header.end() : end].strip().removesuffix(";").strip()
        kind, name = header.group(1), header.group(2)
        if name in found or name in fragments or not body:
            raise InternalError(f"{package}/{filename}: {name!r} is empty or given twice")
        (found if kind == "name" else fragments)[name] = body

    def fragment(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fragments:
            raise InternalError(f"{package}/{filename}: no fragment {name!r}")
        return fragments[name]

    return MappingProxyType({name: _USE.sub(fragment, body) for name, body in found.items()})
