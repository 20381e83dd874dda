"""The stepping REPL: the stepper model, commands, completion and validation, a session
driven through prompt-toolkit's pipe input, and one in a real terminal (tmux)."""

from __future__ import annotations

import io
import re
import shutil
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import DummyInput, create_pipe_input
from prompt_toolkit.output import DummyOutput
from prompt_toolkit.validation import ValidationError
from rich.console import Console

from ablauf_lang.engine.job import Job
from ablauf_lang.engine.states import state_of
from ablauf_lang.errors import AblaufError
from ablauf_lang.repl.app import Repl, history_path
from ablauf_lang.repl.commands import parse_value
from ablauf_lang.repl.completer import AblaufCompleter
from ablauf_lang.repl.stepper import ReplError, Stepper
from ablauf_lang.repl.validator import AblaufValidator, is_incomplete
from tests.terminal import Tmux

# SPEC section 3: ids try 0, body 1, dopar 2, a1 3, a2 4, b1 5, rescue 6, r1 7, finally 8, f1 9.
SPEC_TRY = (
    "(try!! (dopar!! (action!! :record :a1) (log!! :a2)) (action!! :record :b1) "
    "(rescue!! (action!! :record :r1)) (finally!! (action!! :record :f1)))"
)

pytestmark = pytest.mark.timeout(60)


def record(payload: Any, context: Any) -> Any:
    return f"recorded {payload}"


def make_repl(actions: dict[str, Any] | None = None, **kw: Any) -> tuple[Repl, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=120, color_system=None)
    repl = Repl(
        actions if actions is not None else {"record": record},
        console=console,
        history=InMemoryHistory(),
        input=DummyInput(),
        output=DummyOutput(),
        **kw,
    )
    return repl, out


def states(job: Job | None) -> dict[int, str]:
    assert job is not None
    return {n.id: state_of(n) for n in job.nodes()}


# ---------------------------------------------------------------- the stepper


def test_first_step_dispatches_the_spec_leaves() -> None:
    repl, _ = make_repl()
    repl.handle(SPEC_TRY)
    report = repl.stepper.step()
    assert [d.id for d in report.dispatched] == [3, 4]
    assert report.performed == ()
    report = repl.stepper.step()
    assert sorted(d.id for d, _ in report.performed) == [3, 4]
    assert [d.id for d in report.dispatched] == [5]
    repl.stepper.run()
    job = repl.stepper.job
    assert job is not None
    assert job.status == "success"
    assert states(job)[7] == "skipped"
    assert states(job)[9] == "success"


def test_manual_mode_feeds_results_by_hand_and_back_undoes() -> None:
    stepper = Stepper({"record": record})
    from ablauf_lang import make_job

    stepper.start(make_job(SPEC_TRY))
    stepper.manual = True
    stepper.step()
    with pytest.raises(ReplError, match=r"waiting for results of #3, #4"):
        stepper.step()
    stepper.feed(3, False, "a1 broke")
    stepper.feed(4, True, "a2 done")
    before = stepper.job
    report = stepper.step()
    assert report.performed == ()  # manual: nothing was run
    assert {r.id for r in report.fed} == {3, 4}
    assert [d.id for d in report.dispatched] == [7]  # the rescue starts
    assert states(stepper.job)[3] == "failure"
    assert states(stepper.job)[4] == "success"
    assert stepper.job is not None
    assert stepper.job.context["exec/last-error"] == "a1 broke"
    after = stepper.job
    stepper.back()
    assert stepper.job is before
    # Back to just before that restart: the hand-fed results are queued again, and
    # stepping again gives the same job (restarts are pure).
    assert sorted(r.id for r in stepper.current.queued) == [3, 4]
    assert stepper.waiting() == []
    stepper.step()
    assert stepper.job is not None
    assert after is not None
    assert states(stepper.job) == states(after)
    assert stepper.job.context == after.context


def test_feed_refuses_leaves_that_do_not_wait() -> None:
    stepper = Stepper()
    from ablauf_lang import make_job

    stepper.start(make_job("(do!! (log!! 1) (log!! 2))"))
    stepper.step()
    with pytest.raises(ReplError, match=r"#2 is not waiting for a result \(it is unset\)"):
        stepper.feed(2, True, None)
    with pytest.raises(ReplError, match=r"#0 is a do!! node, not an action"):
        stepper.feed(0, True, None)
    with pytest.raises(AblaufError, match="unknown node id 9"):
        stepper.feed(9, True, None)


