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

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

import ablauf_lang
from ablauf_lang import open_store
from ablauf_lang.cli import LiveProgress, cli
from ablauf_lang.job import make_job, restart_job
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
    assert plain.stderr == ""  # piped: no progress


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
        from ablauf_lang.actions_registry import action

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
    assert by_map.exit_code == 1  # math/inc is not in that module
    assert json.loads(by_map.stdout)["context"]["n"] == 42
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
    result = ablauf("submit", bad, "--store", "memory:")
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
    job, _ = restart_job(job, [ablauf_lang.success(dispatches[0], "a")], 2.0)
    progress.on_restart(job, [], [ablauf_lang.success(dispatches[0], "a")])
    console.print(progress)
    out = buf.getvalue()
    assert out.splitlines()[0].startswith("demo.abl  pending  0.")
    assert "running 1  finished 1" in out
    assert re.search(r'#1 action/log "a"  success \S+ → "a"', out)  # \S+: its duration
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
        assert done.stderr == ""
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
    during = tmux.wait_for("#3 action/sleep 1.5  pending")
    assert "p.abl  pending" in during
    assert '#4 action/log "beside"  success' in during
    after = tmux.wait_for("EXIT=0")
    assert '#5 action/log "end"  success' in after
    assert "success  run " in after
