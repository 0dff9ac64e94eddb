"""Upstream PIPELINING (RFC 2920): what goes over the wire in one write, and that every reply
is matched to its command in order, however the server's replies are cut into packets.

The upstream here is a raw loopback server that records each read (one read is one write of
the proxy's on loopback) and answers a group with one write, or byte by byte."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpproxy.delivery.pipelining import OutOfStep, pipeline
from tests.conftest import ProxyFactory, Talk, port_of

RELAY = {"domains": ["dest.test"], "networks": []}
BODY = b"Subject: piped\r\n\r\nbody\r\n"
XFORWARD = b"XFORWARD NAME ADDR PROTO HELO SOURCE"


@dataclass
class PipeliningUpstream:
    """Offers PIPELINING; records every read per connection; answers each read in one write.

    ``refuse``: recipients answered 550. ``xforward_code``: the reply to XFORWARD.
    ``bytewise``: replies written one byte at a time (each its own packet). ``die_on_reuse``:
    a connection that already took a message closes, without a word, when the next one starts
    (an upstream that timed out an idle connection the proxy has not noticed yet).
    """

    extensions: tuple[bytes, ...] = (b"PIPELINING", b"8BITMIME", XFORWARD)
    refuse: frozenset[bytes] = frozenset()
    xforward_code: int = 250
    bytewise: bool = False
    die_on_reuse: bool = False
    stall_on: bytes | None = None
    """A verb after which the server says nothing more (a hung upstream)."""
    stall_on_reuse_only: bool = False
    """``stall_on`` only on a connection that already took a message."""
    refuse_xforward_on_reuse: bool = False
    odd: dict[bytes, bytes] = field(default_factory=dict)
    """Replies that make no sense for the verb (b"<data>": the end of data)."""
    extra: dict[bytes, bytes] = field(default_factory=dict)
    """A second reply to the verb, in the same write (an upstream that answers more than asked)."""
    early: bytes | None = None
    """A reply to the first line of message data, before the rest is read; the server then
    reads nothing for a second (as if it stopped to say so) and goes on."""
    """XFORWARD on a connection that already took a message gets 550 (the rest is accepted)."""
    """A verb after which the server says nothing more (a hung upstream)."""
    connections: list[list[list[bytes]]] = field(default_factory=list)
    """Per connection, per read: the command lines (message data shown as b"<data>")."""
    messages: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reads: list[list[bytes]] = []
        self.connections.append(reads)
        writer.write(b"220 pipe.test ESMTP\r\n")
        buffer, data, delivered, in_data = b"", b"", 0, False
        try:
            while chunk := await reader.read(65536):
                buffer += chunk
                lines, replies = [], []
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if in_data:
                        if line == b".\r":
                            self.messages.append(data)
                            data, in_data, delivered = b"", False, delivered + 1
                            lines.append(b"<data>")
                            replies.append(self.odd.get(b"<data>", b"250 2.0.0 Ok: queued"))
                            replies += [self.extra[b"<data>"]] if b"<data>" in self.extra else []
                        else:
                            if self.early is not None and not data:
                                writer.write(self.early + b"\r\n")
                                await asyncio.sleep(1)
                            data += line + b"\n"
                        continue
                    line = line.rstrip(b"\r")
                    lines.append(line)
                    verb = line.split(b" ")[0].upper()
                    if self.die_on_reuse and delivered and verb in (b"RSET", b"XFORWARD", b"MAIL"):
                        reads.append(lines)
                        return
                    if verb == self.stall_on and (delivered or not self.stall_on_reuse_only):
                        reads.append(lines)
                        await reader.read()
                        return
                    if verb == b"XFORWARD" and delivered and self.refuse_xforward_on_reuse:
                        replies.append(b"550 5.7.0 not any more")
                        continue
                    replies.append(self.odd.get(verb) or self._reply(verb, line))
                    in_data = verb == b"DATA" and replies[-1].startswith(b"354")
                    replies += [self.extra[verb]] if verb in self.extra else []
                    if verb == b"QUIT":
                        break
                reads.append(lines)
                out = b"".join(reply + b"\r\n" for reply in replies)
                if self.bytewise:
                    for i in range(len(out)):
                        writer.write(out[i : i + 1])
                        await writer.drain()
                        await asyncio.sleep(0)
                else:
                    writer.write(out)
                if lines and lines[-1] == b"QUIT":
                    break
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _reply(self, verb: bytes, line: bytes) -> bytes:
        if verb == b"EHLO":
            offered = [b"pipe.test", *self.extensions]
            return b"\r\n".join(b"250" + (b" " if i == len(offered) - 1 else b"-") + e
                                for i, e in enumerate(offered))
        if verb == b"XFORWARD":
            return b"%d 5.7.0 not for you" % self.xforward_code if self.xforward_code != 250 else b"250 2.0.0 Ok"
        if verb == b"RCPT" and line[len(b"RCPT TO:<"):].split(b">")[0] in self.refuse:
            return b"550 5.1.1 <" + line[len(b"RCPT TO:<"):].split(b">")[0] + b">: no such user"
        if verb == b"DATA":
            return b"354 go ahead"
        if verb == b"QUIT":
            return b"221 bye"
        return b"250 2.0.0 Ok"

    def reads(self, connection: int = 0) -> list[list[bytes]]:
        return self.connections[connection]


def verbs(read: list[bytes]) -> list[bytes]:
    return [line.split(b" ")[0] for line in read]


async def start(upstream: PipeliningUpstream, *, small_window: bool = False) -> tuple[asyncio.Server, int]:
    """*small_window*: a small TCP receive buffer, so a big message fills it and the proxy's
    writes wait for the upstream to read (the listening socket's buffer size is inherited)."""
    sock = socket.socket()
    if small_window:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(upstream.serve, sock=sock)
    return server, server.sockets[0].getsockname()[1]


def smtp(port: int, **extra: Any) -> dict[str, Any]:
    return {"type": "smtp", "host": "127.0.0.1", "port": port, "tls": "none", "connect_timeout": 2,
            "command_timeout": 2, "data_timeout": 5, **extra}


async def send(port: int, rcpts: list[str]) -> tuple[int, str]:
    client = await Talk.open(port)
    await client.hello("client.example")
    code, text = await client.cmd("MAIL FROM:<a@sender.test>")
    assert code == 250, text
    answers = [await client.cmd(f"RCPT TO:<{rcpt}>") for rcpt in rcpts]
    if not any(code == 250 for code, _ in answers):
        await client.close()
        return answers[0]
    assert (await client.cmd("DATA"))[0] == 354
    client.send(BODY + b".\r\n")
    reply = await client.reply()
    await client.close()
    return reply


async def test_at_data_sends_xforward_mail_rcpts_and_data_in_one_write(proxy_factory: ProxyFactory) -> None:
    upstream = PipeliningUpstream()
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode="at_data"))
    for _ in range(2):
        assert (await send(port_of(proxy), ["b@dest.test", "c@dest.test"]))[0] == 250
    server.close()
    assert len(upstream.connections) == 1  # the second message reused the connection
    groups = [verbs(read) for read in upstream.reads()]
    group = [b"XFORWARD", b"MAIL", b"RCPT", b"RCPT", b"DATA"]
    assert groups == [[b"EHLO"], group, [b"<data>"], group, [b"<data>"]]
    assert len(upstream.messages) == 2


