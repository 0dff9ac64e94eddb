"""``metrics:`` for the milter and the policy service: the proxy's endpoint (/metrics, /healthz,
/readyz, ``metrics.clients``) and the series they share with it, scraped over real HTTP after
real milter and policy conversations. Before, these front ends had no metrics at all, so the
alerts and the dashboard had nothing to read where smtpproxy runs inside Postfix."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtpproxy import Session, Verdict, hookimpl
from smtpproxy.milter import codec
from smtpproxy.milter.server import MilterServer
from smtpproxy.policy.server import PolicyServer
from smtpproxy.session import Recipient, Transaction
from smtpproxy.startup import StartupError
from tests.conftest import chain_of, make_config
from tests.wire.test_metrics import eventually, health_port, http, scrape, value
from tests.wire.test_milter import BODY, HEADERS, FakeMTA
from tests.wire.test_policy import Client, request


class Gate:
    """Refuses bad@ at RCPT; everyone else passes with a score."""

    name = "gate"

    @hookimpl
    def rcpt_to(self, session: Session, transaction: Transaction, recipient: Recipient) -> Verdict | None:
        if recipient.address.local == "bad":
            return Verdict.reject("No such user", code=550, enhanced="5.1.1", reason="unknown user")
        return Verdict.cont(score=1.0)


Start = Callable[..., Awaitable[Any]]


@pytest.fixture
async def front_end(tmp_path: Path) -> AsyncIterator[Start]:
    """Start a milter or a policy service on a free port, with metrics on a free port."""
    started: list[MilterServer | PolicyServer] = []

    async def start(kind: str, *plugins: object, metrics: dict[str, Any] | None = None,
                    **settings: Any) -> MilterServer | PolicyServer:
        config = make_config(tmp_path, metrics={"enabled": True, f"{kind}_port": 0, **(metrics or {})},
                             **{kind: {"listen": "inet:127.0.0.1:0", **settings}})
        server: MilterServer | PolicyServer = (MilterServer if kind == "milter" else PolicyServer)(
            config, chain=chain_of(*plugins, timeout=2.0))
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(grace=1)


async def test_the_milter_counts_its_sessions_verdicts_and_messages(front_end: Start) -> None:
    server = await front_end("milter", Gate())
    before = await scrape(server)
    assert value(before, "smtpproxy_sessions_total") == 0
    assert ("smtpproxy_messages_total", frozenset({("decision", "delivered")})) in before  # at 0
    assert ("smtpproxy_plugin_errors_total", frozenset({("plugin", "gate"), ("phase", "rcpt_to")})) in before
    assert not [name for name, _ in before if name.startswith(("smtpproxy_upstream", "smtpproxy_config_"))]
    assert value(before, "process_start_time_seconds") > 0

    mta = await FakeMTA.open(server)
    await mta.start()
    await mta.passes(codec.Helo("client.test"))
    await mta.passes(codec.Mail(("<alice@sender.test>",)), i="4ABC")
    refused = await mta.event(codec.Rcpt(("<bad@dest.test>",)))
    assert refused and isinstance(refused[-1], codec.ReplyCode)
    await mta.passes(codec.Rcpt(("<bob@dest.test>",)))
    assert await mta.content(HEADERS, BODY) == [codec.Accept()]
    await mta.close()

    samples = await eventually(server, lambda s: value(s, "smtpproxy_messages_total", decision="delivered") == 1)
    assert value(samples, "smtpproxy_sessions_total") == 1
    assert value(samples, "smtpproxy_plugin_verdicts_total", plugin="gate", phase="rcpt_to", action="reject") == 1
    assert value(samples, "smtpproxy_plugin_verdicts_total", plugin="gate", phase="rcpt_to", action="continue") == 1
    assert value(samples, "smtpproxy_message_processing_seconds_count") == 1


async def test_the_milter_counts_whom_it_turns_away(front_end: Start) -> None:
    server = await front_end("milter", clients=["127.0.0.1/32"])
    assert isinstance(server.address, tuple)
    reader, writer = await asyncio.open_connection(*server.address, local_addr=("127.0.0.2", 0))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    samples = await eventually(server, lambda s: value(s, "smtpproxy_connections_refused_total",
                                                       reason="client") == 1)
    assert value(samples, "smtpproxy_connections_refused_total", reason="max_sessions") == 0
    assert value(samples, "smtpproxy_sessions_total") == 0


async def test_the_policy_service_counts_its_requests_verdicts(front_end: Start) -> None:
    server = await front_end("policy", Gate(), message_plugins="warn")
    assert isinstance(server.address, tuple)
    client = Client(*await asyncio.open_connection(*server.address))
    assert (await client.ask(request("RCPT", recipient="bad@dest.test"))).startswith("550 5.1.1 ")
    assert await client.ask(request("RCPT", recipient="bob@dest.test")) == "DUNNO"
    assert await client.ask(request("END-OF-MESSAGE", recipient="")) == "DUNNO"
    client.close()
    samples = await eventually(server, lambda s: value(s, "smtpproxy_messages_total", decision="delivered") == 1)
    assert value(samples, "smtpproxy_sessions_total") == 1
    assert value(samples, "smtpproxy_plugin_verdicts_total", plugin="gate", phase="rcpt_to", action="continue") == 1
    assert value(samples, "smtpproxy_plugin_verdicts_total", plugin="gate", phase="rcpt_to", action="reject") == 1
    assert ("smtpproxy_connections_refused_total", frozenset({("reason", "client")})) in samples  # at 0


@pytest.mark.parametrize("kind", ["milter", "policy"])
async def test_healthz_readyz_and_clients_as_for_the_proxy(front_end: Start, kind: str) -> None:
    server = await front_end(kind, metrics={"clients": ["127.0.0.1/32"]})
    port = health_port(server)
    assert await http(port, "/healthz") == (200, "text/plain; charset=utf-8", b"ok\n")
    status, _, body = await http(port, "/readyz")
    assert status == 200 and body == f"ready\n{kind}: no delivery of its own (the MTA delivers)\n".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 403 Forbidden\r\n")
    writer.close()


@pytest.mark.parametrize("kind", ["milter", "policy"])
async def test_readyz_says_shutting_down_while_sessions_drain(front_end: Start, kind: str) -> None:
    server = await front_end(kind)
    port = health_port(server)
    assert isinstance(server.address, tuple)
    _, held = await asyncio.open_connection(*server.address)  # a session that keeps the drain going
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(server.stop(grace=5))
    for _ in range(100):
        status, _, body = await http(port, "/readyz")
        if status == 503:
            break
        await asyncio.sleep(0.02)
    assert (status, body) == (503, b"not ready\nshutting down\n")
    held.close()
    await stopping


@pytest.mark.parametrize("kind", ["milter", "policy"])
async def test_a_metrics_port_in_use_is_a_startup_error(tmp_path: Path, kind: str) -> None:
    from tests.daemons import free_port

    listen = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(tmp_path, metrics={"enabled": True, f"{kind}_port": port},
                             **{kind: {"listen": f"inet:127.0.0.1:{listen}"}})
        server = (MilterServer if kind == "milter" else PolicyServer)(config, chain=chain_of(timeout=1.0))
        with pytest.raises(StartupError, match=f"metrics: cannot listen on 127.0.0.1:{port}"):
            await server.start()
        await asyncio.sleep(0.1)
        with pytest.raises(OSError):  # its own listener was closed again
            socket.create_connection(("127.0.0.1", listen), timeout=2).close()


@pytest.mark.parametrize("kind", ["milter", "policy"])
async def test_without_a_port_of_its_own_it_serves_none_and_takes_no_other(tmp_path: Path, kind: str) -> None:
    """One file for the proxy, the milter and the policy service (the shipped units): with
    metrics on for the proxy, a milter or policy service without ``metrics.milter_port`` /
    ``policy_port`` runs as before, and does not take (or fail on) the proxy's port."""
    with socket.socket() as proxys:
        proxys.bind(("127.0.0.1", 0))
        proxys.listen()
        port = proxys.getsockname()[1]
        config = make_config(tmp_path, metrics={"enabled": True, "port": port},
                             **{kind: {"listen": "inet:127.0.0.1:0"}})
        server = (MilterServer if kind == "milter" else PolicyServer)(config, chain=chain_of(timeout=1.0))
        await server.start()
        try:
            assert server.health is None and not server.metrics.enabled
            assert isinstance(server.address, tuple)
            _, writer = await asyncio.open_connection(*server.address)  # it serves
            writer.close()
        finally:
            await server.stop(grace=1)


