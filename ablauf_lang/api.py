"""The public API: read, compile, run, resume, retry and abort workflows."""

from __future__ import annotations

import asyncio
import signal as _signals
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

from ablauf_lang.codec.history import HistoryStep, RunHistory
from ablauf_lang.engine import job as _job
from ablauf_lang.engine.fork import ForkError, fork_point, graft
from ablauf_lang.engine.job import Job, preorder
from ablauf_lang.engine.kinds import Leaf, Node
from ablauf_lang.engine.nodes import Dispatch, Result, Status
from ablauf_lang.engine.replay import abort, check_replay, prepare_replay
from ablauf_lang.engine.states import states
from ablauf_lang.engine.waits import waits as run_waits
from ablauf_lang.errors import AblaufError, RunError, StoreError
from ablauf_lang.lang.compiler import with_breaks, with_deadline
from ablauf_lang.lang.forms import Form
from ablauf_lang.runners.clock import SYSTEM, Clock
from ablauf_lang.runners.local import (
    Action,
    Interrupted,
    LocalRunner,
    Run,
    abandoned_threads,
    critical,
    interruptible,
    registry,
    run_coroutine,
)
from ablauf_lang.stdlib import registry as _actions
from ablauf_lang.stores.backend import open_store
from ablauf_lang.stores.base import (
    DriverLease,
    JobStore,
    RunInfo,
    StoredRun,
    default_url,
    new_run_id,
    run_error,
    signal_name,
    waits_described,
)
from ablauf_lang.stores.memory import MemoryStore

__all__ = [
    # the embedding API (what ablauf_lang exports from here) and what the command line
    # and the REPL need besides: their one door to what lies below
    "Action",
    "Dispatch",
    "ForkError",
    "HistoryStep",
    "Interrupted",
    "Job",
    "JobStore",
    "Node",
    "Result",
    "Run",
    "RunHistory",
    "RunInfo",
    "Status",
    "StoredRun",
    "abandoned_threads",
    "abort_run",
    "check_worker_store",
    "compile",
    "default_url",
    "delete_run",
    "eval",
    "eval_async",
    "find_runs",
    "fork",
    "interruptible",
    "job_at",
    "list_runs",
    "load_actions",
    "load_run",
    "make_job",
    "new_run_id",
    "opened",
    "parse",
    "program_nodes",
    "prune_runs",
    "record_run",
    "requeue",
    "resolve_run_id",
    "restart_job",
    "resume",
    "resume_async",
    "retry",
    "retry_async",
    "run_at",
    "run_coroutine",
    "run_exists",
    "run_history",
    "serve_kafka",
    "serve_worker",
    "show_run",
    "signal",
    "submit",
    "submit_kafka",
    "unknown_actions",
    "used_actions",
    "wait",
    "wait_any",
    "wake_kafka",
    "with_breaks",
]

T = TypeVar("T")


def parse(source: str, filename: str | None = None) -> tuple[Form, ...]:
    """Read source text into forms (all top-level forms, positions kept)."""
    from ablauf_lang.lang.reader import read

    return read(source, filename)


def compile(
    source: str | Any, filename: str | None = None, *, file_imports: bool | None = None
) -> Node:
    """Compile source text (or read forms) into the lowered workflow tree.

    `file_imports=False` lets a program import only the standard library (`std/...`):
    for embedders that run programs they did not write. None: `lang.loader.FILE_IMPORTS`.
    """
    from ablauf_lang.lang.cache import compile_file_source
    from ablauf_lang.lang.compiler import compile_forms

    if isinstance(source, str):
        # A program from a file is read once: its tree is kept by content hash.
        return compile_file_source(source, filename, file_imports=file_imports)
    forms = source if isinstance(source, tuple) else (source,)  # Forms keeps its spans
    return compile_forms(forms, filename=filename, file_imports=file_imports)


def make_job(
    ast_or_source: Node | str,
    context: dict[str, Any] | None = None,
    filename: str | None = None,
    *,
    file_imports: bool | None = None,
) -> Job:
    """Create a job from a compiled tree or from source text."""
    if isinstance(ast_or_source, str):
        ast = compile(ast_or_source, filename, file_imports=file_imports)
    else:
        ast = ast_or_source
    return _job.make_job(ast, context)


