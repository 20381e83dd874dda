"""The REPL's model: a job driven one restart at a time, with undo.

Jobs are immutable values, so a snapshot is just the job plus what the REPL holds beside
it (the dispatches in flight, results fed by hand, the signals sent, the clock's time).
The snapshots form a timeline: `:back` and `:goto N` move along it (forward too), and a
step taken from an earlier snapshot starts a new branch (the snapshots ahead are dropped).
The snapshots of one job, from where it was entered, loaded or attached, are its
*segment*; each knows the step that made it, so a segment can be saved as a test.

Breakpoints (`Breakpoint`: an action, a node id, a condition on the context) stop `run`
before it performs a matching leaf (however it was dispatched: by a restart, a signal,
the clock); `let_go` lets the leaves it stopped at be performed by the next `run`.

One step (`:step`): perform the dispatches in flight (auto mode only; in manual mode
results come from `:ok` / `:fail`), then restart the job with every result at hand,
which yields the next dispatches. The first step of a fresh job only dispatches.

Ctrl-C while a step performs actions stops it at once: the results that arrived are kept
(the next step applies them), and the actions still running are *held*: their outcome
is unknown, so no later step performs them again until the person says so (`:retry ID`)
or gives their result (`:ok` / `:fail`). Their threads are abandoned (daemon threads: the
REPL can always quit).

Time is the REPL's own clock (a frozen `VirtualClock` that starts at the real time, unless
the REPL is given another): it stands still between steps, moves by the time actions take
while a step performs them, and jumps by `advance`. Every restart gets the clock's `now`,
so sleeps, retries' waits and awaits' deadlines are times on that clock. Waits are not
actions: a sleep ends once the clock reaches its wake-up, an await takes a signal from the
session's mailbox (`signal`) or times out at its deadline, and a retry's next attempt is
performed once its time has come.
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

from ablauf_lang import values
from ablauf_lang.api import Dispatch, Job, Result, restart_job
from ablauf_lang.code import Expr
from ablauf_lang.engine.kinds import Leaf, label_of
from ablauf_lang.engine.nodes import LeafState, success, timeout
from ablauf_lang.engine.waits import Wait, waits
from ablauf_lang.errors import AblaufError
from ablauf_lang.runners.clock import Clock, VirtualClock
from ablauf_lang.runners.local import (
    DEFAULT_CONCURRENCY,
    ActionThreads,
    Beat,
    keep_awake,
    perform,
    registry,
    supervise,
)
from ablauf_lang.stdlib.actions import AWAIT, SLEEP, WAIT_ACTIONS
from ablauf_lang.stdlib.durations import format_duration, format_instant
from ablauf_lang.stores.base import signal_name
from ablauf_lang.ui.render import BY_HAND

__all__ = [
    "Breakpoint",
    "Origin",
    "ReplError",
    "ReplInterrupted",
    "Signal",
    "Snapshot",
    "StepReport",
    "Stepper",
    "wait_text",
]

# `:run` stops after this many restarts (a guard: every finite tree finishes far sooner).
MAX_RUN_STEPS = 100_000


class ReplError(AblaufError):
    """A REPL command that cannot be done now (no job, nothing to undo...)."""


class ReplInterrupted(ReplError):
    """Ctrl-C stopped a step or a run; the message says what was kept and what is held."""


@dataclass(frozen=True, slots=True)
class Signal:
    """A signal sent with `:signal`: in the session's mailbox until an await takes it."""

    seq: int  # 1, 2 ... in order of arrival
    name: str
    value: Any
    sent_at: float  # the REPL clock's time
    taken_by: int | None = None  # the await (node id) that took it


@dataclass(frozen=True, slots=True)
class Origin:
    """A job taken from a recorded run (`:attach`): which run, in which store. The run
    itself is never written to."""

    run_id: str
    store: str  # the store's URL
    latest: int  # the run's latest restart when it was attached
    filename: str | None = None


