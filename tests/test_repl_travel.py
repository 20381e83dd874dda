"""The REPL's time travel, breakpoints, recording and plan (issue 16): `:history`,
`:goto`, `:attach`, `:fork`, `:record`, `:break`, `:breaks`, `:unbreak`, `:continue`,
`:plan`; with real stores (SQLite, PostgreSQL) and a real terminal."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

import ablauf_lang
from ablauf_lang.api import with_breaks
from ablauf_lang.engine.nodes import success
from ablauf_lang.names import WAIT_ACTIONS
from ablauf_lang.repl.app import Repl
from ablauf_lang.stores.backend import open_store
from ablauf_lang.testing.runner import check_file
from tests.commands import START, ablauf, make_repl
from tests.commands import said as shared_said
from tests.terminal import Tmux

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SOURCE = '(do!! (log!! "a") (dopar!! (log!! "b") (log!! "c")) (log!! "d"))'
PAY = '(do!! (log!! "a") (action!! :pay/charge {:amount (ctx :amount)}) (log!! "b"))'


def said(repl: Repl, out: io.StringIO, *lines: str) -> str:
    text = shared_said(repl, out, *lines)
    assert "internal error" not in text
    return text


# ---------------------------------------------------------------- history and goto


def test_goto_moves_back_and_forward_and_a_step_from_the_past_starts_a_branch() -> None:
    repl, out = make_repl()
    said(repl, out, SOURCE, ":run")
    assert repl.stepper.require_job().done
    shown = said(repl, out, ":history")
    lines = shown.splitlines()
    assert [line.split()[1 if line.startswith("→") else 0] for line in lines] == [
        "0",
        "1",
        "2",
        "3",
        "4",
    ]
    assert lines[0].endswith("entered <repl>")
    assert "applied #3 success, #4 success; dispatched #5 action/log" in lines[3]
    assert lines[4].startswith("→    4")
    assert "finished success" in lines[4]

    assert "at restart 1" in said(repl, out, ":goto 1")
    assert repl.stepper.require_job().restarts == 1
    shown = said(repl, out, ":history")
    assert shown.count("(ahead)") == 3
    assert "→    1" in shown
    said(repl, out, ":goto 4")  # forward again: nothing was lost
    assert repl.stepper.require_job().done
    said(repl, out, ":goto 2", ":back")
    assert repl.stepper.require_job().restarts == 1
    said(repl, out, ":manual", ":ok 1 changed", ":step")  # a new branch from restart 1
    shown = said(repl, out, ":history")
    assert "(ahead)" not in shown
    assert shown.splitlines()[-1].startswith("→    2")
    assert "out of range: this job has restarts 0 to 2" in said(repl, out, ":goto 3")
    assert "usage: :goto N" in said(repl, out, ":goto x")


def test_goto_before_a_job_and_history_say_what_to_do() -> None:
    repl, out = make_repl()
    assert "no job yet" in said(repl, out, ":history")
    assert "no job yet" in said(repl, out, ":goto 0")


# ---------------------------------------------------------------- breakpoints


def charges() -> tuple[dict[str, Any], list[Any]]:
    calls: list[Any] = []

    def charge(payload: Any, context: Any) -> str:
        calls.append(payload)
        return "charged"

    return {"pay/charge": charge}, calls


def test_a_breakpoint_on_an_action_stops_run_before_it_is_performed() -> None:
    actions, calls = charges()
    repl, out = make_repl(actions, {"amount": 5000})
    said(repl, out, PAY)
    assert "breakpoint 1: pay/charge" in said(repl, out, ":break pay/charge")
    shown = said(repl, out, ":run")
    assert "break 1 (pay/charge): #2 pay/charge {:amount 5000}" in shown
    assert "before performing it: :continue goes on" in shown
    assert calls == []  # dispatched, not performed
    shown = said(repl, out, ":continue")
    assert "job finished after 2 steps: success" in shown
    assert calls == [{"amount": 5000}]


def test_breakpoints_on_an_id_and_on_a_condition_and_removing_them() -> None:
    actions, calls = charges()
    repl, out = make_repl(actions, {"amount": 5})
    said(repl, out, "(def limit 1000)", PAY)
    said(repl, out, ":break #3", ":break (when (> (ctx :amount) limit))")
    assert said(repl, out, ":breaks").split() == [
        "1",
        "#3",
        "2",
        "(when",
        "(>",
        "(ctx",
        ":amount)",
        "limit))",
    ]
    shown = said(repl, out, ":run")  # the condition is false: only the id stops it
    assert "break 1 (#3): #3 action/log" in shown
    assert len(calls) == 1
    said(repl, out, ":unbreak 1", ":continue")
    assert repl.stepper.require_job().done

    repl, out = make_repl(actions, {"amount": 5000})
    said(repl, out, "(def limit 1000)", PAY, ":break pay/charge (when (> (ctx :amount) limit))")
    assert "break 1 (pay/charge (when" in said(repl, out, ":run")
    said(repl, out, ":unbreak all")
    assert "job finished" in said(repl, out, ":continue")
    assert "no breakpoints" in said(repl, out, ":breaks")


def test_a_condition_that_cannot_be_evaluated_stops_and_says_why() -> None:
    repl, out = make_repl()
    said(repl, out, SOURCE, ":break (when (> (ctx :missing) 1))")
    shown = said(repl, out, ":run")
    assert "its condition failed" in shown
    assert "the context has no :missing" in shown


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (":break (when (> 1", "unclosed list"),
        (":break x (maybe 1)", "usage: :break ACTION"),
        (":break (when (log!! 1))", "expected an expression, found a workflow"),
        (":unbreak 7", "no breakpoint 7"),
        (":unbreak x", "usage: :unbreak N"),
        (":continue", "no job yet"),
        (":record", "not recording"),
        (":record off", "not recording"),
        (":fork", "no job yet"),
        (":attach", "usage: :attach RUN_ID"),
        (":attach a b", "usage: :attach RUN_ID"),
        (":attach 'x", "cannot read the arguments"),
        (":fork --nope", "usage: :fork [--store URL]"),
        (":plan", "no job yet"),
    ],
)
def test_bad_travel_commands_say_what_is_wrong(line: str, message: str) -> None:
    repl, out = make_repl()
    assert message in said(repl, out, line)


# ---------------------------------------------------------------- recording


def test_record_saves_the_session_as_a_test_kept_up_to_date(tmp_path: Path) -> None:
    program = tmp_path / "p.abl"
    program.write_text(SOURCE + "\n")
    repl, out = make_repl(context={"x": 1})
    said(repl, out, f":load {program}", ":step", ":step")
    shown = said(repl, out, f":record {tmp_path / 's'}")
    saved = tmp_path / "s.abltest"
    assert f"recording to {saved} (2 restarts so far" in shown
    assert len(json.loads(saved.read_text())["steps"]) == 2
    said(repl, out, ":run")
    data = json.loads(saved.read_text())
    assert len(data["steps"]) == 4
    assert data["end"] == {"status": "success", "context": {"x": 1}}
    assert data["filename"] == "p.abl"  # beside the test: the two can move together
    outcome = check_file(saved)
    assert outcome.passed
    assert f"4 restarts replayed against {program}" in outcome.message
    said(repl, out, ":back")  # the file follows the session: three restarts now
    assert len(json.loads(saved.read_text())["steps"]) == 3
    said(repl, out, ":record off", ":run")
    assert len(json.loads(saved.read_text())["steps"]) == 3  # no longer recorded
    program.write_text(SOURCE.replace('"b"', '"B"') + "\n")  # a later edit of the program
    outcome = check_file(saved)
    assert not outcome.passed
    assert outcome.diff is not None
    assert '! #3 :action/log "b" (line 1)' in outcome.diff
    assert '| #3 :action/log "B" (line 1)' in outcome.diff
    program.unlink()  # without its file, a test replays the program it recorded
    assert check_file(saved).passed


def test_a_recording_keeps_the_definitions_entered_before_the_form(tmp_path: Path) -> None:
    repl, out = make_repl()
    said(repl, out, "(defn twice [x] (do!! (log!! x) (log!! x)))", '(twice "hi")', ":run")
    said(repl, out, f":record {tmp_path / 'd.abltest'}")
    assert check_file(tmp_path / "d.abltest").passed


def test_a_job_snapshot_cannot_be_recorded(tmp_path: Path) -> None:
    repl, out = make_repl()
    said(repl, out, SOURCE, f":save {tmp_path / 'j.json'}", f":load {tmp_path / 'j.json'}")
    assert "loaded from a job snapshot" in said(repl, out, f":record {tmp_path / 'x'}")


def test_plan_shows_the_current_jobs_plan() -> None:
    repl, out = make_repl(context={"hosts": ["a", "b", "c"]})
    said(repl, out, "(pmap!! [h (ctx :hosts)] (action!! :deploy/host {:host h}))")
    shown = said(repl, out, ":plan")
    assert "widest:        3 in flight at once" in shown
    assert ":deploy/host  1 leaf, idempotent: no" in shown


# ---------------------------------------------------------------- attach and fork


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/runs.db"
    return str(request.getfixturevalue("pg_url"))


def parked_run(url: str) -> tuple[str, int]:
    """A run of PAY parked before :pay/charge (as `--break pay/charge` does), recorded
    restart by restart in the store: (run id, its latest restart)."""
    root = with_breaks(ablauf_lang.compile(PAY, "pay.abl"), ["pay/charge"])
    job = ablauf_lang.make_job(root, {"amount": 5000})
    store = open_store(url)
    try:
        run_id = store.create_run(job, source=PAY, filename="pay.abl")
        pending: list[Any] = []
        while True:
            results = [success(d, d.payload) for d in pending if d.action not in WAIT_ACTIONS]
            job, pending = ablauf_lang.restart_job(job, results, START)
            store.record(run_id, job)
            if not [d for d in job.pending() if d.action not in WAIT_ACTIONS]:
                return run_id, job.restarts
            pending = [d for d in pending if d.action not in WAIT_ACTIONS]
    finally:
        store.close()


def recorded(url: str, run_id: str) -> tuple[int, Any]:
    store = open_store(url)
    try:
        return len(store.history(run_id).steps), store.load(run_id).job
    finally:
        store.close()


def test_attach_goto_and_fork_leave_the_recorded_run_as_it_was(store_url: str) -> None:
    run_id, latest = parked_run(store_url)
    before = recorded(store_url, run_id)
    actions, calls = charges()
    repl, out = make_repl(actions)
    shown = said(repl, out, f":attach {run_id[:6]} --store {store_url}")
    assert f"attached run {run_id} at restart {latest} of {latest} (pending)" in shown
    assert "await!! :ablauf/break  pending" in shown
    assert repl.stepper.manual  # attached: nothing is performed unless asked
    assert f"the run has restarts 0 to {latest}" in said(repl, out, ":history")
    shown = said(repl, out, ":goto 1")
    assert f"at restart 1 of {latest}" in shown
    assert repl.stepper.require_job().restarts == 1
    said(repl, out, f":goto {latest}", ":continue")  # the break's signal, here only
    job = repl.stepper.require_job()
    assert job.restarts == latest + 1
    charge = next(leaf for leaf in job.pending() if leaf.action == "pay/charge")
    shown = said(repl, out, ":fork")
    assert f"(forked from {run_id} at restart {latest}, with 1 restart stepped here)" in shown
    said(repl, out, f":ok {charge.id} charged", ":step", ":auto", ":run")
    assert repl.stepper.require_job().status == "success"
    assert calls == []  # given by hand: the action never ran here
    child = shown.split("recorded run ")[1].split()[0]
    assert recorded(store_url, run_id) == before  # the original: not a write more
    store = open_store(store_url)
    try:
        info = store.load(child).info
        assert (info.parent, info.parent_step) == (run_id, latest)
        assert store.load(child).source == PAY
    finally:
        store.close()
    assert f"out of range: run {run_id} has restarts 0 to {latest}" in said(repl, out, ":goto 99")
    assert "no run 'nope'" in said(repl, out, f":attach nope --store {store_url}")


def test_fork_of_a_form_typed_here_is_a_new_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/runs.db"
    repl, out = make_repl()
    said(repl, out, SOURCE, ":step")
    shown = said(repl, out, f":fork --store {url}")
    run_id = shown.split("recorded run ")[1].split()[0]
    resumed = ablauf_lang.resume(run_id, store=url)
    assert resumed.status == "success"
    said(repl, out, ":run")
    assert "has finished (success): a run of it has nothing to do" in said(
        repl, out, f":fork --store {url}"
    )


# ---------------------------------------------------------------- the command line


def test_repl_attach_of_a_run_that_is_not_there_exits_2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/runs.db"
    done = ablauf("repl", "--attach", "nope", "--store", url)
    assert done.returncode == 2
    assert "no run 'nope'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def parked_deploy(tmp_path: Path) -> tuple[str, str]:
    url = f"sqlite:///{tmp_path}/runs.db"
    done = ablauf(
        "run",
        str(EXAMPLES / "deploy.abl"),
        "--actions",
        str(EXAMPLES / "actions.py"),
        "--break",
        "chat/post",
        "--detach",
        "--json",
        env={"ABLAUF_STORE": url},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["run_id"], url


def test_attach_goto_and_a_breakpoint_in_a_real_terminal(
    tmp_path: Path, tmux: Tmux, parked_deploy: tuple[str, str]
) -> None:
    run_id, url = parked_deploy
    exe = shutil.which("ablauf")
    argv = exe if exe else f"{sys.executable} -m ablauf_lang"
    env = f"XDG_STATE_HOME={tmp_path / 'state'}"
    actions = EXAMPLES / "actions.py"
    command = f"env {env} {argv} repl --actions {actions} --attach {run_id[:8]} --store {url}"
    tmux("new-session", "-d", "-s", "t", "-x", "200", "-y", "50", command)
    tmux.wait_for(f"attached run {run_id} at restart 4 of 4")
    tmux.keys(":goto 2", "Enter")
    tmux.wait_for("at restart 2 of 4")
    tmux.keys(":goto 4", "Enter")
    tmux.wait_for("at restart 4 of 4 (pending)")
    tmux.keys(":auto", "Enter")
    tmux.keys(":break chat/post", "Enter")
    tmux.wait_for("breakpoint 1: chat/post")
    tmux.keys(":history", "Enter")
    tmux.wait_for("the run has restarts 0 to 4")
    tmux.keys(":continue", "Enter")
    screen = tmux.wait_for("break 1 (chat/post): #7 chat/post")
    assert "before performing it" in screen
    tmux.keys(":continue", "Enter")
    tmux.wait_for("job finished after 1 steps: success")
    tmux.keys("C-d")
    assert recorded(url, run_id)[1].status == "pending"  # the run on disk: as it was
