"""Random schedules of failures, timeouts and crashes against a program
(`ablauf test FILE.abl --faults N`), checked against the recovery invariants.

Nothing real runs: every action the program names is answered by a stand-in, and the
pure reducer (`restart_job`) and the resume of a crashed run (`prepare_replay`, as
`ablauf runs resume` does it) are driven directly on a virtual clock, so thousands of
schedules take seconds. A schedule is one decision per action performed, in order:

    ok            the action does its work and succeeds (output nil)
    fail          the action fails and does nothing
    timeout       the action does its work, but its result is lost: the leaf times out
    crash         the process dies before the action starts: what the run had not
                  recorded is lost, then the run is resumed
    crash-after   the process dies after the action did its work, before its result
                  was recorded; then the run is resumed

Waits end at once (a sleep at its time, an await with a signal of value nil). The
standard library's actions keep their meaning (`log!!` succeeds, `fail!!` fails) and take
only crashes. A schedule has at most `MAX_CRASHES` crashes, so every run can go on.

The invariants (the recovery issue's):

1. the run ends: success or failure, within `MAX_RESTARTS` restarts, never stuck pending
   with nothing in flight;
2. every `finally!!` whose `try!!` body started has run: its steps have outcomes (a
   `try!!` inside a `dopar!!` that failed, or a `timeout!!` that expired, is cut off by
   the language's rules: nothing new starts there, a finally included);
3. no non-idempotent action does its work twice unless a person asked for a retry (the
   schedules never ask): an action performed again, with the same payload, after an
   earlier performance whose outcome the engine could not know (a timeout, a crash after
   it did its work). A program that performs the same action with the same payload in
   two places on purpose is not flagged: the first performance was known to be done.
   That is what `std/retry`'s `with-retries` gets wrong for a non-idempotent action:
   after a timeout its rescue performs a copy of it.

The first schedule that breaks an invariant is shrunk (each fault turned into `ok` while
the invariant still breaks) and written as a test file of kind `faults` (program,
context, seed, schedule) that `ablauf test` replays: it fails while the bug is there and
passes once the program is fixed.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablauf_lang import values
from ablauf_lang.api import compile as compile_program
from ablauf_lang.api import make_job, restart_job
from ablauf_lang.codec.delta import subtree
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.kinds import Leaf
from ablauf_lang.engine.nodes import Dispatch, LeafState, Result, failure, success
from ablauf_lang.engine.nodes import timeout as timed_out
from ablauf_lang.engine.replay import prepare_replay
from ablauf_lang.names import STDLIB_ACTIONS, WAIT_ACTIONS
from ablauf_lang.testing.outcome import (
    FORMAT_KEY,
    FORMAT_VERSION,
    SUFFIX,
    TestFileError,
    TestOutcome,
)
from ablauf_lang.testing.session import start_of, write_test
from ablauf_lang.ui.render import format_value

__all__ = [
    "DECISIONS",
    "FaultReport",
    "Violation",
    "check_faults_file",
    "format_report",
    "run_faults",
    "run_schedule",
]

KIND = "faults"
FAIL_ACTION = "action/fail"  # what `fail!!` performs
OK, FAIL, TIMEOUT, CRASH, CRASH_AFTER = "ok", "fail", "timeout", "crash", "crash-after"
DECISIONS = (OK, FAIL, TIMEOUT, CRASH, CRASH_AFTER)
WEIGHTS = (0.6, 0.15, 0.1, 0.075, 0.075)
MAX_CRASHES = 3
MAX_RESTARTS = 20_000
T0 = 1_700_000_000.0  # the virtual clock's start
INVARIANTS = ("the run ends", "every finally!! runs", "no non-idempotent action twice")


@dataclass(frozen=True, slots=True)
class Violation:
    """An invariant a schedule broke, in words."""

    invariant: str  # one of INVARIANTS
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "message": self.message}


@dataclass(slots=True)
class _Effect:
    node: int
    attempt: int
    known: bool  # the engine learnt its outcome


@dataclass(slots=True)
class _Run:
    """One schedule's run: the job, the clock, what the stand-ins did."""

    job: Job
    schedule: list[str]  # decisions to follow (replay); more are drawn when it runs out
    rng: random.Random | None
    now: float = T0
    used: list[str] = field(default_factory=list)
    crashes: int = 0
    restarts: int = 0
    effects: dict[tuple[str, str], list[_Effect]] = field(default_factory=dict)
    violation: Violation | None = None

    def decide(self, crashable: bool) -> str:
        i = len(self.used)
        if i < len(self.schedule):
            choice = self.schedule[i]
        elif self.rng is not None:
            choice = self.rng.choices(DECISIONS, WEIGHTS)[0]
        else:
            choice = OK
        if choice in (CRASH, CRASH_AFTER) and (self.crashes >= MAX_CRASHES or not crashable):
            choice = OK
        self.used.append(choice)
        return choice


