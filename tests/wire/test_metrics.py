"""Metrics, /healthz and /readyz, scraped over real HTTP after real SMTP sessions."""

from __future__ import annotations

import asyncio
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import smtpproxy
from smtpproxy import Message, Recipient, Session, Transaction, Verdict, hookimpl
from smtpproxy.metrics import NullRecorder, PrometheusRecorder
from smtpproxy.milter.server import MilterServer
from smtpproxy.policy.server import PolicyServer
from smtpproxy.server import ProxyServer, StartupError
from tests.conftest import ProxyFactory, Sink, Talk, chain_of, closed_port, make_config, port_of

METRICS = {"metrics": {"enabled": True, "port": 0}}


class Gate:
    """Refuses bad@ at RCPT, refuses bodies saying SPAM at DATA, scores everything else."""

    name = "gate"

    @hookimpl
    async def rcpt_to(self, session: Session, transaction: Transaction, recipient: Recipient) -> Verdict | None:
        if recipient.address.local == "bad":
            return Verdict.reject("No such user", code=550, enhanced="5.1.1", reason="unknown user")
        return Verdict.cont(score=1.0)

    @hookimpl
    def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict | None:
        if b"SPAM" in message.raw:
            return Verdict.reject("Spam refused", reason="looks like spam")
        return None


class Hold:
    """Holds every message in the data phase until released (a busy session for shutdown)."""

    name = "hold"

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    @hookimpl
    async def data(self, session: Session, transaction: Transaction, message: Message) -> None:
        self.entered.set()
        await self.release.wait()


