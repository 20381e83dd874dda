"""The PostgreSQL store: runs shared by workers on many hosts, and the task queue they use.

    store = PostgresStore.from_url("postgresql://user@host/db")

Tables (schema `ablauf`, created and migrated by the store from the versioned files in
`stores/sql/postgres/`): `runs` (one row per run), `nodes` (one row per node of a job
tree, upserted by (run_id, node_id) for the nodes a restart touched), `tasks` (the queue:
restart tasks carrying results, action tasks carrying dispatches), `restarts` (one row per
recorded step) and `schema_version`.

Besides the `JobStore` protocol, this module holds the queue operations the workers of
`ablauf_lang.runners.worker` use, each inside a transaction the caller opened:

- `take_task`: the oldest ready task, locked with `FOR UPDATE SKIP LOCKED`;
- `lock_run`: the run's row, `FOR NO KEY UPDATE` (waiting, or skipping for the fast path):
  one restart of a run at a time;
- `restart_locked`: apply every result queued for the run (batching), restart the job,
  write the delta, enqueue the new action tasks, all in the caller's transaction;
- `lease_action`, `finish_action`, `renew_leases`, `recover_leases`, `release_leases`.

A worker keeps the jobs it restarted in a `JobCache`. The run's `version` (bumped by every
write, and carried by every node row written) tells whether the copy is current; a stale
copy catches up by reading only the node rows written since, so the work of a restart
does not grow with the size of the tree.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg

from ablauf_lang import semantics, serde
from ablauf_lang.errors import InternalError, JobError, StoreError
from ablauf_lang.job import ALL, INTERRUPTED, Job, index_paths, restart_job
from ablauf_lang.nodes import Dispatch, Leaf, LeafState, Node, Result, Seq, Status
from ablauf_lang.stores.base import RunInfo, StoredRun, new_run_id

TASKS_CHANNEL = "ablauf_tasks"  # NOTIFY: tasks are ready to be taken
RUNS_CHANNEL = "ablauf_runs"  # NOTIFY run_id: the run finished
MIGRATIONS = ("sql", "postgres")
_MIGRATION_LOCK = 0x61626C61  # pg_advisory_xact_lock key ("abla"): one migrator at a time
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


# ---------------------------------------------------------------- connections and errors


def one_line(exc: BaseException) -> str:
    """A driver error as one line (libpq messages span several)."""
    text = str(exc).strip() or type(exc).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def redact(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def connect(url: str, *, purpose: str = "store", autocommit: bool = True) -> psycopg.Connection:
    """Open a connection; StoreError with a one-line message when that is not possible."""
    kwargs: dict[str, Any] = {"application_name": f"ablauf-{purpose}"[:63]}
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise StoreError(f"bad PostgreSQL URL {redact(url)!r}: {one_line(exc)}") from None
    if "connect_timeout" not in params:
        kwargs["connect_timeout"] = 10
    try:
        return psycopg.connect(url, autocommit=autocommit, **kwargs)
    except psycopg.Error as exc:
        raise StoreError(
            f"cannot connect to PostgreSQL at {redact(url)}: {one_line(exc)}"
        ) from None


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` means the connection is gone (the server went away, a network cut)."""
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    return isinstance(exc, psycopg.errors.AdminShutdown | psycopg.errors.CannotConnectNow)


# ---------------------------------------------------------------- migrations


def migrations() -> list[tuple[int, str, str]]:
    """The schema's migration files, in order: (version, name, SQL text)."""
    folder = resources.files("ablauf_lang.stores").joinpath(*MIGRATIONS)
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    if [v for v, _, _ in found] != list(range(1, len(found) + 1)):
        raise InternalError(f"migration files are not numbered 1..N: {[n for _, n, _ in found]}")
    return found


