"""Result records: a `Result` as the JSON text the PostgreSQL queue keeps in `tasks.result`."""

from __future__ import annotations

import json
from typing import Any

from ablauf_lang.codec.delta import dumps_text as _dumps
from ablauf_lang.engine.nodes import Dispatch, LeafState, Result
from ablauf_lang.errors import AblaufError
from ablauf_lang.values import decode as decode_value
from ablauf_lang.values import encode as encode_value


def encode_result(result: Result) -> str:
    """A result as JSON text (an output or error JSON cannot hold becomes a failure)."""
    data: dict[str, Any] = {
        "id": result.id,
        "attempt": result.attempt,
        "state": str(result.state),
        "started_at": result.started_at,
        "finished_at": result.finished_at,
    }
    try:
        data["output"] = encode_value(result.output)
        data["error"] = encode_value(result.error)
        return _dumps(data)
    except (AblaufError, ValueError) as exc:
        data.update(state="failure", output=None, error=f"result cannot be stored: {exc}")
        return _dumps(data)


def decode_result(text: str) -> Result:
    """Invert `encode_result`."""
    data = json.loads(text)
    return Result(
        int(data["id"]),
        data.get("attempt"),
        LeafState(data["state"]),
        decode_value(data.get("output")),
        decode_value(data.get("error")),
        data.get("started_at"),
        data.get("finished_at"),
    )


def value_text(value: Any) -> str:
    """A value (a dispatch's payload or context) as JSON text."""
    return _dumps(encode_value(value))


def text_value(text: str) -> Any:
    """Invert `value_text`."""
    return decode_value(json.loads(text))


# ---------------------------------------------------------------- messages between processes
# What a runner on a message broker sends (issue 14's Kafka topics): a dispatch to perform,
# and a result to apply, each with its run id, as versioned JSON (never pickle). Decoding is
# strict: anything that is not what `encode_*_message` wrote is a `MessageError` naming the
# problem, so a consumer can set a malformed message aside with one log line.

MESSAGE_VERSION = 1


class MessageError(AblaufError):
    """A message that is not one this codec wrote (or a newer version of it)."""


def encode_dispatch_message(run_id: str, dispatch: Dispatch) -> bytes:
    """A dispatch as a message: run id, node, attempt, action, payload, context, limits."""
    data = {
        "v": MESSAGE_VERSION,
        "type": "dispatch",
        "run_id": run_id,
        "id": dispatch.id,
        "attempt": dispatch.attempt,
        "action": dispatch.action,
        "idempotent": dispatch.idempotent,
        "payload": encode_value(dispatch.payload, "the payload"),
        "context": encode_value(dispatch.context, "the context"),
        "due": dispatch.due,
        "timeout": dispatch.timeout,
        "heartbeat": dispatch.heartbeat,
    }
    return _dumps(data).encode()


def encode_result_message(run_id: str, result: Result) -> bytes:
    """A result as a message (an output JSON cannot hold becomes a failure, as stored)."""
    data = json.loads(encode_result(result))
    data.update(v=MESSAGE_VERSION, type="result", run_id=run_id)
    return _dumps(data).encode()


def _message(raw: bytes | str, kind: str) -> dict[str, Any]:
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"not a {kind} message: not JSON text ({exc})") from None
    if not isinstance(data, dict):
        raise MessageError(f"not a {kind} message: not a JSON object")
    version = data.get("v")
    if version != MESSAGE_VERSION:
        raise MessageError(f"not a {kind} message of version {MESSAGE_VERSION}: v={version!r:.20}")
    if data.get("type") != kind:
        raise MessageError(f"not a {kind} message: type {data.get('type')!r:.40}")
    if not isinstance(data.get("run_id"), str) or not data["run_id"]:
        raise MessageError(f"{kind} message without a run id")
    return data


def _int(data: dict[str, Any], key: str, kind: str, least: int) -> int:
    value = data.get(key)
    if type(value) is not int or value < least:
        raise MessageError(f"{kind} message with a bad {key}: {value!r:.40}")
    return value


def _time(data: dict[str, Any], key: str, kind: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise MessageError(f"{kind} message with a bad {key}: {value!r:.40}")
    return float(value)


def _value(data: dict[str, Any], key: str, kind: str) -> Any:
    try:
        return decode_value(data.get(key))
    except (AblaufError, ValueError, TypeError, RecursionError) as exc:
        raise MessageError(f"{kind} message with a bad {key}: {exc}") from None


def decode_dispatch_message(raw: bytes | str) -> tuple[str, Dispatch]:
    """(run id, dispatch) of a message `encode_dispatch_message` wrote; MessageError else."""
    kind = "dispatch"
    data = _message(raw, kind)
    action = data.get("action")
    if not isinstance(action, str) or not action:
        raise MessageError(f"{kind} message without an action")
    if not isinstance(data.get("idempotent"), bool):
        raise MessageError(f"{kind} message with a bad idempotent flag")
    dispatch = Dispatch(
        _int(data, "id", kind, 0),
        action,
        _value(data, "payload", kind),
        data["idempotent"],
        _int(data, "attempt", kind, 1),
        _value(data, "context", kind),
        _time(data, "due", kind),
        _time(data, "timeout", kind),
        _time(data, "heartbeat", kind),
    )
    return data["run_id"], dispatch


_RESULT_STATES = {str(s): s for s in (LeafState.SUCCESS, LeafState.FAILURE, LeafState.TIMEOUT)}


def decode_result_message(raw: bytes | str) -> tuple[str, Result]:
    """(run id, result) of a message `encode_result_message` wrote; MessageError else."""
    kind = "result"
    data = _message(raw, kind)
    state = _RESULT_STATES.get(str(data.get("state")))
    if state is None:
        raise MessageError(f"{kind} message with a bad state: {data.get('state')!r:.40}")
    attempt = None if data.get("attempt") is None else _int(data, "attempt", kind, 1)
    result = Result(
        _int(data, "id", kind, 0),
        attempt,
        state,
        _value(data, "output", kind),
        _value(data, "error", kind),
        _time(data, "started_at", kind),
        _time(data, "finished_at", kind),
    )
    return data["run_id"], result


# What else arrives on the restarter topic: a new run to start, and a wake-up (a person
# resumed or retried the run in the store: read it again and dispatch what is in flight).
CONTROL_KINDS = ("start", "wake")


def encode_control_message(kind: str, run_id: str) -> bytes:
    """A `start` or `wake` message for a run."""
    if kind not in CONTROL_KINDS:
        raise ValueError(f"not a control message kind: {kind!r}")
    return _dumps({"v": MESSAGE_VERSION, "type": kind, "run_id": run_id}).encode()


def decode_restarter_message(raw: bytes | str) -> tuple[str, str, Result | None]:
    """What a restarter consumes: ("result", run id, result), or ("start" | "wake", run
    id, None). MessageError for anything else."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        data = json.loads(text)
        kind = data.get("type") if isinstance(data, dict) else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        kind = None
    if kind in CONTROL_KINDS:
        run_id = _message(raw, str(kind))["run_id"]
        return str(kind), run_id, None
    run_id, result = decode_result_message(raw)
    return "result", run_id, result
