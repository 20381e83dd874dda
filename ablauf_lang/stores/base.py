"""The store interface (`JobStore`), its records and the default store's place.

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
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ablauf_lang import values
from ablauf_lang.codec.delta import dumps_text
from ablauf_lang.codec.history import RunHistory
from ablauf_lang.engine.job import LAST_ERROR, Job
from ablauf_lang.engine.nodes import Status
from ablauf_lang.engine.waits import Wait, describe_waits
from ablauf_lang.errors import AblaufError, RunError, StoreError

ENV_VAR = "ABLAUF_STORE"
LEASE_ENV = "ABLAUF_LEASE_SECONDS"  # how long a driver's lease lasts without a heartbeat
LEASE_SECONDS = 30.0
STATES = ("pending", "running", "abandoned", "success", "failure", "aborted", "damaged")


# ---------------------------------------------------------------- who is driving a run


def process_started(pid: int) -> float | None:
    """When process `pid` of this host started (seconds since the epoch), where the system
    says (Linux /proc); None elsewhere. Tells a live process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22: starttime
    except (ValueError, IndexError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int, started: float | None = None) -> bool:
    """True when process `pid` of this host exists (and, when `started` is known and the
    system tells, is the process that started then, not a later one given the same pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    except OSError:
        return False
    if started is not None:
        now = process_started(pid)
        if now is not None and abs(now - started) > 2.0:
            return False  # the pid was given to another process since
    return True


HOST = socket.gethostname()


@dataclass(frozen=True, slots=True)
class Owner:
    """A process that drives runs: where it runs, and a fresh token per lease it takes."""

    host: str
    pid: int
    started: float | None
    token: str

    @classmethod
    def this_process(cls) -> Owner:
        """This process, with a new token."""
        pid = os.getpid()
        return cls(HOST, pid, process_started(pid), uuid.uuid4().hex)


@dataclass(frozen=True, slots=True)
class Driver:
    """The lease a process holds on a run it drives (`ablauf run`, eval, resume, retry).

    Live while it is not expired and, on this host, its process still exists; a lease
    released before the run ended has `expires == 0`.
    """

    host: str
    pid: int
    heartbeat: float
    expires: float
    started: float | None = None
    token: str = field(default="", compare=False, repr=False)

    def is_live(self, now: float | None = None) -> bool:
        """True while the process that took the lease may still be driving the run."""
        if self.expires <= (time.time() if now is None else now):
            return False
        if self.host == HOST:
            return pid_alive(self.pid, self.started)
        return True  # another host: only its heartbeat tells

    def describe(self) -> str:
        """`host, pid 123`."""
        return f"{self.host}, pid {self.pid}"

    def to_dict(self) -> dict[str, Any]:
        """The lease as plain data (for `--json`)."""
        return {
            "host": self.host,
            "pid": self.pid,
            "heartbeat": self.heartbeat,
            "expires": self.expires,
            "live": self.is_live(),
        }


def lease_seconds() -> float:
    """How long a lease lasts without a heartbeat: `$ABLAUF_LEASE_SECONDS`, else 30."""
    text = os.environ.get(LEASE_ENV)
    if not text:
        return LEASE_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise StoreError(f"${LEASE_ENV} must be a number of seconds, not {text!r}") from None
    if not 0.1 <= value <= 86400:
        raise StoreError(f"${LEASE_ENV} must be between 0.1 and 86400 seconds, not {text}")
    return value


def refuse_live(run_id: str, driver: Driver, doing: str) -> RunError:
    """The error for an operation refused because another process drives the run:
    `doing` is "driving" (resume, retry: --force takes it over) or "deleting"."""
    ago = max(0.0, time.time() - driver.heartbeat)
    head = f"run {run_id} is running ({driver.describe()}, heartbeat {ago:.0f}s ago)"
    if doing == "driving":
        return RunError(
            f"{head}: another process drives it; wait for it to end, stop that process, "
            "or take it over with --force (force=True)"
        )
    return RunError(f"{head}: not {doing} it; wait for it to end or stop that process first")


# ---------------------------------------------------------------- attempts of actions


CLAIM_STATES = ("new", "running", "abandoned", "finished", "gone")


@dataclass(frozen=True, slots=True)
class Claim:
    """What a claim of an action's attempt (`JobStore.begin_attempts`) found.

    new        no one claimed it before: the caller owns it now (perform it)
    running    claimed by `owner` (maybe the caller), lease live, no result yet
    abandoned  claimed by `owner`, whose lease ran out without a result: the caller
               owns it now, but the action may have begun (do not perform it again)
    finished   performed: `result` is the text `finish_attempts` kept
    gone       the run finished, or the store does not have it
    """

    state: str
    owner: str | None = None
    result: str | None = None  # codec.records.encode_result text, when finished


# ---------------------------------------------------------------- runs


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
    aborted: str | None = None  # the abort reason, once aborted
    driver: Driver | None = None  # the lease of the process driving it, if one was taken
    damage: str | None = None  # why the store cannot give this run back as it was recorded
    waiting: str | None = None  # what it waits for (`engine.waits.describe_waits`), if anything
    parent: str | None = None  # a fork: the run it was forked from
    parent_step: int | None = None  # and the restart it was forked at

    @property
    def state(self) -> str:
        """One word for people: pending, running, parked, abandoned, success, failure,
        aborted or damaged (`running`: a live driver holds its lease; `parked`: no live
        driver and it waits for a time or a signal; `abandoned`: unfinished, and the
        process that drove it is gone or stopped)."""
        if self.damage is not None:
            return "damaged"
        if self.status is Status.SUCCESS:
            return "success"
        if self.status is Status.FAILURE:
            return "failure" if self.aborted is None else "aborted"
        if self.driver is not None and self.driver.is_live():
            return "running"
        if self.waiting is not None:
            return "parked"  # only waits left: a worker (or `runs resume`) wakes it
        return "pending" if self.driver is None else "abandoned"

    @property
    def live(self) -> bool:
        """True while another process may be driving the run (its lease is live)."""
        return self.status is Status.PENDING and self.driver is not None and self.driver.is_live()

    def label(self) -> str:
        """The state with its driver: `running (host, pid 123)`."""
        state = self.state
        if state == "running" and self.driver is not None:
            return f"running ({self.driver.describe()})"
        return state

    def to_dict(self) -> dict[str, Any]:
        """The run as plain data (for `--json`)."""
        return {
            "run_id": self.run_id,
            "status": str(self.status),
            "state": self.state,
            "created": self.created,
            "updated": self.updated,
            "restarts": self.restarts,
            "filename": self.filename,
            "error": self.error,
            "aborted": self.aborted,
            "driver": None if self.driver is None else self.driver.to_dict(),
            "damage": self.damage,
            "waiting": self.waiting,
            "parent": self.parent,
            "parent_step": self.parent_step,
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
    SQL ones share `stores.sql.SqlStore`. A run id the store does not have raises RunError
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
        parent: str | None = None,
        parent_step: int | None = None,
    ) -> str:
        """Record a new run (its program, initial context and job); return its id. A fork
        names the run it was forked from (`parent`) and at which restart.

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

    def list_runs(
        self,
        *,
        limit: int | None = None,
        status: str | None = None,
        offset: int = 0,
        filename: str | None = None,
        since: float | None = None,
        waiting: bool = False,
        forks_of: str | None = None,
    ) -> list[RunInfo]:
        """Runs, newest first: only those with `status` (pending, success, failure), whose
        file is `filename` (the name as recorded, or its last part), created at `since` or
        later, that wait for something (`waiting`), forked from run `forks_of`; `limit` of
        them after skipping `offset`. A damaged run is listed with its `damage` said,
        never raised."""
        ...

    def count_runs(
        self,
        *,
        status: str | None = None,
        filename: str | None = None,
        since: float | None = None,
        waiting: bool = False,
        forks_of: str | None = None,
    ) -> int:
        """How many runs `list_runs` would give without a limit."""
        ...

    def history(self, run_id: str) -> RunHistory:
        """Every write kept of the run, described (`codec.history`): `ablauf runs
        history`, `runs show --at`, fork. RunError when there is no such run."""
        ...

    def resolve_run_id(self, prefix: str) -> str:
        """The id of the one run whose id starts with `prefix` (a whole id is its own
        prefix); RunError naming the candidates when several do, or when none does."""
        ...

    def delete_run(self, run_id: str) -> None:
        """Delete a run and everything recorded of it; RunError when it is running
        (its driver's lease is live)."""
        ...

    def prune_runs(
        self, *, before: float, status: str | None = None, dry_run: bool = False
    ) -> tuple[list[str], list[str]]:
        """Delete runs last updated before `before` (with `status` when given): returns
        (ids deleted, or that would be with `dry_run`; ids kept because they are running)."""
        ...

    def acquire_lease(
        self, run_id: str, owner: Owner, ttl: float, *, force: bool = False
    ) -> Driver:
        """Take the lease of a run for `owner` (a process about to drive it). RunError
        when another process holds a live lease, unless `force` (take it over)."""
        ...

    def renew_lease(self, run_id: str, token: str, ttl: float) -> bool:
        """Renew our lease (the heartbeat); False when it is no longer ours."""
        ...

    def release_lease(self, run_id: str, token: str, *, finished: bool) -> None:
        """Give the lease back: removed when the run `finished`, else marked released
        (the run shows as abandoned: resume it)."""
        ...

    def send_signal(self, run_id: str, name: str, value: Any = None) -> int:
        """Put signal `name` with `value` in the run's mailbox; return its number (the
        run's signals are numbered 1, 2 ... in order of arrival). RunError when the run
        does not exist or has finished; AblaufError when the value cannot be stored."""
        ...

    def take_signal(self, run_id: str, name: str, node: int) -> tuple[int, Any] | None:
        """Atomically the earliest signal `name` not taken by another node, marked taken
        by `node`: (its number, its value), or None. A signal taken by `node` whose result
        was never recorded (a crash) is given to `node` again, never to another: each
        signal is delivered exactly once."""
        ...

    def signals(self, run_id: str) -> list[dict[str, Any]]:
        """The run's mailbox in order of arrival: seq, name, value, sent_at, consumed_by
        (the node that took it, or None) and consumed_at."""
        ...

    def due_runs(self, now: float, limit: int = 100) -> list[str]:
        """Pending runs with a wait whose time has come at `now`, or awaiting a signal
        that is in their mailbox (at most `limit`, the longest due first)."""
        ...

    def taken_unrecorded(self) -> list[str]:
        """Pending runs with an await that took a signal from the mailbox but whose result
        was never recorded (the process died between the two): a worker wakes them when
        it starts, and the await gets the same signal again."""
        ...

    def next_wake(self) -> float | None:
        """The earliest time any run waits for (a wake-up, a deadline, a retry), or None."""
        ...

    def begin_attempts(
        self, items: Sequence[tuple[str, int, int]], owner: str, ttl: float
    ) -> list[Claim]:
        """Claim attempts (run id, node, attempt) for `owner`, one transaction for the
        batch: a Claim per item, in order (see `Claim`). A new claim holds a lease of
        `ttl` seconds; one whose lease ran out without a result is taken over."""
        ...

    def renew_attempts(self, items: Sequence[tuple[str, int, int]], owner: str, ttl: float) -> int:
        """Extend the leases of `owner`'s claims of these attempts that have no result
        yet by `ttl` seconds from now; return how many were renewed."""
        ...

    def finish_attempts(self, items: Sequence[tuple[str, int, int, str]]) -> None:
        """Keep the result text (run id, node, attempt, result) of claimed attempts and
        end their leases; a later claim gets it back. The first result kept stays."""
        ...

    def clear_wait(self, run_id: str, node: int, attempt: int) -> None:
        """Forget the run's retry wait of `node` for `attempt` (its dispatch was sent):
        `due_runs` and `next_wake` no longer give it, and a later `record` brings it back
        only when the leaf changed. An unknown run, or a wait of another kind or attempt,
        is left as it is."""
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
        err = json.dumps(values.encode(err), ensure_ascii=False)
    return " ".join(err.split())[:500]


