"""The restarter: consumes the restarter topic, restarts each run with its results, records
it in the store, then produces the dispatches to the action topics.

    consume a batch -> per run: job -> restart_job -> store.record -> produce -> flush -> commit

The store is the source of truth for a run; Kafka carries only what moves between
processes. Offsets are committed after the store write and after every dispatch of the
batch is acknowledged, so a crash anywhere redelivers what was not finished:

- a result that arrives twice is ignored by the reducer (it checks the attempt);
- the first message of a run after its partition came to this restarter that changes
  nothing (a redelivery: the previous owner recorded it, then may have died before its
  dispatches were acknowledged) makes this restarter produce the run's dispatches in flight
  again, as they were sent. A duplicate dispatch is harmless: an idempotent action may run
  again, a non-idempotent one is claimed in the store before it runs (`kafka.actions`).

Time: sleeps, awaits and retries' waits are not held in memory. They are rows of the
store's `waits` table; each `poll` seconds (or at the next wake-up, if sooner) the restarter
asks the store which runs are due and handles those of its own partitions: a sleep wakes,
an await takes its signal or runs out of time, a retry's next attempt is produced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ablauf_lang.codec.records import (
    MessageError,
    decode_restarter_message,
    encode_dispatch_message,
)
from ablauf_lang.engine.job import Job, restart_job
from ablauf_lang.engine.kinds import Leaf
from ablauf_lang.engine.nodes import Dispatch, LeafState, Result, failure, success, timeout
from ablauf_lang.engine.replay import accepts, inflight_dispatches, inflight_leaves, leaf_dispatch
from ablauf_lang.errors import AblaufError, RunError, StoreError
from ablauf_lang.kafka.client import Admin, KafkaError, KafkaSettings, Outbox, connect, require
from ablauf_lang.kafka.topics import action_topic, partition_of, restarter_topic
from ablauf_lang.names import AWAIT, SLEEP, WAIT_ACTIONS
from ablauf_lang.runners.clock import SYSTEM, Clock
from ablauf_lang.stores.base import JobStore

log = logging.getLogger("ablauf.kafka")

START, WAKE, RESULT, TICK = "start", "wake", "result", "tick"


@dataclass
class Counts:
    """What a restarter did (for tests, the log and benchmarks)."""

    restarts: int = 0
    dispatched: int = 0
    redispatched: int = 0
    finished: int = 0
    set_aside: int = 0
    conflicts: int = 0


class Restarter:
    """One restarter process's state: its partitions, a cache of the jobs it drives."""

    def __init__(
        self,
        settings: KafkaSettings,
        store: JobStore,
        *,
        clock: Clock | None = None,
        poll: float = 1.0,
        batch: int = 500,
        cache: int = 10_000,
        group: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = SYSTEM if clock is None else clock
        self.poll = poll
        self.batch = batch
        self.cache_size = cache
        self.group = group or f"{settings.prefix}.restarters"
        self.topic = restarter_topic(settings.prefix)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.seen: set[str] = set()  # runs handled since their partition was assigned
        self.assigned: set[int] = set()
        self.partitions = settings.partitions
        self.counts = Counts()
        self.admin: Admin | None = None
        self.outbox: Outbox | None = None
        self.consumer: Any = None
        self._missing: dict[str, float] = {}  # action topic -> when it was found missing
        self._clear: list[tuple[str, int, int]] = []  # retry waits dispatched, to clear
        self._retried: dict[str, set[tuple[int, int]]] = {}  # run -> retries produced
        self._next_tick = 0.0
        self._recover = False  # partitions came: look for signals taken but not recorded

    # ------------------------------------------------------------ the loop

    def open(self, stop: threading.Event | None = None) -> None:
        """Reach the broker (trying again with backoff until `stop`), make the restarter
        topic if it is missing, subscribe."""
        ck = require()
        self.admin = connect(
            self.settings, stop=(stop.is_set if stop else None), patience=None if stop else 0
        )
        self.partitions = self.admin.ensure([self.topic])[self.topic] or self.partitions
        self.admin.ensure([self.settings.prefix + ".dead-letters"], 1)
        self.outbox = Outbox(self.settings)
        self.consumer = ck.Consumer(self.settings.consumer(self.group))
        self.consumer.subscribe(
            [self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._revoked
        )

    def close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()  # leaves the group: partitions move at once
            except Exception as exc:
                log.debug("closing the consumer: %s", exc)
            self.consumer = None
        if self.outbox is not None:
            try:
                self.outbox.flush(5)
            except KafkaError as exc:
                log.warning("restarter: %s", exc)

    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        got = {p.partition for p in partitions}
        self.assigned |= got
        self._recover = True
        log.info("restarter: partitions %s assigned", sorted(got))

    def _revoked(self, consumer: Any, partitions: list[Any]) -> None:
        gone = {p.partition for p in partitions}
        self.assigned -= gone
        for run_id in [r for r in self.seen if partition_of(r, self.partitions) in gone]:
            self.seen.discard(run_id)
            self.jobs.pop(run_id, None)
            self._retried.pop(run_id, None)
        log.info("restarter: partitions %s revoked", sorted(gone))

    def serve(self, stop: threading.Event) -> None:
        """Consume until `stop` is set."""
        self.open(stop)
        try:
            while not stop.is_set():
                self.once()
        finally:
            self.close()

    def once(self) -> int:
        """One round: a batch of messages (waiting at most until the next timer), then the
        timers that are due. Returns the messages handled."""
        wait = max(0.0, min(self.poll, self._next_tick - time.monotonic()))
        messages = self._consume(wait)
        if messages:
            self.handle(messages)
        self.timers()
        return len(messages)

    def _consume(self, wait: float) -> list[Any]:
        first = self.consumer.poll(wait)
        if first is None:
            return []
        out = [first]
        if self.batch > 1:
            out.extend(self.consumer.consume(self.batch - 1, 0))
        return out

    # ------------------------------------------------------------ a batch

    def handle(self, messages: list[Any]) -> None:
        """Restart every run the batch names, then produce, flush, commit."""
        assert self.outbox is not None
        by_run: OrderedDict[str, list[tuple[str, Result | None]]] = OrderedDict()
        offsets: dict[tuple[str, int], int] = {}
        firsts: dict[tuple[str, int], int] = {}
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != require().KafkaError._PARTITION_EOF:
                    log.warning("restarter: consumer error: %s", err.str())
                continue
            where = (msg.topic(), msg.partition())
            offsets[where] = msg.offset() + 1
            firsts.setdefault(where, msg.offset())
            try:
                kind, run_id, result = decode_restarter_message(msg.value() or b"")
            except MessageError as exc:
                self.outbox.set_aside(msg, str(exc))
                self.counts.set_aside += 1
                continue
            by_run.setdefault(run_id, []).append((kind, result))
        now = self.clock.now()
        try:
            for run_id, items in by_run.items():
                self.step(run_id, items, now)
            self._flush()
        except (KafkaError, StoreError) as exc:
            self._rewind(firsts, by_run, exc)
            return
        self._commit(offsets)

    def _flush(self) -> None:
        assert self.outbox is not None
        self.outbox.flush()
        if self._clear:
            clear, self._clear = self._clear, []
            clear_wait = getattr(self.store, "clear_wait", None)
            if clear_wait is not None:
                for run_id, node, attempt in clear:
                    clear_wait(run_id, node, attempt)

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if not offsets:
            return
        ck = require()
        parts = [ck.TopicPartition(t, p, o) for (t, p), o in offsets.items() if p in self.assigned]
        if not parts:
            return
        try:
            self.consumer.commit(offsets=parts, asynchronous=True)
        except ck.KafkaException as exc:  # a rebalance took them: the next owner redoes it
            log.info("restarter: offsets not committed (%s)", exc)

    def _rewind(
        self,
        firsts: dict[tuple[str, int], int],
        by_run: dict[str, Any],
        exc: Exception,
    ) -> None:
        """A write or a delivery failed: forget what this batch did, read it again."""
        log.warning("restarter: %s; reading the batch again", exc)
        ck = require()
        self._clear.clear()
        for run_id in by_run:
            self.jobs.pop(run_id, None)
            self.seen.discard(run_id)  # so its redelivery dispatches what is in flight
        for (t, p), o in firsts.items():
            try:
                self.consumer.seek(ck.TopicPartition(t, p, o))
            except ck.KafkaException as err:
                log.info("restarter: cannot seek %s[%d]: %s", t, p, err)
        time.sleep(0.5)

    # ------------------------------------------------------------ one run

    def _job(self, run_id: str, fresh: bool) -> Job | None:
        job = None if fresh else self.jobs.get(run_id)
        if job is not None:
            self.jobs.move_to_end(run_id)
            return job
        try:
            job = self.store.load(run_id).job
        except RunError as exc:
            log.warning("restarter: %s (message ignored)", exc)
            return None
        self._keep(run_id, job)
        return job

    def _keep(self, run_id: str, job: Job) -> None:
        if job.done:
            self.jobs.pop(run_id, None)
            self.seen.discard(run_id)
            self._retried.pop(run_id, None)
            return
        self.jobs[run_id] = job
        self.jobs.move_to_end(run_id)
        while len(self.jobs) > self.cache_size:
            self.jobs.popitem(last=False)

    def step(self, run_id: str, items: list[tuple[str, Result | None]], now: float) -> None:
        """Apply a run's messages; produce what the restart dispatches. A run another
        process wrote meanwhile (a person's abort, a zombie restarter) is read again."""
        for tries in range(3):
            try:
                self._step(run_id, items, now)
                return
            except StoreError as exc:
                if tries == 2 or "written by another process" not in str(exc):
                    raise
                self.counts.conflicts += 1
                log.info("restarter: run %s was written elsewhere; reading it again", run_id)
                self.jobs.pop(run_id, None)

    def _step(self, run_id: str, items: list[tuple[str, Result | None]], now: float) -> None:
        kinds = {kind for kind, _ in items}
        first = run_id not in self.seen
        job = self._job(run_id, WAKE in kinds)
        if job is None:
            return
        if job.done:
            return  # results for a finished run (a duplicate, or an aborted run's): ignored
        self.seen.add(run_id)
        results = [r for _, r in items if r is not None]
        fresh = [r for r in results if accepts(job, r)]
        start = START in kinds and job.restarts == 0
        redo = WAKE in kinds or (
            first and (len(fresh) < len(results) or (START in kinds and not start))
        )
        timed: list[Result] = []
        due: list[Dispatch] = []
        if redo or TICK in kinds or first:
            timed, due = self._due(run_id, job, now, again=redo or first)
        todo = fresh + timed
        dispatches: list[Dispatch] = []
        if todo or start or WAKE in kinds:
            job, dispatches = self._restart(run_id, job, todo, now)
        if redo:
            dispatches = inflight_dispatches(job)
            self.counts.redispatched += len(dispatches)
        dispatches.extend(due)
        while True:
            ready = self._route(run_id, job, dispatches, now, redo)
            if not ready or job.done:
                break
            job, dispatches = self._restart(run_id, job, ready, now)
            redo = False

    def _restart(
        self, run_id: str, job: Job, results: list[Result], now: float
    ) -> tuple[Job, list[Dispatch]]:
        job, dispatches = restart_job(job, results, now)
        self.store.record(run_id, job)
        self.counts.restarts += 1
        self._keep(run_id, job)
        if job.done:
            self.counts.finished += 1
            log.info("run %s finished: %s", run_id, job.status)
        return job, dispatches

    def _due(
        self, run_id: str, job: Job, now: float, *, again: bool
    ) -> tuple[list[Result], list[Dispatch]]:
        """What the run's waits ask for now: sleeps that woke, awaits that took their signal
        or ran out of time (results), retries whose next attempt is due (dispatches; those
        this process produced already only when taking the run over, `again`)."""
        sent = self._retried.get(run_id, set())
        results: list[Result] = []
        dispatches: list[Dispatch] = []
        for leaf in inflight_leaves(job.root):
            if leaf.action == SLEEP:
                if leaf.wake is None or leaf.wake <= now:
                    results.append(success(leaf.id, None, attempt=leaf.attempt, finished_at=now))
            elif leaf.action == AWAIT:
                got = self._signal(run_id, leaf)
                if got is not None:
                    results.append(got)
                elif leaf.wake is not None and leaf.wake <= now:
                    results.append(_expired(leaf, now))
            elif (
                leaf.attempts
                and leaf.wake is not None
                and leaf.wake <= now
                and (again or (leaf.id, leaf.attempt) not in sent)
            ):
                dispatches.append(leaf_dispatch(leaf, job.context))
        return results, dispatches

    def _signal(self, run_id: str, leaf: Leaf) -> Result | None:
        take = getattr(self.store, "take_signal", None)
        sent = leaf.sent if isinstance(leaf.sent, dict) else {}
        if take is None:
            return None
        got = take(run_id, str(sent.get("signal")), leaf.id)
        if got is None:
            return None
        now = self.clock.now()
        return success(leaf.id, got[1], attempt=leaf.attempt, started_at=now, finished_at=now)

    def _route(
        self, run_id: str, job: Job, dispatches: Iterable[Dispatch], now: float, redo: bool
    ) -> list[Result]:
        """Produce the dispatches that are due; return the results known at once (a sleep
        already over, a signal already sent, an action no worker serves)."""
        assert self.outbox is not None
        ready: list[Result] = []
        done: set[tuple[int, int]] = set()
        for d in dispatches:
            if (d.id, d.attempt) in done:
                continue
            done.add((d.id, d.attempt))
            if d.action == SLEEP:
                if d.due is None or d.due <= now:
                    ready.append(success(d, None, finished_at=now))
                else:
                    self._soon(d.due - now)
                continue
            if d.action == AWAIT:
                leaf = job.node(d.id)
                if isinstance(leaf, Leaf) and leaf.result is LeafState.PENDING:
                    got = self._signal(run_id, leaf)
                    if got is not None:
                        ready.append(got)
                    elif leaf.wake is not None and leaf.wake <= now:
                        ready.append(_expired(leaf, now))
                    elif leaf.wake is not None:
                        self._soon(leaf.wake - now)
                continue
            if d.due is not None and d.due > now:
                self._soon(d.due - now)
                continue  # a retry's wait: the store's waits table wakes it
            topic = action_topic(self.settings.prefix, d.action)
            if not self._exists(topic):
                ready.append(
                    failure(
                        d,
                        f"unknown action {d.action}: no worker serves it "
                        f"(no topic {topic} on {self.settings.bootstrap})",
                        started_at=now,
                        finished_at=now,
                    )
                )
                continue
            self.outbox.send(topic, encode_dispatch_message(run_id, d), key=f"{run_id}:{d.id}")
            self.counts.dispatched += 1
            if d.due is not None and d.action not in WAIT_ACTIONS:
                self._clear.append((run_id, d.id, d.attempt))
                self._retried.setdefault(run_id, set()).add((d.id, d.attempt))
        return ready

    def _soon(self, seconds: float) -> None:
        """Look at the timers no later than `seconds` from now (a wait this process began)."""
        self._next_tick = min(self._next_tick, time.monotonic() + max(0.0, seconds))

    def _exists(self, topic: str) -> bool:
        """True when some action worker made the topic (a miss is asked again after 1 s)."""
        assert self.admin is not None
        if topic in self.admin.known:
            return True
        seen = self._missing.get(topic)
        if seen is not None and time.monotonic() - seen < 1.0:
            return False
        if self.admin.partitions(topic) is not None:
            self._missing.pop(topic, None)
            return True
        self._missing[topic] = time.monotonic()
        return False

    # ------------------------------------------------------------ timers

    def timers(self) -> None:
        """Handle the due runs of this restarter's partitions (at most every `poll` s)."""
        if time.monotonic() < self._next_tick:
            return
        if not self.assigned:  # no partition (yet): look again after `poll`, never spin
            self._next_tick = time.monotonic() + self.poll
            return
        now = self.clock.now()
        handled = 0
        try:
            if self._recover:
                # An await whose signal a dead restarter took but never recorded: it takes
                # the same signal again (the store marks it taken by that node).
                self._recover = False
                for run_id in self.store.taken_unrecorded():
                    if partition_of(run_id, self.partitions) in self.assigned:
                        self.step(run_id, [(TICK, None)], now)
            for run_id in self.store.due_runs(now, self.batch):
                if partition_of(run_id, self.partitions) in self.assigned:
                    self.step(run_id, [(TICK, None)], now)
                    handled += 1
            self._flush()
        except (KafkaError, StoreError) as exc:
            log.warning("restarter: timers: %s", exc)
            self._clear.clear()
        wake = self.store.next_wake()
        pause = self.poll
        if wake is not None and wake > now:
            pause = min(self.poll, wake - now)
        self._next_tick = time.monotonic() + (0.0 if handled >= self.batch else pause)


def _expired(leaf: Leaf, now: float) -> Result:
    sent = leaf.sent if isinstance(leaf.sent, dict) else {}
    return timeout(
        leaf.id,
        f"timeout: no signal {sent.get('signal')} arrived in time",
        attempt=leaf.attempt,
        finished_at=now,
    )


def serve(
    settings: KafkaSettings,
    store: JobStore,
    *,
    stop: threading.Event,
    poll: float = 1.0,
    batch: int = 500,
) -> Restarter:
    """Run a restarter until `stop` is set; return it (its counts)."""
    restarter = Restarter(settings, store, poll=poll, batch=batch)
    log.info(
        "ablauf worker: restarter on %s (topic %s), store %s",
        settings.bootstrap,
        restarter.topic,
        getattr(store, "url", "?"),
    )
    try:
        restarter.serve(stop)
    except AblaufError:
        raise
    log.info("ablauf worker: restarter stopped after %d restart(s)", restarter.counts.restarts)
    return restarter
