"""Upstream delivery: failover and back-off, priority, connection reuse, routing, relay mode,
and the client's identity passed on with XCLIENT/XFORWARD — against real loopback servers."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest

from smtpproxy import Session, hookimpl
from tests.conftest import ProxyFactory, RawUpstream, SinkHandler, Talk, closed_port, port_of, start_sink

RELAY = {"domains": ["dest.test", "other.test"], "networks": []}
BODY = b"Subject: up\r\n\r\nbody\r\n"


def smtp(**delivery: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"type": "smtp", "tls": "none", "connect_timeout": 2,
                            "command_timeout": 2, "data_timeout": 5}
    base.update(delivery)
    return base


async def send(port: int, rcpts: list[str], sender: str = "a@sender.test") -> tuple[int, str]:
    client = await Talk.open(port)
    await client.hello()
    reply = await client.send_message(sender, rcpts, BODY)
    await client.close()
    return reply


class CountingServer:
    """Counts connections; greets with a fixed reply (e.g. 421) and closes."""

    def __init__(self, greeting: bytes):
        self.greeting = greeting
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.write(self.greeting)
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])


async def test_failover_to_the_next_upstream_and_back_off(proxy_factory: ProxyFactory) -> None:
    busy = CountingServer(b"421 4.3.2 busy.test overloaded\r\n")
    busy_port = await busy.start()
    good = await start_sink()
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(upstreams=[
        {"host": "127.0.0.1", "port": busy_port, "priority": 1},
        {"host": "127.0.0.1", "port": closed_port(), "priority": 2},
        {"host": "127.0.0.1", "port": good.port, "priority": 3},
    ], down_backoff=60))
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    assert len(good.messages) == 2
    assert busy.connections == 1  # in back-off for the second message: not tried again
    good.server.close()


async def test_all_upstreams_down_is_a_temporary_failure(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(upstreams=[
        {"host": "127.0.0.1", "port": closed_port()}, {"host": "127.0.0.1", "port": closed_port()}]))
    code, text = await send(port_of(proxy), ["b@dest.test"])
    assert code == 451 and text.startswith("4.4.")


async def test_priority_decides_and_weight_shares(proxy_factory: ProxyFactory) -> None:
    first, second, backup = await start_sink(), await start_sink(), await start_sink()
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(upstreams=[
        {"host": "127.0.0.1", "port": backup.port, "priority": 20},
        {"host": "127.0.0.1", "port": first.port, "priority": 10, "weight": 1},
        {"host": "127.0.0.1", "port": second.port, "priority": 10, "weight": 1},
    ], pool={"max_idle": 0}))
    for _ in range(20):
        assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    assert backup.messages == []
    assert len(first.messages) + len(second.messages) == 20
    assert first.messages and second.messages  # 2**-19 chance of a false failure
    for sink in (first, second, backup):
        sink.server.close()


async def test_idle_connections_are_reused(proxy_factory: ProxyFactory) -> None:
    reused = await start_sink()
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=reused.port))
    for _ in range(3):
        assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    assert len(reused.messages) == 3
    assert len(reused.handler.helo_names) == 1  # one upstream connection for three messages
    fresh = await start_sink()
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=fresh.port,
                                                            pool={"max_idle": 0}))
    for _ in range(3):
        assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    assert len(fresh.handler.helo_names) == 3
    reused.server.close()
    fresh.server.close()


async def test_a_dead_pooled_connection_is_replaced(proxy_factory: ProxyFactory) -> None:
    sink = await start_sink()
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=sink.port))
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    for conn in (await _shared(proxy)).idle:
        conn.client.close()  # the upstream went away while the connection sat idle
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    assert len(sink.messages) == 2
    sink.server.close()


async def test_routes_split_transactions_by_domain(proxy_factory: ProxyFactory) -> None:
    default, other = await start_sink(), await start_sink()
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(
        host="127.0.0.1", port=default.port,
        routes=[{"domains": ["other.test"], "upstreams": [{"host": "127.0.0.1", "port": other.port}]}]))
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250
    assert await client.cmd("RCPT TO:<c@other.test>") == (
        452, "4.5.3 Recipients for other domains must be sent in a new transaction")
    assert (await client.cmd("DATA"))[0] == 354
    client.send(BODY + b".\r\n")
    assert (await client.reply())[0] == 250
    # the client sends the deferred recipient again, in its own transaction
    assert (await client.send_message("a@sender.test", ["c@other.test"], BODY))[0] == 250
    await client.close()
    assert [m.recipients for m in default.messages] == [["b@dest.test"]]
    assert [m.recipients for m in other.messages] == [["c@other.test"]]
    default.server.close()
    other.server.close()


async def test_relay_mode_relays_each_rcpt_answer(proxy_factory: ProxyFactory) -> None:
    handler = SinkHandler(rcpt_replies={"gone@dest.test": "550 5.1.1 <gone@dest.test>: User unknown",
                                        "full@dest.test": "452 4.2.2 Mailbox full"})
    sink = await start_sink(handler)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=sink.port,
                                                            rcpt_mode="relay"))
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert await client.cmd("RCPT TO:<b@dest.test>") == (250, "2.1.5 OK")  # the upstream's words
    assert await client.cmd("RCPT TO:<gone@dest.test>") == (550, "5.1.1 <gone@dest.test>: User unknown")
    assert await client.cmd("RCPT TO:<full@dest.test>") == (452, "4.2.2 Mailbox full")
    assert (await client.cmd("DATA"))[0] == 354
    client.send(BODY + b".\r\n")
    assert await client.reply() == (250, "2.0.0 Ok: queued as SINK1")
    # an abandoned transaction leaves nothing behind upstream
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250
    assert (await client.cmd("RSET"))[0] == 250
    await client.close()
    assert [m.recipients for m in sink.messages] == [["b@dest.test"]]
    sink.server.close()


class SetsName:
    name = "rdns"

    @hookimpl
    def connect(self, session: Session) -> None:
        session.client.hostname = "client.example"


async def test_xclient_passes_the_client_identity(proxy_factory: ProxyFactory) -> None:
    upstream = RawUpstream((b"XCLIENT NAME ADDR PORT PROTO HELO LOGIN", b"8BITMIME"))
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    proxy = await proxy_factory(SetsName(), relay=RELAY, delivery=smtp(
        host="127.0.0.1", port=server.sockets[0].getsockname()[1]))
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    verbs = [line.split(b" ")[0] for line in upstream.lines]
    assert verbs[:4] == [b"EHLO", b"XCLIENT", b"EHLO", b"MAIL"]  # new EHLO after XCLIENT
    xclient = upstream.lines[1].decode()
    assert re.fullmatch(r"XCLIENT ADDR=127\.0\.0\.1 PORT=\d+ NAME=client\.example HELO=client\.test "
                        r"PROTO=ESMTP LOGIN=\[UNAVAILABLE\]", xclient), xclient
    server.close()


async def test_xclient_answered_with_250_is_accepted(proxy_factory: ProxyFactory) -> None:
    """Postfix before 2.3 (and smtp-sink) answer XCLIENT with 250 rather than a 220 greeting."""
    upstream = RawUpstream((b"XCLIENT NAME ADDR PORT PROTO HELO LOGIN", b"8BITMIME"), xclient_reply=b"250 2.0.0 Ok")
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=server.sockets[0].getsockname()[1]))
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    assert [line.split(b" ")[0] for line in upstream.lines][:4] == [b"EHLO", b"XCLIENT", b"EHLO", b"MAIL"]
    server.close()


async def test_a_new_connection_sends_xclient_before_any_ehlo_once_it_is_known(
    proxy_factory: ProxyFactory,
) -> None:
    """The first connection learns from EHLO that XCLIENT is offered; later ones (every new
    client: the identity includes its port) send XCLIENT right after the greeting, then EHLO
    as the client. A refusal there falls back to EHLO, and XCLIENT is not assumed again
    until an EHLO offers it."""
    upstream = RawUpstream((b"XCLIENT NAME ADDR PORT PROTO HELO LOGIN", b"8BITMIME"))
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=server.sockets[0].getsockname()[1]))
    for _ in range(2):
        assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    verbs = [line.split(b" ")[0] for line in upstream.lines if line != b"QUIT"]  # QUIT: the first, retired
    assert verbs == [b"EHLO", b"XCLIENT", b"EHLO", b"MAIL", b"RCPT", b"DATA",  # learns XCLIENT
                     b"XCLIENT", b"EHLO", b"MAIL", b"RCPT", b"DATA"], verbs  # a new client: no EHLO first
    ports = [re.search(rb"PORT=(\d+)", line)[1] for line in upstream.commands(b"XCLIENT")]  # type: ignore[index]
    assert ports[0] != ports[1]  # each connection speaks for its own client
    del upstream.lines[:]
    upstream.xclient_reply = b"550 5.7.0 Error: insufficient authorization"
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 451
    assert [line.split(b" ")[0] for line in upstream.lines if line != b"QUIT"] == [b"XCLIENT", b"EHLO", b"XCLIENT"]
    server.close()


async def test_xforward_when_xclient_is_not_offered(proxy_factory: ProxyFactory) -> None:
    upstream = RawUpstream((b"XFORWARD NAME ADDR PROTO HELO SOURCE", b"8BITMIME"))
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(
        host="127.0.0.1", port=server.sockets[0].getsockname()[1]))
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    assert upstream.lines[1] == (
        b"XFORWARD ADDR=127.0.0.1 NAME=[UNAVAILABLE] HELO=client.test PROTO=ESMTP SOURCE=REMOTE")
    assert upstream.lines[2].startswith(b"MAIL FROM:<a@sender.test>")
    server.close()


async def test_required_identity_not_offered_is_a_temporary_failure(proxy_factory: ProxyFactory) -> None:
    sink = await start_sink()
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=sink.port,
                                                            client_identity="xclient"))
    assert await send(port_of(proxy), ["b@dest.test"]) == (
        451, "4.7.0 Upstream mail server does not accept the client identity")
    assert sink.messages == []
    sink.server.close()


async def test_pool_limits_messages_per_connection_and_idle_time(proxy_factory: ProxyFactory) -> None:
    sink = await start_sink()
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(
        host="127.0.0.1", port=sink.port, pool={"max_idle": 4, "max_messages": 2, "idle_timeout": 60}))
    for _ in range(4):
        assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    assert len(sink.handler.helo_names) == 2  # a connection retires after two messages
    stale = await start_sink()
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(
        host="127.0.0.1", port=stale.port, pool={"idle_timeout": 0.05}))
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    server = await _shared(proxy)
    server.idle[0].idle_since -= 1.0  # as if it had sat idle for a second
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    assert len(stale.handler.helo_names) == 2  # the stale connection was not reused
    sink.server.close()
    stale.server.close()


async def test_idle_connections_are_closed_after_their_idle_time(proxy_factory: ProxyFactory) -> None:
    sink = await start_sink()
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(
        host="127.0.0.1", port=sink.port, pool={"idle_timeout": 0.1}))
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    server = await _shared(proxy)
    assert len(server.idle) == 1
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while server.idle:  # the sweeper closes it without any new traffic
        assert loop.time() < deadline, "idle connection never swept"
        await asyncio.sleep(0.02)
    sink.server.close()


async def test_a_reused_connection_is_probed_by_xforward_or_else_by_rset(proxy_factory: ProxyFactory) -> None:
    """Postfix-style: an idle connection is checked before reuse; XFORWARD is that check when sent."""
    xforward = RawUpstream((b"XFORWARD NAME ADDR PROTO HELO SOURCE", b"8BITMIME"))
    plain = RawUpstream((b"8BITMIME",))
    for upstream in (xforward, plain):
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        proxy = await proxy_factory(relay=RELAY, delivery=smtp(
            host="127.0.0.1", port=server.sockets[0].getsockname()[1]))
        for _ in range(2):
            assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
        server.close()
    verbs = [[line.split(b" ")[0] for line in u.lines] for u in (xforward, plain)]
    assert verbs[0] == [b"EHLO", b"XFORWARD", b"MAIL", b"RCPT", b"DATA", b"XFORWARD", b"MAIL", b"RCPT", b"DATA"]
    assert verbs[1] == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"MAIL", b"RCPT", b"DATA"]


async def test_a_dead_pooled_connection_is_replaced_when_xforward_is_the_probe(proxy_factory: ProxyFactory) -> None:
    upstream = RawUpstream((b"XFORWARD NAME ADDR PROTO HELO SOURCE", b"8BITMIME"))
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=server.sockets[0].getsockname()[1]))
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    for conn in (await _shared(proxy)).idle:
        conn.client.close()  # the upstream went away while the connection sat idle
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    assert upstream.commands(b"EHLO") and len(upstream.commands(b"EHLO")) == 2  # a new connection
    server.close()


async def test_stopping_after_a_connection_was_retired_logs_no_error(
    proxy_factory: ProxyFactory,
) -> None:
    """A connection retired after its last message (once in a background task awaiting the
    QUIT's reply, now QUIT and closed at once). Stopping the proxy (and asyncio.run cancelling
    what is left, as at process exit) must log no error: the soak run found 'Exception in
    callback Connector.release' tracebacks."""
    upstream = RawUpstream(answers_quit=False)  # a hung upstream: QUIT never answered
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=port,
                                                           pool={"max_messages": 1}))
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250  # retired: QUIT is pending
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        await proxy.stop(grace=1)
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()
                     and "RawUpstream.serve" not in getattr(t.get_coro(), "__qualname__", "")]
        for task in leftovers:  # what asyncio.run does when the proxy's main() returns
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        await asyncio.sleep(0)  # done-callbacks run now
    finally:
        loop.set_exception_handler(previous)
        server.close()
    assert [c.get("message") for c in errors] == []