async def test_with_xclient_the_reuse_probe_goes_in_the_group_too(proxy_factory: ProxyFactory) -> None:
    """Postfix's setup: XCLIENT (and the EHLO after it) once per connection, on their own; a
    connection reused for the same client sends its RSET probe in the message's one write."""
    upstream = PipeliningUpstream(extensions=(b"PIPELINING", b"8BITMIME", b"XCLIENT NAME ADDR PORT HELO PROTO"))
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode="at_data"))
    client = await Talk.open(port_of(proxy))
    await client.hello("client.example")
    for _ in range(2):
        assert (await client.send_message("a@sender.test", ["b@dest.test"], BODY))[0] == 250
    await client.close()
    server.close()
    assert [verbs(read) for read in upstream.reads()] == [
        [b"EHLO"], [b"XCLIENT"], [b"EHLO"], [b"MAIL", b"RCPT", b"DATA"], [b"<data>"],
        [b"RSET", b"MAIL", b"RCPT", b"DATA"], [b"<data>"],
    ]


async def test_relay_mode_opens_the_transaction_in_one_write(proxy_factory: ProxyFactory) -> None:
    upstream = PipeliningUpstream(refuse=frozenset({b"nobody@dest.test"}))
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode="relay"))
    client = await Talk.open(port_of(proxy))
    await client.hello("client.example")
    for _ in range(2):
        assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
        assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250
        assert await client.cmd("RCPT TO:<nobody@dest.test>") == (550, "5.1.1 <nobody@dest.test>: no such user")
        assert (await client.cmd("DATA"))[0] == 354
        client.send(BODY + b".\r\n")
        assert (await client.reply())[0] == 250
    await client.close()
    server.close()
    groups = [verbs(read) for read in upstream.reads()]
    opening = [[b"XFORWARD", b"MAIL", b"RCPT"], [b"RCPT"], [b"DATA"], [b"<data>"]]
    assert groups == [[b"EHLO"], *opening, *opening]


