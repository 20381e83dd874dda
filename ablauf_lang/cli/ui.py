"""`ablauf ui`: the web dashboard of a store."""

from __future__ import annotations

import click

from ablauf_lang.cli.common import UserError, actions_option, store_option, store_url
from ablauf_lang.errors import AblaufError


@click.command("ui")
@store_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="The address to listen on; one other than loopback needs --public.",
)
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=8765,
    show_default=True,
    help="The port to listen on (0: any free one).",
)
@click.option(
    "--public",
    is_flag=True,
    help="Allow an address other than 127.0.0.1, localhost or ::1 (a warning is printed): "
    "whoever reaches it can act on the runs.",
)
@click.option("--open", "open_browser", is_flag=True, help="Open the dashboard in a browser.")
@actions_option
def ui(
    store: str | None,
    host: str,
    port: int,
    public: bool,
    open_browser: bool,
    actions: str | None,
) -> None:
    """Open the web dashboard: the runs, each run drawn live, retry, resume, abort, signal.

    Retry and resume run the run in this server with --actions (on a PostgreSQL store
    they hand it back to the workers). Ctrl-C stops the server.

        ablauf ui --open
    """
    from ablauf_lang import api
    from ablauf_lang.web.serve import serve

    try:
        registry = api.load_actions(actions)
        serve(store_url(store), host, port, public, open_browser, actions=registry)
    except AblaufError as exc:
        raise UserError(exc) from None
