"""Group commit (`runners.group`): the restarts of runs driven together in one event loop
on one SQLite store share transactions, and none is reported recorded before its commit.

On a real SQLite file; a second store object (another connection, as another process
would be) reads what is committed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ablauf_lang
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.states import states
from ablauf_lang.errors import AblaufError, StoreError
from ablauf_lang.runners.group import _groups
from ablauf_lang.runners.sleeper import Sleeper
from ablauf_lang.stores.sqlite import SqliteStore
from tests.strategies import workflow_sources

ACTIONS = {"t/echo": lambda p, c: p, "test/act": lambda p, c: p}


def alone(source: str) -> tuple[str, list[Any]]:
    run = ablauf_lang.eval(source, ACTIONS)
    return str(run.status), states(run.job.root)


async def together(store: SqliteStore, sources: list[str], **kw: Any) -> list[Any]:
    return await asyncio.gather(
        *(ablauf_lang.eval_async(s, ACTIONS, store=store, **kw) for s in sources),
        return_exceptions=True,
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(workflow_sources, min_size=2, max_size=5))
def test_runs_driven_together_end_as_each_does_alone_and_share_commits(
    tmp_path: Path, sources: list[str]
) -> None:
    path = tmp_path / "g.db"
    path.unlink(missing_ok=True)
    store = SqliteStore(str(path))
    try:
        runs = asyncio.run(together(store, sources))
        group = _groups[store]
        other = SqliteStore(str(path))  # what another process reads: only what committed
        try:
            for source, run in zip(sources, runs, strict=True):
                assert not isinstance(run, BaseException), run
                status, shown = alone(source)
                assert str(run.status) == status
                if "dopar!!" not in source:  # in parallel, results come in either order
                    assert states(run.job.root) == shown
                stored = other.load(run.run_id).job
                assert stored.restarts == run.job.restarts
                assert stored.status == run.job.status
                steps = other.history(run.run_id).steps
                assert [s.restart for s in steps] == list(range(run.job.restarts + 1))
        finally:
            other.close()
        restarts = sum(r.job.restarts for r in runs)
        assert group.grouped > 0
        assert group.commits < group.grouped  # restarts of several runs shared a commit
        assert group.grouped <= restarts
        assert group.runners == 0
    finally:
        store.close()


def test_no_run_goes_on_before_its_restart_is_committed(tmp_path: Path) -> None:
    """At every restart's hook (after the record, before any action is launched) another
    connection already reads that restart: the group committed it."""
    path = str(tmp_path / "g.db")
    store = SqliteStore(path)
    other = SqliteStore(path)
    seen: list[tuple[int, int]] = []
    ids: dict[int, str] = {}

    def hook(n: int) -> Any:
        def on_restart(job: Job, dispatches: Any, results: Any) -> None:
            run_id = ids.get(n) or next(
                r.run_id for r in other.list_runs() if r.run_id not in ids.values()
            )
            ids[n] = run_id
            seen.append((job.restarts, other.load(run_id).job.restarts))

        return on_restart

    source = "(do!! " + " ".join(f"(action!! :t/echo {i})" for i in range(8)) + ")"

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(
                ablauf_lang.eval_async(source, ACTIONS, store=store, on_restart=hook(n))
                for n in range(5)
            )
        )

    runs = asyncio.run(main())
    assert all(r.status == "success" for r in runs)
    assert len(seen) == 5 * 9
    assert all(mine == committed for mine, committed in seen), seen
    assert _groups[store].commits < _groups[store].grouped
    store.close()
    other.close()


def test_a_run_whose_write_fails_fails_alone(tmp_path: Path) -> None:
    """A run written by another process meanwhile: its next restart is refused (in the
    group, its savepoint undone), the runs grouped with it commit and finish."""
    path = str(tmp_path / "g.db")
    store = SqliteStore(path)
    intruder = SqliteStore(path)
    source = "(do!! " + " ".join(f"(action!! :t/echo {i})" for i in range(6)) + ")"
    victim: list[str] = []

    def meddle(job: Job, dispatches: Any, results: Any) -> None:
        if job.restarts == 2 and not victim:
            run_id = next(r.run_id for r in intruder.list_runs() if r.status == "pending")
            victim.append(run_id)
            stored = intruder.load(run_id).job
            intruder.record(run_id, stored)  # another writer's step: the run moved on

    async def main() -> list[Any]:
        first = ablauf_lang.eval_async(source, ACTIONS, store=store, on_restart=meddle)
        rest = [ablauf_lang.eval_async(source, ACTIONS, store=store) for _ in range(4)]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    runs = asyncio.run(main())
    failed = [r for r in runs if isinstance(r, BaseException)]
    assert len(failed) == 1
    assert isinstance(failed[0], AblaufError)
    finished = [r for r in runs if not isinstance(r, BaseException)]
    assert len(finished) == 4
    assert all(r.status == "success" for r in finished)
    for r in finished:
        assert intruder.load(r.run_id).job.status == "success"
    store.close()
    intruder.close()


class FailingCommit(SqliteStore):
    """Fault injection: the group's COMMIT fails once (as a full disk would)."""

    fail = 1

    @contextmanager
    def group(self) -> Iterator[None]:
        with super().group():
            yield
            if self.fail:
                self.fail -= 1
                raise StoreError("injected: the commit failed")


def test_a_failed_group_commit_fails_every_run_of_it_and_loses_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "g.db")
    store = FailingCommit(path)
    source = "(do!! " + " ".join(f"(action!! :t/echo {i})" for i in range(5)) + ")"
    runs = asyncio.run(together(store, [source] * 4))
    assert all(isinstance(r, StoreError) for r in runs), runs
    store.close()
    # What was committed is whole: each run stands at its last committed restart, and
    # resuming finishes it.
    reader = SqliteStore(path)
    ids = [r.run_id for r in reader.list_runs()]
    assert len(ids) == 4
    for run_id in ids:
        assert reader.load(run_id).job.restarts == 0  # the first restart was the batch lost
    reader.close()
    for run_id in ids:
        run = ablauf_lang.resume(run_id, store=f"sqlite:///{path}", actions=ACTIONS, force=True)
        assert run.status == "success"


def test_the_one_host_worker_wakes_due_runs_together(tmp_path: Path) -> None:
    path = str(tmp_path / "g.db")
    url = f"sqlite:///{path}"
    source = '(do!! (sleep!! "10ms") ' + " ".join(f"(log!! {i})" for i in range(4)) + ")"
    ids = [ablauf_lang.eval(source, store=url, detach=True).run_id for _ in range(6)]
    store = SqliteStore(path)
    asyncio.run(asyncio.sleep(0.05))
    sleeper = Sleeper(store)
    assert asyncio.run(sleeper.round()) == 6
    group = _groups[store]
    assert group.commits < group.grouped
    for run_id in ids:
        assert store.load(run_id).job.status == "success"
    store.close()


def test_a_run_alone_records_without_grouping(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "g.db"))
    run = asyncio.run(ablauf_lang.eval_async("(do!! (log!! 1) (log!! 2))", store=store))
    assert run.status == "success"
    assert _groups[store].grouped == 0
    with pytest.raises(KeyError):
        _groups[SqliteStore(str(tmp_path / "h.db"))]
    store.close()