async def test_replies_cut_into_single_bytes_are_matched_in_order(proxy_factory: ProxyFactory) -> None:
    """aiosmtplib alone drops a reply that arrives while the previous one waits to be read."""
    upstream = PipeliningUpstream(bytewise=True, refuse=frozenset({b"x2@dest.test"}))
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode="at_data", refusal_memory=0))
    code, text = await send(port_of(proxy), ["x1@dest.test", "x2@dest.test", "x3@dest.test"])
    assert code == 451 and "x2@dest.test" in text and "x1@" not in text and "x3@" not in text
    assert (await send(port_of(proxy), ["x1@dest.test", "x3@dest.test"]))[0] == 250
    server.close()
    assert len(upstream.messages) == 1


async def test_partial_refusal_after_a_pipelined_data_closes_without_sending_the_message(
    proxy_factory: ProxyFactory,
) -> None:
    """DATA was answered 354 for the recipient the upstream took; the client must hear 451
    and nobody may get the message: the only way out is closing the connection."""
    upstream = PipeliningUpstream(refuse=frozenset({b"gone@dest.test"}))
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode="at_data"))
    code, _ = await send(port_of(proxy), ["b@dest.test", "gone@dest.test"])
    assert code == 451
    assert upstream.messages == []
    assert [verbs(read) for read in upstream.reads(0)][-1] == [b"XFORWARD", b"MAIL", b"RCPT", b"RCPT", b"DATA"]
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250  # on a new connection
    server.close()
    assert len(upstream.connections) == 2 and len(upstream.messages) == 1


async def test_a_reused_connection_found_dead_by_the_group_is_replaced(proxy_factory: ProxyFactory) -> None:
    for rcpt_mode in ("at_data", "relay"):
        upstream = PipeliningUpstream(die_on_reuse=True)
        server, port = await start(upstream)
        proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode=rcpt_mode))
        for _ in range(3):
            assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250, rcpt_mode
        server.close()
        assert len(upstream.messages) == 3 and len(upstream.connections) == 3, rcpt_mode


