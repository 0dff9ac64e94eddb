"""The operations endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP on the event loop.

Why a small HTTP/1.1 responder of our own: prometheus_client's ``start_http_server`` runs
in a thread, but ``/readyz`` must run on the proxy's event loop (it probes the upstream
with asyncio and reads the proxy's state), and ``/healthz`` is only meaningful if the loop
itself answers. A web framework (aiohttp) would be a large dependency for three GET paths
with no bodies to parse. The responder reads one request line and its headers (bounded
size and time), answers, and closes the connection.

- ``/healthz``: 200 whenever the event loop answers.
- ``/readyz``: 200 when the proxy can take mail: not shutting down, and the delivery
  backend is usable (SMTP: every route has an upstream that answers ``220`` to a TCP
  connect, probed at most once per ``cache_seconds``; Maildir: the directory is writable).
  503 otherwise, with the reason in the body. An upstream whose certificate failed to
  verify on the last delivery attempt counts as down with that reason (its TCP probe would
  succeed). Each upstream's line also says how it is told
  the original client (XCLIENT, XFORWARD, or none and why), as the last connection found.
- ``/metrics``: the Prometheus text exposition of this proxy's registry (404 when
  metrics are disabled).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from smtpproxy.delivery import Delivery
from smtpproxy.delivery.maildir import MaildirDelivery
from smtpproxy.delivery.smtp import SmtpDelivery
from smtpproxy.delivery.upstream import UpstreamServer
from smtpproxy.metrics import PrometheusRecorder

__all__ = ["HealthServer", "Readiness"]

_MAX_REQUEST = 8192
_REQUEST_TIMEOUT = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class ReadyState:
    ready: bool
    detail: str


class Readiness:
    """Whether the proxy can take mail now; upstream probes are cached so scrapes stay cheap."""

    def __init__(self, delivery: Delivery, stopping: Callable[[], bool], *,
                 timeout: float = 2.0, cache_seconds: float = 5.0):
        self.delivery = delivery
        self.stopping = stopping
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._cached: ReadyState | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def check(self) -> ReadyState:
        if self.stopping():
            return ReadyState(False, "shutting down")
        async with self._lock:  # concurrent scrapes share one probe
            if self._cached is None or time.monotonic() >= self._expires:
                self._cached = await self._probe()
                self._expires = time.monotonic() + self.cache_seconds
            return self._cached

    async def _probe(self) -> ReadyState:
        d = self.delivery
        if isinstance(d, SmtpDelivery):
            return await self._probe_upstreams(d)
        if isinstance(d, MaildirDelivery):
            path = d.path / "new"
            if path.is_dir() and os.access(path, os.W_OK | os.X_OK):
                return ReadyState(True, f"maildir {d.path}: writable")
            return ReadyState(False, f"maildir {d.path}: not writable")
        return ReadyState(True, f"delivery {d.name}: no probe")

    async def _probe_upstreams(self, d: SmtpDelivery) -> ReadyState:
        routes = d.route_servers
        servers = list({id(s): s for servers in routes.values() for s in servers}.values())
        implicit = d.connector.settings.tls == "implicit"
        errors = await asyncio.gather(*(self._greets(s, implicit) for s in servers))
        status = {id(s): _verify_failure(s) or err for s, err in zip(servers, errors, strict=True)}
        lines = [f"upstream {s.name}: {status[id(s)] or 'ok'}; {_identity(s)}" for s in servers]
        dead = [key for key, members in routes.items() if all(status[id(s)] for s in members)]
        if dead:
            return ReadyState(False, "no reachable upstream for route(s) " + ", ".join(dead)
                              + "\n" + "\n".join(lines))
        return ReadyState(True, "\n".join(lines))

    async def _greets(self, server: UpstreamServer, implicit_tls: bool) -> str | None:
        """None when the server accepts a connection and greets with 220; else what went wrong."""
        try:
            async with asyncio.timeout(self.timeout):
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
            return f"no greeting within {self.timeout:g}s"
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


class HealthServer:
    """Serves /healthz, /readyz and /metrics on one address."""

    def __init__(self, address: str, port: int, readiness: Readiness,
                 metrics: PrometheusRecorder | None):
        self.address = address
        self.port = port
        self.readiness = readiness
        self.metrics = metrics
        self._server: asyncio.Server | None = None

    @property
    def bound(self) -> tuple[str, int]:
        """The (host, port) actually bound (port 0 picks a free one)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.address, self.port, limit=_MAX_REQUEST, reuse_address=True
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                request = await _read_request(reader)
                if request is None:
                    await _respond(writer, 400, b"bad request\n")
                    return
                method, path = request
                if method not in ("GET", "HEAD"):
                    await _respond(writer, 405, b"only GET and HEAD\n", extra=(("Allow", "GET, HEAD"),))
                    return
                status, body, ctype = await self._route(path)
                await _respond(writer, status, b"" if method == "HEAD" else body, ctype,
                               length=len(body))
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _route(self, path: str) -> tuple[int, bytes, str]:
        text = "text/plain; charset=utf-8"
        if path == "/healthz":
            return 200, b"ok\n", text
        if path == "/readyz":
            state = await self.readiness.check()
            body = ("ready\n" if state.ready else "not ready\n") + state.detail + "\n"
            return (200 if state.ready else 503), body.encode(), text
        if path == "/metrics":
            if self.metrics is None:
                return 404, b"metrics are disabled (metrics.enabled: false)\n", text
            exposition, ctype = self.metrics.exposition()
            return 200, exposition, ctype
        return 404, b"not found; try /metrics, /healthz or /readyz\n", text


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    """(method, path) from the request line; the headers are read and ignored."""
    line = await reader.readuntil(b"\n")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    for _ in range(100):
        if (await reader.readuntil(b"\n")).strip() == b"":
            return parts[0], parts[1].split("?", 1)[0]
    return None


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes,
                   ctype: str = "text/plain; charset=utf-8", *, length: int | None = None,
                   extra: Sequence[tuple[str, str]] = ()) -> None:
    headers = [
        f"HTTP/1.1 {status} {_REASONS.get(status, '')}",
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body) if length is None else length}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra),
    ]
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
