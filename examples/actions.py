"""Demo actions for the examples: each waits briefly and returns a realistic output.

    ablauf run examples/deploy.abl --actions examples/actions.py

Actions are plain functions `fn(payload, context)`, sync or `async def`; the return value
is the step's output, an exception fails the step. Nothing here talks to a real service:
outputs are made up, but deterministic, so the examples' tests can check them.
Set ABLAUF_DEMO_DELAY (seconds, default 0.1) to make them slower or instant.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

from ablauf_lang import action


def _delay(scale: float = 1.0) -> float:
    return float(os.environ.get("ABLAUF_DEMO_DELAY", "0.1")) * scale


def _token(*parts: Any, size: int = 8) -> str:
    """A stable made-up identifier derived from the inputs."""
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:size]


# ---------------------------------------------------------------- deploy.abl


@action("git/create-repo")
def create_repo(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Create a git repository (a sync action: runs in a worker thread)."""
    time.sleep(_delay())
    org, name = payload["org"], payload["name"]
    return {
        "url": f"https://git.example.com/{org}/{name}.git",
        "default-branch": "main",
        "private": bool(payload.get("private")),
    }


@action("ci/create-job")
async def create_ci_job(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Create a CI pipeline for the repository (an async action)."""
    await asyncio.sleep(_delay(1.5))
    repo = payload["repo"]
    job_id = "ci-" + _token(repo)
    return {
        "job-id": job_id,
        "url": f"https://ci.example.com/{repo}/jobs/{job_id}",
        "stages": list(payload.get("pipeline", [])),
    }


@action("sentry/create-project")
async def create_tracking_project(
    payload: dict[str, Any], context: dict[str, Any]
) -> dict[str, Any]:
    """Create an error-tracking project; its DSN is what the service reports errors to."""
    await asyncio.sleep(_delay())
    name = payload["name"]
    key = _token("dsn", name, size=16)
    return {
        "slug": name,
        "platform": payload.get("platform"),
        "dsn": f"https://{key}@o4711.ingest.sentry.example/{int(key[:4], 16)}",
    }


@action("chat/post")
def post_message(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Post a chat message; mentions the tracking DSN when the context has one."""
    time.sleep(_delay(0.5))
    text = payload["text"]
    dsn = context.get("sentry/dsn")
    if dsn:
        text = f"{text} (errors go to {dsn})"
    return {"channel": payload["channel"], "text": text, "ts": "1718000000." + _token(text, 6)}


# ---------------------------------------------------------------- migrate.abl


@action("db/backup")
def backup(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    time.sleep(_delay())
    return {"backup-id": f"{payload['database']}-{_token('backup', payload['database'])}"}


@action("maintenance/lock")
def lock(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    time.sleep(_delay(0.2))
    return {"service": payload["service"], "locked": True}


@action("db/migrate")
def migrate(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Always fails: the demo database is locked by another session."""
    time.sleep(_delay())
    raise RuntimeError(
        f"database {payload['database']} is locked by another session "
        f"(wanted version {payload.get('to-version')})"
    )


@action("db/restore")
def restore(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Restore the backup; the rescue sees the failure in `exec/last-error`."""
    time.sleep(_delay())
    return {"database": payload["database"], "because": context.get("exec/last-error")}


@action("maintenance/unlock")
def unlock(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    time.sleep(_delay(0.2))
    return {"service": payload["service"], "locked": False}


# ---------------------------------------------------------------- order.abl

_PRICES = {"tea": 6.5, "mug": 11.0}


@action("shop/create-order")
def create_order(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Create an order for the customer the initial context names."""
    time.sleep(_delay(0.5))
    items = payload["items"]
    customer = context.get("customer", "guest")
    total = sum(_PRICES[item["sku"]] * item["qty"] for item in items)
    return {
        "order-id": "ord-" + _token(customer, items, size=6),
        "customer": customer,
        "total": total,
    }


@action("shop/charge")
def charge(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Charge the order a previous step put in the context."""
    time.sleep(_delay(0.5))
    order = context["order"]
    return {
        "receipt": {
            "order": order["order-id"],
            "total": order["total"],
            "currency": payload["currency"],
        }
    }


@action("shop/ship")
async def ship(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(_delay())
    order_id = context["order"]["order-id"]
    return {
        "carrier": payload["carrier"],
        "order": order_id,
        "tracking": "TRK" + _token("ship", order_id, size=10).upper(),
    }


@action("shop/email-receipt")
async def email_receipt(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(_delay(0.5))
    order = context["order"]
    return {
        "to": order["customer"],
        "subject": f"Your order {order['order-id']}: {context['paid']:.2f} EUR",
    }


# ---------------------------------------------------------------- approval.abl

_ATTEMPTS: dict[str, int] = {}  # smoke tests so far, by service (this process)


@action("build/compile")
def compile_service(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Build an artifact for the service's version."""
    time.sleep(_delay(0.5))
    service, version = payload["service"], payload["version"]
    return {"artifact": f"{service}-{version}-{_token('build', service, version)}.tar.gz"}


@action("test/smoke")
def smoke_test(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """A flaky check: fails the first `fail-times` calls for a service, then passes."""
    time.sleep(_delay(0.2))
    service = payload["service"]
    _ATTEMPTS[service] = _ATTEMPTS.get(service, 0) + 1
    if _ATTEMPTS[service] <= int(payload.get("fail-times", 0)):
        raise ConnectionError(
            f"smoke test of {service}: connection reset (try {_ATTEMPTS[service]})"
        )
    return {"service": service, "passed": True, "tries": _ATTEMPTS[service]}


@action("deploy/rollout")
async def rollout(payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Roll the artifact out; says who approved it."""
    await asyncio.sleep(_delay())
    approval = context.get("approval") or {}
    return {
        "service": payload["service"],
        "artifact": payload["artifact"],
        "approved-by": approval.get("by"),
    }
