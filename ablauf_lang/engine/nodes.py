"""The engine's plain data: run and leaf states, dispatches, results.

The node kinds themselves (the tree a job is made of) live in `engine.kinds`, one module
per kind; this module holds only what they, the job and the runners exchange.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

T = TypeVar("T")


class Status(StrEnum):
    """Status of a run (or a job): pending until the root is done."""

    PENDING = "pending"
    SUCCESS = "success"
    FAILURE = "failure"


class LeafState(StrEnum):
    """A leaf's result; a leaf that never started has result `None` (unset, eligible)."""

    PENDING = "pending"  # dispatched, no result yet
    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"  # a failure kind
    SKIPPED = "skipped"  # never ran: its branch was not taken


FAILED_STATES = frozenset({LeafState.FAILURE, LeafState.TIMEOUT})
DONE_STATES = frozenset(
    {LeafState.SUCCESS, LeafState.FAILURE, LeafState.TIMEOUT, LeafState.SKIPPED}
)


class _All(Collection[int]):
    """Every child: the `dirty` set of a node entered fresh."""

    def __contains__(self, item: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        raise TypeError("ALL is not iterable: plan over range(len(children))")

    def __len__(self) -> int:
        return 1 << 30

    def __repr__(self) -> str:
        return "ALL"


ALL: Collection[int] = _All()  # in a job's `todo`: every child of that node
NOTHING: frozenset[int] = frozenset()


_FACTORY: Any = object()  # the default of a field whose default is made by a factory


def quick_init(cls: type[T]) -> type[T]:
    """Give a frozen slots dataclass an `__init__` that sets each slot through its
    descriptor, for the node kinds and the data a restart makes several of.

    The one `dataclasses` writes calls `object.__setattr__` for each field (it goes around
    the frozen class's `__setattr__`), which for the 19 fields of a leaf is twice the cost of
    setting them: a restart builds a few nodes, and that was a tenth of it. This one takes
    the same arguments (names, order, defaults, default factories) and makes the same
    object; the class stays frozen (its `__setattr__` still refuses), its equality, hash and
    repr are the dataclass's own.
    """
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    env: dict[str, Any] = {"_FACTORY": _FACTORY}
    params, body = [], []
    for i, f in enumerate(fields):
        if not f.init or f.kw_only:
            raise TypeError(f"quick_init: field {f.name} of {cls.__name__} is not positional")
        env[f"_set{i}"] = getattr(cls, f.name).__set__  # the slot's member descriptor
        if f.default is not dataclasses.MISSING:
            env[f"_default{i}"] = f.default
            params.append(f"{f.name}=_default{i}")
        elif f.default_factory is not dataclasses.MISSING:
            env[f"_factory{i}"] = f.default_factory
            params.append(f"{f.name}=_FACTORY")
            body.append(f"    if {f.name} is _FACTORY:\n        {f.name} = _factory{i}()")
        else:
            params.append(f.name)
        body.append(f"    _set{i}(self, {f.name})")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body or ["    pass"])
    exec(source, env)
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


@quick_init
@dataclass(frozen=True, slots=True)
class Dispatch:
    """An action to perform: what a restart asks a runner to do."""

    id: int
    action: str
    payload: Any
    idempotent: bool
    attempt: int
    context: Any = field(default=None, compare=False, repr=False)
    due: float | None = None  # not before this time (a retry's wait, a sleep's wake-up)
    timeout: float | None = None  # the limit of this attempt, in seconds
    heartbeat: float | None = None  # the longest silence allowed between heartbeats


@quick_init
@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one dispatch, fed back to `restart_job`."""

    id: int
    attempt: int | None  # None: whatever attempt is pending (hand-fed results)
    state: LeafState  # SUCCESS, FAILURE or TIMEOUT
    output: Any = None
    error: Any = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.state is LeafState.SUCCESS


def _target(dispatch: Dispatch | int, attempt: int | None) -> tuple[int, int | None]:
    if isinstance(dispatch, Dispatch):
        return dispatch.id, dispatch.attempt if attempt is None else attempt
    return int(dispatch), attempt


def success(
    dispatch: Dispatch | int,
    output: Any = None,
    *,
    attempt: int | None = None,
    started_at: float | None = None,
    finished_at: float | None = None,
) -> Result:
    """Result of a dispatch that succeeded with `output`."""
    node_id, att = _target(dispatch, attempt)
    return Result(node_id, att, LeafState.SUCCESS, output, None, started_at, finished_at)


def failure(
    dispatch: Dispatch | int,
    error: Any = None,
    *,
    attempt: int | None = None,
    started_at: float | None = None,
    finished_at: float | None = None,
) -> Result:
    """Result of a dispatch that failed with `error`."""
    node_id, att = _target(dispatch, attempt)
    return Result(node_id, att, LeafState.FAILURE, None, error, started_at, finished_at)


def timeout(
    dispatch: Dispatch | int,
    error: Any = "timeout",
    *,
    attempt: int | None = None,
    started_at: float | None = None,
    finished_at: float | None = None,
) -> Result:
    """Result of a dispatch that ran out of time (a failure kind)."""
    node_id, att = _target(dispatch, attempt)
    return Result(node_id, att, LeafState.TIMEOUT, None, error, started_at, finished_at)