def schema_version(conn: psycopg.Connection) -> int:
    """The version of the ablauf schema in this database (0: none yet)."""
    row = conn.execute("SELECT to_regclass('ablauf.schema_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM ablauf.schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection, url: str = "") -> int:
    """Bring the schema up to date (each file in its own transaction); return its version.

    Refuses a database whose schema is newer than this code knows. Many processes may
    start at once: an advisory lock lets one migrate while the others wait, then re-read.
    """
    files = migrations()
    latest = files[-1][0]
    current = schema_version(conn)
    if current == latest:
        return current
    if current < latest:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            current = schema_version(conn)
            for version, _name, text in files:
                if version <= current:
                    continue
                conn.execute(text.encode())  # type: ignore[call-overload]
                conn.execute("INSERT INTO ablauf.schema_version (version) VALUES (%s)",
                             (version,))
                current = version
    if current > latest:
        raise StoreError(
            f"the database at {redact(url)} has ablauf schema version {current}, newer than "
            f"this ablauf_lang supports ({latest}); upgrade ablauf_lang"
        )
    return current


# ---------------------------------------------------------------- values <-> JSON text


def dumps(value: Any) -> str:
    """Compact JSON text."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def encode_todo(todo: dict[int, Any]) -> str:
    return dumps({str(k): "all" if v is ALL else sorted(v) for k, v in todo.items()})


def decode_todo(data: Any) -> dict[int, Any]:
    if isinstance(data, str):
        data = json.loads(data)
    return {int(k): (ALL if v == "all" else frozenset(v)) for k, v in (data or {}).items()}


def encode_result(result: Result) -> str:
    """A result as JSON text (an output or error JSON cannot hold becomes a failure)."""
    try:
        output = serde.encode_value(result.output)
        error = serde.encode_value(result.error)
    except (JobError, ValueError) as exc:
        return dumps({"id": result.id, "attempt": result.attempt, "state": "failure",
                      "output": None, "error": f"result cannot be stored: {exc}",
                      "started_at": result.started_at, "finished_at": result.finished_at})
    return dumps({"id": result.id, "attempt": result.attempt, "state": str(result.state),
                  "output": output, "error": error, "started_at": result.started_at,
                  "finished_at": result.finished_at})


def decode_result(data: Any) -> Result:
    if isinstance(data, str):
        data = json.loads(data)
    return Result(int(data["id"]), data.get("attempt"), LeafState(data["state"]),
                  serde.decode_value(data.get("output")), serde.decode_value(data.get("error")),
                  data.get("started_at"), data.get("finished_at"))


def _records_json(nodes: Sequence[Node]) -> str:
    return dumps([serde.encode_node(n) for n in nodes])


# ---------------------------------------------------------------- rows <-> job


def job_from_records(records: list[dict[str, Any]], context: Any, todo: Any, restarts: int,
                     aborted: str | None) -> Job:
    """Build a job from its node rows and its run row."""
    for rec in records:
        # Only leaves are rewritten per step: a stored sequence cursor may be stale, and
        # the decoder then recomputes it from the children (the first that has not
        # succeeded), which is what the cursor is after every restart.
        if rec.get("kind") == "seq":
            rec.pop("cursor", None)
    try:
        root = serde.decode_nodes(records)
    except (KeyError, TypeError, ValueError) as exc:
        raise JobError(f"stored job is damaged: {exc!r}") from None
    ctx = serde.decode_value(json.loads(context) if isinstance(context, str) else context)
    return Job(root, ctx, index_paths(root), decode_todo(todo), restarts, frozenset(), aborted)


def _is_ok(node: Node) -> bool:
    return node.done and not node.failed


def _replace_leaf(root: Node, path: tuple[int, ...], leaf: Leaf) -> Node:
    """Put `leaf` at `path`, updating each ancestor's summary (and a sequence's cursor)."""
    chain: list[Node] = []
    node = root
    for i in path:
        chain.append(node)
        node = node.children[i]
    new: Node = leaf
    for parent, i in zip(reversed(chain), reversed(path), strict=True):
        updated = semantics.replace_child(parent, i, new)
        if isinstance(updated, Seq):
            kids = updated.children
            cursor = updated.cursor
            if i < cursor and not _is_ok(new):
                cursor = i
            while cursor < len(kids) and _is_ok(kids[cursor]):
                cursor += 1
            if cursor != updated.cursor:
                updated = Seq(updated.id, kids, updated.n_done, updated.n_failed,
                              updated.inflight, cursor, updated.span)
        new = updated
    return new


def catch_up(job: Job, records: list[dict[str, Any]], context: Any, todo: Any, restarts: int,
             aborted: str | None) -> Job | None:
    """Apply node rows written since `job` was read; None when only a full load will do."""
    root = job.root
    paths = job.paths
    for rec in records:
        if rec.get("kind") != "leaf" or not 0 <= int(rec["id"]) < len(paths):
            return None  # a branch changed (run-time expansion): read the whole tree
        leaf = serde.decode_nodes([rec])
        root = _replace_leaf(root, paths[leaf.id], leaf)  # type: ignore[arg-type]
    ctx = serde.decode_value(json.loads(context) if isinstance(context, str) else context)
    return Job(root, ctx, paths, decode_todo(todo), restarts, frozenset(), aborted)


class JobCache:
    """Jobs a worker restarted, by run id, with the run version they correspond to."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._jobs: OrderedDict[str, tuple[int, Job]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.catchups = self.loads = 0

    def get(self, run_id: str) -> tuple[int, Job] | None:
        with self._lock:
            entry = self._jobs.get(run_id)
            if entry is not None:
                self._jobs.move_to_end(run_id)
            return entry

    def put(self, run_id: str, version: int, job: Job) -> None:
        with self._lock:
            self._jobs[run_id] = (version, job)
            self._jobs.move_to_end(run_id)
            while len(self._jobs) > self.size:
                self._jobs.popitem(last=False)

    def drop(self, run_id: str) -> None:
        with self._lock:
            self._jobs.pop(run_id, None)


