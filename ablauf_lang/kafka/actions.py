"""The action worker: consumes the topics of the actions it has, performs each dispatch and
produces its result to the restarter topic.

    consume -> claim in the store (non-idempotent) -> perform -> record the result in the
    store (non-idempotent) -> produce the result -> flush -> commit the offset

Kafka delivers at least once: a worker that dies, or loses its partitions in a rebalance,
before committing has its messages delivered again to another one. An idempotent action
is then simply performed again. A non-idempotent one never is: before performing it the
worker claims the attempt in the store (`JobStore.begin_attempts`, one transaction per
batch), with a lease it renews while the action runs, and a second delivery learns what
became of the first:

    new        never claimed: perform it
    finished   it ran and its result is recorded: send that result again
    running    another worker holds it (its lease is live): wait, and look again
    abandoned  it began under a worker whose lease ran out with no result: its outcome is
               unknown, so it is reported `interrupted: ...` (a person's retry runs it again)
    gone       its run is finished or unknown: dropped

Offsets are committed per partition up to the first message not yet finished, so actions
run concurrently (`concurrency`) without any message being committed before its result is
acknowledged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ablauf_lang.codec.records import (
    MessageError,
    decode_dispatch_message,
    decode_result,
    encode_result,
    encode_result_message,
)
from ablauf_lang.engine.job import INTERRUPTED
from ablauf_lang.engine.nodes import Dispatch, Result, failure
from ablauf_lang.errors import AblaufError, StoreError
from ablauf_lang.kafka.client import Admin, KafkaError, KafkaSettings, Outbox, connect, require
from ablauf_lang.kafka.topics import action_topic, partition_of, restarter_topic
from ablauf_lang.names import WAIT_ACTIONS, did_you_mean
from ablauf_lang.runners.local import Action, ActionThreads, Beat, perform, registry, supervise
from ablauf_lang.stores.base import JobStore

log = logging.getLogger("ablauf.kafka")

T = TypeVar("T")


@dataclass
class Offsets:
    """One partition's messages in this worker: those not finished, the next to read."""

    pending: set[int] = field(default_factory=set)
    high: int = -1  # one past the highest offset read
    committed: int = -1

    def committable(self) -> int:
        return min(self.pending) if self.pending else self.high


@dataclass
class Item:
    """One dispatch message in this worker."""

    where: tuple[str, int]
    offset: int
    run_id: str
    dispatch: Dispatch
    claimed: bool = False  # a non-idempotent attempt this worker claimed in the store
    retry_at: float = 0.0  # for a held message: when to claim again


@dataclass
class Counts:
    performed: int = 0
    resent: int = 0
    interrupted: int = 0
    dropped: int = 0
    held: int = 0
    set_aside: int = 0


def _key(item: Item) -> tuple[str, int, int]:
    return item.run_id, item.dispatch.id, item.dispatch.attempt


def serves(actions: Mapping[str, Action], only: Sequence[str] | None) -> list[str]:
    """The actions a worker serves: all it has (the standard library's included), or
    `only` those (AblaufError for a name it does not have)."""
    names = [n for n in actions if n not in WAIT_ACTIONS]
    if not only:
        return names
    wanted = [str(n).lstrip(":") for n in only]
    for name in wanted:
        if name not in names:
            hint = did_you_mean(name, names)
            raise AblaufError(
                f"--only {name}: no such action in this worker's actions"
                + (f" (did you mean {hint}?)" if hint else "")
            )
    return list(dict.fromkeys(wanted))