def restart_job(
    job: Job, results: Any = (), now: float | None = None
) -> tuple[Job, list[Dispatch]]:
    """Apply results and return the updated job and the next dispatches (pure)."""
    return _job.restart_job(job, results, now)


def _own_store(store: str | JobStore | None) -> JobStore:
    """The store a run goes to (None: a memory store). A memory store this call opens is
    closed when it returns, so nobody reads its history: it keeps none."""
    backend = open_store("memory:" if store is None else store)
    if isinstance(backend, MemoryStore) and backend is not store:
        backend.keeps_history = False
    return backend


def _close_if_ours(store: JobStore, given: Any) -> None:
    if given is None or isinstance(given, str):
        store.close()


@contextmanager
def opened(store: str | JobStore | None = None) -> Iterator[JobStore]:
    """A store open for several calls (pass it as `store=`); closed at the end if opened here."""
    backend = open_store(store)
    try:
        yield backend
    finally:
        _close_if_ours(backend, store)


def _start(
    source: str | Node | Job,
    context: dict[str, Any] | None,
    filename: str | None,
    file_imports: bool | None = None,
    timeout: Any = None,
    breaks: Sequence[str] = (),
) -> Job:
    """The job `eval` runs: compiled from source, made from a tree, or a job as it is
    (a `timeout`: the program within a deadline, see `with_deadline`; `breaks`: parked
    before those actions, see `with_breaks`)."""
    if breaks:
        if isinstance(source, Job):
            raise AblaufError("breaks= applies to a program, not to a job already made")
        if isinstance(source, str):
            source = compile(source, filename, file_imports=file_imports)
        source = with_breaks(source, breaks)
    if timeout is not None:
        if isinstance(source, Job):
            raise AblaufError("timeout= applies to a program, not to a job already made")
        if isinstance(source, str):
            source = compile(source, filename, file_imports=file_imports)
        return make_job(with_deadline(source, timeout), context, filename)
    if isinstance(source, Job):
        if context is not None:
            raise AblaufError("a job carries its own context: pass context= to make_job instead")
        if source.inflight:
            raise AblaufError(
                f"this job has {source.inflight} action(s) in flight: feed their results "
                "with restart_job, or pass prepare_replay(job, retry_interrupted=True) "
                "to perform them again"
            )
        return source
    if not isinstance(source, str | Node):
        raise AblaufError(
            f"eval runs source text, a compiled tree or a job, not {type(source).__name__}"
        )
    return make_job(source, context, filename, file_imports=file_imports)


async def eval_async(
    source: str | Node | Job,
    actions: Mapping[str, Action] | None = None,
    context: dict[str, Any] | None = None,
    store: str | JobStore | None = None,
    run_id: str | None = None,
    filename: str | None = None,
    *,
    on_restart: Callable[[Job, list[Dispatch], list[Result]], None] | None = None,
    concurrency: int | None = None,
    on_start: Callable[[Dispatch, float], None] | None = None,
    file_imports: bool | None = None,
    clock: Clock | None = None,
    timeout: Any = None,
    detach: bool = False,
    breaks: Sequence[str] = (),
) -> Run:
    """Run a program to completion on the running event loop (see `eval`).

    `on_restart(job, dispatches, results)` after every restart and `on_start(dispatch,
    time)` when an action really begins (see `LocalRunner`)."""
    drive: dict[str, Any] = {
        "on_restart": on_restart,
        "concurrency": concurrency,
        "on_start": on_start,
        "clock": clock,
        "detach": detach,
    }
    backend = _own_store(store)
    try:
        if run_id is not None and backend.exists(run_id):
            # The same run id again: finish that run instead of starting a second one.
            with _leased(backend, run_id) as lease:
                stored = backend.load(run_id)
                if stored.job.done:
                    lease.finished = True
                    return Run(run_id, stored.job)
                job = prepare_replay(stored.job, now=(clock or SYSTEM).now())
                return lease.ended(await _drive(backend, run_id, job, actions, lease, **drive))
        text = source if isinstance(source, str) else None
        job = _start(source, context, filename, file_imports, timeout, breaks)
        run_id = backend.create_run(job, source=text, filename=filename, run_id=run_id)
        with _leased(backend, run_id) as lease:
            return lease.ended(await _drive(backend, run_id, job, actions, lease, **drive))
    finally:
        _close_if_ours(backend, store)


