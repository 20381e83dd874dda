"""How the statements of `stores/sql.py` are spelled on PostgreSQL."""

from __future__ import annotations

from ablauf_lang.stores.sql import Dialect

DIALECT = Dialect("postgresql", placeholder="%s", limit_all="ALL", returning=True)
