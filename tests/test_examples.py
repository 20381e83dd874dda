"""Every example in `examples/` runs through the `ablauf` command and does what it says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ablauf_lang import open_store
from ablauf_lang.cli import cli
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.states import state_of

EXAMPLES = Path(__file__).parent.parent / "examples"
ACTIONS = str(EXAMPLES / "actions.py")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    monkeypatch.setenv("ABLAUF_STORE", url)
    monkeypatch.setenv("ABLAUF_DEMO_DELAY", "0.02")
    return url


def run_example(name: str, store: str, *extra: str) -> tuple[dict[str, Any], Job]:
    """Run examples/NAME.abl through the CLI; return its JSON result and its stored job."""
    result = CliRunner().invoke(
        cli,
        ["run", str(EXAMPLES / f"{name}.abl"), "--actions", ACTIONS, "--json", *extra],
        prog_name="ablauf",
        catch_exceptions=False,
    )
    # stderr holds only what log!! said (one line per log!!), never an error
    assert all(line.startswith("log #") for line in result.stderr.splitlines()), result.stderr
    data = json.loads(result.stdout)
    assert result.exit_code == (0 if data["status"] == "success" else 1)
    backend = open_store(store)
    try:
        job = backend.load(data["run_id"]).job
    finally:
        backend.close()
    return data, job


def states(job: Job) -> dict[str, str]:
    """`action payload` -> state, for the leaves of a job."""
    return {f"{leaf.action} {leaf.payload}": state_of(leaf) for leaf in job.leaves()}


def leaf(job: Job, action: str) -> Any:
    (found,) = [n for n in job.leaves() if n.action == action]
    return found


BROKEN = EXAMPLES / "broken.abl"  # the one example with a mistake, shown in the docs


def test_every_example_checks() -> None:
    files = sorted(str(p) for p in EXAMPLES.glob("*.abl") if p != BROKEN)
    assert len(files) >= 5
    result = CliRunner().invoke(cli, ["check", *files], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count(": ok (") == len(files)
    # And every action an example names is defined by one of the examples' modules.
    modules = [ACTIONS, str(EXAMPLES / "language_actions.py")]
    for path in files:
        codes = [
            CliRunner().invoke(cli, ["check", path, "--actions", m]).exit_code for m in modules
        ]
        assert 0 in codes, path


def test_the_broken_example_is_what_the_docs_show() -> None:
    result = CliRunner().invoke(cli, ["check", str(BROKEN)], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"{BROKEN}:7:4: error: unknown form lgo!!; did you mean log!! or do!!?\n"
        '  (lgo!! "b"))\n'
        "   ^\n"
    )


def test_hello(store: str) -> None:
    data, job = run_example("hello", store)
    assert data["status"] == "success"
    assert states(job) == {
        "action/log a": "success",
        "action/log b": "success",
        "action/log c": "success",
        "action/log d": "success",
        "action/log e": "skipped",
        "action/log f": "success",
    }


def test_rescue(store: str) -> None:
    data, job = run_example("rescue", store)
    assert data["status"] == "success"  # the try recovered
    assert states(job) == {
        "action/log a": "success",
        "action/fail the disk is full": "failure",
        "action/log should-not-run": "unset",
        "action/log rescue": "success",
        "action/log finally": "success",
    }
    assert data["context"]["exec/last-error"] == "the disk is full"


def test_deploy(store: str) -> None:
    data, job = run_example("deploy", store)
    assert data["status"] == "success"
    dsn = data["context"]["sentry/dsn"]
    assert dsn.startswith("https://")
    assert "ingest.sentry.example" in dsn
    repo = leaf(job, "git/create-repo")
    ci, tracking = leaf(job, "ci/create-job"), leaf(job, "sentry/create-project")
    chat = leaf(job, "chat/post")
    assert repo.output["url"] == "https://git.example.com/acme/billing-api.git"
    # CI and error tracking were dispatched by the same restart, after the repository.
    assert ci.dispatched_at == tracking.dispatched_at >= repo.finished_at
    assert ci.idempotent
    # The chat message carries the DSN that with-augment put in the context.
    assert chat.dispatched_at >= max(ci.finished_at, tracking.finished_at)
    assert chat.output["text"].endswith(f"(errors go to {dsn})")
    assert chat.output["channel"] == "#deploys"


def test_migrate_fails_and_is_rescued(store: str) -> None:
    data, job = run_example("migrate", store)
    assert data["status"] == "success"
    migrate = leaf(job, "db/migrate")
    assert state_of(migrate) == "failure"
    assert migrate.error.startswith("RuntimeError: database orders is locked")
    restore = leaf(job, "db/restore")
    assert restore.output["because"] == migrate.error  # the rescue saw the error
    assert state_of(leaf(job, "chat/post")) == "success"
    assert leaf(job, "maintenance/unlock").output == {"service": "orders", "locked": False}
    assert states(job)["action/log migrated, should not be reached"] == "unset"


def test_order_context_flows_between_steps(store: str) -> None:
    data, job = run_example("order", store, "--context", '{"customer": "c-17"}')
    assert data["status"] == "success"
    ctx = data["context"]
    assert ctx["customer"] == "c-17"
    assert ctx["order"]["customer"] == "c-17"
    assert ctx["order"]["total"] == 24.0  # 2 tea at 6.50 and a mug at 11
    assert ctx["paid"] == 24.0  # [[:receipt :total] :paid]
    order_id = ctx["order"]["order-id"]
    assert ctx["shipping"]["tracking"].startswith("TRK")  # [:tracking [:shipping :tracking]]
    assert leaf(job, "shop/charge").output["receipt"]["order"] == order_id
    assert leaf(job, "shop/email-receipt").output["subject"] == f"Your order {order_id}: 24.00 EUR"
