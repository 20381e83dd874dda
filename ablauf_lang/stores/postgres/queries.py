"""The PostgreSQL store's named queries (`queries.sql`, loaded once by
`stores.queries.load_queries`; see there for the format)."""

from __future__ import annotations

from ablauf_lang.stores.queries import load_queries

__all__ = ["QUERIES"]

QUERIES = load_queries(__package__ or "ablauf_lang.stores.postgres", "queries.sql")