class _Lease:
    """The driver's lease of a run while this process drives it (a durable store only)."""

    def __init__(self, lease: DriverLease | None) -> None:
        self.lease = lease
        self.finished = False

    def ended(self, run: Run) -> Run:
        """The run came back from the runner: finished (or stopped) as it says."""
        self.finished = run.job.done
        return run

    def beat(self) -> None:
        if self.lease is not None:
            self.lease.beat()


@contextmanager
def _leased(store: JobStore, run_id: str, *, force: bool = False) -> Iterator[_Lease]:
    """Hold the run's lease while the block drives it: RunError at once when another live
    process holds it (unless `force`); released at the end (see `stores.base.DriverLease`)."""
    if not store.durable or not hasattr(store, "acquire_lease"):
        yield _Lease(None)
        return
    lease = DriverLease(store, run_id)
    held = _Lease(lease)
    acquired = False
    try:
        # An interrupt (Ctrl-C, SIGTERM under `interruptible`) waits for the lease writes:
        # a lease taken is always released, even by an interrupted driver.
        with critical():
            lease.acquire(force=force)
            acquired = True
        yield held
    finally:
        if acquired:
            with critical():
                lease.release(finished=held.finished)


async def _drive(
    store: JobStore,
    run_id: str,
    job: Job,
    actions: Any,
    lease: _Lease | None = None,
    on_restart: Any = None,
    concurrency: int | None = None,
    on_start: Any = None,
    clock: Clock | None = None,
    detach: bool = False,
) -> Run:
    if lease is not None and lease.lease is not None:
        hook, beat = on_restart, lease.beat

        def on_restart(job: Job, dispatches: list[Dispatch], results: list[Result]) -> None:
            beat()  # renew the lease when due (a heartbeat thread renews it too)
            if hook is not None:
                hook(job, dispatches, results)

    runner = LocalRunner(
        actions,
        store=store,
        run_id=run_id,
        on_restart=on_restart,
        concurrency=concurrency,
        on_start=on_start,
        clock=clock,
        detach=detach,
    )
    return Run(run_id, await runner.run(job))


