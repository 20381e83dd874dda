"""A store that keeps runs in this process only (`memory:`)."""

from __future__ import annotations

import time
from typing import Any

from ablauf_lang.errors import StoreError
from ablauf_lang.job import Job
from ablauf_lang.stores.base import RunInfo, StoredRun, new_run_id


class MemoryStore:
    """Runs held in a dict: jobs are immutable, so keeping a reference is a snapshot."""

    durable = False

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, Any]] = {}

    def create_run(self, job: Job, *, source: str | None = None, filename: str | None = None,
                   run_id: str | None = None) -> str:
        run_id = run_id or new_run_id()
        if run_id in self._runs:
            raise StoreError(f"run {run_id} already exists")
        now = time.time()
        self._runs[run_id] = {"job": job, "source": source, "filename": filename,
                              "context": dict(job.context), "created": now, "updated": now}
        return run_id

    def record(self, run_id: str, job: Job) -> None:
        run = self._get(run_id)
        run["job"] = job
        run["updated"] = time.time()

    def _get(self, run_id: str) -> dict[str, Any]:
        try:
            return self._runs[run_id]
        except KeyError:
            raise StoreError(f"no run {run_id!r} in this store") from None

    def _info(self, run_id: str, run: dict[str, Any]) -> RunInfo:
        job: Job = run["job"]
        return RunInfo(run_id, job.status, run["created"], run["updated"], job.restarts,
                       run["filename"])

    def load(self, run_id: str) -> StoredRun:
        run = self._get(run_id)
        return StoredRun(self._info(run_id, run), run["job"], run["source"], run["context"])

    def exists(self, run_id: str) -> bool:
        return run_id in self._runs

    def list_runs(self, *, limit: int | None = None) -> list[RunInfo]:
        infos = sorted((self._info(k, v) for k, v in self._runs.items()),
                       key=lambda i: i.created, reverse=True)
        return infos[:limit] if limit else infos

    def close(self) -> None:
        pass
