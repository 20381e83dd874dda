"""The one-host worker: wakes the parked runs of a store (SQLite, or any store) when a
timer falls due or a signal arrives, and drives each until it parks again or finishes.

    serve(store, actions, stop=event)   until `stop` is set (SIGTERM, Ctrl-C in the CLI)

A parked run is a run whose every leaf in flight is a wait (`engine.waits.parked`): a
sleep, an await, a retry's wait. Nothing of it is in memory here: each round asks the
store, with indexed queries only, which runs are due (`due_runs`) and when the next one
will be (`next_wake`), and sleeps until then (at most `poll` seconds: a signal sent by
another process is seen within that time). A due run is taken with the driver's lease
(a run that a terminal still drives is left to it), resumed (`prepare_replay`: waits keep
their recorded times) and driven by the local runner with `detach`, so it is handed back
to the store as soon as it parks again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping

from ablauf_lang.engine.replay import prepare_replay
from ablauf_lang.engine.waits import parked
from ablauf_lang.errors import AblaufError, RunError
from ablauf_lang.runners.clock import SYSTEM, Clock
from ablauf_lang.runners.local import Action, LocalRunner
from ablauf_lang.stores.base import DriverLease, JobStore

log = logging.getLogger("ablauf.worker")


class Sleeper:
    """Wakes a store's due runs in this process (see the module's doc)."""

    def __init__(
        self,
        store: JobStore,
        actions: Mapping[str, Action] | None = None,
        *,
        clock: Clock | None = None,
        poll: float = 1.0,
        concurrency: int | None = None,
        batch: int = 100,
    ) -> None:
        self.store = store
        self.actions = actions
        self.clock = SYSTEM if clock is None else clock
        self.poll = poll
        self.concurrency = concurrency
        self.batch = batch
        self.woken = 0  # runs taken and driven (a count for tests and the log)
        self.skipped: set[str] = set()  # due but not parked: left to a person (resume)

    async def wake(self, run_id: str) -> bool:
        """Take one due run and drive it until it parks again or finishes; False when it
        was not ours to take (another process drives it, or it is not parked)."""
        store = self.store
        lease = DriverLease(store, run_id)
        try:
            lease.acquire()
        except RunError:
            return False  # a live process drives it: it wakes the run itself
        finished = False
        try:
            job = store.load(run_id).job
            if job.done:
                finished = True
                return False
            if not parked(job):
                if run_id not in self.skipped:
                    self.skipped.add(run_id)
                    log.warning(
                        "run %s is due but has an action in flight that is not a wait "
                        "(its process stopped?): left for `ablauf runs resume`",
                        run_id,
                    )
                return False
            job = prepare_replay(job, now=self.clock.now())
            store.record(run_id, job)
            runner = LocalRunner(
                self.actions,
                store=store,
                run_id=run_id,
                clock=self.clock,
                detach=True,
                concurrency=self.concurrency,
                on_restart=lambda *_: lease.beat(),
            )
            job = await runner.run(job)
            finished = job.done
            self.woken += 1
            return True
        finally:
            lease.release(finished=finished)

    async def round(self) -> int:
        """Wake every run due now (at most `batch`), all at once: their restarts share
        commits (`runners.group`), and a run whose action takes long holds up none of the
        others woken with it; return how many were driven."""
        due = [
            r for r in self.store.due_runs(self.clock.now(), self.batch) if r not in self.skipped
        ]
        return sum(await asyncio.gather(*(self._wake_logged(run_id) for run_id in due)))

    async def _wake_logged(self, run_id: str) -> bool:
        try:
            return await self.wake(run_id)
        except AblaufError as exc:
            log.error("run %s: %s", run_id, exc)
            return False

    def pause(self) -> float:
        """Seconds until the next round: the next wake-up, at most `poll`. A wake-up that
        has passed without a run to wake (a live process drives it, or it is left for a
        person) waits `poll`: never a busy loop."""
        wake = self.store.next_wake()
        if wake is None:
            return self.poll
        left = wake - self.clock.now()
        return self.poll if left <= 0 else min(self.poll, left)

    async def recover(self) -> int:
        """Wake the runs whose await took a signal that was never recorded (a worker that
        died between the two): the await gets the same signal again. Asked once, at start."""
        return sum([await self._wake_logged(run_id) for run_id in self.store.taken_unrecorded()])

    async def serve(self, stop: threading.Event) -> None:
        """Rounds until `stop` is set (after waking what a crash left half delivered)."""
        await self.recover()
        while not stop.is_set():
            if await self.round() == 0:
                await asyncio.get_running_loop().run_in_executor(None, stop.wait, self.pause())


def serve(
    store: JobStore,
    actions: Mapping[str, Action] | None = None,
    *,
    stop: threading.Event,
    clock: Clock | None = None,
    poll: float = 1.0,
    concurrency: int | None = None,
) -> Sleeper:
    """Wake the store's parked runs until `stop` is set; return the sleeper (its counts)."""
    sleeper = Sleeper(store, actions, clock=clock, poll=poll, concurrency=concurrency)
    where = getattr(store, "url", "") or "this store"
    log.info("ablauf worker: waking the parked runs of %s on this host", where)
    asyncio.run(sleeper.serve(stop))
    log.info("ablauf worker: stopped after waking %d run(s)", sleeper.woken)
    return sleeper
