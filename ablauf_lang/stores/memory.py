"""A store that keeps runs in this process only (`memory:`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ablauf_lang import values
from ablauf_lang.codec.delta import diff
from ablauf_lang.codec.history import RunHistory, build_history, whole_data
from ablauf_lang.codec.job import VERSION
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.nodes import Status
from ablauf_lang.engine.waits import RETRY, Wait, waits
from ablauf_lang.errors import RunError
from ablauf_lang.stores.base import (
    Claim,
    Driver,
    Owner,
    RunInfo,
    StoredRun,
    finished_error,
    new_run_id,
    refuse_live,
    resolve_prefix,
    run_error,
    signal_name,
    signal_text,
    waits_described,
)


@dataclass(slots=True)
class _Run:  # the current job and its time change in place (a record is a step's cost)
    job: Job
    source: str | None
    filename: str | None
    initial_context: dict[str, Any]
    created: float
    updated: float
    order: int  # creation order: ties of `created` still list newest first
    driver: Driver | None = None
    parent: str | None = None
    parent_step: int | None = None


@dataclass(slots=True)
class _Attempt:
    owner: str
    lease_until: float | None
    started_at: float
    result: str | None = None


def matches_file(recorded: str | None, wanted: str) -> bool:
    """`--file`: the name as recorded, or its last part (`deploy.abl` for `ops/deploy.abl`)."""
    return recorded is not None and (recorded == wanted or recorded.endswith("/" + wanted))


class MemoryStore:
    """Runs held in a dict: jobs are immutable, so keeping a reference is a snapshot.

    `history`: keep every write of a run (what `history` and time travel read; default).
    A store nobody reads afterwards (the one `eval` makes when given none) keeps only the
    current job: every kept job stays alive, and the garbage collector visits each one's
    node vectors whole on every collection of its generation (a 10,000-step run in memory
    took 5 times as long with them kept).
    """

    durable = False
    url = "memory:"

    def __init__(self, *, history: bool = True) -> None:
        self.keeps_history = history
        self._runs: dict[str, _Run] = {}
        self._signals: dict[str, list[dict[str, Any]]] = {}  # run id -> its mailbox
        self._mailbox = threading.Lock()  # a sender and a runner may be other threads
        self._made = 0
        self._attempts: dict[tuple[str, int, int], _Attempt] = {}  # claims of attempts
        self._cleared: dict[str, set[Wait]] = {}  # run id -> retry waits whose dispatch went
        self._claims = threading.Lock()
        self.commits = 0  # records taken (what a durable store would commit)
        self._history: dict[str, list[tuple[float, Job]]] = {}  # run id -> every write

    def __repr__(self) -> str:
        return "MemoryStore()"

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
        """Record a new run; return its id."""
        run_id = run_id or new_run_id()
        if run_id in self._runs:
            raise RunError(f"run {run_id!r} already exists in memory:")
        now = time.time()
        self._made += 1
        self._runs[run_id] = _Run(
            job,
            source,
            filename,
            dict(job.context),
            now,
            now,
            self._made,
            parent=parent,
            parent_step=None if parent is None else int(parent_step or 0),
        )
        self._history[run_id] = [(now, job)]
        return run_id

    def record(self, run_id: str, job: Job) -> None:
        """Keep the job (a reference: jobs never change, and share what they did not)."""
        now = time.time()
        run = self._get(run_id)
        run.job, run.updated = job, now
        if self.keeps_history:
            self._history.setdefault(run_id, []).append((now, job))
        else:
            self._history[run_id] = [(now, job)]
        self.commits += 1
        cleared = self._cleared.get(run_id)
        if cleared:
            # A cleared wait stays cleared while the leaf keeps it (the SQL stores' rows,
            # kept per changed leaf, do the same); a changed leaf waits anew.
            cleared.intersection_update(waits(job) if job.status is Status.PENDING else ())
            if not cleared:
                del self._cleared[run_id]

    def _get(self, run_id: str) -> _Run:
        try:
            return self._runs[run_id]
        except KeyError:
            raise RunError(f"no run {run_id!r} in memory:") from None

    def _info(self, run_id: str, run: _Run) -> RunInfo:
        job = run.job
        pending = job.status is Status.PENDING
        return RunInfo(
            run_id,
            job.status,
            run.created,
            run.updated,
            job.restarts,
            run.filename,
            run_error(job),
            None if job.aborted is None else str(job.aborted),
            run.driver,
            None,
            waits_described(waits(job)) if pending else None,
            run.parent,
            run.parent_step,
        )

    def history(self, run_id: str) -> RunHistory:
        """Every write of the run (see `JobStore.history`); without `history`, the current
        job as the run's one write."""
        self._get(run_id)
        kept = self._history.get(run_id, [])
        rows: list[tuple[int, float, str]] = []
        previous: Job | None = None
        for seq, (when, job) in enumerate(kept):
            data = whole_data(job) if previous is None else diff(previous, job).data(job)
            rows.append((seq, when, data))
            previous = job
        return build_history(run_id, rows, VERSION)

    def load(self, run_id: str) -> StoredRun:
        """The run with its current job."""
        run = self._get(run_id)
        return StoredRun(self._info(run_id, run), run.job, run.source, dict(run.initial_context))

    def info(self, run_id: str) -> RunInfo:
        """What the store knows of a run."""
        return self._info(run_id, self._get(run_id))

    def exists(self, run_id: str) -> bool:
        """True when this store has the run."""
        return run_id in self._runs

    def _select(
        self,
        status: str | None,
        filename: str | None,
        since: float | None,
        waiting: bool = False,
        forks_of: str | None = None,
    ) -> Iterator[RunInfo]:
        wanted = None if status is None else Status(status)
        runs = sorted(self._runs.items(), key=lambda kv: (kv[1].created, kv[1].order), reverse=True)
        for run_id, run in runs:
            if forks_of is not None and run.parent != forks_of:
                continue
            if since is not None and run.created < since:
                continue
            if filename is not None and not matches_file(run.filename, filename):
                continue
            if wanted is not None and run.job.status is not wanted:
                continue
            info = self._info(run_id, run)
            if waiting and info.waiting is None:
                continue
            yield info

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
        """Runs, newest first (see `JobStore.list_runs`)."""
        infos = list(self._select(status, filename, since, waiting, forks_of))[max(0, offset) :]
        return infos[:limit] if limit is not None else infos

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
        return sum(1 for _ in self._select(status, filename, since, waiting, forks_of))

    def resolve_run_id(self, prefix: str) -> str:
        """The one run whose id starts with `prefix`."""
        return resolve_prefix(prefix, self._runs, "memory:")

    def delete_run(self, run_id: str) -> None:
        """Forget a run; RunError when it is running."""
        info = self.info(run_id)
        if info.live and info.driver is not None:
            raise refuse_live(run_id, info.driver, "deleting")
        del self._runs[run_id]
        self._forget(run_id)

    def _forget(self, run_id: str) -> None:
        """Drop what is kept besides the run: its mailbox, claims and cleared waits."""
        self._signals.pop(run_id, None)
        self._cleared.pop(run_id, None)
        self._history.pop(run_id, None)
        with self._claims:
            for key in [k for k in self._attempts if k[0] == run_id]:
                del self._attempts[key]

    def prune_runs(
        self, *, before: float, status: str | None = None, dry_run: bool = False
    ) -> tuple[list[str], list[str]]:
        """Forget runs last updated before `before` (running ones are kept)."""
        gone: list[str] = []
        kept: list[str] = []
        for info in self._select(status, None, None):
            if info.updated >= before:
                continue
            (kept if info.live else gone).append(info.run_id)
        if not dry_run:
            for run_id in gone:
                del self._runs[run_id]
                self._forget(run_id)
        return gone, kept

    def acquire_lease(
        self, run_id: str, owner: Owner, ttl: float, *, force: bool = False
    ) -> Driver:
        """Take the lease of a run (see `JobStore.acquire_lease`)."""
        run = self._get(run_id)
        held = run.driver
        if held is not None and held.token != owner.token and not force and held.is_live():
            raise refuse_live(run_id, held, "driving")
        now = time.time()
        driver = Driver(owner.host, owner.pid, now, now + ttl, owner.started, owner.token)
        self._runs[run_id] = replace(run, driver=driver)
        return driver

    def renew_lease(self, run_id: str, token: str, ttl: float) -> bool:
        """Renew our lease; False when it is not ours any more."""
        run = self._runs.get(run_id)
        if run is None or run.driver is None or run.driver.token != token:
            return False
        now = time.time()
        self._runs[run_id] = replace(
            run, driver=replace(run.driver, heartbeat=now, expires=now + ttl)
        )
        return True

    def release_lease(self, run_id: str, token: str, *, finished: bool) -> None:
        """Give the lease back (removed once the run finished, else marked released)."""
        run = self._runs.get(run_id)
        if run is None or run.driver is None or run.driver.token != token:
            return
        driver = None if finished else replace(run.driver, expires=0.0)
        self._runs[run_id] = replace(run, driver=driver)

    # -------------------------------------------------- signals and waits

    def send_signal(self, run_id: str, name: str, value: Any = None) -> int:
        """Put a signal in the run's mailbox; return its number (see `JobStore`)."""
        name = signal_name(name)
        signal_text(value)  # a value the durable stores could not keep is refused here too
        run = self._runs.get(run_id)
        if run is None:
            raise RunError(f"run {run_id} does not exist")
        job = run.job
        if job.status is not Status.PENDING:
            raise finished_error(run_id, str(job.status), job.aborted)
        kept = values.decode(values.encode(value))  # a copy, as a durable store gives back
        with self._mailbox:
            box = self._signals.setdefault(run_id, [])
            seq = len(box) + 1
            box.append(
                {
                    "seq": seq,
                    "name": name,
                    "value": kept,
                    "sent_at": time.time(),
                    "consumed_by": None,
                    "consumed_at": None,
                }
            )
        return seq

    def take_signal(self, run_id: str, name: str, node: int) -> tuple[int, Any] | None:
        """The earliest signal `name` for `node`, marked taken by it (see `JobStore`)."""
        if run_id not in self._runs:
            raise RunError(f"run {run_id} does not exist")
        with self._mailbox:
            for signal in self._signals.get(run_id, ()):
                if signal["name"] == name and signal["consumed_by"] in (None, node):
                    if signal["consumed_by"] is None:
                        signal["consumed_by"] = node
                        signal["consumed_at"] = time.time()
                    return signal["seq"], signal["value"]
        return None

    def signals(self, run_id: str) -> list[dict[str, Any]]:
        """The run's mailbox in order of arrival (see `JobStore.signals`)."""
        if run_id not in self._runs:
            raise RunError(f"run {run_id} does not exist")
        with self._mailbox:
            return [dict(signal) for signal in self._signals.get(run_id, ())]

    def due_runs(self, now: float, limit: int = 100) -> list[str]:
        """Pending runs with a wait due at `now` or a signal they await in their mailbox
        (a walk over the runs held: this store is for one process and tests)."""
        due: list[tuple[float, str]] = []
        for run_id, run in self._runs.items():
            if run.job.status is not Status.PENDING:
                continue
            box = self._signals.get(run_id, ())
            times = [
                w.until for w in self._waits(run_id, run) if w.until is not None and w.until <= now
            ]
            times += [
                s["sent_at"]
                for w in waits(run.job)
                if w.kind == "signal"
                for s in box
                if s["name"] == w.name and s["consumed_by"] is None
            ]
            if times:
                due.append((min(times), run_id))
        return [run_id for _, run_id in sorted(due)[:limit]]

    def taken_unrecorded(self) -> list[str]:
        """Pending runs whose await took a signal but never recorded it."""
        out = []
        for run_id, run in self._runs.items():
            if run.job.status is not Status.PENDING:
                continue
            nodes = {w.node for w in waits(run.job) if w.kind == "signal"}
            if any(s["consumed_by"] in nodes for s in self._signals.get(run_id, ())):
                out.append(run_id)
        return sorted(out)

    def next_wake(self) -> float | None:
        """The earliest time any run waits for, or None."""
        times = [
            w.until
            for run_id, run in self._runs.items()
            if run.job.status is Status.PENDING
            for w in self._waits(run_id, run)
            if w.until is not None
        ]
        return min(times) if times else None

    def _waits(self, run_id: str, run: _Run) -> list[Wait]:
        """The run's waits but the retries whose dispatch was sent (`clear_wait`)."""
        found = waits(run.job)
        cleared = self._cleared.get(run_id)
        return [w for w in found if w not in cleared] if cleared else found

    def clear_wait(self, run_id: str, node: int, attempt: int) -> None:
        """Forget the run's retry wait of `node` for `attempt` (see `JobStore.clear_wait`)."""
        run = self._runs.get(run_id)
        if run is None or run.job.status is not Status.PENDING:
            return
        for w in waits(run.job):
            if w.node == node and w.kind == RETRY and w.attempt == attempt:
                self._cleared.setdefault(run_id, set()).add(w)

    # -------------------------------------------------- attempts of actions

    def begin_attempts(
        self, items: Sequence[tuple[str, int, int]], owner: str, ttl: float
    ) -> list[Claim]:
        """Claim attempts for `owner`, the batch at once (see `JobStore.begin_attempts`)."""
        now = time.time()
        out: list[Claim] = []
        with self._claims:
            for run_id, node, attempt in items:
                run = self._runs.get(run_id)
                if run is None or run.job.status is not Status.PENDING:
                    out.append(Claim("gone"))
                    continue
                key = (run_id, int(node), int(attempt))
                row = self._attempts.get(key)
                if row is None:
                    self._attempts[key] = _Attempt(owner, now + ttl, now)
                    out.append(Claim("new"))
                elif row.result is not None:
                    out.append(Claim("finished", row.owner, row.result))
                elif row.lease_until is not None and row.lease_until > now:
                    out.append(Claim("running", row.owner))
                else:
                    out.append(Claim("abandoned", row.owner))
                    self._attempts[key] = _Attempt(owner, now + ttl, now)
        return out

    def renew_attempts(self, items: Sequence[tuple[str, int, int]], owner: str, ttl: float) -> int:
        """Extend `owner`'s leases of these attempts (see `JobStore.renew_attempts`)."""
        until = time.time() + ttl
        renewed = 0
        with self._claims:
            for key in {(r, int(n), int(a)) for r, n, a in items}:
                row = self._attempts.get(key)
                if row is not None and row.owner == owner and row.result is None:
                    row.lease_until = until
                    renewed += 1
        return renewed

    def finish_attempts(self, items: Sequence[tuple[str, int, int, str]]) -> None:
        """Keep the results of claimed attempts (see `JobStore.finish_attempts`)."""
        with self._claims:
            for run_id, node, attempt, result in items:
                row = self._attempts.get((run_id, int(node), int(attempt)))
                if row is not None and row.result is None:
                    row.result = str(result)
                    row.lease_until = None

    def close(self) -> None:
        """Nothing to release."""
