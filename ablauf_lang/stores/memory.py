"""A store that keeps runs in this process only (`memory:`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from ablauf_lang.errors import RunError
from ablauf_lang.job import Job
from ablauf_lang.nodes import Status
from ablauf_lang.stores.base import RunInfo, StoredRun, new_run_id, run_error


@dataclass(frozen=True, slots=True)
class _Run:
    job: Job
    source: str | None
    filename: str | None
    initial_context: dict[str, Any]
    created: float
    updated: float
    order: int  # creation order: ties of `created` still list newest first


class MemoryStore:
    """Runs held in a dict: jobs are immutable, so keeping a reference is a snapshot."""

    durable = False
    url = "memory:"

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self.commits = 0  # records taken (what a durable store would commit)

    def __repr__(self) -> str:
        return "MemoryStore()"

    def create_run(
        self,
        job: Job,
        *,
        source: str | None = None,
        filename: str | None = None,
        run_id: str | None = None,
    ) -> str:
        """Record a new run; return its id."""
        run_id = run_id or new_run_id()
        if run_id in self._runs:
            raise RunError(f"run {run_id!r} already exists in memory:")
        now = time.time()
        self._runs[run_id] = _Run(
            job, source, filename, dict(job.context), now, now, len(self._runs)
        )
        return run_id

    def record(self, run_id: str, job: Job) -> None:
        """Keep the job (a reference: jobs never change)."""
        self._runs[run_id] = replace(self._get(run_id), job=job, updated=time.time())
        self.commits += 1

    def _get(self, run_id: str) -> _Run:
        try:
            return self._runs[run_id]
        except KeyError:
            raise RunError(f"no run {run_id!r} in memory:") from None

    def _info(self, run_id: str, run: _Run) -> RunInfo:
        job = run.job
        return RunInfo(
            run_id, job.status, run.created, run.updated, job.restarts, run.filename, run_error(job)
        )

    def load(self, run_id: str) -> StoredRun:
        """The run with its current job."""
        run = self._get(run_id)
        return StoredRun(self._info(run_id, run), run.job, run.source, dict(run.initial_context))

    def info(self, run_id: str) -> RunInfo:
        """What the store knows of a run."""
        return self._info(run_id, self._get(run_id))

    def exists(self, run_id: str) -> bool:
        """True when this store has the run."""
        return run_id in self._runs

    def list_runs(self, *, limit: int | None = None, status: str | None = None) -> list[RunInfo]:
        """Runs, newest first; only those with `status` when given."""
        runs = sorted(self._runs.items(), key=lambda kv: (kv[1].created, kv[1].order), reverse=True)
        infos = [self._info(k, v) for k, v in runs]
        if status is not None:
            infos = [i for i in infos if i.status is Status(status)]
        return infos[:limit] if limit is not None else infos

    def close(self) -> None:
        """Nothing to release."""
