"""Result records: a `Result` as the JSON text the PostgreSQL queue keeps in `tasks.result`."""

from __future__ import annotations

import json
from typing import Any

from ablauf_lang.codec.delta import dumps_text as _dumps
from ablauf_lang.engine.nodes import LeafState, Result
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