# ---------------------------------------------------------------- the run row


@dataclass(frozen=True, slots=True)
class RunRow:
    """A run's row as a restart reads it, under the run's row lock."""

    run_id: str
    version: int
    restarts: int
    status: str
    context: str  # JSON text, parsed only when needed
    todo: str
    aborted: str | None
    started: datetime  # clock_timestamp() when the lock was taken


def lock_run(conn: psycopg.Connection, run_id: str, *, wait: bool = True) -> RunRow | None:
    """Lock the run's row for this transaction: one restart of a run at a time.

    `FOR NO KEY UPDATE` is the row lock an UPDATE takes: it excludes other restarts of the
    run but not the foreign-key checks of inserted tasks, so enqueueing a result never
    waits for a restart. With `wait=False` a locked row is skipped (None).
    """
    query = (
        "SELECT version, restarts, status, context::text, todo::text, aborted, "
        "clock_timestamp() FROM ablauf.runs WHERE run_id = %s FOR NO KEY UPDATE"
        + ("" if wait else " SKIP LOCKED")
    )
    row = conn.execute(query, (run_id,)).fetchone()
    if row is None:
        return None
    return RunRow(run_id, int(row[0]), int(row[1]), row[2], row[3], row[4], row[5], row[6])


def job_for(conn: psycopg.Connection, row: RunRow, cache: JobCache | None) -> Job:
    """The run's job under its row lock: the cached copy, caught up, or read in full."""
    entry = cache.get(row.run_id) if cache is not None else None
    if entry is not None:
        version, job = entry
        if version == row.version:
            cache.hits += 1  # type: ignore[union-attr]
            return job
        if version < row.version:
            got = conn.execute(
                "SELECT coalesce(json_agg(record), '[]')::text FROM ablauf.nodes "
                "WHERE run_id = %s AND version > %s", (row.run_id, version)
            ).fetchone()
            caught = catch_up(job, json.loads(got[0]) if got else [], row.context, row.todo,
                              row.restarts, row.aborted)
            if caught is not None:
                cache.catchups += 1  # type: ignore[union-attr]
                return caught
    if cache is not None:
        cache.loads += 1
    return read_job(conn, row.run_id, row.context, row.todo, row.restarts, row.aborted)


