"""Actions for the PostgreSQL worker tests: each leaves a trace in the test's database.

The database comes from `$ABLAUF_TEST_DSN` (set by the tests for the worker processes they
start, and for themselves). Tables: `hits (n, pid)` and `calls (name, pid, at)`, made by `setup`.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg

DSN_VAR = "ABLAUF_TEST_DSN"
_local = threading.local()


def setup(dsn: str) -> None:
    """Create the tables the actions write to."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS hits (n integer NOT NULL, pid integer NOT NULL)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS calls (name text NOT NULL, pid integer NOT NULL, "
            "at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )


def _conn() -> psycopg.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(os.environ[DSN_VAR], autocommit=True)
    return conn


def _calls(conn: psycopg.Connection, name: str) -> int:
    row = conn.execute("SELECT count(*) FROM calls WHERE name = %s", (name,)).fetchone()
    return int(row[0]) if row else 0


def insert(payload: Any, context: Any) -> Any:
    """Insert one row into `hits` (the fan-outs count them), after sleeping `sleep` seconds
    if given (then the row is written at the end: a worker killed meanwhile writes none)."""
    if payload.get("sleep"):
        time.sleep(float(payload["sleep"]))
    _conn().execute("INSERT INTO hits (n, pid) VALUES (%s, %s)", (payload["n"], os.getpid()))
    return payload["n"]


def noop(payload: Any, context: Any) -> Any:
    """Do nothing; the output is the payload."""
    return payload


def hang_first(payload: Any, context: Any) -> Any:
    """Record the call; the first call for a name hangs (until the worker is killed)."""
    name = payload["name"]
    conn = _conn()
    conn.execute("INSERT INTO calls (name, pid) VALUES (%s, %s)", (name, os.getpid()))
    count = _calls(conn, name)
    if count == 1:
        time.sleep(float(payload.get("hang", 120)))
    return {"name": name, "call": count}


def fail_once(payload: Any, context: Any) -> Any:
    """Fail the first call for a name, succeed afterwards (a transient error)."""
    name = payload["name"]
    conn = _conn()
    conn.execute("INSERT INTO calls (name, pid) VALUES (%s, %s)", (name, os.getpid()))
    count = _calls(conn, name)
    if count == 1:
        raise RuntimeError(f"{name}: transient failure")
    return count


def until(payload: Any, context: Any) -> Any:
    """Sleep until the epoch time `at`: many such actions finish at the same moment."""
    time.sleep(max(0.0, float(payload["at"]) - time.time()))
    return payload["i"]


def slow(payload: Any, context: Any) -> Any:
    """Sleep a little (a step that takes time); the output is the payload."""
    time.sleep(float(payload.get("seconds", 0.05)))
    return payload


ACTIONS = {
    "test/insert": insert,
    "test/noop": noop,
    "test/hang-first": hang_first,
    "test/slow": slow,
    "test/fail-once": fail_once,
    "test/until": until,
}
