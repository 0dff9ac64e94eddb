"""Implicit TLS (port 465): the session caps count a connection before its TLS handshake.

With ``create_server(ssl=...)`` asyncio does the handshake before the SMTP protocol sees the
connection, so a client that opens connections and says nothing holds each one, uncounted,
for the whole handshake timeout: 300 silent connections from one address stayed open where
the plaintext port refuses the sixth at once. Here the listener accepts plain TCP; the gate
counts the connection (``max_sessions``, ``max_sessions_per_ip``) the moment it is accepted,
closes it at once when a cap is reached (a plaintext ``421`` means nothing to a client that
waits for a TLS ServerHello), and only then does the handshake (``loop.start_tls``) and hands
the encrypted transport to :class:`~smtpproxy.inbound.InboundSMTP`, which keeps the slot.

A PROXY header cannot precede implicit TLS on a listener (the configuration refuses the
combination), so the address counted is the TCP peer's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from smtpproxy.eventlog import event
from smtpproxy.inbound import InboundSMTP
from smtpproxy.listener import Services

__all__ = ["HANDSHAKE_TIMEOUT", "ImplicitTLSGate"]

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a counted client has to finish its TLS handshake."""


class ImplicitTLSGate(asyncio.Protocol):
    """One accepted connection of an implicit-TLS listener, until its handshake is done."""

    def __init__(self, services: Services, inbound: Callable[[], InboundSMTP],
                 context: Callable[[], ssl.SSLContext]):
        self._services = services
        self._inbound = inbound
        self._context = context

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello is for the TLS layer, read by start_tls
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else "unknown"
        services = self._services
        refusal = services.limiter.acquire(ip)
        if refusal is not None:
            reason = ("max_sessions" if services.limiter.active >= services.limiter.max_sessions
                      else "max_sessions_per_ip")
            services.metrics.connection_refused(reason)
            event("connect_refused", client=ip, reason=refusal.text, before_tls=True)
            transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._handshake(transport, ip))
        services.background.add(task)
        task.add_done_callback(services.background.discard)

    async def _handshake(self, transport: asyncio.Transport, ip: str) -> None:
        inbound = self._inbound()
        inbound.counted = True  # the slot taken above is the session's; it releases it
        try:
            encrypted = await asyncio.get_running_loop().start_tls(
                transport, inbound, self._context(), server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except BaseException as exc:
            self._services.limiter.release(ip)
            transport.abort()
            if isinstance(exc, Exception):
                event("tls_handshake_failed", level=logging.INFO, client=ip,
                      error=f"{type(exc).__name__}: {exc}"[:200])
                return
            raise
        if encrypted is None:  # the connection closed during the handshake
            self._services.limiter.release(ip)
            return
        inbound.connection_made(encrypted)
