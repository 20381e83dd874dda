"""Faults injected into the workers' step transactions, for stress tests only."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

from ablauf_lang.errors import StoreError

FAULTS_ENV = "ABLAUF_PG_FAULTS"


@dataclass
class Faults:
    """Faults injected into the workers' step transactions, for stress tests only.

    Read from `$ABLAUF_PG_FAULTS` when the module is imported, for example
    `delay=0.003,rollback=0.05,drop=0.02,seed=7`:

    - `delay`: pauses of up to that many seconds where a step is most exposed to races
      (after choosing its base, before its COMMIT, between its COMMIT and sharing what it
      learned with the other threads, and half the time inside a delivery's statement,
      between taking its snapshot and trying the run's lock);
    - `rollback`: the probability that a step is rolled back instead of committed (as a
      write race would);
    - `drop`: the probability that the connection is closed just before a step's COMMIT,
      or just after it (the worker then does not know whether it committed).
    """

    delay: float = 0.0
    rollback: float = 0.0
    drop: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def parse(cls, text: str) -> Faults:
        """`name=value,...` as described above (StoreError for anything else)."""
        faults = cls()
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            try:
                number = float(value)
            except ValueError:
                raise StoreError(f"{FAULTS_ENV}: {item!r} is not name=number") from None
            if name == "seed":
                faults.rng.seed(int(number))
            elif name in ("delay", "rollback", "drop"):
                setattr(faults, name, number)
            else:
                raise StoreError(f"{FAULTS_ENV}: unknown fault {name!r}")
        return faults

    def pause(self) -> None:
        """Sleep up to `delay` seconds."""
        if self.delay > 0:
            time.sleep(self.rng.uniform(0, self.delay))

    def chance(self, probability: float) -> bool:
        """True with `probability`."""
        return probability > 0 and self.rng.random() < probability

    def statement_delay(self) -> float:
        """Seconds a delivery's statement sleeps (0 most of the time)."""
        if self.delay <= 0 or not self.chance(0.5):
            return 0.0
        return self.rng.uniform(0, self.delay)


FAULTS = Faults.parse(os.environ[FAULTS_ENV]) if os.environ.get(FAULTS_ENV) else None
