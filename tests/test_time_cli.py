"""`ablauf signal`, `runs list --waiting`, and what `runs list/show` say of waits and
attempts (text and --json), on a real SQLite store; `api.signal` on PostgreSQL too."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import ablauf_lang
from ablauf_lang import api
from ablauf_lang.cli import cli
from ablauf_lang.engine.job import make_job, restart_job
from ablauf_lang.engine.nodes import Dispatch, failure, success
from ablauf_lang.errors import RunError
from ablauf_lang.stores.backend import open_store
from ablauf_lang.stores.base import JobStore

APPROVAL = """
(do!!
  (sleep!! 10)
  (await!! :approval {:timeout {:hours 24}})
  (log!! "approved"))
"""
FLAKY = "(action!! :x/flaky {} {:retry {:max 3 :delay 5}})"
T0 = 1_796_000_000.0  # 2026-11-30T00:53:20Z


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing a test runs writes in the real home: store and XDG dirs in tmp."""
    monkeypatch.setenv("ABLAUF_STORE", f"sqlite:///{tmp_path / 'runs.db'}")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    opened = open_store(f"sqlite:///{tmp_path / 'runs.db'}")
    yield opened  # type: ignore[misc]
    opened.close()


def ablauf(*args: str) -> Result:
    """Run the command group in-process; an escaping exception fails the test."""
    result = CliRunner().invoke(cli, list(args), prog_name="ablauf", catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def one_line_error(result: Result, *needles: str) -> None:
    """Exit 2, one line on stderr naming the problem, nothing on stdout."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""


def recorded(store: JobStore, source: str) -> tuple[str, object, list[Dispatch]]:
    """A run of `source` started at T0 and recorded (nobody drives it any more)."""
    job = make_job(ablauf_lang.compile(textwrap.dedent(source)))
    run_id = store.create_run(job, source=source, filename="p.abl")
    job, dispatches = restart_job(job, (), now=T0)
    store.record(run_id, job)
    return run_id, job, dispatches


def awaiting(store: JobStore) -> tuple[str, object, list[Dispatch]]:
    """A run past its sleep, awaiting `approval` (deadline T0 + 10 + 24h)."""
    run_id, job, dispatches = recorded(store, APPROVAL)
    job, dispatches = restart_job(job, [success(dispatches[0])], now=T0 + 10)  # type: ignore[arg-type]
    store.record(run_id, job)
    return run_id, job, dispatches


# ---------------------------------------------------------------- ablauf signal


def test_signal_puts_a_value_in_the_mailbox(store: JobStore) -> None:
    run_id, _, dispatches = awaiting(store)
    result = ablauf("signal", run_id[:6], "approval", '{"by": "ana"}')
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"sent signal approval to run {run_id} (#1)"
    result = ablauf("signal", run_id, ":approval", "--json")  # no value: null
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"run_id": run_id, "name": "approval", "seq": 2}
    assert store.take_signal(run_id, "approval", dispatches[0].id) == (1, {"by": "ana"})
    assert [s["value"] for s in store.signals(run_id)] == [{"by": "ana"}, None]


def test_signal_takes_a_negative_number_as_its_value(store: JobStore) -> None:
    run_id, _, _ = awaiting(store)
    assert ablauf("signal", run_id, "approval", "-5").exit_code == 0
    assert store.signals(run_id)[0]["value"] == -5


def test_signal_reads_a_value_from_a_file(store: JobStore, tmp_path: Path) -> None:
    run_id, _, _ = awaiting(store)
    (tmp_path / "v.json").write_text("[1, 2, 3]", encoding="utf-8")
    assert ablauf("signal", run_id, "approval", "@v.json").exit_code == 0
    assert store.signals(run_id)[0]["value"] == [1, 2, 3]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("approval", "{not json"), ("not valid JSON", 'e.g. true, 42, "yes"')),
        (("approval", "yes"), ("not valid JSON",)),
        (("approval", "NaN"), ("NaN is not a JSON number",)),
        (("approval", "@missing.json"), ("missing.json: no such file",)),
        (("", "1"), ("a signal's name must be",)),
    ],
)
def test_signal_refuses_bad_input_in_one_line(
    store: JobStore, args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    run_id, _, _ = awaiting(store)
    one_line_error(ablauf("signal", run_id, *args), *needles)
    assert store.signals(run_id) == []


def test_signal_refuses_unknown_and_finished_runs(store: JobStore) -> None:
    one_line_error(ablauf("signal", "nope", "approval"), "no run 'nope'")
    job = make_job(ablauf_lang.compile('(log!! "x")'))
    run_id = store.create_run(job)
    job, dispatches = restart_job(job, (), now=T0)
    job, _ = restart_job(job, [success(dispatches[0])], now=T0)
    store.record(run_id, job)
    one_line_error(
        ablauf("signal", run_id, "approval", "true"),
        f"run {run_id} already finished (success): signals are only delivered to a run that waits",
    )
    one_line_error(ablauf("signal", "--store", "", run_id, "approval"), "--store is empty")


def test_api_signal_opens_the_store_by_url(store: JobStore, tmp_path: Path) -> None:
    run_id, _, _ = awaiting(store)
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    assert api.signal(run_id, "approval", {"ok": True}, store=url) == 1
    assert api.signal(run_id, "approval", store=store) == 2
    with pytest.raises(RunError, match="does not exist"):
        api.signal("nope", "approval", store=url)


def test_api_signal_on_postgresql_wakes_the_awaits(pg_url: str) -> None:
    with open_store(pg_url) as pg:  # type: ignore[attr-defined]
        run_id, _, dispatches = awaiting(pg)
        assert api.signal(run_id, "approval", "yes", store=pg) == 1
        assert api.signal(run_id, ":approval", "again", store=pg_url) == 2
        assert pg.take_signal(run_id, "approval", dispatches[0].id) == (1, "yes")
        assert pg.due_runs(T0 + 11) == [run_id]  # seq 2 is still in the mailbox


# ---------------------------------------------------------------- runs list, show


def test_runs_list_says_what_runs_wait_for_and_filters_them(store: JobStore) -> None:
    sleeper, _, _ = recorded(store, APPROVAL)
    waiter, _, _ = awaiting(store)
    job = make_job(ablauf_lang.compile('(log!! "x")'))
    busy = store.create_run(job)
    job, _ = restart_job(job, (), now=T0)
    store.record(busy, job)
    result = ablauf("runs", "list")
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "sleeping until 2026-11-30T00:53:30Z" in lines[sleeper]
    assert "waiting: approval (until 2026-12-01T00:53:30Z)" in lines[waiter]
    assert "waiting" not in lines[busy]
    assert "sleeping" not in lines[busy]
    result = ablauf("runs", "list", "--waiting", "--json")
    data = json.loads(result.stdout)
    assert sorted(d["run_id"] for d in data) == sorted([sleeper, waiter])
    assert {d["run_id"]: d["waiting"] for d in data}[sleeper].startswith("sleeping until")
    result = ablauf("runs", "list", "--waiting", "--status", "abandoned")
    assert result.exit_code == 0
    assert "no runs" in result.stdout


def test_runs_show_says_what_a_run_waits_for(store: JobStore) -> None:
    run_id, _, _ = awaiting(store)
    result = ablauf("runs", "show", run_id)
    assert result.exit_code == 0, result.output
    assert "#2 waiting: approval (until 2026-12-01T00:53:30Z)" in result.stdout
    assert "#1 sleep!! 10s  success" in result.stdout  # a wait leaf is shown as written
    assert (
        "until 2026-12-01T00:53:30Z" in result.stdout.split("#2 await!! :approval {:timeout 1d}")[1]
    )
    data = json.loads(ablauf("runs", "show", run_id, "--json").stdout)
    assert data["waiting"] == "waiting: approval (until 2026-12-01T00:53:30Z)"
    assert data["waits"] == [
        {
            "node": 2,
            "kind": "signal",
            "name": "approval",
            "until": T0 + 10 + 86400,
            "attempt": 1,
            "text": "waiting: approval (until 2026-12-01T00:53:30Z)",
        }
    ]
    node = next(n for n in data["nodes"] if n["id"] == 2)
    assert node["wake"] == T0 + 10 + 86400
    assert node["attempts"] == []


def test_runs_show_lists_each_attempt_of_a_retried_leaf(store: JobStore) -> None:
    run_id, job, dispatches = recorded(store, FLAKY)
    job, dispatches = restart_job(job, [failure(dispatches[0], "boom")], now=T0 + 1)  # type: ignore[arg-type]
    store.record(run_id, job)
    result = ablauf("runs", "show", run_id)
    assert "#0 retrying x/flaky (attempt 2 at 2026-11-30T00:53:26Z)" in result.stdout
    assert "attempt 1 failure" in result.stdout
    assert '→ "boom"' in result.stdout
    job, dispatches = restart_job(job, [failure(dispatches[0], "bang")], now=T0 + 7)
    job, _ = restart_job(job, [success(dispatches[0], 42)], now=T0 + 20)
    store.record(run_id, job)
    result = ablauf("runs", "show", run_id)
    text = result.stdout
    assert text.index("attempt 1 failure") < text.index("attempt 2 failure")
    assert '→ "bang"' in text
    assert "retrying" not in text
    data = json.loads(ablauf("runs", "show", run_id, "--json").stdout)
    (leaf,) = data["nodes"]
    assert leaf["attempt"] == 3
    assert leaf["output"] == 42
    assert [(a["attempt"], a["state"], a["error"]) for a in leaf["attempts"]] == [
        (1, "failure", "boom"),
        (2, "failure", "bang"),
    ]
    assert all(a["finished_at"] is not None for a in leaf["attempts"])
    assert data["waits"] == []
    assert data["waiting"] is None
