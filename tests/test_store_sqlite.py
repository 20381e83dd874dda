"""The SQLite store: URLs, deltas that load back exactly, damaged files, several processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pyrsistent import pvector

from ablauf_lang.codec import job as serde
from ablauf_lang.engine.job import Job, make_job, restart_job
from ablauf_lang.engine.kinds import Doseq, If, Node, Pmap
from ablauf_lang.engine.nodes import Status, failure, success
from ablauf_lang.engine.replay import abort, prepare_replay
from ablauf_lang.errors import RunError, StoreError
from ablauf_lang.runners.local import LocalRunner
from ablauf_lang.stores import sql as sqlbase
from ablauf_lang.stores.backend import open_store
from ablauf_lang.stores.base import default_url
from ablauf_lang.stores.sqlite import SqliteStore, parse_url
from tests.builders import Do, L, Par_, Try_, number

REPO = Path(__file__).resolve().parent.parent


def same(a: Job, b: Job) -> bool:
    """Equal as serialised, context order included."""
    return serde.to_data(a) == serde.to_data(b) and list(a.context) == list(b.context)


# ---------------------------------------------------------------- URLs and opening


@pytest.mark.parametrize(
    ("url", "path", "options"),
    [
        ("sqlite:///runs.db", "runs.db", {}),
        ("sqlite:///sub/dir/runs.db", "sub/dir/runs.db", {}),
        ("sqlite:////abs/runs.db", "/abs/runs.db", {}),
        ("sqlite:////abs/r%20s.db?synchronous=full", "/abs/r s.db", {"synchronous": "full"}),
        ("sqlite://", ":memory:", {}),
        ("sqlite:///:memory:", ":memory:", {}),
        (
            "SQLITE:///x.db?timeout=2&synchronous=normal",
            "x.db",
            {"timeout": "2", "synchronous": "normal"},
        ),
    ],
)
def test_url_names_a_path_and_options(url: str, path: str, options: dict[str, str]) -> None:
    assert parse_url(url) == (path, options)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:runs.db", "use sqlite:///relative/path"),
        ("sqlite://host/runs.db", "names no host"),
        ("sqlite:///x.db?synchronous=sometimes", "synchronous must be one of"),
        ("sqlite:///x.db?timeout=soon", "timeout must be a number"),
        ("sqlite:///x.db?journal=wal", "unknown option 'journal'"),
        ("mysql://x", "unknown store URL"),
    ],
)
def test_bad_urls_are_refused_in_one_line(
    tmp_path: Path, url: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=message) as info:
        open_store(url)
    assert "\n" not in str(info.value)


def test_relative_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deep" / "er").mkdir(parents=True)
    with open_store("sqlite:///deep/er/runs.db") as store:  # type: ignore[attr-defined]
        store.create_run(make_job(number(L("a"))))
    assert (tmp_path / "deep" / "er" / "runs.db").is_file()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("missing/dir/x.db", r"its directory .*missing/dir does not exist"),
        ("afile/x.db", r"afile is not a directory"),
        ("adir", r"it is a directory"),
        ("empty.db", r"is an empty file, not an ablauf store: remove it"),
    ],
)
def test_a_store_is_never_made_where_the_user_did_not_mean(
    tmp_path: Path, where: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(StoreError, match=message) as info:
        open_store(f"sqlite:///{where}")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "missing").exists()
    assert (tmp_path / "empty.db").stat().st_size == 0  # never turned into a store


def test_an_empty_url_is_an_error_not_the_default_store() -> None:
    with pytest.raises(StoreError, match="the store URL is empty"):
        open_store("")
    with pytest.raises(StoreError, match="the store URL is empty"):
        open_store("  ")


def test_default_store_is_a_sqlite_file_in_the_user_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ABLAUF_STORE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    url = default_url()
    assert url == f"sqlite:///{tmp_path}/xdg/ablauf/runs.db"
    store = open_store()
    assert isinstance(store, SqliteStore)
    store.close()
    assert (tmp_path / "xdg" / "ablauf" / "runs.db").is_file()
    monkeypatch.setenv("ABLAUF_STORE", "memory:")
    assert open_store().url == "memory:"


@pytest.mark.parametrize(
    ("option", "env", "level"),
    [
        ("", None, 1),
        ("?synchronous=full", None, 2),
        ("", "full", 2),
        ("", "FULL", 2),
        ("?synchronous=normal", "full", 1),  # the URL says more than the environment
        ("", "extra", 3),
    ],
)
def test_wal_mode_and_synchronous_setting(
    tmp_path: Path, option: str, env: str | None, level: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv("ABLAUF_SQLITE_SYNC", raising=False)
    else:
        monkeypatch.setenv("ABLAUF_SQLITE_SYNC", env)
    store = SqliteStore.from_url(f"sqlite:///{tmp_path}/r.db{option}")
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == level
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    store.close()


def test_a_bad_synchronous_environment_value_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ABLAUF_SQLITE_SYNC", "sometimes")
    with pytest.raises(StoreError, match=r"\$ABLAUF_SQLITE_SYNC must be one of"):
        SqliteStore.from_url(f"sqlite:///{tmp_path}/r.db")


def test_synchronous_full_from_the_environment_reaches_a_cli_run(tmp_path: Path) -> None:
    """A real `ablauf run` with ABLAUF_SQLITE_SYNC=full: its connection syncs at FULL."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            """
            from ablauf_lang import action

            @action("probe/sync")
            def sync(payload, context):
                import gc, sqlite3
                levels = [
                    c.execute("PRAGMA synchronous").fetchone()[0]
                    for c in gc.get_objects() if isinstance(c, sqlite3.Connection)
                ]
                return levels
            """
        )
    )
    prog = tmp_path / "p.abl"
    prog.write_text("(with-augment [identity :levels] (action!! :probe/sync {}))")
    env = {**os.environ, "ABLAUF_SQLITE_SYNC": "full"}
    out = subprocess.run(
        [sys.executable, "-m", "ablauf_lang", "run", str(prog), "--actions", str(probe),
         "--store", f"sqlite:///{tmp_path}/r.db", "--json"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    levels = json.loads(out.stdout)["context"]["levels"]
    assert levels
    assert set(levels) == {2}


# ---------------------------------------------------------------- damaged and foreign files


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    SqliteStore(str(path)).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match=r"schema version 99, newer than .* upgrade"):
        SqliteStore(str(path))


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    path.write_bytes(b"this is not a database, just some text " * 200)
    with pytest.raises(StoreError, match="damaged or not a SQLite database") as info:
        SqliteStore(str(path))
    assert "\n" not in str(info.value)


def test_another_applications_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE mine (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not an ablauf store"):
        SqliteStore(str(path))


def test_damaged_pages_give_a_store_error_on_load(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with SqliteStore(str(path)) as store:
        job = make_job(number(Do(*[L("a", "x" * 200) for _ in range(200)])))
        run_id = store.create_run(job)
        store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    for at in range(2 * page, len(data) - page, page):  # every page but the header's
        data[at : at + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged") as info:
        SqliteStore(str(path)).load(run_id)
    assert "\n" not in str(info.value)


def test_unknown_run_is_a_run_error(tmp_path: Path) -> None:
    with SqliteStore(str(tmp_path / "r.db")) as store:
        for call in (store.load, store.info, lambda r: store.record(r, make_job(number(L())))):
            with pytest.raises(RunError, match="no run 'nope'"):
                call("nope")
        assert not store.exists("nope")


# ---------------------------------------------------------------- what is written, and loaded back

leaves = st.builds(
    lambda idem, aug, n: L(f"act{n}", idempotent=idem, augment=((), (f"k{n}",)) if aug else None),
    st.booleans(),
    st.booleans(),
    st.integers(0, 3),
)


def _branches(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    kids = st.lists(children, max_size=3)
    return st.one_of(
        kids.map(lambda k: Do(*k)),
        kids.map(lambda k: Par_(*k)),
        st.tuples(kids, st.lists(children, max_size=2), st.lists(children, max_size=2)).map(
            lambda t: Try_(*t)
        ),
        st.tuples(st.booleans(), kids, kids).map(
            lambda t: If(-1, t[0], pvector([Do(*t[1]), Do(*t[2])]))
        ),
        st.tuples(st.sampled_from([Doseq, Pmap]), st.integers(0, 3), children).map(
            lambda t: t[0](-1, "x", list(range(t[1])), number(t[2]))
        ),
    )


trees = st.recursive(leaves, _branches, max_leaves=12).map(number)
_ids = itertools.count()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("prop") / "runs.db")


@settings(max_examples=100)
@given(tree=trees, data=st.data())
def test_every_write_loads_back_exactly(db: str, tree: Node, data: st.DataObject) -> None:
    """Record every operation (restarts, abort, replay, crash) and load it back each time,
    through store objects that wrote it, that only read it, or that never saw it."""
    old = sqlbase.COMPACT_EVERY
    sqlbase.COMPACT_EVERY = data.draw(st.sampled_from([2, 3, 64]), label="compact every")
    writer = SqliteStore(db)
    reader = SqliteStore(db)
    try:
        job = make_job(tree, {"start": 1})
        run_id = writer.create_run(job, source="(test)", run_id=f"prop{next(_ids)}")
        inflight: dict[int, Any] = {}
        for _ in range(40):
            op = data.draw(
                st.sampled_from(["restart"] * 6 + ["abort", "replay", "crash", "switch"]),
                label="op",
            )
            if op == "abort":
                job, inflight = abort(job, "stop"), {}
            elif op == "replay":
                job, inflight = prepare_replay(job), {}
            elif op == "crash":
                job, inflight = prepare_replay(reader.load(run_id).job), {}
            elif op == "switch":
                # Go on with a store object that only read the run, or one that never saw it.
                writer.close()
                writer = reader if data.draw(st.booleans(), label="reader") else SqliteStore(db)
                reader = SqliteStore(db)
                reader.load(run_id) if writer is not reader else None
                continue
            else:
                chosen = data.draw(
                    st.lists(st.sampled_from(sorted(inflight)), unique=True)
                    if inflight
                    else st.just([]),
                    label="arrive",
                )
                results = [
                    failure(inflight.pop(i), "bad")
                    if data.draw(st.booleans(), label="fails")
                    else success(inflight.pop(i), {"n": i})
                    for i in chosen
                ]
                job, dispatches = restart_job(job, results, now=float(job.restarts))
                inflight.update((d.id, d) for d in dispatches)
            writer.record(run_id, job)
            loaded = reader.load(run_id)
            assert same(loaded.job, job)
            assert loaded.info.status is job.status
            assert loaded.info.restarts == job.restarts
            if job.done and op == "restart":
                break
    finally:
        sqlbase.COMPACT_EVERY = old
        writer.close()
        reader.close()


def test_run_time_expansion_is_stored(tmp_path: Path) -> None:
    tree = number(Do(L("a"), Doseq(-1, "x", [1, 2, 3], number(Par_(L("b"), L("c")))), L("d")))
    with SqliteStore(str(tmp_path / "r.db")) as store:
        job = make_job(tree)
        run_id = store.create_run(job)
        job, dispatches = restart_job(job)
        store.record(run_id, job)
        while dispatches:
            job, dispatches = restart_job(job, [success(d, d.id) for d in dispatches])
            store.record(run_id, job)
            assert same(SqliteStore(store.path).load(run_id).job, job)
    assert job.status is Status.SUCCESS
    assert len(job.paths) == 4 + 3 * 3  # seq, a, doseq, d; three (par b c)


def test_a_step_writes_the_same_bytes_however_large_the_tree(tmp_path: Path) -> None:
    per_step = {}
    for n in (400, 8000):
        with SqliteStore(str(tmp_path / f"r{n}.db")) as store:
            job = make_job(number(Do(*[L("a", i) for i in range(n)])))
            run_id = store.create_run(job)
            job, dispatches = restart_job(job)
            store.record(run_id, job)
            before = store.bytes_written
            for _ in range(300):
                job, dispatches = restart_job(job, [success(d, d.payload) for d in dispatches])
                store.record(run_id, job)
            per_step[n] = (store.bytes_written - before) / 300
    assert per_step[8000] < 1.2 * per_step[400]
    assert per_step[8000] < 1000  # a few hundred bytes: two leaves and a cursor


def test_deltas_are_folded_into_a_snapshot(tmp_path: Path) -> None:
    with SqliteStore(str(tmp_path / "r.db")) as store:
        job = make_job(number(Do(*[L("a", i) for i in range(300)])))
        run_id = store.create_run(job)
        job, dispatches = restart_job(job)
        for _ in range(200):
            job, dispatches = restart_job(job, [success(d, d.payload) for d in dispatches])
            store.record(run_id, job)
        count = store._conn.execute("SELECT count(*) FROM deltas").fetchone()[0]
        assert 0 < count < sqlbase.COMPACT_EVERY
        assert store.compactions == 200 // sqlbase.COMPACT_EVERY
        assert same(SqliteStore(store.path).load(run_id).job, job)


def test_results_arriving_together_are_one_commit(tmp_path: Path) -> None:
    async def act(payload: Any, context: Any) -> Any:
        await asyncio.sleep(0.001)
        return payload

    n = 300
    with SqliteStore(str(tmp_path / "r.db")) as store:
        job = make_job(number(Par_(*[L("t/act", i) for i in range(n)])))
        run_id = store.create_run(job)
        before = store.commits
        final = asyncio.run(LocalRunner({"t/act": act}, store=store, run_id=run_id).run(job))
        assert final.status is Status.SUCCESS
        # Batched: about n / 32 commits (the concurrency), at times up to 3x that on a busy
        # machine; one commit per result would be n.
        assert store.commits - before < n / 5


# ---------------------------------------------------------------- listing


def test_list_info_and_status_filter(tmp_path: Path) -> None:
    with SqliteStore(str(tmp_path / "r.db")) as store:
        ids = []
        for i in range(3):
            job = make_job(number(L("a")))
            run_id = store.create_run(job, filename=f"f{i}.abl")
            job, ds = restart_job(job)
            job, _ = restart_job(job, [success(ds[0]) if i != 1 else failure(ds[0], "no\nway")])
            store.record(run_id, job)
            ids.append(run_id)
        assert [i.run_id for i in store.list_runs()] == ids[::-1]
        assert [i.run_id for i in store.list_runs(limit=2)] == ids[:0:-1]
        failed = store.list_runs(status="failure")
        assert [i.run_id for i in failed] == [ids[1]]
        assert failed[0].error == "no way"
        info = store.info(ids[0])
        assert (info.status, info.restarts, info.filename) == (Status.SUCCESS, 2, "f0.abl")
        assert info.to_dict()["status"] == "success"


# ---------------------------------------------------------------- several writers


def test_a_second_writer_of_one_run_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "r.db")
    first, second = SqliteStore(path), SqliteStore(path)
    job = make_job(number(Do(L("a"), L("b"))))
    run_id = first.create_run(job)
    job, _ = restart_job(job)
    first.record(run_id, job)
    theirs = second.load(run_id).job
    second.record(run_id, abort(theirs, "stop"))
    with pytest.raises(StoreError, match="written by another process"):
        first.record(run_id, restart_job(job)[0])
    assert second.load(run_id).job.aborted == "stop"


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from ablauf_lang.engine.job import make_job
    from ablauf_lang.runners.local import LocalRunner
    from ablauf_lang.stores.sqlite import SqliteStore
    from tests.builders import Do, L, number

    store = SqliteStore.from_url(sys.argv[1])
    for i in range(int(sys.argv[3])):
        job = make_job(number(Do(*[L("action/log", k) for k in range(40)])))
        run_id = store.create_run(job, run_id=f"{sys.argv[2]}-{i}")
        final = asyncio.run(LocalRunner({}, store=store, run_id=run_id).run(job))
        assert final.status == "success", final.status
    store.close()
    """
)


