"""`stdlib.durations`: durations and instants, parsed and shown."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ablauf_lang.errors import AblaufError
from ablauf_lang.stdlib.durations import (
    MAX_DURATION,
    format_duration,
    format_instant,
    parse_duration,
    parse_instant,
)
from ablauf_lang.values import Keyword

DURATIONS: list[tuple[Any, float]] = [
    (0, 0.0),
    (3, 3.0),
    (2.5, 2.5),
    ({Keyword("minutes"): 10}, 600.0),
    ({Keyword("hours"): 1, Keyword("minutes"): 30}, 5400.0),
    ({"days": 2, "seconds": 1.5}, 172801.5),
    ("10m", 600.0),
    ("1h30m", 5400.0),
    ("1h 30m", 5400.0),
    ("2d", 172800.0),
    ("45s", 45.0),
    ("500ms", 0.5),
    ("4.5s", 4.5),
    ("2d 3h", 183600.0),
    ("30", 30.0),
    (" 1m ", 60.0),
]


@pytest.mark.parametrize(("value", "seconds"), DURATIONS)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


BAD_DURATIONS: list[tuple[Any, str]] = [
    (-3, "a duration must be a number of seconds >= 0 or a map like {:minutes 10}, got -3"),
    (True, "got true"),
    (None, "got nil"),
    (float("nan"), "got nan"),
    (float("inf"), "at most 100 years"),
    (10**400, "at most 100 years, got a huge integer"),
    (MAX_DURATION + 1, "at most 100 years"),
    ([1], "got [1]"),
    (Keyword("m"), "got :m"),
    ({}, "got an empty map {}"),
    ({Keyword("minuts"): 1}, "takes the keys :seconds, :minutes, :hours, :days, got :minuts"),
    ({Keyword("minutes"): -1}, "a duration map's :minutes must be a number >= 0, got -1"),
    ({Keyword("minutes"): "1"}, 'must be a number >= 0, got "1"'),
    ({Keyword("days"): 10**6}, "at most 100 years"),
    ("x", 'like "10m" or "1h30m", got "x"'),
    ("", 'got ""'),
    ("ms", 'got "ms"'),
    ("10m10m", 'got "10m10m"'),
    ("10mx", 'got "10mx"'),
    ("-1s", 'got "-1s"'),
]


@pytest.mark.parametrize(("value", "message"), BAD_DURATIONS)
def test_bad_duration_is_a_plain_error(value: Any, message: str) -> None:
    with pytest.raises(AblaufError) as info:
        parse_duration(value)
    assert message in info.value.message
    assert info.value.line is None  # no position: the caller adds where


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (600, "10m"),
        (5400, "1h 30m"),
        (183600, "2d 3h"),
        (4.5, "4.5s"),
        (0.25, "0.25s"),
        (93784.5, "1d 2h 3m 4.5s"),
        (59.9996, "1m"),
        (-90, "-1m 30s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.floats(min_value=0, max_value=MAX_DURATION, allow_nan=False))
def test_format_then_parse_is_the_duration_to_the_millisecond(seconds: float) -> None:
    back = parse_duration(format_duration(seconds))
    assert math.isclose(back, seconds, abs_tol=0.0005 + 1e-6, rel_tol=1e-12)


@given(
    st.dictionaries(
        st.sampled_from(["seconds", "minutes", "hours", "days"]).map(Keyword),
        st.integers(min_value=0, max_value=1000) | st.floats(min_value=0, max_value=1000),
        min_size=1,
    )
)
def test_a_map_is_the_sum_of_its_units(value: dict[Any, Any]) -> None:
    units = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}
    assert math.isclose(parse_duration(value), sum(units[k] * v for k, v in value.items()))


@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)))
def test_any_scalar_parses_or_is_refused_plainly(value: Any) -> None:
    try:
        seconds = parse_duration(value)
    except AblaufError:
        return  # refused with a message, never another exception
    assert 0 <= seconds <= MAX_DURATION


INSTANTS: list[tuple[Any, float]] = [
    ("2026-12-24T09:00:00Z", 1798102800.0),
    ("2026-12-24T10:00:00+01:00", 1798102800.0),
    ("2026-12-24T09:00:00.500Z", 1798102800.5),
    (0, 0.0),
    (1.5e9, 1.5e9),
]


@pytest.mark.parametrize(("value", "epoch"), INSTANTS)
def test_parse_instant(value: Any, epoch: float) -> None:
    assert parse_instant(value) == epoch


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2026-12-24T09:00:00", "an instant needs a zone (Z or an offset like +01:00)"),
        ("2026-12-24", "needs a zone"),
        ("tomorrow", 'an instant must be an ISO-8601 time with a zone, like "2026-12-24T09'),
        (-1, "or epoch seconds >= 0, got -1"),
        (True, "got true"),
        (None, "got nil"),
        (float("inf"), "got inf"),
        ({"at": 1}, "got {"),
    ],
)
def test_bad_instant_is_a_plain_error(value: Any, message: str) -> None:
    with pytest.raises(AblaufError) as info:
        parse_instant(value)
    assert message in info.value.message


def test_format_instant() -> None:
    assert format_instant(1798102800.0) == "2026-12-24T09:00:00Z"
    assert format_instant(1.5) == "1970-01-01T00:00:01.500Z"
    assert format_instant(1e20) == "1e+20 (epoch seconds)"


@given(st.integers(min_value=0, max_value=253402300799))
def test_format_then_parse_instant_is_the_instant(epoch: int) -> None:
    assert parse_instant(format_instant(epoch)) == epoch
