"""The REPL's clock and signals (issue 13): `:clock`, `:advance`, `:signal`, the toolbar's
next wake-up, and the approval example run to the end."""

from __future__ import annotations

import io
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import DummyInput
from prompt_toolkit.output import DummyOutput
from rich.console import Console

import ablauf_lang
from ablauf_lang.api import load_actions
from ablauf_lang.engine.states import state_of
from ablauf_lang.repl.app import Repl
from ablauf_lang.repl.completer import AblaufCompleter
from ablauf_lang.runners.clock import VirtualClock
from tests.commands import START, make_repl, said
from tests.terminal import Tmux

pytestmark = pytest.mark.timeout(60)

EXAMPLES = Path(__file__).parent.parent / "examples"


def toolbar(repl: Repl) -> str:
    return "".join(text for _, text in repl.toolbar())


def test_advance_ends_a_thirty_day_sleep() -> None:
    repl, out = make_repl()
    said(repl, out, '(do!! (sleep!! {:days 30}) (log!! "done"))', ":step")
    assert "next" not in toolbar(repl)
    assert "sleeping until 2027-02-14T08:00:00Z (in 30d)" in toolbar(repl)
    text = said(repl, out, ":step")
    assert "nothing to do: #1 sleeps until 2027-02-14T08:00:00Z (in 30d): :advance 30d" in text
    text = said(repl, out, ":clock")
    assert "clock 2027-01-15T08:00:00Z" in text
    assert "next wake-up 2027-02-14T08:00:00Z (in 30d)" in text
    text = said(repl, out, ":advance 29d")
    assert "nothing was due" in text
    started = time.monotonic()
    text = said(repl, out, ":advance 1d")
    assert time.monotonic() - started < 5
    assert "woke     #1 sleep!!" in text
    assert 'dispatch #2 action/log "done"' in text
    assert "sleeping" not in toolbar(repl)
    text = said(repl, out, ":run")
    assert "job finished after 1 steps: success" in text
    # :back turns the clock back with the job: to the time after the :advance (as results
    # queued before a step are queued again), so the next :step ends the sleep again.
    said(repl, out, ":back", ":back")
    assert START + 30 * 86400 <= repl.stepper.now() < START + 30 * 86400 + 5
    assert "sleeping until" in toolbar(repl)
    assert "woke     #1 sleep!!" in said(repl, out, ":step")


def test_advance_with_no_duration_goes_to_the_next_wake_up() -> None:
    repl, out = make_repl()
    said(repl, out, "(sleep!! {:minutes 10})", ":step")
    text = said(repl, out, ":advance")
    assert "(+10m)" in text
    assert "job finished: success" in text
    assert "nothing waits for a time" in said(repl, out, ":advance")
    assert "error: a duration" in said(repl, out, ":advance soon")


def test_signal_feeds_an_await_and_waits_in_the_mailbox_before_it() -> None:
    repl, out = make_repl()
    program = (
        "(do!! (with-augment [identity :first] (await!! :approval))"
        " (with-augment [identity :second] (await!! :approval {:timeout {:hours 24}})))"
    )
    said(repl, out, program, ":step")
    assert "next: approval" in toolbar(repl)
    assert "waits for the signal approval: :signal approval VALUE" in said(repl, out, ":step")
    text = said(repl, out, ':signal approval {"ok": true, "by": "ana"}')
    assert 'signal   #1 await!! :approval → {:ok true, :by "ana"}' in text
    assert "next: approval (until 2027-01-16T08:00:00Z, in 1d)" in toolbar(repl)
    said(repl, out, ":back")  # before the first await took it: the signal is offered again
    text = said(repl, out, ":step")
    assert "signal   #1 await!!" in text
    # Both at once: the second await takes the second signal, in order of arrival.
    said(repl, out, ":signal approval {:ok false}")
    ctx = repl.stepper.require_job().context
    assert ctx["first"] == {"ok": True, "by": "ana"}
    assert ctx["second"] == {"ok": False}
    assert repl.stepper.require_job().status == "success"
    assert "already finished" in said(repl, out, ":signal approval 1")


def test_a_signal_sent_early_is_kept_and_an_await_times_out() -> None:
    repl, out = make_repl()
    said(repl, out, '(do!! (log!! "a") (await!! :go) (await!! :late {:timeout 60}))')
    text = said(repl, out, ":signal go 7")
    assert "kept in the mailbox" in text
    assert "mailbox: signal go #1 → 7" in said(repl, out, ":signal")
    said(repl, out, ":run")
    job = repl.stepper.require_job()
    assert job.node(2).output == 7
    assert "next: late (until 2027-01-15T08:01:00" in toolbar(repl)
    text = said(repl, out, ":advance 1m")
    assert 'timeout  #3 await!! :late → "timeout: no signal late within 1m"' in text
    assert repl.stepper.require_job().status == "failure"


def test_bad_signals_are_refused() -> None:
    repl, out = make_repl()
    assert "error: no job yet" in said(repl, out, ":signal go")
    said(repl, out, "(await!! :go)")
    assert "error:" in said(repl, out, ":signal :")


