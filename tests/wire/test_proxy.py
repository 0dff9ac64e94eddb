"""End to end: a client on a real socket → the proxy → Maildir or a real upstream socket."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtpproxy import Message, Recipient, Session, Transaction, Verdict, hookimpl
from tests.conftest import (
    ProxyFactory,
    Sink,
    SinkHandler,
    Talk,
    closed_port,
    maildir_messages,
    port_of,
    start_sink,
)

BODY = b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nHello.\r\n..dot line\r\n"
RELAY = {"domains": ["dest.test", "other.test"], "networks": []}


class Recorder:
    """Records every hook call, returns nothing."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def connect(self, session: Session) -> None:
        self.calls.append("connect")

    @hookimpl
    async def helo(self, hostname: str) -> None:
        self.calls.append(f"helo:{hostname}")

    @hookimpl
    def mail_from(self, sender: Any) -> None:
        self.calls.append(f"mail_from:{sender.text}")

    @hookimpl
    def rcpt_to(self, recipient: Recipient) -> None:
        self.calls.append(f"rcpt_to:{recipient.address.text}")

    @hookimpl
    def data(self, message: Message) -> None:
        self.calls.append(f"data:{message.get('Subject')}")

    @hookimpl
    def after_message(self, decision: Any) -> None:
        self.calls.append(f"after_message:{decision.disposition}")

    @hookimpl
    def disconnect(self) -> None:
        self.calls.append("disconnect")


class Decide:
    """Returns a fixed verdict in one phase (optionally only for one recipient)."""

    def __init__(self, phase: str, verdict: Verdict | None, only: str | None = None):
        self.phase = phase
        self.verdict = verdict
        self.only = only
        self.name = f"decide-{phase}"

    def _maybe(self, phase: str, recipient: Recipient | None = None) -> Verdict | None:
        if phase != self.phase:
            return None
        if self.only and recipient is not None and recipient.address.text != self.only:
            return None
        return self.verdict

    @hookimpl
    def connect(self) -> Verdict | None:
        return self._maybe("connect")

    @hookimpl
    def helo(self) -> Verdict | None:
        return self._maybe("helo")

    @hookimpl
    def mail_from(self) -> Verdict | None:
        return self._maybe("mail_from")

    @hookimpl
    def rcpt_to(self, recipient: Recipient) -> Verdict | None:
        return self._maybe("rcpt_to", recipient)

    @hookimpl
    def data(self) -> Verdict | None:
        return self._maybe("data")