def _payload_key(payload: Any) -> str:
    return json.dumps(values.encode(payload), sort_keys=True, default=str)


def _effect(run: _Run, d: Dispatch, known: bool) -> None:
    """The stand-in for `d` did its work (`known`: the engine will learn its outcome)."""
    if d.idempotent or d.action in STDLIB_ACTIONS:
        return
    key = (d.action, _payload_key(d.payload))
    earlier = run.effects.setdefault(key, [])
    unknown = [e for e in earlier if not e.known]
    if unknown and run.violation is None:
        first = unknown[0]
        run.violation = Violation(
            INVARIANTS[2],
            f"non-idempotent :{d.action} did its work twice with the same payload "
            f"{_show(d.payload)}: first as node {first.node} (attempt {first.attempt}), "
            "whose outcome was lost (a timeout or a crash), then again as node "
            f"{d.id} (attempt {d.attempt}) with no retry asked for",
        )
    earlier.append(_Effect(d.id, d.attempt, known))


def _show(value: Any) -> str:
    return format_value(value, 60)


def _lose(run: _Run, done: Sequence[Dispatch]) -> None:
    """A crash: the work of `done` happened but its results are lost."""
    for d in done:
        for effects in run.effects.values():
            for e in effects:
                if e.node == d.id and e.attempt == d.attempt:
                    e.known = False


def _perform(run: _Run, d: Dispatch) -> tuple[Result | None, bool]:
    """A stand-in performs `d`: its result (None: lost), and whether the process crashed."""
    now = run.now
    if d.action in WAIT_ACTIONS:  # a sleep at its time, an await with a nil signal
        return success(d, None, started_at=now, finished_at=now), False
    stdlib = d.action in STDLIB_ACTIONS
    choice = run.decide(crashable=True)
    if choice == CRASH:
        return None, True
    if choice == CRASH_AFTER:
        _effect(run, d, known=False)
        return None, True
    if stdlib:  # the standard library keeps its meaning
        if d.action != FAIL_ACTION:
            return success(d, d.payload, started_at=now, finished_at=now), False
        return failure(d, d.payload or "fail!!", started_at=now, finished_at=now), False
    if choice == FAIL:
        return failure(d, "stand-in: failed", started_at=now, finished_at=now), False
    if choice == TIMEOUT:
        _effect(run, d, known=False)
        return timed_out(d, "timeout", started_at=now, finished_at=now), False
    _effect(run, d, known=True)
    return success(d, None, started_at=now, finished_at=now), False


def _cut(node: Any) -> bool:
    """True when nothing new starts inside `node` any more (by the language's rules): a
    `dopar!!`/`pmap!!` with a failed child, a `timeout!!` whose deadline passed."""
    kind = getattr(node, "kind", None)
    if kind in ("par", "pmap"):
        return bool(getattr(node, "n_failed", 0))
    return kind == "deadline" and bool(getattr(node, "expired", False))


def _finally_broken(job: Job) -> str | None:
    """A try!! whose body started and whose finally!! did not run, described. A try!!
    inside a failed `dopar!!` (or an expired `timeout!!`) is cut off by the language's
    rules (nothing new starts there), and an aborted run starts nothing: not counted."""
    if job.aborted is not None:
        return None
    stack: list[tuple[Any, bool]] = [(job.root, False)]
    while stack:
        node, cut = stack.pop()
        inner = cut or _cut(node)
        stack.extend((c, inner) for c in getattr(node, "children", ()))
        if getattr(node, "kind", None) != "try" or cut:
            continue
        body, _, final = node.children
        if not list(final.children):
            continue
        started = any(leaf.result not in (None, LeafState.SKIPPED) for leaf in _leaves(body))
        if not started:
            continue
        # A rescue!! inside the finally!! is skipped when nothing failed: not a sign.
        steps = _leaves_outside_rescues(final)
        ran = final.done and (not steps or any(s.result is not LeafState.SKIPPED for s in steps))
        if not ran:
            line = node.span.line if node.span is not None else "?"
            return f"the finally!! of try!! node {node.id} (line {line}) did not run"
    return None


