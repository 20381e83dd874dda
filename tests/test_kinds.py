"""A node kind is one module: a kind defined here, and registered, runs, renders and is
stored (JSON snapshot, memory and SQLite stores) with no change anywhere else."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Collection, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pyrsistent import pvector
from rich.console import Console

from ablauf_lang.engine.job import Job
from ablauf_lang.engine.kinds import KINDS, by_name, label_of, register, roles_of
from ablauf_lang.engine.kinds.base import STATE, T_INT, Counting, Stored, counted, counts
from ablauf_lang.engine.kinds.leaf import Augment
from ablauf_lang.engine.nodes import ALL, Dispatch, Result, Status
from ablauf_lang.engine.replay import failure_causes, prepare_replay
from ablauf_lang.engine.states import states
from ablauf_lang.errors import JobError
from ablauf_lang.stores.backend import open_store
from ablauf_lang.ui.render import job_tree
from tests.builders import L, drive, job_of
from tests.builders import by_name as outcomes


@register
@dataclass(frozen=True, slots=True)
class Quorum(Counting):
    """`(quorum!! n ...)`: children at the same time; succeeds once `need` of them have
    (a toy kind: the rest are left to finish, and it fails when too many fail)."""

    kind: ClassVar[str] = "test-quorum"
    label: ClassVar[str] = "quorum!!"
    stored: ClassVar[tuple[Stored, ...]] = (Stored("need", STATE, T_INT, required=True),)
    need: int = 1
    span: Any = field(default=None, compare=False, repr=False)

    @property
    def failed(self) -> bool:
        return self.n_failed > len(self.children) - self.need

    @property
    def done(self) -> bool:
        return self.n_done == len(self.children) or (self.failed and self.inflight == 0)

    def replace_child(self, index: int, child: Any) -> Quorum:
        kids, n_done, n_failed, inflight = counted(self, index, child)
        return type(self)(self.id, kids, n_done, n_failed, inflight, self.need, self.span)

    def summarize(self) -> Quorum:
        done, failed, inflight = counts(self.children)
        return type(self)(self.id, self.children, done, failed, inflight, self.need, self.span)

    def plan(self, dirty: Collection[int]) -> Sequence[int]:
        return range(len(self.children)) if dirty is ALL else sorted(dirty)


def quorum(need: int, *kids: Any) -> Any:
    """A Quorum node (typed Any: `Node` names the built-in kinds only)."""
    return Quorum(-1, pvector(kids), need=need)


def run(job: Job, fail: str = "b") -> Job:
    done, _ = drive(job, outcomes({fail: RuntimeError("no")}))
    return done


def test_a_registered_kind_runs_and_answers_every_question() -> None:
    job = run(job_of(quorum(2, L("a"), L("b"), L("c"))))
    assert job.status is Status.SUCCESS
    assert by_name("test-quorum") is Quorum
    assert Quorum not in KINDS
    assert label_of("test-quorum") == "quorum!!"
    console = Console(width=100, record=True)
    console.print(job_tree(job))
    assert "quorum!!" in console.export_text()
    assert roles_of("test-quorum") == ()
    assert states(job.root)[0] == "success"
    failed = run(job_of(quorum(3, L("a"), L("b"), L("c"))))
    assert failed.status is Status.FAILURE
    assert [n.action for n in failure_causes(failed.root)] == ["b"]


def test_a_registered_kind_survives_the_json_snapshot() -> None:
    job = run(job_of(quorum(2, L("a"), L("b"), L("c"))))
    back = Job.from_json(job.to_json())
    assert back == job
    root: Any = back.root
    assert root.need == 2
    retried = prepare_replay(Job.from_json(run(job_of(quorum(3, L("a"), L("b")))).to_json()))
    assert retried.status is Status.FAILURE  # a resume changes nothing recorded


@pytest.mark.parametrize("url", ["memory", "sqlite"])
def test_a_registered_kind_is_stored_by_the_stores(url: str, tmp_path: Path) -> None:
    store_url = None if url == "memory" else f"sqlite:///{tmp_path / 'runs.db'}"
    store = open_store(store_url)
    try:
        job = job_of(quorum(2, L("a"), L("b"), L("c")))
        run_id = store.create_run(job)
        final = run(job)
        store.record(run_id, final)
        assert store.load(run_id).job == final
    finally:
        store.close()


def test_two_kinds_cannot_share_a_stored_name() -> None:
    @dataclass(frozen=True, slots=True)
    class Other(Quorum):
        kind: ClassVar[str] = "test-quorum"

    with pytest.raises(ValueError, match="taken"):
        register(Other)


def test_an_unregistered_kind_is_refused_by_the_codec() -> None:
    @dataclass(frozen=True, slots=True)
    class Unknown(Quorum):
        kind: ClassVar[str] = "test-unknown"

    unknown: Any = Unknown(-1, pvector([L("a")]))
    job = job_of(unknown)
    with pytest.raises(JobError, match="cannot store a node of kind test-unknown"):
        job.to_json()


@pytest.fixture
def quorum_rule() -> Any:
    """The kind's one other place: its compiler rule, `(quorum!! need child ...)`."""
    from ablauf_lang.lang.compiler import RULES, Compiler, Env, Plan, rule
    from ablauf_lang.lang.forms import List

    @rule("quorum!!")
    def _quorum(c: Compiler, form: List, env: Env) -> Plan:
        need = form.items[1]

        def build(node_id: int, nodes: list[Any]) -> Any:
            return Quorum(node_id, pvector(nodes), need=need, span=form.span)

        return Plan(Quorum.kind, build, form.span, c.children(form, 2, env))

    yield
    del RULES["quorum!!"]


