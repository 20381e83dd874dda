"""The schema: numbered migration files (`migrations/NNNN_name.sql`), applied by the store
itself under a session advisory lock; a database at a newer version is refused."""

from __future__ import annotations

import contextlib
import re
from importlib import resources

import psycopg

from ablauf_lang.errors import InternalError, StoreError
from ablauf_lang.stores.postgres.connection import connect, errors, redact
from ablauf_lang.stores.postgres.queries import QUERIES as Q

_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    """The schema's migration files, in order: (version, file name, SQL text).

    Versions are unique and increasing; a gap is allowed (a number kept for another
    change): every file whose version a database has not recorded is applied, in order.
    """
    folder = resources.files(__package__ or "ablauf_lang.stores.postgres").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if not versions or versions[0] != 1 or len(set(versions)) != len(versions):
        raise InternalError(f"migration files must start at 0001, once each: {versions}")
    return found


def applied_versions(conn: psycopg.Connection) -> set[int]:
    """The migrations this database has recorded (empty: no ablauf schema yet)."""
    row = conn.execute(Q["schema_exists"]).fetchone()
    if not row or not row[0]:
        return set()
    return {int(r[0]) for r in conn.execute(Q["schema_versions"])}


def schema_version(conn: psycopg.Connection) -> int:
    """The version of the ablauf schema in this database (0: none yet)."""
    return max(applied_versions(conn), default=0)


def migrate(conn: psycopg.Connection, url: str = "") -> int:
    """Bring the schema up to date; return its version.

    A database at a newer version than this code knows is refused (StoreError). Many
    processes may start at once on a fresh database: the first takes a session advisory
    lock in a statement of its own and migrates in one transaction; the others wait for
    the lock, then look again in a new transaction (which sees what the first committed)
    and find nothing left to do.
    """
    files = migrations()
    latest = files[-1][0]
    applied = applied_versions(conn)
    if any(v not in applied for v, _, _ in files) and max(applied, default=0) <= latest:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise InternalError("migrate needs a connection outside any transaction")
        conn.execute(Q["migration_lock"])
        try:
            with conn.transaction():
                applied = applied_versions(conn)
                for version, _name, text in files:
                    if version not in applied:
                        conn.execute(text.encode())
                        conn.execute(Q["record_version"], (version,))
                        applied.add(version)
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute(Q["migration_unlock"])
    current = max(applied, default=0)
    if current > latest:
        raise StoreError(
            f"the database at {redact(url)} has ablauf schema version {current}, newer than "
            f"this ablauf_lang supports ({latest}): upgrade ablauf_lang"
        )
    return current


def prepare(conn: psycopg.Connection, url: str) -> None:
    """Migrate the schema, and make its tables the connection's default names."""
    with errors(redact(url)):
        migrate(conn, url)
        conn.execute(Q["use_schema"])


def use_schema(conn: psycopg.Connection, url: str) -> None:
    """Make the schema's tables the connection's default names (a schema up to date)."""
    with errors(redact(url)):
        conn.execute(Q["use_schema"])


def open_prepared(url: str, *, purpose: str = "store") -> psycopg.Connection:
    """A connection to a database whose schema is up to date (see `prepare`)."""
    conn = connect(url, purpose=purpose)
    try:
        prepare(conn, url)
    except BaseException:
        conn.close()
        raise
    return conn