async def test_a_reused_connection_whose_probe_fails_after_a_pipelined_354_is_closed_at_once(
    proxy_factory: ProxyFactory,
) -> None:
    """The probe (XFORWARD) is refused but MAIL, RCPT and DATA were taken: the upstream waits
    for message data, so the connection is closed at once (a QUIT would be a line of the
    message and wait for a reply that never comes) and the message goes on a new one."""
    upstream = PipeliningUpstream(refuse_xforward_on_reuse=True)
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode="at_data"))
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250
    assert loop.time() - started < 1.5  # no wait for a QUIT reply in DATA mode
    server.close()
    assert len(upstream.messages) == 2 and len(upstream.connections) == 2


@pytest.mark.parametrize("rcpt_mode", ["at_data", "relay"])
@pytest.mark.parametrize("odd", [{b"RCPT": b"354 go on"}, {b"MAIL": b"220 hello again"},
                                 {b"DATA": b"250 fine"}, {b"<data>": b"251 sure"}])
@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_reply_that_makes_no_sense_for_the_command_is_a_tempfail(
    proxy_factory: ProxyFactory, rcpt_mode: str, odd: dict[bytes, bytes], pipelining: bool
) -> None:
    """Transparency is for answers: a positive reply no command may get (an upstream out of
    step, or hostile) must never reach the client as a success. 451, and no reuse."""
    extensions = (b"PIPELINING", b"8BITMIME", XFORWARD) if pipelining else (b"8BITMIME", XFORWARD)
    upstream = PipeliningUpstream(odd=odd, extensions=extensions)
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode=rcpt_mode))
    code, text = await send(port_of(proxy), ["b@dest.test"])
    [sent] = odd.values()
    assert (code, text) == (451, f"4.4.0 Upstream sent an unexpected reply ({sent[:3].decode()}), try again later")
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 451
    server.close()
    assert len(upstream.connections) == 2  # never reused after it


@pytest.mark.parametrize("rcpt_mode", ["at_data", "relay"])
@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_positive_reply_before_the_end_of_the_message_is_never_the_answer(
    proxy_factory: ProxyFactory, rcpt_mode: str, pipelining: bool
) -> None:
    """An upstream that says "250 queued" after the first line of message data and refuses
    the message at its end: the 250 answered nothing (the message was not there yet). The
    client gets 451, the rest of the message is not sent, and the connection is closed."""
    extensions = (b"PIPELINING", b"8BITMIME", XFORWARD) if pipelining else (b"8BITMIME", XFORWARD)
    upstream = PipeliningUpstream(extensions=extensions, early=b"250 2.0.0 Ok: queued as EARLY",
                                  odd={b"<data>": b"554 5.6.0 that was not a message"})
    server, port = await start(upstream, small_window=True)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode=rcpt_mode))
    body = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + (b"y" * 78 + b"\r\n") * 120_000  # 9.6 MB
    client = await Talk.open(port_of(proxy))
    await client.hello("client.example")
    code, text = await client.send_message("a@sender.test", ["b@dest.test"], body)
    await client.close()
    assert (code, text) == (451, "4.4.0 Upstream sent an unexpected reply (250), try again later")
    server.close()
    await asyncio.sleep(1.5)  # the upstream's pause ends: it reads the rest, then the end of the connection
    assert upstream.messages == []  # the terminator was never sent
    assert [verbs(read)[-1:] for read in upstream.reads()][-1] != [b"QUIT"]  # closed, no QUIT


@pytest.mark.parametrize("rcpt_mode", ["at_data", "relay"])
@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("extra", [{b"RCPT": b"250 2.1.5 Ok again"}, {b"DATA": b"250 2.0.0 Ok: queued"},
                                   {b"MAIL": b"250 2.1.0 Ok again"}, {b"<data>": b"554 5.0.0 no"}])
