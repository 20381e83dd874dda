"""The versioned JSON form of jobs and values."""

from __future__ import annotations

import json

import pytest

from ablauf_lang import serde
from ablauf_lang.errors import JobError
from ablauf_lang.forms import Keyword
from ablauf_lang.job import Job, restart_job
from ablauf_lang.nodes import success
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
    encoded = json.loads(json.dumps(serde.encode_value(value)))
    assert serde.decode_value(encoded) == value


def test_keywords_become_plain_strings() -> None:
    assert serde.encode_value({Keyword("k"): Keyword("v")}) == {"k": "v"}
    assert type(serde.encode_value(Keyword("v"))) is str


def test_unstorable_value_is_a_clear_error() -> None:
    with pytest.raises(JobError, match="cannot store a value of type object"):
        serde.encode_value(object())


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
