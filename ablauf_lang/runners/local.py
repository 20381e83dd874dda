"""The in-process runner: restart, persist, perform the dispatches with asyncio, repeat.

Async actions run as tasks; blocking sync actions run in daemon threads (`ActionThreads`)
so they overlap too. At most `concurrency` actions run at once (sync and async alike); the
others wait their turn in dispatch order, and an action's recorded start is when it really
began, not when it was dispatched. When a restart yields a single dispatch and nothing else
is in flight, a sync action is called directly (a thread would only add latency: nothing
could overlap it). Every exception an action raises (`SystemExit` included) becomes a
failure result naming its type and message: nothing escapes. The job is recorded after
every restart, before its dispatches are launched.

Interrupts: within `interruptible()`, SIGINT and SIGTERM raise `Interrupted` in the main
thread, except while a store write is under way (`critical()`): then it is raised as soon
as the write is done. The run is left as recorded, its in-flight actions pending; threads
performing sync actions are abandoned (daemon threads never keep the process alive), and
nothing is performed again without a resume or a retry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from ablauf_lang import values
from ablauf_lang.engine.job import Job, restart_job
from ablauf_lang.engine.nodes import FAILED_STATES, Dispatch, Result, Status, failure, success
from ablauf_lang.errors import AblaufError, InternalError
from ablauf_lang.stdlib.actions import STDLIB_ACTIONS, ActionFailed
from ablauf_lang.stores.base import JobStore

__all__ = [
    "DEFAULT_CONCURRENCY",
    "Action",
    "ActionThreads",
    "Interrupted",
    "LocalRunner",
    "Run",
    "abandoned_threads",
    "checkpoint",
    "critical",
    "guarding",
    "interruptible",
    "keep_awake",
    "perform",
    "perform_sync",
    "registry",
]

# Actions performed at the same time by one run when nothing else is said (`--concurrency`).
DEFAULT_CONCURRENCY = 32


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

    def failed_steps(self) -> list[dict[str, Any]]:
        """The actions that failed (a failure a rescue handled included), in tree order."""
        return [
            {"id": leaf.id, "action": leaf.action, "state": str(leaf.result), "error": leaf.error}
            for leaf in self.job.leaves()
            if leaf.result in FAILED_STATES
        ]

    def to_dict(self) -> dict[str, Any]:
        """`{"run_id", "status", "context"}`, as `ablauf run --json` prints it.

        When steps failed (even ones a rescue handled), `"failed"` lists them as
        `{"id", "action", "state", "error"}`, as the text output does.
        """
        data: dict[str, Any] = {
            "run_id": self.run_id,
            "status": str(self.status),
            "context": self.context,
        }
        failed = self.failed_steps()
        if failed:
            data["failed"] = failed
        return data


Action = Callable[[Any, Any], Any]
OnStart = Callable[[Dispatch, float], None]


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


# ---------------------------------------------------------------- interrupts


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a run was driven (see `interruptible`)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class _Guard:
    """The state of `interruptible` (main thread only)."""

    def __init__(self) -> None:
        self.depth = 0  # nested critical() blocks
        self.pending: int | None = None  # a signal that arrived inside one
        self.fired = False  # the first signal was delivered (or is pending)
        self.signum = 0  # which one
        self.active = False
        self.on_second: Callable[[int], None] | None = None


_GUARD = _Guard()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def critical() -> Iterator[None]:
    """A block an interrupt must not cut short (a store write): it is raised after it."""
    guard = _GUARD
    if not (guard.active and _in_main_thread()):
        yield
        return
    guard.depth += 1
    try:
        yield
    finally:
        guard.depth -= 1
        if guard.depth == 0 and guard.pending is not None:
            signum, guard.pending = guard.pending, None
            raise Interrupted(signum)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    guard = _GUARD
    if guard.fired:
        if guard.on_second is not None:
            guard.on_second(signum)
        return  # shutting down already: a second signal is not a new exception
    guard.fired, guard.signum = True, signum
    if guard.depth:
        guard.pending = signum
        return
    # Raised wherever the main thread is. Where Python cannot raise it (a weakref callback,
    # a __del__) it is lost: `checkpoint()` raises it again at the runner's next step.
    raise Interrupted(signum)


def checkpoint() -> None:
    """Raise `Interrupted` if a signal arrived and was not raised yet (or was swallowed)."""
    guard = _GUARD
    if guard.active and guard.fired and guard.depth == 0 and _in_main_thread():
        guard.pending = None
        raise Interrupted(guard.signum)


@contextmanager
def interruptible(
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
    on_second: Callable[[int], None] | None = None,
) -> Iterator[None]:
    """Within the block, the first of `signals` raises `Interrupted` in the main thread.

    A signal arriving inside `critical()` is raised when that block ends. Later signals
    call `on_second(signum)` (a caller that must leave at once exits there) and are
    otherwise ignored, so that the cleanup after the first one is not cut short. Outside
    the main thread this does nothing.
    """
    if not _in_main_thread() or _GUARD.active:
        yield
        return
    guard = _GUARD
    guard.depth, guard.pending, guard.fired, guard.signum = 0, None, False, 0
    guard.on_second, guard.active = on_second, True
    old = {s: signal.signal(s, _on_signal) for s in signals}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        guard.active, guard.on_second, guard.pending = False, None, None


async def keep_awake(seconds: float = 0.1) -> None:
    """Wake the event loop now and then, so that a signal delivered to another thread
    reaches its Python handler (run by the main thread) without waiting for an event, and
    raise an interrupt that was swallowed on its way (see `checkpoint`)."""
    while True:
        await asyncio.sleep(seconds)
        checkpoint()


def guarding() -> bool:
    """True within `interruptible()` in the main thread."""
    return _GUARD.active and _in_main_thread()


# ---------------------------------------------------------------- threads for sync actions

_Work = tuple["concurrent.futures.Future[Any]", Callable[[], Any]]
_busy_lock = threading.Lock()
_busy = 0  # action threads running an action now, over every pool


def abandoned_threads() -> int:
    """How many action threads are still running an action (after an interrupt: abandoned)."""
    return _busy


class ActionThreads:
    """At most `size` blocking calls at once, each in a daemon thread.

    Daemon threads: an action abandoned by an interrupt never keeps the process alive (the
    standard executors' threads are joined at exit). Threads start when needed, wait for
    more work, and end at `close()`. A call cancelled before it started never runs.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise AblaufError(f"concurrency must be at least 1, got {size}")
        self.size = size
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn()` in one of the threads; its future holds the value or the exception."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise InternalError("ActionThreads used after close()")
            self._queue.put((future, fn))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._work, name=f"ablauf-action-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        global _busy
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn = item
            if future.set_running_or_notify_cancel():
                with _busy_lock:
                    _busy += 1
                try:
                    future.set_result(fn())
                except BaseException as exc:  # the caller decides what an exception means
                    future.set_exception(exc)
                finally:
                    with _busy_lock:
                        _busy -= 1
            self._idle.release()

    def close(self) -> None:
        """Let the threads end once they are idle (a running action is not waited for)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)


# ---------------------------------------------------------------- performing one dispatch


def _finish(dispatch: Dispatch, output: Any, started: float, durable: bool) -> Result:
    if durable:
        try:
            values.encode(output)
        except AblaufError as exc:
            return failure(
                dispatch,
                f"output of {dispatch.action} cannot be stored: {exc.message}",
                started_at=started,
                finished_at=time.time(),
            )
        except RecursionError:
            return failure(
                dispatch,
                f"output of {dispatch.action} cannot be stored: nested too deeply",
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


def _started(dispatch: Dispatch, on_start: OnStart | None) -> float:
    started = time.time()
    if on_start is not None:
        on_start(dispatch, started)
    return started


def perform_sync(
    dispatch: Dispatch, fn: Action | None, durable: bool, on_start: OnStart | None = None
) -> Result:
    """Call a sync action here and now; never raises for the action's own errors.

    A KeyboardInterrupt is not the action's error (in the main thread it is a signal):
    it goes through.
    """
    if fn is None:
        return _unknown(dispatch)
    started = _started(dispatch, on_start)
    try:
        output = fn(dispatch.payload, dispatch.context)
        if inspect.isawaitable(output):
            close = getattr(output, "close", None)
            if close is not None:
                close()
            raise TypeError("a sync action returned an awaitable; declare it `async def`")
    except (Exception, SystemExit) as exc:
        return _failed(dispatch, exc, started)
    return _finish(dispatch, output, started, durable)


async def perform(
    dispatch: Dispatch,
    fn: Action | None,
    durable: bool,
    *,
    threads: ActionThreads | None = None,
    on_start: OnStart | None = None,
) -> Result:
    """Perform one dispatch: async actions awaited, sync ones in a thread (of `threads`,
    else asyncio's default executor). Never raises for the action's own errors."""
    if fn is None:
        return _unknown(dispatch)
    if inspect.iscoroutinefunction(fn):
        started = _started(dispatch, on_start)
        try:
            output = await fn(dispatch.payload, dispatch.context)
        except (Exception, SystemExit) as exc:
            return _failed(dispatch, exc, started)
        return _finish(dispatch, output, started, durable)

    def call() -> tuple[float, Any, BaseException | None]:
        began = _started(dispatch, on_start)
        try:
            return began, fn(dispatch.payload, dispatch.context), None
        except BaseException as exc:  # in a thread: never a signal, always the action's own
            return began, None, exc

    if threads is None:
        started, output, error = await asyncio.to_thread(call)
    else:
        started, output, error = await asyncio.wrap_future(threads.submit(call))
    if error is not None:
        return _failed(dispatch, error, started)
    if inspect.isawaitable(output):
        try:
            output = await output
        except (Exception, SystemExit) as exc:
            return _failed(dispatch, exc, started)
    return _finish(dispatch, output, started, durable)


# ---------------------------------------------------------------- the runner


class LocalRunner:
    """Drive one job to completion in this process.

    `concurrency`: at most this many actions at once (default `DEFAULT_CONCURRENCY`);
    `on_restart(job, dispatches, results)` is called after every restart and
    `on_start(dispatch, time)` when an action really begins (from an action thread for
    sync actions: keep it cheap and thread-safe).
    """

    def __init__(
        self,
        actions: Mapping[str, Action] | None = None,
        *,
        store: JobStore | None = None,
        run_id: str | None = None,
        on_restart: Callable[[Job, list[Dispatch], list[Result]], None] | None = None,
        inline: bool = True,
        concurrency: int | None = None,
        on_start: OnStart | None = None,
    ) -> None:
        self.actions = registry(actions)
        self.store = store
        self.run_id = run_id
        self.on_restart = on_restart
        self.on_start = on_start
        self.inline = inline
        self.durable = bool(store is not None and store.durable)
        self.concurrency = DEFAULT_CONCURRENCY if concurrency is None else int(concurrency)
        if self.concurrency < 1:
            raise AblaufError(f"concurrency must be at least 1, got {concurrency}")

    def _restart(self, job: Job, results: list[Result]) -> tuple[Job, list[Dispatch]]:
        job, dispatches = restart_job(job, results, time.time())
        if self.store is not None and self.run_id is not None:
            with critical():  # an interrupt waits for the write: the store stays whole
                self.store.record(self.run_id, job)  # persisted before anything is launched
        if self.on_restart is not None:
            self.on_restart(job, dispatches, results)
        return job, dispatches

    async def run(self, job: Job) -> Job:
        """Restart until the job is done; return the final job."""
        actions = self.actions
        threads = ActionThreads(self.concurrency)
        slots = asyncio.Semaphore(self.concurrency)
        on_start = self.on_start

        async def limited(d: Dispatch) -> Result:
            async with slots:  # waiters are served in dispatch order
                return await perform(
                    d, actions.get(d.action), self.durable, threads=threads, on_start=on_start
                )

        ticker = asyncio.ensure_future(keep_awake()) if guarding() else None
        tasks: dict[asyncio.Task[Result], int] = {}
        try:
            job, dispatches = self._restart(job, [])
            while True:
                checkpoint()
                if (
                    self.inline
                    and len(dispatches) == 1
                    and not tasks
                    and not inspect.iscoroutinefunction(actions.get(dispatches[0].action))
                ):
                    # Nothing could overlap this action: call it directly.
                    d = dispatches[0]
                    result = perform_sync(d, actions.get(d.action), self.durable, on_start)
                    job, dispatches = self._restart(job, [result])
                    continue
                for d in dispatches:
                    tasks[asyncio.ensure_future(limited(d))] = d.id
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
            if ticker is not None:
                ticker.cancel()
            threads.close()