def read_job(conn: psycopg.Connection, run_id: str, context: Any, todo: Any, restarts: int,
             aborted: str | None) -> Job:
    """Read a run's whole job tree."""
    got = conn.execute(
        "SELECT coalesce(json_agg(record), '[]')::text FROM ablauf.nodes WHERE run_id = %s",
        (run_id,),
    ).fetchone()
    records = json.loads(got[0]) if got else []
    if not records:
        raise JobError(f"run {run_id} has no stored job tree")
    return job_from_records(records, context, todo, restarts, aborted)


# ---------------------------------------------------------------- writing a step


def write_step(conn: psycopg.Connection, run_id: str, job: Job, *, expected_version: int | None,
               previous_status: str, context_changed: bool, worker: str,
               results: int | None, dispatches: int | None, started: datetime | None) -> int:
    """Write what a step changed: touched nodes, the run row, a `restarts` row.

    Returns the run's new version. With `expected_version`, a version that moved under the
    lock is a bug and raises InternalError (the transaction must then be rolled back).
    """
    row = conn.execute(
        "WITH r AS (UPDATE ablauf.runs SET version = version + 1, restarts = %s, status = %s, "
        "context = coalesce(%s::json, context), todo = %s::json, aborted = %s, "
        "updated = now(), error = NULL "
        "WHERE run_id = %s AND (%s::bigint IS NULL OR version = %s::bigint) "
        "RETURNING version) "
        "INSERT INTO ablauf.restarts (run_id, version, worker, results, dispatches, started, "
        "finished) SELECT %s, r.version, %s, %s, %s, coalesce(%s, clock_timestamp()), "
        "clock_timestamp() FROM r RETURNING version",
        (job.restarts, str(job.status),
         dumps(serde.encode_value(job.context)) if context_changed else None,
         encode_todo(job.todo), job.aborted, run_id, expected_version, expected_version,
         run_id, worker, results, dispatches, started),
    ).fetchone()
    if row is None:
        if expected_version is not None:
            raise InternalError(f"run {run_id} changed under its row lock "
                                f"(expected version {expected_version})")
        raise StoreError(f"no run {run_id!r} in this store")
    version = int(row[0])
    if job.touched:
        conn.execute(
            "INSERT INTO ablauf.nodes (run_id, node_id, version, kind, action, result, record) "
            "SELECT %s, (e->>'id')::int, %s, e->>'kind', e->>'action', e->>'result', e "
            "FROM json_array_elements(%s::json) AS e "
            "ON CONFLICT (run_id, node_id) DO UPDATE SET version = EXCLUDED.version, "
            "kind = EXCLUDED.kind, action = EXCLUDED.action, result = EXCLUDED.result, "
            "record = EXCLUDED.record",
            (run_id, version, _records_json([job.node(i) for i in sorted(job.touched)])),
        )
    if previous_status == Status.PENDING and job.status is not Status.PENDING:
        conn.execute("SELECT pg_notify(%s, %s)", (RUNS_CHANNEL, run_id))
    return version


def _dispatch_json(d: Dispatch, claim: bool, contexts: dict[int, str]) -> str:
    key = id(d.context)
    ctx = contexts.get(key)
    if ctx is None:
        ctx = contexts[key] = dumps(serde.encode_value(d.context or {}))
    head = dumps({"id": d.id, "attempt": d.attempt, "action": d.action,
                  "idempotent": d.idempotent, "payload": serde.encode_value(d.payload),
                  "claim": claim})
    return head[:-1] + ',"context":' + ctx + "}"