@dataclass(frozen=True, slots=True)
class Breakpoint:
    """`:break`: stop `:run` before performing a leaf it dispatched that matches every
    part given: the action, the node id, a condition on the context."""

    number: int
    text: str  # as it was typed
    action: str | None = None
    node: int | None = None
    when: Callable[[dict[str, Any]], Any] | None = None

    def matches(self, dispatch: Dispatch, job: Job) -> tuple[bool, str | None]:
        """Whether `dispatch` hits this breakpoint, and a note when its condition failed
        (a condition that cannot be evaluated stops the run: it is shown, not hidden)."""
        if self.action is not None and dispatch.action != self.action:
            return False, None
        if self.node is not None and dispatch.id != self.node:
            return False, None
        if self.when is None:
            return True, None
        try:
            return bool(self.when(dict(job.context))), None
        except AblaufError as exc:
            return True, f"its condition failed: {exc.message}"


@dataclass(frozen=True, slots=True)
class Hit:
    """A breakpoint that stopped a run: the leaf dispatched and not performed yet."""

    breakpoint: Breakpoint
    dispatch: Dispatch
    note: str | None = None


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
    mailbox: tuple[Signal, ...] = ()  # the signals sent, taken or not, in order of arrival
    now: float | None = None  # the clock's time in this snapshot (`:back` turns it back)
    source: str | None = None  # the program's text (None: a job snapshot loaded from JSON)
    origin: Origin | None = None  # the recorded run the job was attached from
    step: StepReport | None = None  # the step that made this snapshot (None: a start)


