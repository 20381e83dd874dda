"""The REPL's model: a job driven one restart at a time, with undo.

Jobs are immutable values, so a snapshot is just the job plus what the REPL holds beside
it (the dispatches in flight, results fed by hand); `:back` pops the previous snapshot.

One step (`:step`): perform the dispatches in flight (auto mode only; in manual mode
results come from `:ok` / `:fail`), then restart the job with every result at hand,
which yields the next dispatches. The first step of a fresh job only dispatches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ablauf_lang.errors import AblaufError
from ablauf_lang.job import Job, restart_job
from ablauf_lang.nodes import Deferred, Dispatch, Leaf, LeafState, Result
from ablauf_lang.runners.local import perform, registry

__all__ = ["ReplError", "Snapshot", "StepReport", "Stepper"]

# `:run` stops after this many restarts (a guard: every finite tree finishes far sooner).
MAX_RUN_STEPS = 100_000


class ReplError(AblaufError):
    """A REPL command that cannot be done now (no job, nothing to undo...)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything `:back` restores: the job, the dispatches in flight, queued results."""

    job: Job | None = None
    name: str | None = None  # where the program came from: a file, or <repl>
    inflight: Mapping[int, Dispatch] = field(default_factory=dict)  # pending leaf id -> dispatch
    queued: tuple[Result, ...] = ()  # results fed by hand, applied by the next step


@dataclass(frozen=True, slots=True)
class StepReport:
    """What one step did."""

    before: Job
    after: Job
    performed: tuple[tuple[Dispatch, Result], ...]  # actions run by this step
    fed: tuple[Result, ...]  # results given by hand (:ok / :fail)
    dispatched: tuple[Dispatch, ...]  # what the restart asked for next


class Stepper:
    """Drive a job step by step: the state behind the REPL's commands."""

    def __init__(self, actions: Mapping[str, Callable[..., Any]] | None = None) -> None:
        self.actions = registry(actions)
        self.current = Snapshot()
        self.history: list[Snapshot] = []
        self.manual = False

    # ------------------------------------------------------------ reading

    @property
    def job(self) -> Job | None:
        """The current job (None before a program is entered or loaded)."""
        return self.current.job

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
        return [leaf for leaf in job.pending() if leaf.id not in queued]

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
                f"#{node_id} is a {leaf.kind} node, not an action: only actions take results"
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
        queued = (*(r for r in self.current.queued if r.id != node_id), result)
        self.current = replace(self.current, queued=queued)
        return result

    def step(self) -> StepReport:
        """One restart: perform what is in flight (auto mode), apply all results."""
        snap = self.current
        job = self.require_job()
        if job.done:
            raise ReplError(
                f"the job is done ({job.status}): :back to step back, or enter a new form"
            )
        fed = snap.queued
        answered = {r.id for r in fed}
        todo = [d for i, d in snap.inflight.items() if i not in answered]
        performed: list[tuple[Dispatch, Result]] = []
        if todo and not self.manual:
            performed = list(zip(todo, self._perform(todo), strict=True))
        results = [*fed, *(r for _, r in performed)]
        if not results and job.restarts > 0 and not job.todo:
            raise ReplError(
                f"nothing to do: waiting for results of {_ids(self.waiting())} "
                "(:ok ID VALUE or :fail ID ERROR, or :auto to perform them)"
            )
        new, dispatches = restart_job(job, results, time.time())
        # Leaves that got their result are no longer pending: they leave `inflight`.
        inflight = {i: d for i, d in snap.inflight.items() if _is_pending(new, i)}
        inflight.update((d.id, d) for d in dispatches)
        self._push(Snapshot(new, snap.name, inflight, ()))
        return StepReport(job, new, tuple(performed), fed, tuple(dispatches))

    def run(self, on_step: Callable[[StepReport], None] | None = None) -> list[StepReport]:
        """Step until the job is done (or, in manual mode, waits for results by hand)."""
        reports: list[StepReport] = []
        job = self.require_job()
        if job.done:
            raise ReplError(f"the job is done ({job.status}): nothing to run")
        while len(reports) < MAX_RUN_STEPS:
            job = self.require_job()
            if job.done:
                break
            if self.manual and not self.current.queued and job.restarts > 0 and not job.todo:
                break
            report = self.step()
            reports.append(report)
            if on_step is not None:
                on_step(report)
        return reports

    # ------------------------------------------------------------ helpers

    def _perform(self, dispatches: Sequence[Dispatch]) -> list[Result]:
        """Perform dispatches at the same time (sync actions in threads); never raises."""
        actions = self.actions

        async def all_of() -> list[Result]:
            return list(
                await asyncio.gather(
                    *(perform(d, actions.get(d.action), False) for d in dispatches)
                )
            )

        return asyncio.run(all_of())

    @staticmethod
    def _redispatch(job: Job, leaf: Leaf) -> Dispatch:
        """A dispatch for a leaf already pending (a job loaded from a snapshot)."""
        payload = leaf.payload
        if isinstance(payload, Deferred):
            payload = payload.evaluate(job.context)
        return Dispatch(leaf.id, leaf.action, payload, leaf.idempotent, leaf.attempt, job.context)


def _is_pending(job: Job, node_id: int) -> bool:
    return job.node(node_id).result is LeafState.PENDING


def _ids(leaves: Sequence[Leaf]) -> str:
    return ", ".join(f"#{leaf.id}" for leaf in leaves)