def test_two_processes_write_one_file_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, name, "6"],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("p", "q")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    with SqliteStore.from_url(url) as store:
        runs = store.list_runs()
        assert len(runs) == 12
        assert {r.status for r in runs} == {Status.SUCCESS}
        assert store.load("q-5").job.restarts == 41
        assert store._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---------------------------------------------------------------- any Python str, deep values

ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(ANY_TEXT, min_size=4, max_size=4))
@example(texts=["\ud800", "\udfff x", "\ud83d", "é\ud800☃"])
def test_any_python_str_is_stored_and_read_back(texts: list[str]) -> None:
    """Lone surrogates (which UTF-8 cannot hold) and every other character, in a payload,
    an output, a context key and value, an error and an abort reason, load back exactly."""
    payload, output, key, reason = texts
    where = tempfile.mkdtemp()
    store = SqliteStore(os.path.join(where, "any.db"))
    try:
        job = make_job(number(Do(L("a", payload), L("b"))), {key: [payload, {key: output}]})
        run_id = store.create_run(job, source=payload, filename=key)
        job, ds = restart_job(job)
        job, ds = restart_job(job, [success(ds[0], output)])
        store.record(run_id, job)
        job, ds = restart_job(job, [failure(ds[0], reason)])
        store.record(run_id, job)
        job2 = abort(prepare_replay(job, retry_interrupted=True), reason)
        store.record(run_id, job2)
        for reader in (store, SqliteStore(os.path.join(where, "any.db"))):
            loaded = reader.load(run_id)
            assert same(loaded.job, job2)
            assert loaded.job.aborted == job2.aborted
        info = store.info(run_id)  # the listing's text columns may escape what UTF-8 cannot say
        assert info.status is job2.status
    finally:
        store.close()
        shutil.rmtree(where)