def test_auto_mode_uses_a_hand_fed_result_instead_of_running_the_action() -> None:
    calls: list[Any] = []

    def act(payload: Any, context: Any) -> Any:
        calls.append(payload)
        return "real"

    stepper = Stepper({"t/act": act})
    from ablauf_lang import make_job

    stepper.start(make_job("(dopar!! (action!! :t/act 1) (action!! :t/act 2))"))
    stepper.step()
    stepper.feed(1, True, "mocked")
    stepper.step()
    assert calls == [2]
    assert stepper.job is not None
    assert [leaf.output for leaf in stepper.job.leaves()] == ["mocked", "real"]


def test_nothing_to_undo_and_no_job() -> None:
    stepper = Stepper()
    with pytest.raises(ReplError, match="nothing to undo"):
        stepper.back()
    with pytest.raises(ReplError, match="no job yet"):
        stepper.step()


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("", None),
        ("42", 42),
        ('"done"', "done"),
        ("{:a [1 2]}", {"a": [1, 2]}),
        ("disk full", "disk full"),
        ("nil", None),
        ("ok", "ok"),
    ],
)
def test_values_typed_after_ok(text: str, value: Any) -> None:
    assert parse_value(text, None) == value


# ---------------------------------------------------------------- commands


def test_step_prints_dispatches_results_and_marks_changes() -> None:
    repl, out = make_repl()
    repl.handle('(dopar!! (log!! "a") (do!! (log!! "b") (log!! "c")))')
    repl.handle(":step")
    repl.handle(":step")
    text = out.getvalue()
    first, second = text.split('  dispatch #1 action/log "a"')[1].split("success ")[0], text
    assert '  dispatch #3 action/log "b"' in first
    assert '● #1 action/log "a"  pending' in first
    assert '  #4 action/log "c"  unset' in first  # unchanged: not marked
    assert '  success  #1 action/log → "a"' in second
    assert re.search(r'● #1 action/log "a"  success \S+ → "a"', second)  # \S+: its duration
    assert '  dispatch #4 action/log "c"' in second


def test_commands_tree_ctx_ok_fail_back_save_load(tmp_path: Path) -> None:
    repl, out = make_repl(context={"user": "ann"})
    repl.handle(SPEC_TRY)
    repl.handle(":manual")
    repl.handle(":step")
    repl.handle(':ok 4 "two"')
    repl.handle(":fail 3 disk full")
    repl.handle(":step")
    repl.handle(":ctx")
    text = out.getvalue()
    assert 'queued success for #4 → "two"' in text
    assert 'queued failure for #3 → "disk full"' in text
    assert '  failure  #3 record → "disk full"  (by hand)' in text
    assert "  dispatch #7 record :r1" in text
    assert ':user "ann"' in text
    assert ':exec/last-error "disk full"' in text

    snapshot = tmp_path / "job.json"
    repl.handle(f":save {snapshot}")
    repl.handle(":back")
    assert repl.stepper.job is not None
    assert repl.stepper.job.restarts == 1
    repl.handle(f":load {snapshot}")
    job = repl.stepper.job
    assert job is not None
    assert job.restarts == 2
    assert [leaf.id for leaf in repl.stepper.waiting()] == [7]
    repl.handle(":auto")
    repl.handle(":run")
    job = repl.stepper.job
    assert job is not None
    assert job.status == "success"
    assert "job finished after 2 steps: success" in out.getvalue()


def test_load_a_program_file_and_errors_keep_the_session(tmp_path: Path) -> None:
    prog = tmp_path / "p.abl"
    prog.write_text("(do!!\n  (log!! 1)\n  (lgo!! 2))\n", encoding="utf-8")
    repl, out = make_repl()
    repl.handle(f":load {prog}")
    repl.handle(f":load {tmp_path / 'nope.abl'}")
    repl.handle(":step")
    repl.handle(":ok x")
    repl.handle(":help ok")
    text = out.getvalue()
    assert f"{prog}:3:4: error: unknown form lgo!!" in text
    assert "  (lgo!! 2))\n   ^" in text
    assert "error: cannot read" in text
    assert "nope.abl" in text
    assert "error: no job yet" in text
    assert "error: 'x' is not a node id" in text
    assert ":ok ID [VALUE]  feed a success" in text


