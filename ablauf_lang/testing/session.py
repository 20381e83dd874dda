"""Recorded stepping sessions as regression tests (`:record FILE`, `ablauf test FILE`).

A session file (`*.abltest`, JSON) holds the program, the initial context and, for every
restart of the session, the results it applied (fed by hand, returned by actions, or the
end of a wait) and the dispatches it made; then the status and context at the end:

    {"ablauf-test": 1, "kind": "session", "name": "...", "program": "...source...",
     "filename": "deploy.abl", "context": {...},
     "steps": [{"restart": 1, "now": 1700000000.0,
                "results": [{"node": 2, "attempt": 1, "state": "success", "output": ...}],
                "dispatches": [{"node": 3, "attempt": 1, "action": "deploy/push",
                                "payload": {...}}]},
               ...],
     "end": {"status": "success", "context": {...}}}

Values are in the value codec's JSON (`values.encode`), so keywords and maps with other
keys survive. `check_session` replays the file: it compiles the program as it is now,
feeds each restart the recorded results through the pure reducer (with the recorded
time), and compares what the restart dispatches (node, attempt, action, payload) with
what was recorded; then the status and context at the end. The first restart that
differs is shown side by side, each dispatch with its source line. A recorded result for
a node that is not in flight when it is fed is a difference too (the program no longer
dispatches it there). A program that no longer compiles fails the test (exit 1: the
program changed) with the compile error; a file that is not a test file is broken
(`TestFileError`, exit 2).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

from ablauf_lang import values
from ablauf_lang.api import compile as compile_program
from ablauf_lang.api import make_job, restart_job
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.nodes import Dispatch, LeafState, Result
from ablauf_lang.engine.replay import accepts
from ablauf_lang.errors import AblaufError
from ablauf_lang.testing.outcome import (
    FORMAT_KEY,
    FORMAT_VERSION,
    SUFFIX,
    TestFileError,
    TestOutcome,
)
from ablauf_lang.ui.render import format_value

__all__ = [
    "KIND",
    "Recording",
    "check_session",
    "default_name",
    "load_test",
    "program_of",
    "write_test",
]

KIND = "session"
KINDS = ("session", "faults")
_RESULT_STATES = {s.value: s for s in (LeafState.SUCCESS, LeafState.FAILURE, LeafState.TIMEOUT)}


def _result_data(r: Result) -> dict[str, Any]:
    data: dict[str, Any] = {"node": r.id, "attempt": r.attempt, "state": str(r.state)}
    if r.state is LeafState.SUCCESS:
        data["output"] = values.encode(r.output, "an action's output")
    else:
        data["error"] = values.encode(r.error, "an action's error")
    return data


def _dispatch_data(d: Dispatch) -> dict[str, Any]:
    return {
        "node": d.id,
        "attempt": d.attempt,
        "action": d.action,
        "payload": values.encode(d.payload, "a payload"),
    }


@dataclass
class Recording:
    """A stepping session being recorded (the REPL's `:record FILE` builds one): the
    program, the initial context, and each restart's results and dispatches."""

    program: str
    filename: str | None
    context: dict[str, Any]
    name: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None

    def add_step(
        self,
        fed: Sequence[Result],
        performed: Sequence[tuple[Dispatch, Result]],
        dispatched: Sequence[Dispatch],
        after: Job,
        *,
        woke: Sequence[tuple[Dispatch, Result]] = (),
        now: float | None = None,
    ) -> None:
        """Record one restart: the results it applied in the order the reducer got them
        (fed by hand, then performed, then waits that ended), what it dispatched, and the
        job after it (its status and context are the end so far)."""
        results = [*fed, *(r for _, r in performed), *(r for _, r in woke)]
        self.steps.append(
            {
                "restart": after.restarts,
                "now": now,
                "results": [_result_data(r) for r in results],
                "dispatches": [_dispatch_data(d) for d in dispatched],
            }
        )
        self.end = {
            "status": str(after.status),
            "context": values.encode(after.context, "the context"),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            FORMAT_KEY: FORMAT_VERSION,
            "kind": KIND,
            "name": self.name or default_name(self.filename),
            "program": self.program,
            "filename": self.filename,
            "context": values.encode(self.context, "the context"),
            "steps": self.steps,
            "end": self.end,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the file (whole, through a temporary file: a crash leaves the old one);
        the program's file is named relative to the test file's folder."""
        return write_test(path, self.to_dict())


def write_test(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write a test file (`.abltest` added when missing) whole, through a temporary file;
    its program's file named relative to the test file's folder (`relative_to`)."""
    target = Path(path)
    if target.suffix != SUFFIX:
        target = target.with_name(target.name + SUFFIX)
    data = {**data, "filename": relative_to(data.get("filename"), target.parent)}
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(dumps(data), encoding="utf-8")
    temporary.replace(target)
    return target


def relative_to(filename: str | None, folder: Path) -> str | None:
    """A program's file name as a test file in `folder` records it: relative to the
    folder when it is a file there is (so the two can move together), else as given."""
    if not filename or filename.startswith("<"):
        return filename
    try:
        if not Path(filename).is_file():
            return filename
        # Not resolved: a link (a checkout's examples/ linked elsewhere) stays as it is.
        return os.path.relpath(os.path.abspath(filename), os.path.abspath(folder))
    except (OSError, ValueError):
        return filename


def program_of(data: dict[str, Any], path: str) -> tuple[str, str | None, bool]:
    """The program a test runs: its file as it is now, when the file is there (its name
    relative to the test file's folder, or absolute); else the text the test recorded.
    Returns the source, the name to compile it under, and whether it came from the file."""
    filename = data.get("filename")
    if filename and not filename.startswith("<"):
        candidate = Path(filename)
        if not candidate.is_absolute():
            candidate = Path(path).parent / candidate
        try:
            return candidate.read_text(encoding="utf-8"), str(candidate), True
        except (OSError, UnicodeDecodeError, ValueError):
            pass
    return data["program"], filename, False


def dumps(data: dict[str, Any]) -> str:
    """A test file's text: indented, one step per block, so a diff of two reads well."""
    head = {k: v for k, v in data.items() if k not in ("steps", "end")}
    if "steps" not in data:
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    lines = ["{"]
    for key, value in head.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},")
    lines.append('  "steps": [')
    steps = data.get("steps") or []
    for i, step in enumerate(steps):
        comma = "," if i < len(steps) - 1 else ""
        lines.append(f"    {json.dumps(step, ensure_ascii=False)}{comma}")
    lines.append("  ],")
    lines.append(f'  "end": {json.dumps(data.get("end"), ensure_ascii=False)}')
    lines.append("}")
    return "\n".join(lines) + "\n"


def default_name(filename: str | None) -> str:
    """A test's default name: its program's file name without the suffix."""
    if not filename:
        return "session"
    return Path(filename).stem


# ---------------------------------------------------------------- reading a file


def _broken(path: str, message: str) -> TestFileError:
    return TestFileError(f"{path}: {message}")


def load_test(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A test file's data; TestFileError naming the problem when it cannot be read or
    is not a test file (missing, not JSON, another version, another kind, keys missing)."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _broken(name, "no such file") from None
    except IsADirectoryError:
        raise _broken(name, "is a directory") from None
    except UnicodeDecodeError as exc:
        raise _broken(name, f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise _broken(name, exc.strerror or str(exc)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _broken(
            name, f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise _broken(name, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict) or FORMAT_KEY not in data:
        raise _broken(name, f'not an ablauf test file (no "{FORMAT_KEY}" key)')
    if data[FORMAT_KEY] != FORMAT_VERSION:
        raise _broken(
            name,
            f"test file format {data[FORMAT_KEY]!r} is not supported "
            f"(this ablauf reads version {FORMAT_VERSION})",
        )
    kind = data.get("kind")
    if kind not in KINDS:
        raise _broken(name, f"unknown kind {kind!r} (one of: {', '.join(KINDS)})")
    needed = ("program", "steps", "end") if kind == KIND else ("program",)
    missing = [k for k in needed if k not in data]
    if missing:
        raise _broken(name, f"missing {', '.join(missing)}")
    if not isinstance(data["program"], str):
        raise _broken(name, '"program" must be the program\'s source text')
    _check_shape(name, data, kind == KIND)
    return data


def _is(value: Any, *types: type) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


def _check_shape(path: str, data: dict[str, Any], is_session: bool) -> None:
    """The types of a test file's fields, so that nothing later meets a surprise."""
    wrong = [k for k in ("name", "filename") if data.get(k) is not None and not _is(data[k], str)]
    if data.get("context") is not None and not isinstance(data["context"], dict):
        wrong.append("context")
    if not is_session:
        if data.get("seed") is not None and not _is(data["seed"], int):
            wrong.append("seed")
        if not isinstance(data.get("violation") or {}, dict):
            wrong.append("violation")
    else:
        if not isinstance(data["steps"], list):
            raise _broken(path, '"steps" must be a list')
        for index, step in enumerate(data["steps"]):
            if not isinstance(step, dict):
                raise _broken(path, f"step {index}: not an object")
            if step.get("restart") is not None and not _is(step["restart"], int):
                wrong.append(f"steps[{index}].restart")
            if step.get("now") is not None and not _is(step["now"], int, float):
                wrong.append(f"steps[{index}].now")
        end = data["end"]
        if not isinstance(end or {}, dict):
            wrong.append("end")
        elif end and end.get("status") is not None and not _is(end["status"], str):
            wrong.append("end.status")
    if wrong:
        raise _broken(path, f"a damaged field: {', '.join(wrong)} has the wrong type")


@dataclass(frozen=True, slots=True)
class Start:
    """Where a test begins: its program's job, the name it was compiled under, and
    whether the program came from its file as it is now (else: the recorded text)."""

    job: Job
    filename: str | None
    from_file: bool


def start_of(data: dict[str, Any], path: str, name: str) -> Start | TestOutcome:
    """A test's job at its start (`program_of`, with its initial context); a failed
    outcome when the program no longer compiles; TestFileError for a damaged context."""
    source, filename, from_file = program_of(data, path)
    context = initial_context(data, path)
    try:
        job = make_job(compile_program(source, filename), context)
    except AblaufError as exc:
        return TestOutcome(path, name, False, f"the program no longer compiles:\n{exc}")
    return Start(job, filename, from_file)


def initial_context(data: dict[str, Any], path: str) -> dict[Any, Any]:
    """A test file's initial context, decoded; TestFileError when it is damaged."""
    try:
        context = values.decode(data.get("context") or {})
    except AblaufError as exc:
        raise _broken(path, f"a damaged context: {exc.message}") from None
    if not isinstance(context, dict):
        raise _broken(path, "the context must be a map")
    return context


def _results(path: str, index: int, raw: Any) -> list[Result]:
    if not isinstance(raw, list):
        raise _broken(path, f"step {index}: results must be a list")
    out = []
    for item in raw:
        try:
            state = _RESULT_STATES[item["state"]]
            node, attempt = _int(item["node"]), item.get("attempt")
            attempt = None if attempt is None else _int(attempt)
            output = values.decode(item.get("output"))
            error = values.decode(item.get("error"))
        except (KeyError, TypeError, ValueError, AttributeError, AblaufError) as exc:
            raise _broken(
                path, f"step {index}: a damaged result {str(item)[:80]} ({exc})"
            ) from None
        out.append(Result(node, attempt, state, output, error))
    return out


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _int(value: Any) -> int:
    if not _is(value, int):
        raise TypeError(f"{value!r} is not a whole number")
    return int(value)


def _dispatches(path: str, index: int, raw: Any) -> list[tuple[int, int, str, Any]]:
    if not isinstance(raw, list):
        raise _broken(path, f"step {index}: dispatches must be a list")
    out = []
    for item in raw:
        try:
            out.append(
                (
                    _int(item["node"]),
                    _int(item["attempt"]),
                    _str(item["action"]),
                    values.decode(item.get("payload")),
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError, AblaufError) as exc:
            raise _broken(
                path, f"step {index}: a damaged dispatch {str(item)[:80]} ({exc})"
            ) from None
    return out


# ---------------------------------------------------------------- replaying


def _where(job: Job | None, node: int, home: str | None = None) -> str:
    if job is None:
        return ""
    try:
        span = getattr(job.node(node), "span", None)
    except (KeyError, IndexError, AblaufError):
        return ""
    if span is None:
        return ""
    return (
        f" (line {span.line})"
        if span.filename in (None, home)
        else f" ({span.filename}:{span.line})"
    )


def _show_dispatch(d: tuple[int, int, str, Any], job: Job | None, home: str | None) -> str:
    node, attempt, action, payload = d
    again = f" attempt {attempt}" if attempt != 1 else ""
    return f"#{node} :{action} {format_value(payload, 40)}{again}{_where(job, node, home)}"


def side_by_side(left: Iterable[str], right: Iterable[str], width: int = 48) -> str:
    """Two columns, recorded | now; a `!` marks the rows that differ."""
    rows = [f"  {'recorded':<{width}} | now"]
    for a, b in zip_longest(left, right, fillvalue=""):
        mark = "!" if a != b else " "
        a_cut = a if len(a) <= width else a[: width - 1] + "…"
        rows.append(f"{mark} {a_cut:<{width}} | {b}")
    return "\n".join(rows)


def _key(d: tuple[int, int, str, Any]) -> tuple[int, int, str, str]:
    return d[0], d[1], d[2], json.dumps(values.encode(d[3]), sort_keys=True, default=str)


def check_session(data: dict[str, Any], path: str) -> TestOutcome:
    """Replay a session file (see the module docstring) and say whether it still holds."""
    name = str(data.get("name") or default_name(data.get("filename")))
    start = start_of(data, path, name)
    if isinstance(start, TestOutcome):
        return start
    job, filename, from_file = start.job, start.filename, start.from_file
    steps = data["steps"]
    for index, step in enumerate(steps):
        restart = step.get("restart", index + 1)
        results = _results(path, index, step.get("results", []))
        recorded = _dispatches(path, index, step.get("dispatches", []))
        stale = [r for r in results if not accepts(job, r)]
        if stale:
            left = [f"result #{r.id} {r.state}" for r in stale]
            right = [f"#{r.id} is not in flight{_where(job, r.id, filename)}" for r in stale]
            return _differs(path, name, restart, "a recorded result has nowhere to go", left, right)
        now = step.get("now")
        try:
            job, made = restart_job(job, results, None if now is None else float(now))
        except AblaufError as exc:
            return TestOutcome(
                path, name, False, f"restart {restart} fails now: {exc}", restart=restart
            )
        got = [(d.id, d.attempt, d.action, d.payload) for d in made]
        if sorted(map(_key, got)) != sorted(map(_key, recorded)):
            left = [_show_dispatch(d, job, filename) for d in sorted(recorded, key=_key)]
            right = [_show_dispatch(d, job, filename) for d in sorted(got, key=_key)]
            return _differs(path, name, restart, "the dispatches differ", left, right)
    end = data["end"] or {}
    status = str(job.status)
    if end.get("status") is not None and end.get("status") != status:
        return _differs(
            path,
            name,
            job.restarts,
            "the run ends differently",
            [f"status {end.get('status')}"],
            [f"status {status}"],
        )
    if "context" in end:
        try:
            want = values.decode(end["context"])
        except AblaufError as exc:
            raise _broken(path, f"a damaged context at the end: {exc.message}") from None
        if not isinstance(want, dict):
            raise _broken(path, "the context at the end must be a map")
        if _canon(want) != _canon(job.context):
            keys = sorted({*map(str, want), *map(str, job.context)})
            left = [f"{k} {format_value(_get(want, k), 40)}" for k in keys]
            right = [f"{k} {format_value(_get(job.context, k), 40)}" for k in keys]
            return _differs(path, name, job.restarts, "the context at the end differs", left, right)
    against = f" against {filename}" if from_file else ""
    return TestOutcome(
        path,
        name,
        True,
        f"{len(steps)} restart{'' if len(steps) == 1 else 's'} replayed{against}, ends {status}",
    )


def _get(mapping: dict[Any, Any], key: str) -> Any:
    for k, v in mapping.items():
        if str(k) == key:
            return v
    return "(absent)"


def _canon(value: Any) -> str:
    return json.dumps(values.encode(value), sort_keys=True, default=str)


def _differs(
    path: str, name: str, restart: int, what: str, left: list[str], right: list[str]
) -> TestOutcome:
    diff = side_by_side(left, right)
    return TestOutcome(
        path, name, False, f"restart {restart}: {what}", diff=diff, restart=int(restart)
    )