class ActionWorker:
    """Performs dispatches from action topics (see the module's doc)."""

    def __init__(
        self,
        settings: KafkaSettings,
        store: JobStore,
        actions: Mapping[str, Action] | None = None,
        *,
        only: Sequence[str] | None = None,
        concurrency: int = 4,
        lease: float = 30.0,
        group: str | None = None,
        batch: int = 500,
    ) -> None:
        if concurrency < 1:
            raise AblaufError(f"concurrency must be at least 1, got {concurrency}")
        self.settings = settings
        self.store = store
        self.actions = registry(actions)
        self.names = serves(self.actions, only)
        self.topics = {action_topic(settings.prefix, n): n for n in self.names}
        self.concurrency = concurrency
        self.lease = lease
        self.batch = batch
        self.group = group or f"{settings.prefix}.actions"
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.results_topic = restarter_topic(settings.prefix)
        self.partitions = settings.partitions
        self.counts = Counts()
        self.offsets: dict[tuple[str, int], Offsets] = {}
        self.held: list[Item] = []
        self.running: dict[asyncio.Task[Result], Item] = {}
        self.done: list[tuple[Item, Result]] = []
        self.consumer: Any = None
        self.outbox: Outbox | None = None
        self.admin: Admin | None = None
        self._lock = threading.Lock()
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ablauf-kafka")
        self._threads = ActionThreads(concurrency)
        self.backlog: list[Any] = []  # messages read, waiting for a free slot
        self._next_renew = 0.0

    async def _io_call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    # ------------------------------------------------------------ set-up

    def open(self, stop: threading.Event | None = None) -> None:
        ck = require()
        self.admin = connect(
            self.settings, stop=(stop.is_set if stop else None), patience=None if stop else 0
        )
        made = self.admin.ensure([self.results_topic])
        self.partitions = made[self.results_topic] or self.partitions
        self.admin.ensure(list(self.topics))
        self.admin.ensure([self.settings.prefix + ".dead-letters"], 1)
        self.outbox = Outbox(self.settings)
        self.consumer = ck.Consumer(self.settings.consumer(self.group))
        self.consumer.subscribe(
            sorted(self.topics),
            on_assign=self._assigned,
            on_revoke=self._revoked,
            on_lost=self._revoked,
        )
        log.info(
            "ablauf worker: actions %s on %s (owner %s)",
            ", ".join(self.names),
            self.settings.bootstrap,
            self.owner,
        )

    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        with self._lock:
            for p in partitions:
                self.offsets.setdefault((p.topic, p.partition), Offsets())

    def _revoked(self, consumer: Any, partitions: list[Any]) -> None:
        self._commit_now(sync=True)
        with self._lock:
            for p in partitions:
                self.offsets.pop((p.topic, p.partition), None)
            gone = {(p.topic, p.partition) for p in partitions}
            self.held = [i for i in self.held if i.where not in gone]
            # read but not started: the partition's next owner reads them again
            self.backlog = [m for m in self.backlog if (m.topic(), m.partition()) not in gone]

    def close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()
            except Exception as exc:
                log.debug("closing the consumer: %s", exc)
            self.consumer = None
        self._threads.close()
        self._io.shutdown(wait=False)

    # ------------------------------------------------------------ the loop

    async def serve(self, stop: threading.Event, grace: float | None = None) -> None:
        """Perform dispatches until `stop` is set; then wait for the running actions (at
        most `grace` seconds, default the lease) and report them."""
        await self._io_call(self.open, stop)
        try:
            while not stop.is_set():
                await self.once()
            ends = time.monotonic() + (self.lease if grace is None else grace)
            while self.running and time.monotonic() < ends:
                await self._wait_running(min(0.5, ends - time.monotonic()))
                await self._report()
        finally:
            await self._io_call(self.close)

    async def once(self) -> None:
        """Take what there is room for, start it, report what finished.

        Partitions are never paused (librdkafka keeps a pause across a rebalance, and
        a pause asked for while partitions are being assigned is lost): a worker whose
        slots are all busy keeps polling, to stay in its group and serve rebalances, and
        what the poll returns waits in `backlog` (read, not yet counted for a commit)."""
        room = self.concurrency - len(self.running)
        if room <= 0:
            await self._wait_running(0.5)
            self.backlog.extend(await self._io_call(self._consume, 1, 0.0))
        else:
            if self.running:
                # A result is reported the moment its action ends; new messages are looked
                # for between (every 20 ms at most while actions run).
                await self._wait_running(0.0 if self.done else 0.02)
            if len(self.backlog) < room:
                idle = not (self.done or self.running or self.backlog)
                wait = (0.02 if self.held else 0.5) if idle else 0.0
                most = min(room * 2, self.batch)
                self.backlog.extend(await self._io_call(self._consume, most, wait))
            with self._lock:
                taken, self.backlog = self.backlog[:room], self.backlog[room:]
            if taken:
                await self._take(taken)
        await self._recheck()
        await self._renew()
        await self._report()

    def _consume(self, most: int, wait: float) -> list[Any]:
        first = self.consumer.poll(wait)
        if first is None:
            return []
        out = [first]
        if most > 1:
            out.extend(self.consumer.consume(most - 1, 0))
        return out

    async def _wait_running(self, wait: float) -> None:
        if not self.running:
            await asyncio.sleep(wait)
            return
        finished, _ = await asyncio.wait(
            self.running, timeout=wait, return_when=asyncio.FIRST_COMPLETED
        )
        for task in finished:
            item = self.running.pop(task)
            self.done.append((item, task.result()))

    # ------------------------------------------------------------ taking messages

    async def _take(self, messages: list[Any]) -> None:
        assert self.outbox is not None
        items: list[Item] = []
        with self._lock:
            for msg in messages:
                err = msg.error()
                if err is not None:
                    if err.code() != require().KafkaError._PARTITION_EOF:
                        log.warning("action worker: consumer error: %s", err.str())
                    continue
                where = (msg.topic(), msg.partition())
                track = self.offsets.setdefault(where, Offsets())
                track.high = max(track.high, msg.offset() + 1)
                try:
                    run_id, dispatch = decode_dispatch_message(msg.value() or b"")
                except MessageError as exc:
                    self.outbox.set_aside(msg, str(exc))
                    self.counts.set_aside += 1
                    continue
                track.pending.add(msg.offset())
                items.append(Item(where, msg.offset(), run_id, dispatch))
        await self._claim(items)

    async def _claim(self, items: list[Item]) -> None:
        """Start the idempotent ones; claim the others in the store first."""
        plain = [i for i in items if i.dispatch.idempotent]
        claims = [i for i in items if not i.dispatch.idempotent]
        for item in plain:
            self._start(item)
        if not claims:
            return
        keys = [_key(i) for i in claims]
        try:
            found = await self._io_call(self.store.begin_attempts, keys, self.owner, self.lease)
        except StoreError as exc:
            log.warning("action worker: cannot claim %d attempt(s): %s", len(claims), exc)
            for item in claims:
                self._hold(item, 1.0)
            return
        for item, claim in zip(claims, found, strict=True):
            d = item.dispatch
            if claim.state == "new":
                item.claimed = True
                self._start(item)
            elif claim.state == "finished" and claim.result is not None:
                self.counts.resent += 1
                self.done.append((item, decode_result(claim.result)))
            elif claim.state == "abandoned":
                # The claim is this worker's now: the interrupted result is recorded with
                # it, so a later delivery sends the same result again.
                item.claimed = True
                self.counts.interrupted += 1
                now = time.time()
                error = (
                    f"{INTERRUPTED}{d.action} (attempt {d.attempt}) began on {claim.owner}, "
                    "which stopped before reporting its result: its outcome is unknown "
                    "(`ablauf runs retry` runs it again)"
                )
                log.warning("run %s node %d: %s", item.run_id, d.id, error)
                self.done.append((item, failure(d, error, started_at=now, finished_at=now)))
            elif claim.state == "running":
                self._hold(item, min(1.0, self.lease / 4))
            else:  # gone: the run is finished (or unknown)
                self.counts.dropped += 1
                self._finish_offset(item)

    def _hold(self, item: Item, after: float) -> None:
        item.retry_at = time.monotonic() + after
        self.counts.held += 1
        self.held.append(item)

    async def _recheck(self) -> None:
        """Claim the held messages again once their time comes."""
        if not self.held:
            return
        now = time.monotonic()
        due = [i for i in self.held if i.retry_at <= now]
        if not due:
            return
        self.held = [i for i in self.held if i.retry_at > now]
        await self._claim(due)

    def _start(self, item: Item) -> None:
        d = item.dispatch
        fn = self.actions.get(d.action)
        beat = Beat() if d.heartbeat is not None else None
        work = perform(d, fn, True, threads=self._threads, beat=beat)
        if d.timeout is not None or beat is not None:
            work = supervise(d, work, beat)
        task = asyncio.ensure_future(work)
        self.running[task] = item
        self.counts.performed += 1

    async def _renew(self) -> None:
        """Extend the leases of the claimed attempts still running (every lease/3)."""
        if time.monotonic() < self._next_renew:
            return
        self._next_renew = time.monotonic() + self.lease / 3
        keys = [
            (i.run_id, i.dispatch.id, i.dispatch.attempt)
            for i in self.running.values()
            if i.claimed
        ]
        if keys:
            try:
                await self._io_call(self.store.renew_attempts, keys, self.owner, self.lease)
            except StoreError as exc:
                log.warning("action worker: cannot renew leases: %s", exc)

    # ------------------------------------------------------------ reporting

    async def _report(self) -> None:
        """Record, produce and flush the finished results, then commit their offsets."""
        if self.done:
            finished, self.done = self.done, []
            try:
                await self._io_call(self._send, finished)
            except (KafkaError, StoreError) as exc:
                log.warning("action worker: %s; trying again", exc)
                self.done = finished + self.done
                await asyncio.sleep(0.5)
                return
            for item, _ in finished:
                self._finish_offset(item)
        await self._io_call(self._commit_now, False)

    def _send(self, finished: list[tuple[Item, Result]]) -> None:
        assert self.outbox is not None
        records = [
            (i.run_id, i.dispatch.id, i.dispatch.attempt, encode_result(r))
            for i, r in finished
            if i.claimed
        ]
        if records:
            self.store.finish_attempts(records)
            for item, _ in finished:
                item.claimed = False  # recorded: a redelivery sends it again
        for item, result in finished:
            value = encode_result_message(item.run_id, result)
            part = partition_of(item.run_id, self.partitions)
            self.outbox.send(self.results_topic, value, key=item.run_id, partition=part)
        self.outbox.flush()

    def _finish_offset(self, item: Item) -> None:
        with self._lock:
            track = self.offsets.get(item.where)
            if track is not None:
                track.pending.discard(item.offset)

    def _commit_now(self, sync: bool) -> None:
        ck = require()
        with self._lock:
            parts = []
            for (topic, partition), track in self.offsets.items():
                upto = track.committable()
                if upto > track.committed:
                    parts.append(ck.TopicPartition(topic, partition, upto))
                    track.committed = upto
        if parts and self.consumer is not None:
            try:
                self.consumer.commit(offsets=parts, asynchronous=not sync)
            except ck.KafkaException as exc:
                log.info("action worker: offsets not committed (%s)", exc)


def serve(
    settings: KafkaSettings,
    store: JobStore,
    actions: Mapping[str, Action] | None = None,
    *,
    stop: threading.Event,
    only: Sequence[str] | None = None,
    concurrency: int = 4,
    lease: float = 30.0,
) -> ActionWorker:
    """Run an action worker until `stop` is set; return it (its counts)."""
    worker = ActionWorker(settings, store, actions, only=only, concurrency=concurrency, lease=lease)
    asyncio.run(worker.serve(stop))
    log.info("ablauf worker: action worker stopped after %d action(s)", worker.counts.performed)
    return worker
