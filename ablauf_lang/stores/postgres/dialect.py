"""How the statements of `stores/sql.py` are spelled on PostgreSQL."""

from __future__ import annotations

from ablauf_lang.stores.postgres.queries import QUERIES as Q
from ablauf_lang.stores.sql import Dialect

DIALECT = Dialect(
    "postgresql",
    placeholder="%s",
    limit_all="ALL",
    returning=True,
    bulk={name: Q[f"{name}_rows"] for name in ("upsert_node", "update_state", "upsert_context")},
)