def test_help_lists_every_spec_command() -> None:
    repl, out = make_repl()
    repl.handle(":help")
    text = out.getvalue()
    for name in (
        ":step",
        ":run",
        ":tree",
        ":ctx",
        ":ok",
        ":fail",
        ":manual",
        ":auto",
        ":back",
        ":load",
        ":save",
        ":help",
        ":quit",
    ):
        assert f"\n  {name} " in text


def test_toolbar_shows_status_counts_and_mode() -> None:
    repl, _ = make_repl()
    assert "no job" in "".join(t for _, t in repl.toolbar())
    repl.handle("(dopar!! (log!! 1) (fail!! 2) (log!! 3))")
    repl.handle(":step")
    bar = "".join(t for _, t in repl.toolbar())
    assert "job pending" in bar
    assert "pending 3  done 0  failed 0" in bar
    assert "auto" in bar
    repl.handle(":step")
    repl.handle(":manual")
    bar = "".join(t for _, t in repl.toolbar())
    assert "job failure" in bar
    assert "done 3  failed 1" in bar
    assert "manual" in bar


# ---------------------------------------------------------------- completion, validation


def completions(text: str, **kw: Any) -> list[str]:
    completer = AblaufCompleter(
        lambda: [(":step", ""), (":save", ""), (":quit", "")],
        lambda: kw.get("actions", ["git/create-repo", "chat/post"]),
        lambda: kw.get("waiting", [(3, "record"), (14, "record")]),
    )
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]


def test_completion() -> None:
    assert completions("(dopa") == ["dopar!!"]
    assert {"do!!", "dopar!!", "doseq!!"} <= set(completions("(do"))
    assert "log!!" in completions("(do!! (lo")
    assert completions("(action!! :gi") == [":git/create-repo"]
    assert completions("(action!! :") == [
        ":chat/post",
        ":git/create-repo",
        ":idempotent?",
        ":retry",
        ":timeout",
        ":heartbeat",
    ]
    assert completions(":s") == [":step", ":save"]
    assert completions(":ok ") == ["3", "14"]
    assert completions(":fail 1") == ["14"]
    assert completions(":ok 3 ") == []


def test_completion_of_paths(tmp_path: Path) -> None:
    (tmp_path / "deploy.abl").write_text("(log!! 1)")
    found = completions(f":load {tmp_path}/dep")
    assert found == ["loy.abl"]


def test_incomplete_input_continues_until_brackets_balance() -> None:
    assert is_incomplete("(do!! (log!! 1)")
    assert is_incomplete('(log!! "abc')
    assert is_incomplete("[1 {:a")
    assert not is_incomplete("(do!! (log!! 1))")
    assert not is_incomplete("(do!! (log!! 1)))")  # a stray closer is an error, not more
    assert not is_incomplete(":step")


def test_validator_points_at_the_problem() -> None:
    validator = AblaufValidator(frozenset({":step", ":quit"}))
    validator.validate(Document("(do!! (log!! 1))"))
    with pytest.raises(ValidationError) as bad:
        validator.validate(Document("(do!!\n  (log!! 1)))"))
    assert bad.value.cursor_position == len("(do!!\n  (log!! 1))")
    assert "stray closing ')'" in bad.value.message
    with pytest.raises(ValidationError, match=r"unknown command :stpe; did you mean :step"):
        validator.validate(Document(":stpe"))


# ---------------------------------------------------------------- a session via pipe input


def session(keys: str, **kw: Any) -> tuple[Repl, str]:
    """Run a whole REPL session on typed keys (it must end the session itself)."""
    out = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        repl = Repl(
            {"record": record},
            console=Console(file=out, width=120, color_system=None),
            input=pipe,
            output=DummyOutput(),
            history=kw.get("history") or InMemoryHistory(),
        )
        repl.run()
    return repl, out.getvalue()


def test_session_multiline_step_and_quit() -> None:
    repl, text = session('(dopar!! (log!! "a")\r  (log!! "b"))\r:step\r:step\r:quit\r')
    job = repl.stepper.job
    assert job is not None
    assert job.status == "success"
    assert len(list(job.nodes())) == 3  # the two lines made one form
    assert '  dispatch #2 action/log "b"' in text
    assert "job finished: success" in text


