"""The `ablauf` command: exit codes, messages for bad input, JSON output, `runs`, progress.

Most tests call the click group in-process (fast); a few run the installed `ablauf`
script as a subprocess, and one runs it in a real terminal (tmux) to see live progress.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from rich.console import Console

import ablauf_lang
from ablauf_lang import open_store
from ablauf_lang.cli import cli
from ablauf_lang.cli.drive import LiveProgress
from ablauf_lang.engine.job import make_job, restart_job
from tests.terminal import Tmux

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing a test runs writes in the real home: store and XDG dirs in tmp."""
    monkeypatch.setenv("ABLAUF_STORE", f"sqlite:///{tmp_path / 'runs.db'}")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("ABLAUF_DEMO_DELAY", "0.01")
    monkeypatch.chdir(tmp_path)


def ablauf(*args: str) -> Result:
    """Run the command group in-process; an escaping exception fails the test."""
    result = CliRunner().invoke(cli, list(args), prog_name="ablauf", catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def one_line_error(result: Result, *needles: str) -> None:
    """Exit 2, one line on stderr naming the problem, nothing on stdout."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert result.stdout == ""


# ---------------------------------------------------------------- run


def test_run_json_prints_the_result_and_nothing_else(tmp_path: Path) -> None:
    prog = write(tmp_path / "p.abl", '(do!! (with-augment [identity :greeting] (log!! "hi")))')
    result = ablauf("run", prog, "--json", "--context", '{"who": "me"}')
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert set(data) == {"run_id", "status", "context"}
    assert data["status"] == "success"
    assert data["context"] == {"who": "me", "greeting": "hi"}


def test_run_failing_workflow_exits_1(tmp_path: Path) -> None:
    prog = write(tmp_path / "p.abl", '(do!! (log!! 1) (fail!! "disk full") (log!! 2))')
    result = ablauf("run", prog, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["status"] == "failure"
    plain = ablauf("run", prog)
    assert plain.exit_code == 1
    assert plain.stdout.startswith("failure")
    assert 'action/fail failure: "disk full"' in plain.stdout
    assert plain.stderr == "log #1: 1\n"  # piped: no progress, only what log!! said


def test_run_records_the_run_in_the_store(tmp_path: Path) -> None:
    prog = write(tmp_path / "p.abl", "(log!! 1)")
    url = f"sqlite:///{tmp_path / 'other.db'}"
    run_id = json.loads(ablauf("run", prog, "--json", "--store", url).stdout)["run_id"]
    listed = json.loads(ablauf("runs", "list", "--json", "--store", url).stdout)
    assert [r["run_id"] for r in listed] == [run_id]
    assert {"run_id", "status", "created", "updated"} <= set(listed[0])
    assert listed[0]["filename"] == prog
    # The default store ($ABLAUF_STORE here) did not get it.
    assert json.loads(ablauf("runs", "list", "--json").stdout) == []


def test_run_memory_store_keeps_nothing(tmp_path: Path) -> None:
    prog = write(tmp_path / "p.abl", "(log!! 1)")
    assert ablauf("run", prog, "--store", "memory:", "--json").exit_code == 0
    assert json.loads(ablauf("runs", "list", "--json").stdout) == []


def test_syntax_error_shows_file_line_column_and_caret(tmp_path: Path) -> None:
    prog = write(tmp_path / "bad.abl", '(do!!\n  (log!! "a"))\n  (log!! "b"))\n')
    result = ablauf("run", prog)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{prog}:3:")
    assert ": error: " in lines[0]
    assert lines[1] == '  (log!! "b"))'
    assert lines[2].strip() == "^"
    assert result.stdout == ""


def test_compile_error_points_at_the_form(tmp_path: Path) -> None:
    prog = write(tmp_path / "bad.abl", "(do!!\n  (lgo!! 1))\n")
    db = tmp_path / "never.db"
    result = ablauf("run", prog, "--json", "--store", f"sqlite:///{db}")
    assert not db.exists()  # reported before any store is opened
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{prog}:2:4: error: unknown form lgo!!")
    assert result.stderr.splitlines()[-1] == "   ^"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["run", "missing.abl"], ["missing.abl", "no such file"]),
        (["run", "."], [".: is a directory"]),
        (["run", "p.abl", "--context", "{oops"], ["--context", "not valid JSON"]),
        (["run", "p.abl", "--context", "[1, 2]"], ["--context", "JSON object"]),
        (["run", "p.abl", "--context", "@nope.json"], ["nope.json", "no such file"]),
        (["run", "p.abl", "--store", "redis://x"], ["unknown store URL", "redis://x"]),
        (
            ["run", "p.abl", "--actions", "no_such_module_xyz"],
            ["no_such_module_xyz", "cannot import", "ModuleNotFoundError"],
        ),
        (["run", "p.abl", "--actions", "broken.py"], ["broken.py", "SyntaxError"]),
        (["run", "p.abl", "--actions", "empty.py"], ["empty.py", "exposes no actions"]),
        (["run", "p.abl", "--actions", "notmap.py"], ["ACTIONS must be a mapping"]),
        (["run", "p.abl", "--actions", "raises.py"], ["raises.py", "RuntimeError: no config"]),
        (["run", "p.abl", "--actions", "gone.py"], ["gone.py", "no such file"]),
        (["check", "missing.abl"], ["missing.abl", "no such file"]),
        (["runs", "show", "nope", "--store", "memory:"], ["no run", "nope"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    write(tmp_path / "p.abl", "(log!! 1)")
    write(tmp_path / "broken.py", "def oops(:\n")
    write(tmp_path / "empty.py", "X = 1\n")
    write(tmp_path / "notmap.py", "ACTIONS = [1]\n")
    write(tmp_path / "raises.py", "raise RuntimeError('no config')\n")
    one_line_error(ablauf(*args), *needles)


def test_actions_module_by_mapping_and_by_decorator(tmp_path: Path) -> None:
    write(
        tmp_path / "acts_map.py",
        """
        def double(payload, context):
            return payload * 2
        ACTIONS = {"math/double": double}
    """,
    )
    write(
        tmp_path / "acts_deco.py",
        """
        from ablauf_lang import action

        @action("math/double")
        async def double(payload, context):
            return payload * 2

        @action(":math/inc")
        def inc(payload, context):
            return context["n"] + payload
    """,
    )
    prog = write(
        tmp_path / "p.abl",
        """
        (do!! (with-augment [identity :n] (action!! :math/double 21))
              (with-augment [identity :m] (action!! :math/inc 1)))
    """,
    )
    by_map = ablauf("run", prog, "--actions", "acts_map", "--json")  # dotted name, from cwd
    # math/inc is not in that module: refused before anything starts, where it is used.
    assert by_map.exit_code == 2
    assert by_map.stdout == ""
    head, line, caret = by_map.stderr.splitlines()
    assert head == (
        f"{prog}:3:35: error: unknown action math/inc: neither acts_map nor the standard "
        "library defines it"
    )
    assert line[caret.index("^") :].startswith("(action!! :math/inc 1)")
    assert json.loads(ablauf("runs", "list", "--json").stdout) == []  # nothing recorded
    by_deco = ablauf("run", prog, "--actions", str(tmp_path / "acts_deco.py"), "--json")
    assert by_deco.exit_code == 0
    assert json.loads(by_deco.stdout)["context"] == {"n": 42, "m": 43}


# ---------------------------------------------------------------- check


def test_check_reports_each_bad_file_and_exits_2(tmp_path: Path) -> None:
    good = write(tmp_path / "good.abl", "(dopar!! (log!! 1) (log!! 2))")
    bad1 = write(tmp_path / "bad1.abl", "(do!! (log!! 1)")
    bad2 = write(tmp_path / "bad2.abl", "(do!!\n (action!! ns/x 1))")
    result = ablauf("check", good, bad1, bad2)
    assert result.exit_code == 2
    assert f"{good}: ok (3 nodes)" in result.stdout
    assert f"{bad1}:1:1: error: unclosed list" in result.stderr
    assert f"{bad2}:2:12: error: action!! needs a keyword" in result.stderr
    assert "Traceback" not in result.stderr
    assert ablauf("check", good).exit_code == 0


# ---------------------------------------------------------------- help, version


def test_version() -> None:
    result = ablauf("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"ablauf, version {ablauf_lang.__version__}"


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["check"],
        ["repl"],
        ["runs"],
        ["runs", "list"],
        ["runs", "show"],
        ["runs", "resume"],
        ["runs", "retry"],
        ["runs", "abort"],
        ["worker"],
        ["submit"],
    ],
    ids=lambda c: " ".join(c) or "ablauf",
)
def test_every_command_has_help(command: list[str]) -> None:
    result = ablauf(*command, "--help")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: {' '.join(['ablauf', *command])}")
    assert len(result.stdout.splitlines()) > 3


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    result = ablauf("run", "--frobnicate")
    assert result.exit_code == 2
    assert "No such option '--frobnicate'" in result.stderr
    assert result.stderr.startswith("Usage: ablauf run")


# ---------------------------------------------------------------- runs


@pytest.fixture
def flaky(tmp_path: Path) -> tuple[str, Path]:
    """An actions module whose step fails until a flag file exists."""
    flag = tmp_path / "fixed"
    path = write(
        tmp_path / "flaky.py",
        f"""
        import os
        def op(payload, context):
            if not os.path.exists({str(flag)!r}):
                raise RuntimeError("service down")
            return "ok"
        ACTIONS = {{"svc/op": op}}
    """,
    )
    return path, flag


def _pending_run(url: str, source: str) -> str:
    """A run that stopped (as if its process died) with actions in flight."""
    store = open_store(url)
    try:
        job = make_job(ablauf_lang.compile(source))
        run_id = store.create_run(job, source=source, filename="x.abl")
        job, dispatches = restart_job(job, [], time.time())
        assert dispatches
        store.record(run_id, job)
        return run_id
    finally:
        store.close()


def test_runs_show_list_retry(tmp_path: Path, flaky: tuple[str, Path]) -> None:
    actions, flag = flaky
    prog = write(tmp_path / "p.abl", "(do!! (idempotent-action!! :svc/op 1) (log!! 2))")
    failed = ablauf("run", prog, "--actions", actions, "--json")
    assert failed.exit_code == 1
    run_id = json.loads(failed.stdout)["run_id"]

    shown = json.loads(ablauf("runs", "show", run_id, "--json").stdout)
    assert shown["status"] == "failure"
    states = {n["id"]: n["state"] for n in shown["nodes"]}
    assert states == {0: "failure", 1: "failure", 2: "unset"}
    assert shown["nodes"][1]["error"] == "RuntimeError: service down"

    text = ablauf("runs", "show", run_id).stdout
    assert f"run {run_id}  failure" in text
    assert "#1 svc/op 1 idempotent  failure" in text

    listing = ablauf("runs", "list").stdout
    assert run_id in listing
    assert "failure" in listing

    flag.touch()
    retried = ablauf("runs", "retry", run_id, "--actions", actions, "--json")
    assert retried.exit_code == 0
    assert json.loads(retried.stdout)["status"] == "success"
    again = ablauf("runs", "retry", run_id)
    one_line_error(again, "succeeded", "nothing to retry")


def test_runs_abort_and_resume(tmp_path: Path) -> None:
    url = os.environ["ABLAUF_STORE"]
    source = '(try!! (dopar!! (action!! :svc/a 1) (log!! 2)) (finally!! (log!! "f")))'
    to_abort = _pending_run(url, source)
    aborted = ablauf("runs", "abort", to_abort, "--reason", "operator said stop")
    assert aborted.exit_code == 0
    assert "aborted run" in aborted.stdout
    shown = json.loads(ablauf("runs", "show", to_abort, "--json").stdout)
    assert shown["status"] == "failure"
    errors = [n.get("error") for n in shown["nodes"] if n["kind"] == "leaf"]
    assert errors.count("operator said stop") == 2
    one_line_error(ablauf("runs", "abort", to_abort), "already finished")

    to_resume = _pending_run(url, "(do!! (idempotent-action!! :action/log 1) (log!! 2))")
    resumed = ablauf("runs", "resume", to_resume, "--json")
    assert resumed.exit_code == 0
    assert json.loads(resumed.stdout) == {"run_id": to_resume, "status": "success", "context": {}}


# ---------------------------------------------------------------- worker, submit


def test_worker_and_submit_without_the_worker_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ablauf_lang.runners

    monkeypatch.delattr(ablauf_lang.runners, "worker", raising=False)
    monkeypatch.setitem(sys.modules, "ablauf_lang.runners.worker", None)  # import fails
    prog = write(tmp_path / "p.abl", "(log!! 1)")
    one_line_error(
        ablauf("submit", prog, "--store", "memory:"), "distributed execution is not available"
    )
    one_line_error(ablauf("worker", "--store", "memory:"), "distributed execution")


def test_worker_and_submit_report_store_and_program_errors(tmp_path: Path) -> None:
    # The real worker module: workers need PostgreSQL; a bad program is a compile error.
    prog = write(tmp_path / "p.abl", "(log!! 1)")
    bad = write(tmp_path / "bad.abl", "(do!! (lgo!! 1))")
    one_line_error(ablauf("submit", prog, "--store", "memory:"), "PostgreSQL", "memory:")
    one_line_error(ablauf("worker", "--store", "memory:"), "PostgreSQL")
    # A bad program is a compile error before any connection is tried.
    result = ablauf("submit", bad, "--store", "postgresql://nobody@127.0.0.1:1/none")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{bad}:1:8: error: unknown form lgo!!")


# ---------------------------------------------------------------- progress


def test_live_progress_renders_the_tree_and_elapsed_time() -> None:
    job = make_job(ablauf_lang.compile('(dopar!! (log!! "a") (action!! :x/slow 1))'))
    buf = io.StringIO()
    console = Console(file=buf, width=100, color_system=None)
    progress = LiveProgress("demo.abl", console, max_nodes=50)
    job, dispatches = restart_job(job, [], 1.0)
    progress.on_restart(job, dispatches, [])
    console.print(progress)
    assert "running 0  queued 2  finished 0" in buf.getvalue()  # dispatched, none started
    progress.on_start(dispatches[0], 1.5)
    progress.on_start(dispatches[1], 1.6)
    done = ablauf_lang.success(dispatches[0], "a", started_at=1.5, finished_at=1.75)
    job, _ = restart_job(job, [done], 2.0)
    progress.on_restart(job, [], [done])
    buf.seek(0)
    buf.truncate(0)
    console.print(progress)
    out = buf.getvalue()
    assert out.splitlines()[0].startswith("demo.abl  pending  0.")
    assert "running 1  queued 0  finished 1" in out
    # Its duration counts from its start (1.5), not from its dispatch (1.0): 250ms.
    assert '#1 action/log "a"  success 250ms → "a"' in out
    assert "#2 x/slow 1  pending" in out
    small = LiveProgress("demo.abl", console, max_nodes=2)
    small.on_restart(job, [], [])
    assert "(3 nodes)" in str(small.__rich__())


def _ablauf_exe() -> list[str]:
    exe = shutil.which("ablauf")
    return [exe] if exe else [sys.executable, "-m", "ablauf_lang"]


def test_installed_script_and_python_m(tmp_path: Path) -> None:
    prog = write(tmp_path / "p.abl", '(do!! (log!! 1) (fail!! "no"))')
    env = {**os.environ}
    for argv in (_ablauf_exe(), [sys.executable, "-m", "ablauf_lang"]):
        done = subprocess.run(
            [*argv, "run", prog, "--json"], capture_output=True, text=True, env=env, timeout=60
        )
        assert done.returncode == 1
        assert json.loads(done.stdout)["status"] == "failure"
        assert done.stderr == "log #1: 1\n"
    bad = subprocess.run(
        [*_ablauf_exe(), "run", prog, "--context", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("ablauf: error: --context: not valid JSON")
    assert "Traceback" not in bad.stderr


# ---------------------------------------------------------------- a real terminal


def test_run_shows_live_progress_on_a_terminal(tmp_path: Path, tmux: Tmux) -> None:
    prog = write(
        tmp_path / "p.abl",
        """
        (do!! (log!! "start")
              (dopar!! (action!! :action/sleep 1.5) (log!! "beside"))
              (log!! "end"))
    """,
    )
    env = f"ABLAUF_STORE=sqlite:///{tmp_path / 'tty.db'}"
    command = f"env {env} {' '.join(_ablauf_exe())} run {prog}; echo EXIT=$?; sleep 60"
    tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "30", command)
    during = tmux.wait_for('#4 action/log "beside"  success')
    assert "p.abl  pending" in during
    assert "#3 action/sleep 1.5  pending" in during  # still sleeping beside it
    assert "running 1  queued 0" in during
    after = tmux.wait_for("EXIT=0")
    assert '#5 action/log "end"  success' in after
    assert "success  run " in after


# ---------------------------------------------------------------- output a script can trust


def test_json_stdout_holds_the_document_only_what_actions_print_goes_to_stderr(
    tmp_path: Path,
) -> None:
    acts = write(
        tmp_path / "noisy.py",
        """
        import os, subprocess, sys
        def noisy(payload, context):
            print("printed by the action")
            sys.stdout.write("written by the action\\n")
            subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
            os.write(1, b"straight to fd 1\\n")
            return payload
        ACTIONS = {"t/noisy": noisy}
    """,
    )
    prog = write(tmp_path / "p.abl", "(dopar!! (action!! :t/noisy 1) (action!! :t/noisy 2))")
    done = subprocess.run(
        [*_ablauf_exe(), "run", prog, "--actions", acts, "--json", "--store", "memory:"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "success"  # the whole of stdout is JSON
    for line in ("printed by the action", "from a child process", "straight to fd 1"):
        assert done.stderr.count(line) == 2
    # Text output: what actions print stays on stdout, as a user would expect.
    plain = subprocess.run(
        [*_ablauf_exe(), "run", prog, "--actions", acts, "--store", "memory:"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.stdout.count("printed by the action") == 2


@pytest.mark.parametrize(
    "text", ['{"a": NaN}', '{"a": Infinity}', '{"a": [1, -Infinity]}'], ids=str
)
def test_context_refuses_what_json_cannot_say(tmp_path: Path, text: str) -> None:
    write(tmp_path / "p.abl", "(log!! 1)")
    one_line_error(ablauf("run", "p.abl", "--context", text), "--context", "not a JSON number")


def test_context_from_a_directory_says_so(tmp_path: Path) -> None:
    write(tmp_path / "p.abl", "(log!! 1)")
    (tmp_path / "ctx").mkdir()
    one_line_error(ablauf("run", "p.abl", "--context", "@ctx"), "ctx: is a directory, not a JSON")
    one_line_error(ablauf("run", "p.abl", "--actions", "ctx"), "ctx: is a directory")
    one_line_error(ablauf("run", "p.abl", "--actions", "ctx/"), "is a directory")
    one_line_error(ablauf("run", "p.abl", "--store", ""), "--store is empty")


def test_run_json_lists_the_failed_steps(tmp_path: Path) -> None:
    prog = write(
        tmp_path / "p.abl",
        '(dopar!! (try!! (fail!! "handled") (rescue!! (log!! "r"))) (fail!! {:code 7}))',
    )
    result = ablauf("run", prog, "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["status"] == "failure"
    assert data["failed"] == [
        {"id": 3, "action": "action/fail", "state": "failure", "error": "handled"},
        {"id": 7, "action": "action/fail", "state": "failure", "error": {"code": 7}},
    ]
    text = ablauf("run", prog).stdout  # the text output lists the same two
    assert '#3 action/fail failure: "handled"' in text
    assert "#7 action/fail failure: {:code 7}" in text


def test_json_output_of_map_keys_that_are_not_strings(tmp_path: Path) -> None:
    prog = write(tmp_path / "p.abl", "(with-augment [identity :x] (log!! {[1 2] 3}))")
    data = json.loads(ablauf("run", prog, "--json").stdout)
    assert data["context"] == {"x": {"$map": [[[1, 2], 3]]}}
    shown = ablauf("runs", "show", data["run_id"], "--json")
    assert shown.exit_code == 0


def test_piped_text_output_is_never_cut_or_wrapped(tmp_path: Path) -> None:
    long = "x" * 700
    prog = write(
        tmp_path / "p.abl",
        f'(do!! (with-augment [identity :long] (log!! "{long}")) (fail!! "{long}!"))',
    )
    result = ablauf("run", prog)
    assert result.exit_code == 1
    assert "…" not in result.stdout
    assert f'#2 action/fail failure: "{long}!"' in result.stdout
    assert f':long "{long}"' in result.stdout
    run_id = result.stdout.split()[2]
    shown = ablauf("runs", "show", run_id).stdout
    assert "…" not in shown
    assert f'#1 action/log "{long}"  success' in shown
    assert max(len(line) for line in shown.splitlines()) > 1400  # one line per node


def test_exit_codes_are_only_0_1_2_130(tmp_path: Path) -> None:
    write(tmp_path / "ok.abl", "(log!! 1)")
    write(tmp_path / "no.abl", "(fail!! 1)")
    write(tmp_path / "bad.abl", "(log!! 1")
    write(tmp_path / "exits.py", "import sys\nsys.exit(5)\n")
    write(tmp_path / "ctrl_c.py", "raise KeyboardInterrupt\n")
    calls = [
        (["run", "ok.abl"], 0),
        (["run", "no.abl"], 1),
        (["run", "bad.abl"], 2),
        (["run", "ok.abl", "--actions", "exits.py"], 2),
        (["run", "ok.abl", "--actions", "ctrl_c.py"], 2),
        (["run", "ok.abl", "--concurrency", "0"], 2),
        (["check", "ok.abl", "--actions", "exits.py"], 2),
        (["runs", "show", "nope"], 2),
        (["no-such-command"], 2),
        ([], 2),  # a usage error: the help on stderr
    ]
    for args, code in calls:
        done = subprocess.run(
            [*_ablauf_exe(), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert done.returncode == code, (args, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        if args and args[-1] in ("exits.py", "ctrl_c.py"):
            assert done.stderr.strip().count("\n") == 0, done.stderr  # one line
            assert "cannot import the module" in done.stderr


def test_an_unexpected_exception_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ablauf_lang.cli import main
    from ablauf_lang.errors import InvariantError

    @cli.command("explode-for-test", hidden=True)
    @click.argument("what")
    def explode(what: str) -> None:
        if what == "bug":
            raise ZeroDivisionError("division by zero")
        raise InvariantError("job stuck: not done, nothing in flight")

    try:
        for what, needle in (
            ("bug", "ablauf: internal error: ZeroDivisionError: division by zero"),
            ("invariant", "ablauf: error: job stuck: not done, nothing in flight"),
        ):
            with pytest.raises(SystemExit) as exit_info:
                main(["explode-for-test", what])
            assert exit_info.value.code == 2
            err = capsys.readouterr().err
            assert err.splitlines() == [err.splitlines()[0]]
            assert err.startswith(needle)
        monkeypatch.setenv("ABLAUF_DEBUG", "1")  # developers get the traceback
        with pytest.raises(ZeroDivisionError):
            main(["explode-for-test", "bug"])
    finally:
        cli.commands.pop("explode-for-test")


# ---------------------------------------------------------------- actions that are missing


def test_run_reports_unknown_actions_before_anything_starts(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    result = ablauf(
        "run", str(EXAMPLES / "deploy.abl"), "--store", f"sqlite:///{db}"
    )  # no --actions
    assert result.exit_code == 2
    assert not db.exists()  # nothing started, nothing recorded
    heads = [line for line in result.stderr.splitlines() if ": error: " in line]
    names = [h.split("unknown action ")[1].split(":")[0] for h in heads]
    assert names == ["git/create-repo", "ci/create-job", "sentry/create-project", "chat/post"]
    assert all("no --actions module was given" in h for h in heads)
    assert heads[0].startswith(f"{EXAMPLES / 'deploy.abl'}:")
    # A typo gets a "did you mean", also inside a pmap!!'s body (expanded at run time).
    prog = write(
        tmp_path / "typo.abl",
        "(do!! (action!! :git/create-repo {}) (pmap!! [h (ctx :hosts)] (action!! :chat/pots h)))",
    )
    acts = str(EXAMPLES / "actions.py")
    typo = ablauf("run", prog, "--actions", acts)
    assert typo.exit_code == 2
    assert "unknown action chat/pots" in typo.stderr
    assert "did you mean chat/post?" in typo.stderr
    assert len([line for line in typo.stderr.splitlines() if ": error: " in line]) == 1


def test_check_with_actions_tree_and_json(tmp_path: Path) -> None:
    acts = str(EXAMPLES / "actions.py")
    deploy = str(EXAMPLES / "deploy.abl")
    assert ablauf("check", deploy).exit_code == 0  # without --actions: actions not checked
    assert ablauf("check", deploy, "--actions", acts).exit_code == 0
    bad = ablauf("check", str(EXAMPLES / "hello.abl"), deploy, "--actions", "examples/nope.py")
    one_line_error(bad, "nope.py", "no such file")
    prog = write(
        tmp_path / "p.abl",
        """
        (def region "eu")
        (do!! (log!! {:target (str region "-" (ctx :cluster)) :replicas (* 2 3)})
              (pmap!! [h (ctx :hosts)] (action!! :git/create-rep {:host h})))
    """,
    )
    tree = ablauf("check", prog, "--tree")
    assert tree.exit_code == 0
    lines = tree.stdout.splitlines()
    assert lines[0] == f"{prog}: ok (3 nodes)"
    # The run-time part is kept as source, the rest folded: (* 2 3) is 6.
    assert re.search(
        r"#1 action/log \{:target \(str .*\(ctx :cluster\)\),? :replicas 6\}", tree.stdout
    )
    assert "#2 pmap!! [h (ctx :hosts)]" in tree.stdout
    assert "git/create-rep {:host h}" in tree.stdout  # its body, ids given when expanded
    assert "unset" not in tree.stdout  # a program, not a run: no states
    unknown = ablauf("check", prog, "--actions", acts, "--json")
    assert unknown.exit_code == 2
    assert unknown.stderr == ""
    data = json.loads(unknown.stdout)
    assert data["ok"] is False
    (report,) = data["files"]
    assert report["actions"] == ["action/log", "git/create-rep"]
    assert report["errors"][0]["line"] == 4
    assert "; did you mean git/create-repo or " in report["errors"][0]["message"]
    good = json.loads(ablauf("check", prog, "--tree", "--json").stdout)
    assert good["ok"] is True
    nodes = good["files"][0]["tree"]
    assert [n["id"] for n in nodes] == [0, 1, 2]
    assert "(ctx :cluster)" in json.dumps(nodes[1]["payload"])
    assert "$expr" in json.dumps(nodes[1]["payload"])
    assert nodes[2]["template"][0]["action"] == "git/create-rep"
    broken = json.loads(ablauf("check", str(EXAMPLES / "broken.abl"), "--json").stdout)
    assert broken["files"][0]["errors"][0]["line"] == 7


def test_a_program_from_stdin(tmp_path: Path) -> None:
    runner = CliRunner()
    run = runner.invoke(cli, ["run", "-", "--json"], input='(log!! "piped")')
    assert run.exit_code == 0, run.output
    run_id = json.loads(run.stdout)["run_id"]
    listed = json.loads(ablauf("runs", "list", "--json").stdout)
    assert [(r["run_id"], r["filename"]) for r in listed] == [(run_id, "<stdin>")]
    checked = runner.invoke(cli, ["check", "-"], input="(do!! (log!! 1)\n (lgo!! 2))")
    assert checked.exit_code == 2
    assert checked.stderr.startswith("<stdin>:2:3: error: unknown form lgo!!")
    ok = runner.invoke(cli, ["check", "-", "--tree"], input="(log!! 1)")
    assert ok.stdout.startswith("<stdin>: ok (1 nodes)\n")


def test_a_branch_that_never_ran_is_shown_skipped(tmp_path: Path) -> None:
    run = ablauf("run", str(EXAMPLES / "hello.abl"), "--json")
    shown = ablauf("runs", "show", json.loads(run.stdout)["run_id"]).stdout
    assert "#8 rescue!!  skipped" in shown  # the body succeeded: the rescue never ran
    assert '#9 action/log "e"  skipped' in shown
    assert "#10 finally!!  success" in shown


def test_runs_show_json_tells_the_payload_sent_from_its_expression(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    run = ablauf_lang.eval(
        "(do!! (log!! (ctx :a)) (log!! 7) (try!! (log!! 1) (rescue!! (log!! 2))))",
        context={"a": 3},
        store=url,
    )
    shown = CliRunner().invoke(cli, ["runs", "show", run.run_id, "--store", url, "--json"])
    assert shown.exit_code == 0, shown.output
    nodes = {n["id"]: n for n in json.loads(shown.stdout)["nodes"]}
    assert (nodes[1]["payload"], nodes[1]["sent"]) == ({"$expr": "(ctx :a)"}, 3)
    assert (nodes[2]["payload"], nodes[2]["sent"]) == (7, None)  # a literal: sent as written
    assert nodes[1]["started_at"] is not None
    rescue = [n for n in nodes.values() if n.get("payload") == 2]
    assert [n["state"] for n in rescue] == ["skipped"]
    assert nodes[rescue[0]["id"] - 1]["state"] == "skipped"  # the rescue branch itself
