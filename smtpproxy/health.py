"""The operations endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP on the event loop.

Why a small HTTP/1.1 responder of our own: prometheus_client's ``start_http_server`` runs
in a thread, but ``/readyz`` must run on the proxy's event loop (it probes the upstream
with asyncio and reads the proxy's state), and ``/healthz`` is only meaningful if the loop
itself answers. A web framework (aiohttp) would be a large dependency for three GET paths
with no bodies to parse. The responder reads one request line and its headers (bounded
size and time), answers, and closes the connection.

- ``/healthz``: 200 whenever the event loop answers.
- ``/readyz``: 200 when this proxy should get new clients: it is not shutting down.
  The delivery backend is probed too (SMTP: every route has an upstream that answers
  ``220`` to a TCP connect, probed at most once per ``cache_seconds``; Maildir: the
  directory is writable) and its state is in the body, but an unusable backend makes the
  proxy unready only with ``require_delivery`` (``metrics.ready_requires_delivery``); without
  it ``/readyz`` never waits for a probe after the first (a stale state is answered and
  refreshed in the background), so a slow upstream cannot slow the balancer's checks. The
  upstream is usually shared by every proxy behind a balancer, and a proxy that answers
  ``451`` is more use to a client than a balancer with no server left. The separate
  signal for an outage is the ``smtpproxy_delivery_ready`` and ``smtpproxy_upstream_up``
  gauges, which every probe (and every ``/metrics`` scrape, through the same cache)
  refreshes. An upstream whose certificate failed to verify on the last delivery attempt
  counts as down with that reason (its TCP probe would succeed). Each upstream's line also
  says how it is told the original client (XCLIENT, XFORWARD, or none and why), as the
  last connection found.
- ``/metrics``: the Prometheus text exposition of this proxy's registry (404 when
  metrics are disabled).

There is no authentication: a host outside ``metrics.clients`` (this host by default) gets
403 for every path, so that a wider ``metrics.address`` does not open the upstream's state
and the counters to whoever reaches the port. At most :data:`MAX_CONNECTIONS` connections
are served at once (each held up to 5 s while its request comes): beyond that a connection is
closed at once, so that connections to this port cannot use up the file descriptors the
process's mail connections need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from smtpproxy.delivery import Delivery, DeliveryState
from smtpproxy.eventlog import event
from smtpproxy.metrics import NullRecorder, PrometheusRecorder
from smtpproxy.networks import LOOPBACK, IPNetwork, peer_in_networks, shut_out_warning
from smtpproxy.startup import StartupError

if TYPE_CHECKING:
    from smtpproxy.config.schema import Metrics as MetricsSettings

__all__ = ["DeliveryState", "HealthServer", "NoDeliveryReadiness", "Readiness", "ReadinessCheck",
           "front_end_port", "open_front_end_health", "open_health"]

_MAX_REQUEST = 8192
_REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 64
"""Connections the endpoint serves at once; Prometheus opens one per scrape."""
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class ReadyState:
    ready: bool
    detail: str


class Readiness:
    """Whether the proxy can take mail now; upstream probes are cached so scrapes stay cheap."""

    def __init__(self, delivery: Delivery, stopping: Callable[[], bool], *,
                 timeout: float = 2.0, cache_seconds: float = 5.0, require_delivery: bool = False,
                 on_probe: Callable[[bool, dict[str, bool]], None] | None = None):
        self.delivery = delivery
        self.stopping = stopping
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.require_delivery = require_delivery
        self.on_probe = on_probe
        self._cached: DeliveryState | None = None
        self._expires = 0.0
        self._probing: asyncio.Task[None] | None = None

    async def check(self) -> ReadyState:
        if self.stopping():
            return ReadyState(False, "shutting down")
        # Only a readiness that depends on the backend waits for its probe: a slow upstream
        # must not make /readyz slow, or the balancer's check times out on every proxy.
        state = await self.delivery_state(wait=self.require_delivery)
        if state.usable:
            return ReadyState(True, state.detail)
        if self.require_delivery:
            return ReadyState(False, state.detail)
        return ReadyState(True, "delivery unusable: clients get 4xx "
                          "(metrics.ready_requires_delivery: false)\n" + state.detail)

    async def delivery_state(self, *, wait: bool = True) -> DeliveryState:
        """The backend's state, probed at most once per ``cache_seconds`` by one probe that
        concurrent callers share. With *wait* False a stale state is returned at once and
        the probe runs in the background (only the first call always waits)."""
        if self._cached is None or time.monotonic() >= self._expires:
            if self._probing is None:
                self._probing = asyncio.create_task(self._refresh())
            if wait or self._cached is None:
                await asyncio.shield(self._probing)
        assert self._cached is not None
        return self._cached

    async def _refresh(self) -> None:
        try:
            try:
                state = await self.delivery.probe(self.timeout)
            except Exception as exc:  # a probe that crashes says so instead of killing /readyz
                state = DeliveryState(False, f"delivery probe failed: {type(exc).__name__}: {exc}", {})
            self._cached, self._expires = state, time.monotonic() + self.cache_seconds
            if self.on_probe is not None:
                self.on_probe(state.usable, state.upstreams)
        finally:
            self._probing = None

    async def before_scrape(self) -> None:
        """Refresh the delivery gauges if stale, without waiting for the probe."""
        await self.delivery_state(wait=False)

    async def close(self) -> None:
        """Cancel a probe still running in the background."""
        if self._probing is not None:
            self._probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probing


class ReadinessCheck(Protocol):
    """What /readyz and a /metrics scrape ask of a front end."""

    async def check(self) -> ReadyState: ...

    async def before_scrape(self) -> None:
        """Bring the gauges a scrape reports up to date (at most a cached probe)."""

    async def close(self) -> None: ...


_SERVING = {
    "milter": "milter: no delivery of its own (the MTA delivers)",
    "policy": "policy: no delivery of its own (the MTA delivers)",
    "web": "web: serving the console and the digests' links",
}
"""What /readyz says of a front end without a delivery probe while it serves."""


class NoDeliveryReadiness:
    """The milter's, the policy service's and web's: nothing of theirs to probe, so they are
    ready whenever they are not shutting down."""

    def __init__(self, what: str, stopping: Callable[[], bool]):
        self.what = what
        self.stopping = stopping

    async def check(self) -> ReadyState:
        if self.stopping():
            return ReadyState(False, "shutting down")
        return ReadyState(True, _SERVING[self.what])

    async def before_scrape(self) -> None:
        pass

    async def close(self) -> None:
        pass


class HealthServer:
    """Serves /healthz, /readyz and /metrics on one address."""

    def __init__(self, address: str, port: int, readiness: ReadinessCheck,
                 metrics: PrometheusRecorder | None, clients: Sequence[IPNetwork] = LOOPBACK):
        self.address = address
        self.port = port
        self.clients = tuple(clients)
        """Who may ask (``metrics.clients``): anyone else gets 403 whatever the request."""
        self.readiness = readiness
        self.metrics = metrics
        self._server: asyncio.Server | None = None
        self._open = 0

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
        await self.readiness.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._open >= MAX_CONNECTIONS:
            event("metrics_refused", level=logging.WARNING, reason="busy", peer=_peer(peer))
            writer.close()
            return
        self._open += 1
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                request = await _read_request(reader)
                if not peer_in_networks(peer, self.clients):
                    # The request is read first (bounded), or closing with it unread would
                    # reset the connection and lose the answer.
                    event("metrics_refused", level=logging.WARNING, reason="client", peer=_peer(peer))
                    await _respond(writer, 403, b"not in metrics.clients\n")
                    return
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
            self._open -= 1
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
            await self.readiness.before_scrape()
            exposition, ctype = self.metrics.exposition()
            return 200, exposition, ctype
        return 404, b"not found; try /metrics, /healthz or /readyz\n", text


def _peer(peer: object) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and peer else "unknown"


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


async def open_health(settings: MetricsSettings, port: int, readiness: ReadinessCheck,
                      metrics: PrometheusRecorder | None) -> HealthServer:
    """The endpoint of ``metrics:`` for any front end, listening: said at start when its
    ``clients`` shut out the hosts its address lets in; StartupError when the port is taken."""
    if warning := shut_out_warning("metrics", f"{settings.address}:{port}", settings.address,
                                   settings.clients):
        event("clients_only_this_host", level=logging.WARNING, section="metrics", warning=warning)
    server = HealthServer(settings.address, port, readiness, metrics, settings.clients)
    try:
        await server.start()
    except OSError as exc:
        raise StartupError(
            f"metrics: cannot listen on {settings.address}:{port}: {exc.strerror or exc}") from exc
    host, bound = server.bound
    event("metrics_listening", address=host, port=bound, paths="/metrics,/healthz,/readyz")
    return server


def front_end_port(settings: MetricsSettings, what: str) -> int | None:
    """The port of the milter's, the policy service's or web's endpoint
    (``metrics.milter_port``, ``policy_port``, ``web_port``), or None: metrics off, or no port
    of its own given."""
    ports = {"milter": settings.milter_port, "policy": settings.policy_port, "web": settings.web_port}
    return ports[what] if settings.enabled else None


async def open_front_end_health(settings: MetricsSettings, what: str, stopping: Callable[[], bool],
                                metrics: NullRecorder) -> HealthServer | None:
    """The endpoint of the milter, the policy service or web (*what*: which port, and what
    /readyz says), or None when it has none."""
    port = front_end_port(settings, what)
    if port is None or not isinstance(metrics, PrometheusRecorder):
        return None
    return await open_health(settings, port, NoDeliveryReadiness(what, stopping), metrics)