def test_session_refuses_a_stray_closer_and_survives_ctrl_c() -> None:
    # The validator keeps the bad line in the editor; Ctrl-C clears it; Ctrl-D leaves.
    repl, text = session("(log!! 1))\r\x03(log!! 2)\r\x04")
    job = repl.stepper.job
    assert job is not None
    assert [leaf.payload for leaf in job.leaves()] == [2]
    assert "error" not in text


def test_session_f5_steps() -> None:
    # F5 runs :step through run_in_terminal while the prompt stays up, so the session
    # runs in a thread and each key waits for the step before it.
    out = io.StringIO()
    with create_pipe_input() as pipe:
        repl = Repl(
            console=Console(file=out, width=120, color_system=None),
            input=pipe,
            output=DummyOutput(),
            history=InMemoryHistory(),
        )
        loop = threading.Thread(target=repl.run)
        loop.start()
        try:
            pipe.send_text("(do!! (log!! 1) (log!! 2))\r")
            for restarts in (1, 2):
                pipe.send_text("\x1b[15~")  # F5
                wait_until(
                    lambda n=restarts: (
                        repl.stepper.job is not None and repl.stepper.job.restarts == n
                    )
                )
        finally:
            pipe.send_text("\x04")
            loop.join(timeout=20)
    assert not loop.is_alive()
    job = repl.stepper.job
    assert job is not None
    assert states(job)[1] == "success"
    assert states(job)[2] == "pending"
    assert "  dispatch #2 action/log 2" in out.getvalue()