def _leaves(node: Any) -> list[Leaf]:
    return [n for n in subtree(node) if isinstance(n, Leaf)]


def _leaves_outside_rescues(node: Any) -> list[Leaf]:
    """The leaves under `node` but those of the rescue!! of a try!! inside it."""
    out: list[Leaf] = []
    todo = [node]
    while todo:
        n = todo.pop()
        if isinstance(n, Leaf):
            out.append(n)
            continue
        kids = list(getattr(n, "children", ()))
        if getattr(n, "kind", None) == "try" and len(kids) == 3:
            kids = [kids[0], kids[2]]
        todo.extend(kids)
    return out


def run_schedule(
    job: Job, schedule: Sequence[str] = (), rng: random.Random | None = None
) -> tuple[list[str], Violation | None, Job]:
    """Run one schedule (its decisions, then ones drawn from `rng`, then `ok`): the
    decisions used, the first invariant broken (None: all held), the job at the end."""
    run = _Run(job, list(schedule), rng)
    job, dispatches = restart_job(run.job, [], run.now)
    inflight = {d.id: d for d in dispatches}
    run.restarts = 1
    while not job.done:
        if run.violation is not None:
            break
        if run.restarts > MAX_RESTARTS:
            run.violation = Violation(
                INVARIANTS[0], f"the run did not end within {MAX_RESTARTS} restarts"
            )
            break
        ready = sorted(
            (d for d in inflight.values() if d.due is None or d.due <= run.now),
            key=lambda d: d.id,
        )
        if not ready:
            if not inflight:
                waiting = ", ".join(f"#{leaf.id}" for leaf in job.pending()) or "nothing"
                run.violation = Violation(
                    INVARIANTS[0],
                    f"the run is stuck: pending, nothing in flight to perform (pending "
                    f"leaves: {waiting}), after {run.restarts} restarts",
                )
                break
            run.now = max(run.now, min(d.due or run.now for d in inflight.values()))
            continue
        results: list[Result] = []
        done: list[Dispatch] = []
        crashed = False
        for d in ready:
            result, crashed = _perform(run, d)
            if crashed:
                break
            assert result is not None
            results.append(result)
            done.append(d)
        run.now += 1.0
        if crashed:
            run.crashes += 1
            _lose(run, done)
            job = prepare_replay(job, now=run.now)
            job, dispatches = restart_job(job, [], run.now)
            inflight = {d.id: d for d in dispatches}
        else:
            job, dispatches = restart_job(job, results, run.now)
            for d in done:
                inflight.pop(d.id, None)
            inflight.update((d.id, d) for d in dispatches)
        run.restarts += 1
    if run.violation is None and job.done:
        broken = _finally_broken(job)
        if broken is not None:
            run.violation = Violation(INVARIANTS[1], broken)
    return run.used, run.violation, job


def _shrink(job: Job, schedule: list[str], violation: Violation) -> tuple[list[str], Violation]:
    """Turn faults into `ok` one by one while the same invariant still breaks."""
    best, found = list(schedule), violation
    i = 0
    while i < len(best):
        i += 1
        if best[i - 1] == OK:
            continue
        trial = [*best[: i - 1], OK, *best[i:]]
        used, broken, _ = run_schedule(job, trial)
        if broken is not None and broken.invariant == found.invariant:
            best, found = used, broken
    while best and best[-1] == OK:
        best.pop()
    return best, found


@dataclass(frozen=True, slots=True)
class FaultReport:
    """What `run_faults` found."""

    filename: str | None
    schedules: int  # schedules run (up to the first that broke an invariant)
    asked: int
    seed: int
    violation: Violation | None
    schedule: tuple[str, ...]  # the (shrunk) schedule that broke it
    written: str | None  # the test file that reproduces it
    seconds: float
    faults: dict[str, int]  # decisions made over all schedules, by kind

    @property
    def passed(self) -> bool:
        return self.violation is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.filename,
            "passed": self.passed,
            "schedules": self.schedules,
            "asked": self.asked,
            "seed": self.seed,
            "invariants": list(INVARIANTS),
            "violation": None if self.violation is None else self.violation.to_dict(),
            "schedule": list(self.schedule),
            "written": self.written,
            "seconds": round(self.seconds, 3),
            "faults": self.faults,
        }