async def wait_for(predicate: Any) -> None:
    """Poll a condition (after-the-fact hooks run once the client has its answer)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_multi_transaction_session_to_upstream(proxy_factory: ProxyFactory, sink: Sink) -> None:
    recorder = Recorder()
    proxy = await proxy_factory(recorder, upstream=sink.port, relay=RELAY)
    client = await Talk.open(port_of(proxy))
    code, ehlo = await client.hello()
    assert code == 250
    for ext in ("PIPELINING", "SIZE 26214400", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"):
        assert ext in ehlo.split("\n")
    assert "CHUNKING" not in ehlo and "STARTTLS" not in ehlo
    code, text = await client.send_message("a@sender.test", ["b@dest.test", "c@other.test"], BODY)
    assert (code, text) == (250, "2.0.0 Ok: queued as SINK1")  # the upstream's own words
    assert await client.cmd("RSET") == (250, "2.0.0 OK")
    code, _ = await client.send_message("x@sender.test", ["b@dest.test"], BODY.replace(b"hi", b"two"))
    assert code == 250
    assert await client.cmd("QUIT") == (221, "2.0.0 Bye")
    await client.close()

    assert [m.sender for m in sink.messages] == ["a@sender.test", "x@sender.test"]
    assert sink.messages[0].recipients == ["b@dest.test", "c@other.test"]
    assert sink.messages[0].content == BODY.replace(b"..dot", b".dot")  # unstuffed, then intact
    await wait_for(lambda: recorder.calls[-1:] == ["disconnect"])
    assert recorder.calls == [
        "connect", "helo:client.test", "mail_from:a@sender.test", "rcpt_to:b@dest.test",
        "rcpt_to:c@other.test", "data:hi", "after_message:delivered", "mail_from:x@sender.test",
        "rcpt_to:b@dest.test", "data:two", "after_message:delivered", "disconnect",
    ]


async def test_maildir_delivery_is_on_disk_before_250(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    proxy = await proxy_factory()
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, text = await client.send_message("a@sender.test", ["bob@localhost"], BODY)
    assert code == 250, text
    stored = maildir_messages(tmp_path / "mail")
    assert len(stored) == 1
    assert stored[0].startswith(b"Return-Path: <a@sender.test>\r\nDelivered-To: bob@localhost\r\n")
    assert stored[0].endswith(b"\r\nHello.\r\n.dot line\r\n")
    assert list((tmp_path / "mail" / "tmp").iterdir()) == []
    await client.close()


async def test_default_relay_policy_is_not_open(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory()
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    code, text = await client.cmd("RCPT TO:<victim@example.com>")
    assert (code, text) == (554, "5.7.1 <victim@example.com>: Relay access denied")
    assert (await client.cmd("RCPT TO:<postmaster>"))[0] == 250  # RFC 5321 4.5.1
    assert (await client.cmd("RCPT TO:<x@host.test>"))[0] == 250
    await client.close()


async def test_relay_networks_trust_the_client(proxy_factory: ProxyFactory, sink: Sink) -> None:
    proxy = await proxy_factory(upstream=sink.port, relay={"domains": [], "networks": ["127.0.0.0/8"]})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, _ = await client.send_message("a@sender.test", ["anyone@example.com"], BODY)
    assert code == 250
    await client.close()


@pytest.mark.parametrize(
    ("phase", "verdict", "expected"),
    [
        ("connect", Verdict.reject("Go away"), (554, "5.7.1 Go away")),
        ("connect", Verdict.tempfail("Busy"), (421, "4.7.1 Busy")),
    ],
)
async def test_connect_verdicts_close_the_session(
    proxy_factory: ProxyFactory, phase: str, verdict: Verdict, expected: tuple[int, str]
) -> None:
    recorder = Recorder()
    proxy = await proxy_factory(Decide(phase, verdict), recorder)
    client = await Talk.open(port_of(proxy))
    assert await client.greeting() == expected
    assert await client.closed()
    await wait_for(lambda: "disconnect" in recorder.calls)
    assert recorder.calls == ["disconnect"]  # the recorder's connect never ran: chain stopped


@pytest.mark.parametrize(
    ("phase", "verdict", "expected"),
    [
        ("helo", Verdict.reject("Bad HELO", code=550, enhanced="5.7.1"), (550, "5.7.1 Bad HELO")),
        ("helo", Verdict.tempfail("Later"), (451, "4.7.1 Later")),
        ("mail_from", Verdict.reject("Sender refused", enhanced="5.7.1"), (550, "5.7.1 Sender refused")),
        ("mail_from", Verdict.tempfail("SPF temperror", enhanced="4.7.24"), (451, "4.7.24 SPF temperror")),
    ],
)
async def test_helo_and_mail_verdicts_refuse_the_command(
    proxy_factory: ProxyFactory, phase: str, verdict: Verdict, expected: tuple[int, str]
) -> None:
    proxy = await proxy_factory(Decide(phase, verdict))
    client = await Talk.open(port_of(proxy))
    await client.greeting()
    ehlo = await client.cmd("EHLO client.test")
    if phase == "helo":
        assert ehlo == expected
        # the session is not greeted, so MAIL is out of sequence
        assert await client.cmd("MAIL FROM:<a@sender.test>") == (503, "5.5.1 Send HELO/EHLO first")
    else:
        assert await client.cmd("MAIL FROM:<a@sender.test>") == expected
        assert await client.cmd("RCPT TO:<b@localhost>") == (503, "5.5.1 Need MAIL command first")
        # a new MAIL may start over: the refused one left no transaction behind
        assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == expected[0]
    await client.close()


async def test_per_recipient_rejection(proxy_factory: ProxyFactory, sink: Sink) -> None:
    reject_one = Decide("rcpt_to", Verdict.reject("No such user", code=550, enhanced="5.1.1"),
                        only="nobody@dest.test")
    proxy = await proxy_factory(reject_one, upstream=sink.port, relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250
    assert await client.cmd("RCPT TO:<nobody@dest.test>") == (550, "5.1.1 No such user")
    assert (await client.cmd("RCPT TO:<c@dest.test>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.send(BODY + b".\r\n")
    assert (await client.reply())[0] == 250
    assert sink.messages[0].recipients == ["b@dest.test", "c@dest.test"]
    await client.close()


async def test_data_reject_and_tempfail_deliver_nothing(proxy_factory: ProxyFactory, sink: Sink) -> None:
    for verdict, expected in (
        (Verdict.reject("Spam", enhanced="5.7.1"), (550, "5.7.1 Spam")),
        (Verdict.tempfail("Greylisted", code=450, enhanced="4.7.1"), (450, "4.7.1 Greylisted")),
    ):
        proxy = await proxy_factory(Decide("data", verdict), upstream=sink.port, relay=RELAY)
        client = await Talk.open(port_of(proxy))
        await client.hello()
        assert await client.send_message("a@sender.test", ["b@dest.test"], BODY) == expected
        await client.close()
    assert sink.messages == []


@pytest.mark.parametrize("phase", ["connect", "helo", "mail_from", "rcpt_to", "data"])
async def test_discard_at_any_phase_answers_250_and_drops(
    proxy_factory: ProxyFactory, sink: Sink, phase: str
) -> None:
    recorder = Recorder()
    proxy = await proxy_factory(Decide(phase, Verdict.discard("test discard")), recorder,
                                upstream=sink.port, relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, text = await client.send_message("a@sender.test", ["b@dest.test"], BODY)
    assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
    await client.close()
    await wait_for(lambda: "after_message:discarded" in recorder.calls)
    assert sink.messages == []


@pytest.mark.parametrize("phase", ["mail_from", "rcpt_to", "data"])
async def test_quarantine_stores_message_with_reasons(
    proxy_factory: ProxyFactory, sink: Sink, tmp_path: Path, phase: str
) -> None:
    proxy = await proxy_factory(Decide(phase, Verdict.quarantine("looks phishy")),
                                upstream=sink.port, relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, _ = await client.send_message("a@sender.test", ["b@dest.test"], BODY)
    assert code == 250
    await client.close()
    assert sink.messages == []
    stored = sorted((tmp_path / "quarantine").iterdir())
    assert [p.suffix for p in stored] == [".eml", ".json"]
    assert stored[0].read_bytes() == BODY.replace(b"..dot", b".dot")
    meta = json.loads(stored[1].read_text())
    assert meta["reason"] == "looks phishy"
    assert meta["sender"] == "a@sender.test" and meta["recipients"] == ["b@dest.test"]


async def test_accept_skips_the_rest_of_the_phase(proxy_factory: ProxyFactory, sink: Sink) -> None:
    proxy = await proxy_factory(
        Decide("data", Verdict.accept("allow-listed")),
        Decide("data", Verdict.reject("would reject")),
        upstream=sink.port, relay=RELAY,
    )
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.send_message("a@sender.test", ["b@dest.test"], BODY))[0] == 250
    assert len(sink.messages) == 1
    await client.close()


class Broken:
    name = "broken"

    def __init__(self, how: str, on_error: str = "tempfail"):
        self.how = how
        self.on_error = on_error
        self.timeout = 0.3

    @hookimpl
    async def data(self, message: Message) -> Verdict | None:
        if self.how == "raise":
            raise RuntimeError("plugin bug")
        if self.how == "hang":
            await asyncio.Event().wait()
        if self.how == "bad-return":
            return "OK"  # type: ignore[return-value]
        return None


@pytest.mark.parametrize("how", ["raise", "hang", "bad-return"])
async def test_broken_plugin_tempfails_and_server_lives_on(
    proxy_factory: ProxyFactory, sink: Sink, how: str
) -> None:
    proxy = await proxy_factory(Broken(how), upstream=sink.port, relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, text = await client.send_message("a@sender.test", ["b@dest.test"], BODY)
    assert (code, text) == (451, "4.3.0 Temporary local problem, please try again later")
    assert sink.messages == []  # an exception never silently accepts
    # the same session goes on, and so does the server
    assert (await client.cmd("NOOP"))[0] == 250
    other = await Talk.open(port_of(proxy))
    assert (await other.hello())[0] == 250
    await client.close()
    await other.close()


async def test_broken_plugin_with_on_error_continue_is_skipped(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    proxy = await proxy_factory(Broken("raise", on_error="continue"), upstream=sink.port, relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.send_message("a@sender.test", ["b@dest.test"], BODY))[0] == 250
    assert len(sink.messages) == 1
    await client.close()


class HeaderAdder:
    name = "adder"

    @hookimpl
    def data(self, session: Session, transaction: Transaction, message: Message) -> None:
        message.add_header("X-Checked", f"yes; client={session.client.ip}")
        message.remove_header("Subject")


async def test_message_edits_reach_the_upstream(proxy_factory: ProxyFactory, sink: Sink) -> None:
    proxy = await proxy_factory(HeaderAdder(), upstream=sink.port, relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.send_message("a@sender.test", ["b@dest.test"], BODY))[0] == 250
    content = sink.messages[0].content
    assert content.startswith(b"X-Checked: yes; client=127.0.0.1\r\nFrom: a@sender.test\r\n")
    assert b"Subject:" not in content
    await client.close()


async def test_upstream_down_gives_4xx_and_nothing_is_acknowledged(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(upstream=closed_port(), relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, text = await client.send_message("a@sender.test", ["b@dest.test"], BODY)
    assert (code, text) == (451, "4.4.1 Upstream mail server not reachable, try again later")
    await client.close()


async def test_silent_upstream_times_out_with_4xx(proxy_factory: ProxyFactory) -> None:
    silent_conns: list[asyncio.StreamWriter] = []

    async def never_greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_conns.append(writer)

    silent = await asyncio.start_server(never_greet, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    proxy = await proxy_factory(upstream=port, relay=RELAY,
                                delivery={"connect_timeout": 0.5, "command_timeout": 0.5})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, text = await client.send_message("a@sender.test", ["b@dest.test"], BODY)
    assert code == 451 and text.startswith("4.4.")
    await client.close()
    silent.close()
    for w in silent_conns:
        w.close()


async def test_upstream_refusals_are_relayed_faithfully(proxy_factory: ProxyFactory) -> None:
    handler = SinkHandler(data_reply="554 5.7.1 Upstream says this is spam")
    upstream = await start_sink(handler)
    proxy = await proxy_factory(upstream=upstream.port, relay=RELAY)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert await client.send_message("a@sender.test", ["b@dest.test"], BODY) == (
        554, "5.7.1 Upstream says this is spam")
    handler.data_reply = "452 4.3.1 Upstream disk full"
    assert await client.send_message("a@sender.test", ["b@dest.test"], BODY) == (
        452, "4.3.1 Upstream disk full")
    await client.close()
    upstream.server.close()


async def test_upstream_recipient_refusal_at_data_time(proxy_factory: ProxyFactory) -> None:
    handler = SinkHandler(rcpt_replies={"gone@dest.test": "550 5.1.1 User unknown"})
    upstream = await start_sink(handler)
    proxy = await proxy_factory(upstream=upstream.port, relay=RELAY,
                                delivery={"rcpt_mode": "at_data", "refusal_memory": 0})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    # every recipient refused permanently: the refusal is relayed
    assert await client.send_message("a@sender.test", ["gone@dest.test"], BODY) == (
        550, "5.1.1 User unknown")
    # some refused: never deliver to part of them after acknowledging all; ask to retry
    code, text = await client.send_message("a@sender.test", ["ok@dest.test", "gone@dest.test"], BODY)
    assert code == 451 and "gone@dest.test" in text and "550" in text
    assert handler.messages == []
    await client.close()
    upstream.server.close()


async def test_aiosmtplib_client_end_to_end(proxy_factory: ProxyFactory, sink: Sink) -> None:
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY)
    errors, response = await aiosmtplib.send(
        BODY, sender="a@sender.test", recipients=["b@dest.test"],
        hostname="127.0.0.1", port=port_of(proxy), start_tls=False,
    )
    assert errors == {} and response.startswith("2.0.0 Ok")
    assert sink.messages[0].content == BODY  # aiosmtplib stuffed the dots; we unstuffed them


async def test_every_command_is_answered_by_its_own_handler(proxy_factory: ProxyFactory) -> None:
    """The per-connection command table (built without binding every smtp_* method of every new
    connection) finds each verb, case-insensitively, and nothing else."""
    proxy = await proxy_factory()
    client = await Talk.open(port_of(proxy))
    await client.hello()
    for line, expected in [
        ("NOOP", (250, "2.0.0 OK")), ("noop", (250, "2.0.0 OK")), ("RSET", (250, "2.0.0 OK")),
        ("VRFY someone", (252, "2.5.0 Cannot VRFY user, but will accept message and attempt delivery")),
        ("EXPN list", (502, "5.5.1 EXPN not available")),
        ("AUTH PLAIN", (502, "5.5.1 AUTH not available on this listener")),
        ("FOO", (500, "5.5.1 Command unrecognized: FOO")),
        ("__INIT__", (500, "5.5.1 Command unrecognized: __INIT__")),
        ("_COMMANDS", (500, "5.5.1 Command unrecognized: _COMMANDS")),
    ]:
        assert await client.cmd(line) == expected, line
    assert (await client.cmd("HELP"))[0] == 214
    assert (await client.cmd("QUIT"))[0] == 221
    await client.close()


async def test_a_session_without_notification_hooks_still_ends_fully(
    proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture,
) -> None:
    """With no after_message or disconnect implementers the session's end needs no task; it is
    still logged, its chain lease returned and its notifications list kept empty."""
    caplog.set_level(logging.INFO, logger="smtpproxy.session")
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY)
    chain = proxy.services.chain
    assert not chain.implements("after_message") and not chain.implements("disconnect")
    client = await Talk.open(port_of(proxy))
    await client.hello()
    for n in range(3):
        code, _ = await client.send_message("a@sender.test", ["b@dest.test"], f"Subject: {n}\r\n\r\nx\r\n".encode())
        assert code == 250
    session = next(iter(proxy.services.sessions))
    assert not session.conversation.pending
    assert proxy.services.leases.users(chain) == 1
    await client.cmd("QUIT")
    await client.close()
    await asyncio.wait_for(proxy.services.drained.wait(), 5)
    assert proxy.services.leases.users(chain) == 0
    assert [r.getMessage() for r in caplog.records].count("disconnect") == 1
