"""The SQLite store, the embedded default: `sqlite:///relative/path`, `sqlite:////abs/path`.

One file holds every run (tables in `stores/sql.py`). The file is opened in WAL mode with a busy
timeout, so several processes can use it at once: readers never wait, writers take turns.
Every `record` is one `BEGIN IMMEDIATE ... COMMIT` transaction writing only what changed.

URL options (SQLAlchemy-style URL, query string):

    synchronous=normal   default: a commit survives the process being killed; a power
                         loss may lose the last commits, never corrupt the file
    synchronous=full     also survives a power loss (an fsync per commit)
    timeout=10           seconds a writer waits for another process's transaction

Without `synchronous=` in the URL, `$ABLAUF_SQLITE_SYNC` (normal, full, ...) sets it.

The file must exist with its directory, or be creatable in an existing directory (only
the default store's own directory is created); an existing empty file is not a store.

The file carries an application id and a schema version (`PRAGMA application_id`,
`PRAGMA user_version`): a file of another application, a newer schema or a damaged file is
refused with a StoreError saying which.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, unquote

from ablauf_lang.codec.delta import decode_text
from ablauf_lang.errors import StoreError
from ablauf_lang.stores.base import default_path
from ablauf_lang.stores.sql import SCHEMA_VERSION, Damaged, Dialect, SqlStore

APPLICATION_ID = 0x41626C66  # "Ablf" in the file header: this file is an ablauf store
SYNCHRONOUS = ("off", "normal", "full", "extra")
SYNC_ENV = "ABLAUF_SQLITE_SYNC"
MEMORY = ":memory:"
DIALECT = Dialect("sqlite", placeholder="?", limit_all="-1", returning=False)

SCHEMA = (
    """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    restarts INTEGER NOT NULL,
    aborted TEXT,
    todo TEXT NOT NULL,
    touched TEXT NOT NULL,
    n_nodes INTEGER NOT NULL,
    snapshot_seq INTEGER NOT NULL,
    source TEXT,
    filename TEXT,
    initial_context TEXT NOT NULL,
    format INTEGER NOT NULL,
    error TEXT,
    head_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX runs_by_created ON runs (created);
CREATE TABLE nodes (
    run INTEGER NOT NULL,
    node INTEGER NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    children TEXT,
    PRIMARY KEY (run, node)
);
CREATE TABLE deltas (
    run INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    updated REAL NOT NULL,
    restarts INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run, seq)
) WITHOUT ROWID;
CREATE TABLE context (
    run INTEGER NOT NULL,
    key TEXT NOT NULL,
    pos INTEGER NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (run, key)
);
"""
    + """
CREATE TRIGGER deltas_head AFTER INSERT ON deltas BEGIN
    UPDATE runs SET head_seq = NEW.seq WHERE id = NEW.run AND head_seq < NEW.seq;
END;
CREATE TABLE leases (
    run INTEGER PRIMARY KEY,
    token TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started REAL,
    heartbeat REAL NOT NULL,
    expires REAL NOT NULL
);
"""
    + """