def _sync(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coro.close()
        raise AblaufError(
            "ablauf_lang.eval was called inside a running event loop: "
            "await ablauf_lang.eval_async(...) instead"
        )
    return run_coroutine(coro)


def eval(
    source: str | Node | Job,
    actions: Mapping[str, Action] | None = None,
    context: dict[str, Any] | None = None,
    store: str | JobStore | None = None,
    run_id: str | None = None,
    filename: str | None = None,
    *,
    concurrency: int | None = None,
    file_imports: bool | None = None,
    clock: Clock | None = None,
    timeout: Any = None,
    detach: bool = False,
    breaks: Sequence[str] = (),
) -> Run:
    """Compile and run a program to completion; return its status, context and job.

    `source`: program text, a compiled tree (`compile`), or a job (`make_job`, or one
    stepped with `restart_job` that has no actions in flight).

    `store`: None (in memory), a URL such as "sqlite:///runs.db", or a store object; the
    job is recorded there after every restart. Passing the `run_id` of a run the store
    already has finishes that run (resuming it if needed) instead of starting another.

    `concurrency`: at most this many actions at once, sync and async alike (default 32).
    `file_imports=False`: the program may import only the standard library.

    `clock`: what the run reads the time from (a `VirtualClock` skips ahead when nothing
    runs before the next timer: thirty days of sleeps in milliseconds, for tests).
    `timeout`: a deadline for the whole run (seconds or a duration map): past it, what is
    in flight becomes `timeout` and the run fails. `detach=True`: return as soon as the run
    is parked (only waits left), status pending; a worker (`ablauf worker`) wakes it.
    `breaks`: action names the run parks before, as for an `await!!` of the signal
    `ablauf/break` (`ablauf run --break`; `signal(run_id, "ablauf/break")` lets one go on).
    """
    return _sync(
        eval_async(
            source,
            actions,
            context,
            store,
            run_id,
            filename,
            concurrency=concurrency,
            file_imports=file_imports,
            clock=clock,
            timeout=timeout,
            detach=detach,
            breaks=breaks,
        )
    )


async def resume_async(
    run_id: str,
    store: str | JobStore | None = None,
    actions: Mapping[str, Action] | None = None,
    *,
    force: bool = False,
    clock: Clock | None = None,
    detach: bool = False,
) -> Run:
    """Go on with an unfinished run after a crash (idempotent in-flight work runs again;
    a sleep or a retry's wait goes on with the time it had left).

    RunError when another live process drives the run, unless `force` (take it over)."""
    return await _replay(
        run_id, store, actions, force=force, retry=False, clock=clock, detach=detach
    )


def resume(
    run_id: str,
    store: str | JobStore | None = None,
    actions: Mapping[str, Action] | None = None,
    *,
    force: bool = False,
    clock: Clock | None = None,
    detach: bool = False,
) -> Run:
    """Go on with an unfinished run after a crash (see `prepare_replay`)."""
    return _sync(resume_async(run_id, store, actions, force=force, clock=clock, detach=detach))


async def retry_async(
    run_id: str,
    store: str | JobStore | None = None,
    actions: Mapping[str, Action] | None = None,
    *,
    force: bool = False,
) -> Run:
    """Run a failed (or abandoned) run's failed and interrupted steps again, and continue.

    RunError when another live process drives the run, unless `force` (take it over)."""
    return await _replay(run_id, store, actions, force=force, retry=True)


async def _replay(
    run_id: str,
    store: str | JobStore | None,
    actions: Mapping[str, Action] | None,
    *,
    force: bool,
    retry: bool,
    clock: Clock | None = None,
    detach: bool = False,
) -> Run:
    """Resume (`retry=False`) or retry a stored run here, holding its lease meanwhile."""
    now = (clock or SYSTEM).now()
    with opened(store) as backend, _leased(backend, run_id, force=force) as lease:
        job = backend.load(run_id).job
        lease.finished = job.done
        check_replay(run_id, job, retry=retry)
        job = prepare_replay(job, retry_interrupted=retry, now=now)
        lease.finished = False
        backend.record(run_id, job)
        return lease.ended(
            await _drive(backend, run_id, job, actions, lease, clock=clock, detach=detach)
        )


def retry(
    run_id: str,
    store: str | JobStore | None = None,
    actions: Mapping[str, Action] | None = None,
    *,
    force: bool = False,
) -> Run:
    """Run again what made a run fail (see `prepare_replay`), and continue."""
    return _sync(retry_async(run_id, store, actions, force=force))


def abort_run(run_id: str, store: str | JobStore | None = None, reason: str = "aborted") -> Run:
    """Abort a run: its pending steps fail with `reason` and nothing new starts."""
    with opened(store) as backend:
        stored = backend.load(run_id)
        if stored.job.done:
            raise RunError(f"run {run_id} already finished ({stored.job.status})")
        job = abort(stored.job, reason)
        backend.record(run_id, job)
        return Run(run_id, job)


# ---------------------------------------------------------------- operating many runs


def list_runs(
    store: str | JobStore | None = None,
    *,
    status: str | None = None,
    filename: str | None = None,
    since: float | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[RunInfo]:
    """Runs newest first, filtered (see `JobStore.list_runs`); `info.state` says pending,
    running, abandoned, success, failure, aborted or damaged."""
    with opened(store) as backend:
        return backend.list_runs(
            limit=limit, status=status, offset=offset, filename=filename, since=since
        )


def resolve_run_id(prefix: str, store: str | JobStore | None = None) -> str:
    """The full id of the one run whose id starts with `prefix` (RunError otherwise)."""
    with opened(store) as backend:
        return backend.resolve_run_id(prefix)


def delete_run(run_id: str, store: str | JobStore | None = None) -> None:
    """Delete a run and everything recorded of it (RunError while it is running)."""
    with opened(store) as backend:
        backend.delete_run(run_id)


def prune_runs(
    older_than: float,
    store: str | JobStore | None = None,
    *,
    status: str | None = None,
    dry_run: bool = False,
) -> tuple[list[str], list[str]]:
    """Delete the runs not updated for `older_than` seconds (only those with `status` when
    given); running runs are kept. Returns (ids deleted, ids kept because running)."""
    import time

    with opened(store) as backend:
        return backend.prune_runs(before=time.time() - older_than, status=status, dry_run=dry_run)


# ---------------------------------------------------------------- for the command line and the REPL


def run_exists(run_id: str, store: str | JobStore | None = None) -> bool:
    """Whether the store has a run `run_id` (a whole id)."""
    with opened(store) as backend:
        return backend.exists(run_id)


def load_run(run_id: str, store: str | JobStore | None = None) -> StoredRun:
    """A run as stored: its job, its summary (`info`) and its initial context."""
    with opened(store) as backend:
        return backend.load(run_id)


def run_history(run_id: str, store: str | JobStore | None = None) -> RunHistory:
    """Every write kept of a run, described (`codec.history.RunHistory`): the results
    each restart applied, the dispatches it made, the context it changed, when; and the
    job after any restart (`.job_at(n)`)."""
    with opened(store) as backend:
        return backend.history(run_id)


def job_at(run_id: str, restart: int, store: str | JobStore | None = None) -> Job:
    """The job of a run as it was after restart `restart` (RunError when out of range)."""
    return run_history(run_id, store).job_at(restart)


def run_at(run_id: str, restart: int, store: str | JobStore | None = None) -> StoredRun:
    """A run as it was after restart `restart`: its job then, its summary as it was (no
    driver, the status and error of then)."""
    with opened(store) as backend:
        stored = backend.load(run_id)
        history = backend.history(run_id)
    index = history.index_at(restart)
    job = history.job_after(index)
    info = replace(
        stored.info,
        status=job.status,
        updated=history.steps[index].updated,
        restarts=job.restarts,
        error=run_error(job),
        aborted=job.aborted,
        driver=None,
        damage=None,
        waiting=waits_described(run_waits(job)) if job.status is Status.PENDING else None,
    )
    return replace(stored, info=info, job=job)


def fork(
    run_id: str,
    at: int | None = None,
    *,
    program: str | None = None,
    filename: str | None = None,
    store: str | JobStore | None = None,
) -> str:
    """Record a new run whose state is run `run_id`'s after restart `at` (its latest
    without `at`); return its id. What was in flight then is handed back to be performed
    again. With `program` (an edit of the run's program) the part not started by then
    comes from the edit; ForkError names the first started node the edit changes.

    The new run records its parent and the restart; it is not driven: `resume` (or
    `ablauf runs resume ID`, or workers) takes it on from there."""
    with opened(store) as backend:
        stored = backend.load(run_id)
        history = backend.history(run_id)
        step = history.restarts[1] if at is None else int(at)
        job = history.job_at(step)
        source, name = stored.source, stored.info.filename
        if program is not None:
            job = graft(job, make_job(compile(program, filename)).root)
            source, name = program, filename or name
        if fork_point(job).done:
            raise RunError(
                f"run {run_id} had finished ({job.status}) by restart {step}: a fork of it "
                "has nothing to do (fork at an earlier restart)"
            )
        return record_run(
            job, source=source, filename=name, parent=run_id, parent_step=step, store=backend
        )


def record_run(
    job: Job,
    *,
    source: str | None = None,
    filename: str | None = None,
    parent: str | None = None,
    parent_step: int | None = None,
    store: str | JobStore | None = None,
) -> str:
    """Record `job` as a new run, ready to go on; return its id. What is in flight in it
    is handed back to be performed again (as `fork` does); `parent` and `parent_step`
    name the run and restart it was forked from (the REPL's `:fork`). RunError for a
    job that has finished: a run of it would have nothing to do."""
    ready = fork_point(job)
    if ready.done:
        raise RunError(f"the job has finished ({job.status}): a run of it has nothing to do")
    with opened(store) as backend:
        return backend.create_run(
            ready,
            source=source,
            filename=filename,
            parent=parent,
            parent_step=parent_step,
        )


def signal(run_id: str, name: str, value: Any = None, store: str | JobStore | None = None) -> int:
    """Send signal `name` (with `value`, any storable value) to a run; return its number
    in the run's mailbox. The run's first `(await!! :name)` not yet given a signal takes
    it, now or when it gets there: each signal is delivered once, in order of arrival.

    RunError when the run does not exist or has finished; AblaufError when the value
    cannot be stored. On PostgreSQL the workers serving the run are woken at once."""
    with opened(store) as backend:
        seq = backend.send_signal(run_id, name, value)
        if getattr(getattr(backend, "dialect", None), "name", None) == "postgresql":
            from ablauf_lang.queue import wake_awaits
            from ablauf_lang.stores.postgres import PostgresStore

            if isinstance(backend, PostgresStore):
                wake_awaits(backend, run_id, signal_name(name))
        return seq


def find_runs(
    store: str | JobStore | None = None,
    *,
    state: str | None = None,
    filename: str | None = None,
    since: float | None = None,
    limit: int | None = None,
    offset: int = 0,
    waiting: bool = False,
    forks_of: str | None = None,
) -> tuple[list[RunInfo], int]:
    """A page of runs newest first in `state` (any `RunInfo.state`: pending, running,
    abandoned, success, failure, aborted, damaged), and how many there are in all;
    `waiting`: only runs that wait for something (a sleep, a signal, a retry's wait);
    `forks_of`: only runs forked from that run."""
    status = state if state in ("pending", "success", "failure") else None
    if state in ("running", "abandoned"):
        status = "pending"
    elif state == "aborted":
        status = "failure"
    chosen: dict[str, Any] = {"status": status, "filename": filename, "since": since}
    if waiting:
        chosen["waiting"] = True
    if forks_of is not None:
        chosen["forks_of"] = forks_of
    with opened(store) as backend:
        if state in (None, "pending", "success", "failure"):  # what the store keeps
            infos = backend.list_runs(limit=limit, offset=offset, **chosen)
            return infos, backend.count_runs(**chosen)
        # a state the store does not keep: sorted out here
        every = [i for i in backend.list_runs(**chosen) if i.state == state]
    end = None if limit is None else offset + limit
    return every[offset:end], len(every)


def show_run(stored: StoredRun) -> dict[str, Any]:
    """A stored run as JSON-able data (`ablauf runs show --json`): its summary, status,
    contexts and every node in pre-order with its display state (a branch that never ran
    says `skipped`)."""
    data = stored.info.to_dict()
    job = stored.job
    data["status"] = str(job.status)
    data["context"] = job.context
    data["initial_context"] = stored.initial_context
    shown = states(job.root)
    data["nodes"] = [_node_view(n, shown[n.id]) for n in job.nodes()]
    found = run_waits(job) if job.status is Status.PENDING else []
    data["waits"] = [w.to_dict() | {"text": w.describe()} for w in found]
    return data


def _node_view(n: Node, state: str) -> dict[str, Any]:
    data: dict[str, Any] = {"id": n.id, "kind": n.kind, "state": state, "children": _children(n)}
    if isinstance(n, Leaf):
        data.update(
            action=n.action,
            # the payload as written (an expression kept as its source) and, for one
            # computed at run time, the value that was sent
            payload=n.payload,
            sent=n.sent,
            output=n.output,
            error=n.error,
            attempt=n.attempt,
            dispatched_at=n.dispatched_at,
            started_at=n.started_at,
            finished_at=n.finished_at,
            wake=n.wake,
            # the earlier attempts ({attempt, state, error, started_at, finished_at}); the
            # current one is the leaf's own fields
            attempts=[dict(a) for a in n.attempts],
        )
    return data


def program_nodes(root: Node) -> list[dict[str, Any]]:
    """A compiled program's nodes in pre-order as JSON-able data (`ablauf check --tree
    --json`); a template (doseq!!, pmap!!) is nested as its own list of nodes."""
    out: list[dict[str, Any]] = []
    for node in preorder(root):
        data: dict[str, Any] = {"id": node.id, "kind": node.kind}
        if isinstance(node, Leaf):
            data.update(action=node.action, payload=node.payload, idempotent=node.idempotent)
        for attr in ("test", "var", "coll"):
            if hasattr(node, attr):
                data[attr] = getattr(node, attr)
        data["children"] = _children(node)
        template = getattr(node, "template", None)
        if template is not None:
            data["template"] = program_nodes(template)
        out.append(data)
    return out


def _children(node: Node) -> list[int]:
    return [c.id for c in getattr(node, "children", ())]


def load_actions(spec: str | None) -> dict[str, Action] | None:
    """The actions of `--actions MODULE` (a dotted name or a .py path); None when not given."""
    return None if spec is None else _actions.load_actions(spec)


def used_actions(root: Node) -> list[str]:
    """The actions a compiled program names (templates included), in the order of first use."""
    return list(_actions.used_actions(root))


def unknown_actions(
    root: Node,
    actions: Mapping[str, Action] | None,
    spec: str | None,
    *,
    filename: str | None = None,
    source: str | None = None,
) -> list[AblaufError]:
    """One located error per action a compiled program names that neither `actions` (from
    the module `spec`) nor the standard library defines."""
    known = registry(actions)
    return _actions.unknown_action_errors(root, known, spec, filename=filename, source=source)


# ---------------------------------------------------------------- distributed (PostgreSQL)
# The worker module is imported inside these functions: psycopg is loaded only when
# workers are used (`ablauf run` on SQLite never loads it).


@contextmanager
def _distributed() -> Iterator[None]:
    try:
        yield
    except ImportError as exc:
        raise StoreError(f"distributed execution is not available: {exc}") from None


def is_shared_store(store: str) -> bool:
    """True for a PostgreSQL URL (workers on many hosts); False for a one-host store."""
    return store.split(":", 1)[0].lower() in ("postgresql", "postgres")


def check_worker_store(store: str, *, one_host: bool = False) -> None:
    """StoreError unless `store` names a PostgreSQL database (or, with `one_host`, a
    SQLite file: the one-host worker that wakes its parked runs)."""
    if one_host and store.split(":", 1)[0].lower() == "sqlite":
        return
    with _distributed():
        from ablauf_lang.runners import worker
    worker.check_url(store)


def submit(
    source: str,
    store: str,
    *,
    context: dict[str, Any] | None = None,
    filename: str | None = None,
    breaks: Sequence[str] = (),
) -> str:
    """Record a program as a new run queued for the workers of a PostgreSQL store; its id.
    `breaks`: actions the run parks before (`ablauf submit --break`)."""
    with _distributed():
        from ablauf_lang.runners import worker
    return worker.submit(source, store, context=context, filename=filename, breaks=breaks)


def wait(run_id: str, store: str, timeout: float | None = None) -> Run:
    """The run once the workers have finished it (or as it is after `timeout` seconds)."""
    with _distributed():
        from ablauf_lang.runners import worker
    return worker.wait(run_id, store, timeout)


def requeue(run_id: str, store: str, *, retry: bool = False) -> str:
    """Hand a run back to the workers: resume it, or with `retry` run its failed steps again."""
    with _distributed():
        from ablauf_lang.runners import worker
    return worker.requeue(run_id, store, retry=retry)


def serve_worker(
    store: str,
    actions: Mapping[str, Action],
    *,
    concurrency: int,
    lease: float,
    poll: float,
) -> None:
    """Perform the runs of a PostgreSQL store in this process until SIGTERM or Ctrl-C
    (`lease`, `poll`: seconds, see `runners.worker.run_worker`). On a SQLite store: wake
    its parked runs when their timers fall due or their signals arrive (one host; see
    `runners.sleeper`), looking at the store at least every `poll` seconds (at most 1)."""
    if not is_shared_store(store):
        _serve_one_host(store, actions, concurrency=concurrency, poll=min(poll, 1.0))
        return
    with _distributed():
        from ablauf_lang.runners import worker
    worker.run_worker(store, actions, concurrency, lease=lease, poll=poll)


def _serve_one_host(
    store: str, actions: Mapping[str, Action], *, concurrency: int, poll: float
) -> None:
    from ablauf_lang.runners import sleeper

    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = _signals.signal(_signals.SIGTERM, lambda *_: stop.set())
    try:
        with opened(store) as backend:
            sleeper.serve(backend, actions, stop=stop, poll=poll, concurrency=concurrency)
    finally:
        if previous is not None:
            _signals.signal(_signals.SIGTERM, previous)


# ---------------------------------------------------------------- Kafka (issue 14)
# The Kafka runner (`ablauf_lang.kafka`) is imported only here, inside the functions: a
# program that never names Kafka never loads it, nor the client library.


def kafka_settings(
    bootstrap: str,
    *,
    prefix: str | None = None,
    options: Mapping[str, Any] | None = None,
    session_timeout: float | None = None,
) -> Any:
    """The settings of the Kafka runner: the broker, the topic prefix, librdkafka options."""
    from ablauf_lang.kafka.runs import settings_from

    return settings_from(bootstrap, prefix=prefix, options=options, session_timeout=session_timeout)


def _kafka(kafka: Any) -> Any:
    return kafka_settings(kafka) if isinstance(kafka, str) else kafka


def submit_kafka(
    source: str,
    store: str | JobStore | None,
    kafka: Any,
    *,
    context: dict[str, Any] | None = None,
    filename: str | None = None,
    run_id: str | None = None,
    breaks: Sequence[str] = (),
) -> str:
    """Record a program as a new run and start it on the Kafka workers; its id at once.

    `kafka`: "HOST:PORT" or `kafka_settings(...)`. AblaufError (one line) for a bad
    program, an unreachable broker, or actions no worker serves yet (their topics do not
    exist: start the action workers first). `breaks`: see `eval`."""
    from ablauf_lang.kafka import runs

    settings = _kafka(kafka)
    root = with_breaks(compile(source, filename), breaks)
    runs.check_served(settings, used_actions(root))
    job = _job.make_job(root, context)
    with opened(store) as backend:
        return runs.submit(settings, backend, job, source=source, filename=filename, run_id=run_id)


def wake_kafka(
    run_id: str, store: str | JobStore | None, kafka: Any, *, retry: bool = False
) -> str:
    """Hand a run back to the Kafka workers: resume it (its restarter reads it again and
    dispatches what is in flight, the same attempts: nothing runs twice), or with `retry`
    first make its failed steps ready to run again (`prepare_replay`). Returns the run id.
    RunError when there is nothing to do (by the rules of `resume` and `retry`)."""
    from ablauf_lang.kafka import runs

    settings = _kafka(kafka)
    with opened(store) as backend:
        job = backend.load(run_id).job
        check_replay(run_id, job, retry=retry)
        if retry:
            backend.record(run_id, prepare_replay(job, retry_interrupted=True))
    runs.wake(settings, run_id)
    return run_id


def wait_any(run_id: str, store: str, timeout: float | None = None, poll: float = 0.2) -> Run:
    """The run once it is done, on any store (PostgreSQL: woken by NOTIFY; others: looked
    at every `poll` seconds), or as it is after `timeout` seconds."""
    if is_shared_store(store):
        return wait(run_id, store, timeout)
    import time

    ends = None if timeout is None else time.monotonic() + timeout
    with opened(store) as backend:
        while backend.info(run_id).status is Status.PENDING:
            if ends is not None and time.monotonic() >= ends:
                break
            time.sleep(poll)
        return Run(run_id, backend.load(run_id).job)


def serve_kafka(
    kafka: Any,
    store: str,
    *,
    role: str,
    actions: Mapping[str, Action] | None = None,
    only: list[str] | None = None,
    concurrency: int = 4,
    lease: float = 30.0,
    poll: float = 1.0,
    stop: threading.Event | None = None,
) -> None:
    """Serve a Kafka role until SIGTERM or Ctrl-C (or `stop`): "restarter" (restart runs,
    record them in `store`, dispatch), "actions" (perform dispatches; a non-idempotent
    one is claimed in `store` first) or "all" (both). An unreachable broker is tried
    again with backoff, logged."""
    from ablauf_lang.kafka import runs

    runs.serve(
        _kafka(kafka),
        lambda: open_store(store),
        role=role,
        actions=actions,
        only=only,
        concurrency=concurrency,
        lease=lease,
        poll=poll,
        stop=stop,
    )