async def test_a_reply_where_none_is_due_is_a_tempfail(
    proxy_factory: ProxyFactory, rcpt_mode: str, pipelining: bool, extra: dict[bytes, bytes]
) -> None:
    """A second reply to one command, in the same packet (a 250 right behind the 354 would
    otherwise be read as the answer to the message): the upstream is out of step; 451, and
    the connection is not used again."""
    extensions = (b"PIPELINING", b"8BITMIME", XFORWARD) if pipelining else (b"8BITMIME", XFORWARD)
    upstream = PipeliningUpstream(extensions=extensions, extra=extra)
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode=rcpt_mode))
    code, text = await send(port_of(proxy), ["b@dest.test"])
    # The code named is the reply left over (in a pipelined group, the last one).
    assert code == 451 and text.startswith("4.4.0 Upstream sent an unexpected reply ("), text
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 451
    server.close()
    assert len(upstream.connections) == 2  # never reused after it


@pytest.mark.parametrize("rcpt_mode", ["at_data", "relay"])
async def test_an_upstream_that_stops_answering_mid_group_is_a_tempfail(
    proxy_factory: ProxyFactory, rcpt_mode: str
) -> None:
    upstream = PipeliningUpstream(stall_on=b"RCPT")
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode=rcpt_mode, command_timeout=0.5))
    loop = asyncio.get_running_loop()
    started = loop.time()
    code, text = await send(port_of(proxy), ["b@dest.test"])
    server.close()
    assert (code, text) == (451, "4.4.2 Upstream mail server timed out, try again later")
    assert loop.time() - started < 5  # the command timeout, not the client's patience
    assert upstream.messages == []


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_reused_connection_that_times_out_gets_one_retry_on_a_new_one(
    proxy_factory: ProxyFactory, pipelining: bool
) -> None:
    """A reused connection that times out in the group (or, without pipelining, in its probe)
    may be wedged, or the upstream may be slow (a slow recipient check): one more try on a
    new connection, never one command timeout per idle connection in turn. Two idle
    connections here, both wedged."""
    if pipelining:
        upstream = PipeliningUpstream(stall_on=b"RCPT", stall_on_reuse_only=True)
    else:
        upstream = PipeliningUpstream(extensions=(b"8BITMIME", XFORWARD), stall_on=b"XFORWARD",
                                      stall_on_reuse_only=True)
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode="relay", command_timeout=0.5))
    clients = [await Talk.open(port_of(proxy)) for _ in range(2)]
    for client in clients:  # two transactions open at once: two upstream connections
        await client.hello("client.example")
        assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
        assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250
    for client in clients:
        assert (await client.cmd("DATA"))[0] == 354
        client.send(BODY + b".\r\n")
        assert (await client.reply())[0] == 250
        await client.close()
    assert len(upstream.connections) == 2
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await send(port_of(proxy), ["b@dest.test"]))[0] == 250  # on a third, new connection
    assert loop.time() - started < 0.95  # one timeout, not two
    server.close()
    assert len(upstream.connections) == 3 and len(upstream.messages) == 3


async def test_xforward_refused_in_the_group_is_a_tempfail_and_no_message(proxy_factory: ProxyFactory) -> None:
    upstream = PipeliningUpstream(xforward_code=550)
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode="at_data", client_identity="xforward"))
    code, _ = await send(port_of(proxy), ["b@dest.test"])
    server.close()
    assert code == 451  # the upstream's 550 to XFORWARD is the proxy's problem, not the sender's
    assert upstream.messages == []


async def test_pipelining_false_sends_one_command_at_a_time(proxy_factory: ProxyFactory) -> None:
    upstream = PipeliningUpstream()
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode="at_data", pipelining=False))
    assert (await send(port_of(proxy), ["b@dest.test", "c@dest.test"]))[0] == 250
    server.close()
    assert all(len(read) == 1 for read in upstream.reads())
    assert len(upstream.messages) == 1


