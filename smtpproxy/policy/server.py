"""The policy listener: ``inet:host:port`` or ``unix:/path``, one task per Postfix connection.

Postfix keeps a connection open for many requests and many SMTP sessions
(``smtpd_policy_service_max_idle``, ``…_max_ttl``). A request that breaks the protocol or a
limit (see :mod:`smtpproxy.policy.protocol`), or a client silent past ``policy.timeout``,
ends its connection with one log line; Postfix then retries or applies
``smtpd_policy_service_default_action``. Other connections are not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal

from smtpproxy import __version__
from smtpproxy.chain import Chain
from smtpproxy.config import Config, ConfigSource
from smtpproxy.config.listen import parse_listen
from smtpproxy.eventlog import current_session, event
from smtpproxy.health import HealthServer, front_end_port, open_front_end_health
from smtpproxy.history import HistoryRecorder, node_name
from smtpproxy.metrics import MetricsUnavailable, NullRecorder, front_end_recorder
from smtpproxy.networks import peer_in_networks, shut_out_warning
from smtpproxy.policy.applicability import message_plugins
from smtpproxy.policy.protocol import Limits, PolicyProtocolError, format_action, read_request
from smtpproxy.policy.service import PolicyService, PolicySettings
from smtpproxy.registry import build_chain
from smtpproxy.sdnotify import notify, ready
from smtpproxy.startup import StartupError, start_chain
from smtpproxy.store import store_from_config
from smtpproxy.tables import build_tables, install
from smtpproxy.unixsocket import clear_stale_socket, remove_socket
from smtpproxy.versions import LOG_FORMAT_VERSION

__all__ = ["PolicyServer"]


class PolicyServer:
    """One policy process: the plugin chain behind one listening socket."""

    def __init__(self, config: Config, source: ConfigSource | None = None, *,
                 chain: Chain | None = None) -> None:
        self.config = config
        self.settings = config.policy
        self.chain = (chain if chain is not None
                      else build_chain(config.plugins, source, plugin_paths=config.plugin_paths,
                                       table_names=config.tables, policies=config.policies))
        self.listen = parse_listen(self.settings.listen)
        self.message_plugins = message_plugins(self.chain)
        self.limits = Limits(self.settings.max_line, self.settings.max_attributes,
                             self.settings.max_request)
        self.tables = build_tables(config.tables)  # read once, as the milter (no reload)
        install(self.tables)
        self.store = store_from_config(config)
        history = None
        if self.store is not None and config.history.enabled:
            h = config.history
            history = HistoryRecorder(self.store, batch_size=h.batch_size, queue_limit=h.queue_limit,
                                      flush_interval=h.flush_interval, timeout=config.store.timeout)
        self.service = PolicyService(self.chain, PolicySettings(
            default_action=self.settings.default_action,
            quarantine_action=self.settings.quarantine_action,
            max_instances=self.settings.max_instances,
            instance_timeout=self.settings.instance_timeout,
            max_recipients=config.limits.max_recipients,
            history=history, node=node_name(config),
        ))
        self._history = history
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.metrics = NullRecorder()
        """Counts sessions, refusals, plugin verdicts and messages (``metrics.enabled``)."""
        self.health: HealthServer | None = None
        """/metrics, /healthz and /readyz, with ``metrics.enabled``."""

    @property
    def address(self) -> tuple[str, int] | str:
        """The bound TCP (host, port) (port 0 picks a free one) or the socket's path."""
        if self.listen.path:
            return self.listen.path
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        if self.message_plugins:
            if self.settings.message_plugins == "refuse" and self.message_plugins.only_message:
                raise StartupError(f"policy.message_plugins is refuse and plugins need the message: "
                                   f"{self.message_plugins.describe()}")
            event("policy_message_plugins", level=logging.WARNING,
                  only_message=list(self.message_plugins.only_message),
                  partly=list(self.message_plugins.partly),
                  note="Postfix's policy protocol carries no message: their data hook does not run")
        try:
            self.metrics = front_end_recorder(front_end_port(self.config.metrics, "policy") is not None,
                                              self.chain, lambda: len(self._connections))
        except MetricsUnavailable as exc:
            raise StartupError(str(exc)) from exc
        self.service.settings = dataclasses.replace(self.service.settings, metrics=self.metrics)
        await start_chain(self.chain, self.config.dns)
        if self._history is not None:
            self._history.metrics = self.metrics
            self._history.start()
        limit = self.limits.max_line + 2  # the LF (and a CR) beyond the longest line
        try:
            if self.listen.path:
                clear_stale_socket(self.listen.path)
                self._server = await asyncio.start_unix_server(
                    self._serve, path=self.listen.path, backlog=1024, limit=limit)
                os.chmod(self.listen.path, int(self.settings.socket_mode, 8))
            else:
                self._server = await asyncio.start_server(
                    self._serve, host=self.listen.host, port=self.listen.port,
                    reuse_address=True, backlog=1024, limit=limit)
        except OSError as exc:
            raise StartupError(
                f"policy.listen: cannot listen on {self.settings.listen}: {exc.strerror or exc}"
            ) from exc
        settings = self.settings
        if warning := shut_out_warning("policy", settings.listen, self.listen.host, settings.clients):
            event("clients_only_this_host", level=logging.WARNING, section="policy", warning=warning)
        try:
            self.health = await open_front_end_health(self.config.metrics, "policy",
                                                      lambda: self._stopping, self.metrics)
        except StartupError:
            self._server.close()
            raise
        event("listening", policy=self.settings.listen, address=str(self.address),
              plugins=[s.name for s in self.chain.steps],
              loop=type(asyncio.get_running_loop()).__module__.split(".")[0], version=__version__,
              log_format=LOG_FORMAT_VERSION)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and peer else "unix"
        current_session.set(None)
        if not self.listen.path and not peer_in_networks(peer, self.settings.clients):
            # A stranger could poison greylisting and rate limits, or probe the access lists.
            event("policy_refused", level=logging.WARNING, peer=peer_text, reason="client")
            self.metrics.connection_refused("client")
            writer.close()
            return
        if len(self._connections) >= self.config.limits.max_sessions:
            event("policy_refused", level=logging.WARNING, peer=peer_text, reason="max_sessions",
                  max_sessions=self.config.limits.max_sessions)
            self.metrics.connection_refused("max_sessions")
            writer.close()
            return
        self._connections.add(task)
        self.metrics.session_started()
        try:
            while True:
                async with asyncio.timeout(self.settings.timeout):
                    request = await read_request(reader, self.limits)
                if request is None:
                    break
                action = await self.service.answer(request)
                current_session.set(None)
                writer.write(format_action(action))
                await writer.drain()
        except PolicyProtocolError as exc:
            event("policy_protocol_error", level=logging.WARNING, peer=peer_text, error=str(exc))
        except TimeoutError:
            event("policy_timeout", level=logging.INFO, peer=peer_text, seconds=self.settings.timeout)
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            event("policy_closed", peer=peer_text, reason="shutdown")
        except Exception:
            event("policy_internal_error", level=logging.ERROR, exc_info=True, peer=peer_text)
        finally:
            writer.close()
            self._connections.discard(task)

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening, give open connections *grace* seconds, then close them."""
        self._stopping = True
        grace = self.config.limits.shutdown_grace if grace is None else grace
        event("shutdown", connections=len(self._connections), grace=grace)
        if self._server is not None:
            self._server.close()
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
        if self.listen.path:
            remove_socket(self.listen.path)
        await self.service.close()
        if self.health is not None:
            await self.health.close()
        await self.chain.notify("shutdown")
        if self._history is not None:
            await self._history.close()
        if self.store is not None:
            await self.store.close()
        await self.tables.close()

    async def serve_forever(self) -> None:
        """Start, run until SIGTERM or SIGINT, then stop (SIGHUP is ignored: restart to reload)."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: event(
            "signal_ignored", level=logging.WARNING, signal="SIGHUP",
            note="the policy service does not reload; restart it to apply a new configuration"))
        try:
            await self.start()
            ready()  # systemd (Type=notify): Postfix's policy socket is open
            await stop_requested.wait()
            notify("STOPPING=1")
            await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