def enqueue_actions(conn: psycopg.Connection, run_id: str, dispatches: Sequence[Dispatch], *,
                    claim: int = 0, owner: str | None = None, lease: float = 30.0
                    ) -> list[tuple[int, Dispatch]]:
    """Queue action tasks; the first `claim` are leased to `owner` at once (the caller
    performs them). Returns [(task_id, dispatch)] of the claimed ones; NOTIFYs for the rest.
    """
    if not dispatches:
        return []
    contexts: dict[int, str] = {}
    items = ",".join(_dispatch_json(d, i < claim, contexts) for i, d in enumerate(dispatches))
    rows = conn.execute(
        "INSERT INTO ablauf.tasks (run_id, kind, node_id, attempt, action, idempotent, "
        "payload, context, lease_owner, lease_until, tries) "
        "SELECT %s, 'action', (e->>'id')::int, (e->>'attempt')::int, e->>'action', "
        "(e->>'idempotent')::boolean, e->'payload', e->'context', "
        "CASE WHEN (e->>'claim')::boolean THEN %s END, "
        "CASE WHEN (e->>'claim')::boolean THEN now() + %s * interval '1 second' END, "
        "CASE WHEN (e->>'claim')::boolean THEN 1 ELSE 0 END "
        "FROM json_array_elements(%s::json) AS e "
        "RETURNING task_id, node_id, lease_owner IS NOT NULL",
        (run_id, owner, lease, "[" + items + "]"),
    ).fetchall()
    by_node = {d.id: d for d in dispatches}
    claimed = [(int(tid), by_node[int(nid)]) for tid, nid, mine in rows if mine]
    if len(dispatches) > len(claimed):
        conn.execute("SELECT pg_notify(%s, %s)", (TASKS_CHANNEL, str(len(dispatches))))
    return claimed


def enqueue_restart(conn: psycopg.Connection, run_id: str, result: Result | None) -> None:
    """Queue a restart task (with a result to apply, or none) and wake a worker."""
    conn.execute(
        "INSERT INTO ablauf.tasks (run_id, kind, result) VALUES (%s, 'restart', %s::json)",
        (run_id, None if result is None else encode_result(result)),
    )
    conn.execute("SELECT pg_notify(%s, '1')", (TASKS_CHANNEL,))


def take_results(conn: psycopg.Connection, run_id: str) -> list[tuple[int, Result | None]]:
    """Remove and return the restart tasks queued for a run that no one else holds."""
    rows = conn.execute(
        "DELETE FROM ablauf.tasks WHERE task_id IN (SELECT task_id FROM ablauf.tasks "
        "WHERE run_id = %s AND kind = 'restart' AND error IS NULL ORDER BY task_id "
        "FOR UPDATE SKIP LOCKED) RETURNING task_id, result::text",
        (run_id,),
    ).fetchall()
    rows.sort()
    return [(int(tid), None if res is None else decode_result(res)) for tid, res in rows]


@dataclass(frozen=True, slots=True)
class Step:
    """What `restart_locked` did: the new job and version, and the actions claimed."""

    job: Job
    version: int
    applied: int
    claimed: list[tuple[int, Dispatch]]


def restart_locked(conn: psycopg.Connection, row: RunRow, extra: Sequence[Result],
                   cache: JobCache | None, *, worker: str, claim: int = 0,
                   lease: float = 30.0) -> Step:
    """Restart a run whose row the caller locked: queued results plus `extra`, in one go.

    Runs inside the caller's transaction. The cache is updated only by the caller, after
    the commit succeeded.
    """
    queued = take_results(conn, row.run_id)
    results = [r for _, r in queued if r is not None]
    results.extend(extra)
    job = job_for(conn, row, cache)
    new, dispatches = restart_job(job, results, time.time())
    version = write_step(
        conn, row.run_id, new, expected_version=row.version, previous_status=row.status,
        context_changed=new.context is not job.context, worker=worker, results=len(results),
        dispatches=len(dispatches), started=row.started,
    )
    claimed = enqueue_actions(conn, row.run_id, dispatches, claim=claim, owner=worker,
                              lease=lease)
    return Step(new, version, len(results), claimed)