@pytest.mark.parametrize(("upstream_settings", "delivery", "code"), [
    pytest.param({}, {"pool": {"max_messages": 1}}, 250, id="after-its-last-message"),
    pytest.param({"extensions": (b"XCLIENT NAME ADDR PORT PROTO HELO LOGIN", b"8BITMIME"),
                  "xclient_reply": b"550 5.7.0 XCLIENT denied"},
                 {"client_identity": "xclient"}, 451, id="its-identity-refused"),
])
async def test_a_closed_connection_says_quit_and_hangs_up_without_waiting_for_221(
    proxy_factory: ProxyFactory, upstream_settings: dict[str, Any], delivery: dict[str, Any], code: int,
) -> None:
    """A connection is closed as Postfix's own client closes one (smtp_skip_quit_response):
    QUIT, then the connection ends at once, not after the reply (5 s from an upstream that
    never answers QUIT). So after its last message (pool.max_messages), and on the error
    paths, where the client's 4xx (a refused XCLIENT) no longer waits for it either."""
    upstream = RawUpstream(answers_quit=False, **upstream_settings)
    ended = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.serve(reader, writer)  # returns at the proxy's end of the connection
        ended.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=port, **delivery))
    try:
        started = time.monotonic()
        assert (await send(port_of(proxy), ["b@dest.test"]))[0] == code
        assert time.monotonic() - started < 2, "the client's answer waited for QUIT's reply"
        await asyncio.wait_for(ended.wait(), 2)
        assert upstream.lines[-1] == b"QUIT"
    finally:
        server.close()


