"""``smtpproxy web``: build the app from the configuration and serve it with uvicorn."""

from __future__ import annotations

import hashlib
import hmac
import signal
import socket
import sys

import uvicorn

from smtpproxy import eventloop
from smtpproxy.auth import PasswordFileError
from smtpproxy.config import Config
from smtpproxy.eventlog import event
from smtpproxy.health import front_end_port, open_front_end_health
from smtpproxy.history import node_name
from smtpproxy.links import LinkSigner, read_keys
from smtpproxy.loginthrottle import LoginThrottle, RedisStore
from smtpproxy.metrics import MetricsUnavailable, web_recorder
from smtpproxy.sdnotify import notify, ready
from smtpproxy.startup import StartupError, cannot_start
from smtpproxy.store import store_from_config
from smtpproxy.store.quarantine import DatabaseQuarantine
from smtpproxy.tables import build_tables
from smtpproxy.web.accounts import Accounts, TableAccounts
from smtpproxy.web.app import create_app
from smtpproxy.web.context import WebContext
from smtpproxy.web.directory import DirectoryAccounts
from smtpproxy.web.listtables import list_tables, lists_plugin_tables
from smtpproxy.web.sessions import SessionTable

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
        keys = read_keys(config.digest.keys)
        signer = LinkSigner(keys)
    except (OSError, ValueError) as exc:
        raise WebConfigError(f"digest.keys: {exc}") from exc
    quarantine = DatabaseQuarantine(store, node=node_name(config),
                                    retention_days=config.quarantine.retention_days,
                                    admin_only=config.quarantine.admin_only)
    context = WebContext(config, store, quarantine, signer, make_delivery(config))
    context.tables = build_tables({name: config.tables[name] for name in _table_names(config)})
    context.lists = list_tables(config, context.tables)
    console = config.console
    if console.users is not None:
        try:
            context.accounts = Accounts.load(console.users)
        except PasswordFileError as exc:
            raise WebConfigError(f"console.users: {exc}") from exc
    elif console.accounts == "ldap" and console.ldap is not None:
        context.accounts = DirectoryAccounts(console.ldap)
    elif console.accounts is not None:
        context.accounts = TableAccounts(context.tables[console.accounts.removeprefix("table:")])
    if context.accounts is not None:
        context.throttle = _throttle(config)
        # The session cookie's key, derived from the link key so there is one secret to keep.
        context.session_secret = hmac.new(keys[0], b"smtpproxy.console.session.v1",
                                          hashlib.sha256).hexdigest()
        context.sessions = SessionTable(lifetime=console.session_hours * 3600,
                                        idle=console.idle_minutes * 60)
    return context


def _table_names(config: Config) -> set[str]:
    """The tables the web app uses: the lists plugin's and a console accounts table."""
    names = set(lists_plugin_tables(config).values())
    if config.console.accounts is not None and config.console.accounts.startswith("table:"):
        names.add(config.console.accounts.removeprefix("table:"))
    return names


def _throttle(config: Config) -> LoginThrottle | None:
    """The console's login throttle: login_throttle's settings (and Redis), as for SMTP AUTH."""
    from smtpproxy.server import throttle_settings

    section = config.login_throttle
    if not section.enabled:
        return None
    store = None if section.redis_url is None else RedisStore(section.redis_url, section.redis_timeout)
    return LoginThrottle(throttle_settings(section), store)


class _Server(uvicorn.Server):
    """uvicorn's server, telling systemd (``Type=notify``) when it listens and when it stops,
    as the proxy, the milter and the policy service do."""

    context: WebContext

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        notify("STOPPING=1")
        await super().shutdown(sockets=sockets)


def make_server(config: Config, *, port: int | None = None) -> _Server:
    """A uvicorn Server for the app (``await server.serve()`` runs it)."""
    context = make_context(config)
    app = create_app(context)
    settings = uvicorn.Config(
        app, host=config.digest.address, port=config.digest.port if port is None else port,
        log_config=None, access_log=False, server_header=False, lifespan="on",
        # X-Forwarded-For/-Proto believed from console.proxies only (the throttle counts clients).
        proxy_headers=bool(config.console.proxies),
        forwarded_allow_ips=[str(p) for p in config.console.proxies] or None,
    )
    server = _Server(settings)
    server.context = context
    return server


async def _serve(server: _Server, config: Config) -> None:
    """uvicorn, and with ``metrics.web_port`` the metrics endpoint beside it: the console's
    login throttle (password spraying at the console's sign-in) and the process."""
    try:
        recorder = web_recorder(front_end_port(config.metrics, "web") is not None)
    except MetricsUnavailable as exc:
        raise StartupError(str(exc)) from exc
    if server.context.throttle is not None:
        server.context.throttle.metrics = recorder
    health = await open_front_end_health(config.metrics, "web", lambda: server.should_exit, recorder)
    try:
        await server.serve()
    finally:
        if health is not None:
            await health.close()


def web_command(config: Config) -> int:
    try:
        server = make_server(config)
    except WebConfigError as exc:
        print(f"smtpproxy: {exc}", file=sys.stderr)
        return 2
    event("web_listening", address=config.digest.address, port=config.digest.port,
          console=config.console.enabled)
    # uvicorn stops gracefully on SIGTERM/SIGINT, then re-raises the signal into the handlers it
    # found: a no-op one makes the stop an exit 0, as for the proxy itself.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        eventloop.run(_serve(server, config), "asyncio")  # with systemd's watchdog fed, as every front end
    except StartupError as exc:
        cannot_start(exc)
        return 1
    event("shutdown", web=True)
    return 0
