"""The store interface, and `open_store(url)` picking a backend by URL scheme.

A store keeps runs: the program, its initial context, and the job after every restart.
`record` is called once per restart and writes, in one transaction, only what that
restart changed (the nodes in `job.touched`, the context when it changed, the status).
Backends are imported lazily, so the engine never loads a database driver it does not use.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ablauf_lang.errors import StoreError
from ablauf_lang.job import Job
from ablauf_lang.nodes import Status

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
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The run as plain data (for `--json`)."""
        return {
            "run_id": self.run_id,
            "status": str(self.status),
            "created": self.created,
            "updated": self.updated,
            "restarts": self.restarts,
            "filename": self.filename,
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
    """Where runs live between restarts."""

    durable: bool  # True when what is recorded survives the process (values must be JSON)

    def create_run(self, job: Job, *, source: str | None = None, filename: str | None = None,
                   run_id: str | None = None) -> str:
        """Record a new run (its program, initial context and job); return its id."""
        ...

    def record(self, run_id: str, job: Job) -> None:
        """Record the job after a restart: only what changed, in one transaction."""
        ...

    def load(self, run_id: str) -> StoredRun:
        """Load a run; StoreError naming the id when there is no such run."""
        ...

    def exists(self, run_id: str) -> bool:
        """True when the store has this run."""
        ...

    def list_runs(self, *, limit: int | None = None) -> list[RunInfo]:
        """Runs, newest first."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


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
            raise StoreError(
                f"the PostgreSQL store needs psycopg: pip install 'ablauf_lang[postgres]' ({exc})"
            ) from None
        return PostgresStore.from_url(url)
    raise StoreError(
        f"unknown store URL {url!r}: use memory:, sqlite:///path or postgresql://..."
    )


def statuses(infos: Iterable[RunInfo]) -> dict[str, str]:
    """Map run ids to their status (handy in tests and listings)."""
    return {i.run_id: str(i.status) for i in infos}
