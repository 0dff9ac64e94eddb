"""The running proxy: builds everything from a Config, listens, and shuts down gracefully.

Shutdown (SIGTERM/SIGINT): stop accepting; idle sessions get ``421`` at once; a session in
the middle of a command (receiving DATA, waiting on the upstream) finishes it and then gets
``421``; whatever is still running after ``limits.shutdown_grace`` is closed with ``421``.
A client that never heard 250 retries, so nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from pathlib import Path

from smtpproxy import dns
from smtpproxy.auth import PasswordFile, PasswordFileError
from smtpproxy.chain import Chain
from smtpproxy.config import Config, ConfigSource, ListenerTLS, MaildirDelivery
from smtpproxy.delivery import Delivery
from smtpproxy.delivery.maildir import MaildirDelivery as MaildirBackend
from smtpproxy.delivery.smtp import SmtpDelivery
from smtpproxy.eventlog import event
from smtpproxy.inbound import InboundSMTP, ListenerPolicy, Services
from smtpproxy.limits import ConnectionLimiter
from smtpproxy.proxyprotocol import ProxyProtocolSettings
from smtpproxy.quarantine import QuarantineStore
from smtpproxy.registry import build_chain
from smtpproxy.relay import RelayPolicy

__all__ = ["ProxyServer", "StartupError"]

log = logging.getLogger("smtpproxy.server")


class StartupError(Exception):
    """The proxy could not start (a port in use, a plugin's startup hook failed, ...)."""


def make_delivery(config: Config) -> Delivery:
    d = config.delivery
    if isinstance(d, MaildirDelivery):
        return MaildirBackend(Path(d.path))
    return SmtpDelivery.from_config(d, config_hostname(config))


def config_hostname(config: Config) -> str:
    # gethostname, not getfqdn: getfqdn asks DNS and can hang a machine without it.
    return config.hostname or socket.gethostname()


def server_tls_context(tls: ListenerTLS) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ProxyServer:
    """One proxy process: listeners, the plugin chain and a delivery backend."""

    def __init__(self, config: Config, source: ConfigSource | None = None, *,
                 chain: Chain | None = None, delivery: Delivery | None = None):
        self.config = config
        limits = config.limits
        self.services = Services(
            chain=chain if chain is not None else build_chain(config.plugins, source),
            delivery=delivery if delivery is not None else make_delivery(config),
            quarantine=QuarantineStore(Path(config.quarantine.path)),
            relay=RelayPolicy.from_config(
                config.relay.domains, config.relay.networks, config.relay.allow_authenticated
            ),
            limiter=ConnectionLimiter(limits.max_sessions, limits.max_sessions_per_ip),
            sessions=set(),
            background=set(),
            drained=asyncio.Event(),
        )
        self.services.drained.set()
        self._servers: list[asyncio.Server] = []
        self._stopped = asyncio.Event()
        self._stopping = False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs actually bound (port 0 in the config picks a free one)."""
        out = []
        for server in self._servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                out.append((host, port))
        return out

    def _policy(self, index: int) -> ListenerPolicy:
        c, listener = self.config, self.config.listeners[index]
        lim = c.limits
        return ListenerPolicy(
            hostname=config_hostname(c), banner=listener.banner,
            max_message_size=lim.max_message_size, max_recipients=lim.max_recipients,
            max_line_length=lim.max_line_length, max_command_line=lim.max_command_line,
            max_commands=lim.max_commands, max_errors=lim.max_errors,
            idle_timeout=lim.idle_timeout, data_timeout=lim.data_timeout,
            session_timeout=lim.session_timeout,
            normalize_bare_newlines=c.smtp.bare_newlines == "normalize",
            smtputf8=c.smtp.smtputf8, pipelining=c.smtp.pipelining,
            require_starttls=listener.require_starttls,
            auth=PasswordFile.load(listener.auth.users_file) if listener.auth else None,
            auth_required=listener.auth is not None and listener.auth.require,
            proxy_protocol=ProxyProtocolSettings(
                tuple(listener.proxy_protocol_from), listener.proxy_protocol_timeout
            ) if listener.proxy_protocol else None,
        )

    async def start(self) -> None:
        """Run startup hooks, prepare delivery, open every listener; StartupError if any fails."""
        services = self.services
        d = self.config.dns
        dns.configure(dns.Resolver(d.nameservers, port=d.port, timeout=d.timeout, cache_size=d.cache_size))
        failures = await services.chain.notify("startup")
        if failures:
            raise StartupError("; ".join(f"plugin {name}: startup failed: {err}" for name, err in failures))
        try:
            await services.delivery.start()
        except Exception as exc:
            raise StartupError(f"delivery backend {services.delivery.name}: {exc}") from exc
        loop = asyncio.get_running_loop()
        for index, listener in enumerate(self.config.listeners):
            try:
                policy = self._policy(index)
            except PasswordFileError as exc:
                await self._close_servers()
                raise StartupError(f"listeners[{index}].auth.users_file: {exc}") from exc
            try:
                tls = server_tls_context(listener.tls) if listener.tls else None
            except (OSError, ssl.SSLError) as exc:
                await self._close_servers()
                raise StartupError(f"listeners[{index}].tls: cannot load certificate: {exc}") from exc
            # Implicit TLS: asyncio does the handshake before the protocol sees the connection,
            # and the protocol gets no STARTTLS context (so STARTTLS is not offered).
            implicit = tls if listener.implicit_tls else None

            def factory(policy: ListenerPolicy = policy,
                        tls: ssl.SSLContext | None = None if implicit else tls) -> InboundSMTP:
                return InboundSMTP(services, policy, tls)

            try:
                server = await loop.create_server(
                    factory, host=listener.address, port=listener.port, reuse_address=True,
                    backlog=1024, ssl=implicit,
                    ssl_handshake_timeout=10.0 if implicit else None,  # a silent client is cut off
                )
            except OSError as exc:
                await self._close_servers()
                raise StartupError(
                    f"listeners[{index}]: cannot listen on {listener.address}:{listener.port}: "
                    f"{exc.strerror or exc}"
                ) from exc
            self._servers.append(server)
        for host, port in self.addresses:
            event("listening", address=host, port=port, delivery=services.delivery.name,
                  plugins=[s.name for s in services.chain.steps])

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let busy sessions finish within the grace period, then close all."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.services.stopping = True
        grace = self.config.limits.shutdown_grace if grace is None else grace
        event("shutdown", sessions=len(self.services.sessions), grace=grace)
        for server in self._servers:
            server.close()
        for session in list(self.services.sessions):
            session.request_close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.services.drained.wait(), grace)
        for session in list(self.services.sessions):
            session.force_close()
        if self.services.background:
            await asyncio.wait(set(self.services.background), timeout=max(1.0, grace))
        for server in self._servers:
            # On Python 3.11 wait_closed also waits for connections still setting up (PROXY
            # header, TLS handshake); those time out on their own, but never wait forever.
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=max(1.0, grace))
            except TimeoutError:
                log.warning("event=shutdown_slow note=%s", "listener connections still open")
        await self.services.chain.notify("shutdown")
        await self.services.delivery.close()
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Start, then run until SIGTERM or SIGINT, then stop gracefully."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        try:
            await stop_requested.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()
