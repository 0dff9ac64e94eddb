"""CHUNKING (RFC 3030) to the upstream.

To a server that offers CHUNKING the message goes as one ``BDAT <size> LAST`` chunk, the
command in the message's first write (no 354 round trip, no dot-stuffing); the octets the
server receives are those DATA would have carried. The upstream here is a raw loopback
server that records each read (one read is one write of the proxy's on loopback)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpproxy.delivery.stream import bdat_chunk, dot_stuffed
from tests.conftest import ProxyFactory, Talk, port_of

RELAY = {"domains": ["dest.test"], "networks": []}
XFORWARD = b"XFORWARD NAME ADDR PROTO HELO SOURCE"


@dataclass
class ChunkingUpstream:
    """Offers PIPELINING and CHUNKING (and whatever *extensions* add); takes DATA and BDAT.

    ``bdat_reply``: the answer to ``BDAT ... LAST``.
    """

    extensions: tuple[bytes, ...] = (b"PIPELINING", b"8BITMIME", b"CHUNKING", XFORWARD)
    bdat_reply: bytes = b"250 2.0.0 Ok: queued as BDAT"
    connections: list[list[list[bytes]]] = field(default_factory=list)
    """Per connection, per read: the command lines (message octets shown as b"<chunk>" or
    b"<data>")."""
    messages: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reads: list[list[bytes]] = []
        self.connections.append(reads)
        writer.write(b"220 chunk.test ESMTP\r\n")
        buffer, data, in_data = b"", b"", False
        try:
            while chunk := await reader.read(1 << 20):
                buffer += chunk
                lines: list[bytes] = []
                replies: list[bytes] = []
                while True:
                    if in_data:
                        data, buffer = data + buffer, b""
                        end = (b"\r\n" + data).find(b"\r\n.\r\n")
                        if end == -1:
                            break
                        body, buffer = data[:end], data[end + 3 :]
                        self.messages.append((b"\r\n" + body).replace(b"\r\n..", b"\r\n.")[2:])
                        data, in_data = b"", False
                        lines.append(b"<data>")
                        replies.append(b"250 2.0.0 Ok: queued as DATA")
                        continue
                    if b"\n" not in buffer:
                        break
                    line, buffer = buffer.split(b"\n", 1)
                    line = line.rstrip(b"\r")
                    lines.append(line)
                    words = line.split(b" ")
                    verb = words[0].upper()
                    if verb == b"BDAT":
                        size = int(words[1])
                        while len(buffer) < size:
                            more = await reader.read(1 << 20)
                            assert more, "connection closed inside the chunk"
                            buffer += more
                        self.messages.append(buffer[:size])
                        buffer = buffer[size:]
                        lines.append(b"<chunk>")
                        replies.append(self.bdat_reply)
                        continue
                    if verb == b"QUIT":
                        replies.append(b"221 bye")
                        continue
                    replies.append(self._reply(verb))
                    in_data = verb == b"DATA"
                reads.append(lines)
                writer.write(b"".join(reply + b"\r\n" for reply in replies))
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _reply(self, verb: bytes) -> bytes:
        if verb == b"EHLO":
            offered = [b"chunk.test", *self.extensions]
            return b"\r\n".join(b"250" + (b" " if i == len(offered) - 1 else b"-") + e
                                for i, e in enumerate(offered))
        if verb == b"XCLIENT":
            return b"220 chunk.test ESMTP"
        if verb == b"DATA":
            return b"354 go ahead"
        return b"250 2.0.0 Ok"


def verbs(read: list[bytes]) -> list[bytes]:
    return [line.split(b" ")[0] for line in read]


async def start(upstream: ChunkingUpstream) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def smtp(port: int, **extra: object) -> dict[str, object]:
    return {"type": "smtp", "host": "127.0.0.1", "port": port, "tls": "none", "connect_timeout": 2,
            "command_timeout": 2, "data_timeout": 5, **extra}


# What the client sends (dot-stuffed, a last line without CRLF) and what the message is.
STUFFED = b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\nlast line"
MESSAGE = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nlast line\r\n"


async def send(port: int, body: bytes, rcpts: tuple[str, ...] = ("b@dest.test",)) -> tuple[int, str]:
    client = await Talk.open(port)
    await client.hello("client.example")
    code, text = await client.send_message("a@sender.test", list(rcpts), body + b"\r\n")
    await client.close()
    return code, text


async def test_relay_mode_sends_the_message_as_one_bdat_chunk_in_one_write(proxy_factory: ProxyFactory) -> None:
    upstream = ChunkingUpstream()
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, received_header="never", delivery=smtp(port, rcpt_mode="relay"))
    assert await send(port_of(proxy), STUFFED) == (250, "2.0.0 Ok: queued as BDAT")
    server.close()
    groups = [verbs(read) for read in upstream.connections[0]]
    assert groups[:3] == [[b"EHLO"], [b"XFORWARD", b"MAIL", b"RCPT"], [b"BDAT", b"<chunk>"]]
    assert upstream.connections[0][2][0] == b"BDAT %d LAST" % len(MESSAGE)
    assert upstream.messages == [MESSAGE]  # unstuffed, as DATA would have carried it


async def test_without_chunking_the_same_octets_go_with_data(proxy_factory: ProxyFactory) -> None:
    upstream = ChunkingUpstream(extensions=(b"PIPELINING", b"8BITMIME", XFORWARD))
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, received_header="never", delivery=smtp(port, rcpt_mode="relay"))
    assert (await send(port_of(proxy), STUFFED))[0] == 250
    server.close()
    assert [verbs(read) for read in upstream.connections[0]][2:4] == [[b"DATA"], [b"<data>"]]
    assert upstream.messages == [MESSAGE]


async def test_at_data_keeps_its_pipelined_data(proxy_factory: ProxyFactory) -> None:
    """DATA already went with MAIL and the RCPTs (its 354 says every recipient was asked
    first): the message follows it, not a BDAT."""
    upstream = ChunkingUpstream()
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, received_header="never", delivery=smtp(port, rcpt_mode="at_data"))
    assert (await send(port_of(proxy), STUFFED))[0] == 250
    server.close()
    assert [verbs(read) for read in upstream.connections[0]][1:3] == [
        [b"XFORWARD", b"MAIL", b"RCPT", b"DATA"], [b"<data>"]]
    assert upstream.messages == [MESSAGE]


async def test_a_refusal_of_the_chunk_is_the_answer_to_the_message(proxy_factory: ProxyFactory) -> None:
    upstream = ChunkingUpstream(bdat_reply=b"554 5.7.1 Spam, go away")
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, received_header="never", delivery=smtp(port, rcpt_mode="relay"))
    assert await send(port_of(proxy), STUFFED) == (554, "5.7.1 Spam, go away")
    server.close()


async def test_a_message_bigger_than_a_block_arrives_whole(proxy_factory: ProxyFactory) -> None:
    upstream = ChunkingUpstream()
    server, port = await start(upstream)
    proxy = await proxy_factory(relay=RELAY, received_header="never", delivery=smtp(port, rcpt_mode="relay"))
    body = b"Subject: big\r\n\r\n" + b"".join(b"..%07d " % i + b"y" * 70 + b"\r\n" for i in range(20_000))
    assert (await send(port_of(proxy), body.removesuffix(b"\r\n")))[0] == 250
    server.close()
    assert upstream.messages == [body.replace(b"\r\n..", b"\r\n.")]
    assert len(upstream.messages[0]) > 1024 * 1024


CRLF_MESSAGES = st.tuples(
    st.lists(st.text(alphabet=".ab", max_size=6).map(str.encode), max_size=8),
    st.booleans(),
    st.lists(st.integers(min_value=0, max_value=80), max_size=4),
).map(lambda t: _cut(b"\r\n".join(t[0]) + (b"\r\n" if t[1] and t[0] else b""), t[2]))


def _cut(message: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(message)) for c in cuts})
    return [message[a:b] for a, b in zip([0, *points], [*points, len(message)], strict=True)]


@given(CRLF_MESSAGES, st.integers(min_value=1, max_value=64))
def test_a_chunk_carries_what_data_carries(parts: list[bytes], block_size: int) -> None:
    """Whatever the parts and the block size: BDAT's size is what follows it, and it is
    the message DATA would have carried (unstuffed, a CRLF after a last line without one)."""
    blocks = list(bdat_chunk(parts, block_size))
    command, _, first = blocks[0].partition(b"\r\n")
    assert command.startswith(b"BDAT ") and command.endswith(b" LAST")
    chunk = first + b"".join(blocks[1:])
    assert int(command.split()[1]) == len(chunk)
    stuffed = b"".join(dot_stuffed(parts)).removesuffix(b".\r\n")
    assert chunk == (b"\r\n" + stuffed).replace(b"\r\n..", b"\r\n.")[2:]
    assert b"".join(parts) == chunk or chunk == b"".join(parts) + b"\r\n"
    assert all(len(block) <= max(block_size, 2) for block in blocks[1:])  # 2: a CRLF added


# -- the data timeout: the connection's reply deadline bounds every wait ----------------------


@pytest.mark.parametrize("chunking", [True, False])
@pytest.mark.parametrize("stops", ["answering", "reading"])
async def test_an_upstream_that_stops_is_timed_out_within_the_data_timeout(chunking: bool, stops: str) -> None:
    """send_data() against a server that takes the message but never answers it, or stops
    reading in the middle (the writes pause, and no reply comes either): SMTPTimeoutError
    after the limit, not a wait for ever, and the connection closed."""
    import aiosmtplib

    from smtpproxy.delivery.stream import send_data

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stuck.test ESMTP\r\n")
        if stops == "reading":
            await asyncio.sleep(30)  # reads nothing more: the proxy's writes fill the socket
        else:
            line = await reader.readline()
            if line.startswith(b"DATA"):
                writer.write(b"354 go ahead\r\n")
            while await reader.read(1 << 20):
                pass  # takes everything, answers nothing
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.sockets[0].getsockname()[1], timeout=5,
                             start_tls=False)
    await client.connect()
    size = 64 << 20 if stops == "reading" else 1024
    parts = [b"Subject: x\r\n\r\n" + b"y" * 78 + b"\r\n"] * (size // 94)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(aiosmtplib.SMTPTimeoutError, match=r"Timed out sending the message after 0\.5s"):
            async with asyncio.timeout(10):  # a missing deadline fails here instead of hanging
                await send_data(client, parts, 0.5, chunking=chunking)
        assert 0.4 <= loop.time() - started < 3
        assert not client.is_connected
    finally:
        client.close()
        server.close()