# ---------------------------------------------------------------- signals and waits


def signal_name(name: Any) -> str:
    """A signal's name as stored: a non-empty string (`:approval` and a keyword are
    `approval`)."""
    text = str(name).removeprefix(":") if isinstance(name, str) else ""
    if not text.strip() or text != text.strip():
        raise RunError(f"a signal's name must be a non-empty word such as approval, not {name!r}")
    return text


def signal_text(value: Any) -> str:
    """A signal's value as stored (JSON text of `values.encode`); AblaufError when it
    cannot be stored."""
    try:
        return dumps_text(values.encode(value, "the signal's value"))
    except AblaufError:
        raise
    except (TypeError, ValueError) as exc:
        raise RunError(f"the signal's value cannot be stored: {exc}") from None


def finished_error(run_id: str, status: str, aborted: Any = None) -> RunError:
    """The error for a signal sent to a run that finished."""
    how = "aborted" if status == "failure" and aborted is not None else status
    return RunError(
        f"run {run_id} already finished ({how}): signals are only delivered to a run that waits"
    )


def waits_described(found: Sequence[Wait]) -> str | None:
    """`RunInfo.waiting`: what the run waits for, in words (None: nothing)."""
    return describe_waits(list(found)) if found else None


def new_run_id() -> str:
    """A fresh, sortable-enough, unique run id."""
    return uuid.uuid4().hex[:16]


