"""Demo actions for the language examples (`fanout.abl`, `branch.abl`).

    ablauf run examples/fanout.abl --actions examples/language_actions.py \\
        --context '{"service": "billing", "version": "1.4.2", "hosts": ["web-1", "web-2"]}'

Nothing here talks to a real service: outputs are made up but deterministic, so the
tests can check them. A host whose name starts with "down-" refuses every deployment; a
repository whose name contains "broken" has failing tests. Set ABLAUF_DEMO_DELAY
(seconds, default 0.05) to make the actions slower or instant.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from ablauf_lang import action


def _pause(scale: float = 1.0) -> None:
    time.sleep(float(os.environ.get("ABLAUF_DEMO_DELAY", "0.05")) * scale)


def _token(*parts: Any, size: int = 8) -> str:
    """A stable made-up identifier derived from the inputs."""
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:size]


# ---------------------------------------------------------------- fanout.abl


@action("build/artifact")
def build_artifact(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Build the service's image once; every host installs the same one."""
    _pause(2)
    service, version = payload["service"], payload["version"]
    return {
        "image": f"registry.example.com/{service}:{version}",
        "digest": "sha256:" + _token(service, version, size=16),
    }


@action("deploy/host")
def deploy_host(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Install an image on one host (idempotent: installing it twice changes nothing)."""
    _pause()
    host = payload["host"]
    if host.startswith("down-"):
        raise ConnectionError(f"{host} does not answer")
    return {"host": host, "image": payload["artifact"], "status": "running"}


@action("health/check")
def health_check(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Ask one host whether the service answers."""
    _pause(0.5)
    return {"host": payload["host"], "service": payload["service"], "healthy": True}


# ---------------------------------------------------------------- branch.abl


@action("ci/run-tests")
def run_tests(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Run the test suite of a repository at a commit; report what passed and failed."""
    _pause(2)
    repo = payload["repo"]
    failures = ["test_refund_rounding", "test_invoice_totals"] if "broken" in repo else []
    return {
        "commit": payload.get("commit", "HEAD"),
        "passed": 412 - len(failures),
        "failed": len(failures),
        "skipped": 3,
        "failures": failures,
    }


@action("release/tag")
def tag_release(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Tag a release in the repository."""
    _pause()
    tag = "v" + payload["version"]
    return {"repo": payload["repo"], "tag": tag, "url": f"https://git.example.com/{tag}"}


@action("issues/open")
def open_issue(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Open an issue in the repository's tracker."""
    _pause()
    number = int(_token(payload["repo"], payload["title"], size=4), 16) % 1000
    return {"number": number, "url": f"https://git.example.com/{payload['repo']}/issues/{number}"}


# ---------------------------------------------------------------- both


@action("chat/post")
def post_message(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Post a chat message."""
    _pause(0.5)
    return {"channel": payload["channel"], "text": payload["text"]}
