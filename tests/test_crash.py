"""Crashes: a real child process, a real SQLite file, SIGKILL at chosen points, then resume.

Every action appends its name to a file, so the side effects can be counted afterwards:
a non-idempotent action must have happened exactly once, an idempotent one at least once,
and the resumed run must end as an uninterrupted run does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import ablauf_lang
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.nodes import LeafState, Status
from ablauf_lang.errors import RunError

REPO = Path(__file__).resolve().parent.parent

# once = not idempotent, again = idempotent. Record calls of an uninterrupted run:
# 1 dispatches a; 2 applies a, dispatches b; 3 applies b, dispatches c and d; then the
# results of c and d (together or apart), then e.
SOURCE = """
(do!! (action!! :t/once "a")
      (idempotent-action!! :t/again "b")
      (dopar!! (idempotent-action!! :t/again "c") (action!! :t/once "d"))
      (with-augment [identity :last] (action!! :t/once "e")))
"""

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import ablauf_lang
    from ablauf_lang.stores.backend import open_store

    url, run_id, effects, where, arg = sys.argv[1:6]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def act(payload, context):
        with open(effects, "a") as f:
            f.write(payload + "\\n")
        if where == "action" and payload == arg:
            die()  # the action has had its effect and its process dies before returning
        return payload

    class Killing:
        # A store that dies inside the n-th `record`, before or after writing it
        # (n = 0: right after writing the finished job).
        def __init__(self, inner, n, before):
            self.inner, self.n, self.before, self.calls = inner, n, before, 0

        def record(self, run_id, job):
            self.calls += 1
            if self.calls == self.n and self.before:
                die()
            self.inner.record(run_id, job)
            if (self.calls == self.n and not self.before) or (self.n == 0 and job.done):
                die()

        def __getattr__(self, name):
            return getattr(self.inner, name)

    store = open_store(url)
    if where.startswith("record"):
        store = Killing(store, int(arg), where == "record-before")
    run = ablauf_lang.eval(sys.argv[6], {"t/once": act, "t/again": act}, store=store,
                           run_id=run_id)
    print(run.status)
    """
)


def actions(effects: Path) -> dict[str, Any]:
    def act(payload: Any, context: Any) -> Any:
        with effects.open("a") as f:
            f.write(payload + "\n")
        return payload

    return {"t/once": act, "t/again": act}


def crash(tmp_path: Path, where: str, arg: str) -> tuple[str, Path]:
    """Run SOURCE in a child process that is killed at `where`; return the store URL."""
    url = f"sqlite:///{tmp_path}/runs.db"
    effects = tmp_path / "effects.txt"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), url, "r1", str(effects), where, arg, SOURCE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    return url, effects


def outcome(job: Job) -> tuple[Any, ...]:
    """What a run ended with: status, context, and each node's result, output and error."""
    nodes = [(n.id, n.kind, n.result, n.output, n.error) for n in job.nodes()]
    return job.status, job.context, nodes


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ...]:
    effects = tmp_path_factory.mktemp("clean") / "effects.txt"
    run = ablauf_lang.eval(SOURCE, actions(effects))
    assert run.status is Status.SUCCESS
    assert sorted(effects.read_text().split()) == ["a", "b", "c", "d", "e"]
    return outcome(run.job)


ONCE = ("a", "d", "e")


@pytest.mark.parametrize(
    ("where", "arg", "reruns"),
    [
        ("record-before", "1", ""),  # before the first dispatch is recorded: nothing ran
        ("record-after", "2", ""),  # b's dispatch recorded, b not yet launched
        ("action", "b", "b"),  # b (idempotent) had its effect, then its process died
        ("record-before", "3", "b"),  # b returned; its result never recorded
    ],
)
def test_killed_run_resumes_to_the_same_end(
    tmp_path: Path, uninterrupted: tuple[Any, ...], where: str, arg: str, reruns: str
) -> None:
    url, effects = crash(tmp_path, where, arg)
    before = Counter(effects.read_text().split()) if effects.exists() else Counter()
    stored = ablauf_lang.open_store(url).load("r1")
    assert stored.job.status is Status.PENDING
    assert stored.source == SOURCE

    run = ablauf_lang.resume("r1", store=url, actions=actions(effects))

    assert outcome(run.job) == uninterrupted
    assert outcome(ablauf_lang.open_store(url).load("r1").job) == uninterrupted
    counts = Counter(effects.read_text().split())
    assert {name: counts[name] for name in ONCE} == dict.fromkeys(ONCE, 1)  # exactly once
    assert all(counts[name] >= 1 for name in "bc")  # at least once
    assert counts["b"] == 1 + len(reruns)  # run again only when its outcome was not recorded
    assert before["a"] == 1 or where == "record-before"


