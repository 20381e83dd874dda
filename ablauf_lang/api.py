"""The public API: read, compile, run, resume, retry and abort workflows."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ablauf_lang.engine import job as _job
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.nodes import Dispatch, Node, Result, Status
from ablauf_lang.errors import AblaufError, RunError
from ablauf_lang.lang.forms import Form
from ablauf_lang.runners.local import Action, LocalRunner, Run, critical
from ablauf_lang.stores.base import DriverLease, JobStore, RunInfo, open_store


def parse(source: str, filename: str | None = None) -> tuple[Form, ...]:
    """Read source text into forms (all top-level forms, positions kept)."""
    from ablauf_lang.lang.reader import read

    return read(source, filename)


def compile(
    source: str | Any, filename: str | None = None, *, file_imports: bool | None = None
) -> Node:
    """Compile source text (or read forms) into the lowered workflow tree.

    `file_imports=False` lets a program import only the standard library (`std/...`):
    for embedders that run programs they did not write. None: `compiler.FILE_IMPORTS`.
    """
    from ablauf_lang.lang.compiler import compile_forms, compile_source

    if isinstance(source, str):
        return compile_source(source, filename, file_imports=file_imports)
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


def _close_if_ours(store: JobStore, given: Any) -> None:
    if given is None or isinstance(given, str):
        store.close()


def _start(
    source: str | Node | Job,
    context: dict[str, Any] | None,
    filename: str | None,
    file_imports: bool | None = None,
) -> Job:
    """The job `eval` runs: compiled from source, made from a tree, or a job as it is."""
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
) -> Run:
    """Run a program to completion on the running event loop (see `eval`).

    `on_restart(job, dispatches, results)` after every restart and `on_start(dispatch,
    time)` when an action really begins (see `LocalRunner`)."""
    drive: dict[str, Any] = {
        "on_restart": on_restart,
        "concurrency": concurrency,
        "on_start": on_start,
    }
    backend = open_store("memory:" if store is None else store)
    try:
        if run_id is not None and backend.exists(run_id):
            # The same run id again: finish that run instead of starting a second one.
            with _leased(backend, run_id) as lease:
                stored = backend.load(run_id)
                if stored.job.done:
                    lease.finished = True
                    return Run(run_id, stored.job)
                job = _job.prepare_replay(stored.job)
                return lease.ended(await _drive(backend, run_id, job, actions, lease, **drive))
        job = _start(source, context, filename, file_imports)
        text = source if isinstance(source, str) else None
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
    )
    return Run(run_id, await runner.run(job))


def _sync(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise AblaufError(
        "ablauf_lang.eval was called inside a running event loop: "
        "await ablauf_lang.eval_async(...) instead"
    )


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
) -> Run:
    """Compile and run a program to completion; return its status, context and job.

    `source`: program text, a compiled tree (`compile`), or a job (`make_job`, or one
    stepped with `restart_job` that has no actions in flight).

    `store`: None (in memory), a URL such as "sqlite:///runs.db", or a store object; the
    job is recorded there after every restart. Passing the `run_id` of a run the store
    already has finishes that run (resuming it if needed) instead of starting another.

    `concurrency`: at most this many actions at once, sync and async alike (default 32).
    `file_imports=False`: the program may import only the standard library.
    """
    return _sync(  # type: ignore[no-any-return]
        eval_async(
            source,
            actions,
            context,
            store,
            run_id,
            filename,
            concurrency=concurrency,
            file_imports=file_imports,
        )
    )


async def resume_async(
    run_id: str,
    store: str | JobStore | None = None,
    actions: Mapping[str, Action] | None = None,
    *,
    force: bool = False,
) -> Run:
    """Go on with an unfinished run after a crash (idempotent in-flight work runs again).

    RunError when another live process drives the run, unless `force` (take it over)."""
    backend = open_store(store)
    try:
        with _leased(backend, run_id, force=force) as lease:
            stored = backend.load(run_id)
            if stored.job.done:
                lease.finished = True
                raise RunError(
                    f"run {run_id} already finished ({stored.job.status}); "
                    "use retry to run its failed steps again"
                )
            job = _job.prepare_replay(stored.job)
            backend.record(run_id, job)
            return lease.ended(await _drive(backend, run_id, job, actions, lease))
    finally:
        _close_if_ours(backend, store)


def resume(
    run_id: str,
    store: str | JobStore | None = None,
    actions: Mapping[str, Action] | None = None,
    *,
    force: bool = False,
) -> Run:
    """Go on with an unfinished run after a crash (see `prepare_replay`)."""
    return _sync(resume_async(run_id, store, actions, force=force))  # type: ignore[no-any-return]


async def retry_async(
    run_id: str,
    store: str | JobStore | None = None,
    actions: Mapping[str, Action] | None = None,
    *,
    force: bool = False,
) -> Run:
    """Run a failed (or abandoned) run's failed and interrupted steps again, and continue.

    RunError when another live process drives the run, unless `force` (take it over)."""
    backend = open_store(store)
    try:
        with _leased(backend, run_id, force=force) as lease:
            stored = backend.load(run_id)
            job = stored.job
            lease.finished = job.done
            if job.status is Status.SUCCESS:
                raise RunError(f"run {run_id} succeeded: nothing to retry")
            if not _job.can_retry(job):
                raise RunError(f"run {run_id} has nothing to retry")
            job = _job.prepare_replay(job, retry_interrupted=True)
            lease.finished = False
            backend.record(run_id, job)
            return lease.ended(await _drive(backend, run_id, job, actions, lease))
    finally:
        _close_if_ours(backend, store)


def retry(
    run_id: str,
    store: str | JobStore | None = None,
    actions: Mapping[str, Action] | None = None,
    *,
    force: bool = False,
) -> Run:
    """Run again what made a run fail (see `prepare_replay`), and continue."""
    return _sync(retry_async(run_id, store, actions, force=force))  # type: ignore[no-any-return]


def abort_run(run_id: str, store: str | JobStore | None = None, reason: str = "aborted") -> Run:
    """Abort a run: its pending steps fail with `reason` and nothing new starts."""
    backend = open_store(store)
    try:
        stored = backend.load(run_id)
        if stored.job.done:
            raise RunError(f"run {run_id} already finished ({stored.job.status})")
        job = _job.abort(stored.job, reason)
        backend.record(run_id, job)
        return Run(run_id, job)
    finally:
        _close_if_ours(backend, store)


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
    backend = open_store(store)
    try:
        return backend.list_runs(
            limit=limit, status=status, offset=offset, filename=filename, since=since
        )
    finally:
        _close_if_ours(backend, store)


def resolve_run_id(prefix: str, store: str | JobStore | None = None) -> str:
    """The full id of the one run whose id starts with `prefix` (RunError otherwise)."""
    backend = open_store(store)
    try:
        return backend.resolve_run_id(prefix)
    finally:
        _close_if_ours(backend, store)


def delete_run(run_id: str, store: str | JobStore | None = None) -> None:
    """Delete a run and everything recorded of it (RunError while it is running)."""
    backend = open_store(store)
    try:
        backend.delete_run(run_id)
    finally:
        _close_if_ours(backend, store)


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

    backend = open_store(store)
    try:
        return backend.prune_runs(before=time.time() - older_than, status=status, dry_run=dry_run)
    finally:
        _close_if_ours(backend, store)