async def http(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    """(status, content type, body) from a real HTTP client (urllib, in a thread)."""

    def fetch() -> tuple[int, str, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read()

    return await asyncio.to_thread(fetch)


Serving = ProxyServer | MilterServer | PolicyServer
"""Every front end that serves ``metrics:`` (test_front_end_metrics scrapes the other two)."""


def health_port(server: Serving) -> int:
    assert server.health is not None
    return server.health.bound[1]


async def scrape(server: Serving) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample on /metrics, keyed by (name, labels)."""
    status, ctype, body = await http(health_port(server), "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def eventually(server: Serving, check: Callable[[dict[Any, float]], bool]) -> dict[Any, float]:
    """Scrape until *check* holds (session-end recording runs just after the client leaves)."""
    samples: dict[Any, float] = {}
    for _ in range(200):
        samples = await scrape(server)
        if check(samples):
            return samples
        await asyncio.sleep(0.02)
    raise AssertionError(f"metrics never matched; last scrape: {samples}")


async def test_counters_and_histograms_after_real_sessions(proxy_factory: ProxyFactory, sink: Sink) -> None:
    server = await proxy_factory(Gate(), upstream=sink.port, **METRICS)
    client = await Talk.open(port_of(server))
    await client.hello()
    assert await client.send_message("a@src.test", ["ok@dest.test"], b"Subject: hi\r\n\r\nhello\r\n") == (
        250, "2.0.0 Ok: queued as SINK1")
    assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bad@dest.test>"))[0] == 550
    assert (await client.cmd("RSET"))[0] == 250
    code, _ = await client.send_message("a@src.test", ["ok@dest.test"], b"Subject: SPAM\r\n\r\nbuy\r\n")
    assert code == 550
    assert (await client.cmd("QUIT"))[0] == 221
    await client.close()
    second = await Talk.open(port_of(server))
    await second.hello()
    assert (await second.cmd("QUIT"))[0] == 221
    await second.close()

    s = await eventually(server, lambda s: value(s, "smtpproxy_active_sessions") == 0
                         and value(s, "smtpproxy_plugin_verdicts_total", plugin="gate", phase="data",
                                   action="reject") == 1)
    assert value(s, "smtpproxy_sessions_total") == 2
    assert value(s, "smtpproxy_messages_total", decision="delivered") == 1
    assert value(s, "smtpproxy_messages_total", decision="rejected") == 1
    assert value(s, "smtpproxy_message_processing_seconds_count") == 2
    assert value(s, "smtpproxy_plugin_verdicts_total", plugin="gate", phase="rcpt_to", action="continue") == 2
    assert value(s, "smtpproxy_plugin_verdicts_total", plugin="gate", phase="rcpt_to", action="reject") == 1
    assert value(s, "smtpproxy_plugin_verdicts_total", plugin="gate", phase="data", action="continue") == 1
    assert value(s, "smtpproxy_plugin_duration_seconds_count", plugin="gate", phase="rcpt_to") == 3
    assert value(s, "smtpproxy_plugin_duration_seconds_bucket", plugin="gate", phase="rcpt_to", le="+Inf") == 3
    assert value(s, "smtpproxy_plugin_errors_total", plugin="gate", phase="rcpt_to") == 0
    assert value(s, "smtpproxy_upstream_duration_seconds_count", backend="smtp", result="ok") == 1
    assert 0 < value(s, "smtpproxy_upstream_duration_seconds_sum", backend="smtp", result="ok") < 10
    assert value(s, "smtpproxy_deliveries_in_progress") == 0
    assert value(s, "smtpproxy_info", version=smtpproxy.__version__) == 1
    assert len(sink.messages) == 1


async def test_upstream_errors_are_counted(proxy_factory: ProxyFactory) -> None:
    dead = closed_port()
    server = await proxy_factory(upstream=dead, delivery={"rcpt_mode": "at_data"}, **METRICS)
    client = await Talk.open(port_of(server))
    await client.hello()
    code, _ = await client.send_message("a@src.test", ["ok@dest.test"], b"Subject: hi\r\n\r\nhello\r\n")
    assert code == 451
    await client.close()
    s = await scrape(server)
    assert value(s, "smtpproxy_messages_total", decision="tempfailed") == 1
    assert value(s, "smtpproxy_upstream_errors_total", backend="smtp", result="tempfail") == 1
    assert value(s, "smtpproxy_upstream_duration_seconds_count", backend="smtp", result="tempfail") == 1
    assert value(s, "smtpproxy_upstream_connect_failures_total", upstream=f"127.0.0.1:{dead}",
                 reason="connect") == 1


async def test_refused_connections_by_reason(proxy_factory: ProxyFactory, sink: Sink) -> None:
    server = await proxy_factory(upstream=sink.port, limits={"max_sessions_per_ip": 1}, **METRICS)
    first = await Talk.open(port_of(server))
    await first.hello()
    second = await Talk.open(port_of(server))
    assert (await second.greeting())[0] == 421
    s = await scrape(server)
    assert value(s, "smtpproxy_connections_refused_total", reason="max_sessions_per_ip") == 1
    assert value(s, "smtpproxy_active_sessions") == 1
    await first.close()
    await second.close()


async def test_phase_and_summary_log_lines(proxy_factory: ProxyFactory, sink: Sink,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smtpproxy.session")
    server = await proxy_factory(Gate(), upstream=sink.port)
    client = await Talk.open(port_of(server))
    await client.hello("me.test")
    assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bad@dest.test>"))[0] == 550
    assert (await client.cmd("RCPT TO:<ok@dest.test>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    events = [(r.msg, r.smtpproxy_fields) for r in caplog.records if hasattr(r, "smtpproxy_fields")]
    rcpts = [f for name, f in events if name == "rcpt_to"]
    assert rcpts[0] == {"tx": rcpts[0]["tx"], "recipient": "bad@dest.test", "verdict": "reject",
                        "by": "gate", "reply": 550, "reason": "unknown user"}
    assert rcpts[1]["verdict"] == "continue" and "reason" not in rcpts[1]
    (summary,) = [f for name, f in events if name == "message"]
    assert summary["client"] == "127.0.0.1"
    assert summary["helo"] == "me.test"
    assert summary["decision"] == "delivered"
    assert summary["recipients"] == ["ok@dest.test"]


async def test_healthz_and_http_errors(proxy_factory: ProxyFactory, sink: Sink) -> None:
    server = await proxy_factory(upstream=sink.port, **METRICS)
    port = health_port(server)
    assert await http(port, "/healthz") == (200, "text/plain; charset=utf-8", b"ok\n")
    assert (await http(port, "/nowhere"))[0] == 404
    assert (await http(port, "/metrics", method="POST"))[0] == 405
    status, _, body = await http(port, "/healthz", method="HEAD")
    assert (status, body) == (200, b"")
    # Garbage instead of HTTP gets 400 and a closed connection, and the endpoint lives on.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x00\x01 nonsense\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 400 ")
    writer.close()
    assert (await http(port, "/healthz"))[0] == 200


async def test_readyz_reports_the_upstream_and_stays_ready_through_its_outage(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    """An upstream outage is every proxy's (they share it): readiness stays, clients hear 4xx,
    and the outage shows in the body and the delivery gauges instead."""
    up = await proxy_factory(upstream=sink.port, metrics={"enabled": True, "port": 0, "ready_cache": 0.01})
    status, _, body = await http(health_port(up), "/readyz")
    assert status == 200, body
    assert body.decode() == (f"ready\nupstream 127.0.0.1:{sink.port}: ok; "
                             "client identity: not known yet (no message sent)\n")
    s = await scrape(up)
    assert value(s, "smtpproxy_delivery_ready") == 1
    assert value(s, "smtpproxy_upstream_up", upstream=f"127.0.0.1:{sink.port}") == 1

    dead = closed_port()
    down = await proxy_factory(upstream=dead, **METRICS)
    status, _, body = await http(health_port(down), "/readyz")
    assert status == 200, body
    assert body.decode().startswith(
        "ready\ndelivery unusable: clients get 4xx (metrics.ready_requires_delivery: false)\n"
        "no reachable upstream for route(s) default\n")
    assert f"upstream 127.0.0.1:{dead}: " in body.decode()
    s = await scrape(down)
    assert value(s, "smtpproxy_delivery_ready") == 0
    assert (s[("smtpproxy_upstream_up", frozenset({("upstream", f"127.0.0.1:{dead}")}))]) == 0


async def test_a_slow_upstream_does_not_slow_readyz(proxy_factory: ProxyFactory) -> None:
    """A balancer's check has a timeout (HAProxy: its check interval): were /readyz to wait for
    the probe of an upstream that connects but does not greet, every proxy would fail its
    check at once. It answers from the last probe while the next one waits."""
    held = asyncio.Event()
    probes: list[asyncio.StreamWriter] = []

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        probes.append(writer)
        if len(probes) > 1:
            await held.wait()  # the second probe gets no greeting until the test says so
        writer.write(b"220 slow.test ESMTP\r\n")
        await reader.readline()
        writer.close()

    slow = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = slow.sockets[0].getsockname()[1]
    try:
        server = await proxy_factory(upstream=port, metrics={"enabled": True, "port": 0, "ready_cache": 0.01})
        status, _, body = await http(health_port(server), "/readyz")  # the first probe is awaited
        assert (status, len(probes)) == (200, 1), body
        await asyncio.sleep(0.02)  # the probe result is stale now
        status, _, body = await http(health_port(server), "/readyz")
        # the last probe's answer, not "no greeting within 2s" after waiting for the new one
        assert status == 200 and f"upstream 127.0.0.1:{port}: ok;" in body.decode(), body
        for _ in range(500):  # and the new probe runs in the background
            if len(probes) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(probes) == 2
        held.set()
    finally:
        slow.close()


async def test_readyz_requires_delivery_when_told(proxy_factory: ProxyFactory) -> None:
    dead = closed_port()
    down = await proxy_factory(upstream=dead, metrics={"enabled": True, "port": 0,
                                                       "ready_requires_delivery": True})
    status, _, body = await http(health_port(down), "/readyz")
    assert status == 503
    assert body.decode().startswith("not ready\nno reachable upstream for route(s) default\n")


async def test_labelled_counters_start_at_zero(proxy_factory: ProxyFactory, sink: Sink) -> None:
    """Series born at 1 hide their first event from rate(): the known ones exist from the start."""
    server = await proxy_factory(Gate(), upstream=sink.port, **METRICS)
    s = await scrape(server)
    upstream = f"127.0.0.1:{sink.port}"
    for name, labels in [
        ("smtpproxy_messages_total", {"decision": "tempfailed"}),
        ("smtpproxy_messages_total", {"decision": "delivered"}),
        ("smtpproxy_connections_refused_total", {"reason": "max_sessions_per_ip"}),
        ("smtpproxy_upstream_errors_total", {"backend": "smtp", "result": "tempfail"}),
        ("smtpproxy_upstream_rcpt_total", {"result": "tempfail"}),
        ("smtpproxy_upstream_rcpt_total", {"result": "ok"}),
        ("smtpproxy_upstream_connect_failures_total", {"upstream": upstream, "reason": "connect"}),
        ("smtpproxy_upstream_connect_failures_total", {"upstream": upstream, "reason": "tls_verify"}),
        ("smtpproxy_plugin_errors_total", {"plugin": "gate", "phase": "rcpt_to"}),
        ("smtpproxy_plugin_errors_total", {"plugin": "gate", "phase": "data"}),
        ("smtpproxy_config_reloads_total", {"result": "failed"}),
    ]:
        assert s.get((name, frozenset(labels.items()))) == 0, (name, labels)
    assert ("smtpproxy_plugin_errors_total", frozenset({("plugin", "gate"), ("phase", "helo")})) not in s


async def test_rcpt_time_upstream_answers_and_outages_are_counted(
    proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """rcpt_mode relay (the default) answers at RCPT: an outage never reaches DATA, so it is
    counted there, and logged at warning."""
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    sink.handler.rcpt_replies["later@dest.test"] = "450 4.2.0 Try later"
    server = await proxy_factory(upstream=sink.port, **METRICS)
    client = await Talk.open(port_of(server))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<ok@dest.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<gone@dest.test>"))[0] == 550
    assert (await client.cmd("RCPT TO:<later@dest.test>"))[0] == 450
    await client.close()
    s = await scrape(server)
    assert [value(s, "smtpproxy_upstream_rcpt_total", result=r) for r in ("ok", "reject", "tempfail")] == [1, 1, 1]

    dead = closed_port()
    caplog.set_level(logging.INFO, logger="smtpproxy.session")
    down = await proxy_factory(upstream=dead, **METRICS)
    client = await Talk.open(port_of(down))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<ok@dest.test>"))[0] == 451
    await client.close()
    s = await scrape(down)
    assert value(s, "smtpproxy_upstream_rcpt_total", result="tempfail") == 1
    assert value(s, "smtpproxy_upstream_connect_failures_total", upstream=f"127.0.0.1:{dead}",
                 reason="connect") == 1
    [record] = [r for r in caplog.records if r.msg == "upstream_down"]
    assert record.levelno == logging.WARNING


async def test_readyz_probes_are_cached(proxy_factory: ProxyFactory) -> None:
    connections = 0

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(b"220 counter.test ESMTP\r\n")
        await reader.readline()  # QUIT
        writer.close()

    counter = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = counter.sockets[0].getsockname()[1]
    try:
        server = await proxy_factory(upstream=port, **METRICS)
        results = await asyncio.gather(*(http(health_port(server), "/readyz") for _ in range(5)))
        assert [r[0] for r in results] == [200] * 5
        assert connections == 1  # five scrapes, one probe (ready_cache defaults to 5 s)
    finally:
        counter.close()


async def test_readyz_maildir_and_shutdown(tmp_path: Path) -> None:
    hold = Hold()
    config = make_config(tmp_path, **METRICS)
    server = ProxyServer(config, chain=chain_of(hold))
    await server.start()
    port = health_port(server)
    assert (await http(port, "/readyz"))[:2] == (200, "text/plain; charset=utf-8")

    client = await Talk.open(port_of(server))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@localhost>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    await asyncio.wait_for(hold.entered.wait(), 10)
    stopping = asyncio.create_task(server.stop(grace=10))
    for _ in range(200):  # stop() begins at once; poll until readyz says so
        status, _, body = await http(port, "/readyz")
        if status == 503:
            break
        await asyncio.sleep(0.01)
    assert (status, body) == (503, b"not ready\nshutting down\n")
    assert (await http(port, "/healthz"))[0] == 200  # the loop still answers while draining
    hold.release.set()
    assert (await client.reply())[0] == 250
    await asyncio.wait_for(stopping, 10)
    await client.close()


async def test_readyz_maildir_not_writable(tmp_path: Path) -> None:
    server = ProxyServer(make_config(tmp_path, metrics={"enabled": True, "port": 0,
                                                        "ready_requires_delivery": True}),
                         chain=chain_of())
    await server.start()
    try:
        (tmp_path / "mail" / "new").rmdir()
        status, _, body = await http(health_port(server), "/readyz")
        assert status == 503
        assert body.decode() == f"not ready\nmaildir {tmp_path / 'mail'}: not writable\n"
        assert value(await scrape(server), "smtpproxy_delivery_ready") == 0
    finally:
        await server.stop(grace=1)


async def test_disabled_by_default_costs_nothing(proxy_factory: ProxyFactory, sink: Sink) -> None:
    server = await proxy_factory(upstream=sink.port)
    assert server.health is None
    assert type(server.services.metrics) is NullRecorder


async def test_two_proxies_in_one_process_have_separate_registries(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    a = await proxy_factory(upstream=sink.port, **METRICS)
    b = await proxy_factory(upstream=sink.port, **METRICS)
    client = await Talk.open(port_of(a))
    await client.hello()
    await client.cmd("QUIT")
    await client.close()
    assert value(await scrape(a), "smtpproxy_sessions_total") == 1
    assert value(await scrape(b), "smtpproxy_sessions_total") == 0
    assert isinstance(a.services.metrics, PrometheusRecorder)
    assert a.services.metrics.registry is not getattr(b.services.metrics, "registry", None)


async def test_enabled_without_prometheus_client_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import now raises ImportError
    server = ProxyServer(make_config(tmp_path, **METRICS), chain=chain_of())
    with pytest.raises(StartupError, match=r"pip install prometheus-client"):
        await server.start()


async def test_metrics_port_in_use_is_a_startup_error(tmp_path: Path) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        server = ProxyServer(make_config(tmp_path, metrics={"enabled": True, "port": port}),
                             chain=chain_of())
        with pytest.raises(StartupError, match=rf"metrics: cannot listen on 127.0.0.1:{port}"):
            await server.start()
        assert server.addresses == []  # the SMTP listeners were closed again
    finally:
        blocker.close()


async def test_a_maildir_delivery_is_ready_while_its_new_directory_is_there(tmp_path: Path) -> None:
    """The Maildir backend answers the readiness probe itself (Delivery.probe)."""
    import shutil

    from smtpproxy.delivery.maildir import MaildirDelivery
    from smtpproxy.health import Readiness

    delivery = MaildirDelivery(tmp_path / "mail")
    await delivery.start()
    state = await Readiness(delivery, lambda: False, cache_seconds=0).delivery_state()
    assert (state.usable, state.detail) == (True, f"maildir {tmp_path / 'mail'}: writable")
    shutil.rmtree(tmp_path / "mail" / "new")
    readiness = Readiness(delivery, lambda: False, cache_seconds=0, require_delivery=True)
    ready = await readiness.check()
    assert (ready.ready, ready.detail) == (False, f"maildir {tmp_path / 'mail'}: not writable")
    await delivery.close()
