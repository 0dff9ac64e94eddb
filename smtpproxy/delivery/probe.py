"""What a readiness probe finds of a delivery backend (``/readyz``, the up gauges).

Each backend answers :meth:`smtpproxy.delivery.Delivery.probe` itself, so the health
endpoint needs no knowledge of the backend kinds: the SMTP delivery greets each of its
upstreams here, a Maildir checks its directory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence

from smtpproxy.delivery import DeliveryState
from smtpproxy.delivery.upstream import UpstreamServer

__all__ = ["probe_upstreams"]


async def probe_upstreams(routes: Mapping[str, Sequence[UpstreamServer]], *, implicit_tls: bool,
                          greeting_seconds: float) -> DeliveryState:
    """Usable when every route has an upstream that greets with 220 (one probe per server,
    however many routes share it); each server's line says what was found and how it learns
    the client's identity."""
    servers = list({id(s): s for members in routes.values() for s in members}.values())
    errors = await asyncio.gather(*(_greets(s, implicit_tls, greeting_seconds) for s in servers))
    status = {id(s): _verify_failure(s) or err for s, err in zip(servers, errors, strict=True)}
    lines = [f"upstream {s.name}: {status[id(s)] or 'ok'}; {_identity(s)}" for s in servers]
    dead = [key for key, members in routes.items() if all(status[id(s)] for s in members)]
    up = {s.name: status[id(s)] is None for s in servers}
    if dead:
        return DeliveryState(False, "no reachable upstream for route(s) " + ", ".join(dead)
                             + "\n" + "\n".join(lines), up)
    return DeliveryState(True, "\n".join(lines), up)


async def _greets(server: UpstreamServer, implicit_tls: bool, seconds: float) -> str | None:
    """None when the server accepts a connection and greets with 220; else what went wrong."""
    try:
        async with asyncio.timeout(seconds):
            reader, writer = await asyncio.open_connection(server.host, server.port)
            try:
                if implicit_tls:
                    return None  # the greeting comes after a TLS handshake; the connect suffices
                line = await reader.readline()
                while line[3:4] == b"-":
                    line = await reader.readline()
                if not line:
                    return "closed the connection before greeting"
                if not line.startswith(b"220"):
                    return "greeted with " + line[:60].decode("ascii", "replace").strip()
                writer.write(b"QUIT\r\n")  # polite: no "lost connection" line in its log
                await writer.drain()
                return None
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return f"no greeting within {seconds:g}s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _verify_failure(server: UpstreamServer) -> str | None:
    """A certificate that did not verify on the last delivery attempt: the upstream answers
    a TCP probe, but no mail can reach it until the CA or tls_hostname is fixed."""
    if server.down_reason != "tls_verify":
        return None
    return f"TLS certificate verification failed ({server.down_detail})"


def _identity(server: UpstreamServer) -> str:
    """How the upstream learns the original client, as the last connection found out."""
    if server.identity is None:
        return "client identity: not known yet (no message sent)"
    if server.identity == "none":
        return f"client identity: none ({server.identity_reason})"
    return f"client identity: {server.identity}"
