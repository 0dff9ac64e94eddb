"""The milter's socket behaviour that costs MTA time: acknowledging packets that get no reply
at once (TCP_QUICKACK), and answering one packet with one write.

Why: Postfix writes the DATA-stage macros (no reply expected) from smtpd and then the headers
from cleanup on the same Nagle-enabled socket; with the milter's ACK delayed, every message
waited ~40 ms on ``inet:`` (issue 31, measured with strace: 42-48 ms between the ``DT`` macro
packet and the headers, 1 ms once acknowledged). No timing here: the tests check the option
is set on the accepted socket after the DATA macros, and count the writes.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from smtpproxy import Message, hookimpl
from smtpproxy.milter import codec
from smtpproxy.milter.server import MilterServer, _AckNow, _Connection, _Replies
from tests.conftest import chain_of, make_config
from tests.wire.test_milter import BODY, HEADERS, Factory, FakeMTA, milter  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux-only socket option")

QUICKACK = getattr(socket, "TCP_QUICKACK", 12)


class Tagger:
    name = "tagger"

    @hookimpl
    def data(self, message: Message) -> None:
        message.add_header("X-One", "1")
        message.add_header("X-Two", "2", prepend=False)


def _server_port(server: MilterServer) -> int:
    address = server.address
    assert isinstance(address, tuple)
    return address[1]


async def test_the_data_macros_are_acknowledged_at_once_over_tcp(
    milter: Factory, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    server = await milter()
    port = _server_port(server)
    quickacks: list[int] = []
    original = socket.socket.setsockopt

    def spy(self: socket.socket, level: int, option: int, value: Any, *rest: Any) -> None:
        if (level, option) == (socket.IPPROTO_TCP, QUICKACK) and self.getsockname()[1] == port:
            quickacks.append(value)
        original(self, level, option, value, *rest)

    monkeypatch.setattr(socket.socket, "setsockopt", spy)
    mta = await FakeMTA.open(server)
    await mta.start()  # connect macros: they come with SMFIC_CONNECT, which we answer
    await mta.envelope()  # the same for MAIL's
    assert quickacks == []
    mta.send(codec.Macro("T", (("i", "4ABC"),)))  # DATA's, for a command never sent (NODATA)
    assert await mta.content(HEADERS, BODY) == [codec.Accept()]
    assert quickacks == [1]
    await mta.close()


async def test_without_nodata_the_data_macros_wait_for_their_command(
    milter: Factory, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    server = await milter()
    calls: list[int] = []
    monkeypatch.setattr(_AckNow, "now", lambda self: calls.append(1))
    mta = await FakeMTA.open(server)
    reply = await mta.negotiate(protocol=codec.SMFIP_NR_HDR)  # an MTA that will send DATA
    assert not reply.protocol & codec.SMFIP_NODATA
    assert await mta.event(codec.Connect("[192.0.2.7]", "4", 40000, "192.0.2.7"), j="mx") \
        == [codec.Continue()]
    await mta.passes(codec.Helo("client.test"))
    await mta.passes(codec.Mail(("<a@sender.test>",)))
    await mta.passes(codec.Rcpt(("<b@dest.test>",)))
    await mta.passes(codec.Data(), i="4ABC")
    assert calls == []
    await mta.close()


async def test_a_unix_socket_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    original = socket.socket.setsockopt

    def spy(self: socket.socket, level: int, option: int, *rest: Any) -> None:
        calls.append((level, option))
        original(self, level, option, *rest)

    path = tmp_path / "m.sock"
    config = make_config(tmp_path, milter={"listen": f"unix:{path}"})
    server = MilterServer(config, chain=chain_of(timeout=1.0))
    await server.start()
    try:
        monkeypatch.setattr(socket.socket, "setsockopt", spy)
        mta = await FakeMTA.open(server)
        await mta.start()
        await mta.envelope()
        mta.send(codec.Macro("T", (("i", "4ABC"),)))
        assert await mta.content(HEADERS, BODY) == [codec.Accept()]
        assert (socket.IPPROTO_TCP, QUICKACK) not in calls
        await mta.close()
    finally:
        await server.stop(grace=1)


async def test_quickack_is_really_switched_on() -> None:
    """On a real connected socket: off (pingpong mode) before, on after."""
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await asyncio.open_connection("127.0.0.1", port)
    writer = await asyncio.wait_for(accepted, 5)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 0)
    assert sock.getsockopt(socket.IPPROTO_TCP, QUICKACK) == 0
    _AckNow(writer.transport).now()
    assert sock.getsockopt(socket.IPPROTO_TCP, QUICKACK) == 1
    client.close()
    writer.close()
    server.close()
    await server.wait_closed()


async def test_the_end_of_message_responses_leave_in_one_write(
    milter: Factory, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    server = await milter(Tagger())
    port = _server_port(server)
    writes: list[bytes] = []
    original = _Connection.write

    def spy(self: _Connection, data: Any) -> None:
        if self.transport.get_extra_info("sockname")[1] == port:
            writes.append(bytes(data))
        original(self, data)

    monkeypatch.setattr(_Connection, "write", spy)
    mta = await FakeMTA.open(server)
    await mta.start()
    await mta.envelope()
    writes.clear()
    for name, value in HEADERS:
        mta.send(codec.Header(name, value))
    await mta.passes(codec.EndOfHeaders())
    await mta.passes(codec.Body(BODY))
    writes.clear()
    responses = await mta.event(codec.EndOfBody())
    assert [type(r) for r in responses] == [codec.InsertHeader, codec.AddHeader, codec.Accept]
    assert len(writes) == 1
    assert codec.FrameDecoder(1 << 20).feed(writes[0]) == [
        (codec.encode_response(r)[4:5], codec.encode_response(r)[5:]) for r in responses]
    await mta.close()


class _Writer:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    async def drain(self) -> None:
        return None


async def test_progress_goes_out_at_once_with_what_came_before() -> None:
    writer = _Writer()
    replies = _Replies(writer)  # type: ignore[arg-type]
    await replies.send(codec.AddHeader("X-A", "1"))
    assert writer.writes == []
    await replies.send(codec.Progress())
    assert writer.writes == [codec.encode_response(codec.AddHeader("X-A", "1"))
                             + codec.encode_response(codec.Progress())]
    await replies.send(codec.Accept())
    await replies.flush()
    await replies.flush()  # nothing pending: no empty write
    assert writer.writes[1:] == [codec.encode_response(codec.Accept())]


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
async def test_the_milter_process_answers_a_message_on_either_event_loop(tmp_path: Path, choice: str) -> None:
    """``smtpproxy milter`` as users start it (uvloop by default, whose transports are not
    asyncio's classes) takes a whole message in and answers it, on TCP and on a Unix socket."""
    from tests.daemons import free_port, smtpproxy_serving

    pytest.importorskip(choice)
    port, path = free_port(), tmp_path / "milter.sock"
    for listen in (f"inet:127.0.0.1:{port}", f"unix:{path}"):
        async with smtpproxy_serving("milter", tmp_path / "smtpproxy.yaml",
                               f"milter: {{listen: '{listen}'}}\nevent_loop: {choice}\n",
                               listening=rf"event=listening .*loop={choice} ") as (_, log):
            if listen.startswith("inet:"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            else:
                reader, writer = await asyncio.open_unix_connection(str(path))
            mta = FakeMTA(reader, writer)
            await mta.start()
            await mta.envelope()
            responses = await mta.content(HEADERS, BODY)
            assert responses == [codec.Accept()]
            mta.send(codec.Quit())
            assert await mta.closed()
            await asyncio.to_thread(log.wait_line, r"event=message .*decision=delivered")


async def test_an_mta_that_writes_faster_than_the_plugins_work_waits_in_its_socket(tmp_path: Path) -> None:
    """While a plugin works, the milter reads at most ~256 KiB ahead of its session: a hostile
    or hurried MTA's packets stay in its own socket buffers, not in our memory, and are all
    taken once the plugin is done."""
    release = asyncio.Event()

    class Slow:
        name = "slow"

        @hookimpl
        async def connect(self, session: Any) -> None:
            await release.wait()

    config = make_config(tmp_path, milter={"listen": "inet:127.0.0.1:0"})
    server = MilterServer(config, chain=chain_of(Slow(), timeout=30.0))
    await server.start()
    try:
        mta = await FakeMTA.open(server)
        await mta.negotiate()
        mta.send(codec.Connect("[192.0.2.7]", "4", 40000, "192.0.2.7"))
        chunk = codec.Header("X-Filler", " " + "x" * 60_000)
        sent = 0
        while sent < 32 << 20:
            mta.send(chunk)
            sent += 60_000
        transport = mta.writer.transport
        left = -1
        for _ in range(50):  # until the kernel's buffers are full and nothing moves
            await asyncio.sleep(0.05)
            if transport.get_write_buffer_size() == left:
                break
            left = transport.get_write_buffer_size()
        # Loopback holds a few MB in kernel buffers; the rest waits on the MTA's side.
        assert left > 16 << 20
        release.set()
        assert await mta.recv() == codec.Continue()  # the connect's answer, once the plugin is done
        for _ in range(200):
            await asyncio.sleep(0.05)
            if transport.get_write_buffer_size() == 0:
                break
        assert transport.get_write_buffer_size() == 0  # then everything was read
        await mta.close()
    finally:
        await server.stop(grace=1)
