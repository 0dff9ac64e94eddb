"""The spam-scanner bridges (spamd, rspamd) when their daemon is gone or silent: real sockets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from smtpproxy_plugins.rspamd import Rspamd
from smtpproxy_plugins.spamd import Spamd

from tests.conftest import ProxyFactory, Sink, closed_port, port_of
from tests.scanner_parts import CLEAN, SPAM, Probe, scanner, score, send

BRIDGES = [pytest.param(("spamd", Spamd), id="spamd"), pytest.param(("rspamd", Rspamd), id="rspamd")]


@pytest.fixture(params=BRIDGES)
def bridge(request: pytest.FixtureRequest) -> tuple[str, Callable[..., Any]]:
    name, cls = request.param
    return name, lambda port, **settings: scanner(cls, name, port, **settings)


async def test_scanner_stopped_continues_and_logs_by_default(
    bridge: tuple[str, Callable[..., Any]], proxy_factory: ProxyFactory, sink: Sink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name, plugin = bridge
    probe = Probe(name)
    proxy = await proxy_factory(plugin(closed_port()), probe, score(reject=15), upstream=sink.port)
    with caplog.at_level(logging.WARNING, logger=f"smtpproxy_plugins.{name}"):
        assert await send(port_of(proxy), SPAM) == (250, "2.0.0 Ok: queued as SINK1")
    assert len(sink.messages) == 1
    assert probe.tags == {f"{name}:error"}
    assert any(f"event={name} result=error" in r.getMessage() and "cannot connect" in r.getMessage()
               for r in caplog.records)


async def test_scanner_stopped_tempfails_when_configured(
    bridge: tuple[str, Callable[..., Any]], proxy_factory: ProxyFactory, sink: Sink
) -> None:
    _, plugin = bridge
    proxy = await proxy_factory(plugin(closed_port(), on_error="tempfail"), upstream=sink.port)
    code, text = await send(port_of(proxy), CLEAN)
    assert (code, text) == (451, "4.7.1 Spam check temporarily unavailable, try again later")
    assert sink.messages == []


async def test_scanner_that_never_answers_times_out_into_on_error(
    bridge: tuple[str, Callable[..., Any]], proxy_factory: ProxyFactory, sink: Sink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name, plugin = bridge

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the request, never answers
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        probe = Probe(name)
        proxy = await proxy_factory(plugin(port, timeout=0.3, on_error=3.0), probe, upstream=sink.port)
        with caplog.at_level(logging.WARNING, logger=f"smtpproxy_plugins.{name}"):
            started = time.monotonic()
            assert (await send(port_of(proxy), CLEAN))[0] == 250
            assert time.monotonic() - started < 3
        assert probe.tags == {f"{name}:error"} and probe.score == 3.0
        assert any("within 0.3 s" in r.getMessage() for r in caplog.records)
    finally:
        server.close()