# ---------------------------------------------------------------- taking and finishing tasks


@dataclass(frozen=True, slots=True)
class Task:
    """A task taken from the queue (locked by the caller's transaction)."""

    task_id: int
    run_id: str
    kind: str  # "restart" or "action"


def take_task(conn: psycopg.Connection) -> Task | None:
    """Lock the oldest task no one holds (`FOR UPDATE SKIP LOCKED`), or None."""
    row = conn.execute(
        "SELECT task_id, run_id, kind FROM ablauf.tasks "
        "WHERE lease_owner IS NULL AND error IS NULL "
        "ORDER BY task_id LIMIT 1 FOR UPDATE SKIP LOCKED"
    ).fetchone()
    return None if row is None else Task(int(row[0]), row[1], row[2])


def lease_action(conn: psycopg.Connection, task_id: int, owner: str, lease: float) -> Dispatch:
    """Lease a locked action task to `owner`; return its dispatch."""
    row = conn.execute(
        "UPDATE ablauf.tasks SET lease_owner = %s, "
        "lease_until = now() + %s * interval '1 second', tries = tries + 1 "
        "WHERE task_id = %s "
        "RETURNING node_id, attempt, action, idempotent, payload::text, context::text",
        (owner, lease, task_id),
    ).fetchone()
    if row is None:
        raise InternalError(f"task {task_id} vanished while locked")
    return Dispatch(int(row[0]), row[2], serde.decode_value(json.loads(row[4])), bool(row[3]),
                    int(row[1]), serde.decode_value(json.loads(row[5])))


def finish_action(conn: psycopg.Connection, task_id: int, owner: str) -> str | None:
    """Remove a performed action task still leased to `owner`; its run id, or None when
    the lease was lost (another worker recovered the task: the result must be dropped)."""
    row = conn.execute(
        "DELETE FROM ablauf.tasks WHERE task_id = %s AND lease_owner = %s RETURNING run_id",
        (task_id, owner),
    ).fetchone()
    return None if row is None else row[0]


def renew_leases(conn: psycopg.Connection, owner: str, task_ids: Sequence[int],
                 lease: float) -> int:
    """Extend the leases `owner` holds on these tasks; return how many it still holds."""
    if not task_ids:
        return 0
    cur = conn.execute(
        "UPDATE ablauf.tasks SET lease_until = now() + %s * interval '1 second' "
        "WHERE task_id = ANY(%s) AND lease_owner = %s",
        (lease, list(task_ids), owner),
    )
    return cur.rowcount


def release_leases(conn: psycopg.Connection, owner: str, keep: Sequence[int] = ()) -> int:
    """Put the action tasks `owner` holds (except `keep`) back in the queue, untouched."""
    cur = conn.execute(
        "UPDATE ablauf.tasks SET lease_owner = NULL, lease_until = NULL, "
        "tries = greatest(tries - 1, 0) WHERE lease_owner = %s AND NOT (task_id = ANY(%s))",
        (owner, list(keep)),
    )
    if cur.rowcount:
        conn.execute("SELECT pg_notify(%s, %s)", (TASKS_CHANNEL, str(cur.rowcount)))
    return cur.rowcount