CREATE TABLE IF NOT EXISTS signals (
    run INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    sent_at REAL NOT NULL,
    consumed_by INTEGER,
    consumed_at REAL,
    PRIMARY KEY (run, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS signals_unconsumed ON signals (run, name, seq) WHERE consumed_by IS NULL;
CREATE TABLE IF NOT EXISTS waits (
    run INTEGER NOT NULL,
    node INTEGER NOT NULL,
    kind TEXT NOT NULL,
    signal TEXT,
    until REAL,
    attempt INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run, node)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS waits_until ON waits (until) WHERE until IS NOT NULL;
"""
    + """
CREATE TABLE IF NOT EXISTS attempts (
    run INTEGER NOT NULL,
    node INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    owner TEXT NOT NULL,
    lease_until REAL,
    started_at REAL NOT NULL,
    taken_from TEXT,
    result TEXT,
    finished_at REAL,
    PRIMARY KEY (run, node, attempt)
) WITHOUT ROWID;
"""
    + """
CREATE TABLE IF NOT EXISTS history (
    run INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    updated REAL NOT NULL,
    restarts INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS forks (
    run INTEGER PRIMARY KEY,
    parent TEXT NOT NULL,
    parent_step INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS forks_by_parent ON forks (parent);
"""
)
# Schema version 1 -> 2: the checked step log (runs.head_seq and its trigger), leases.
UPGRADE_2 = """
ALTER TABLE runs ADD COLUMN head_seq INTEGER NOT NULL DEFAULT 0;
UPDATE runs SET head_seq = max(snapshot_seq,
    coalesce((SELECT max(seq) FROM deltas WHERE deltas.run = runs.id), 0));
""" + SCHEMA[SCHEMA.index("CREATE TRIGGER") : SCHEMA.index("CREATE TABLE IF NOT EXISTS signals")]
# Schema version 2 -> 3: the signals mailbox and the waits of runs (no run waited before;
# IF NOT EXISTS: a file made by a newer schema and marked older upgrades too).
UPGRADE_3 = SCHEMA[
    SCHEMA.index("CREATE TABLE IF NOT EXISTS signals") : SCHEMA.index(
        "CREATE TABLE IF NOT EXISTS attempts"
    )
]
# Schema version 3 -> 4: the claims of actions' attempts (the Kafka action workers').
UPGRADE_4 = SCHEMA[
    SCHEMA.index("CREATE TABLE IF NOT EXISTS attempts") : SCHEMA.index(
        "CREATE TABLE IF NOT EXISTS history"
    )
]
# Schema version 4 -> 5: the history of runs (the writes folded out of the step log; a
# run's older writes were not kept) and the lineage of forked runs.
UPGRADE_5 = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS history") :]
# What brings version N up to the newest: UPGRADES[N:] (version 1 needs 2, 3, 4 and 5).
UPGRADES = ("", UPGRADE_2, UPGRADE_3, UPGRADE_4, UPGRADE_5)


def parse_url(url: str) -> tuple[str, dict[str, str]]:
    """Split `sqlite:///path?opt=value` into the file path and its options."""
    scheme, sep, rest = url.partition(":")
    if scheme.lower() != "sqlite" or not sep or not rest.startswith("//"):
        raise StoreError(
            f"bad SQLite store URL {url!r}: use sqlite:///relative/path or sqlite:////absolute/path"
        )
    location, _, query = rest[2:].partition("?")
    if location and not location.startswith("/"):
        raise StoreError(
            f"bad SQLite store URL {url!r}: a SQLite URL names no host; use "
            "sqlite:///relative/path or sqlite:////absolute/path"
        )
    path = unquote(location[1:]) or MEMORY
    try:
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise StoreError(f"bad options in SQLite store URL {url!r}") from None
    return (path if path == MEMORY else os.path.expanduser(path)), options


def statements(script: str) -> list[str]:
    """The SQL statements of a script (a trigger's body keeps its semicolons)."""
    out: list[str] = []
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \n;"):
                out.append(buffer.strip())
            buffer = ""
    return out


def default_synchronous() -> str:
    """`$ABLAUF_SQLITE_SYNC` (off, normal, full, extra), else normal."""
    return os.environ.get(SYNC_ENV, "").strip().lower() or "normal"


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: `BEGIN IMMEDIATE`, committed on exit, rolled back on any exit
    by an exception (a Ctrl-C included)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextmanager
def _savepoint(conn: sqlite3.Connection) -> Iterator[None]:
    """A write within a transaction already open: undone alone on any exception."""
    conn.execute("SAVEPOINT ablauf_write")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK TO ablauf_write")
        conn.execute("RELEASE ablauf_write")
        raise
    conn.execute("RELEASE ablauf_write")


class SqliteStore(SqlStore):
    """Runs in one SQLite file (WAL, busy timeout); see the module docstring. The
    connection policy: one connection in autocommit mode, `BEGIN IMMEDIATE` for writes."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str | None = None,
        timeout: float = 10.0,
        url: str | None = None,
    ) -> None:
        super().__init__(DIALECT)
        from_env = synchronous is None
        synchronous = (default_synchronous() if synchronous is None else synchronous).lower()
        if synchronous not in SYNCHRONOUS and from_env:
            raise StoreError(
                f"${SYNC_ENV} must be one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}"
            )
        if synchronous not in SYNCHRONOUS:
            raise StoreError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}"
            )
        self.path = path
        self.synchronous = synchronous
        self.timeout = float(timeout)
        self.url = url or ("sqlite://" if path == MEMORY else f"sqlite:///{path}")
        self._lock = threading.RLock()
        self._in_group = False  # in `group()`'s transaction
        self._conn = self._open()

    @classmethod
    def from_url(cls, url: str) -> SqliteStore:
        """Open the store a `sqlite:` URL names (see the module docstring for options)."""
        path, options = parse_url(url)
        unknown = set(options) - {"synchronous", "timeout"}
        if unknown:
            raise StoreError(
                f"unknown option {sorted(unknown)[0]!r} in {url!r}: "
                "known are synchronous and timeout"
            )
        try:
            timeout = float(options.get("timeout", 10.0))
        except ValueError:
            raise StoreError(f"timeout must be a number of seconds in {url!r}") from None
        return cls(path, synchronous=options.get("synchronous"), timeout=timeout, url=url)

    def __repr__(self) -> str:
        return f"SqliteStore({self.url!r})"

    # -------------------------------------------------- opening

    def _check_path(self) -> None:
        """The file's directory must exist (the default store's is made); an existing file
        must be a file and not empty (an empty file is not a store: never made one)."""
        where = self.path
        full = os.path.abspath(where)
        parent = os.path.dirname(full)
        if not os.path.isdir(parent):
            if os.path.exists(parent):
                raise StoreError(f"cannot open store {where}: {parent} is not a directory")
            if full != os.path.abspath(default_path()):
                raise StoreError(
                    f"cannot open store {where}: its directory {parent} does not exist "
                    "(create it first)"
                )
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the directory of store {where}: {exc.strerror}"
                ) from None
        if os.path.isdir(full):
            raise StoreError(f"cannot open store {where}: it is a directory")
        deadline = time.monotonic() + min(self.timeout, 0.5)
        while os.path.isfile(full) and os.path.getsize(full) == 0:
            # Another process may be creating it this instant: it writes the header at once.
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"store {where} is an empty file, not an ablauf store: remove it to "
                    "start a new store there, or name another file"
                )
            time.sleep(0.05)

    def _open(self) -> sqlite3.Connection:
        where = self.path
        if where != MEMORY:
            self._check_path()
        try:
            conn = sqlite3.connect(
                where, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {where}: {' '.join(str(exc).split())}") from None
        conn.text_factory = decode_text  # text that is not UTF-8 is damage, said per run
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._prepare(conn)
                return conn
            except sqlite3.OperationalError as exc:
                # While another process switches a new file to WAL, SQLite answers "locked"
                # at once, without waiting on the busy timeout: wait here instead.
                if "locked" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                conn.close()
                raise self._error(exc) from None
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                conn.close()
                raise self._error(exc) from None
            except StoreError:
                conn.close()
                raise

    def _header(self, conn: sqlite3.Connection) -> tuple[int, int]:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        return app, version

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Check the file is an ablauf store this code can read; create it when empty."""
        app, version = self._header(conn)
        self._check(app, version)
        if self.path != MEMORY:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"store {self.path} cannot use write-ahead logging "
                    f"(journal mode stays {mode}); is it on a network drive?"
                )
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        conn.execute("PRAGMA cell_size_check = ON")  # see damaged pages, never misread them
        if app == APPLICATION_ID and version < SCHEMA_VERSION:
            self._upgrade(conn)
        if app == 0:
            with _immediate(conn):
                app, version = self._header(conn)  # another process may have just made it
                if app == 0:
                    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                    if tables:
                        raise StoreError(
                            f"{self.path} is a SQLite database of something "
                            "else, not an ablauf store"
                        )
                    # Statement by statement: executescript would commit this transaction.
                    for statement in statements(SCHEMA):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._check(*self._header(conn))

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        """Bring a store of an older schema version up to this one, in one transaction."""
        with _immediate(conn):
            _, version = self._header(conn)  # another process may have just done it
            if version < SCHEMA_VERSION:
                for statement in statements("".join(UPGRADES[version:])):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check(self, app: int, version: int) -> None:
        if app not in (0, APPLICATION_ID):
            raise StoreError(
                f"{self.path} is a SQLite database of another application "
                f"(application id {app:#x}), not an ablauf store"
            )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema version {version}, newer than "
                f"this ablauf_lang reads ({SCHEMA_VERSION}): upgrade ablauf_lang"
            )
        if app == APPLICATION_ID and version < 1:
            raise StoreError(f"store {self.path} is damaged: it has no schema version")

    def _error(self, exc: sqlite3.Error | UnicodeDecodeError) -> StoreError:
        """One line saying what went wrong with the file (never a driver traceback)."""
        if isinstance(exc, UnicodeDecodeError):  # SQLite's own message held damaged bytes
            return Damaged(f"store {self.path} is damaged: SQLite reports damage it cannot name")
        text = " ".join(str(exc).split())  # one line: SQLite may quote a schema statement
        low = text.lower()
        if "locked" in low or "busy" in low:
            return StoreError(
                f"store {self.path} is busy: another process held it longer "
                f"than {self.timeout:g} s ({text}); add ?timeout=SECONDS to wait "
                "longer"
            )
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return Damaged(f"store {self.path} is damaged or not a SQLite database ({text})")
        if "no such table" in low or "no such column" in low:
            return Damaged(f"store {self.path} is damaged: its tables are not ablauf's ({text})")
        if "could not decode" in low:
            return Damaged(f"store {self.path} is damaged: it holds text that is not UTF-8")
        return StoreError(f"store {self.path}: {text}")

    # -------------------------------------------------- transactions

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            conn = self._conn
            try:
                if self._in_group:
                    with _savepoint(conn):  # in the group's transaction, undone alone
                        yield conn.cursor()
                    return
                with _immediate(conn):
                    yield conn.cursor()
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                raise self._error(exc) from None
            self.commits += 1

    @contextmanager
    def group(self) -> Iterator[None]:
        """Every write of the block in one transaction, committed at its end (group commit:
        `runners.group`). Each write is a savepoint of its own (a one-statement write is
        atomic as it is): one that fails is undone alone and raises to its caller, the
        others stay. A failed commit undoes them all, and the store forgets what it knew
        of every run (what it kept of them was not written)."""
        with self._lock:
            if self._in_group:
                yield  # already in a group: its transaction holds this block too
                return
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                raise self._error(exc) from None
            self._in_group = True
            try:
                yield
                self._in_group = False
                conn.execute("COMMIT")
            except BaseException as exc:
                self._in_group = False
                self._known.clear()
                try:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the connection says what is wrong on its next use
                if isinstance(exc, sqlite3.Error | UnicodeDecodeError):
                    raise self._error(exc) from None
                raise
            self.commits += 1

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            conn = self._conn
            if self._in_group:  # the group's transaction: one snapshot, its own writes seen
                try:
                    yield conn.cursor()
                except (sqlite3.Error, UnicodeDecodeError) as exc:
                    raise self._error(exc) from None
                return
            try:
                conn.execute("BEGIN")  # one snapshot for every SELECT of the operation
                try:
                    yield conn.cursor()
                finally:
                    if conn.in_transaction:
                        conn.execute("COMMIT")
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                raise self._error(exc) from None

    def _write_one(self, sql: str, params: Sequence[Any]) -> int:
        with self._lock:
            if self._in_group:  # one statement: atomic in the group's transaction
                try:
                    return int(self._conn.execute(sql, params).rowcount)
                except (sqlite3.Error, UnicodeDecodeError) as exc:
                    raise self._error(exc) from None
            try:
                # Autocommit: the statement is its own transaction (and waits on the busy
                # timeout like BEGIN IMMEDIATE does).
                count = self._conn.execute(sql, params).rowcount
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                raise self._error(exc) from None
        self.commits += 1
        return int(count)

    def close(self) -> None:
        """Close the connection (the file and its WAL stay consistent)."""
        with self._lock:
            self._conn.close()
