"""Who is driving a run: the driver's lease, with real `ablauf` processes and SQLite files.

A process driving a run holds a lease in the store, renewed by a heartbeat; `runs list`
and `runs show` say `running (host, pid)` while it lives and `abandoned` once it is gone;
resume, retry and delete refuse a live run (`--force` takes it over).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ablauf_lang
from ablauf_lang.errors import RunError
from ablauf_lang.stores.backend import open_store
from ablauf_lang.stores.base import (
    HOST,
    KEEPER,
    Driver,
    DriverLease,
    Owner,
    RunInfo,
    pid_alive,
    process_started,
)
from ablauf_lang.stores.memory import MemoryStore
from ablauf_lang.stores.sqlite import SqliteStore

ACTIONS = textwrap.dedent(
    """
    import os, time
    from ablauf_lang import action

    @action("t/slow")
    def slow(payload, context):
        with open(os.environ["EFFECTS"], "a") as f:
            f.write(f"{os.getpid()} {payload}\\n")
        # Sleeps `payload` seconds, or until the test creates the file `gate`.
        gate = os.path.join(os.path.dirname(os.environ["EFFECTS"]), "gate")
        end = time.monotonic() + float(payload)
        while time.monotonic() < end and not os.path.exists(gate) and not os.environ.get("NOWAIT"):
            time.sleep(0.02)
        return payload
    """
)
ENV = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # piped: whole lines
PROGRAM = '(do!! (idempotent-action!! :t/slow {seconds}) (log!! "done"))'


@pytest.fixture
def here(tmp_path: Path) -> Path:
    (tmp_path / "slow.py").write_text(ACTIONS)
    return tmp_path


def ablauf(
    here: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `ablauf ARGS` in `here`; its output and exit code."""
    return subprocess.run(
        [sys.executable, "-m", "ablauf_lang", *args],
        cwd=here,
        capture_output=True,
        text=True,
        env={**ENV, "EFFECTS": str(here / "effects"), **(env or {})},
        timeout=timeout,
        check=False,
    )


