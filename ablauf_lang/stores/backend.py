"""`open_store(url)`: the store backend chosen by URL, imported only when it is chosen.

The one place in the package that imports by choice at run time: `ablauf run` on SQLite never
loads psycopg, and a machine without it gets one line naming the extra to install.
"""

from __future__ import annotations

from ablauf_lang.errors import StoreError
from ablauf_lang.stores.base import JobStore, default_url


def open_store(url: str | JobStore | None = None) -> JobStore:
    """Open a store by URL: `memory:`, `sqlite:///path`, `postgresql://...`; None: default."""
    if url is not None and not isinstance(url, str):
        return url
    if url is None:
        url = default_url()
    if not url.strip():
        raise StoreError(
            "the store URL is empty: name one (memory:, sqlite:///path, postgresql://...) "
            "or leave the option out for the default store"
        )
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "memory":
        from ablauf_lang.stores.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        from ablauf_lang.stores.sqlite import SqliteStore

        return SqliteStore.from_url(url)
    if scheme in ("postgresql", "postgres"):
        try:
            from ablauf_lang.stores.postgres import PostgresStore
        except ImportError as exc:
            if (exc.name or "").startswith("psycopg"):
                raise StoreError(
                    "the PostgreSQL store needs psycopg: pip install 'ablauf_lang[postgres]'"
                ) from None
            raise StoreError(f"the PostgreSQL store is not available: {exc}") from None
        return PostgresStore.from_url(url)
    raise StoreError(f"unknown store URL {url!r}: use memory:, sqlite:///path or postgresql://...")
