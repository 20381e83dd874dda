"""Messages between processes (the Kafka runner's topics, issue 14): a dispatch and a
result round-trip exactly as versioned JSON; anything else is one `MessageError`."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ablauf_lang.codec.records import (
    MessageError,
    decode_dispatch_message,
    decode_result_message,
    encode_dispatch_message,
    encode_result_message,
)
from ablauf_lang.engine.nodes import Dispatch, LeafState, Result

values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(),
    ),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=20,
)
times = st.none() | st.floats(0, 4e9)


@given(
    st.integers(0, 10**6),
    st.integers(1, 50),
    st.from_regex(r"[a-z]{1,8}/[a-z\-]{1,12}", fullmatch=True),
    values,
    values,
    st.booleans(),
    times,
    times,
    times,
)
def test_dispatch_messages_round_trip(
    node: int,
    attempt: int,
    action: str,
    payload: Any,
    context: Any,
    idem: bool,
    due: float | None,
    limit: float | None,
    beat: float | None,
) -> None:
    d = Dispatch(node, action, payload, idem, attempt, context, due, limit, beat)
    run_id, back = decode_dispatch_message(encode_dispatch_message("run-1", d))
    assert run_id == "run-1"
    assert back == d
    assert back.context == context


@given(
    st.integers(0, 10**6),
    st.none() | st.integers(1, 50),
    st.sampled_from([LeafState.SUCCESS, LeafState.FAILURE, LeafState.TIMEOUT]),
    values,
    values,
    times,
    times,
)
def test_result_messages_round_trip(
    node: int,
    attempt: int | None,
    state: LeafState,
    output: Any,
    error: Any,
    started: float | None,
    finished: float | None,
) -> None:
    ok = state is LeafState.SUCCESS
    r = Result(
        node, attempt, state, output if ok else None, None if ok else error, started, finished
    )
    run_id, back = decode_result_message(encode_result_message("r", r))
    assert run_id == "r"
    assert back == r


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_anything_else_is_one_message_error(raw: bytes) -> None:
    for decode in (decode_dispatch_message, decode_result_message):
        message = ""
        try:
            decode(raw)  # a random text that happens to be a valid message is fine too
        except MessageError as exc:
            message = exc.message
        assert "\n" not in message


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"v": 2, "type": "dispatch", "run_id": "r"}', "version 1"),
        (b'{"v": 1, "type": "result", "run_id": "r"}', "not a dispatch message"),
        (b'{"v": 1, "type": "dispatch", "run_id": ""}', "without a run id"),
        (
            b'{"v": 1, "type": "dispatch", "run_id": "r", "action": "a/b", "idempotent": true,'
            b' "id": -1, "attempt": 1}',
            "bad id",
        ),
        (b"[1, 2]", "not a JSON object"),
        (b"\xff\xfe", "not JSON text"),
    ],
)
def test_malformed_dispatch_messages_say_what_is_wrong(raw: bytes, needle: str) -> None:
    with pytest.raises(MessageError, match=needle):
        decode_dispatch_message(raw)


def test_a_result_whose_output_cannot_be_stored_becomes_a_failure() -> None:
    r = Result(3, 1, LeafState.SUCCESS, object())
    _, back = decode_result_message(encode_result_message("r", r))
    assert back.state is LeafState.FAILURE
    assert "cannot be stored" in back.error