async def test_shutdown_does_not_wait_for_an_upstream_that_never_answers_quit(
    proxy_factory: ProxyFactory,
) -> None:
    """Idle connections are closed at shutdown as after their last message: QUIT, then hang
    up. An upstream that stopped answering cannot hold the stop for a QUIT timeout (5 s)
    per idle connection."""
    upstream = RawUpstream(answers_quit=False)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=port))
    try:
        replies = await asyncio.gather(*(send(port_of(proxy), ["b@dest.test"]) for _ in range(3)))
        assert [code for code, _ in replies] == [250, 250, 250]
        pooled = await _shared(proxy)
        assert len(pooled.idle) == 3  # each message on its own connection, now idle
        loop = asyncio.get_running_loop()
        started = loop.time()
        await proxy.stop(grace=1)
        assert loop.time() - started < 2
        await _until(lambda: len(upstream.commands(b"QUIT")) == 3, "a QUIT was not sent")
    finally:
        server.close()


class GatedSink(SinkHandler):
    """Holds every DATA reply until ``count`` deliveries are in flight at once."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.waiting = 0
        self.all_in = asyncio.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.waiting += 1
        if self.waiting >= self.count:
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), 10)
        return await super().handle_DATA(server, session, envelope)


async def test_the_default_pool_keeps_the_connections_of_a_busy_moment(proxy_factory: ProxyFactory) -> None:
    """Issue 15: 20 deliveries in flight at once leave 20 idle connections, and the next 20
    messages reuse them: a busy MX does not reconnect upstream per message (with the old
    default of 4 idle connections, 16 of them were closed and opened again)."""
    handler = GatedSink(20)
    sink = await start_sink(handler)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=sink.port))
    port = port_of(proxy)
    first = await asyncio.gather(*(send(port, ["b@dest.test"]) for _ in range(20)))
    assert [code for code, _ in first] == [250] * 20
    assert len(handler.helo_names) == 20  # the gate made all 20 deliveries overlap
    server = await _shared(proxy)
    assert len(server.idle) == 20
    handler.waiting, handler.count = 0, 1  # the second wave passes the gate at once
    for _ in range(20):
        assert (await send(port, ["b@dest.test"]))[0] == 250
    assert len(handler.helo_names) == 20  # all reused: no new upstream connection
    sink.server.close()


async def _shared(proxy: Any) -> Any:
    """The upstream server, once the last client's session has ended: its connection is
    then in the shared pool (``idle``), no longer held for that client."""
    server = proxy.services.delivery.servers[0]
    await _until(lambda: not server.held, "the client's session never ended")
    return server


async def _until(done: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not done():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_connection_that_speaks_for_one_client_waits_for_its_next_message(
    proxy_factory: ProxyFactory,
) -> None:
    """XCLIENT with the client's port makes a connection that client's alone. Three clients
    with messages in turn keep one connection each, even with one idle connection allowed
    (before: each message took the oldest idle connection, found it spoke for another client,
    closed it and opened one of its own); each is closed when its client leaves."""
    upstream = RawUpstream((b"XCLIENT NAME ADDR PORT PROTO HELO LOGIN", b"8BITMIME"))
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(
        host="127.0.0.1", port=server.sockets[0].getsockname()[1], pool={"max_idle": 1}))
    clients = [await Talk.open(port_of(proxy)) for _ in range(3)]
    for client in clients:
        await client.hello()
    for _ in range(2):
        for client in clients:
            assert (await client.send_message("a@sender.test", ["b@dest.test"], BODY))[0] == 250
    assert len(upstream.commands(b"MAIL")) == 6
    ports = [re.search(rb"PORT=(\d+)", line)[1] for line in upstream.commands(b"XCLIENT")]  # type: ignore[index]
    assert len(ports) == 3 and len(set(ports)) == 3, ports  # one connection per client, kept
    assert upstream.commands(b"QUIT") == []
    pool = proxy.services.delivery.servers[0]  # type: ignore[attr-defined]
    assert len(pool.held) == 3 and not pool.idle
    for client in clients:
        await client.close()
    await _until(lambda: len(upstream.commands(b"QUIT")) == 3, "the clients' connections were not closed")
    assert pool.held == {} and not pool.idle
    server.close()


async def test_a_held_connection_is_closed_after_its_idle_time_and_its_client_gets_another(
    proxy_factory: ProxyFactory,
) -> None:
    upstream = RawUpstream((b"XCLIENT NAME ADDR PORT PROTO HELO LOGIN", b"8BITMIME"))
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(
        host="127.0.0.1", port=server.sockets[0].getsockname()[1], pool={"idle_timeout": 0.1}))
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.send_message("a@sender.test", ["b@dest.test"], BODY))[0] == 250
    pool = proxy.services.delivery.servers[0]  # type: ignore[attr-defined]
    assert len(pool.held) == 1
    await _until(lambda: upstream.commands(b"QUIT"), "the sweeper never closed the held connection")
    assert pool.held == {}
    assert (await client.send_message("a@sender.test", ["b@dest.test"], BODY))[0] == 250
    assert len(upstream.commands(b"XCLIENT")) == 2  # a new connection, told the client again
    await client.close()
    server.close()


async def test_a_held_connection_given_back_after_its_client_left_is_closed(
    proxy_factory: ProxyFactory,
) -> None:
    """QUIT in the middle of a transaction: the upstream one is aborted in the background
    (RSET) after the session ended, and its connection is then closed, not held for nobody."""
    upstream = RawUpstream((b"XCLIENT NAME ADDR PORT PROTO HELO LOGIN", b"8BITMIME"))
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(
        host="127.0.0.1", port=server.sockets[0].getsockname()[1]))
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250  # asked of the upstream
    await client.close()
    await _until(lambda: upstream.commands(b"QUIT"), "the aborted transaction's connection stayed open")
    assert [line.split(b" ")[0] for line in upstream.lines][-2:] == [b"RSET", b"QUIT"]
    pool = proxy.services.delivery.servers[0]  # type: ignore[attr-defined]
    assert pool.held == {} and not pool.idle
    server.close()


async def test_clients_in_flight_together_keep_their_connections_beyond_max_idle(
    proxy_factory: ProxyFactory,
) -> None:
    """Three clients whose messages are in flight at once, then again: the three upstream
    connections wait for their clients' next messages, max_idle 1 notwithstanding (before,
    two of them were closed after each message and opened again for the next). When the
    clients leave, one stays idle for anyone and the others say QUIT."""
    handler = GatedSink(3)
    sink = await start_sink(handler)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(host="127.0.0.1", port=sink.port,
                                                            pool={"max_idle": 1}))
    clients = [await Talk.open(port_of(proxy)) for _ in range(3)]
    for client in clients:
        await client.hello()
    for _ in range(2):
        handler.waiting = 0
        handler.all_in.clear()
        replies = await asyncio.gather(*(
            client.send_message("a@sender.test", ["b@dest.test"], BODY) for client in clients))
        assert [code for code, _ in replies] == [250] * 3
    assert len(sink.messages) == 6
    assert len(handler.helo_names) == 3  # three connections, opened once
    pool = proxy.services.delivery.servers[0]  # type: ignore[attr-defined]
    assert sum(map(len, pool.held.values())) == 3 and not pool.idle
    for client in clients:
        await client.close()
    await _until(lambda: not pool.held, "the clients' sessions never ended")
    assert len(pool.idle) == 1
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250  # a new client takes it
    assert len(handler.helo_names) == 3
    sink.server.close()


async def test_stopping_closes_the_connections_held_for_clients_still_connected(
    proxy_factory: ProxyFactory,
) -> None:
    """A client still connected at shutdown (its session ended by the proxy) leaves no
    upstream connection open: the one held for it (pinned, XCLIENT with PORT) and the one held
    for another (shareable, XFORWARD) both say QUIT."""
    pinned = RawUpstream((b"XCLIENT NAME ADDR PORT PROTO HELO LOGIN", b"8BITMIME"))
    shared = RawUpstream((b"XFORWARD NAME ADDR PROTO HELO SOURCE", b"8BITMIME"))
    for upstream in (pinned, shared):
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        proxy = await proxy_factory(relay=RELAY, delivery=smtp(
            host="127.0.0.1", port=server.sockets[0].getsockname()[1]))
        client = await Talk.open(port_of(proxy))
        await client.hello()
        assert (await client.send_message("a@sender.test", ["b@dest.test"], BODY))[0] == 250
        pool = proxy.services.delivery.servers[0]  # type: ignore[attr-defined]
        assert len(pool.held) == 1 and upstream.commands(b"QUIT") == []
        await proxy.stop(grace=1)
        await _until(lambda u=upstream: u.commands(b"QUIT"), "a held connection was left open")
        assert pool.held == {} and not pool.idle
        await client.close()
        server.close()


async def test_a_client_that_greets_again_with_another_name_gets_a_connection_that_says_so(
    proxy_factory: ProxyFactory,
) -> None:
    """The connection held for a client carries its XCLIENT HELO=; after a second EHLO with
    another name Postfix must hear that name: the held connection is closed, not reused with
    the old identity, and a new one says XCLIENT HELO=<new name>."""
    upstream = RawUpstream((b"XCLIENT NAME ADDR PORT PROTO HELO LOGIN", b"8BITMIME"))
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(
        host="127.0.0.1", port=server.sockets[0].getsockname()[1]))
    client = await Talk.open(port_of(proxy))
    await client.hello("first.example")
    assert (await client.send_message("a@sender.test", ["b@dest.test"], BODY))[0] == 250
    assert (await client.cmd("EHLO second.example"))[0] == 250
    assert (await client.send_message("a@sender.test", ["b@dest.test"], BODY))[0] == 250
    helos = [re.search(rb"HELO=(\S+)", line)[1] for line in upstream.commands(b"XCLIENT")]  # type: ignore[index]
    assert helos == [b"first.example", b"second.example"]
    assert len(upstream.commands(b"QUIT")) == 1  # the first client identity's connection
    await client.close()
    server.close()