async def test_a_server_without_pipelining_gets_one_command_at_a_time(proxy_factory: ProxyFactory) -> None:
    upstream = PipeliningUpstream(extensions=(b"8BITMIME", XFORWARD))
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, delivery=smtp(port, rcpt_mode="at_data"))
    for _ in range(2):
        assert (await send(port_of(proxy), ["b@dest.test", "c@dest.test"]))[0] == 250
    server.close()
    assert all(len(read) == 1 for read in upstream.reads())
    assert len(upstream.messages) == 2


# -- the protocol on its own: any cut of the reply stream -----------------------------------


async def scripted(serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                   ) -> tuple[asyncio.Server, aiosmtplib.SMTP]:
    """A loopback server running *serve*, and an aiosmtplib client connected to it (greeted,
    nothing else sent)."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.sockets[0].getsockname()[1], timeout=5,
                             start_tls=False)
    await client.connect()
    return server, client

REPLIES = [b"250 2.0.0 Ok", b"250-one\r\n250-two\r\n250 three", b"550 5.1.1 no", b"250 2.1.5 Ok",
           b"452 4.5.3 too many", b"354 go"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=120), max_size=12))
def test_any_cut_of_the_replies_gives_each_command_its_own(cuts: list[int]) -> None:
    stream = b"".join(reply + b"\r\n" for reply in REPLIES)
    points = sorted({c for c in cuts if c < len(stream)})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 cut.test\r\n")
        await reader.readline()  # the whole group is one write; wait for its first line
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.001)  # each piece its own packet
        await reader.read()
        writer.close()

    async def main() -> list[tuple[int, str]]:
        server, client = await scripted(serve)
        commands = [b"RSET", b"MAIL FROM:<a@b.test>", b"RCPT TO:<c@d.test>", b"RCPT TO:<e@d.test>",
                    b"RCPT TO:<f@d.test>", b"DATA"]
        replies = await pipeline(client, commands, 5)
        client.close()
        server.close()
        return [(r.code, r.message) for r in replies]

    got = asyncio.run(main())
    assert got == [(250, "2.0.0 Ok"), (250, "one\ntwo\nthree"), (550, "5.1.1 no"), (250, "2.1.5 Ok"),
                   (452, "4.5.3 too many"), (354, "go")]


async def test_a_reply_for_no_command_is_never_paired_with_a_later_one() -> None:
    """Bytes the server sends when nothing is due are dropped (as aiosmtplib does), so they
    cannot be taken as the answer to the next group."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 x\r\n")
        await reader.readline()
        writer.write(b"250 first\r\n")
        await reader.readline()
        await reader.readline()
        writer.write(b"250 a\r\n250 b\r\n")
        await reader.read()
        writer.close()

    server, client = await scripted(serve)
    assert [r.message for r in await pipeline(client, [b"NOOP"], 5)] == ["first"]
    assert client.protocol is not None
    client.protocol.data_received(b"250 unsolicited\r\n")
    assert [r.message for r in await pipeline(client, [b"NOOP", b"NOOP"], 5)] == ["a", "b"]
    client.close()
    server.close()


