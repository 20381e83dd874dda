"""The PostgreSQL store (`postgresql://...`): runs shared by workers on many hosts.

Modules: `connection` (connect, one-line errors, reconnect, redact), `dialect` (how
`stores/sql.py` is spelled here), `schema` (the `migrations/*.sql` files and applying them),
`queries` (named queries: `queries.sql`), `known` (what a process's threads share of runs),
`faults` (fault injection for stress tests), `store` (`PostgresStore`). The task queue the
workers share is `ablauf_lang.queue`, built on this package.
"""

from ablauf_lang.stores.postgres.connection import (
    ConnectionLost,
    WriteConflict,
    close_quietly,
    connect,
    is_connection_error,
    is_lost,
    notifications,
    redact,
)
from ablauf_lang.stores.postgres.faults import Faults
from ablauf_lang.stores.postgres.known import KnownView, SharedKnown
from ablauf_lang.stores.postgres.schema import (
    applied_versions,
    migrate,
    migrations,
    prepare,
    schema_version,
    use_schema,
)
from ablauf_lang.stores.postgres.store import PostgresStore, Serving, listen_finished, lock_run

__all__ = [
    "ConnectionLost",
    "Faults",
    "KnownView",
    "PostgresStore",
    "Serving",
    "SharedKnown",
    "WriteConflict",
    "applied_versions",
    "close_quietly",
    "connect",
    "is_connection_error",
    "is_lost",
    "listen_finished",
    "lock_run",
    "migrate",
    "migrations",
    "notifications",
    "prepare",
    "redact",
    "schema_version",
    "use_schema",
]