def recover_leases(conn: psycopg.Connection, limit: int = 100) -> tuple[int, int]:
    """Recover action tasks whose lease expired (their worker died).

    An idempotent action goes back in the queue, to run again; a non-idempotent one
    becomes a failure result (error `interrupted: ...`), queued as a restart task: the run
    goes on by the normal rules and can be retried later. Returns (requeued, failed).
    """
    rows = conn.execute(
        "SELECT task_id, run_id, node_id, attempt, action, idempotent, lease_owner "
        "FROM ablauf.tasks WHERE lease_owner IS NOT NULL AND lease_until < now() "
        "AND error IS NULL ORDER BY lease_until LIMIT %s FOR UPDATE SKIP LOCKED",
        (limit,),
    ).fetchall()
    again = [r[0] for r in rows if r[5]]
    lost = [r for r in rows if not r[5]]
    if again:
        conn.execute("UPDATE ablauf.tasks SET lease_owner = NULL, lease_until = NULL "
                     "WHERE task_id = ANY(%s)", (again,))
    if lost:
        conn.execute("DELETE FROM ablauf.tasks WHERE task_id = ANY(%s)", ([r[0] for r in lost],))
        now = time.time()
        items = [
            (r[1], encode_result(Result(
                int(r[2]), int(r[3]), LeafState.FAILURE, None,
                f"{INTERRUPTED}{r[4]} was in flight on worker {r[6]}, whose lease expired; "
                "the action is not idempotent, so it was not run again", None, now)))
            for r in lost
        ]
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO ablauf.tasks (run_id, kind, result) "
                            "VALUES (%s, 'restart', %s::json)", items)
    if rows:
        conn.execute("SELECT pg_notify(%s, %s)", (TASKS_CHANNEL, str(len(rows))))
    return len(again), len(lost)


def mark_broken(conn: psycopg.Connection, run_id: str, task_ids: Sequence[int],
                message: str) -> None:
    """Keep tasks that cannot be processed out of the queue, with the reason (never lost)."""
    conn.execute("UPDATE ablauf.tasks SET error = %s WHERE task_id = ANY(%s)",
                 (message, list(task_ids)))
    conn.execute("UPDATE ablauf.runs SET error = %s, updated = now() WHERE run_id = %s",
                 (message, run_id))


def process_name() -> str:
    """`host:pid`, naming this process in leases and in the restarts table."""
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- the store


