"""What the store objects of one process's threads know of runs, shared and staged.

A worker's slots each have a store object (a connection), and share one `SharedKnown`: a
step does not read a run's tree again when another thread of the process wrote it last.
Each store object sees it through a `KnownView` (its `KnownRuns`), which stages what an open
transaction learns and publishes it after the COMMIT.
"""

from __future__ import annotations

import threading

from ablauf_lang.errors import InternalError
from ablauf_lang.stores.sql import Known, KnownRuns


class SharedKnown(KnownRuns):
    """What the threads of one process know of runs: only what was committed.

    Otherwise a thread could build on a write that was rolled back, whose number another
    process then took. A publication never replaces a newer write of the run by an older
    one (a thread can be preempted between its COMMIT and publishing, while others go on
    writing the run).
    """

    def __init__(self, size: int = 256) -> None:
        super().__init__(size)
        self.lock = threading.Lock()
        self.published = threading.Condition(self.lock)
        self._committing: dict[str, int] = {}  # run id -> threads committing a write of it
        self.loads = 0  # runs read again for a step, by any thread (a count for tests)
        self.catch_ups = 0  # runs caught up with another process's writes instead
        self.at_once = 0  # results delivered with their step in one round trip
        self.at_once_missed = 0  # tried so, delivered the usual way (`queue.deliver`)
        self._reading: set[str] = set()  # runs a thread reads along with its step

    def start_reading(self, run_id: str) -> bool:
        """A thread is to read the run whole with its step's first statements: True unless
        another thread of the process does (then the run is known once that one's step
        commits; reading it again meanwhile, a hundred thousand rows, would be waste)."""
        with self.lock:
            if run_id in self._reading:
                return False
            self._reading.add(run_id)
            return True

    def done_reading(self, run_id: str) -> None:
        with self.lock:
            self._reading.discard(run_id)

    def publish(self, run_id: str, known: Known) -> None:
        """Share what a committed transaction learned of a run, unless newer is known."""
        with self.lock:
            current = self._runs.get(run_id)
            if current is not None and current.key == known.key and current.seq > known.seq:
                return
            KnownRuns.put(self, run_id, known)
            self.published.notify_all()

    def committing(self, run_ids: list[str]) -> None:
        """Threads are about to COMMIT writes of these runs (publishing them after)."""
        with self.lock:
            for run_id in run_ids:
                self._committing[run_id] = self._committing.get(run_id, 0) + 1

    def settled(self, run_ids: list[str]) -> None:
        """Those COMMITs are over (their writes published, or rolled back)."""
        with self.lock:
            for run_id in run_ids:
                left = self._committing.get(run_id, 0) - 1
                if left > 0:
                    self._committing[run_id] = left
                else:
                    self._committing.pop(run_id, None)
            self.published.notify_all()

    def wait_for(self, run_id: str, seq: int, timeout: float) -> Known | None:
        """What is known of the run once a write numbered `seq` or later is published, or
        no thread of this process is committing one (at most `timeout` seconds): a write
        another process made is not waited for."""

        def known_or_not_coming() -> bool:
            known = self._runs.get(run_id)
            return (known is not None and known.seq >= seq) or run_id not in self._committing

        with self.lock:
            self.published.wait_for(known_or_not_coming, timeout)
            return self._runs.get(run_id)

    def put(self, run_id: str, known: Known) -> None:
        self.publish(run_id, known)

    def drop(self, run_id: str) -> None:
        with self.lock:
            KnownRuns.drop(self, run_id)

    def clear(self) -> None:
        with self.lock:
            KnownRuns.clear(self)


class KnownView(KnownRuns):
    """A store object's view of a `SharedKnown`: the shared entries, plus what its open
    transaction learned or pinned (staged until it commits, dropped if it rolls back)."""

    def __init__(self, shared: SharedKnown) -> None:
        super().__init__(shared.size)
        self.shared = shared
        self.staged: dict[str, Known] | None = None
        self._committing: list[str] | None = None  # the runs its COMMIT under way wrote

    def begin(self) -> None:
        """A transaction starts: stage what it learns."""
        self.staged = {}

    def pin(self, run_id: str, known: Known) -> None:
        """Make `known` what this transaction knows of the run, whatever other threads
        publish meanwhile: the base its write is computed, diffed and numbered from."""
        if self.staged is None:
            raise InternalError("pin outside a transaction")
        self.staged[run_id] = known

    def committing(self) -> None:
        """The transaction is about to COMMIT: other threads that find one of its runs
        newer under the lock than they know wait for it to be published (`wait_for`)."""
        if self.staged and self._committing is None:
            self._committing = list(self.staged)
            self.shared.committing(self._committing)

    def _settle(self) -> None:
        if self._committing is not None:
            self.shared.settled(self._committing)
            self._committing = None

    def commit(self) -> None:
        """The transaction committed: share what it learned."""
        staged, self.staged = self.staged or {}, None
        for run_id, known in staged.items():
            self.shared.publish(run_id, known)
        self._settle()

    def rollback(self) -> None:
        """The transaction rolled back: forget what it learned."""
        # What the shared entries say was committed stays true: a worker's step checks an
        # entry against the run's newest write under the lock before using it.
        self.staged = None
        self._settle()

    @property
    def in_transaction(self) -> bool:
        """True between `begin` and `commit` or `rollback`."""
        return self.staged is not None

    def wait_for(self, run_id: str, seq: int, timeout: float) -> Known | None:
        """See `SharedKnown.wait_for` (what this transaction staged counts first)."""
        if self.staged is not None and run_id in self.staged:
            return self.staged[run_id]
        return self.shared.wait_for(run_id, seq, timeout)

    def get(self, run_id: str) -> Known | None:
        if self.staged is not None and run_id in self.staged:
            return self.staged[run_id]
        return self.shared.get(run_id)

    def put(self, run_id: str, known: Known) -> None:
        if self.staged is not None:
            self.staged[run_id] = known
        else:
            self.shared.publish(run_id, known)

    def drop(self, run_id: str) -> None:
        if self.staged is not None:
            self.staged.pop(run_id, None)
        self.shared.drop(run_id)

    def clear(self) -> None:
        if self.staged is not None:
            self.staged.clear()
        self.shared.clear()
