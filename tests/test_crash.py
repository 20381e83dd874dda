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
from ablauf_lang.errors import RunError
from ablauf_lang.job import Job
from ablauf_lang.nodes import Status

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
    from ablauf_lang.stores.base import open_store

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