def start_run(
    here: Path, seconds: float, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """An `ablauf run` child driving a run whose first step sleeps `seconds`."""
    (here / "slow.abl").write_text(PROGRAM.format(seconds=seconds))
    return subprocess.Popen(
        [sys.executable, "-m", "ablauf_lang", "run", "slow.abl", "--actions", "slow.py",
         "--store", "sqlite:///runs.db", "--json"],
        cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EFFECTS": str(here / "effects"), **(env or {})},
    )  # fmt: skip


def wait_for(test: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = test()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def infos(here: Path) -> list[dict[str, Any]]:
    out = ablauf(here, "runs", "list", "--store", "sqlite:///runs.db", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def running(here: Path) -> dict[str, Any] | None:
    if not (here / "runs.db").exists() or not (here / "effects").exists():
        return None  # the action has not started yet
    found = [i for i in infos(here) if i["state"] == "running"]
    return found[0] if found else None


@pytest.fixture
def child(here: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def make(seconds: float, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = start_run(here, seconds, env)
        procs.append(proc)
        return proc

    yield make
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# ---------------------------------------------------------------- with real processes


def test_a_live_run_is_shown_running_and_refused(here: Path, child: Any) -> None:
    proc = child(120)
    info = wait_for(lambda: running(here))
    assert info["driver"]["pid"] == proc.pid
    assert info["driver"]["host"] == HOST
    run_id = info["run_id"]
    store = "sqlite:///runs.db"
    shown = ablauf(here, "runs", "show", run_id[:6], "--store", store)
    assert f"running ({HOST}, pid {proc.pid})" in shown.stdout
    listed = ablauf(here, "runs", "list", "--store", store)
    assert f"running ({HOST}, pid {proc.pid})" in listed.stdout
    for command in ("resume", "retry"):
        out = ablauf(here, "runs", command, run_id, "--actions", "slow.py", "--store", store)
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1
        assert "Traceback" not in out.stderr
        assert f"run {run_id} is running ({HOST}, pid {proc.pid}" in out.stderr
        assert "--force" in out.stderr
    out = ablauf(here, "runs", "delete", run_id, "--store", store)
    assert out.returncode == 2
    assert "is running" in out.stderr
    # The driver was left alone: it finishes, its action performed once.
    (here / "gate").touch()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["status"] == "success"
    assert len((here / "effects").read_text().splitlines()) == 1
    [after] = infos(here)
    assert after["state"] == "success"
    assert after["driver"] is None
    with sqlite3.connect(here / "runs.db") as conn:
        assert conn.execute("SELECT count(*) FROM leases").fetchone()[0] == 0


def test_a_killed_driver_leaves_an_abandoned_run_that_resumes(here: Path, child: Any) -> None:
    proc = child(120)
    run_id = wait_for(lambda: running(here))["run_id"]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    [info] = infos(here)
    assert info["state"] == "abandoned"  # at once: its pid is gone on this host
    shown = ablauf(here, "runs", "show", run_id, "--store", "sqlite:///runs.db")
    assert "abandoned" in shown.stdout
    assert f"ablauf runs resume {run_id}" in shown.stdout
    (here / "gate").touch()
    out = ablauf(
        here, "runs", "resume", run_id, "--actions", "slow.py", "--store", "sqlite:///runs.db"
    )
    assert out.returncode == 0, out.stderr
    [info] = infos(here)
    assert info["state"] == "success"


def test_force_takes_over_a_live_run(here: Path, child: Any) -> None:
    first = child(120)
    run_id = wait_for(lambda: running(here))["run_id"]
    out = ablauf(
        here, "runs", "resume", run_id, "--force", "--actions", "slow.py",
        "--store", "sqlite:///runs.db", "--json", env={"NOWAIT": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "success"
    (here / "gate").touch()  # now the first driver's step ends, and it writes
    # The first driver's next write is refused: one line, exit 2, the run left as recorded.
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 2, stderr
    assert "written by another process" in stderr
    assert "Traceback" not in stderr
    [info] = infos(here)
    assert info["state"] == "success"


def test_the_heartbeat_keeps_a_long_step_running(here: Path, child: Any) -> None:
    proc = child(3.5, env={"ABLAUF_LEASE_SECONDS": "1"})
    run_id = wait_for(lambda: running(here))["run_id"]
    store = SqliteStore(str(here / "runs.db"))
    try:
        beats = set()
        while proc.poll() is None:
            info = store.info(run_id)
            if info.status.value != "pending":
                break
            assert info.driver is not None
            assert info.state == "running"  # renewed before its 1 s ran out, all along
            beats.add(info.driver.heartbeat)
            time.sleep(0.1)
        assert len(beats) >= 3  # renewed about every third of a second
    finally:
        store.close()
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_an_interrupted_driver_releases_its_lease(here: Path, child: Any) -> None:
    proc = child(120)
    run_id = wait_for(lambda: running(here))["run_id"]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    [info] = infos(here)
    assert info["run_id"] == run_id
    assert info["state"] == "abandoned"
    assert info["driver"]["live"] is False
    assert info["driver"]["expires"] == 0


# ---------------------------------------------------------------- leases in the store


def other(host: str = "elsewhere", pid: int = 4242, started: float | None = None) -> Owner:
    return Owner(host, pid, started, f"token-{host}-{pid}")


@pytest.mark.parametrize("kind", ["sqlite", "memory", "postgres"])
def test_lease_rules(tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> None:
    store: Any
    if kind == "postgres":
        store = open_store(request.getfixturevalue("pg_url"))
    else:
        store = SqliteStore(str(tmp_path / "r.db")) if kind == "sqlite" else MemoryStore()
    run_id = store.create_run(ablauf_lang.make_job('(do!! (log!! "x"))'))
    assert store.info(run_id).state == "pending"
    assert store.info(run_id).driver is None
    far = other()
    store.acquire_lease(run_id, far, 60)
    info = store.info(run_id)
    assert info.state == "running"
    assert info.label() == "running (elsewhere, pid 4242)"
    assert info.live
    me = Owner.this_process()
    with pytest.raises(RunError, match=r"is running \(elsewhere, pid 4242.*--force"):
        store.acquire_lease(run_id, me, 60)
    with pytest.raises(RunError, match="is running"):
        store.delete_run(run_id)
    assert store.renew_lease(run_id, far.token, 60)
    assert not store.renew_lease(run_id, me.token, 60)  # not ours
    store.acquire_lease(run_id, me, 60, force=True)  # taken over
    assert not store.renew_lease(run_id, far.token, 60)  # the old holder lost it
    assert store.info(run_id).driver.pid == os.getpid()
    store.release_lease(run_id, me.token, finished=False)
    assert store.info(run_id).state == "abandoned"
    store.acquire_lease(run_id, other(), 0.2)  # expires: another host's lease ages out
    assert store.info(run_id).state == "running"
    time.sleep(0.3)
    assert store.info(run_id).state == "abandoned"
    store.acquire_lease(run_id, me, 60)  # an expired lease is free to take
    store.release_lease(run_id, me.token, finished=True)
    assert store.info(run_id).driver is None
    store.delete_run(run_id)
    assert not store.exists(run_id)
    store.close()


def test_a_dead_pid_or_a_reused_one_on_this_host_is_not_live(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not pid_alive(dead.pid)
    started = process_started(os.getpid())
    assert started is not None
    assert abs(started - time.time()) < 3600
    assert pid_alive(os.getpid(), started)
    assert not pid_alive(os.getpid(), started - 100)  # our pid, but a process of before
    now = time.time()
    for driver, live in [
        (Driver(HOST, dead.pid, now, now + 60), False),
        (Driver(HOST, os.getpid(), now, now + 60, started - 100), False),
        (Driver(HOST, os.getpid(), now, now + 60, started), True),
        (Driver(HOST, os.getpid(), now, now - 1, started), False),
        (Driver("elsewhere", dead.pid, now, now + 60), True),
    ]:
        assert driver.is_live() is live, driver


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_resume_and_retry_refuse_a_live_run_in_the_api(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path}/r.db" if kind == "sqlite" else request.getfixturevalue("pg_url")
    store: Any = open_store(url)
    run_id = store.create_run(ablauf_lang.make_job('(do!! (log!! "x"))'))
    store.acquire_lease(run_id, other(), 60)
    for call in (ablauf_lang.resume, ablauf_lang.retry):
        with pytest.raises(RunError, match="another process drives it"):
            call(run_id, store=url)
    with pytest.raises(RunError, match="another process drives it"):
        ablauf_lang.eval('(do!! (log!! "x"))', store=url, run_id=run_id)
    run = ablauf_lang.resume(run_id, store=url, force=True)
    assert run.status.value == "success"
    assert store.info(run_id).driver is None  # released: the run finished
    store.close()


def test_a_driver_lease_object_beats_and_releases(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "r.db"))
    run_id = store.create_run(ablauf_lang.make_job('(do!! (log!! "x"))'))
    lease = DriverLease(store, run_id, ttl=0.3)
    lease.acquire()
    first = store.info(run_id).driver
    assert first is not None
    time.sleep(0.5)
    info: RunInfo = store.info(run_id)
    assert info.state == "running"  # the thread renewed it past its 0.3 s
    assert info.driver is not None
    assert info.driver.heartbeat > first.heartbeat
    lease.release(finished=False)
    assert store.info(run_id).state == "abandoned"
    assert lease not in KEEPER._leases
    store.close()


def test_one_thread_keeps_every_lease_of_the_process(tmp_path: Path) -> None:
    """Many runs driven at once: one keeper thread renews all their leases (not a thread
    a run), and ends when the last is given back."""
    store = SqliteStore(str(tmp_path / "r.db"))
    ids = [store.create_run(ablauf_lang.make_job('(do!! (log!! "x"))')) for _ in range(30)]
    leases = [DriverLease(store, run_id, ttl=0.3) for run_id in ids]
    for lease in leases:
        lease.acquire()
    first = {run_id: store.info(run_id).driver for run_id in ids}
    time.sleep(0.6)
    keepers = [t for t in threading.enumerate() if t.name.startswith("ablauf-lease")]
    assert len(keepers) == 1
    for run_id in ids:
        info = store.info(run_id)
        before = first[run_id]
        assert info.state == "running"  # renewed past its 0.3 s
        assert info.driver is not None
        assert before is not None
        assert info.driver.heartbeat > before.heartbeat
    for lease in leases:
        lease.release(finished=False)
    deadline = time.monotonic() + 5
    while KEEPER.thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert KEEPER.thread is None
    assert all(store.info(run_id).state == "abandoned" for run_id in ids)
    store.close()


def test_a_forked_child_keeps_its_own_leases(tmp_path: Path) -> None:
    """A process forked while the keeper runs (multiprocessing's default on Linux) starts
    with no keeper thread: its leases get one of their own and are renewed."""
    import multiprocessing

    store = SqliteStore(str(tmp_path / "r.db"))
    parent_run = store.create_run(ablauf_lang.make_job('(do!! (log!! "x"))'))
    child_run = store.create_run(ablauf_lang.make_job('(do!! (log!! "y"))'))
    lease = DriverLease(store, parent_run, ttl=0.3)
    lease.acquire()
    assert KEEPER.thread is not None

    def child() -> None:
        mine = SqliteStore(str(tmp_path / "r.db"))
        held = DriverLease(mine, child_run, ttl=0.3)
        held.acquire()
        first = mine.info(child_run).driver
        time.sleep(0.6)
        later = mine.info(child_run).driver
        ok = first is not None and later is not None and later.heartbeat > first.heartbeat
        held.release(finished=False)
        raise SystemExit(0 if ok else 3)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(10)
    lease.release(finished=False)
    store.close()
    assert proc.exitcode == 0
