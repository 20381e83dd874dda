"""Connections to PostgreSQL: open one, name what went wrong in one line, reopen a lost one.

psycopg is imported here and in the other modules of this package only: the rest of
ablauf_lang never needs it unless a `postgresql://` store is used.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from ablauf_lang.errors import StoreError

RECONNECT_FOR = 60.0  # seconds a client store keeps trying to reach a server that went away


class ConnectionLost(StoreError):
    """The connection to the server went away (server down or restarted, network cut)."""


class WriteConflict(StoreError):
    """Another process wrote the run since this one read it: read it again and redo."""


def one_line(exc: BaseException) -> str:
    """A driver error as one line (libpq messages span several)."""
    text = str(exc).strip() or type(exc).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def redact(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def connect(url: str, *, purpose: str = "store") -> psycopg.Connection:
    """Open an autocommit connection (transactions are explicit); StoreError, one line,
    when the URL is wrong or the server cannot be reached."""
    kwargs: dict[str, Any] = {"application_name": f"ablauf-{purpose}"[:63]}
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise StoreError(f"bad PostgreSQL URL {redact(url)!r}: {one_line(exc)}") from None
    if "connect_timeout" not in params:
        kwargs["connect_timeout"] = 10
    try:
        return psycopg.connect(url, autocommit=True, **kwargs)
    except psycopg.Error as exc:
        raise StoreError(
            f"cannot connect to PostgreSQL at {redact(url)}: {one_line(exc)}"
        ) from None


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` means the connection is gone (server down or restarted, network cut),
    not that a statement failed (a serialization failure is an OperationalError too, and
    so is psycopg's PipelineAborted: a statement skipped after an earlier one failed)."""
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.errors.PipelineAborted):
        return False
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    # No SQLSTATE: the client lost the connection; class 08: connection exception;
    # 57P01-57P03: the server is shutting down or not accepting connections.
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


def is_lost(exc: BaseException) -> bool:
    """True when `exc` (a StoreError of this package or a driver error) is a lost connection."""
    return isinstance(exc, ConnectionLost) or is_connection_error(exc)


@contextmanager
def errors(url: str) -> Iterator[None]:
    """Turn driver errors into a one-line StoreError (ConnectionLost for a lost connection,
    WriteConflict for a serialization failure, or a lock that was not available)."""
    try:
        yield
    except psycopg.Error as exc:
        kind = StoreError
        if is_connection_error(exc):
            kind = ConnectionLost
        elif isinstance(exc, psycopg.errors.SerializationFailure | psycopg.errors.LockNotAvailable):
            kind = WriteConflict
        raise kind(f"PostgreSQL store {url}: {one_line(exc)}") from None


def reopen(
    open_conn: Callable[[], psycopg.Connection],
    deadline: float,
    lost: ConnectionLost,
    reconnect_for: float,
) -> psycopg.Connection:
    """A new connection from `open_conn`, tried with growing jittered waits;
    ConnectionLost (saying why) once `deadline` (time.monotonic) has passed."""
    delay = 0.05
    while True:
        try:
            return open_conn()
        except StoreError as exc:
            if time.monotonic() + delay > deadline:
                raise ConnectionLost(
                    f"{lost.message}; could not reconnect within {reconnect_for:g}s: {exc.message}"
                ) from None
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(2.0, delay * 2)


def prepared_mark(conn: psycopg.Connection) -> int | None:
    """How many statements psycopg has started to prepare on the connection (None: not
    known): what `forget_prepared` compares with."""
    mark = getattr(getattr(conn, "_prepared", None), "_prepared_idx", None)
    return mark if isinstance(mark, int) else None


def forget_prepared(conn: psycopg.Connection, mark: int | None = None) -> None:
    """After a failed transaction, make psycopg prepare every statement of the connection
    again (it deallocates them all with its next statement), unless it prepared none
    since `mark` (`prepared_mark` at the transaction's start). After a pipeline with a
    failed statement the server skipped those sent after it, their PREPAREs too, but
    psycopg (3.3) may take them as prepared, and their next use fails: "prepared
    statement _pg3_N does not exist". A ROLLBACK makes psycopg forget only the first time
    it meets one, and it has no public call for this: its prepared-statement manager is
    cleared here (nothing happens if a later psycopg has none of these names;
    tests/test_deliver_at_once.py fails then)."""
    if mark is not None and prepared_mark(conn) == mark:
        return
    clear = getattr(getattr(conn, "_prepared", None), "clear", None)
    if callable(clear):
        clear()


def close_quietly(conn: psycopg.Connection | None) -> None:
    """Close a connection that may be broken already."""
    if conn is not None:
        with contextlib.suppress(psycopg.Error, OSError):
            conn.close()


def notifications(conn: psycopg.Connection, url: str, timeout: float) -> Generator[str, None, None]:
    """The payloads of the NOTIFYs this connection LISTENs to, for up to `timeout` seconds
    (driver errors as in `errors`)."""
    with errors(url):
        for note in conn.notifies(timeout=timeout):
            yield note.payload
