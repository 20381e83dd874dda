"""Operating many runs: filters, paging, id prefixes, delete, prune, follow, aborted runs.

The store methods are checked on every backend (memory, a SQLite file, a real PostgreSQL
server through the same SQL); the `ablauf runs ...` commands as real subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

import ablauf_lang
from ablauf_lang.cli.common import parse_age, parse_since
from ablauf_lang.errors import RunError
from ablauf_lang.stores.backend import open_store
from ablauf_lang.stores.base import Owner
from tests.commands import ablauf

ENV = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # piped: whole lines


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "memory":
        url = "memory:"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/runs.db"
    else:
        url = request.getfixturevalue("pg_url")
    backend = open_store(url)
    yield backend
    backend.close()


def add(store: Any, source: str, filename: str | None, run_id: str | None = None) -> str:
    return ablauf_lang.eval(source, store=store, filename=filename, run_id=run_id).run_id


OK = '(log!! "ok")'
BAD = '(action!! :action/fail "no")'


def test_filters_paging_and_counts(store: Any) -> None:
    made = []
    for i in range(7):
        source, name = (OK, f"ops/deploy{i % 2}.abl") if i % 3 else (BAD, "x_%.abl")
        made.append(add(store, source, name))
        time.sleep(0.002)  # distinct creation times: newest first is well defined
    newest = made[::-1]
    assert [i.run_id for i in store.list_runs()] == newest
    assert [i.run_id for i in store.list_runs(limit=3)] == newest[:3]
    assert [i.run_id for i in store.list_runs(limit=3, offset=3)] == newest[3:6]
    assert [i.run_id for i in store.list_runs(offset=5)] == newest[5:]
    assert store.count_runs() == 7
    failed = [r for r in newest if store.info(r).status.value == "failure"]
    assert [i.run_id for i in store.list_runs(status="failure")] == failed
    assert store.count_runs(status="failure") == len(failed) == 3
    # --file: the name as recorded, or its last part; LIKE's wildcards are plain text.
    deploy1 = [r for r in newest if store.info(r).filename == "ops/deploy1.abl"]
    assert [i.run_id for i in store.list_runs(filename="deploy1.abl")] == deploy1
    assert [i.run_id for i in store.list_runs(filename="ops/deploy1.abl")] == deploy1
    assert store.list_runs(filename="deploy") == []
    assert store.count_runs(filename="x_%.abl") == 3
    assert store.list_runs(filename="xy%.abl") == []
    cut = store.info(made[4]).created
    assert [i.run_id for i in store.list_runs(since=cut)] == newest[:3]
    assert store.count_runs(since=cut, status="failure") == 1


def test_id_prefixes(store: Any) -> None:
    ids = ["3f0c11aa", "3f0c22bb", "3f1d0000", "abcdef01"]
    for run_id in ids:
        add(store, OK, None, run_id)
    assert store.resolve_run_id("ab") == "abcdef01"
    assert store.resolve_run_id("3f1") == "3f1d0000"
    assert store.resolve_run_id("3f0c11aa") == "3f0c11aa"
    with pytest.raises(RunError, match=r"'3f0c' is ambiguous .*: it matches 3f0c11aa, 3f0c22bb"):
        store.resolve_run_id("3f0c")
    with pytest.raises(RunError, match="no run '99'"):
        store.resolve_run_id("99")
    with pytest.raises(RunError, match="no run 'AB'"):
        store.resolve_run_id("AB")  # ids are matched exactly, case included


def test_delete_and_prune(store: Any) -> None:
    old = [add(store, OK, "a.abl"), add(store, BAD, "b.abl")]
    live = store.create_run(ablauf_lang.make_job(OK))
    store.acquire_lease(live, Owner("elsewhere", 9, None, "t"), 600)
    gone = store.create_run(ablauf_lang.make_job(OK))  # pending, nobody drives it
    time.sleep(0.05)
    new = add(store, OK, "c.abl")
    cut = store.info(new).created - 0.01
    would, kept = store.prune_runs(before=cut, dry_run=True)
    assert sorted(would) == sorted([*old, gone])
    assert kept == [live]
    assert store.count_runs() == 5  # a dry run deletes nothing
    deleted, kept = store.prune_runs(before=cut, status="success")
    assert deleted == [old[0]]
    assert kept == []
    deleted, kept = store.prune_runs(before=cut)
    assert sorted(deleted) == sorted([old[1], gone])
    assert kept == [live]
    assert {i.run_id for i in store.list_runs()} == {live, new}
    with pytest.raises(RunError, match="is running"):
        store.delete_run(live)
    store.delete_run(new)
    with pytest.raises(RunError, match="no run"):
        store.info(new)
    with pytest.raises(RunError, match="no run"):
        store.delete_run(new)


def test_a_deleted_run_leaves_no_rows(tmp_path: Path) -> None:
    import sqlite3

    from ablauf_lang import api

    url = f"sqlite:///{tmp_path}/runs.db"
    keep = add(url, OK, None)
    drop = add(url, "(do!! (log!! 1) (log!! 2) (log!! {:a [1 2]}))", None)
    api.delete_run(drop, store=url)
    with sqlite3.connect(tmp_path / "runs.db") as conn:
        assert conn.execute("SELECT run_id FROM runs").fetchall() == [(keep,)]
        (key,) = conn.execute("SELECT id FROM runs").fetchone()
        for table in ("nodes", "deltas", "context", "leases"):
            others = conn.execute(f"SELECT count(*) FROM {table} WHERE run != ?", (key,))
            assert others.fetchone()[0] == 0, table
    assert [i.run_id for i in api.list_runs(url)] == [keep]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("2h", 7200), ("3d", 3 * 86400), ("1w", 7 * 86400), ("1.5h", 5400)],
)
def test_ages(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["", "3", "d", "3x", "-1d", "nand", "1e99d"])
def test_bad_ages_are_refused(text: str) -> None:
    with pytest.raises(RunError, match="duration"):
        parse_age(text, "--older-than")


def test_since_takes_durations_and_iso_dates() -> None:
    now = 1_800_000_000.0
    assert parse_since("2h", now) == now - 7200
    from datetime import datetime

    assert parse_since("2026-11-30") == datetime(2026, 11, 30).timestamp()

    utc = datetime(2026, 11, 30, 8, tzinfo=UTC).timestamp()
    assert parse_since("2026-11-30T08:00+00:00") == utc
    with pytest.raises(RunError, match="neither a duration"):
        parse_since("yesterday")


# ---------------------------------------------------------------- the command line


@pytest.fixture
def runs_db(tmp_path: Path) -> tuple[str, list[str]]:
    url = f"sqlite:///{tmp_path}/runs.db"
    ids = []
    for i in range(5):
        ids.append(add(url, OK if i != 2 else BAD, f"p{i % 2}.abl", f"{i}{i}aa{i}bbccdd"))
        time.sleep(0.002)
    return url, ids


def test_runs_list_options(tmp_path: Path, runs_db: tuple[str, list[str]]) -> None:
    url, ids = runs_db
    out = ablauf("runs", "list", "--store", url, "--limit", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].startswith(ids[4])
    assert lines[2].startswith(ids[3])
    assert "2 of 5 runs shown; the next ones: --offset 2" in out.stdout
    out = ablauf("runs", "list", "--store", url, "--limit", "2", "--offset", "4", cwd=tmp_path)
    assert out.stdout.splitlines()[1].startswith(ids[0])
    assert "shown" not in out.stdout  # the last page
    data = json.loads(
        ablauf("runs", "list", "--store", url, "--json", "--file", "p0.abl", cwd=tmp_path).stdout
    )
    assert [d["run_id"] for d in data] == [ids[4], ids[2], ids[0]]
    assert {d["state"] for d in data} == {"success", "failure"}
    failed = ablauf("runs", "list", "--store", url, "--status", "failure", "--json", cwd=tmp_path)
    assert [d["run_id"] for d in json.loads(failed.stdout)] == [ids[2]]
    none = ablauf("runs", "list", "--store", url, "--since", "2030-01-01", cwd=tmp_path)
    assert none.returncode == 0
    assert "no runs" in none.stdout
    recent = ablauf("runs", "list", "--store", url, "--since", "1h", "--json", cwd=tmp_path)
    assert len(json.loads(recent.stdout)) == 5
    bad = ablauf("runs", "list", "--store", url, "--since", "soon", cwd=tmp_path)
    assert bad.returncode == 2
    assert "neither a duration" in bad.stderr
    paged = ablauf("runs", "list", "--store", url, "--json", "--limit", "1", cwd=tmp_path)
    assert len(json.loads(paged.stdout)) == 1  # stdout is the JSON alone
    assert "1 of 5 runs shown" in paged.stderr


def test_prefixes_delete_and_prune_on_the_command_line(
    tmp_path: Path, runs_db: tuple[str, list[str]]
) -> None:
    url, ids = runs_db
    shown = ablauf("runs", "show", "33", "--store", url, "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["run_id"] == ids[3]
    amb = ablauf("runs", "show", "", "--store", url, cwd=tmp_path)
    assert amb.returncode == 2
    two = add(url, OK, None, "33zz")
    amb = ablauf("runs", "show", "33", "--store", url, cwd=tmp_path)
    assert amb.returncode == 2
    assert f"it matches {ids[3]}, {two}" in amb.stderr
    assert amb.stderr.count("\n") == 1
    out = ablauf("runs", "delete", "00", "33z", "nope", "--store", url, cwd=tmp_path)
    assert out.returncode == 2
    assert f"deleted run {ids[0]}\ndeleted run {two}\n" == out.stdout
    assert "no run 'nope'" in out.stderr
    dry = ablauf("runs", "prune", "--older-than", "0s", "--dry-run", "--store", url, "--json",
                 cwd=tmp_path)  # fmt: skip
    assert sorted(json.loads(dry.stdout)["would_delete"]) == sorted(ids[1:])
    pruned = ablauf(
        "runs", "prune", "--older-than", "0s", "--status", "success", "--store", url, cwd=tmp_path
    )
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted 3 run(s)" in pruned.stdout
    left = json.loads(ablauf("runs", "list", "--store", url, "--json", cwd=tmp_path).stdout)
    assert [d["run_id"] for d in left] == [ids[2]]
    bad = ablauf("runs", "prune", "--older-than", "soon", "--store", url, cwd=tmp_path)
    assert bad.returncode == 2
    assert "not a duration" in bad.stderr


def test_an_aborted_run_says_so_with_its_reason(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/runs.db"
    backend = open_store(url)
    job = ablauf_lang.make_job("(do!! (action!! :t/x 1) (log!! 2))")
    run_id = backend.create_run(job)
    job, _ = ablauf_lang.restart_job(job)
    backend.record(run_id, job)
    backend.close()
    out = ablauf("runs", "abort", run_id, "--reason", "operator said stop", "--store", url,
                 cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    listed = ablauf("runs", "list", "--store", url, cwd=tmp_path)
    line = listed.stdout.splitlines()[1]
    assert "aborted" in line
    assert "aborted: operator said stop" in line
    shown = ablauf("runs", "show", run_id, "--store", url, cwd=tmp_path)
    assert "aborted" in shown.stdout.splitlines()[0]
    assert "aborted: operator said stop" in shown.stdout
    data = json.loads(ablauf("runs", "show", run_id, "--store", url, "--json", cwd=tmp_path).stdout)
    assert data["state"] == "aborted"
    assert data["aborted"] == "operator said stop"


def drive_in_background(folder: Path, url: str) -> subprocess.Popen[bytes]:
    """`ablauf run p.abl --actions slow.py` in `folder`, quietly, in a process of its own."""
    cmd = [sys.executable, "-m", "ablauf_lang", "run", "p.abl", "--actions", "slow.py"]
    return subprocess.Popen(
        [*cmd, "--store", url, "-q"],
        cwd=folder,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_show_follow_redraws_until_the_run_ends(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(
        "import time\n"
        "from ablauf_lang import action\n\n"
        "@action('t/nap')\n"
        "def nap(payload, context):\n"
        "    time.sleep(payload)\n"
        "    return payload\n"
    )
    (tmp_path / "p.abl").write_text("(do!! (action!! :t/nap 1.5) (action!! :t/nap 1.5))")
    url = "sqlite:///runs.db"
    driver = drive_in_background(tmp_path, url)
    try:
        deadline = time.monotonic() + 30
        while True:
            if (tmp_path / "runs.db").exists():
                found = ablauf("runs", "list", "--store", url, "--json", cwd=tmp_path)
                runs = json.loads(found.stdout) if found.returncode == 0 else []
                if runs:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        run_id = runs[0]["run_id"]
        out = ablauf("runs", "show", run_id[:8], "--follow", "--interval", "0.1", "--store", url,
                     cwd=tmp_path)  # fmt: skip
    finally:
        driver.wait(timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    progress = [ln for ln in lines if ln.startswith(f"run {run_id}: ")]
    assert progress, out.stdout  # it said how the run went on while it waited
    assert "running" in progress[0]
    assert any(ln.startswith(f"run {run_id}  success") for ln in lines)  # then the end
    failed = add(url.replace("///", f"///{tmp_path}/"), BAD, None)
    again = ablauf("runs", "show", failed, "--follow", "--store", url, cwd=tmp_path)
    assert again.returncode == 1  # a finished run: shown once, its exit code


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite:////nonexistent/dir/x.db", "its directory /nonexistent/dir does not exist"),
        ("", "--store is empty"),
        ("  ", "--store is empty"),
    ],
)
def test_a_store_that_cannot_be_meant_is_refused(tmp_path: Path, url: str, says: str) -> None:
    for command in (["runs", "list"], ["runs", "show", "x"]):
        out = ablauf(*command, "--store", url, cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        assert says in out.stderr
        assert out.stderr.count("\n") == 1
    assert not Path("/nonexistent").exists()


def test_show_follow_redraws_in_place_on_a_terminal(tmp_path: Path, tmux: Any) -> None:
    (tmp_path / "slow.py").write_text(
        "import os, time\n"
        "from ablauf_lang import action\n\n"
        "@action('t/gate')\n"
        "def gate(payload, context):\n"
        "    while not os.path.exists(payload):\n"
        "        time.sleep(0.02)\n"
        "    return 'opened'\n"
    )
    gate = tmp_path / "gate"
    (tmp_path / "p.abl").write_text(f'(do!! (action!! :t/gate "{gate}") (log!! "after"))')
    url = f"sqlite:///{tmp_path}/runs.db"
    driver = drive_in_background(tmp_path, url)
    try:
        deadline = time.monotonic() + 30
        runs: list[Any] = []
        while not runs:
            assert time.monotonic() < deadline
            time.sleep(0.1)
            if (tmp_path / "runs.db").exists():
                found = ablauf("runs", "list", "--store", url, "--json", cwd=tmp_path)
                runs = [r for r in json.loads(found.stdout or "[]") if r["state"] == "running"]
        run_id = runs[0]["run_id"]
        command = (
            f"{sys.executable} -m ablauf_lang runs show {run_id} --follow --interval 0.1 "
            f"--store {url}; echo EXIT=$?; sleep 60"
        )
        tmux("new-session", "-d", "-s", "t", "-x", "160", "-y", "20", command)
        during = tmux.wait_for("t/gate")
        assert f"running ({runs[0]['driver']['host']}, pid {driver.pid})" in during
        assert "pending" in during
        gate.touch()
        after = tmux.wait_for("EXIT=0")
        assert '#2 action/log "after"  success' in after
        assert after.count(f"run {run_id}  ") == 1  # redrawn in place, not printed again
    finally:
        gate.touch()
        driver.wait(timeout=60)
