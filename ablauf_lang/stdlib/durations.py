"""Durations and instants: what `sleep!!`, `:timeout` and `:advance 10m` accept, and their display.

A duration is a number of seconds (>= 0), a map of units (`{:minutes 10}`, `{:hours 1
:minutes 30}`) or a short text (`"10m"`, `"1h30m"`, `"500ms"`). An instant is an ISO-8601
text with a zone (`"2026-12-24T09:00:00Z"`, `"...+01:00"`) or epoch seconds. Both parse
to seconds as a float. Pure: no clock is read here.

Only the standard library, `errors` and `values` are imported, so the engine, the
compiler and the REPL may all use this module.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

from ablauf_lang.errors import AblaufError
from ablauf_lang.values import Keyword

__all__ = [
    "DURATION_UNITS",
    "MAX_DURATION",
    "format_duration",
    "format_instant",
    "parse_duration",
    "parse_instant",
]

# The keys of a duration map, and the seconds each stands for.
DURATION_UNITS: dict[str, int] = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}

# The longest duration accepted: 100 years, so that "now + duration" stays a date.
MAX_DURATION = 100 * 365 * 86400

_HINT = "a duration must be a number of seconds >= 0 or a map like {:minutes 10}"

# The units of a duration text, in the order `format_duration` writes them.
_TEXT_UNITS: dict[str, float] = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_TEXT_PART = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|d|h|m|s)", re.ASCII)
_NUMBER_TEXT = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*", re.ASCII)


def _show(value: Any, limit: int = 60) -> str:
    """A value in the language's notation, short, for a message."""
    if value is None:
        text = "nil"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, Keyword):
        text = f":{value}"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, int):
        text = str(value) if value.bit_length() < 64 else "a huge integer"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, dict):
        text = "{" + " ".join(f"{_show(k, limit)} {_show(v, limit)}" for k, v in value.items())
        text += "}"
    elif isinstance(value, list | tuple):
        text = "[" + " ".join(_show(v, limit) for v in value) + "]"
    else:
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(value: Any, shown: Any) -> float:
    """A number of seconds >= 0 and at most MAX_DURATION; AblaufError naming `shown`."""
    if not _is_number(value):
        raise AblaufError(f"{_HINT}, got {_show(shown)}")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if math.isnan(seconds) or seconds < 0:
        raise AblaufError(f"{_HINT}, got {_show(shown)}")
    if seconds > MAX_DURATION:
        raise AblaufError(f"a duration must be at most 100 years, got {_show(shown)}")
    return seconds


def parse_duration(value: Any) -> float:
    """Seconds of a duration: a number >= 0, a map of units, or a text like "1h30m".

    Raises AblaufError (no position: the caller adds where) for anything else.
    """
    if isinstance(value, dict):
        return _parse_map(value)
    if isinstance(value, str) and not isinstance(value, Keyword):
        return _parse_text(value)
    return _seconds(value, value)


def _parse_map(value: dict[Any, Any]) -> float:
    if not value:
        raise AblaufError(f"{_HINT}, got an empty map {{}}")
    total = 0.0
    for key, amount in value.items():
        unit = str(key) if isinstance(key, str) else None
        if unit not in DURATION_UNITS:
            known = ", ".join(f":{u}" for u in DURATION_UNITS)
            raise AblaufError(
                f"a duration map takes the keys {known}, got {_show(key)} in {_show(value)}"
            )
        if not _is_number(amount) or not amount >= 0:
            raise AblaufError(
                f"a duration map's :{unit} must be a number >= 0, got {_show(amount)} "
                f"in {_show(value)}"
            )
        total += _seconds(amount, value) * DURATION_UNITS[unit]
    return _seconds(total, value)


def _parse_text(text: str) -> float:
    bad = AblaufError(
        f'a duration text is a number and a unit (ms, s, m, h, d), like "10m" or "1h30m", '
        f"got {_show(text)}"
    )
    whole = _NUMBER_TEXT.fullmatch(text)
    if whole is not None:
        return _seconds(float(whole.group(1)), text)
    total = 0.0
    seen: set[str] = set()
    position = 0
    for match in _TEXT_PART.finditer(text):
        if match.start() != position or match.group(2) in seen:
            raise bad
        seen.add(match.group(2))
        total += float(match.group(1)) * _TEXT_UNITS[match.group(2)]
        position = match.end()
    if not seen or text[position:].strip():
        raise bad
    return _seconds(total, text)


def parse_instant(value: Any) -> float:
    """Epoch seconds of an instant: an ISO-8601 text with a zone, or epoch seconds (>= 0).

    A text without a zone ("2026-12-24T09:00:00") is refused: its time would depend on
    where the run happens to be.
    """
    if isinstance(value, str) and not isinstance(value, Keyword):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise AblaufError(
                "an instant must be an ISO-8601 time with a zone, like "
                f'"2026-12-24T09:00:00Z" or "2026-12-24T10:00:00+01:00", got {_show(value)}'
            ) from None
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise AblaufError(
                f"an instant needs a zone (Z or an offset like +01:00), got {_show(value)}, "
                'which has none: write "...Z" for UTC'
            )
        return moment.timestamp()
    if _is_number(value):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if math.isfinite(seconds) and 0 <= seconds <= 253402300799:  # up to year 9999
            return seconds
    raise AblaufError(
        'an instant must be an ISO-8601 time with a zone, like "2026-12-24T09:00:00Z", '
        f"or epoch seconds >= 0, got {_show(value)}"
    )


def format_duration(seconds: float) -> str:
    """A duration for display: "10m", "1h 30m", "2d 3h", "4.5s", "0s" (to the millisecond)."""
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    millis = round(seconds * 1000)
    days, millis = divmod(millis, 86_400_000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if millis:
        parts.append(f"{secs}.{millis:03d}".rstrip("0") + "s")
    elif secs or not parts:
        parts.append(f"{secs}s")
    return " ".join(parts)


def format_instant(epoch: float) -> str:
    """An instant for display, in UTC: "2026-12-24T09:00:00Z" (milliseconds when there are)."""
    try:
        moment = datetime.fromtimestamp(round(epoch, 3), UTC)
    except (OverflowError, OSError, ValueError):
        return f"{epoch:g} (epoch seconds)"
    spec = "milliseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"
