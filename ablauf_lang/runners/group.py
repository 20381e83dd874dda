"""Group commit: the restarts of different runs driven in one event loop, on one store,
written in one transaction.

    group = group_for(store)        # None: the store cannot group its writes
    if group is not None and group.join():
        ...                         # this runner drives a run of `store`
        await group.record(run_id, job)   # when group.shared: returns after the commit
        group.leave()

A runner alone on its store records as before, one commit a restart, without touching
the event loop. While two or more runners of one loop drive runs of the same store
(`eval_async` of many runs gathered, the one-host worker waking several runs), each
restart is queued instead, and one callback of the loop writes every queued restart in
one transaction (`store.group()`, each write undone alone if it fails) and commits once.
No caller is told its restart is recorded before that commit: `record` returns only then,
and the runner launches nothing of the restart before it returns. Many runs share each
commit, and each fsync at `synchronous=FULL` or on PostgreSQL.

A failed write fails its own run's `record` (with the error the store raised), the others
commit; a failed commit fails every `record` of the batch, and the store forgets what it
knew of its runs (`group()` does), so nothing it believes written is not.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from ablauf_lang.engine.job import Job


class GroupCommit:
    """The queued restarts of the runs one event loop drives on one store."""

    def __init__(self, store: Any, guard: Callable[[], AbstractContextManager[Any]]) -> None:
        self.store = store
        self.guard = guard  # what an interrupt waits for (the local runner's `critical`)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.runners = 0
        self.commits = 0  # group transactions committed (a count for tests and benchmarks)
        self.grouped = 0  # restarts written in them
        self._batch: list[tuple[str, Job, asyncio.Future[None]]] = []

    @property
    def shared(self) -> bool:
        """More than one runner drives runs of the store: restarts are grouped."""
        return self.runners > 1

    def join(self) -> bool:
        """A runner starts in the running loop; False when another loop's runners use the
        store now (this runner then records alone)."""
        loop = asyncio.get_running_loop()
        if self.runners and loop is not self.loop:
            return False
        self.loop = loop
        self.runners += 1
        reserve = getattr(self.store, "reserve_known", None)
        if reserve is not None:
            reserve(1)  # each run driven keeps its place in the store's cache of runs
        return True

    def leave(self) -> None:
        """The runner that joined is done."""
        self.runners -= 1
        reserve = getattr(self.store, "reserve_known", None)
        if reserve is not None:
            reserve(-1)

    async def record(self, run_id: str, job: Job) -> None:
        """Record `job` with the other runs' restarts queued in this turn of the loop;
        return once the transaction holding it committed (raise what failed it)."""
        loop = self.loop
        assert loop is not None
        done: asyncio.Future[None] = loop.create_future()
        self._batch.append((run_id, job, done))
        if len(self._batch) == 1:
            loop.call_soon(self._flush)
        await done

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        errors: list[BaseException | None] = []
        try:
            with self.guard(), self.store.group():
                for run_id, job, _ in batch:
                    try:
                        self.store.record(run_id, job)
                    except Exception as exc:  # this run's write failed; the others go on
                        errors.append(exc)
                    else:
                        errors.append(None)
        except BaseException as exc:  # the commit failed: nothing of the batch was written
            errors = [exc] * len(batch)
            if not isinstance(exc, Exception):
                self._tell(batch, errors)
                raise
        else:
            self.commits += 1
            self.grouped += len(batch)
        self._tell(batch, errors)

    @staticmethod
    def _tell(
        batch: list[tuple[str, Job, asyncio.Future[None]]], errors: list[BaseException | None]
    ) -> None:
        for (_, _, done), error in zip(batch, errors, strict=True):
            if done.cancelled():
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)


_groups: weakref.WeakKeyDictionary[Any, GroupCommit] = weakref.WeakKeyDictionary()


def group_for(store: Any, guard: Callable[[], AbstractContextManager[Any]]) -> GroupCommit | None:
    """The store's group commit (one per store object), or None when it cannot group
    (a store that is not durable, or has no `group()`)."""
    if not getattr(store, "durable", False) or not callable(getattr(store, "group", None)):
        return None
    group = _groups.get(store)
    if group is None:
        group = _groups[store] = GroupCommit(store, guard)
    return group
