"""A throwaway PostgreSQL server for tests and benchmarks, and the pytest fixtures using it.

`PgServer` runs `initdb` and `pg_ctl` from the machine's PostgreSQL in a temporary
directory, listening on a unix socket in that directory and on a free TCP port of
127.0.0.1 only. initdb refuses to run as root, so as root (CI) the server runs as the
unprivileged `postgres` system user. `scripts/ensure-test-tools.sh` installs the binaries.

Fixtures (loaded with `pytest_plugins = ["tests.pg"]`):

- `pg_server`: one server per test session, stopped at the end;
- `pg_url`: a fresh, empty database on it for each test (its URL).

Without PostgreSQL the tests fail when `CI` is set, and are skipped (saying why) elsewhere.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

SERVER_USER = "postgres"


class PgUnavailable(Exception):
    """No PostgreSQL server binaries on this machine, or no user to run them as."""


def find_bindir() -> str:
    """The directory holding initdb and pg_ctl (the newest installed version)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if candidates:
        return os.path.dirname(candidates[-1])
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    raise PgUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: run scripts/ensure-test-tools.sh"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One PostgreSQL server in a temporary directory; `start()`, then `stop()`."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.root = tempfile.mkdtemp(prefix="ablauf-pg-")
        self.data = os.path.join(self.root, "data")
        self.sockets = os.path.join(self.root, "run")
        self.logfile = os.path.join(self.root, "server.log")
        self.port = 0
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PgUnavailable(
                    f"running as root and there is no {SERVER_USER!r} user to run the "
                    "server as (initdb refuses root)"
                ) from None
            self.user = SERVER_USER
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.makedirs(self.sockets, exist_ok=True)
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.sockets, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str) -> None:
        kw: dict[str, Any] = {}
        if self.user is not None:
            kw = {"user": self.user, "group": pwd.getpwnam(self.user).pw_gid}
        proc = subprocess.run(
            [os.path.join(self.bindir, args[0]), *args[1:]],
            capture_output=True,
            text=True,
            cwd=self.root,
            check=False,
            **kw,
        )
        if proc.returncode != 0:
            log = ""
            if os.path.exists(self.logfile):
                with open(self.logfile) as f:
                    log = f.read()[-2000:]
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr}{log}")

    def start(self) -> PgServer:
        """initdb, then start the server on a free port; wait until it accepts connections."""
        self._run(
            "initdb",
            "-D",
            self.data,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        for attempt in range(5):
            self.port = _free_port()
            try:
                self._run(
                    "pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "-t", "60",
                    "-o", self._options(), "start",
                )  # fmt: skip
                return self
            except RuntimeError:
                if attempt == 4:
                    raise
        return self

    def _options(self) -> str:
        return (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200 -c shared_buffers=64MB"
        )

    def restart(self, down: float = 0.0) -> None:
        """Stop the server at once (every connection is cut), stay down `down` seconds,
        and start it again on the same port."""
        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        time.sleep(down)
        self._run(
            "pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "-t", "60",
            "-o", self._options(), "start",
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server at once and remove its directory."""
        with contextlib.suppress(RuntimeError):
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        """A TCP URL for a database of this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database; return its URL."""
        import psycopg

        name = name or "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


class CutAfterCommit:
    """A TCP proxy in front of a server that can cut a connection just after the server
    answered a COMMIT, before the answer reaches the client: the transaction committed,
    and the client cannot know it (what a network cut or a crash at that moment does).

        proxy = CutAfterCommit(server.port); url = proxy.url("dbname")
        proxy.arm()   # the next COMMIT that goes through is cut after its answer
    """

    def __init__(self, port: int) -> None:
        import threading

        self.target = port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        self.armed = threading.Event()
        self.cuts = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}?sslmode=disable"

    def arm(self) -> None:
        self.armed.set()

    def close(self) -> None:
        self.closed = True
        self.listener.close()

    def _accept(self) -> None:
        import threading

        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            state = {"cut": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, state: dict[str, bool]) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if b"COMMIT" in data and self.armed.is_set():
                    self.armed.clear()
                    state["cut"] = True
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.close()

    def _down(self, server: socket.socket, client: socket.socket, state: dict[str, bool]) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if state["cut"]:  # the answer to the COMMIT: never delivered
                    self.cuts += 1
                    break
                client.sendall(data)
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def wait_for(predicate: Any, timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll `predicate()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


# ---------------------------------------------------------------- pytest fixtures

try:
    import pytest
except ImportError:  # the benchmark imports this module without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def pg_server() -> Iterator[PgServer]:
        """One throwaway PostgreSQL server for the whole test session."""
        try:
            server = PgServer()
        except PgUnavailable as exc:
            if os.environ.get("CI"):
                pytest.fail(f"PostgreSQL is required in CI: {exc}", pytrace=False)
            pytest.skip(f"PostgreSQL not available: {exc}")
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
        try:
            yield server
        finally:
            server.stop()

    @pytest.fixture
    def pg_url(pg_server: PgServer) -> str:
        """The URL of a fresh, empty database for one test."""
        return pg_server.create_database()