def default_path() -> str:
    """The default store's file: `runs.db` in the user's data directory (XDG)."""
    from platformdirs import user_data_dir

    return os.path.join(user_data_dir("ablauf", appauthor=False), "runs.db")


def default_url() -> str:
    """`$ABLAUF_STORE`, else a SQLite file in the user's data directory (XDG)."""
    url = os.environ.get(ENV_VAR)
    if url and url.strip():
        return url
    return f"sqlite:///{default_path()}"


def statuses(infos: Iterable[RunInfo]) -> dict[str, str]:
    """Map run ids to their status (handy in tests and listings)."""
    return {i.run_id: str(i.status) for i in infos}


def resolve_prefix(prefix: str, candidates: Iterable[str], where: str) -> str:
    """The one candidate id starting with `prefix`; RunError listing them when several
    do, or naming the prefix when none does."""
    found = sorted(set(candidates))
    if prefix in found:
        return prefix
    matches = [c for c in found if c.startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RunError(f"no run {prefix!r} in {where}")
    shown = ", ".join(matches[:10]) + (
        f" and {len(matches) - 10} more" if len(matches) > 10 else ""
    )
    raise RunError(f"run id {prefix!r} is ambiguous in {where}: it matches {shown}")


# ---------------------------------------------------------------- the driver's lease


class DriverLease:
    """The lease a process holds while it drives a run, renewed by the process's lease
    keeper (one thread for every lease of the process).

        lease = DriverLease(store, run_id)   # RunError when another process drives it
        lease.acquire(force=False)
        ... drive the run; lease.beat() now and then (cheap: renews when due) ...
        lease.release(finished=job.done)

    The keeper renews it every third of its time to live; a store error while renewing is
    retried at the next beat (the lease lasts a while). A lease taken over by another
    process (`force`) is not renewed any more (`lost` is set); that process's writes make
    this one's next write fail as written by another process.
    """

    def __init__(self, store: JobStore, run_id: str, ttl: float | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.ttl = lease_seconds() if ttl is None else ttl
        self.owner = Owner.this_process()
        self.lost = False
        self.errors = 0  # heartbeats that failed (store busy or unreachable)
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self, *, force: bool = False) -> Driver:
        """Take the lease (see `JobStore.acquire_lease`) and hand it to the keeper."""
        driver = self.store.acquire_lease(self.run_id, self.owner, self.ttl, force=force)
        self._next = time.monotonic() + self.ttl / 3
        KEEPER.add(self)
        return driver

    def beat(self) -> None:
        """Renew the lease if a third of its time has passed since the last renewal."""
        if self.lost or time.monotonic() < self._next:
            return
        self._renew()

    def _renew(self) -> None:
        with self._lock:
            if self.lost:
                return
            try:
                ok = self.store.renew_lease(self.run_id, self.owner.token, self.ttl)
            except AblaufError:
                self.errors += 1  # busy or unreachable: tried again within a second
                self._next = time.monotonic() + min(self.ttl / 3, 1.0)
                return
            self._next = time.monotonic() + self.ttl / 3
            if not ok:
                self.lost = True

    def release(self, *, finished: bool) -> None:
        """Take the lease from the keeper and give it back (errors are not raised: the
        lease then simply expires)."""
        KEEPER.discard(self)
        with self._lock:  # a renewal under way ends first
            if self.lost:
                return
            self.lost = True
            try:
                self.store.release_lease(self.run_id, self.owner.token, finished=finished)
            except AblaufError:
                self.errors += 1


class LeaseKeeper:
    """One thread that renews this process's driver leases when each falls due (a
    thousand runs driven at once are a thousand leases, not a thousand threads). It
    starts with the first lease and ends when the last is given back."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """No lease and no thread (as made; a forked child starts so)."""
        self._leases: set[DriverLease] = set()
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, lease: DriverLease) -> None:
        with self._lock:
            self._leases.add(lease)
            if self.thread is None or not self.thread.is_alive():  # (a forked child has none)
                self.thread = threading.Thread(
                    target=self._run, name="ablauf-lease-keeper", daemon=True
                )
                self.thread.start()
        self._changed.set()  # its time may come before the keeper's next wake-up

    def discard(self, lease: DriverLease) -> None:
        with self._lock:
            self._leases.discard(lease)

    def _run(self) -> None:
        while True:
            with self._lock:
                leases = [lease for lease in self._leases if not lease.lost]
                if not leases:
                    self._leases.clear()
                    self.thread = None
                    return
            now = time.monotonic()
            for lease in leases:
                if lease._next <= now:
                    lease._renew()
            wake = min(lease._next for lease in leases)
            self._changed.wait(max(0.01, min(1.0, wake - time.monotonic())))
            self._changed.clear()


KEEPER = LeaseKeeper()
# A child process forked while the keeper ran starts with no leases and no keeper thread.
os.register_at_fork(after_in_child=KEEPER.reset)