def faults_data(
    source: str,
    filename: str | None,
    context: Mapping[str, Any] | None,
    seed: int,
    schedule: Sequence[str],
    violation: Violation | None,
) -> dict[str, Any]:
    """A `faults` test file's data."""
    name = Path(filename).stem if filename else "program"
    return {
        FORMAT_KEY: FORMAT_VERSION,
        "kind": KIND,
        "name": f"{name} faults (seed {seed})",
        "program": source,
        "filename": filename,
        "context": values.encode(dict(context or {}), "the context"),
        "seed": seed,
        "schedule": list(schedule),
        "violation": None if violation is None else violation.to_dict(),
    }


def run_faults(
    source: str,
    filename: str | None,
    n: int,
    *,
    seed: int | None = None,
    context: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
) -> FaultReport:
    """Run `n` random schedules (reproducible from `seed`) and report the first that
    breaks an invariant, shrunk and written to `out_dir` (default: beside the program,
    or the current directory) as a `faults` test file. AblaufError for a program that
    does not compile (with its position)."""
    job = make_job(compile_program(source, filename), dict(context or {}))
    chosen = random.SystemRandom().randrange(1 << 32) if seed is None else int(seed)
    rng = random.Random(chosen)
    started = time.perf_counter()
    counts = dict.fromkeys(DECISIONS, 0)
    for i in range(n):
        used, violation, _ = run_schedule(job, (), random.Random(rng.randrange(1 << 62)))
        for choice in used:
            counts[choice] += 1
        if violation is None:
            continue
        schedule, violation = _shrink(job, used, violation)
        folder = Path(out_dir) if out_dir is not None else _home(filename)
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(filename).stem if filename else "program"
        data = faults_data(source, filename, context, chosen, schedule, violation)
        target = write_test(folder / f"{stem}-faults-{chosen}{SUFFIX}", data)
        return FaultReport(
            filename,
            i + 1,
            n,
            chosen,
            violation,
            tuple(schedule),
            str(target),
            time.perf_counter() - started,
            counts,
        )
    return FaultReport(
        filename, n, n, chosen, None, (), None, time.perf_counter() - started, counts
    )


def _home(filename: str | None) -> Path:
    if filename and not filename.startswith("<"):
        return Path(filename).resolve().parent
    return Path.cwd()


def format_report(report: FaultReport) -> str:
    """The report for people."""
    faults = ", ".join(f"{k} {v}" for k, v in report.faults.items() if k != OK and v)
    head = (
        f"{report.filename or 'program'}: {report.schedules} schedule"
        f"{'' if report.schedules == 1 else 's'} of failures, timeouts and crashes "
        f"(seed {report.seed}; {faults or 'no faults drawn'}) in {report.seconds:.2f}s"
    )
    checked = "checked: " + "; ".join(INVARIANTS)
    if report.violation is None:
        return f"{head}\n{checked}\nok: every schedule kept every invariant"
    shown = " ".join(report.schedule) or "(no faults)"
    return "\n".join(
        [
            head,
            checked,
            f"broken: {report.violation.invariant}: {report.violation.message}",
            f"schedule: {shown}",
            f"written: {report.written} (`ablauf test {report.written}` replays it)",
        ]
    )


def check_faults_file(data: dict[str, Any], path: str) -> TestOutcome:
    """Replay a `faults` test file's schedule against its program: passes when every
    invariant holds."""
    name = str(data.get("name") or Path(path).stem)
    schedule = data.get("schedule") or []
    if not isinstance(schedule, list) or any(s not in DECISIONS for s in schedule):
        raise TestFileError(f"{path}: the schedule must be a list of {', '.join(DECISIONS)}")
    start = start_of(data, path, name)
    if isinstance(start, TestOutcome):
        return start
    used, violation, end = run_schedule(start.job, schedule)
    if violation is not None:
        return TestOutcome(
            path,
            name,
            False,
            f"{violation.invariant}: {violation.message}",
            diff=f"schedule: {' '.join(used)}",
            restart=end.restarts,
        )
    against = f" of {start.filename}" if start.from_file else ""
    return TestOutcome(
        path,
        name,
        True,
        f"the schedule keeps every invariant{against} (the run ends {end.status})",
    )