def test_run_killed_after_its_last_record_is_finished(
    tmp_path: Path, uninterrupted: tuple[Any, ...]
) -> None:
    # The last record holds e's result: the run is done although the process died.
    url, effects = crash(tmp_path, "record-after", "0")
    stored = ablauf_lang.open_store(url).load("r1")
    assert stored.job.done
    assert outcome(stored.job) == uninterrupted
    with pytest.raises(RunError, match="already finished"):
        ablauf_lang.resume("r1", store=url, actions=actions(effects))


def test_non_idempotent_action_in_flight_is_failed_and_retried_on_request(
    tmp_path: Path, uninterrupted: tuple[Any, ...]
) -> None:
    url, effects = crash(tmp_path, "action", "a")
    run = ablauf_lang.resume("r1", store=url, actions=actions(effects))
    # Its outcome is unknown: resume never runs it again, the run fails and says why.
    assert run.status is Status.FAILURE
    assert run.job.node(1).error.startswith("interrupted: t/once was in flight")
    assert effects.read_text().split() == ["a"]
    # A person asks for a retry: it runs again (twice in all), and the run finishes.
    run = ablauf_lang.retry("r1", store=url, actions=actions(effects))
    assert outcome(run.job)[0] == Status.SUCCESS
    assert Counter(effects.read_text().split()) == {"a": 2, "b": 1, "c": 1, "d": 1, "e": 1}


# ---------------------------------------------------------------- the CLI, killed mid-dopar!!

SLOW_ACTIONS = textwrap.dedent(
    """
    import os, time

    def _act(payload, context):
        with open(os.environ["EFFECTS"], "a") as f:
            f.write(payload + "\\n")
        time.sleep(float(os.environ.get("SLOW", "0")))
        return payload

    ACTIONS = {"t/again": _act, "t/once": _act}
    """
)


def test_cli_run_killed_in_a_dopar_resumes_then_retries(tmp_path: Path) -> None:
    # Issue 10's reproduction: an idempotent and a non-idempotent action in flight together
    # when `ablauf run` is killed. Resume re-runs the idempotent one and records the other
    # as interrupted; retry then runs the interrupted one; nothing is left unset or stuck.
    program = tmp_path / "stuck.abl"
    program.write_text('(dopar!! (idempotent-action!! :t/again "A") (action!! :t/once "B"))\n')
    (tmp_path / "slow.py").write_text(SLOW_ACTIONS)
    effects = tmp_path / "effects"
    url = f"sqlite:///{tmp_path / 'stuck.db'}"
    env = {**os.environ, "EFFECTS": str(effects), "SLOW": "30", "PYTHONPATH": str(tmp_path)}
    cmd = [sys.executable, "-m", "ablauf_lang", "run", str(program), "--actions", "slow"]
    child = subprocess.Popen([*cmd, "--store", url], env=env, cwd=tmp_path)
    try:
        for _ in range(400):
            if effects.exists() and len(effects.read_text().split()) == 2:
                break
            child.poll()
            assert child.returncode is None, "ablauf run ended before it was killed"
            import time

            time.sleep(0.05)
        else:
            raise AssertionError("the actions never started")
    finally:
        child.kill()
        child.wait()
    [info] = ablauf_lang.open_store(url).list_runs()
    assert info.status is Status.PENDING

    def ablauf(*args: str) -> subprocess.CompletedProcess[str]:
        fast = {**env, "SLOW": "0"}
        return subprocess.run(
            [sys.executable, "-m", "ablauf_lang", *args, "--store", url],
            env=fast,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    resumed = ablauf("runs", "resume", info.run_id, "--actions", "slow")  # its driver is dead
    assert "Traceback" not in resumed.stderr, resumed.stderr
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr  # B interrupted: failure
    job = ablauf_lang.open_store(url).load(info.run_id).job
    a, b = job.node(1), job.node(2)
    assert (a.result, a.attempt) == (LeafState.SUCCESS, 2)  # A ran again, a new attempt
    assert b.result is LeafState.FAILURE
    assert b.error.startswith("interrupted: ")
    assert Counter(effects.read_text().split()) == {"A": 2, "B": 1}

    again = ablauf("runs", "resume", info.run_id, "--actions", "slow")
    assert again.returncode == 2
    assert "Traceback" not in again.stderr

    retried = ablauf("runs", "retry", info.run_id, "--actions", "slow")
    assert "Traceback" not in retried.stderr, retried.stderr
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert Counter(effects.read_text().split()) == {"A": 2, "B": 2}  # a person asked for B
    assert ablauf_lang.open_store(url).load(info.run_id).job.status is Status.SUCCESS
