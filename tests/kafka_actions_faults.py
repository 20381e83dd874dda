"""Actions for the Kafka fault tests (`--actions tests.kafka_actions_faults`): each leaves
one line in the effects file `$ABLAUF_FAULTS_EFFECTS`, so the tests count what really ran.

A line is `KIND N PID`: one `os.write` to a file opened with O_APPEND, so lines of many
processes never mix and a line is there or not (a worker killed mid-action writes none).

    faults/effect   the non-idempotent one: sleeps `:before`, writes `effect N`, sleeps `:after`
    faults/idem     the same, idempotent in the programs (`idempotent-action!!`): `idem N`
"""

from __future__ import annotations

import os
import time
from typing import Any

EFFECTS_VAR = "ABLAUF_FAULTS_EFFECTS"


def _write(kind: str, n: Any) -> None:
    line = f"{kind} {n} {os.getpid()}\n".encode()
    fd = os.open(os.environ[EFFECTS_VAR], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _act(kind: str, payload: Any) -> Any:
    if payload.get("before"):
        time.sleep(float(payload["before"]))
    _write(kind, payload["n"])
    if payload.get("after"):
        time.sleep(float(payload["after"]))
    return payload["n"]


def effect(payload: Any, context: Any) -> Any:
    """The non-idempotent effect: one `effect N` line (between the two sleeps)."""
    return _act("effect", payload)


def idem(payload: Any, context: Any) -> Any:
    """The idempotent effect: one `idem N` line per performance."""
    return _act("idem", payload)


def read_effects(path: str) -> dict[tuple[str, int], list[int]]:
    """(kind, n) -> the pids that performed it, in order, from an effects file."""
    out: dict[tuple[str, int], list[int]] = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            kind, n, pid = line.split()
            out.setdefault((kind, int(n)), []).append(int(pid))
    return out


ACTIONS = {"faults/effect": effect, "faults/idem": idem}
