"""Tests of the customer-tier example against a real HTTP server on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from smtpproxy_example_tier import CustomerTier

from smtpproxy.pytest_plugin import make_plugin

TIERS = {"gold.example": "gold", "evil.example": "gold; rm -rf"}


class QuietServer(ThreadingHTTPServer):
    """The slow path's client gives up on purpose: its broken pipe is expected, not news."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlparse(self.path)
        domain = parse_qs(url.query).get("domain", [""])[0]
        self.server.requests.append(domain)  # type: ignore[attr-defined]
        if url.path == "/slow":
            time.sleep(1.0)
        if url.path == "/broken":
            self.send_response(500)
            self.end_headers()
            return
        if domain not in TIERS:
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps({"tier": TIERS[domain]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def service() -> Iterator[ThreadingHTTPServer]:
    server = QuietServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def tier(service: ThreadingHTTPServer, path: str = "/tier", timeout: float = 0.3) -> CustomerTier:
    return make_plugin(CustomerTier, url=f"http://127.0.0.1:{service.server_port}{path}", timeout=timeout)  # type: ignore[return-value]


@pytest.mark.asyncio
async def test_header_from_the_lookup(smtpproxy_run, smtpproxy_message, service) -> None:
    forged = smtpproxy_message(headers={"X-Customer-Tier": "platinum"})
    trace = await smtpproxy_run(tier(service), forged, sender="ceo@Gold.example")
    assert trace.headers_added == [("X-Customer-Tier", "gold")]
    assert trace.headers_removed == [("X-Customer-Tier", "platinum")]
    assert trace.tags == ["tier:gold"]
    assert service.requests == ["gold.example"]


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "sender", "tag"), [
    ("/tier", "a@unknown.example", "tier:none"),
    ("/tier", "a@evil.example", "tier:unavailable"),       # a value we will not put in a header
    ("/broken", "a@gold.example", "tier:unavailable"),     # HTTP 500
    ("/slow", "a@gold.example", "tier:unavailable"),       # over the 0.3 s timeout
])
async def test_fails_open(  # noqa: PLR0917 - pytest passes fixtures and parameters positionally
    smtpproxy_run, smtpproxy_message, service, path, sender, tag
) -> None:
    started = time.perf_counter()
    trace = await smtpproxy_run(tier(service, path), smtpproxy_message(), sender=sender)
    assert trace.decision == "delivered"
    assert trace.headers_added == []
    assert trace.tags == [tag]
    assert time.perf_counter() - started < 0.9  # the slow service was not waited for


@pytest.mark.asyncio
async def test_unreachable_service_fails_open(smtpproxy_run, smtpproxy_message, service) -> None:
    plugin = tier(service)
    service.shutdown()
    service.server_close()  # nothing listens there any more
    trace = await smtpproxy_run(plugin, smtpproxy_message(), sender="a@gold.example")
    assert trace.decision == "delivered" and trace.tags == ["tier:unavailable"]


@pytest.mark.asyncio
async def test_real_proxy_adds_the_header(smtpproxy_proxy, smtpproxy_message, service) -> None:
    proxy = await smtpproxy_proxy(tier(service))
    reply = await proxy.send("boss@gold.example", ["bob@rcpt.test"], smtpproxy_message())
    assert reply.ok, reply
    assert proxy.received[0].message.get("X-Customer-Tier") == "gold"
