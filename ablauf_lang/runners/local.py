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
import heapq
import inspect
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

from ablauf_lang import values
from ablauf_lang.engine.job import Job, restart_job
from ablauf_lang.engine.nodes import (
    FAILED_STATES,
    Dispatch,
    LeafState,
    Result,
    Status,
    failure,
    success,
    timeout,
)
from ablauf_lang.engine.waits import detachable
from ablauf_lang.errors import AblaufError, InternalError
from ablauf_lang.runners.clock import HEARTBEAT, SYSTEM, Clock, heartbeat
from ablauf_lang.runners.group import GroupCommit, group_for
from ablauf_lang.stdlib.actions import AWAIT, SLEEP, STDLIB_ACTIONS, WAIT_ACTIONS, ActionFailed
from ablauf_lang.stdlib.durations import format_duration
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
    "heartbeat",
    "interruptible",
    "keep_awake",
    "perform",
    "perform_sync",
    "registry",
    "run_coroutine",
]

T = TypeVar("T")

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


@contextmanager
def stopping(stop: threading.Event, log: logging.Logger) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop`, for a worker that finishes what it has in hand
    (from the main thread only; elsewhere nothing changes). A second signal is logged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("already stopping: finishing what is in hand")
        else:
            log.info("%s: finishing what is in hand, then stopping", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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


def run_coroutine(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, where a signal raised as `Interrupted` inside the loop stays
    that: raised just as the run finished, it leaves a queued callback that stops the
    loop, and asyncio's own cleanup then fails with a RuntimeError while the Interrupted
    is being handled (the random-SIGINT test found it). The Interrupted is what happened."""
    try:
        return asyncio.run(main)
    except RuntimeError as exc:
        if isinstance(exc.__context__, Interrupted):
            raise exc.__context__ from None
        raise


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
    dispatch: Dispatch,
    fn: Action | None,
    durable: bool,
    on_start: OnStart | None = None,
    beat: Callable[[Any], None] | None = None,
) -> Result:
    """Call a sync action here and now; never raises for the action's own errors.

    A KeyboardInterrupt is not the action's error (in the main thread it is a signal):
    it goes through. `beat` is what `heartbeat()` calls inside the action.
    """
    if fn is None:
        return _unknown(dispatch)
    started = _started(dispatch, on_start)
    token = HEARTBEAT.set(beat)
    try:
        output = fn(dispatch.payload, dispatch.context)
        if inspect.isawaitable(output):
            close = getattr(output, "close", None)
            if close is not None:
                close()
            raise TypeError("a sync action returned an awaitable; declare it `async def`")
    except (Exception, SystemExit) as exc:
        return _failed(dispatch, exc, started)
    finally:
        HEARTBEAT.reset(token)
    return _finish(dispatch, output, started, durable)


async def perform(
    dispatch: Dispatch,
    fn: Action | None,
    durable: bool,
    *,
    threads: ActionThreads | None = None,
    on_start: OnStart | None = None,
    beat: Callable[[Any], None] | None = None,
) -> Result:
    """Perform one dispatch: async actions awaited, sync ones in a thread (of `threads`,
    else asyncio's default executor). Never raises for the action's own errors. `beat`
    is what `heartbeat()` calls inside the action."""
    if fn is None:
        return _unknown(dispatch)
    if inspect.iscoroutinefunction(fn):
        started = _started(dispatch, on_start)
        HEARTBEAT.set(beat)  # this task's own context
        try:
            output = await fn(dispatch.payload, dispatch.context)
        except (Exception, SystemExit) as exc:
            return _failed(dispatch, exc, started)
        return _finish(dispatch, output, started, durable)

    def call() -> tuple[float, Any, BaseException | None]:
        began = _started(dispatch, on_start)
        token = HEARTBEAT.set(beat)
        try:
            return began, fn(dispatch.payload, dispatch.context), None
        except BaseException as exc:  # in a thread: never a signal, always the action's own
            return began, None, exc
        finally:
            HEARTBEAT.reset(token)

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


# ---------------------------------------------------------------- limits of an attempt


class Beat:
    """The heartbeat of one attempt: when its action last said it was alive."""

    __slots__ = ("details", "last")

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.details: Any = None

    def __call__(self, details: Any = None) -> None:
        self.last = time.monotonic()  # a float store: safe from an action's thread
        self.details = details


async def supervise(
    dispatch: Dispatch, work: Coroutine[Any, Any, Result], beat: Beat | None
) -> Result:
    """Await an attempt within its limits: `timeout` for the whole attempt, `heartbeat`
    between two heartbeats. Past either, the attempt ends as a timeout: an async action
    is cancelled, a thread is abandoned (its late result is ignored by the engine, which
    takes only the results of the attempt it waits for)."""
    task = asyncio.ensure_future(work)
    began, wall = time.monotonic(), time.time()
    limit, silence = dispatch.timeout, dispatch.heartbeat
    try:
        while True:
            ends = [began + limit] if limit is not None else []
            if beat is not None and silence is not None:
                ends.append(beat.last + silence)
            wait = max(0.0, min(ends) - time.monotonic()) if ends else None
            done, _ = await asyncio.wait({task}, timeout=wait)
            if done:
                return task.result()
            now = time.monotonic()
            if limit is not None and now >= began + limit:
                error = f"timeout: no result within {format_duration(limit)}"
            elif beat is not None and silence is not None and now >= beat.last + silence:
                error = f"heartbeat: none for {format_duration(silence)}"
            else:
                continue
            return timeout(dispatch, error, started_at=wall, finished_at=time.time())
    finally:
        if not task.done():
            task.cancel()


def plain(dispatch: Dispatch) -> bool:
    """A dispatch to perform at once with no limits (the runner may call it inline)."""
    return (
        dispatch.due is None
        and dispatch.timeout is None
        and dispatch.heartbeat is None
        and dispatch.action not in WAIT_ACTIONS
    )


# ---------------------------------------------------------------- what a run waits for


class Schedule:
    """A run's work in this process: actions running, dispatches waiting for their time
    (a sleep, a retry's wait, an await's deadline: a heap), awaits waiting for a signal."""

    def __init__(self) -> None:
        self.running: dict[asyncio.Task[Result], Dispatch] = {}
        self.task_of: dict[int, asyncio.Task[Result]] = {}
        self.later: dict[int, Dispatch] = {}
        self.awaits: dict[int, Dispatch] = {}
        self._heap: list[tuple[float, int, int, int]] = []  # time, order, node, attempt
        self._order = 0

    def empty(self) -> bool:
        return not (self.running or self.later or self.awaits)

    def start(self, dispatch: Dispatch, task: asyncio.Task[Result]) -> None:
        self.running[task] = dispatch
        self.task_of[dispatch.id] = task

    def finished(self, task: asyncio.Task[Result]) -> Result:
        dispatch = self.running.pop(task)
        self.task_of.pop(dispatch.id, None)
        return task.result()

    def at(self, when: float, dispatch: Dispatch) -> None:
        """Act on `dispatch` at `when` (perform it, wake the sleep, end the await)."""
        self._order += 1
        heapq.heappush(self._heap, (when, self._order, dispatch.id, dispatch.attempt))
        self.later[dispatch.id] = dispatch

    def _live(self, node: int, attempt: int) -> Dispatch | None:
        dispatch = self.later.get(node)
        return dispatch if dispatch is not None and dispatch.attempt == attempt else None

    def next_time(self) -> float | None:
        """The earliest time something is to happen (None: no timer)."""
        heap = self._heap
        while heap and self._live(heap[0][2], heap[0][3]) is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def due(self, now: float) -> list[Dispatch]:
        """The dispatches whose time has come, taken off the heap."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, node, attempt = heapq.heappop(heap)
            dispatch = self._live(node, attempt)
            if dispatch is not None:
                del self.later[node]
                out.append(dispatch)
        return out

    def drop(self, node: int) -> None:
        """Forget node's dispatch: cancel its action, stop its timer and its await."""
        task = self.task_of.pop(node, None)
        if task is not None:
            del self.running[task]
            task.cancel()
        self.later.pop(node, None)
        self.awaits.pop(node, None)

    def dispatch_of(self, node: int) -> Dispatch | None:
        """The dispatch of `node` this schedule holds (running, timed or awaiting)."""
        task = self.task_of.get(node)
        if task is not None:
            return self.running[task]
        return self.later.get(node) or self.awaits.get(node)

    def prune(self, job: Job) -> None:
        """Drop what the last restart ended (a deadline cut it, an abort failed it).

        Looks only at the nodes the restart touched (never at everything scheduled: a
        10,000-way fan-out waits here without costing each restart 10,000 look-ups)."""
        for node in job.touched:
            dispatch = self.dispatch_of(node)
            if dispatch is None:
                continue
            leaf = job.node(node)
            if leaf.result is not LeafState.PENDING or leaf.attempt != dispatch.attempt:
                self.drop(node)


def _no_signal(dispatch: Dispatch) -> Result:
    until = dispatch.payload.get("until") if isinstance(dispatch.payload, dict) else None
    name = dispatch.payload.get("signal") if isinstance(dispatch.payload, dict) else "?"
    return timeout(dispatch, f"timeout: no signal {name} arrived in time", finished_at=until)


# ---------------------------------------------------------------- the runner


class LocalRunner:
    """Drive one job to completion in this process.

    `concurrency`: at most this many actions at once (default `DEFAULT_CONCURRENCY`);
    `on_restart(job, dispatches, results)` is called after every restart and
    `on_start(dispatch, time)` when an action really begins (from an action thread for
    sync actions: keep it cheap and thread-safe).

    Time: `clock` (default the system's; a `VirtualClock` skips ahead when nothing runs
    before the next timer). Sleeps and retries' waits are timers here; an await takes its
    signal from the store (looked for every `poll` seconds while it waits). `detach`:
    return the job as soon as it is parked (nothing runs, only waits remain) and can be
    handed over (`engine.waits.detachable`: a retry of a non-idempotent action is waited
    for here), for a worker to wake it later (`ablauf run --detach`, the SQLite worker).
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
        clock: Clock | None = None,
        detach: bool = False,
        poll: float = 0.5,
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
        self.clock: Clock = SYSTEM if clock is None else clock
        self.detach = detach
        self.poll = poll
        self._next_poll = 0.0  # when every await looks in the mailbox again
        self._group: GroupCommit | None = None  # while it runs, on a store that groups

    async def _restart(self, job: Job, results: list[Result]) -> tuple[Job, list[Dispatch]]:
        job, dispatches = restart_job(job, results, self.clock.now())
        if self.store is not None and self.run_id is not None:
            # Persisted before anything is launched: with other runs of this loop on the
            # store, in their transaction (returning after its commit); alone, now.
            group = self._group
            if group is not None and group.shared:
                await group.record(self.run_id, job)
            else:
                with critical():  # an interrupt waits for the write: the store stays whole
                    self.store.record(self.run_id, job)
        if self.on_restart is not None:
            self.on_restart(job, dispatches, results)
        return job, dispatches

    def _signals(self, schedule: Schedule, new: list[int]) -> list[Result]:
        """Results of the awaits whose signal is in the run's mailbox (each taken once):
        the awaits just started, and every await once per `poll` seconds (not at every
        restart: a thousand awaits must not cost each step a thousand look-ups)."""
        take = getattr(self.store, "take_signal", None)
        if take is None or self.run_id is None or not schedule.awaits:
            return []
        nodes: Iterable[int] = new
        if time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll
            nodes = list(schedule.awaits)
        out = []
        for node in nodes:
            dispatch = schedule.awaits.get(node)
            if dispatch is None:
                continue
            with critical():
                got = take(self.run_id, str(dispatch.payload.get("signal")), node)
            if got is not None:
                schedule.drop(node)
                now = self.clock.now()
                out.append(success(dispatch, got[1], started_at=now, finished_at=now))
        return out

    async def run(self, job: Job) -> Job:
        """Restart until the job is done (or parked, with `detach`); return the job."""
        actions = self.actions
        threads = ActionThreads(self.concurrency)
        slots = asyncio.Semaphore(self.concurrency)
        on_start = self.on_start
        clock = self.clock

        async def limited(d: Dispatch) -> Result:
            async with slots:  # waiters are served in dispatch order
                beat = Beat() if d.heartbeat is not None else None
                work = perform(
                    d,
                    actions.get(d.action),
                    self.durable,
                    threads=threads,
                    on_start=on_start,
                    beat=beat,
                )
                if d.timeout is None and beat is None:
                    return await work
                return await supervise(d, work, beat)

        def launch(d: Dispatch, now: float, ready: list[Result]) -> None:
            if d.action == SLEEP:
                ready.append(success(d, None, started_at=now, finished_at=now))
            else:
                schedule.start(d, asyncio.ensure_future(limited(d)))

        ticker = asyncio.ensure_future(keep_awake()) if guarding() else None
        schedule = Schedule()
        group = None
        if self.store is not None and self.run_id is not None and self.durable:
            group = group_for(self.store, critical)
            if group is not None and not group.join():
                group = None
        self._group = group
        try:
            if group is not None:
                # Let the runs started with this one in this turn of the loop (gathered)
                # join before the first restart, so that their restarts share commits.
                await asyncio.sleep(0)
            job, dispatches = await self._restart(job, [])
            while True:
                checkpoint()
                if (
                    self.inline
                    and len(dispatches) == 1
                    and schedule.empty()
                    and plain(dispatches[0])
                    and not inspect.iscoroutinefunction(actions.get(dispatches[0].action))
                ):
                    # Nothing could overlap this action: call it directly.
                    d = dispatches[0]
                    result = perform_sync(d, actions.get(d.action), self.durable, on_start)
                    job, dispatches = await self._restart(job, [result])
                    continue
                schedule.prune(job)
                now = clock.now()
                ready: list[Result] = []
                for d in dispatches:
                    if d.action == AWAIT:
                        schedule.awaits[d.id] = d
                        until = d.payload.get("until") if isinstance(d.payload, dict) else None
                        if until is not None:
                            schedule.at(float(until), d)
                    elif d.due is not None and d.due > now:
                        schedule.at(d.due, d)
                    else:
                        launch(d, now, ready)
                started = [d.id for d in dispatches if d.action == AWAIT]
                ready.extend(self._signals(schedule, started))
                for d in schedule.due(clock.now()):
                    if d.action == AWAIT:
                        schedule.awaits.pop(d.id, None)
                        ready.append(_no_signal(d))
                    else:
                        launch(d, clock.now(), ready)
                if ready:
                    job, dispatches = await self._restart(job, ready)
                    continue
                dispatches = []
                if schedule.empty():
                    if not job.done:
                        raise InternalError(
                            f"job stuck: not done, nothing in flight (status {job.status})"
                        )
                    return job
                if job.done and not schedule.running:
                    return job  # what is left waits for nothing (a cancelled timer)
                if not schedule.running and self.detach and detachable(job, clock.now()):
                    return job  # parked: a worker wakes it when its time (or signal) comes
                wake = schedule.next_time()
                if not schedule.running and clock.virtual and wake is not None:
                    clock.advance(max(0.0, wake - clock.now()))  # skip ahead: nothing runs
                    continue
                wait = None if wake is None else max(0.0, wake - clock.now())
                if schedule.awaits:
                    wait = self.poll if wait is None else min(wait, self.poll)
                if not schedule.running:
                    await asyncio.sleep(0.0 if wait is None else wait)
                    continue
                finished, _ = await asyncio.wait(
                    schedule.running, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if finished:
                    results = [schedule.finished(task) for task in finished]
                    job, dispatches = await self._restart(job, results)
        finally:
            if group is not None:
                group.leave()
            self._group = None
            for task in schedule.running:
                task.cancel()
            if ticker is not None:
                ticker.cancel()
            threads.close()