async def test_extra_replies_in_the_same_packet_put_the_connection_out_of_step() -> None:
    """One reply too many: which command did the server answer? Neither is trusted; the
    connection is closed (it was: the next command's answer would have been the extra one,
    had it come a packet later)."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 x\r\n")
        await reader.readline()
        writer.write(b"250 asked\r\n354 not asked\r\n")  # one packet, one reply too many
        await reader.read()
        writer.close()

    server, client = await scripted(serve)
    with pytest.raises(OutOfStep) as raised:
        await pipeline(client, [b"NOOP"], 5)
    assert raised.value.code == 354
    assert not client.is_connected
    server.close()


async def test_a_command_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 x\r\n")
        received.set_result(await reader.read())
        writer.close()

    server, client = await scripted(serve)
    with pytest.raises(ValueError, match="prohibited"):
        await pipeline(client, [b"MAIL FROM:<a@b.test>", b"RCPT TO:<c@d.test>\r\nDATA"], 5)
    client.close()
    server.close()
    assert await asyncio.wait_for(received, 5) == b""  # the connection closed with nothing sent


# -- the reply deadline: one timer per connection, moved lazily ------------------------------


async def test_each_reply_gets_its_own_deadline_from_one_lazy_timer() -> None:
    """A later deadline does not fire early (the timer armed for an earlier command re-arms
    itself), an earlier one is kept, and a missed one times the command out and closes."""
    delays = [0.0, 0.3, 0.0, None]  # per command: answer after that long; None: never

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow.test\r\n")
        for delay in delays:
            await reader.readline()
            if delay is None:
                await reader.read()
                break
            await asyncio.sleep(delay)
            writer.write(b"250 2.0.0 Ok\r\n")
        writer.close()

    server, client = await scripted(serve)
    loop = asyncio.get_running_loop()
    assert (await pipeline(client, [b"NOOP"], 0.2))[0].code == 250  # arms the timer for 0.2 s
    started = loop.time()
    assert (await pipeline(client, [b"NOOP"], 5))[0].code == 250  # 0.3 s: past the first deadline
    assert loop.time() - started >= 0.25
    assert (await pipeline(client, [b"NOOP"], 30))[0].code == 250
    protocol = client.protocol
    assert protocol is not None and protocol._watch is not None  # type: ignore[attr-defined]
    started = loop.time()
    with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
        await pipeline(client, [b"NOOP"], 0.2)  # earlier than the armed timer: re-armed for it
    assert 0.15 <= loop.time() - started < 2
    assert not client.is_connected
    server.close()

    delays = [0.0]
    server, client = await scripted(serve)
    assert (await pipeline(client, [b"NOOP"], 30))[0].code == 250
    protocol = client.protocol
    assert protocol is not None and protocol._watch is not None  # type: ignore[attr-defined]
    client.close()
    await asyncio.sleep(0.05)  # connection_lost runs
    assert protocol._watch is None  # type: ignore[attr-defined]  # not kept alive by its timer
    server.close()


@pytest.mark.parametrize("greeting", [b"220 ok.test ESMTP\r\n", b"220-ok.test\r\n220 ESMTP\r\n",
                                      b"554 5.3.2 go away\r\n", b"", None])
async def test_opening_a_connection_gives_what_aiosmtplib_connect_gives(greeting: bytes | None) -> None:
    """open_connection() against aiosmtplib's own connect(): the same greeting, or the same
    exception with the same text (a refusal, a close before the greeting, silence); either
    way a failed client is left closed."""
    from smtpproxy.delivery.pipelining import PipeliningProtocol, open_connection

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if greeting is None:  # silent
            await reader.read()
        else:
            writer.write(greeting)
            await writer.drain()
            if not greeting:
                writer.close()
                return
            while await reader.readline():
                writer.write(b"250 2.0.0 Ok\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def outcome(ours: bool) -> tuple[object, ...]:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5, start_tls=False,
                                 local_hostname="proxy.test")
        try:
            response = (await open_connection(client, 0.3) if ours else await client.connect(timeout=0.3))
        except aiosmtplib.SMTPException as exc:
            return (type(exc), str(exc), client.is_connected)
        connected = client.is_connected
        [reply] = await pipeline(client, [b"NOOP"], 0.2)  # the connection works on
        assert isinstance(client.protocol, PipeliningProtocol)
        client.close()
        return (response.code, response.message, connected, reply.code)

    try:
        assert await outcome(True) == await outcome(False)
    finally:
        server.close()

    async def refused(ours: bool) -> tuple[object, ...]:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5, start_tls=False,
                                 local_hostname="proxy.test")
        try:
            await (open_connection(client, 0.3) if ours else client.connect(timeout=0.3))
        except aiosmtplib.SMTPException as exc:
            return (type(exc), str(exc).split(":")[0], client.is_connected)
        raise AssertionError("connected to a closed port")

    await server.wait_closed()
    assert await refused(True) == await refused(False)