@dataclass(frozen=True, slots=True)
class StepReport:
    """What one step did."""

    before: Job
    after: Job
    performed: tuple[tuple[Dispatch, Result], ...]  # actions run by this step
    fed: tuple[Result, ...]  # results given by hand (:ok / :fail)
    dispatched: tuple[Dispatch, ...]  # what the restart asked for next
    woke: tuple[tuple[Dispatch, Result], ...] = ()  # waits that ended: sleeps, awaits
    now: float | None = None  # the time the restart was given


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
        clock: Clock | None = None,
    ) -> None:
        self.actions = registry(actions)
        self.clock: Clock = VirtualClock(frozen=True) if clock is None else clock
        self.timeline: list[Snapshot] = [Snapshot(now=self.clock.now())]
        self.position = 0  # the current snapshot's index in the timeline
        self.breaks: list[Breakpoint] = []
        self.hits: list[Hit] = []  # what stopped the last `run`
        self.passed: set[tuple[int, int]] = set()  # (leaf, attempt) let go past a break
        self.manual = False
        self.concurrency = concurrency
        self._stop = False  # Ctrl-C arrived during a step or a run
        self._on_interrupt: Callable[[], None] | None = None
        self._guarded = False

    # ------------------------------------------------------------ reading

    @property
    def current(self) -> Snapshot:
        """The snapshot on screen."""
        return self.timeline[self.position]

    @current.setter
    def current(self, snapshot: Snapshot) -> None:
        self.timeline[self.position] = snapshot

    def segment(self) -> list[tuple[int, Snapshot]]:
        """The current job's snapshots with their timeline indexes: from where it was
        entered, loaded or attached, through the last one kept (some may be ahead)."""
        start = self.position
        while start > 0 and self.timeline[start].step is not None:
            start -= 1
        end = start + 1
        while end < len(self.timeline) and self.timeline[end].step is not None:
            end += 1
        return [(i, self.timeline[i]) for i in range(start, end)]

    @property
    def job(self) -> Job | None:
        """The current job (None before a program is entered or loaded)."""
        return self.current.job

    @property
    def timing(self) -> Mapping[int, float | None]:
        """When each action performed here really began (BY_HAND: its result was fed)."""
        return self.current.timing

    @property
    def live(self) -> bool:
        """True when the clock is the system's (it cannot be advanced)."""
        return not self.clock.virtual

    def now(self) -> float:
        """The clock's time."""
        return self.clock.now()

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

    def waits(self) -> list[Wait]:
        """What the unfinished job waits for (sleeps, signals, retries' waits), the
        earliest wake-up first (signals without a deadline last)."""
        job = self.current.job
        if job is None or job.done:
            return []
        found = waits(job, self.now())
        return sorted(found, key=lambda w: (w.until is None, w.until or 0.0))

    def next_wake(self) -> float | None:
        """The earliest time the job waits for (None: nothing, or only signals)."""
        times = [w.until for w in self.waits() if w.until is not None]
        return min(times) if times else None

    def mailbox(self) -> list[Signal]:
        """The signals sent in this session that no await has taken yet."""
        return [s for s in self.current.mailbox if s.taken_by is None]

    def awaited(self) -> list[str]:
        """The names of the signals the job's awaits in flight wait for."""
        return [w.name for w in self.waits() if w.kind == "signal" and w.name is not None]

    def blocked(self) -> str:
        """Why nothing can happen now, in words, with what the person can do."""
        snap = self.current
        now = self.now()
        parts = [wait_text(w, now, self.live) for w in self.waits() if not _ready(w, now)]
        if snap.held:
            parts.append(
                f"{_id_list(snap.held)} {'was' if len(snap.held) == 1 else 'were'} "
                "interrupted (outcome unknown): give the result with :ok ID VALUE or "
                ":fail ID ERROR, or :retry ID to perform it again"
            )
        waited = {w.node for w in self.waits()}
        results = [
            leaf for leaf in self.waiting() if leaf.id not in waited and leaf.id not in snap.held
        ]
        if results:
            parts.append(
                f"waiting for results of {_ids(results)} "
                "(:ok ID VALUE or :fail ID ERROR, or :auto to perform them)"
            )
        return "; ".join(parts) or "nothing is in flight"

    # ------------------------------------------------------------ changing

    def _push(self, snapshot: Snapshot) -> None:
        del self.timeline[self.position + 1 :]  # a new branch: what was ahead is dropped
        self.timeline.append(replace(snapshot, now=self.clock.now()))
        self.position = len(self.timeline) - 1

    def start(
        self,
        job: Job,
        name: str | None = None,
        *,
        source: str | None = None,
        origin: Origin | None = None,
    ) -> None:
        """Make `job` the current job (undoable): `source` is its program's text,
        `origin` the recorded run it was attached from."""
        inflight = {leaf.id: self._redispatch(job, leaf) for leaf in job.pending()}
        self._push(Snapshot(job, name, inflight, (), source=source, origin=origin))

    def back(self) -> Snapshot:
        """Undo the last step (or load); return the snapshot now current. The clock goes
        back to that snapshot's time too (a virtual clock). The snapshot left stays
        ahead: `:goto` returns to it until a step starts a new branch."""
        if self.position == 0:
            raise ReplError("nothing to undo")
        self.position -= 1
        self._set_clock(self.current.now)
        return self.current

    def goto(self, restart: int) -> Snapshot:
        """Go to the current job's snapshot after restart `restart`, back or forward
        (the clock goes to that snapshot's time); ReplError when the segment has none."""
        numbers = []
        for index, snap in self.segment():
            if snap.job is not None and snap.job.restarts == restart:
                self.position = index
                self._set_clock(snap.now)
                return snap
            if snap.job is not None:
                numbers.append(snap.job.restarts)
        if not numbers:
            raise ReplError("no job yet: enter a workflow form, or :load FILE")
        raise ReplError(
            f"restart {restart} is out of range: this job has restarts {min(numbers)} to "
            f"{max(numbers)} here (:history lists them)"
        )

    def add_break(
        self,
        text: str,
        *,
        action: str | None = None,
        node: int | None = None,
        when: Callable[[dict[str, Any]], Any] | None = None,
    ) -> Breakpoint:
        """A new breakpoint (numbered 1, 2 ... in order of making)."""
        number = max((b.number for b in self.breaks), default=0) + 1
        made = Breakpoint(number, text, action, node, when)
        self.breaks.append(made)
        return made

    def remove_break(self, number: int | None) -> list[Breakpoint]:
        """Remove breakpoint `number` (None: all); the ones removed."""
        if number is None:
            gone, self.breaks = self.breaks, []
            return gone
        gone = [b for b in self.breaks if b.number == number]
        if not gone:
            shown = ", ".join(str(b.number) for b in self.breaks) or "none"
            raise ReplError(f"no breakpoint {number} (breakpoints: {shown})")
        self.breaks = [b for b in self.breaks if b.number != number]
        return gone

    def _hits(self, todo: Sequence[Dispatch], job: Job) -> list[Hit]:
        """The breakpoints the dispatches about to be performed hit (not let go)."""
        found = []
        for d in sorted(todo, key=lambda d: d.id):
            if (d.id, d.attempt) in self.passed:
                continue
            for b in self.breaks:
                hit, note = b.matches(d, job)
                if hit:
                    found.append(Hit(b, d, note))
                    break
        return found

    def let_go(self) -> list[Hit]:
        """Let the leaves the last `run` stopped at be performed (`:continue`)."""
        gone, self.hits = self.hits, []
        self.passed.update((h.dispatch.id, h.dispatch.attempt) for h in gone)
        return gone

    def _set_clock(self, when: float | None) -> None:
        clock = self.clock
        if when is None or not clock.virtual or not isinstance(clock, VirtualClock):
            return
        if when >= clock.now():
            clock.advance_to(when)
        else:
            self.clock = VirtualClock(when, frozen=clock.frozen)

    def advance(self, seconds: float) -> list[StepReport]:
        """Move the clock forward by `seconds`, then deliver every timer now due."""
        if self.live:
            raise ReplError(
                "the clock is the system's (a live session): it cannot be moved; "
                "waits end at their real time"
            )
        self.clock.advance(seconds)
        self.current = replace(self.current, now=self.clock.now())
        return self.deliver()

    def advance_to_next(self) -> tuple[float, list[StepReport]]:
        """Move the clock to the next wake-up and deliver what is due: (seconds, steps)."""
        wake = self.next_wake()
        if wake is None:
            raise ReplError(
                "nothing waits for a time: usage :advance DURATION (10m, 1h30m, 2d, 45s)"
            )
        gap = max(0.0, wake - self.now())
        return gap, self.advance(gap)

    def signal(self, name: str, value: Any = None) -> tuple[Signal, list[StepReport]]:
        """Put a signal in the session run's mailbox; deliver it at once to an await that
        waits for it (as a step), else keep it for a later await."""
        job = self.require_job()
        if job.done:
            raise ReplError(
                f"the job already finished ({job.status}): signals are only delivered to "
                "a job that waits (:back to step back, or enter a new form)"
            )
        try:
            name = signal_name(name)
            values.encode(value, "the signal's value")
        except AblaufError as exc:
            raise ReplError(exc.message) from None
        snap = self.current
        sent = Signal(len(snap.mailbox) + 1, name, value, self.now())
        self.current = replace(snap, mailbox=(*snap.mailbox, sent))
        reports = self.deliver() if name in self.awaited() else []
        return sent, reports

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
        now = self.now()
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

    def deliver(self) -> list[StepReport]:
        """Steps that deliver only what the clock and the mailbox make due: sleeps that
        end, awaits that take a signal or time out, retries' attempts whose time came
        (auto mode). Other actions in flight wait for `:step`. Stops when nothing is due."""
        reports: list[StepReport] = []
        with self._guard():
            while len(reports) < MAX_RUN_STEPS:
                job = self.current.job
                if job is None or job.done or self._stop:
                    break
                snap, now = self.current, self.now()
                woke, _ = self._woken(snap, now)
                if not woke and not self._todo(snap, now, waits_only=True):
                    break
                reports.append(self._step(waits_only=True))
        return reports

    def _woken(
        self, snap: Snapshot, now: float
    ) -> tuple[list[tuple[Dispatch, Result]], tuple[Signal, ...]]:
        """The waits in flight that end at `now` (sleeps due, awaits that find their
        signal or pass their deadline), and the mailbox with the signals they take."""
        job = snap.job
        out: list[tuple[Dispatch, Result]] = []
        mailbox = list(snap.mailbox)
        if job is None:
            return out, snap.mailbox
        answered = {r.id for r in snap.queued} | {d.id for d, _ in snap.finished}
        for node, d in sorted(snap.inflight.items()):
            if node in answered or node in snap.held or d.action not in WAIT_ACTIONS:
                continue
            if d.action == SLEEP:
                if d.due is None or d.due <= now:
                    out.append((d, success(d, None, started_at=now, finished_at=now)))
                continue
            payload = d.payload if isinstance(d.payload, dict) else {}
            name = str(payload.get("signal"))
            for i, sig in enumerate(mailbox):
                if sig.name == name and sig.taken_by in (None, node):
                    mailbox[i] = replace(sig, taken_by=node)
                    out.append((d, success(d, sig.value, started_at=now, finished_at=now)))
                    break
            else:
                until = payload.get("until")
                if isinstance(until, int | float) and until <= now:
                    error = f"timeout: no signal {name} {_within(job, node)}"
                    out.append((d, timeout(d, error, started_at=now, finished_at=now)))
        return out, tuple(mailbox)

    def _todo(self, snap: Snapshot, now: float, *, waits_only: bool = False) -> list[Dispatch]:
        """The actions a step performs now (auto mode): in flight, not answered, not
        held, not waiting for their time; `waits_only`: just retries whose time came."""
        if self.manual:
            return []
        answered = {r.id for r in snap.queued} | {d.id for d, _ in snap.finished}
        return [
            d
            for i, d in snap.inflight.items()
            if i not in answered
            and i not in snap.held
            and d.action not in WAIT_ACTIONS
            and (d.due is None or d.due <= now)
            and (not waits_only or d.due is not None)
        ]

    def _step(self, waits_only: bool = False) -> StepReport:
        snap = self.current
        job = self.require_job()
        if job.done:
            raise ReplError(
                f"the job is done ({job.status}): :back to step back, or enter a new form"
            )
        now = self.now()
        woke, mailbox = self._woken(snap, now)
        fed = () if waits_only else snap.queued
        todo = self._todo(snap, now, waits_only=waits_only)
        performed: list[tuple[Dispatch, Result]] = [] if waits_only else list(snap.finished)
        if todo:
            try:
                results = self._perform(todo)
            except _StepInterrupted as stop:
                self._interrupted(snap, todo, stop.results)
            performed.extend(zip(todo, results, strict=True))
        results_in = [*fed, *(r for _, r in performed), *(r for _, r in woke)]
        if not results_in and job.restarts > 0 and not job.todo:
            raise ReplError(f"nothing to do: {self.blocked()}")
        at = self.now()
        new, dispatches = restart_job(job, results_in, at)
        # Leaves that got their result are no longer pending: they leave `inflight`.
        inflight = {i: d for i, d in snap.inflight.items() if _is_pending(new, i)}
        inflight.update((d.id, d) for d in dispatches)
        timing = dict(snap.timing)
        for r in fed:
            timing[r.id] = BY_HAND
        for _, r in performed:
            timing[r.id] = r.started_at
        held = frozenset(i for i in snap.held if i in inflight)
        queued = snap.queued if waits_only else ()
        finished = snap.finished if waits_only else ()
        report = StepReport(job, new, tuple(performed), fed, tuple(dispatches), tuple(woke), at)
        self._push(
            replace(
                snap,
                job=new,
                inflight=inflight,
                queued=queued,
                finished=finished,
                held=held,
                timing=timing,
                mailbox=mailbox,
                step=report,
            )
        )
        return report

    def _interrupted(
        self, snap: Snapshot, todo: list[Dispatch], results: dict[int, Result]
    ) -> None:
        """Keep what finished, hold what was in flight, and say so (raises)."""
        done = tuple((d, results[d.id]) for d in todo if d.id in results)
        lost = frozenset(d.id for d in todo if d.id not in results)
        self.current = replace(
            snap,
            finished=(*snap.finished, *done),
            held=snap.held | lost,
            now=self.clock.now(),
        )
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
        """Step until the job is done, or nothing can happen now: it waits for results by
        hand (manual mode), for interrupted actions, for a signal or for the clock; or a
        step dispatched a leaf a breakpoint matches (`hits` says which)."""
        reports: list[StepReport] = []
        self.hits = []
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
                snap, now = self.current, self.now()
                waiting_only = not snap.queued and not snap.finished and not job.todo
                if (
                    job.restarts > 0
                    and waiting_only
                    and not self._woken(snap, now)[0]
                    and not self._todo(snap, now)
                ):
                    break  # the person decides, or the clock or a signal has to come
                if self.breaks:
                    self.hits = self._hits(self._todo(snap, now), job)
                    if self.hits:
                        break  # before performing it: the person looks, then :continue
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
        """Perform dispatches at the same time (sync actions in daemon threads), each
        within its `:timeout` and `:heartbeat`; never raises for an action's error.
        Ctrl-C: _StepInterrupted with what finished.

        On a virtual clock the results' times are the clock's (the real durations kept),
        and a frozen clock moves on by the time the actions took."""
        actions = self.actions
        results: dict[int, Result] = {}
        threads = ActionThreads(self.concurrency)

        async def one(d: Dispatch) -> None:
            beat = Beat() if d.heartbeat is not None else None
            work = perform(d, actions.get(d.action), False, threads=threads, beat=beat)
            if d.timeout is None and beat is None:
                results[d.id] = await work
            else:
                results[d.id] = await supervise(d, work, beat)

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
        began, real = self.clock.now(), time.time()
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
            self._clock_times(results, began, real)
        if len(results) < len(dispatches) or self._stop:
            raise _StepInterrupted(results)
        return [results[d.id] for d in dispatches]

    def _clock_times(self, results: dict[int, Result], began: float, real: float) -> None:
        """Put the results' real times on the virtual clock; move a frozen clock on."""
        if not self.clock.virtual:
            return
        shift = began - real

        def moved(t: float | None) -> float | None:
            return None if t is None else t + shift

        for node, r in results.items():
            results[node] = replace(
                r, started_at=moved(r.started_at), finished_at=moved(r.finished_at)
            )
        if getattr(self.clock, "frozen", False):
            self.clock.advance(max(0.0, time.time() - real))

    @staticmethod
    def _redispatch(job: Job, leaf: Leaf) -> Dispatch:
        """A dispatch for a leaf already pending (a job loaded from a snapshot): a wait
        keeps the payload and the time it was dispatched with."""
        payload = leaf.sent if leaf.action in WAIT_ACTIONS else leaf.payload
        if payload is None:
            payload = leaf.payload
        if isinstance(payload, Expr):
            payload = payload.evaluate(job.context)
        due = None if leaf.action == AWAIT else leaf.wake
        return Dispatch(
            leaf.id,
            leaf.action,
            payload,
            leaf.idempotent,
            leaf.attempt,
            job.context,
            due,
            leaf.timeout,
            leaf.heartbeat,
        )