class PostgresStore:
    """Runs in a PostgreSQL database (`postgresql://...`), shared by many processes."""

    durable = True

    def __init__(self, conn: psycopg.Connection, url: str) -> None:
        self.conn = conn
        self.url = url
        self._lock = threading.RLock()

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """Connect, create or migrate the schema, and return the store."""
        conn = connect(url)
        try:
            with _errors(f"cannot prepare the ablauf schema at {redact(url)}"):
                migrate(conn, url)
        except BaseException:
            conn.close()
            raise
        return cls(conn, url)

    @contextmanager
    def _tx(self, what: str) -> Iterator[psycopg.Connection]:
        with self._lock, _errors(what), self.conn.transaction():
            yield self.conn

    # ------------------------------------------------------------ JobStore

    def create_run(self, job: Job, *, source: str | None = None, filename: str | None = None,
                   run_id: str | None = None, enqueue: bool = False) -> str:
        """Record a new run; with `enqueue`, also queue its first restart for the workers."""
        run_id = run_id or new_run_id()
        with self._tx(f"cannot create run {run_id}") as conn:
            context = dumps(serde.encode_value(job.context))
            row = conn.execute(
                "INSERT INTO ablauf.runs (run_id, status, restarts, filename, source, "
                "initial_context, context, todo, aborted) "
                "VALUES (%s, %s, %s, %s, %s, %s::json, %s::json, %s::json, %s) "
                "ON CONFLICT (run_id) DO NOTHING RETURNING run_id",
                (run_id, str(job.status), job.restarts, filename, source, context, context,
                 encode_todo(job.todo), job.aborted),
            ).fetchone()
            if row is None:
                raise StoreError(f"run {run_id} already exists")
            conn.execute(
                "INSERT INTO ablauf.nodes (run_id, node_id, version, kind, action, result, "
                "record) SELECT %s, (e->>'id')::int, 0, e->>'kind', e->>'action', "
                "e->>'result', e FROM json_array_elements(%s::json) AS e",
                (run_id, _records_json(list(job.nodes()))),
            )
            if enqueue:
                enqueue_restart(conn, run_id, None)
        return run_id

    def record(self, run_id: str, job: Job) -> None:
        """Record a step: touched nodes, context, status; waits for the run's row lock."""
        with self._tx(f"cannot record run {run_id}") as conn:
            row = lock_run(conn, run_id)
            if row is None:
                raise StoreError(f"no run {run_id!r} in this store")
            write_step(conn, run_id, job, expected_version=None, previous_status=row.status,
                       context_changed=True, worker=process_name(), results=None,
                       dispatches=None, started=row.started)
            if job.aborted is not None:
                # Nothing new starts in an aborted run: drop the actions no one took yet.
                conn.execute("DELETE FROM ablauf.tasks WHERE run_id = %s AND kind = 'action' "
                             "AND lease_owner IS NULL", (run_id,))

    def load(self, run_id: str) -> StoredRun:
        """Load a run (info, program, initial context and job)."""
        with self._tx(f"cannot load run {run_id}") as conn:
            row = conn.execute(
                "SELECT " + _INFO + ", source, initial_context::text, context::text, "
                "todo::text FROM ablauf.runs WHERE run_id = %s", (run_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"no run {run_id!r} in this store")
            info = _info(row)
            job = read_job(conn, run_id, row[10], row[11], info.restarts, row[7])
        initial = serde.decode_value(json.loads(row[9])) if row[9] else {}
        return StoredRun(info, job, row[8], initial)

    def exists(self, run_id: str) -> bool:
        with self._tx("cannot look up a run") as conn:
            row = conn.execute("SELECT 1 FROM ablauf.runs WHERE run_id = %s",
                               (run_id,)).fetchone()
        return row is not None

    def list_runs(self, *, limit: int | None = None) -> list[RunInfo]:
        with self._tx("cannot list runs") as conn:
            rows = conn.execute(
                "SELECT " + _INFO + " FROM ablauf.runs ORDER BY created DESC, run_id "
                + ("LIMIT %s" if limit else ""),
                (limit,) if limit else (),
            ).fetchall()
        return [_info(r) for r in rows]

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------ for workers and tools

    def info(self, run_id: str) -> RunInfo:
        """What the store knows of a run, without reading its tree."""
        with self._tx(f"cannot read run {run_id}") as conn:
            row = conn.execute("SELECT " + _INFO + " FROM ablauf.runs WHERE run_id = %s",
                               (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"no run {run_id!r} in this store")
        return _info(row)

    def requeue(self, run_id: str, job: Job) -> None:
        """Record a rewritten job (resume or retry) and queue a restart for the workers."""
        with self._tx(f"cannot requeue run {run_id}") as conn:
            row = lock_run(conn, run_id)
            if row is None:
                raise StoreError(f"no run {run_id!r} in this store")
            write_step(conn, run_id, job, expected_version=None, previous_status=row.status,
                       context_changed=True, worker=process_name(), results=None,
                       dispatches=None, started=row.started)
            enqueue_restart(conn, run_id, None)

    def queue_counts(self) -> dict[str, int]:
        """Tasks in the queue by state: ready, leased, broken (for people and tests)."""
        with self._tx("cannot read the queue") as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE lease_owner IS NULL AND error IS NULL), "
                "count(*) FILTER (WHERE lease_owner IS NOT NULL), "
                "count(*) FILTER (WHERE error IS NOT NULL) FROM ablauf.tasks"
            ).fetchone()
        assert row is not None
        return {"ready": int(row[0]), "leased": int(row[1]), "broken": int(row[2])}


_INFO = ("run_id, status, extract(epoch FROM created)::float8, "
         "extract(epoch FROM updated)::float8, restarts, filename, error, aborted")


def _info(row: Sequence[Any]) -> RunInfo:
    return RunInfo(row[0], Status(row[1]), float(row[2]), float(row[3]), int(row[4]), row[5],
                   row[6])


@contextmanager
def _errors(what: str) -> Iterator[None]:
    """Turn driver errors into a one-line StoreError."""
    try:
        yield
    except psycopg.Error as exc:
        raise StoreError(f"{what}: {one_line(exc)}") from None


__all__ = ["JobCache", "PostgresStore", "migrate", "schema_version"]
