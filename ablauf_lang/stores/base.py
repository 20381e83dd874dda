"""The store interface, and `open_store(url)` picking a backend by URL scheme.

A store keeps runs: the program, its initial context, and the job after every restart.
`record` is called once per restart and writes, in one transaction, only what that
restart changed (the nodes in `job.touched`, the context when it changed, the status).
Backends are imported lazily, so the engine never loads a database driver it does not use.

URLs: `memory:` (this process only), `sqlite:///relative/path`, `sqlite:////absolute/path`
(options `?synchronous=full`, `?timeout=SECONDS`), `postgresql://...`. Without one:
`$ABLAUF_STORE`, else `runs.db` in the user's data directory (created on first use).
See docs/persistence.md.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ablauf_lang.errors import StoreError
from ablauf_lang.job import LAST_ERROR, Job
from ablauf_lang.nodes import Status
from ablauf_lang.serde import encode_value

ENV_VAR = "ABLAUF_STORE"


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What a store knows of a run, without its job tree."""

    run_id: str
    status: Status
    created: float
    updated: float
    restarts: int = 0
    filename: str | None = None
    error: str | None = None  # a failed run's error (abort reason or last error), one line

    def to_dict(self) -> dict[str, Any]:
        """The run as plain data (for `--json`)."""
        return {
            "run_id": self.run_id,
            "status": str(self.status),
            "created": self.created,
            "updated": self.updated,
            "restarts": self.restarts,
            "filename": self.filename,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class StoredRun:
    """A run as loaded from a store: its info, program and current job."""

    info: RunInfo
    job: Job
    source: str | None = None
    initial_context: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class JobStore(Protocol):
    """Where runs live between restarts.

    Implementations: `memory.MemoryStore`, `sqlite.SqliteStore`, the PostgreSQL store; the
    SQL ones share `sqlbase.SqlStore`. A run id the store does not have raises RunError
    naming it; a store that cannot be used (bad URL, newer schema, damaged file, busy)
    raises StoreError. Both carry a one-line message.
    """

    durable: bool  # True when what is recorded survives the process (values must be JSON)
    url: str  # where the runs are (for messages): "memory:", "sqlite:///runs.db" ...

    def create_run(
        self,
        job: Job,
        *,
        source: str | None = None,
        filename: str | None = None,
        run_id: str | None = None,
    ) -> str:
        """Record a new run (its program, initial context and job); return its id.

        RunError when `run_id` is given and already taken.
        """
        ...

    def record(self, run_id: str, job: Job) -> None:
        """Record the job after a restart, abort or replay: only what changed, one transaction.

        `job.touched` names the nodes the operation changed; the store diffs against the
        job it last recorded or loaded for that run (StoreError if another process wrote
        the run since: two drivers of one run).
        """
        ...

    def load(self, run_id: str) -> StoredRun:
        """Load a run: info, source, initial context and the job with every node's state,
        output or error, attempts and timestamps (`dispatched_at`, `finished_at`)."""
        ...

    def info(self, run_id: str) -> RunInfo:
        """What the store knows of a run, without loading its tree."""
        ...

    def exists(self, run_id: str) -> bool:
        """True when the store has this run."""
        ...

    def list_runs(self, *, limit: int | None = None, status: str | None = None) -> list[RunInfo]:
        """Runs, newest first; only those with `status` when given."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


def run_error(job: Job) -> str | None:
    """A failed run's error in one line (abort reason, else the last error), else None."""
    if job.status is not Status.FAILURE:
        return None
    err = job.aborted if job.aborted is not None else job.context.get(LAST_ERROR)
    if not isinstance(err, str):
        err = json.dumps(encode_value(err), ensure_ascii=False)
    return " ".join(err.split())[:500]


def new_run_id() -> str:
    """A fresh, sortable-enough, unique run id."""
    return uuid.uuid4().hex[:16]


def default_url() -> str:
    """`$ABLAUF_STORE`, else a SQLite file in the user's data directory (XDG)."""
    url = os.environ.get(ENV_VAR)
    if url:
        return url
    from platformdirs import user_data_dir

    path = os.path.join(user_data_dir("ablauf", appauthor=False), "runs.db")
    return f"sqlite:///{path}"


def open_store(url: str | JobStore | None = None) -> JobStore:
    """Open a store by URL: `memory:`, `sqlite:///path`, `postgresql://...`; None: default."""
    if url is not None and not isinstance(url, str):
        return url
    if url is None:
        url = default_url()
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


def statuses(infos: Iterable[RunInfo]) -> dict[str, str]:
    """Map run ids to their status (handy in tests and listings)."""
    return {i.run_id: str(i.status) for i in infos}
