"""The in-process runner: restart, persist, perform the dispatches with asyncio, repeat.

Async actions run as tasks; blocking sync actions run in worker threads so they overlap
too. When a restart yields a single dispatch and nothing else is in flight, the action is
called directly (a thread or a task would only add latency: nothing could overlap it).
Every action exception becomes a failure result naming its type and message: nothing
escapes. The job is recorded after every restart, before its dispatches are launched.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ablauf_lang import serde
from ablauf_lang.errors import AblaufError, InternalError
from ablauf_lang.job import Job, restart_job
from ablauf_lang.nodes import Dispatch, Result, Status, failure, success
from ablauf_lang.stdlib.actions import STDLIB_ACTIONS, ActionFailed
from ablauf_lang.stores.base import JobStore


@dataclass(frozen=True, slots=True)
class Run:
    """A run as `eval` or `wait` leaves it: status, final context and job, and the run's id."""

    run_id: str
    job: Job

    @property
    def status(self) -> Status:
        return self.job.status

    @property
    def context(self) -> dict[str, Any]:
        return self.job.context

    def to_dict(self) -> dict[str, Any]:
        """`{"run_id", "status", "context"}`, as `ablauf run --json` prints it."""
        return {"run_id": self.run_id, "status": str(self.status), "context": self.context}


Action = Callable[[Any, Any], Any]


def registry(actions: Mapping[str, Action] | None = None) -> dict[str, Action]:
    """The standard library's actions, then the user's (which may override them)."""
    out: dict[str, Action] = dict(STDLIB_ACTIONS)
    for name, fn in (actions or {}).items():
        if not callable(fn):
            raise AblaufError(f"action {name!r} is not callable: {fn!r:.60}")
        out[str(name).lstrip(":")] = fn
    return out


def error_text(exc: BaseException) -> Any:
    """The error a leaf records for an exception: `Type: message` (or ActionFailed's data)."""
    if isinstance(exc, ActionFailed):
        return exc.error
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _finish(dispatch: Dispatch, output: Any, started: float, durable: bool) -> Result:
    if durable:
        try:
            serde.encode_value(output)
        except AblaufError as exc:
            return failure(
                dispatch,
                f"output of {dispatch.action} cannot be stored: {exc.message}",
                started_at=started,
                finished_at=time.time(),
            )
    return success(dispatch, output, started_at=started, finished_at=time.time())


def _failed(dispatch: Dispatch, exc: BaseException, started: float) -> Result:
    return failure(dispatch, error_text(exc), started_at=started, finished_at=time.time())


def _unknown(dispatch: Dispatch) -> Result:
    now = time.time()
    return failure(
        dispatch,
        f"unknown action {dispatch.action!r}: no action of that name is registered",
        started_at=now,
        finished_at=now,
    )


def perform_sync(dispatch: Dispatch, fn: Action | None, durable: bool) -> Result:
    """Call a sync action here and now; never raises for the action's own errors."""
    if fn is None:
        return _unknown(dispatch)
    started = time.time()
    try:
        output = fn(dispatch.payload, dispatch.context)
        if inspect.isawaitable(output):
            raise TypeError("a sync action returned an awaitable; declare it `async def`")
    except Exception as exc:
        return _failed(dispatch, exc, started)
    return _finish(dispatch, output, started, durable)


async def perform(dispatch: Dispatch, fn: Action | None, durable: bool) -> Result:
    """Perform one dispatch: async actions awaited, sync ones in a worker thread."""
    if fn is None:
        return _unknown(dispatch)
    started = time.time()
    try:
        if inspect.iscoroutinefunction(fn):
            output = await fn(dispatch.payload, dispatch.context)
        else:
            output = await asyncio.to_thread(fn, dispatch.payload, dispatch.context)
            if inspect.isawaitable(output):
                output = await output
    except Exception as exc:
        return _failed(dispatch, exc, started)
    return _finish(dispatch, output, started, durable)


class LocalRunner:
    """Drive one job to completion in this process."""

    def __init__(
        self,
        actions: Mapping[str, Action] | None = None,
        *,
        store: JobStore | None = None,
        run_id: str | None = None,
        on_restart: Callable[[Job, list[Dispatch], list[Result]], None] | None = None,
        inline: bool = True,
    ) -> None:
        self.actions = registry(actions)
        self.store = store
        self.run_id = run_id
        self.on_restart = on_restart
        self.inline = inline
        self.durable = bool(store is not None and store.durable)

    def _restart(self, job: Job, results: list[Result]) -> tuple[Job, list[Dispatch]]:
        job, dispatches = restart_job(job, results, time.time())
        if self.store is not None and self.run_id is not None:
            self.store.record(self.run_id, job)  # persisted before anything is launched
        if self.on_restart is not None:
            self.on_restart(job, dispatches, results)
        return job, dispatches

    async def run(self, job: Job) -> Job:
        """Restart until the job is done; return the final job."""
        actions = self.actions
        job, dispatches = self._restart(job, [])
        tasks: dict[asyncio.Task[Result], int] = {}
        try:
            while True:
                if (
                    self.inline
                    and len(dispatches) == 1
                    and not tasks
                    and not inspect.iscoroutinefunction(actions.get(dispatches[0].action))
                ):
                    # Nothing could overlap this action: call it directly.
                    d = dispatches[0]
                    result = perform_sync(d, actions.get(d.action), self.durable)
                    job, dispatches = self._restart(job, [result])
                    continue
                for d in dispatches:
                    task = asyncio.ensure_future(perform(d, actions.get(d.action), self.durable))
                    tasks[task] = d.id
                if not tasks:
                    if not job.done:
                        raise InternalError(
                            f"job stuck: not done, nothing in flight (status {job.status})"
                        )
                    return job
                finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                results = []
                for task in finished:
                    del tasks[task]
                    results.append(task.result())
                job, dispatches = self._restart(job, results)
        finally:
            for task in tasks:
                task.cancel()