def wait_until(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_history_is_saved_across_sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = history_path()
    assert path.startswith(str(tmp_path / "state"))
    out = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text("(log!! 7)\r\x04")
        Repl(console=Console(file=out), input=pipe, output=DummyOutput()).run()
    assert "+(log!! 7)" in Path(path).read_text(encoding="utf-8")
    with create_pipe_input() as pipe:
        pipe.send_text("\x1b[A\r\x04")  # Up recalls the last line of the last session
        repl = Repl(console=Console(file=out), input=pipe, output=DummyOutput())
        repl.run()
    job = repl.stepper.job
    assert job is not None
    assert [leaf.payload for leaf in job.leaves()] == [7]


# ---------------------------------------------------------------- a real terminal


def test_repl_in_a_real_terminal(tmp_path: Path, tmux: Tmux) -> None:
    exe = shutil.which("ablauf")
    argv = exe if exe else f"{sys.executable} -m ablauf_lang"
    env = f"XDG_STATE_HOME={tmp_path / 'state'} ABLAUF_STORE=memory:"
    hello = Path(__file__).parent.parent / "examples" / "hello.abl"
    tmux(
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "120",
        "-y",
        "40",
        f"env {env} {argv} repl {hello}; echo REPL-EXIT=$?; sleep 60",
    )
    tmux.wait_for("ablauf>")
    screen = tmux.screen()
    assert "loaded " in screen
    assert "#5 try!!  unset" in screen
    assert "job pending  restarts 0" in screen  # the bottom toolbar

    tmux.keys(":step", "Enter")
    tmux.wait_for('dispatch #7 action/log "d"')

    # A form over two lines: Enter continues while a bracket is open.
    tmux.keys("(dopar!! (log!! 1)", "Enter")
    tmux.wait_for("...>")
    tmux.keys("(fail!! 2))", "Enter")
    tmux.wait_for("#2 action/fail 2  unset")

    tmux.keys(":manual", "Enter")
    tmux.keys(":step", "Enter")
    tmux.wait_for("manual mode: feed results for #1 #2")
    tmux.keys(":ok 1 42", "Enter")
    tmux.keys(":fail 2 boom", "Enter")
    tmux.keys(":step", "Enter")
    screen = tmux.wait_for("job finished: failure")
    # Fed by hand: no duration (the person's thinking time is not the action's).
    assert "● #1 action/log 1  success by hand → 42" in screen
    assert '● #2 action/fail 2  failure by hand → "boom"' in screen
    assert "job failure  restarts 2" in screen  # the toolbar followed

    tmux.keys(":back", "Enter")
    tmux.wait_for("back to restart 1")
    tmux.keys("C-d")
    tmux.wait_for("REPL-EXIT=0")
    history = (tmp_path / "state" / "ablauf" / "repl_history").read_text(encoding="utf-8")
    assert "+:manual" in history
    assert "+(fail!! 2))" in history


def test_run_time_kinds_render_with_their_roles() -> None:
    # if!! and doseq!! come from hand-built trees until the compiler knows them.
    from pyrsistent import pvector

    from ablauf_lang.engine.kinds import Doseq, If
    from tests.builders import Do, L, job_of, number

    tree = Do(
        If(-1, False, pvector([Do(L("yes/act")), Do(L("no/act"))])),
        Doseq(-1, "x", [1, 2], number(L("each/act"))),
    )
    repl, out = make_repl(actions={"yes/act": record, "no/act": record, "each/act": record})
    repl.stepper.start(job_of(tree))
    repl.handle(":run")
    repl.handle(":tree")
    text = out.getvalue().split("job finished")[1]
    assert "#1 if!! false  success" in text
    assert "#2 then  skipped" in text  # the branch not taken: it never ran
    assert '#3 yes/act "yes/act"  skipped' in text
    assert "#4 else  success" in text
    assert "#6 doseq!! [x [1 2]]  success" in text
    assert text.count('each/act "each/act"  success') == 2  # one body per element


def test_piped_script_through_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from ablauf_lang.cli import cli

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    hello = Path(__file__).parent.parent / "examples" / "hello.abl"
    script = ":step\n:run\n(do!! (log!! 1)\n  (log!! 2))\n:bogus\n:tree\n:quit\n:tree\n"
    result = CliRunner().invoke(
        cli, ["repl", str(hello), "--context", '{"k": 1}'], input=script, catch_exceptions=False
    )
    assert result.exit_code == 0
    out = result.stdout
    assert f"loaded {hello}" in out
    assert "ablauf> :step\n" in out
    assert "job finished after 2 steps: success" in out
    assert "ablauf> (do!! (log!! 1)\n   ...>   (log!! 2))\n" in out
    assert "error: unknown command :bogus" in out
    assert out.count("ablauf> :tree") == 1  # nothing runs after :quit
    assert not (tmp_path / "state").exists()  # no prompt, no history file


def test_command_table_matches_the_shared_names() -> None:
    from ablauf_lang.names import REPL_COMMANDS
    from ablauf_lang.repl.commands import COMMANDS

    assert set(COMMANDS) == set(REPL_COMMANDS)


def test_completion_offers_names_the_session_defined() -> None:
    repl, _ = make_repl()
    repl.handle("(defn deploy-to [host] (action!! :deploy/host {:host host}))")
    repl.handle('(def hosts ["a" "b"])')
    completer = repl.session.completer
    found = [c.text for c in completer.get_completions(Document("(do!! (depl"), CompleteEvent())]
    assert found[0] == "deploy-to"
    found = [c.text for c in completer.get_completions(Document("(doseq!! [h ho"), CompleteEvent())]
    assert "hosts" in found


# ---------------------------------------------------------------- Ctrl-C, held actions


def test_ctrl_c_during_a_step_keeps_results_and_holds_what_was_in_flight() -> None:
    import os
    import signal

    assert threading.current_thread() is threading.main_thread()
    release = threading.Event()
    calls: list[Any] = []

    def block(payload: Any, context: Any) -> Any:
        calls.append(payload)
        release.wait(20)  # until the test lets it go: Ctrl-C must not wait for it
        return "late"

    repl, out = make_repl({"t/block": block})
    repl.handle("(do!! (dopar!! (log!! 1) (action!! :t/block 2)) (log!! 3))")
    repl.handle(":step")  # dispatches #2 and #3
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    repl.handle(":run")
    timer.join()
    assert time.monotonic() - started < 5  # stopped at once, though #3 still blocks
    text = out.getvalue()
    assert "interrupted: the results of #2 are kept (:step applies them); #3 t/block" in text
    assert repl.stepper.held() == [3]
    repl.handle(":step")  # applies #2's result; never performs #3 again
    assert calls == [2]
    assert states(repl.stepper.job)[2] == "success"
    assert states(repl.stepper.job)[3] == "pending"
    repl.handle(":step")
    assert "nothing to do: #3 was interrupted" in out.getvalue()
    repl.handle(":run")
    assert "#3 was interrupted (outcome unknown)" in out.getvalue()
    assert calls == [2]
    release.set()  # the abandoned call ends; its result is never applied
    repl.handle(":retry 4")
    assert "#4 is not an interrupted action; held: #3" in out.getvalue()
    repl.handle(":retry")
    repl.handle(":run")
    job = repl.stepper.job
    assert job is not None
    assert job.status == "success"
    assert calls == [2, 2]  # performed again only because the person asked


def test_feeding_a_held_action_releases_it() -> None:
    stepper = Stepper()
    from ablauf_lang import make_job

    stepper.start(make_job("(do!! (action!! :x/y 1) (log!! 2))"))
    stepper.step()
    stepper.current = replace(stepper.current, held=frozenset({1}))
    with pytest.raises(ReplError, match="nothing to do: #1 was interrupted"):
        stepper.step()
    stepper.feed(1, True, "by hand")
    assert stepper.held() == []
    stepper.run()
    assert stepper.job is not None
    assert stepper.job.status == "success"


# ---------------------------------------------------------------- expressions, timing, output


@pytest.mark.parametrize(
    ("inputs", "printed"),
    [
        (["(+ 1 2)"], "3"),
        (["(ctx :who)"], '"ann"'),
        (['(str "hi " (ctx :who))'], '"hi ann"'),
        (["(def x 4)", "[x (* x x)]"], "[4 16]"),
        (["(def y 2) (* y 5)"], "10"),
        (["{:a [1 2] :b nil}"], "{:a [1 2], :b nil}"),
        (['"text"'], '"text"'),
        (["(ctx :nope :default)"], ":default"),
        (["(defn f [a] a)", "f"], "the function f"),
    ],
)
def test_a_plain_expression_prints_its_value(inputs: list[str], printed: str) -> None:
    repl, out = make_repl(context={"who": "ann"})
    for text in inputs:
        repl.handle(text)
    assert out.getvalue().splitlines()[-1] == printed
    assert repl.stepper.job is None  # no job was made


def test_an_expression_reads_the_current_job_s_context() -> None:
    repl, out = make_repl(context={"n": 1})
    repl.handle("(with-augment [identity :n] (log!! 41))")
    repl.handle(":run")
    repl.handle("(+ (ctx :n) 1)")
    assert out.getvalue().splitlines()[-1] == "42"
    repl.handle("(log!! 1) (+ 1 2)")  # a workflow before: the program's rules apply
    assert "the program's last form must be a workflow" in out.getvalue()


def test_durations_leave_out_the_person_s_time() -> None:
    repl, out = make_repl()
    repl.handle("(dopar!! (log!! 1) (log!! 2))")
    repl.handle(":step")  # dispatched now ...
    time.sleep(0.4)  # ... the person thinks ...
    repl.handle(":manual")
    repl.handle(":ok 1 10")
    repl.handle(":auto")
    repl.handle(":step")  # ... then #2 is performed (quickly) and #1 applied
    repl.handle(":tree")
    tree = out.getvalue().split("ablauf")[-1] if "ablauf" in out.getvalue() else out.getvalue()
    assert "#1 action/log 1  success by hand → 10" in tree
    found = re.search(r"#2 action/log 2  success (\d+)(us|ms) → 2", tree)
    assert found, tree
    assert found.group(2) == "us" or int(found.group(1)) < 300  # not the 400 ms waited


def test_a_note_names_actions_no_one_registered() -> None:
    repl, out = make_repl()
    repl.handle(
        "(do!! (action!! :record 1) (action!! :git/nope 2) (pmap!! [x [1]] (action!! :y/z x)))"
    )
    assert "note: no action registered for git/nope, y/z" in out.getvalue()


def test_a_piped_session_prints_whole_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from ablauf_lang.cli import cli

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("COLUMNS", raising=False)
    long = "y" * 300
    many = " ".join(str(i) for i in range(40))
    script = f'(dopar!! (log!! "{long}") (fail!! "{long}!"))\n:run\n(lgo!! {many})\n'
    result = CliRunner().invoke(cli, ["repl"], input=script, catch_exceptions=False)
    assert result.exit_code == 0
    out = result.stdout
    assert "…" not in out
    assert f'#1 action/log "{long}"  success' in out
    assert f'failure  #2 action/fail → "{long}!"' in out
    error = [line for line in out.splitlines() if "unknown form lgo!!" in line]
    assert len(error) == 1
    assert error[0].endswith("do!!?")  # one line, not wrapped at 80 columns