def test_retries_wait_on_the_clock_and_the_tree_shows_attempts() -> None:
    calls: list[float] = []

    def flaky(payload: Any, context: Any) -> str:
        calls.append(time.time())
        if len(calls) < 3:
            raise ConnectionError(f"reset {len(calls)}")
        return "ok"

    repl, out = make_repl({"t/flaky": flaky})
    said(repl, out, "(action!! :t/flaky 1 {:retry {:max 5 :delay 1 :backoff 2}})", ":run")
    assert len(calls) == 1
    assert "retrying t/flaky (attempt 2 at 2027-01-15T08:00:01" in toolbar(repl)
    text = said(repl, out, ":tree")
    assert "attempt 1 failure" in text
    assert "ConnectionError: reset 1" in text
    said(repl, out, ":advance 1s")
    assert len(calls) == 2
    said(repl, out, ":advance 2s")
    assert len(calls) == 3
    assert repl.stepper.require_job().status == "success"


def test_the_toolbar_and_completion_know_the_new_commands() -> None:
    repl, out = make_repl()
    said(repl, out, "(dopar!! (await!! :approval) (sleep!! 90))", ":step")
    completer = repl.session.completer
    assert isinstance(completer, AblaufCompleter)

    def completions(text: str) -> list[str]:
        document = Document(text, len(text))
        return [c.text for c in completer.get_completions(document, CompleteEvent())]

    assert ":advance" in completions(":adv")
    assert completions(":signal ") == ["approval"]
    assert completions(":advance ") == ["1m 30s".replace(" ", "")]
    options = completions("(action!! :x/y 1 {:")
    assert {":retry", ":timeout", ":heartbeat", ":idempotent?"} <= set(options)
    assert "(+1 more)" in toolbar(repl)


def test_the_approval_example_runs_with_a_signal_from_another_thread(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    actions = load_actions(str(EXAMPLES / "actions.py"))
    source = (EXAMPLES / "approval.abl").read_text()
    run_id = "a" * 16
    sent: list[int] = []

    def approve() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                sent.append(
                    ablauf_lang.signal(run_id, "approval", {"ok": True, "by": "ana"}, store)
                )
                return
            except ablauf_lang.AblaufError:
                time.sleep(0.05)

    thread = threading.Thread(target=approve, daemon=True)
    thread.start()
    run = ablauf_lang.eval(
        source,
        actions,
        store=store,
        run_id=run_id,
        filename=str(EXAMPLES / "approval.abl"),
        clock=VirtualClock(),
    )
    thread.join(5)
    assert sent == [1]
    assert run.status == "success", run.failed_steps()
    smoke = next(leaf for leaf in run.job.leaves() if leaf.action == "test/smoke")
    assert [a["state"] for a in smoke.attempts] == ["failure", "failure"]
    assert smoke.attempt == 3
    assert state_of(smoke) == "success"
    rollout = next(leaf for leaf in run.job.leaves() if leaf.action == "deploy/rollout")
    assert rollout.output["approved-by"] == "ana"
    assert run.context["artifact"].startswith("billing-api-1.4.2-")


def test_the_approval_example_without_approval_is_rescued() -> None:
    actions = load_actions(str(EXAMPLES / "actions.py"))
    source = (EXAMPLES / "approval.abl").read_text().replace('"billing-api"', '"orders"')
    run = ablauf_lang.eval(source, actions, clock=VirtualClock())  # a day passes at once
    assert run.status == "success"
    logs = [leaf.output for leaf in run.job.leaves() if leaf.action == "action/log"]
    assert "no approval within a day: not rolled out" in logs
    assert "not approved: nothing rolled out" in logs


def test_repl_clock_in_a_real_terminal(tmp_path: Path, tmux: Tmux) -> None:
    exe = shutil.which("ablauf")
    argv = exe if exe else f"{sys.executable} -m ablauf_lang"
    env = f"XDG_STATE_HOME={tmp_path / 'state'} ABLAUF_STORE=memory:"
    tmux("new-session", "-d", "-s", "t", "-x", "160", "-y", "40", f"env {env} {argv} repl")
    tmux.wait_for("ablauf>")
    tmux.keys('(do!! (sleep!! {:days 30}) (await!! :approval) (log!! "done"))', "Enter")
    tmux.wait_for("#3 action/log")
    tmux.keys(":step", "Enter")
    tmux.wait_for("sleeping until")  # the bottom toolbar
    tmux.keys(":advance 30d", "Enter")
    tmux.wait_for("next: approval")
    tmux.keys(":signal approval {:ok true}", "Enter")
    tmux.wait_for('dispatch #3 action/log "done"')
    tmux.keys(":run", "Enter")
    tmux.wait_for("job finished after 1 steps: success")
    tmux.keys("C-d")


def test_a_live_session_uses_the_system_clock() -> None:
    from ablauf_lang.runners.clock import SYSTEM

    out = io.StringIO()
    repl = Repl(
        {},
        console=Console(file=out, width=200, color_system=None),
        history=InMemoryHistory(),
        input=DummyInput(),
        output=DummyOutput(),
        clock=SYSTEM,
    )
    said(repl, out, "(sleep!! 0.3)", ":step")
    assert "error: the clock is the system's" in said(repl, out, ":advance 1s")
    time.sleep(0.4)
    text = said(repl, out, ":step")
    assert "woke     #0 sleep!!" in text
    assert repl.stepper.require_job().status == "success"
