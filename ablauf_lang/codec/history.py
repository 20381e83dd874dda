"""A run's history: every write a store kept, read back as steps and as the job after any.

Stores keep, beside the live step log, every write of a run in the delta format of
`codec.delta`: write 0 is the whole first job (`whole_data`), each later write the
delta of that write (a restart, an abort, a resume or retry handing leaves back, a whole
rewrite: `whole_data` again). So a run's history is the first job and a list of deltas,
and this module reads it:

    steps    the writes, each described (`HistoryStep`): the results it applied, the
             dispatches it made, the context keys it set or dropped, its time and status
    job_at   the job after restart N (the last write whose restart count is N)

Described from the stored records alone (node state dicts), O(changes) per write; a job
is built only for `job_at` (O(writes up to N + tree)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ablauf_lang import values
from ablauf_lang.codec.delta import (
    Damage,
    Parts,
    context_rows,
    decode_key,
    dumps_text,
    job_from_parts,
    node_row,
    read_json,
    replay_delta,
    run_fields,
)
from ablauf_lang.engine.job import Job
from ablauf_lang.errors import AblaufError, RunError, StoreError

START = "start"  # write 0: the run as created (or forked)
RESTART = "restart"  # a restart of the reducer
ABORT = "abort"  # the run was aborted
REPLAY = "replay"  # a resume or retry handed leaves back (no restart)
WHOLE = "whole"  # the run was written whole (by a store object that never read it)

DONE = ("success", "failure", "timeout")


def whole_data(job: Job, rows: Sequence[Any] | None = None) -> str:
    """The whole job as one delta (history's write 0, or a whole rewrite): every node, the
    whole context, `"w": 1` (replaces what was there). `rows`: the node rows if made."""
    made = rows if rows is not None else [node_row(n) for n in job.nodes()]
    nodes = ",".join(
        f"[{r.node},{r.spec},{r.state},{'null' if r.children is None else r.children}]"
        for r in made
    )
    head = dumps_text({"r": run_fields(job), "w": 1, "c": context_rows(job.context)})
    return f'{head[:-1]},"n":[{nodes}]}}'


@dataclass(frozen=True, slots=True)
class LeafChange:
    """A leaf a write changed: a result it applied or a dispatch it made."""

    node: int
    action: str
    attempt: int
    state: str  # "success", "failure", "timeout" (a result), "pending" (a dispatch)
    output: Any = None
    error: Any = None
    payload: Any = None  # what a dispatch sends (as stored), when recorded

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node": self.node,
            "action": self.action,
            "attempt": self.attempt,
            "state": self.state,
        }
        if self.state == "pending":
            out["payload"] = self.payload
        elif self.state == "success":
            out["output"] = self.output
        else:
            out["error"] = self.error
        return out


@dataclass(frozen=True, slots=True)
class HistoryStep:
    """One write of a run, described."""

    seq: int  # the write's number (0: the run as created)
    restart: int  # the run's restart count after it
    updated: float  # when it was written (seconds since the epoch)
    kind: str  # START, RESTART, ABORT, REPLAY or WHOLE
    status: str  # the run's status after it
    results: tuple[LeafChange, ...] = ()
    dispatches: tuple[LeafChange, ...] = ()
    context: dict[Any, Any] = field(default_factory=dict)  # the keys it set, and their values
    dropped: tuple[Any, ...] = ()  # the keys it dropped
    aborted: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The step as plain JSON-able data (for `--json`)."""
        return {
            "seq": self.seq,
            "restart": self.restart,
            "updated": self.updated,
            "kind": self.kind,
            "status": self.status,
            "results": [r.to_dict() for r in self.results],
            "dispatches": [d.to_dict() for d in self.dispatches],
            "context": {_key(k): values.encode(v) for k, v in self.context.items()},
            "dropped": [_key(k) for k in self.dropped],
            "aborted": self.aborted,
        }


Row = tuple[int, float, str]  # (seq, updated, data)


@dataclass(frozen=True, slots=True)
class RunHistory:
    """A run's kept writes: described steps and the job after any restart."""

    run_id: str
    steps: tuple[HistoryStep, ...]
    rows: tuple[Row, ...] = field(repr=False)
    format_version: int = field(repr=False)
    partial: bool = False  # the first writes were not kept (a store of an older version)

    @property
    def restarts(self) -> tuple[int, int]:
        """(first, last) restart numbers the history holds."""
        return self.steps[0].restart, self.steps[-1].restart

    def index_at(self, restart: int) -> int:
        """The index in `steps` of the last write with this restart count; RunError when
        the history holds none."""
        first, last = self.restarts
        found = None
        for i, step in enumerate(self.steps):
            if step.restart == restart:
                found = i
        if found is None:
            kept = "" if not self.partial else " (earlier writes were not kept)"
            raise RunError(
                f"restart {restart} is out of range: run {self.run_id} has restarts "
                f"{first}..{last}{kept}"
            )
        return found

    def job_at(self, restart: int) -> Job:
        """The job as it was after restart `restart` (and what followed it with no other
        restart: an abort, a resume)."""
        return self.job_after(self.index_at(restart))

    def job_after(self, index: int) -> Job:
        """The job after `steps[index]`."""
        parts = Parts({}, {}, [])
        for seq, _, data in self.rows[: index + 1]:
            _apply(parts, _read(data, seq), seq)
        return job_from_parts(self.run_id, parts, self.format_version)


def _read(data: str, seq: int) -> dict[str, Any]:
    try:
        delta = read_json(data, f"write {seq}")
    except Damage as exc:
        raise StoreError(f"the history is damaged: {exc}") from None
    if not isinstance(delta, dict):
        raise StoreError(f"the history is damaged: write {seq} is not an object")
    return delta


def _apply(parts: Parts, delta: dict[str, Any], seq: int) -> None:
    if delta.get("w") or not parts.run:
        parts.nodes.clear()
        parts.context.clear()
    try:
        replay_delta(parts, delta, f"write {seq}")
    except Damage as exc:
        raise StoreError(f"the history is damaged: {exc}") from None


def build_history(
    run_id: str,
    rows: Sequence[Row],
    format_version: int,
    *,
    partial: bool = False,
    first: Callable[[], Parts] | None = None,
) -> RunHistory:
    """Read `rows` (seq, updated, delta text), oldest first, the first a whole job."""
    if not rows:
        raise StoreError(f"run {run_id} has no history")
    parts = first() if first is not None else Parts({}, {}, [])
    steps: list[HistoryStep] = []
    for seq, updated, data in rows:
        delta = _read(data, seq)
        before = {i: parts.nodes[i][1] for i in _changed(delta) if i in parts.nodes}
        old_run = list(parts.run)
        _apply(parts, delta, seq)
        steps.append(_describe(seq, updated, delta, old_run, before, parts))
    return RunHistory(run_id, tuple(steps), tuple(rows), format_version, partial)


def _changed(delta: dict[str, Any]) -> list[int]:
    ids = [int(i) for i, _ in delta.get("s", ())]
    ids.extend(int(n[0]) for n in delta.get("n", ()))
    return ids


def _describe(
    seq: int,
    updated: float,
    delta: dict[str, Any],
    old_run: list[Any],
    before: dict[int, dict[str, Any]],
    parts: Parts,
) -> HistoryStep:
    restarts, aborted, *_rest, status = parts.run
    if not old_run:
        kind = START
    elif delta.get("w"):
        kind = WHOLE
    elif restarts > old_run[0]:
        kind = RESTART
    elif aborted is not None and old_run[1] is None:
        kind = ABORT
    else:
        kind = REPLAY
    results: list[LeafChange] = []
    dispatches: list[LeafChange] = []
    for node_id in _changed(delta) if kind != START else ():
        entry = parts.nodes.get(node_id)
        if entry is None or entry[0].get("kind") != "leaf":
            continue
        spec, state, _ = entry
        old = before.get(node_id)
        if old is not None and old == state:
            continue
        result, attempt = state.get("result"), int(state.get("attempt") or 0)
        old_result = None if old is None else old.get("result")
        old_attempt = 0 if old is None else int(old.get("attempt") or 0)
        action = str(spec.get("action"))
        if result in DONE and (old_result != result or old_attempt != attempt):
            results.append(
                LeafChange(
                    node_id,
                    action,
                    attempt,
                    str(result),
                    _decoded(state.get("output")),
                    _decoded(state.get("error")),
                )
            )
        elif result == "pending" and (old_result != "pending" or old_attempt != attempt):
            sent = state.get("sent")
            payload = _decoded(sent if sent is not None else spec.get("payload"))
            dispatches.append(LeafChange(node_id, action, attempt, "pending", payload=payload))
    setting = {k: v for k, _, v in delta.get("c", ())}
    context = {_decoded_key(k): _decoded(v) for k, v in setting.items()}
    dropped = tuple(_decoded_key(k) for k in delta.get("cd", ()) if k not in setting)
    if kind in (START, WHOLE):
        dropped = ()
    return HistoryStep(
        seq,
        int(restarts),
        float(updated),
        kind,
        str(status),
        tuple(results),
        tuple(dispatches),
        context,
        dropped,
        None if aborted is None else str(aborted),
    )


def _key(key: Any) -> str:
    """A context key as a JSON object's key: a string as it is, else its JSON text."""
    return key if isinstance(key, str) else dumps_text(values.encode(key))


def _decoded_key(text: str) -> Any:
    try:
        return decode_key(text)
    except (ValueError, TypeError, AblaufError):
        return text


def _decoded(value: Any) -> Any:
    try:
        return values.decode(value)
    except (ValueError, TypeError, KeyError, AblaufError):  # shown as stored
        return value
