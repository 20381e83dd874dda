"""`ablauf run --detach`, `ablauf worker` on SQLite, `ablauf signal`, `ablauf run --timeout`:
the installed command in real processes, on a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ablauf_lang
from ablauf_lang.stores.backend import open_store

ABLAUF = [sys.executable, "-m", "ablauf_lang"]


def ablauf(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ABLAUF, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


PROGRAM = """
(do!! (log!! "start")
      (sleep!! 1)
      (with-augment [[] [:ok]] (await!! :approval {:timeout {:minutes 5}}))
      (if!! (ctx :ok) (log!! "approved") (fail!! "refused")))
"""


def test_detached_run_is_woken_by_the_worker_and_a_signal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    program = tmp_path / "approval.abl"
    program.write_text(PROGRAM)
    parked = ablauf("run", str(program), "--store", url, "--detach", "--json")
    assert parked.returncode == 0, parked.stderr
    out = json.loads(parked.stdout)
    assert out["status"] == "pending"
    assert out["waiting"][0]["kind"] == "sleep"
    run_id = out["run_id"]
    worker = subprocess.Popen(
        [*ABLAUF, "worker", "--store", url, "--poll", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with open_store(url) as store:
            for _ in range(200):  # the worker ends the sleep; the run then awaits
                info = store.info(run_id)
                if info.waiting and info.waiting.startswith("waiting: approval"):
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"the run never got to its await: {store.info(run_id)}")
        sent = ablauf("signal", run_id, "approval", "true", "--store", url)
        assert sent.returncode == 0, sent.stderr
        with open_store(url) as store:
            for _ in range(200):
                if store.info(run_id).status != "pending":
                    break
                time.sleep(0.05)
            job = store.load(run_id).job
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert job.status == "success"
    assert job.context["ok"] is True
    assert "Traceback" not in err
    # A signal to the finished run is refused: exit 2, one line.
    late = ablauf("signal", run_id, "approval", "true", "--store", url)
    assert late.returncode == 2
    assert "finished" in late.stderr
    assert "Traceback" not in late.stderr


def test_run_timeout_fails_the_run_and_bad_durations_exit_2(tmp_path: Path) -> None:
    program = tmp_path / "slow.abl"
    program.write_text("(action!! :action/sleep 10)")
    env_url = f"sqlite:///{tmp_path / 'runs.db'}"
    done = ablauf("run", str(program), "--store", env_url, "--timeout", "0.3s", "--json")
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["failed"][0]["error"] == "timeout: deadline of 0.3s passed"
    for bad in ("-5", "soon", "{:hours -1}"):
        refused = ablauf("run", str(program), "--store", env_url, "--timeout", bad)
        assert refused.returncode == 2, (bad, refused.stderr)
        assert "--timeout" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_killed_during_a_sleep_then_resumed_has_the_time_left(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    program = tmp_path / "sleepy.abl"
    program.write_text('(do!! (log!! "a") (sleep!! 3) (log!! "b"))')
    began = time.time()
    child = subprocess.Popen(
        [*ABLAUF, "run", str(program), "--store", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        with open_store(url) as store:
            for _ in range(300):
                runs = store.list_runs()
                if runs and runs[0].waiting:
                    break
                time.sleep(0.02)
            run_id = runs[0].run_id
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    resumed = ablauf("runs", "resume", run_id, "--store", url, "--json", "--force")
    assert resumed.returncode == 0, resumed.stderr
    elapsed = time.time() - began
    assert 2.9 <= elapsed < 3.0 + 2.5  # the time left, not three more seconds
    assert json.loads(resumed.stdout)["status"] == "success"


def test_api_eval_detach_needs_nothing_else_to_wake_later(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    run = ablauf_lang.eval("(sleep!! {:days 3})", store=url, detach=True)
    assert run.status == "pending"
    with open_store(url) as store:
        assert store.next_wake() == pytest.approx(time.time() + 3 * 86400, abs=5)
        assert store.due_runs(time.time()) == []
        assert store.due_runs(time.time() + 3 * 86400 + 1) == [run.run_id]


def test_repl_live_uses_the_real_clock() -> None:
    script = "(do!! (sleep!! 0) (log!! :woke))\n:step\n:step\n:step\n:clock\n:advance 1m\n"
    done = subprocess.run(
        [*ABLAUF, "repl", "--live"], input=script, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "job finished: success" in done.stdout
    assert "live: the system's" in done.stdout
    assert "cannot be moved" in done.stdout + done.stderr
