"""Replay: abort a run, and make a stored run ready to go on (resume) or run again (retry).

    abort          :: Job -> Job        fail what is in flight, start nothing new
    prepare_replay :: Job -> Job        resume after a crash, or retry what failed
    inflight_dispatches :: Job -> [Dispatch]   what is in flight, as it was sent (take-over)
    check_replay   :: the policy: RunError unless a resume (or retry) would do something

Pure functions over jobs, as `restart_job` is; the API and the worker both call them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any

from ablauf_lang.code import Expr
from ablauf_lang.engine.job import INTERRUPTED, LAST_ERROR, REDO, ROOT, Job, Step
from ablauf_lang.engine.kinds import Leaf, Node
from ablauf_lang.engine.kinds.base import rebuild
from ablauf_lang.engine.nodes import ALL, Dispatch, LeafState, Result, Status
from ablauf_lang.errors import RunError
from ablauf_lang.names import AWAIT, SLEEP, WAIT_ACTIONS
from ablauf_lang.values import assoc_in


def _rewrite(job: Job, leaf_fn: Any) -> tuple[Node, set[int]]:
    touched: set[int] = set()

    def fn(leaf: Leaf) -> Leaf:
        new: Leaf = leaf_fn(leaf)
        if new is not leaf:
            touched.add(leaf.id)
        return new

    return rebuild(job.root, fn), touched


def abort(job: Job, reason: Any = "aborted") -> Job:
    """Fail every pending leaf with `reason` and stop the run: nothing new will start."""

    def fail(leaf: Leaf) -> Leaf:
        if leaf.result is LeafState.PENDING:
            return replace(leaf, result=LeafState.FAILURE, error=reason)
        return leaf

    root, touched = _rewrite(job, fail)
    context = assoc_in(job.context, (LAST_ERROR,), reason) if touched else job.context
    return replace(job, root=root, context=context, touched=frozenset(touched), aborted=str(reason))


def is_interrupted(leaf: Leaf) -> bool:
    """A non-idempotent leaf that failed because its outcome is unknown (crash, lost lease)."""
    return (
        leaf.result is LeafState.FAILURE
        and isinstance(leaf.error, str)
        and leaf.error.startswith(INTERRUPTED)
    )


def inflight_leaves(root: Node) -> list[Leaf]:
    """The leaves in flight, in pre-order; descends only where something is in flight."""
    out: list[Leaf] = []
    stack: list[Node] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Leaf):
            if node.result is LeafState.PENDING:
                out.append(node)
        elif node.inflight:
            stack.extend(reversed(node.children))
    return out


def leaf_dispatch(leaf: Leaf, context: Any) -> Dispatch:
    """The dispatch of a leaf in flight, as its attempt was sent (the payload computed then,
    its wake-up or next attempt's time as `due`); `context` is the one to send with it."""
    sent = isinstance(leaf.payload, Expr) or leaf.action in WAIT_ACTIONS
    due = leaf.wake if leaf.action == SLEEP or (leaf.attempts and leaf.action != AWAIT) else None
    return Dispatch(
        leaf.id,
        leaf.action,
        leaf.sent if sent else leaf.payload,
        leaf.idempotent,
        leaf.attempt,
        context,
        due,
        leaf.timeout,
        leaf.heartbeat,
    )


def inflight_dispatches(job: Job) -> list[Dispatch]:
    """The dispatches of the leaves in flight, the same attempts (the job is unchanged):
    for a runner that takes a run over and cannot know which of them reached a worker
    (the Kafka restarter after a crash). Sent with the job's context as it is now."""
    return [leaf_dispatch(leaf, job.context) for leaf in inflight_leaves(job.root)]


def accepts(job: Job, result: Result) -> bool:
    """True when `restart_job` would apply `result` (its leaf waits for that attempt);
    False for a duplicate, a stale attempt or a node that is not an action."""
    if not 0 <= result.id < len(job.paths):
        return False
    leaf = job.node(result.id)
    return (
        isinstance(leaf, Leaf)
        and leaf.result is LeafState.PENDING
        and (result.attempt is None or result.attempt == leaf.attempt)
    )


def failure_causes(root: Node) -> list[Node]:
    """The nodes whose failure made the run fail: what a retry runs again.

    Descends from the root through failed nodes only. A failure a rescue handled (the
    body of a try whose rescue ran) is not a cause, and neither is an attempt that a
    later one superseded (it sits in a handled body); when a rescue itself failed, its
    failure is the cause, not the body's. Returns failed leaves, and `if!!`/`doseq!!`/
    `pmap!!` nodes whose test or collection could not be evaluated.

    | node     | causes                                                     |
    |----------|------------------------------------------------------------|
    | leaf     | itself                                                     |
    | do!!     | its failed child's causes                                  |
    | dopar!!  | the causes of every failed child                           |
    | try!!    | finally's if it failed; the rescue's if it failed; the     |
    |          | body's if it failed with an empty rescue                   |
    | if!!     | itself if its test failed, else its branch's               |
    | doseq!!  | itself if its collection failed, else its failed children's |
    """
    out: list[Node] = []
    # A try reports failure only once done: inside a run still going, a failed body whose
    # rescue has not run yet is not (yet) a cause.
    stack: list[Node] = [root] if root.failed else []
    while stack:
        node = stack.pop()
        kids = node.cause_children()
        if kids is None:
            out.append(node)  # a failed leaf, or a test or collection that failed
            continue
        stack.extend(reversed([k for k in kids if k.failed]))
    return out


def can_resume(job: Job) -> bool:
    """True when the run is unfinished: resuming it performs or starts something."""
    return not job.done


def can_retry(job: Job) -> bool:
    """True when a retry would run something again: failures, an abort, work in flight."""
    if job.status is Status.SUCCESS:
        return False
    return job.aborted is not None or job.inflight > 0 or bool(failure_causes(job.root))


def _frozen_todo(todo: dict[int, Any]) -> dict[int, Collection[int]]:
    return {k: (v if v is ALL else frozenset(v)) for k, v in todo.items() if v}


def not_started(leaf: Leaf, now: float | None) -> bool:
    """True for a leaf in flight whose attempt surely has not begun: a retry still in its
    wait (a runner never starts an attempt before its time)."""
    return bool(leaf.attempts) and leaf.wake is not None and now is not None and leaf.wake > now


def prepare_replay(job: Job, *, retry_interrupted: bool = False, now: float | None = None) -> Job:
    """Make a job ready to go on after a crash (resume) or to be retried (a person asked).

    Resume touches only the leaves in flight: an idempotent one (a wait among them) is
    dispatched again by the next restart (a new attempt that keeps a wait's recorded time:
    a sleep is not started over); a non-idempotent one fails `interrupted: ...` (its
    outcome is unknown) unless it surely had not begun (a retry whose time, after `now`,
    is still to come), and the run goes on by the normal semantics, so a rescue may
    handle it. Recorded successes, failures and skips never change.

    Retry (`retry_interrupted=True`) dispatches every leaf in flight again, whatever its
    idempotency, runs again what made the run fail (`failure_causes`: unhandled failures,
    interrupted leaves, leaves whose action was unknown), lets the branches they stopped
    go on, clears an abort and drops the stale `exec/last-error`.
    """
    rs = Step(job, None)
    inflight = inflight_leaves(job.root)
    if retry_interrupted:
        for leaf in inflight:
            rs.hand_back(leaf)
        for node in failure_causes(job.root):
            found, above, path = rs.locate(node.id)
            rs.put(above, path, found.reset())
            rs.touched.add(node.id)
            rs.mark_dirty(above, path)
        rs.dirty[ROOT] = ALL  # walk the whole tree once: stopped branches go on
        context = {k: v for k, v in rs.context.items() if k != LAST_ERROR}
        aborted = None
    else:
        for leaf in inflight:
            fresh = not_started(leaf, now) or leaf.action in WAIT_ACTIONS
            if leaf.idempotent or fresh:
                rs.hand_back(leaf, same_attempt=fresh)
            else:
                error = INTERRUPTED + f"{leaf.action} was in flight and is not idempotent"
                rs.apply(Result(leaf.id, leaf.attempt, LeafState.FAILURE, error=error))
        context = rs.context
        aborted = job.aborted
    todo = dict(rs.dirty)
    if rs.redo:
        todo[REDO] = rs.redo
    return Job(
        rs.root, context, rs.paths, _frozen_todo(todo), job.restarts, frozenset(rs.touched), aborted
    )


def check_replay(run_id: str, job: Job, *, retry: bool) -> None:
    """RunError unless the run can be resumed (`retry=False`) or retried (`retry=True`):
    the one rule `ablauf_lang.resume`/`retry` and the worker's requeue follow."""
    if not retry:
        if job.done:
            raise RunError(
                f"run {run_id} already finished ({job.status}); use retry to run "
                "its failed steps again"
            )
        if not can_resume(job):
            raise RunError(f"run {run_id} has nothing to resume")
        return
    if job.status is Status.SUCCESS:
        raise RunError(f"run {run_id} succeeded: nothing to retry")
    if not can_retry(job):
        raise RunError(f"run {run_id} has nothing to retry")
