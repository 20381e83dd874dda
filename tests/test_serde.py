"""The versioned JSON form of jobs and values."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ablauf_lang
from ablauf_lang import values
from ablauf_lang.code import Expr
from ablauf_lang.codec import job as serde
from ablauf_lang.engine.job import Job, restart_job
from ablauf_lang.engine.kinds import Leaf
from ablauf_lang.engine.nodes import Status, success
from ablauf_lang.errors import JobError
from ablauf_lang.values import Keyword
from tests.builders import Do, L, Par_, Try_, job_of


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        1,
        1.5,
        "s",
        [1, [2]],
        {"a": {"b": None}},
        {1: "int key"},
        {"$x": 1},
        {(1, 2): 3},
        (1, "t"),
    ],
)
def test_values_round_trip(value: object) -> None:
    encoded = json.loads(json.dumps(values.encode(value)))
    assert values.decode(encoded) == value


def test_keywords_become_plain_strings() -> None:
    assert values.encode({Keyword("k"): Keyword("v")}) == {"k": "v"}
    assert type(values.encode(Keyword("v"))) is str


def test_unstorable_value_is_a_clear_error() -> None:
    with pytest.raises(JobError, match="cannot store a value of type object"):
        values.encode(object())


def test_job_json_is_flat_and_versioned() -> None:
    job = job_of(Try_([Par_(L("a"), L("b", augment=(("x",), ("y", "z"))))], [L("r")]))
    data = json.loads(job.to_json())
    assert data["format"] == "ablauf/job"
    assert data["version"] == serde.VERSION
    assert [n["id"] for n in data["nodes"]] == list(range(8))
    assert data["nodes"][0]["children"] == [1, 5, 7]


def test_round_trip_mid_run_is_exact() -> None:
    job, [da, db] = restart_job(job_of(Par_(L("a"), Do(L("b"), L("c")))), now=5.0)
    job, _ = restart_job(job, [success(db, {"k": [1, 2]})], now=6.0)
    again = Job.from_json(job.to_json())
    assert again == job
    assert again.node(db.id).output == {"k": [1, 2]}
    assert again.node(da.id).dispatched_at == 5.0
    # and it goes on the same way
    assert restart_job(again, [success(da, 1)])[0] == restart_job(job, [success(da, 1)])[0]


def test_newer_version_is_refused() -> None:
    data = json.loads(job_of(L("a")).to_json())
    data["version"] = serde.VERSION + 1
    with pytest.raises(JobError, match="newer"):
        Job.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["not json", "{}", '{"format": "other"}'])
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(JobError):
        Job.from_json(text)


# ---------------------------------------------------------------------------------------
# One iterative value codec (ablauf_lang.values): deep values, cycles, JSON for people

PLAIN_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.text(max_size=4).map(Keyword),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.integers() | st.just("$map"), inner, max_size=3)
        | st.dictionaries(st.lists(st.integers(), max_size=2).map(tuple), inner, max_size=2)
    ),
    max_leaves=12,
)


@given(PLAIN_VALUES)
def test_any_value_round_trips_through_stored_json(value: Any) -> None:
    text = json.dumps(values.encode(value))
    assert values.decode(json.loads(text)) == value


@given(PLAIN_VALUES)
def test_plain_json_reads_back_as_the_same_value(value: Any) -> None:
    text = values.dumps_json(value)
    assert values.from_plain_json(json.loads(text)) == values.from_plain_json(
        json.loads(json.dumps(values.to_plain_json(value)))
    )
    again = values.from_plain_json(json.loads(text))
    # the same value, with vectors as lists (tuples only ever are map keys)
    assert json.dumps(values.to_plain_json(again)) == json.dumps(values.to_plain_json(value))


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def test_values_nest_up_to_the_limit_and_no_further() -> None:
    ok = nested(values.MAX_DEPTH)
    assert values.decode(json.loads(json.dumps(values.encode(ok)))) == ok
    assert json.loads(values.dumps_json(ok)) == ok
    for deep in (nested(values.MAX_DEPTH + 1), nested(100_000)):
        with pytest.raises(JobError, match=r"nested too deeply \(more than 100 levels"):
            values.encode(deep)
        with pytest.raises(JobError, match="nested too deeply"):
            values.to_plain_json(deep)
        assert "nested too deeply" in str(values.scan(deep)[1])


def test_a_value_that_contains_itself_is_named() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    ring: dict[str, Any] = {"a": [{"b": None}]}
    ring["a"][0]["b"] = ring
    for value in (loop, ring, {"x": [loop]}):
        with pytest.raises(JobError, match="contains itself"):
            values.encode(value)
        with pytest.raises(JobError, match="contains itself"):
            values.dumps_json(value)
    shared = [1, 2]
    assert values.encode([shared, shared, {"s": shared}]) == [[1, 2], [1, 2], {"s": [1, 2]}]


def test_integers_too_large_to_print_are_refused() -> None:
    assert values.encode(10**4299) == 10**4299
    with pytest.raises(JobError, match="more than 4,300 digits"):
        values.encode({"n": 10**4300})


def test_an_action_returning_a_cyclic_value_fails_its_leaf(tmp_path: Any) -> None:
    def cyclic(payload: Any, context: Any) -> Any:
        out: list[Any] = [payload]
        out.append(out)
        return out

    run = ablauf_lang.eval(
        "(try!! (action!! :x/loop 1) (rescue!! (log!! (ctx :exec/last-error))))",
        actions={"x/loop": cyclic},
        store=f"sqlite:///{tmp_path / 'runs.db'}",
    )
    assert run.status is Status.SUCCESS
    assert "output of x/loop cannot be stored: the value contains itself" in str(
        run.context["exec/last-error"]
    )


def test_plain_json_forms() -> None:
    expr = Expr(compile_expr_code())
    value = {
        "ctx": {(1, 2): "vector key", "a": [1, (2, 3)]},
        "odd": {1: "int key"},
        "tag": {"$map": "not a tag"},
        "floats": [float("nan"), float("inf"), -float("inf")],
        "kw": Keyword("k"),
        "expr": expr,
        "set": {3, 1},
    }
    assert values.to_plain_json(value) == {
        "ctx": {"$map": [[[1, 2], "vector key"], ["a", [1, [2, 3]]]]},
        "odd": {"$map": [[1, "int key"]]},
        "tag": {"$map": [["$map", "not a tag"]]},
        "floats": ["NaN", "Infinity", "-Infinity"],
        "kw": "k",
        "expr": {"$expr": '(str "v" (ctx :version))'},
        "set": [1, 3],
    }
    back = values.from_plain_json(json.loads(values.dumps_json(value)))
    assert back["ctx"] == {(1, 2): "vector key", "a": [1, [2, 3]]}
    assert back["odd"] == {1: "int key"}
    assert back["tag"] == {"$map": "not a tag"}


def compile_expr_code() -> Any:
    from ablauf_lang.lang.compiler import compile_source

    leaf = compile_source('(log!! (str "v" (ctx :version)))')
    assert isinstance(leaf, Leaf)
    assert isinstance(leaf.payload, Expr)
    return leaf.payload.code


def test_dumps_json_writes_lone_surrogates_as_escapes() -> None:
    text = values.dumps_json({"s": "a\ud800b", "é": "ü"})
    assert text == '{"s": "a\\ud800b", "é": "ü"}'
    text.encode("utf-8")  # writable as UTF-8
    assert json.loads(text) == {"s": "a\ud800b", "é": "ü"}


# ---------------------------------------------------------------------------------------
# Damaged snapshots: one clear JobError, naming what and where


def snapshot() -> dict[str, Any]:
    return json.loads(job_of(Do(L("a"), L("b"))).to_json())


def damaged(change: Any) -> str:
    data = snapshot()
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (json.dumps(snapshot())[:40], "cut short"),
        ("", "not valid JSON at line 1, column 1"),
        ("[1, 2]", "not an ablauf job snapshot"),
        ('{"format": "ablauf/job"}', "has no valid version"),
        (damaged(lambda d: d.update(version=99)), "version 99 is newer"),
        (damaged(lambda d: d.update(version="1")), "has no valid version"),
        (
            damaged(lambda d: d["nodes"][1].pop("action")),
            "stored node 1 is damaged: missing field 'action'",
        ),
        (
            damaged(lambda d: d["nodes"][1].update(action=3)),
            "field 'action' is an integer, not a string",
        ),
        (
            damaged(lambda d: d["nodes"][2].update(result="maybe")),
            "stored node 2 is damaged: field 'result' is 'maybe'",
        ),
        (damaged(lambda d: d["nodes"][0].update(children=[1, 7])), "names a missing child 7"),
        (damaged(lambda d: d["nodes"][0].update(children=[1, 1])), "names a missing child 1"),
        (damaged(lambda d: d["nodes"][2].update(id=1)), "node id 1 twice"),
        (damaged(lambda d: d["nodes"][0].update(kind="loop")), "unknown node kind 'loop'"),
        (damaged(lambda d: d["nodes"][0].pop("kind")), "missing field 'kind'"),
        (damaged(lambda d: d.update(nodes=[])), "has no nodes"),
        (damaged(lambda d: d.update(nodes={"0": 1})), "has no nodes"),
        (damaged(lambda d: d["nodes"].append(7)), "stored node #3 is an integer, not an object"),
        (damaged(lambda d: d.update(todo={"x": "all"})), "field 'todo' has the key 'x'"),
        (damaged(lambda d: d.update(context=[1])), "field 'context' is a list, not an object"),
        (damaged(lambda d: d["nodes"][1].update(span="1:2")), "field 'span' is not [line, column"),
        (damaged(lambda d: d["nodes"][1].update(attempt=True)), "field 'attempt' is a boolean"),
    ],
)
def test_a_damaged_snapshot_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(JobError) as info:
        serde.loads(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