@pytest.mark.usefixtures("quorum_rule")
def test_a_kind_with_its_compiler_rule_runs_from_source(tmp_path: Path) -> None:
    import ablauf_lang

    source = '(do!! (quorum!! 2 (log!! "a") (fail!! "b") (log!! "c")) (log!! "after"))'
    root = ablauf_lang.compile(source)
    assert isinstance(root.children[0], Quorum)
    assert root.children[0].need == 2
    run = ablauf_lang.eval(source, store=f"sqlite:///{tmp_path / 'q.db'}")
    assert run.status is Status.SUCCESS
    stored = open_store(f"sqlite:///{tmp_path / 'q.db'}").load(run.run_id)
    assert stored.job == run.job
    quorum_node = stored.job.root.children[0]
    assert isinstance(quorum_node, Quorum)
    assert (quorum_node.n_done, quorum_node.n_failed) == (3, 1)


@pytest.mark.parametrize(
    "cls", [*KINDS, Counting, Augment, Dispatch, Result], ids=lambda c: c.__name__
)
def test_a_quick_init_takes_and_sets_what_the_dataclass_init_does(cls: type) -> None:
    fields = dataclasses.fields(cls)
    # The same class as `dataclasses` makes it, with the init `dataclasses` writes.
    twin = dataclasses.make_dataclass(
        cls.__name__,
        [
            (f.name, Any, field(default=f.default, default_factory=f.default_factory))
            for f in fields
        ],
        frozen=True,
        slots=True,
    )
    ours, theirs = inspect.signature(cls), inspect.signature(twin)
    assert [(p.name, p.kind) for p in ours.parameters.values()] == [
        (p.name, p.kind) for p in theirs.parameters.values()
    ]
    values = [object() for _ in fields]
    every = cls(*values)
    assert [getattr(every, f.name) for f in fields] == values
    named = cls(**{f.name: v for f, v in zip(fields, values, strict=True)})
    assert [getattr(named, f.name) for f in fields] == values
    required = [f for f in fields if f.default is MISSING and f.default_factory is MISSING]
    least = cls(*values[: len(required)])
    twin_least = twin(*values[: len(required)])
    assert [getattr(least, f.name) for f in fields] == [getattr(twin_least, f.name) for f in fields]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(every, fields[0].name, 1)  # still frozen
    with pytest.raises(TypeError):
        cls(*values, None)  # one argument too many, as with the dataclass's own
