"""Run the dashboard with uvicorn: on a loopback address unless told otherwise."""

from __future__ import annotations

import ipaddress
import socket
import threading
import webbrowser
from collections.abc import Mapping
from typing import Any

import click

from ablauf_lang import api
from ablauf_lang.errors import AblaufError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 8765
GRACE = 2  # seconds open connections get to close when the server stops


def is_loopback(host: str) -> bool:
    """True for 127.0.0.1, localhost, ::1 (and any 127.x address)."""
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, public: bool) -> None:
    """AblaufError for an address other than loopback without `public`."""
    if not host:
        raise AblaufError("--host needs an address (127.0.0.1, ::1, 0.0.0.0 ...)")
    if not public and not is_loopback(host):
        raise AblaufError(
            f"--host {host} would let other machines reach the dashboard (and act on the "
            "runs): add --public if that is what you want"
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket at host:port; AblaufError (one line) when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AblaufError(f"cannot use --host {host}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise AblaufError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def page_url(host: str, port: int) -> str:
    """The dashboard's address in a browser."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if host in ("0.0.0.0", "::", "[::]"):
        shown = "127.0.0.1"
    return f"http://{shown}:{port}/"


def serve(
    store_url: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    public: bool = False,
    open_browser: bool = False,
    *,
    actions: Mapping[str, api.Action] | None = None,
) -> None:
    """Serve the dashboard of `store_url` until Ctrl-C (or SIGTERM). AblaufError for an
    address that is not loopback without `public`, a port that cannot be had, or a
    store that cannot be opened."""
    import uvicorn

    from ablauf_lang.web.app import create_app

    check_host(host, public)
    with api.opened(store_url) as backend:  # a bad URL or a damaged store: said now
        backend.count_runs()
    sock = bind(host, port)
    port = sock.getsockname()[1]
    url = page_url(host, port)
    if public and not is_loopback(host):
        click.echo(
            f"ablauf ui: warning: listening on {host}:{port}, reachable from other machines; "
            "anyone who reaches it can see the runs and act on them",
            err=True,
        )
    click.echo(f"ablauf ui: {url} (store {store_url}; Ctrl-C stops)", err=True)
    app = create_app(store_url, actions=actions, public=public)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACE,  # open event streams do not hold Ctrl-C up
    )
    server = uvicorn.Server(config)
    if open_browser:
        _open_later(url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _open_later(url: str) -> None:
    def go() -> Any:
        try:
            webbrowser.open(url)
        except webbrowser.Error:
            click.echo(f"ablauf ui: could not open a browser: open {url}", err=True)

    timer = threading.Timer(0.5, go)
    timer.daemon = True
    timer.start()
