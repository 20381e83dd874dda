"""Workflow tests: a stepping session recorded and replayed (`testing.session`), random
fault schedules against a program (`testing.faults`), with the planted bug found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ablauf_lang import api, values
from ablauf_lang.names import STDLIB_ACTIONS
from ablauf_lang.repl.stepper import Stepper
from ablauf_lang.testing.faults import check_faults_file, run_faults
from ablauf_lang.testing.outcome import TestFileError
from ablauf_lang.testing.runner import check_file
from ablauf_lang.testing.session import Recording, check_session, load_test
from tests.commands import ablauf
from tests.strategies import workflow_sources

DATA = Path(__file__).resolve().parent.parent / "examples" / "tests"
WORKFLOW = Path(__file__).resolve().parent / "data" / "workflow"
SAVED = WORKFLOW / "steps.abltest"  # these two are also collected by the plugin
SAVED_FAULTS = WORKFLOW / "charge-fixed-faults.abltest"
SOURCE = '(do!! (log!! "a") (dopar!! (log!! "b") (log!! "c")) (log!! "d"))'


def record(source: str, path: Path) -> Path:
    stepper = Stepper()
    stepper.start(api.make_job(api.compile(source, "t.abl"), {"x": 1}), "t.abl")
    rec = Recording(source, "t.abl", {"x": 1})
    while stepper.job is not None and not stepper.job.done:
        r = stepper.step()
        rec.add_step(r.fed, r.performed, r.dispatched, r.after, woke=r.woke, now=stepper.now())
    return rec.save(path)


def test_a_recorded_session_replays_and_an_edit_shows_the_first_difference(
    tmp_path: Path,
) -> None:
    saved = record(SOURCE, tmp_path / "t")
    assert saved.suffix == ".abltest"
    assert check_session(load_test(saved), str(saved)).passed
    data = load_test(saved)
    data["program"] = SOURCE.replace('"c"', '"C"')
    outcome = check_session(data, str(saved))
    assert not outcome.passed
    assert outcome.restart == 2
    assert outcome.diff is not None
    assert '! #4 :action/log "c" (line 1)' in outcome.diff
    assert '#4 :action/log "C" (line 1)' in outcome.diff


def test_the_planted_bug_is_found_replayed_and_gone_once_fixed(tmp_path: Path) -> None:
    buggy = (DATA / "payment.abl").read_text()
    for seed in (1, 2, 3, 4):
        report = run_faults(
            buggy, "charge.abl", 50, seed=seed, context={"order": 1}, out_dir=tmp_path
        )
        assert report.violation is not None
        assert ":pay/charge did its work twice" in report.violation.message
        assert report.written is not None
        data = load_test(report.written)
        assert not check_faults_file(data, report.written).passed
        data["program"] = (DATA / "payment-fixed.abl").read_text()
        assert check_faults_file(data, report.written).passed
    again = run_faults(buggy, "charge.abl", 50, seed=1, context={"order": 1}, out_dir=tmp_path)
    first = run_faults(buggy, "charge.abl", 50, seed=1, context={"order": 1}, out_dir=tmp_path)
    assert again.schedule == first.schedule  # a seed reproduces


def test_clean_programs_keep_every_invariant_over_200_schedules() -> None:
    root = Path(__file__).resolve().parent.parent
    for name in ("rescue", "migrate", "order", "approval", "hello"):
        source = (root / "examples" / f"{name}.abl").read_text()
        report = run_faults(source, f"{name}.abl", 200, seed=5)
        assert report.passed, report.violation
    fixed = (DATA / "payment-fixed.abl").read_text()
    assert run_faults(fixed, "charge-fixed.abl", 200, seed=5, context={"order": 1}).passed


# ---------------------------------------------------------------- `ablauf test` and pytest

ROOT = Path(__file__).resolve().parent.parent


def edited(saved: Path, target: Path) -> Path:
    data = json.loads(saved.read_text())
    data["program"] = data["program"].replace('"c"', '"C"')
    target.write_text(json.dumps(data))
    return target


def test_the_command_passes_a_session_fails_an_edit_with_the_diff_and_says_so_in_json(
    tmp_path: Path,
) -> None:
    saved = record(SOURCE, tmp_path / "good")
    out = ablauf("test", str(saved))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"ok     {saved} (t): 4 restarts replayed, ends success")
    assert out.stdout.rstrip().endswith("1 test: 1 passed")
    bad = edited(saved, tmp_path / "bad.abltest")
    out = ablauf("test", str(tmp_path))  # a directory: both files
    assert out.returncode == 1
    assert f"FAILED {bad} (t): restart 2: the dispatches differ" in out.stdout
    assert '! #4 :action/log "c" (line 1)' in out.stdout
    assert "2 tests: 1 passed, 1 failed" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    out = ablauf("test", "--json", str(bad), str(saved))
    assert out.returncode == 1
    data = json.loads(out.stdout)
    assert (data["passed"], data["failed"], data["broken"]) == (1, 1, 0)
    first = data["tests"][0]
    assert (first["path"], first["passed"], first["restart"]) == (str(bad), False, 2)
    assert "recorded" in first["diff"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON: Expecting property name enclosed in double quotes"),
        ('{"x": 1}', 'not an ablauf test file (no "ablauf-test" key)'),
        ('{"ablauf-test": 7, "kind": "session"}', "test file format 7 is not supported"),
        ('{"ablauf-test": 1, "kind": "movie"}', "unknown kind 'movie'"),
        ('{"ablauf-test": 1, "kind": "session", "program": "x"}', "missing steps, end"),
        (
            '{"ablauf-test": 1, "kind": "faults", "program": "(log!! 1)", "schedule": ["boom"]}',
            "the schedule must be a list of ok, fail, timeout, crash, crash-after",
        ),
    ],
)
def test_a_broken_test_file_exits_2_naming_what_is_wrong(
    tmp_path: Path, text: str, message: str
) -> None:
    broken = tmp_path / "b.abltest"
    broken.write_text(text)
    good = record(SOURCE, tmp_path / "good")
    out = ablauf("test", str(good), str(broken))
    assert out.returncode == 2
    assert f"BROKEN {broken}: {message}" in out.stderr
    assert f"ok     {good}" in out.stdout  # the other files still run
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nothing-here.abltest"], "nothing-here.abltest: no such file or directory"),
        (["examples/tests/payment.abl"], "is a program: test it with"),
        (["docs"], "no .abltest files in this directory"),
        (["--faults", "3", "x.abltest"], "x.abltest is a test file: --faults N runs programs"),
        (["--seed", "3", "x.abltest"], "--seed goes with --faults N"),
        (["--faults", "0", "x.abl"], "0 is not in the range x>=1"),
        (["--faults", "2", "missing.abl"], "missing.abl: no such file"),
    ],
)
def test_bad_usage_exits_2(args: list[str], message: str) -> None:
    out = ablauf("test", *args)
    assert out.returncode == 2, out.stdout
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_a_program_that_no_longer_compiles_fails_and_one_that_never_did_is_bad_input(
    tmp_path: Path,
) -> None:
    saved = record(SOURCE, tmp_path / "t")
    data = json.loads(saved.read_text())
    data["program"] = "(do!! (log!! 1)"
    saved.write_text(json.dumps(data))
    out = ablauf("test", str(saved))
    assert out.returncode == 1
    assert "the program no longer compiles" in out.stdout
    program = tmp_path / "bad.abl"
    program.write_text("(do!! (log!! 1)\n")
    out = ablauf("test", str(program), "--faults", "3")
    assert out.returncode == 2
    assert f"{program}:1:1: error:" in out.stderr
    assert "^" in out.stderr


def test_faults_from_the_command_line_find_the_planted_bug_and_write_a_test(
    tmp_path: Path,
) -> None:
    args = ["--faults", "60", "--seed", "2", "--context", '{"order": 1}', "--out", str(tmp_path)]
    out = ablauf("test", str(DATA / "payment.abl"), *args)
    assert out.returncode == 1, out.stdout + out.stderr
    assert (
        "broken: no non-idempotent action twice: non-idempotent :pay/charge did its" in out.stdout
    )
    written = tmp_path / "payment-faults-2.abltest"
    assert f"written: {written}" in out.stdout
    replay = ablauf("test", str(written))
    assert replay.returncode == 1
    assert "FAILED" in replay.stdout
    out = ablauf("test", str(DATA / "payment-fixed.abl"), *args, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["passed"] is True
    assert report["schedules"] == 60
    assert report["seed"] == 2
    assert sum(report["faults"].values()) > 60  # decisions drawn over the schedules


def pytest_in(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args, str(folder)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_pytest_collects_test_files_and_shows_the_diff(tmp_path: Path) -> None:
    good = record(SOURCE, tmp_path / "good")
    edited(good, tmp_path / "bad.abltest")
    (tmp_path / "broken.abltest").write_text("{")
    out = pytest_in(tmp_path, "-p", "no:cacheprovider")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "2 failed, 1 passed" in out.stdout
    assert "t: restart 2: the dispatches differ" in out.stdout
    assert '! #4 :action/log "c" (line 1)' in out.stdout
    assert "broken test file:" in out.stdout
    assert "not valid JSON" in out.stdout
    off = pytest_in(tmp_path, "-p", "no:cacheprovider", "-p", "no:ablauf")
    assert off.returncode == 5  # no tests collected without the plugin


def _mutations() -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=6,
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_damaged_file_either_fails_or_is_broken_never_an_internal_error(
    data: st.DataObject,
) -> None:
    root = json.loads(data.draw(st.sampled_from([SAVED, SAVED_FAULTS])).read_text())
    target: Any = root
    path: list[Any] = []
    while isinstance(target, (dict, list)) and target and data.draw(st.booleans()):
        key = data.draw(
            st.sampled_from(sorted(target) if isinstance(target, dict) else range(len(target)))
        )
        path.append(key)
        target = target[key]
    replacement = data.draw(_mutations())
    if not path:
        root = replacement
    else:
        holder = root
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = replacement
    with tempfile.TemporaryDirectory() as folder:
        damaged = Path(folder) / "d.abltest"
        damaged.write_text(json.dumps(root))
        error: str | None = None
        try:
            outcome = check_file(damaged)
        except TestFileError as exc:
            error = exc.message
        else:
            assert outcome.passed or outcome.message
        assert error is None or error.startswith(f"{damaged}: ")


def _copies(root: Any) -> bool:
    """Whether a non-idempotent action is in the tree twice with the same payload."""
    seen: set[str] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        stack.extend(getattr(node, "children", ()))
        action = getattr(node, "action", None)
        if action is None or node.idempotent or action in STDLIB_ACTIONS:
            continue
        key = f"{action} {json.dumps(values.encode(node.payload), sort_keys=True, default=str)}"
        if key in seen:
            return True
        seen.add(key)
    return False


@settings(max_examples=120, deadline=None)
@given(source=workflow_sources, seed=st.integers(0, 2**32 - 1))
# A finally!! whose only leaves are a rescue!! nothing needed ran (found by CI, 2026-12-03).
@example(source="(try!! (log!! 0) (finally!! (try!!  (rescue!! (log!! 0)))))", seed=0)
def test_random_programs_end_run_their_finally_and_do_work_twice_only_when_copied(
    source: str, seed: int
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        report = run_faults(source, "random.abl", 25, seed=seed, out_dir=folder)
    if report.violation is None:
        return
    assert report.violation.invariant == "no non-idempotent action twice", (
        source,
        report.schedule,
        report.violation,
    )
    assert _copies(api.compile(source, "random.abl")), (source, report.violation)