def wait_text(wait: Wait, now: float, live: bool = False) -> str:
    """A wait for people, with what ends it: `#1 sleeps until ... (in 30d): :advance 30d`,
    `#2 waits for the signal approval (until ..., in 1d): :signal approval VALUE`."""
    when = "" if wait.until is None else format_instant(wait.until)
    gap = None if wait.until is None else wait.until - now
    if gap is None:
        left = ""
    elif gap <= 0:
        left = "due now"
    else:
        left = f"in {format_duration(gap)}"
    if live:  # the real clock: nothing to move, a :step after that time ends it
        hint = ": :step once it is due" if gap and gap > 0 else ""
    else:
        hint = f": :advance {format_duration(gap).replace(' ', '')}" if gap and gap > 0 else ""
    if wait.kind == "sleep":
        return f"#{wait.node} sleeps until {when} ({left}){hint}"
    if wait.kind == "signal":
        until = f" (until {when}, {left})" if when else ""
        return f"#{wait.node} waits for the signal {wait.name}{until}: :signal {wait.name} VALUE"
    return f"#{wait.node} {wait.name} retries at {when} (attempt {wait.attempt}, {left}){hint}"


def _ready(wait: Wait, now: float) -> bool:
    return wait.kind != "signal" and wait.until is not None and wait.until <= now


def _within(job: Job, node: int) -> str:
    """`within 24h` for an await with a literal timeout, else `arrived in time`."""
    leaf = job.node(node)
    payload = leaf.payload if isinstance(leaf, Leaf) and isinstance(leaf.payload, dict) else {}
    limit = payload.get("timeout")
    if isinstance(limit, int | float) and not isinstance(limit, bool):
        return f"within {format_duration(float(limit))}"
    return "arrived in time"


def _is_pending(job: Job, node_id: int) -> bool:
    return job.node(node_id).result is LeafState.PENDING


def _ids(leaves: Sequence[Leaf]) -> str:
    return ", ".join(f"#{leaf.id}" for leaf in leaves)


def _id_list(ids: Any) -> str:
    return ", ".join(f"#{i}" for i in sorted(ids))
