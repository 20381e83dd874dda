"""The REPL's model: a job driven one restart at a time, with undo.

Jobs are immutable values, so a snapshot is just the job plus what the REPL holds beside
it (the dispatches in flight, results fed by hand); `:back` pops the previous snapshot.

One step (`:step`): perform the dispatches in flight (auto mode only; in manual mode
results come from `:ok` / `:fail`), then restart the job with every result at hand,
which yields the next dispatches. The first step of a fresh job only dispatches.

Ctrl-C while a step performs actions stops it at once: the results that arrived are kept
(the next step applies them), and the actions still running are *held*: their outcome
is unknown, so no later step performs them again until the person says so (`:retry ID`)
or gives their result (`:ok` / `:fail`). Their threads are abandoned (daemon threads: the
REPL can always quit).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any

from ablauf_lang.api import Dispatch, Job, Result, restart_job
from ablauf_lang.code import Expr
from ablauf_lang.engine.kinds import Leaf, label_of
from ablauf_lang.engine.nodes import LeafState
from ablauf_lang.errors import AblaufError
from ablauf_lang.runners.local import (
    DEFAULT_CONCURRENCY,
    ActionThreads,
    keep_awake,
    perform,
    registry,
)
from ablauf_lang.ui.render import BY_HAND

__all__ = ["ReplError", "ReplInterrupted", "Snapshot", "StepReport", "Stepper"]

# `:run` stops after this many restarts (a guard: every finite tree finishes far sooner).
MAX_RUN_STEPS = 100_000


class ReplError(AblaufError):
    """A REPL command that cannot be done now (no job, nothing to undo...)."""


class ReplInterrupted(ReplError):
    """Ctrl-C stopped a step or a run; the message says what was kept and what is held."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything `:back` restores: the job, the dispatches in flight, queued results."""

    job: Job | None = None
    name: str | None = None  # where the program came from: a file, or <repl>
    inflight: Mapping[int, Dispatch] = field(default_factory=dict)  # pending leaf id -> dispatch
    queued: tuple[Result, ...] = ()  # results fed by hand, applied by the next step
    # Results of actions a step performed before Ctrl-C stopped it (applied by the next).
    finished: tuple[tuple[Dispatch, Result], ...] = ()
    held: frozenset[int] = frozenset()  # interrupted in flight: never performed again unasked
    # action id -> when it really began (its duration counts from there), or BY_HAND.
    timing: Mapping[int, float | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StepReport:
    """What one step did."""

    before: Job
    after: Job
    performed: tuple[tuple[Dispatch, Result], ...]  # actions run by this step
    fed: tuple[Result, ...]  # results given by hand (:ok / :fail)
    dispatched: tuple[Dispatch, ...]  # what the restart asked for next


class _StepInterrupted(Exception):
    def __init__(self, results: dict[int, Result]) -> None:
        self.results = results


class Stepper:
    """Drive a job step by step: the state behind the REPL's commands."""

    def __init__(
        self,
        actions: Mapping[str, Callable[..., Any]] | None = None,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.actions = registry(actions)
        self.current = Snapshot()
        self.history: list[Snapshot] = []
        self.manual = False
        self.concurrency = concurrency
        self._stop = False  # Ctrl-C arrived during a step or a run
        self._on_interrupt: Callable[[], None] | None = None
        self._guarded = False

    # ------------------------------------------------------------ reading

    @property
    def job(self) -> Job | None:
        """The current job (None before a program is entered or loaded)."""
        return self.current.job

    @property
    def timing(self) -> Mapping[int, float | None]:
        """When each action performed here really began (BY_HAND: its result was fed)."""
        return self.current.timing

    def require_job(self) -> Job:
        """The current job; ReplError when there is none."""
        if self.current.job is None:
            raise ReplError("no job yet: enter a workflow form, or :load FILE")
        return self.current.job

    def waiting(self) -> list[Leaf]:
        """The pending leaves that have no queued result yet."""
        job = self.current.job
        if job is None:
            return []
        queued = {r.id for r in self.current.queued}
        queued.update(d.id for d, _ in self.current.finished)
        return [leaf for leaf in job.pending() if leaf.id not in queued]

    def held(self) -> list[int]:
        """Ids of the actions a Ctrl-C interrupted, waiting for `:retry` or a result."""
        return sorted(self.current.held)

    # ------------------------------------------------------------ changing

    def _push(self, snapshot: Snapshot) -> None:
        self.history.append(self.current)
        self.current = snapshot

    def start(self, job: Job, name: str | None = None) -> None:
        """Make `job` the current job (undoable)."""
        inflight = {leaf.id: self._redispatch(job, leaf) for leaf in job.pending()}
        self._push(Snapshot(job, name, inflight, ()))

    def back(self) -> Snapshot:
        """Undo the last step (or load); return the snapshot now current."""
        if not self.history:
            raise ReplError("nothing to undo")
        self.current = self.history.pop()
        return self.current

    def feed(self, node_id: int, ok: bool, value: Any) -> Result:
        """Queue a result for pending leaf `node_id`; the next step applies it."""
        job = self.require_job()
        leaf = job.node(node_id)
        if not isinstance(leaf, Leaf):
            raise ReplError(
                f"#{node_id} is a {label_of(leaf.kind)} node, not an action: "
                "only actions take results"
            )
        if leaf.result is not LeafState.PENDING:
            state = "unset" if leaf.result is None else str(leaf.result)
            raise ReplError(
                f"#{node_id} is not waiting for a result (it is {state}); "
                f"waiting: {_ids(self.waiting()) or 'nothing'}"
            )
        now = time.time()
        result = (
            Result(node_id, leaf.attempt, LeafState.SUCCESS, value, None, now, now)
            if ok
            else Result(node_id, leaf.attempt, LeafState.FAILURE, None, value, now, now)
        )
        snap = self.current
        queued = (*(r for r in snap.queued if r.id != node_id), result)
        finished = tuple((d, r) for d, r in snap.finished if d.id != node_id)
        self.current = replace(snap, queued=queued, finished=finished, held=snap.held - {node_id})
        return result

    def retry(self, node_id: int | None) -> list[int]:
        """Let the next step perform held (interrupted) actions again: `node_id`, or all."""
        snap = self.current
        if not snap.held:
            raise ReplError("no interrupted action is held: nothing to retry")
        if node_id is None:
            chosen = set(snap.held)
        elif node_id in snap.held:
            chosen = {node_id}
        else:
            raise ReplError(
                f"#{node_id} is not an interrupted action; held: "
                + ", ".join(f"#{i}" for i in sorted(snap.held))
            )
        self.current = replace(snap, held=snap.held - chosen)
        return sorted(chosen)

    def step(self) -> StepReport:
        """One restart: perform what is in flight (auto mode), apply all results."""
        with self._guard():
            return self._step()

    def _step(self) -> StepReport:
        snap = self.current
        job = self.require_job()
        if job.done:
            raise ReplError(
                f"the job is done ({job.status}): :back to step back, or enter a new form"
            )
        fed = snap.queued
        answered = {r.id for r in fed} | {d.id for d, _ in snap.finished}
        todo = [d for i, d in snap.inflight.items() if i not in answered and i not in snap.held]
        performed: list[tuple[Dispatch, Result]] = list(snap.finished)
        if todo and not self.manual:
            try:
                results = self._perform(todo)
            except _StepInterrupted as stop:
                self._interrupted(snap, todo, stop.results)
            performed.extend(zip(todo, results, strict=True))
        results_in = [*fed, *(r for _, r in performed)]
        if not results_in and job.restarts > 0 and not job.todo:
            if snap.held:
                raise ReplError(
                    f"nothing to do: {_id_list(snap.held)} "
                    f"{'was' if len(snap.held) == 1 else 'were'} interrupted (outcome "
                    "unknown): give the result with :ok ID VALUE or :fail ID ERROR, or "
                    ":retry ID to perform it again"
                )
            raise ReplError(
                f"nothing to do: waiting for results of {_ids(self.waiting())} "
                "(:ok ID VALUE or :fail ID ERROR, or :auto to perform them)"
            )
        new, dispatches = restart_job(job, results_in, time.time())
        # Leaves that got their result are no longer pending: they leave `inflight`.
        inflight = {i: d for i, d in snap.inflight.items() if _is_pending(new, i)}
        inflight.update((d.id, d) for d in dispatches)
        timing = dict(snap.timing)
        for r in fed:
            timing[r.id] = BY_HAND
        for _, r in performed:
            timing[r.id] = r.started_at
        held = frozenset(i for i in snap.held if i in inflight)
        self._push(Snapshot(new, snap.name, inflight, (), (), held, timing))
        return StepReport(job, new, tuple(performed), fed, tuple(dispatches))

    def _interrupted(
        self, snap: Snapshot, todo: list[Dispatch], results: dict[int, Result]
    ) -> None:
        """Keep what finished, hold what was in flight, and say so (raises)."""
        done = tuple((d, results[d.id]) for d in todo if d.id in results)
        lost = frozenset(d.id for d in todo if d.id not in results)
        self.current = replace(snap, finished=(*snap.finished, *done), held=snap.held | lost)
        parts = []
        if done:
            kept = _id_list(d.id for d, _ in done)
            parts.append(f"the results of {kept} are kept (:step applies them)")
        if lost:
            names = ", ".join(f"#{d.id} {d.action}" for d in todo if d.id in lost)
            parts.append(
                f"{names} did not finish: the outcome is unknown, so it is held, not "
                "performed again: :ok ID VALUE / :fail ID ERROR to give it, :retry ID to "
                "perform it again"
            )
        raise ReplInterrupted("interrupted: " + "; ".join(parts or ["nothing was lost"]))

    def run(self, on_step: Callable[[StepReport], None] | None = None) -> list[StepReport]:
        """Step until the job is done (or, in manual mode, waits for results by hand)."""
        reports: list[StepReport] = []
        job = self.require_job()
        if job.done:
            raise ReplError(f"the job is done ({job.status}): nothing to run")
        with self._guard():
            while len(reports) < MAX_RUN_STEPS:
                if self._stop:
                    raise ReplInterrupted(
                        f"interrupted after {len(reports)} steps (nothing was in flight)"
                    )
                job = self.require_job()
                if job.done:
                    break
                snap = self.current
                waiting_only = not snap.queued and not snap.finished and not job.todo
                if job.restarts > 0 and waiting_only:
                    if self.manual:
                        break
                    if set(snap.inflight) <= snap.held:
                        break  # only interrupted actions are left: the person decides
                report = self._step()
                reports.append(report)
                if on_step is not None:
                    on_step(report)
        return reports

    # ------------------------------------------------------------ helpers

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """While stepping in the main thread, Ctrl-C stops the step instead of cutting a
        step in half (a step either applies its results or keeps them for the next)."""
        if self._guarded or threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            self._stop = True
            if self._on_interrupt is not None:
                self._on_interrupt()

        self._stop, self._guarded = False, True
        old = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)
            self._guarded, self._stop = False, False

    def _perform(self, dispatches: Sequence[Dispatch]) -> list[Result]:
        """Perform dispatches at the same time (sync actions in daemon threads); never
        raises for an action's error. Ctrl-C: _StepInterrupted with what finished."""
        actions = self.actions
        results: dict[int, Result] = {}
        threads = ActionThreads(self.concurrency)

        async def one(d: Dispatch) -> None:
            results[d.id] = await perform(d, actions.get(d.action), False, threads=threads)

        async def all_of() -> None:
            ticker = asyncio.ensure_future(keep_awake())  # lets a Ctrl-C handler run promptly
            try:
                await asyncio.gather(*(one(d) for d in dispatches))
            finally:
                ticker.cancel()

        loop = asyncio.new_event_loop()
        main = loop.create_task(all_of())

        def cancel() -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(main.cancel)

        self._on_interrupt = cancel
        try:
            if self._stop:
                main.cancel()
            with suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        finally:
            self._on_interrupt = None
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.close()
            threads.close()
        if len(results) < len(dispatches) or self._stop:
            raise _StepInterrupted(results)
        return [results[d.id] for d in dispatches]

    @staticmethod
    def _redispatch(job: Job, leaf: Leaf) -> Dispatch:
        """A dispatch for a leaf already pending (a job loaded from a snapshot)."""
        payload = leaf.payload
        if isinstance(payload, Expr):
            payload = payload.evaluate(job.context)
        return Dispatch(leaf.id, leaf.action, payload, leaf.idempotent, leaf.attempt, job.context)


def _is_pending(job: Job, node_id: int) -> bool:
    return job.node(node_id).result is LeafState.PENDING


def _ids(leaves: Sequence[Leaf]) -> str:
    return ", ".join(f"#{leaf.id}" for leaf in leaves)


def _id_list(ids: Any) -> str:
    return ", ".join(f"#{i}" for i in sorted(ids))
