"""Build workflow trees by hand (independent of the reader and compiler) and drive them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from pyrsistent import pvector

from ablauf_lang.engine.job import Job, make_job, restart_job
from ablauf_lang.engine.kinds import Augment, Leaf, Node, Par, Seq, Try
from ablauf_lang.engine.nodes import Dispatch, Result, failure, success


def L(
    name: str = "x",
    payload: Any = None,
    *,
    idempotent: bool = False,
    augment: tuple[Any, Any] | None = None,
) -> Leaf:
    """A leaf whose action is `name` (payload defaults to the name)."""
    aug = None if augment is None else Augment(tuple(augment[0]), tuple(augment[1]))
    return Leaf(-1, name, name if payload is None else payload, idempotent, aug)


def Do(*kids: Node) -> Seq:
    """A sequence."""
    return Seq(-1, pvector(kids))


def Par_(*kids: Node) -> Par:
    """A parallel node."""
    return Par(-1, pvector(kids))


def Try_(body: Iterable[Node], rescue: Iterable[Node] = (), fin: Iterable[Node] = ()) -> Try:
    """A try with body, rescue and finally sequences."""
    return Try(-1, pvector([Do(*body), Do(*rescue), Do(*fin)]))


def number(tree: Node) -> Node:
    """Give every node its pre-order id."""
    counter = [0]

    def go(node: Node) -> Node:
        my_id = counter[0]
        counter[0] += 1
        if isinstance(node, Leaf):
            return replace(node, id=my_id)
        kids = [go(c) for c in node.children]
        return replace(node, id=my_id, children=pvector(kids))

    return go(tree)


def job_of(tree: Node, context: dict[str, Any] | None = None) -> Job:
    """A fresh job for a hand-built tree."""
    return make_job(number(tree), context)


def by_name(outcomes: dict[str, Any]) -> Callable[[Dispatch], Result]:
    """Outcome per action name: a value means success with it, an Exception instance failure."""

    def outcome(d: Dispatch) -> Result:
        value = outcomes.get(d.action, d.payload)
        if isinstance(value, Exception):
            return failure(d, str(value))
        return success(d, value)

    return outcome


def drive(
    job: Job, outcome: Callable[[Dispatch], Result], *, max_steps: int = 10_000
) -> tuple[Job, list[Dispatch]]:
    """Restart until done, delivering every dispatch's outcome at once; return all dispatches."""
    job, dispatches = restart_job(job, [])
    seen = list(dispatches)
    for _ in range(max_steps):
        if not dispatches:
            break
        job, dispatches = restart_job(job, [outcome(d) for d in dispatches])
        seen.extend(dispatches)
    assert job.done, "job did not finish"
    return job, seen


def ran(dispatches: Iterable[Dispatch]) -> list[str]:
    """The action names in dispatch order."""
    return [d.action for d in dispatches]
