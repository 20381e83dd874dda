"""SIGKILL at the worst moments of time and waiting, then `resume`: nothing lost, nothing
run twice, no signal delivered twice or dropped, no timer fired twice.

Each child process runs a program on a real SQLite file and kills itself (SIGKILL, no
cleanup) at one precise point: during a sleep, during a retry's wait, right after it took
a signal from the mailbox and before it recorded the await's result, and while a thread
whose attempt timed out is still running (abandoned). The test process then resumes the
run and checks what was performed (a log file the actions append to) and what was stored.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ablauf_lang
from ablauf_lang.engine.nodes import LeafState
from ablauf_lang.stdlib.actions import AWAIT, SLEEP
from ablauf_lang.stores.backend import open_store

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import ablauf_lang
    from ablauf_lang.stores.backend import open_store

    url, scenario, log = sys.argv[1], sys.argv[2], sys.argv[3]

    def note(what):
        with open(log, "a") as f:
            f.write(json.dumps(what) + "\\n")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    calls = {"n": 0}

    def flaky(payload, context):
        calls["n"] += 1
        note(["flaky", payload])
        if calls["n"] == 1:
            raise ConnectionError("first call fails")
        return "ok"

    def once(payload, context):
        note(["once", payload])
        return payload

    def stuck(payload, context):
        note(["stuck", payload])
        time.sleep(5)
        note(["stuck-late", payload])
        return "late"

    store = open_store(url)
    restarts = {"n": 0}

    def on_restart(job, dispatches, results):
        restarts["n"] += 1
        if scenario == "retry-wait" and any(d.due for d in dispatches if d.action == "t/flaky"):
            die()  # the retry's wait is recorded; the second attempt never started
        if scenario == "sleep" and any(d.action == "ablauf/sleep" for d in dispatches):
            die()
        if scenario == "abandoned" and any(
            l.result is not None and str(l.result) == "timeout" for l in job.leaves()
        ):
            die()  # the timed-out attempt is recorded; its thread still runs

    if scenario == "signal":
        take = store.take_signal
        def take_then_die(run_id, name, node):
            got = take(run_id, name, node)
            if got is not None:
                note(["took", got[0]])
                die()  # taken from the mailbox, the await's result not yet recorded
            return got
        store.take_signal = take_then_die

    programs = {
        "sleep": '(do!! (action!! :t/once 1) (sleep!! 1) (action!! :t/once 2))',
        "retry-wait": '(do!! (action!! :t/flaky 1 {:retry {:max 3 :delay 3}})'
                      ' (action!! :t/once 2))',
        "signal": '(do!! (with-augment [[] [:got]] (await!! :go)) (action!! :t/once (ctx :got)))',
        "abandoned": '(try!! (action!! :t/stuck 1 {:timeout 0.3})'
                     ' (rescue!! (idempotent-action!! :t/once 9)))',
    }
    actions = {"t/flaky": flaky, "t/once": once, "t/stuck": stuck}
    if scenario == "signal":
        job = ablauf_lang.make_job(ablauf_lang.compile(programs[scenario]))
        store.create_run(job, run_id="victim")
        store.send_signal("victim", "go", "first")
        store.send_signal("victim", "go", "second")
    import asyncio
    asyncio.run(ablauf_lang.eval_async(programs[scenario], actions, store=store,
                                       run_id="victim", on_restart=on_restart))
    note(["child-finished"])
    """
)


def _actions(log: Path) -> dict[str, object]:
    def note(what: list[object]) -> None:
        with log.open("a") as f:
            f.write(json.dumps(what) + "\n")

    def flaky(payload: object, context: object) -> str:
        note(["flaky", payload])
        return "ok"

    def once(payload: object, context: object) -> object:
        note(["once", payload])
        return payload

    def stuck(payload: object, context: object) -> str:
        note(["stuck", payload])
        return "fine"

    return {"t/flaky": flaky, "t/once": once, "t/stuck": stuck}


def _crash_then_resume(tmp_path: Path, scenario: str) -> tuple[ablauf_lang.Run, list[list[object]]]:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    log = tmp_path / "performed.jsonl"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, url, scenario, str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -9, child.stderr  # it died where it was told to
    run = ablauf_lang.resume("victim", store=url, actions=_actions(log), force=True)
    performed = [json.loads(line) for line in log.read_text().splitlines()]
    return run, performed


def test_sigkill_during_a_sleep(tmp_path: Path) -> None:
    run, performed = _crash_then_resume(tmp_path, "sleep")
    assert run.status == "success"
    assert performed == [["once", 1], ["once", 2]]  # nothing ran twice
    (sleep,) = [leaf for leaf in run.job.leaves() if leaf.action == SLEEP]
    assert sleep.result is LeafState.SUCCESS
    assert sleep.finished_at is not None
    assert sleep.finished_at >= sleep.wake  # woke at the recorded time, not before


def test_sigkill_during_a_retrys_wait(tmp_path: Path) -> None:
    run, performed = _crash_then_resume(tmp_path, "retry-wait")
    assert run.status == "success"
    # The first attempt ran in the child, the second once after the resume: not
    # "interrupted" (the attempt had not begun) and not run twice.
    assert performed == [["flaky", 1], ["flaky", 1], ["once", 2]]
    flaky = run.job.node(1)
    assert [a["error"] for a in flaky.attempts] == ["ConnectionError: first call fails"]
    assert flaky.result is LeafState.SUCCESS


def test_sigkill_while_a_signal_is_delivered(tmp_path: Path) -> None:
    run, performed = _crash_then_resume(tmp_path, "signal")
    assert run.status == "success"
    assert run.context["got"] == "first"  # the one taken before the crash, given again
    assert performed[-1] == ["once", "first"]
    with open_store(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        signals = store.signals("victim")
    (await_leaf,) = [leaf for leaf in run.job.leaves() if leaf.action == AWAIT]
    assert [s["consumed_by"] for s in signals] == [await_leaf.id, None]  # once, in order


def test_sigkill_while_a_timed_out_action_is_abandoned(tmp_path: Path) -> None:
    run, performed = _crash_then_resume(tmp_path, "abandoned")
    assert run.status == "success"
    assert ["stuck-late", 1] not in performed  # the abandoned thread died with its process
    assert [p for p in performed if p[0] == "stuck"] == [["stuck", 1]]  # never re-run
    # The rescue was dispatched (recorded) when the process died: idempotent, it runs
    # once after the resume (a non-idempotent one would be `interrupted`, never re-run).
    assert [p for p in performed if p[0] == "once"] == [["once", 9]]
    stuck = run.job.node(2)
    assert stuck.result is LeafState.TIMEOUT


@pytest.mark.parametrize("scenario", ["sleep", "retry-wait", "signal", "abandoned"])
def test_resume_twice_changes_nothing(tmp_path: Path, scenario: str) -> None:
    run, _ = _crash_then_resume(tmp_path, scenario)
    with pytest.raises(ablauf_lang.RunError, match="already finished"):
        ablauf_lang.resume("victim", store=f"sqlite:///{tmp_path / 'runs.db'}")
    assert run.job.done
