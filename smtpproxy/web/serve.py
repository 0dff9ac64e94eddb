"""``smtpproxy web``: build the app from the configuration and serve it with uvicorn."""

from __future__ import annotations

import asyncio
import signal
import sys

import uvicorn

from smtpproxy.config import Config
from smtpproxy.eventlog import event
from smtpproxy.history import node_name
from smtpproxy.links import LinkSigner, read_keys
from smtpproxy.store import store_from_config
from smtpproxy.store.quarantine import DatabaseQuarantine
from smtpproxy.web.app import create_app
from smtpproxy.web.context import WebContext

__all__ = ["make_context", "make_server", "web_command"]


class WebConfigError(Exception):
    """The configuration lacks what the web app needs."""


def make_context(config: Config) -> WebContext:
    from smtpproxy.delivery.factory import make_delivery

    store = store_from_config(config)
    if store is None:
        raise WebConfigError("smtpproxy web needs a store (store.sqlite or store.postgresql)")
    if not config.digest.keys:
        raise WebConfigError("smtpproxy web needs digest.keys (the keys its links are signed with)")
    try:
        signer = LinkSigner(read_keys(config.digest.keys))
    except (OSError, ValueError) as exc:
        raise WebConfigError(f"digest.keys: {exc}") from exc
    quarantine = DatabaseQuarantine(store, node=node_name(config),
                                    retention_days=config.quarantine.retention_days,
                                    admin_only=config.quarantine.admin_only)
    return WebContext(config, store, quarantine, signer, make_delivery(config))


def make_server(config: Config, *, port: int | None = None) -> uvicorn.Server:
    """A uvicorn Server for the app (``await server.serve()`` runs it)."""
    app = create_app(make_context(config))
    settings = uvicorn.Config(
        app, host=config.digest.address, port=config.digest.port if port is None else port,
        log_config=None, access_log=False, server_header=False, proxy_headers=False, lifespan="on",
    )
    return uvicorn.Server(settings)


def web_command(config: Config) -> int:
    try:
        server = make_server(config)
    except WebConfigError as exc:
        print(f"smtpproxy: {exc}", file=sys.stderr)
        return 2
    event("web_listening", address=config.digest.address, port=config.digest.port)
    # uvicorn stops gracefully on SIGTERM/SIGINT, then re-raises the signal into the handlers it
    # found: a no-op one makes the stop an exit 0, as for the proxy itself.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    asyncio.run(server.serve())
    event("shutdown", web=True)
    return 0