def test_web_counts_its_console_sign_ins_and_sees_password_spraying(tmp_path: Path) -> None:
    """``smtpproxy web`` with ``metrics.web_port``: the console's login throttle counts into
    the endpoint (so SmtpproxyPasswordSpraying covers the console), with the process metrics
    and none of the mail series; /readyz says what it serves."""
    import httpx

    from tests.console_server import console_files, web_process
    from tests.daemons import free_port

    port, metrics = free_port(), free_port()
    config = console_files(tmp_path, port, "login_throttle:\n  initial_delay: 0\n"
                           f"metrics:\n  enabled: true\n  web_port: {metrics}\n")
    with web_process(config, port, tmp_path / "web.log") as base:
        for name in ("ann", "ben", "cat", "dan", "eve"):  # one address, five names: spraying
            reply = httpx.post(f"{base}/console/login", data={"name": name, "password": "guess"})
            assert reply.status_code == 401, reply.text[:300]
        ready = httpx.get(f"http://127.0.0.1:{metrics}/readyz")
        assert (ready.status_code, ready.text) == (200, "ready\nweb: serving the console and the digests' links\n")
        exposition = httpx.get(f"http://127.0.0.1:{metrics}/metrics").text
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(exposition) for s in family.samples}
    assert value(samples, "smtpproxy_auth_throttle_events_total", event="auth_failed") == 5
    assert value(samples, "smtpproxy_auth_throttle_events_total", event="auth_spraying") == 1
    assert value(samples, "process_start_time_seconds") > 0
    assert not [name for name, _ in samples if name.startswith(("smtpproxy_sessions", "smtpproxy_upstream",
                                                                "smtpproxy_messages"))]