def test_a_lone_surrogate_through_ablauf_run(tmp_path: Path) -> None:
    prog = tmp_path / "s.abl"
    prog.write_text('(with-augment [identity :s] (log!! "\\uD800 é"))')
    url = f"sqlite:///{tmp_path}/r.db"
    out = subprocess.run(
        [sys.executable, "-m", "ablauf_lang", "run", str(prog), "--store", url, "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    run_id = json.loads(out.stdout)["run_id"]
    assert open_store(url).load(run_id).job.context == {"s": "\ud800 é"}


def test_a_value_too_deep_to_store_is_refused_in_one_line(tmp_path: Path) -> None:
    import ablauf_lang

    deep: list[Any] = []
    inner = deep
    for _ in range(600):
        inner.append([])
        inner = inner[0]
    url = f"sqlite:///{tmp_path}/r.db"
    with pytest.raises(ablauf_lang.AblaufError, match="nested too deeply") as info:
        ablauf_lang.eval("(log!! 1)", context={"d": deep}, store=url)
    assert "\n" not in str(info.value)
    store = SqliteStore(str(tmp_path / "r.db"))
    assert store.list_runs() == []  # nothing half-written
    with pytest.raises(ablauf_lang.AblaufError, match="nested too deeply"):
        sqlbase._dumps(_nest(5000))  # the JSON encoder's own limit, said in one line
    store.close()


def _nest(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [3000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_a_deep_workflow_costs_the_store_no_more_per_level(tmp_path: Path, depth: int) -> None:
    """A `depth`-deep `do!!` (every level touched at once, twice) in SQLite within 3x of
    memory: the store walks each touched path once (it took 5x at 3,000, 12x at 10,000)."""
    import time

    import ablauf_lang

    source = "(do!! " * depth + "(log!! 1)" + ")" * depth
    times = {}
    for name, store in (("memory", None), ("sqlite", f"sqlite:///{tmp_path}/deep.db")):
        started = time.perf_counter()
        run = ablauf_lang.eval(source, store=store)
        times[name] = time.perf_counter() - started
        assert run.status.value == "success"
    assert times["sqlite"] <= 3 * times["memory"] + 0.5, times
    assert same(open_store(f"sqlite:///{tmp_path}/deep.db").load(run.run_id).job, run.job)


@pytest.mark.parametrize("loaded_after", [1, 10, 63, 64])
def test_a_store_that_loaded_a_run_folds_it_right_later(tmp_path: Path, loaded_after: int) -> None:
    # A store object that read the run (its deltas since the snapshot included) then
    # writes until the write that folds them: what it folds must be what the deltas
    # changed (a load that gave up its parts before keeping them folded nothing: the run
    # read back as pending though recorded a success, found by bench/bench_wide.py).
    from ablauf_lang.lang.compiler import compile_source

    path = str(tmp_path / "fold.db")
    width = 3 * sqlbase.COMPACT_EVERY
    source = f"(pmap!! [i (range {width})] (idempotent-action!! :t/noop i))"
    job = make_job(compile_source(source), {})
    first = SqliteStore(path)
    run_id = first.create_run(job)
    job, dispatches = restart_job(job, [], 1.0)
    first.record(run_id, job)
    for d in dispatches[:loaded_after]:
        job, _ = restart_job(job, [success(d, d.payload)], 2.0)
        first.record(run_id, job)
    first.close()
    second = SqliteStore(path)
    assert second.load(run_id).job == job
    for d in dispatches[loaded_after:]:
        job, _ = restart_job(job, [success(d, d.payload)], 3.0)
        second.record(run_id, job)
    assert job.status is Status.SUCCESS
    assert second.compactions >= 1
    second.close()
    again = SqliteStore(path)
    assert again.load(run_id).job == job
    again.close()


@pytest.mark.parametrize("values", [["plain", 1], ["é", "\ud800", "x\udfff"]])
def test_a_wide_expansion_is_written_node_by_node_and_loads_back(
    tmp_path: Path, values: list[Any]
) -> None:
    """An expansion's delta is encoded a node at a time and its fold writes node rows a
    chunk at a time (`ROWS_AT_ONCE`): more nodes than a chunk, lone surrogates among the
    values (their text escaped, the rest not) load back exactly, from the delta and from
    the rows; the delta is the JSON its parts say."""
    items = [values[i % len(values)] for i in range(sqlbase.ROWS_AT_ONCE * 2 + 7)]
    tree = number(Do(Pmap(-1, "x", items, number(L("a"))), L("b")))
    path = str(tmp_path / "w.db")
    with SqliteStore(path) as store:
        job = make_job(tree)
        run_id = store.create_run(job)
        job, dispatches = restart_job(job)
        assert len(dispatches) == len(items)
        store.record(run_id, job)  # the expansion: folded at once (its delta is large)
        assert store.compactions == 1
        assert same(SqliteStore(path).load(run_id).job, job)
        job, dispatches = restart_job(job, [success(d, d.payload) for d in dispatches[:3]])
        store.record(run_id, job)  # a delta after the fold
        assert same(SqliteStore(path).load(run_id).job, job)
        steps = store.history(run_id).steps
        assert len(steps[1].dispatches) == len(items)
    conn = sqlite3.connect(path)
    try:
        (data,) = conn.execute("SELECT data FROM history ORDER BY seq LIMIT 1 OFFSET 1").fetchone()
    finally:
        conn.close()
    decoded = json.loads(data)
    assert len(decoded["n"]) == len(items) + 1  # the copies and the pmap itself, whole
    if all((isinstance(v, str) and v.isascii()) or not isinstance(v, str) for v in values):
        assert data == json.dumps(decoded, separators=(",", ":"), ensure_ascii=False)
