"""Workflow tests: a stepping session recorded and replayed (`testing.session`), random
fault schedules against a program (`testing.faults`), with the planted bug found."""

from __future__ import annotations

from pathlib import Path

from ablauf_lang import api
from ablauf_lang.repl.stepper import Stepper
from ablauf_lang.testing.faults import check_faults_file, run_faults
from ablauf_lang.testing.session import Recording, check_session, load_test

DATA = Path(__file__).resolve().parent / "data" / "faults"
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
    buggy = (DATA / "charge.abl").read_text()
    for seed in (1, 2, 3, 4):
        report = run_faults(
            buggy, "charge.abl", 50, seed=seed, context={"order": 1}, out_dir=tmp_path
        )
        assert report.violation is not None
        assert ":pay/charge did its work twice" in report.violation.message
        assert report.written is not None
        data = load_test(report.written)
        assert not check_faults_file(data, report.written).passed
        data["program"] = (DATA / "charge-fixed.abl").read_text()
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
    fixed = (DATA / "charge-fixed.abl").read_text()
    assert run_faults(fixed, "charge-fixed.abl", 200, seed=5, context={"order": 1}).passed
