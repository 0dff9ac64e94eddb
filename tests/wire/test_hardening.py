"""Bad input gets a clear SMTP error, never a crash, a hang, or a second message."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from smtpproxy import Message, hookimpl
from tests.conftest import ProxyFactory, RawUpstream, Sink, SinkHandler, Talk, port_of, start_sink

RELAY = {"domains": ["dest.test"], "networks": []}
HEAD = b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: s\r\n\r\n"
SMUGGLED = b"MAIL FROM:<admin@dest.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\nSpoofed!\r\n"

SMUGGLING_PAYLOADS = {
    "lf-dot-lf": b"Hello\n.\n" + SMUGGLED,
    "crlf-dot-lf": b"Hello\r\n.\n" + SMUGGLED,
    "lf-dot-crlf": b"Hello\n.\r\n" + SMUGGLED,
    "cr-dot-cr": b"Hello\r.\r" + SMUGGLED,
}


class Seen:
    """Records the exact bytes plugins see."""

    name = "seen"

    def __init__(self) -> None:
        self.raw: list[bytes] = []

    @hookimpl
    def data(self, message: Message) -> None:
        self.raw.append(message.raw)


async def send_raw_message(port: int, payload: bytes) -> tuple[int, str]:
    client = await Talk.open(port)
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.send(HEAD + payload + b"\r\n.\r\n")
    reply = await client.reply()
    # the session is still in sync: exactly one reply came for the whole payload
    assert await client.cmd("NOOP") == (250, "2.0.0 OK")
    await client.close()
    return reply


@pytest.mark.parametrize("name", sorted(SMUGGLING_PAYLOADS))
async def test_smuggling_payloads_are_rejected(
    proxy_factory: ProxyFactory, sink: Sink, name: str
) -> None:
    seen = Seen()
    proxy = await proxy_factory(seen, upstream=sink.port, relay=RELAY)
    code, text = await send_raw_message(port_of(proxy), SMUGGLING_PAYLOADS[name])
    assert code == 550 and text.startswith("5.5.2 Bare CR or LF")
    assert seen.raw == []  # refused before any plugin ran
    assert sink.messages == []


@pytest.mark.parametrize("name", sorted(SMUGGLING_PAYLOADS))
async def test_smuggling_payloads_normalized_arrive_as_one_message(
    proxy_factory: ProxyFactory, sink: Sink, name: str
) -> None:
    seen = Seen()
    proxy = await proxy_factory(seen, upstream=sink.port, relay=RELAY,
                                smtp={"bare_newlines": "normalize"})
    code, _ = await send_raw_message(port_of(proxy), SMUGGLING_PAYLOADS[name])
    assert code == 250
    assert len(sink.messages) == 1, "one message in, exactly one message out"
    assert sink.messages[0].sender == "a@sender.test"
    assert seen.raw == [sink.messages[0].content]  # the upstream got what the plugins saw
    assert b"\r\nSpoofed!\r\n" in seen.raw[0]  # the smuggled text is just body text
    for raw in seen.raw:
        assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r")


NUL_PAYLOADS = {
    "nul-dot": b"Hello\r\n\x00.\r\n" + SMUGGLED,
    "dot-nul": b"Hello\r\n.\x00\r\n" + SMUGGLED,
    "nul-in-header": b"X-A: \x00b\r\n",
    "nul-in-body": b"Hello\x00world\r\n",
}


@pytest.mark.parametrize("name", sorted(NUL_PAYLOADS))
@pytest.mark.parametrize("bare_newlines", ["reject", "normalize"])
async def test_nul_in_data_is_refused_never_forwarded(
    proxy_factory: ProxyFactory, sink: Sink, name: str, bare_newlines: str
) -> None:
    seen = Seen()
    proxy = await proxy_factory(seen, upstream=sink.port, relay=RELAY,
                                smtp={"bare_newlines": bare_newlines})
    code, text = await send_raw_message(port_of(proxy), NUL_PAYLOADS[name])
    assert (code, text) == (550, "5.6.0 NUL characters in message data are not allowed")
    assert seen.raw == []  # refused before any plugin ran
    assert sink.messages == []


async def test_line_length_limit_is_exact_over_the_wire(proxy_factory: ProxyFactory, sink: Sink) -> None:
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    fits = HEAD + b"a" * 998 + b"\r\n"  # 1000 octets with CRLF
    dotted = HEAD + b".." + b"b" * 997 + b"\r\n"  # the text line ".bbb" is 1000 octets
    over = HEAD + b"c" * 999 + b"\r\n"  # 1001 octets
    assert (await client.send_message("a@sender.test", ["b@dest.test"], fits))[0] == 250
    assert (await client.send_message("a@sender.test", ["b@dest.test"], dotted))[0] == 250
    code, text = await client.send_message("a@sender.test", ["b@dest.test"], over)
    assert code == 500 and text.startswith("5.5.2 Line too long")
    assert [m.content.count(b"\n") for m in sink.messages] == [5, 5]
    assert sink.messages[1].content.endswith(b"\r\n." + b"b" * 997 + b"\r\n")
    await client.close()


async def test_bare_lf_in_header_cannot_become_a_second_header(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    await client.cmd("MAIL FROM:<a@sender.test>")
    await client.cmd("RCPT TO:<b@dest.test>")
    await client.cmd("DATA")
    client.send(b"Subject: hi\nBcc: victim@dest.test\r\n\r\nbody\r\n.\r\n")
    code, _ = await client.reply()
    assert code == 550
    assert sink.messages == []
    await client.close()


@pytest.mark.parametrize(
    "command",
    [
        b"MAIL FROM:<a\r@sender.test>",
        b"MAIL FROM:<a\x00@sender.test>",
        b"MAIL FROM:<a@sender.test>\nRCPT TO:<b@dest.test>",
        b"MAIL FROM:<a@sender.test\x7f>",
        b"MAIL FROM:<a\t@sender.test>",
    ],
)
async def test_control_characters_in_commands_are_refused(
    proxy_factory: ProxyFactory, command: bytes
) -> None:
    proxy = await proxy_factory(relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, text = await client.cmd(command)
    assert code == 500 and text.startswith("5.5.2")
    # no transaction was started by any part of it
    assert await client.cmd("RCPT TO:<b@dest.test>") == (503, "5.5.1 Need MAIL command first")
    await client.close()


async def test_bare_lf_does_not_end_a_command(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    client.send(b"NOOP\n")
    assert await client.reply() == (500, "5.5.2 Bare LF in command; SMTP lines end with CRLF")
    await client.close()


async def test_malformed_addresses_get_clear_errors(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    for bad in ("MAIL FROM:<a..b@sender.test>", "MAIL FROM:<a@b@sender.test>", "MAIL FROM:<a@-x.test>"):
        code, text = await client.cmd(bad)
        assert 500 <= code < 600, (bad, code, text)
    assert (await client.cmd("MAIL FROM:<a@sender.test> FOO=bar"))[0] == 555
    assert (await client.cmd("MAIL FROM:<a@sender.test> SIZE=999999999"))[:1] == (552,)
    assert (await client.cmd('MAIL FROM:<"odd local"@sender.test>'))[0] == 250
    await client.close()


async def test_oversize_lines_and_messages(proxy_factory: ProxyFactory, sink: Sink) -> None:
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY,
                                limits={"max_message_size": 10_000})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, text = await client.cmd(b"NOOP " + b"x" * 2000)
    assert code == 500 and "too long" in text
    long_line = HEAD + b"y" * 1500 + b"\r\n"
    assert (await client.send_message("a@sender.test", ["b@dest.test"], long_line))[0] == 500
    big = HEAD + (b"z" * 70 + b"\r\n") * 200
    assert (await client.send_message("a@sender.test", ["b@dest.test"], big)) == (
        552, "5.3.4 Message size exceeds fixed limit of 10000 bytes")
    assert (await client.send_message("a@sender.test", ["b@dest.test"], HEAD + b"ok\r\n"))[0] == 250
    assert len(sink.messages) == 1
    await client.close()


async def test_recipient_cap(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(relay=RELAY, limits={"max_recipients": 2})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    await client.cmd("MAIL FROM:<a@sender.test>")
    assert (await client.cmd("RCPT TO:<b1@dest.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<b2@dest.test>"))[0] == 250
    assert await client.cmd("RCPT TO:<b3@dest.test>") == (452, "4.5.3 Too many recipients")
    await client.close()


async def test_session_caps_answer_421(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(limits={"max_sessions": 3, "max_sessions_per_ip": 2})
    port = port_of(proxy)
    first, second = await Talk.open(port), await Talk.open(port)
    assert (await first.greeting())[0] == 220
    assert (await second.greeting())[0] == 220
    third = await Talk.open(port)
    assert await third.greeting() == (421, "4.7.0 Too many connections from your address, try again later")
    assert await third.closed()
    await first.close()
    await second.close()


async def test_too_many_errors_closes(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(limits={"max_errors": 3})
    client = await Talk.open(port_of(proxy))
    await client.greeting()
    assert (await client.cmd("BOGUS"))[0] == 500
    assert (await client.cmd("BOGUS"))[0] == 500
    assert (await client.cmd("BOGUS"))[0] == 500
    assert await client.reply() == (421, "4.7.0 Too many errors, closing connection")
    assert await client.closed()


async def test_silent_client_gets_421_on_idle_timeout(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(limits={"idle_timeout": 0.3})
    client = await Talk.open(port_of(proxy))
    await client.greeting()
    code, text = await client.reply()
    assert code == 421 and "timeout" in text
    assert await client.closed()


async def test_a_slow_link_during_data_is_not_a_silent_client(proxy_factory: ProxyFactory, sink: Sink) -> None:
    """The message is read in blocks up to each ".CRLF"; the DATA timer must run from the
    last octets received (as Postfix's), not from the start of a block: a client that
    trickles a message in, never pausing as long as data_timeout, is served; one that goes
    quiet mid-message gets 421."""
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY, limits={"data_timeout": 0.5})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.send(HEAD)
    for piece in (b"no full stop on this line", b" and more", b"\r\n", b"another", b" line\r\n") * 2:
        await asyncio.sleep(0.2)  # the client's pace: 2 s in all, 0.2 s between octets
        client.send(piece)
    client.send(b".\r\n")
    assert (await client.reply())[0] == 250
    assert len(sink.handler.messages) == 1
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.send(HEAD + b"and then silence")
    code, text = await client.reply()
    assert code == 421 and "timeout" in text
    assert len(sink.handler.messages) == 1


class SlowSink(SinkHandler):
    """An upstream that takes *delay* seconds to answer RCPT and the end of DATA."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def handle_RCPT(self, *args: Any) -> str:
        await asyncio.sleep(self.delay)
        return await super().handle_RCPT(*args)

    async def handle_DATA(self, *args: Any) -> str:
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(*args)


class SlowHook:
    name = "slowhook"
    timeout = 5.0

    def __init__(self, delay: float) -> None:
        self.delay = delay

    @hookimpl
    async def connect(self) -> None:
        await asyncio.sleep(self.delay)

    @hookimpl
    async def data(self) -> None:
        await asyncio.sleep(self.delay)


@pytest.mark.parametrize("rcpt_mode", ["at_data", "relay"])
async def test_idle_timer_does_not_run_while_the_proxy_waits_on_upstream_or_plugins(
    proxy_factory: ProxyFactory, rcpt_mode: str
) -> None:
    slow = await start_sink(SlowSink(delay=0.9))
    try:
        proxy = await proxy_factory(
            SlowHook(delay=0.9), upstream=slow.port, relay=RELAY,
            limits={"idle_timeout": 0.4, "data_timeout": 0.4},
            delivery={"rcpt_mode": rcpt_mode, "command_timeout": 5, "data_timeout": 5},
        )
        client = await Talk.open(port_of(proxy))
        code, _ = await client.hello()  # the connect hook took 0.9 s: still a greeting, no 421
        assert code == 250
        assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
        assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250
        assert (await client.cmd("DATA"))[0] == 354
        client.send(HEAD + b"slow\r\n.\r\n")
        code, text = await client.reply()  # plugin 0.9 s + upstream 0.9 s, idle 0.4 s
        assert code == 250 and "SINK1" in text, text
        assert len(slow.messages) == 1
        # waiting for the client again: the idle timer is back
        code, text = await client.reply()
        assert code == 421 and "timeout" in text
        assert await client.closed()
    finally:
        slow.server.close()


async def test_client_leaving_while_the_proxy_works_is_quiet(
    proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's clock is paused while plugins run; a client that hangs up meanwhile must
    not trip aiosmtpd's connection_lost (it expects a timer handle)."""
    entered = asyncio.Event()

    class Slow:
        name = "slow"

        @hookimpl
        async def data(self) -> None:
            entered.set()
            await asyncio.sleep(0.3)

    proxy = await proxy_factory(Slow(), upstream=sink.port, relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    await client.cmd("MAIL FROM:<a@sender.test>")
    await client.cmd("RCPT TO:<b@dest.test>")
    await client.cmd("DATA")
    client.send(HEAD + b"x\r\n.\r\n")
    await asyncio.wait_for(entered.wait(), 5)
    await client.close()
    await asyncio.wait_for(proxy.services.drained.wait(), 5)  # the session has ended
    assert "Exception in callback" not in caplog.text and "AssertionError" not in caplog.text


async def test_idle_timer_counts_from_the_last_command_not_the_first(proxy_factory: ProxyFactory) -> None:
    """The idle timer is re-armed lazily; each command must still push the deadline back."""
    proxy = await proxy_factory(limits={"idle_timeout": 0.4})
    client = await Talk.open(port_of(proxy))
    await client.greeting()
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < 1.0:  # well past one idle period, never idle for one
        last_command = loop.time()  # the proxy reads it after this: its idle period starts later
        assert await client.cmd("NOOP") == (250, "2.0.0 OK")
        await asyncio.sleep(0.1)
    code, text = await client.reply()
    assert code == 421 and "timeout" in text
    # Counted from the last command (not from the end of the sleep after its reply, which
    # made this bound 0.1 s too tight under load), and not from the first one.
    assert 0.39 < loop.time() - last_command < 2.0  # 0.39: a loop may fire a timer a tick early
    assert await client.closed()


async def test_pipelined_replies_come_back_complete_and_in_order(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(relay={"domains": ["dest.test"]})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@dest.test>\r\nRCPT TO:<c@elsewhere.example>\r\n"
                b"RCPT TO:<d@dest.test>\r\nRSET\r\nNOOP\r\n")
    codes = [(await client.reply())[0] for _ in range(6)]
    assert codes == [250, 250, 554, 250, 250, 250]
    await client.close()


async def test_slow_client_hits_session_deadline(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(limits={"session_timeout": 0.5, "idle_timeout": 10})
    client = await Talk.open(port_of(proxy))
    await client.greeting()
    for _ in range(100):  # a NOOP every few ms keeps the idle timer happy, not the deadline
        client.send(b"NOOP\r\n")
        code, text = await client.reply()
        if code == 421:
            assert text == "4.4.2 Session time limit exceeded"
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("session deadline never fired")
    assert await client.closed()


async def test_talking_before_the_greeting_is_refused(proxy_factory: ProxyFactory) -> None:
    class SlowConnect:
        name = "slow"

        @hookimpl
        async def connect(self) -> None:
            await asyncio.sleep(0.2)  # like a DNSBL lookup: the banner waits for it

    proxy = await proxy_factory(SlowConnect())
    client = await Talk.open(port_of(proxy))
    client.send(b"EHLO spammer.test\r\n")
    assert await client.reply() == (554, "5.5.0 SMTP protocol error: client spoke before the greeting")
    assert await client.closed()


async def test_data_pipelined_before_354_is_refused(proxy_factory: ProxyFactory, sink: Sink) -> None:
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    client.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n" + HEAD + b"x\r\n.\r\n")
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 250
    assert await client.reply() == (554, "5.5.0 Improper pipelining: message data sent before 354")
    assert await client.closed()
    assert sink.messages == []


async def test_pipelined_commands_get_replies_in_order(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    client.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@dest.test>\r\nRCPT TO:<x@example.com>\r\n"
                b"RCPT TO:<c@dest.test>\r\nNOOP\r\n")
    replies = [await client.reply() for _ in range(5)]
    assert [code for code, _ in replies] == [250, 250, 554, 250, 250]
    await client.close()


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


async def test_starttls_discards_pipelined_plaintext(
    proxy_factory: ProxyFactory, sink: Sink, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    cert = tls_ca.issue_cert("proxy.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "proxy.pem"))
    proxy = await proxy_factory(
        upstream=sink.port, relay=RELAY,
        listeners=[{"address": "127.0.0.1", "port": 0,
                    "tls": {"cert": str(tmp_path / "proxy.pem"), "key": str(tmp_path / "proxy.pem")}}],
    )
    client = await Talk.open(port_of(proxy))
    code, ehlo = await client.hello()
    assert "STARTTLS" in ehlo.split("\n")
    # CVE-2011-0411 style: plaintext injected behind STARTTLS must not run after the handshake
    client.send(b"STARTTLS\r\nMAIL FROM:<injected@sender.test>\r\n")
    assert await client.reply() == (220, "2.0.0 Ready to start TLS")
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    await client.writer.start_tls(ctx, server_hostname="proxy.test")
    # the injected MAIL was discarded: the session after TLS starts from scratch
    code, ehlo = await client.cmd("EHLO client.test")
    assert code == 250 and "STARTTLS" not in ehlo
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250  # not "nested MAIL"
    assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.send(HEAD + b"secret\r\n.\r\n")
    assert (await client.reply())[0] == 250
    assert [m.sender for m in sink.messages] == ["a@sender.test"]
    await client.close()


def _proxy_pem(tls_ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    tls_ca.issue_cert("proxy.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "p.pem"))
    return {"cert": str(tmp_path / "p.pem"), "key": str(tmp_path / "p.pem")}


async def test_starttls_twice_is_refused_inside_tls(
    proxy_factory: ProxyFactory, sink: Sink, tls_ca: trustme.CA, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY, listeners=[
        {"address": "127.0.0.1", "port": 0, "tls": _proxy_pem(tls_ca, tmp_path)}])
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("STARTTLS"))[0] == 220
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    await client.writer.start_tls(ctx, server_hostname="proxy.test")
    code, ehlo = await client.cmd("EHLO client.test")
    assert code == 250 and "STARTTLS" not in ehlo.split("\n")
    # a second STARTTLS, with a command pipelined behind it: refused, the session goes on in TLS
    client.send(b"STARTTLS\r\nNOOP\r\n")
    assert await client.reply() == (503, "5.5.1 TLS already active")
    assert await client.reply() == (250, "2.0.0 OK")
    assert (await client.send_message("a@sender.test", ["b@dest.test"], HEAD + b"x\r\n"))[0] == 250
    assert len(sink.messages) == 1
    await client.close()
    assert "Traceback" not in caplog.text and "internal_error" not in caplog.text


async def test_starttls_on_an_implicit_tls_listener(
    proxy_factory: ProxyFactory, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    proxy = await proxy_factory(relay=RELAY, listeners=[
        {"address": "127.0.0.1", "port": 0, "implicit_tls": True, "tls": _proxy_pem(tls_ca, tmp_path)}])
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port_of(proxy), ssl=ctx, server_hostname="proxy.test")
    client = Talk(reader, writer)
    code, ehlo = await client.hello()
    assert code == 250 and "STARTTLS" not in ehlo.split("\n")
    assert await client.cmd("STARTTLS") == (503, "5.5.1 TLS already active")
    assert await client.cmd("NOOP") == (250, "2.0.0 OK")
    await client.close()


async def test_require_starttls(proxy_factory: ProxyFactory, tls_ca: trustme.CA, tmp_path: Path) -> None:
    cert = tls_ca.issue_cert("proxy.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "proxy.pem"))
    proxy = await proxy_factory(
        relay=RELAY,
        listeners=[{"address": "127.0.0.1", "port": 0, "require_starttls": True,
                    "tls": {"cert": str(tmp_path / "proxy.pem"), "key": str(tmp_path / "proxy.pem")}}],
    )
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert await client.cmd("MAIL FROM:<a@sender.test>") == (530, "5.7.0 Must issue a STARTTLS command first")
    await client.close()


async def test_graceful_shutdown_lets_data_finish(proxy_factory: ProxyFactory, sink: Sink) -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    class Slow:
        name = "slow"

        @hookimpl
        async def data(self) -> None:
            entered.set()
            await gate.wait()

    proxy = await proxy_factory(Slow(), upstream=sink.port, relay=RELAY)
    busy, idle = await Talk.open(port_of(proxy)), await Talk.open(port_of(proxy))
    await busy.hello()
    await idle.hello()
    await busy.cmd("MAIL FROM:<a@sender.test>")
    await busy.cmd("RCPT TO:<b@dest.test>")
    await busy.cmd("DATA")
    busy.send(HEAD + b"x\r\n.\r\n")
    await asyncio.wait_for(entered.wait(), 5)
    stopping = asyncio.create_task(proxy.stop(grace=5))
    assert await idle.reply() == (421, "4.3.2 Service shutting down, try again later")
    gate.set()
    assert (await busy.reply())[0] == 250  # the message in flight was finished, not dropped
    assert await busy.reply() == (421, "4.3.2 Service shutting down, try again later")
    await stopping
    assert len(sink.messages) == 1


async def test_command_cap_per_session(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(limits={"max_commands": 5})
    client = await Talk.open(port_of(proxy))
    await client.greeting()
    for _ in range(5):
        assert (await client.cmd("NOOP"))[0] == 250
    assert await client.cmd("NOOP") == (421, "4.7.0 Too many commands, closing connection")
    assert await client.closed()


async def test_command_cap_does_not_cut_off_a_productive_session(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(relay=RELAY, limits={"max_commands": 5})
    client = await Talk.open(port_of(proxy))
    await client.hello()  # 1 command
    for _ in range(4):  # 4 commands per message, far past the cap in total
        assert (await client.send_message("a@sender.test", ["b@dest.test"], HEAD + b"x\r\n"))[0] == 250
    await client.close()


@pytest.mark.parametrize("rcpt_mode", ["relay", "at_data"])
async def test_dsn_is_not_offered_once_the_upstream_is_seen_without_it(
    proxy_factory: ProxyFactory, caplog: pytest.LogCaptureFixture, rcpt_mode: str
) -> None:
    """Before the first connection DSN is offered (a Postfix-like upstream is assumed). DSN
    parameters for an upstream without DSN are never dropped silently: 451 4.5.4, and the
    client's retry sees no DSN in the EHLO (it then handles the DSN itself, RFC 3461)."""
    upstream = RawUpstream()  # no DSN in its EHLO
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    proxy = await proxy_factory(relay=RELAY, delivery={
        "type": "smtp", "host": "127.0.0.1", "port": server.sockets[0].getsockname()[1], "tls": "none",
        "rcpt_mode": rcpt_mode})
    client = await Talk.open(port_of(proxy))
    code, ehlo = await client.hello()
    assert "DSN" in ehlo.split("\n")  # not known yet: a Postfix-like upstream is assumed
    refused = (451, "4.5.4 The upstream mail server does not offer DSN: send again without DSN parameters")
    assert (await client.cmd("MAIL FROM:<a@sender.test> RET=HDRS"))[0] == 250
    if rcpt_mode == "relay":  # the upstream transaction opens at the first RCPT
        assert await client.cmd("RCPT TO:<b@dest.test> NOTIFY=SUCCESS") == refused
        assert (await client.cmd("RSET"))[0] == 250
    else:
        assert (await client.cmd("RCPT TO:<b@dest.test> NOTIFY=SUCCESS"))[0] == 250
        assert (await client.cmd("DATA"))[0] == 354
        client.send(HEAD + b"x\r\n.\r\n")
        assert await client.reply() == refused
    assert upstream.commands(b"MAIL") == []  # never sent without them
    assert "dsn_not_offered" in caplog.text
    code, ehlo = await client.cmd("EHLO client.test")
    assert code == 250
    assert "DSN" not in ehlo.split("\n")
    assert await client.cmd("MAIL FROM:<a@sender.test> RET=HDRS") == (
        555, "5.5.4 MAIL parameter RET not supported")
    assert (await client.send_message("a@sender.test", ["b@dest.test"], HEAD + b"x\r\n"))[0] == 250
    await client.close()
    server.close()


async def test_a_crash_in_delivery_is_a_451_and_one_structured_line_with_the_traceback(
    proxy_factory: ProxyFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy's own failures are session events like any other (event=..., sid=..., the
    fields, exc=the traceback), not free text a log pipeline cannot match."""
    from smtpproxy.eventlog import KeyValueFormatter

    proxy = await proxy_factory(relay=RELAY)

    async def crash(*args: Any) -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(proxy.services.delivery, "deliver", crash)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    with caplog.at_level(logging.INFO):
        code, _ = await client.send_message("a@sender.test", ["b@dest.test"], HEAD + b"body\r\n")
    await client.close()
    assert code == 451
    [record] = [r for r in caplog.records if r.getMessage() == "delivery_crashed"]
    line = KeyValueFormatter().format(record)
    assert line.startswith("ts=") and " level=error event=delivery_crashed " in line
    assert " tx=" in line and "RuntimeError: disk on fire" in line
