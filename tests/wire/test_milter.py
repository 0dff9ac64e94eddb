"""Milter mode at the protocol level: a small fake MTA speaks to the real server over loopback.

The fake MTA sends exactly the packets Postfix sends (macros before each event, header
values with their leading space once SMFIP_HDR_LEADSPC is agreed, body lines with CRLF)
and reads the replies, so each test checks the bytes an MTA would act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from smtpproxy import Decision, Message, Recipient, Session, Transaction, Verdict, hookimpl
from smtpproxy.addresses import parse_mailbox
from smtpproxy.milter import codec
from smtpproxy.milter.server import MilterServer
from smtpproxy.milter.session import MilterPolicy, slow_steps
from tests import milter_mta
from tests.conftest import chain_of, make_config

TIMEOUT = 5.0
POSTFIX_ACTIONS = 0x1FF
POSTFIX_PROTOCOL = 0x1FFFFF  # everything protocol 6 defines, as Postfix offers it


class FakeMTA:
    """The MTA side of the milter protocol, on a real socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = codec.FrameDecoder(1 << 24)
        self.queue: list[tuple[bytes, bytes]] = []
        self.protocol = 0
        """The SMFIP_* steps the filter agreed to; like Postfix, no reply is read for SMFIP_NR_* ones."""

    @classmethod
    async def open(cls, server: MilterServer) -> FakeMTA:
        address = server.address
        if isinstance(address, str):
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    def send(self, *commands: codec.Command) -> None:
        for command in commands:
            self.writer.write(milter_mta.encode_command(command))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self) -> codec.Response:
        while not self.queue:
            data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            if not data:
                raise ConnectionError("the milter closed the connection")
            self.queue += self.decoder.feed(data)
        return milter_mta.decode_response(*self.queue.pop(0))

    async def until_final(self) -> list[codec.Response]:
        """Responses up to and including the final one (what Postfix reads after an event)."""
        out = []
        while True:
            response = await self.recv()
            if isinstance(response, codec.Progress):
                continue
            out.append(response)
            if isinstance(response, codec.Continue | codec.Accept | codec.Reject | codec.Tempfail
                          | codec.Discard | codec.ReplyCode):
                return out

    def waits(self, command: codec.Command) -> bool:
        """Whether the MTA reads a reply to *command* (milter8.c: not when SMFIP_NR_* was agreed)."""
        step = _NO_REPLY_STEPS.get(type(command), 0)
        return not self.protocol & step

    def passed(self, command: codec.Command) -> list[codec.Response]:
        """What the MTA reads when the filter lets *command* pass: SMFIR_CONTINUE, or nothing
        for a step without reply."""
        return [codec.Continue()] if self.waits(command) else []

    async def event(self, command: codec.Command, **macros: str) -> list[codec.Response]:
        """Send an event (with its macros first) and read its reply, unless none was agreed
        (then []: a reply sent anyway would be read as the next event's, as by Postfix)."""
        code = milter_mta.encode_command(command)[4:5].decode()
        if macros:
            self.send(codec.Macro(code, tuple(macros.items())))
        self.send(command)
        if not self.waits(command):
            return []
        return await self.until_final()

    async def passes(self, command: codec.Command, **macros: str) -> None:
        """Send an event the filter is expected to let pass."""
        assert await self.event(command, **macros) == self.passed(command)

    async def negotiate(self, actions: int = POSTFIX_ACTIONS, protocol: int = POSTFIX_PROTOCOL) -> codec.OptNeg:
        self.send(codec.OptNeg(6, actions, protocol))
        reply = await self.recv()
        assert isinstance(reply, codec.OptNeg)
        self.protocol = reply.protocol
        return reply

    async def start(self, client: str = "192.0.2.7", **macros: str | None) -> list[codec.Response]:
        """Negotiate and connect, like Postfix at the start of an SMTP session (a macro given
        as None is not sent)."""
        await self.negotiate()
        sent = {"j": "mx.test", "v": "Postfix 3.7.11", **macros}
        return await self.event(codec.Connect("[" + client + "]", "4", 40000, client),
                                **{k: v for k, v in sent.items() if v is not None})

    async def envelope(self, sender: str = "<alice@sender.test>", *rcpts: str) -> None:
        await self.passes(codec.Helo("client.test"))
        await self.passes(codec.Mail((sender,)), i="4ABC")
        for rcpt in rcpts or ("<bob@dest.test>",):
            await self.passes(codec.Rcpt((rcpt,)))

    async def content(self, headers: list[tuple[str, str]], body: bytes) -> list[codec.Response]:
        """Headers (values with their leading space), EOH, body, EOM; the EOM responses."""
        for name, value in headers:
            await self.passes(codec.Header(name, value))
        await self.passes(codec.EndOfHeaders())
        if body:
            await self.passes(codec.Body(body))
        return await self.event(codec.EndOfBody())

    async def closed(self) -> bool:
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
                if not data:
                    return True
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


_NO_REPLY_STEPS: dict[type, int] = {
    codec.Connect: codec.SMFIP_NR_CONN, codec.Helo: codec.SMFIP_NR_HELO, codec.Mail: codec.SMFIP_NR_MAIL,
    codec.Rcpt: codec.SMFIP_NR_RCPT, codec.Header: codec.SMFIP_NR_HDR, codec.EndOfHeaders: codec.SMFIP_NR_EOH,
    codec.Body: codec.SMFIP_NR_BODY, codec.Data: codec.SMFIP_NR_DATA, codec.Unknown: codec.SMFIP_NR_UNKN,
}

Factory = Callable[..., Awaitable[MilterServer]]


@pytest.fixture
async def milter(tmp_path: Path) -> AsyncIterator[Factory]:
    started: list[MilterServer] = []

    async def start(*plugins: object, **settings: Any) -> MilterServer:
        limits = settings.pop("limits", {})
        config = make_config(tmp_path, milter={"listen": "inet:127.0.0.1:0", **settings},
                             limits=limits)
        server = MilterServer(config, chain=chain_of(*plugins, timeout=1.0))
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(grace=1)


HEADERS = [("From", " Alice <alice@sender.test>"), ("To", " bob@dest.test"),
           ("Subject", " hello\n\tfolded"), ("Received", " from a by b"), ("Received", " from c by d")]
BODY = b"Line one.\r\nLine two.\r\n"


class Recorder:
    """Records on the event loop (async hooks), so a test sees each record as soon as the
    milter has answered."""

    name = "recorder"

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self.messages: list[bytes] = []
        self.decisions: list[Decision] = []
        self.disconnects = 0

    @hookimpl
    async def connect(self, session: Session) -> None:
        self.sessions.append(session)

    @hookimpl
    async def data(self, message: Message) -> None:
        self.messages.append(message.raw)

    @hookimpl
    async def after_message(self, decision: Decision) -> None:
        self.decisions.append(decision)

    @hookimpl
    async def disconnect(self) -> None:
        self.disconnects += 1


# -- negotiation -----------------------------------------------------------------


CONTENT_NO_REPLY = codec.SMFIP_NR_HDR | codec.SMFIP_NR_EOH | codec.SMFIP_NR_BODY
ENVELOPE_NO_REPLY = codec.SMFIP_NR_CONN | codec.SMFIP_NR_HELO | codec.SMFIP_NR_MAIL
"""RCPT is never among them: smtpproxy's own rules there refuse one recipient, not the message."""


async def test_negotiation_asks_only_for_what_it_uses(milter: Factory) -> None:
    mta = await FakeMTA.open(await milter())
    reply = await mta.negotiate()
    assert reply.version == 6
    assert reply.actions == codec.ACTIONS  # no SMFIF_SETSYMLIST: the default macros suffice
    # No plugin answers any event before the end of the message: no reply to any of them
    # but RCPT, where the recipient limit and the policy groups may refuse one recipient.
    assert reply.protocol == (codec.SMFIP_NODATA | codec.SMFIP_NOUNKNOWN | codec.SMFIP_HDR_LEADSPC
                              | CONTENT_NO_REPLY | ENVELOPE_NO_REPLY)
    assert not reply.protocol & codec.SMFIP_NR_RCPT
    await mta.close()


async def test_the_agreement_is_logged_at_info_when_new(milter: Factory, caplog: pytest.LogCaptureFixture) -> None:
    """Postfix opens a connection per SMTP session and offers the same each time: the
    agreement is an info line the first time, debug after, and info again when the offer
    changes (an MTA reconfigured to grant fewer actions)."""
    server = await milter()
    offers = [POSTFIX_ACTIONS, POSTFIX_ACTIONS, codec.SMFIF_ADDHDRS, POSTFIX_ACTIONS, codec.SMFIF_ADDHDRS]
    with caplog.at_level(logging.DEBUG, logger="smtpproxy"):
        for actions in offers:
            mta = await FakeMTA.open(server)
            await mta.negotiate(actions=actions)
            await mta.close()
        await asyncio.sleep(0)
    lines = [(r.levelno, r.smtpproxy_fields["granted"]) for r in caplog.records  # type: ignore[attr-defined]
             if r.msg == "milter_negotiated"]
    every = codec.action_names(codec.ACTIONS)
    assert lines == [(logging.INFO, every), (logging.DEBUG, every), (logging.INFO, ["ADDHDRS"]),
                     (logging.DEBUG, every), (logging.DEBUG, ["ADDHDRS"])]
    # Another milter (another chain) says its agreement again.
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="smtpproxy"):
        mta = await FakeMTA.open(await milter())
        await mta.negotiate()
        await mta.close()
    assert [r.levelno for r in caplog.records if r.msg == "milter_negotiated"] == [logging.INFO]


class RcptJudge:
    """Refuses one recipient at RCPT (a rcpt_to hook: the MTA must wait for that answer)."""

    name = "rcpt_judge"

    def __init__(self) -> None:
        self.envelopes: list[list[str]] = []

    @hookimpl
    def rcpt_to(self, recipient: Recipient) -> Verdict | None:
        if recipient.address.local == "nobody":
            return Verdict.reject("no such user", code=550, enhanced="5.1.1")
        return None

    @hookimpl
    def data(self, transaction: Transaction) -> None:
        self.envelopes.append([r.address.text for r in transaction.envelope.recipients])


class HeloJudge:
    name = "helo_judge"

    @hookimpl
    def helo(self, hostname: str) -> None:
        return None


class MailJudge:
    name = "mail_judge"

    @hookimpl
    def mail_from(self) -> None:
        return None


@pytest.mark.parametrize(
    ("plugins", "replies"),
    [
        ((), 0),
        ((RcptJudge(),), 0),
        ((HeloJudge(),), codec.SMFIP_NR_HELO),
        # MAIL goes without reply with a plugin too: its refusal comes with RCPT's answer
        ((MailJudge(),), 0),
        ((Recorder(),), codec.SMFIP_NR_CONN),  # implements connect (and data, after_message, disconnect)
        ((RcptJudge(), HeloJudge(), Recorder()), codec.SMFIP_NR_CONN | codec.SMFIP_NR_HELO),
    ],
)
async def test_no_reply_is_asked_for_events_no_plugin_answers(
    milter: Factory, plugins: tuple[object, ...], replies: int
) -> None:
    """SMFIP_NR_* for CONNECT and HELO without a hook in the chain, and for MAIL (a refusal
    there comes with RCPT's answer); the content never gets a reply before the end of the
    message; RCPT always does."""
    mta = await FakeMTA.open(await milter(*plugins))
    reply = await mta.negotiate()
    assert reply.protocol & (ENVELOPE_NO_REPLY | CONTENT_NO_REPLY | codec.SMFIP_NR_RCPT) == (
        ENVELOPE_NO_REPLY & ~replies | CONTENT_NO_REPLY)
    await mta.close()


async def test_mail_keeps_its_reply_when_the_sender_login_map_is_on(tmp_path: Path) -> None:
    config = make_config(tmp_path, milter={"listen": "inet:127.0.0.1:0", "check_sender_login": True},
                         sender_login={"map": {"alice@sender.test": "alice"}})
    server = MilterServer(config, chain=chain_of())
    await server.start()
    try:
        mta = await FakeMTA.open(server)
        reply = await mta.negotiate()
        assert not reply.protocol & codec.SMFIP_NR_MAIL  # the map may refuse the sender at MAIL
        assert reply.protocol & codec.SMFIP_NR_HELO
        await mta.close()
    finally:
        await server.stop(grace=1)


async def test_a_plugins_rcpt_reject_still_reaches_the_mta(milter: Factory) -> None:
    judge = RcptJudge()
    mta = await FakeMTA.open(await milter(judge))
    await mta.start()
    assert await mta.event(codec.Helo("client.test")) == []  # no reply agreed: none read
    assert await mta.event(codec.Mail(("<a@sender.test>",))) == []
    assert await mta.event(codec.Rcpt(("<nobody@dest.test>",))) == [
        codec.ReplyCode("550 5.1.1 no such user")]
    await mta.passes(codec.Rcpt(("<bob@dest.test>",)))
    answer = await mta.content(HEADERS, BODY)
    assert answer[-1] == codec.Accept()
    assert judge.envelopes == [["bob@dest.test"]]
    await mta.close()


async def test_a_recipient_over_the_limit_is_refused_alone_without_rcpt_plugins(
    milter: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """Over limits.max_recipients with no rcpt_to plugin: RCPT is still answered (no
    SMFIP_NR_RCPT), so the extra recipient hears 452 and the message goes to the others. A
    refusal kept for the end of the message would refuse it for all of them, and again at
    every retry of the same envelope."""
    caplog.set_level(logging.INFO)
    recorder = Recorder()
    mta = await FakeMTA.open(await milter(recorder, limits={"max_recipients": 1}))
    await mta.start()
    await mta.passes(codec.Helo("client.test"))
    await mta.passes(codec.Mail(("<alice@sender.test>",)), i="4ABC")
    await mta.passes(codec.Rcpt(("<bob@dest.test>",)))
    assert await mta.event(codec.Rcpt(("<carol@dest.test>",))) == [
        codec.ReplyCode("452 4.5.3 Too many recipients")]
    assert (await mta.content(HEADERS, BODY))[-1] == codec.Accept()
    assert len(recorder.messages) == 1  # the data chain ran, for bob
    assert not [r for r in caplog.records if r.getMessage() == "milter_refusal_deferred"]
    await mta.close()


async def test_a_sender_the_parser_refuses_without_reply_refuses_the_message(milter: Factory) -> None:
    mta = await FakeMTA.open(await milter())
    await mta.start()
    assert await mta.event(codec.Helo("client.test")) == []
    assert await mta.event(codec.Mail(("<no-at-sign>",))) == []
    # MAIL had no reply to carry the refusal: the first answer the MTA waits for, RCPT's, does.
    answer = await mta.event(codec.Rcpt(("<bob@dest.test>",)))
    assert len(answer) == 1 and isinstance(answer[0], codec.ReplyCode)
    assert answer[0].text.startswith("501 5.1.7 Bad sender address syntax")
    await mta.close()


async def test_negotiation_keeps_within_the_offer(milter: Factory) -> None:
    mta = await FakeMTA.open(await milter())
    reply = await mta.negotiate(actions=codec.SMFIF_ADDHDRS, protocol=codec.SMFIP_NODATA)
    assert (reply.actions, reply.protocol) == (codec.SMFIF_ADDHDRS, codec.SMFIP_NODATA)
    await mta.close()


async def test_connections_beyond_max_sessions_are_closed_at_once(
    milter: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await milter(limits={"max_sessions": 2, "max_sessions_per_ip": 2})
    held = [await FakeMTA.open(server) for _ in range(2)]
    for mta in held:
        await mta.negotiate()  # both are being served
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        extra = await FakeMTA.open(server)
        assert await extra.closed()  # before any packet: the MTA applies milter_default_action
    assert [r.msg for r in caplog.records if r.msg == "milter_refused"] == ["milter_refused"]
    await held[0].close()
    for _ in range(50):  # its slot is free once the milter has seen it go
        again = await FakeMTA.open(server)
        try:
            await again.negotiate()
            break
        except ConnectionError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the slot of the closed connection never came back")
    await again.close()
    await held[1].close()


# -- a whole session -----------------------------------------------------------


async def test_session_from_events_and_macros(milter: Factory) -> None:
    recorder = Recorder()
    seen: dict[str, Any] = {}

    class Inspect:
        @hookimpl
        def mail_from(self, session: Session, transaction: Transaction) -> None:
            seen.update(helo=session.helo, tls=session.tls, user=session.auth_user,
                        transport=session.transport, client=session.client,
                        params=transaction.envelope.sender_params)

        @hookimpl
        def rcpt_to(self, recipient: Recipient) -> None:
            seen["rcpt_params"] = recipient.params

    mta = await FakeMTA.open(await milter(recorder, Inspect()))
    assert await mta.start(client="192.0.2.7") == mta.passed(codec.Connect("", "U"))
    await mta.passes(codec.Helo("client.test"), **{
        "{tls_version}": "TLSv1.3", "{cipher}": "TLS_AES_256_GCM_SHA384", "{cipher_bits}": "256",
    })
    await mta.passes(codec.Mail(("<alice@sender.test>", "SIZE=123", "BODY=8BITMIME")),
                     **{"{auth_authen}": "alice", "i": "4ABC"})
    await mta.passes(codec.Rcpt(("<bob@dest.test>", "NOTIFY=NEVER")))
    assert await mta.content(HEADERS, BODY) == [codec.Accept()]
    assert seen["helo"] == "client.test"
    assert seen["tls"].version == "TLSv1.3" and seen["tls"].bits == 256
    assert seen["user"] == "alice"
    assert seen["transport"] == "milter"
    assert (seen["client"].ip, seen["client"].port, seen["client"].hostname) == ("192.0.2.7", 40000, None)
    assert seen["params"] == {"SIZE": "123", "BODY": "8BITMIME"}
    assert seen["rcpt_params"] == {"NOTIFY": "NEVER"}
    # The message as plugins see it: the MTA's headers, exactly, with CRLF folds.
    assert recorder.messages == [
        b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: hello\r\n\tfolded\r\n"
        b"Received: from a by b\r\nReceived: from c by d\r\n\r\n" + BODY
    ]
    assert [d.disposition for d in recorder.decisions] == ["delivered"]
    assert "4ABC" in recorder.decisions[0].reply.text
    mta.send(codec.Quit())
    assert await mta.closed()
    await asyncio.sleep(0)
    for _ in range(50):
        if recorder.disconnects:
            break
        await asyncio.sleep(0.01)
    assert recorder.disconnects == 1


@pytest.mark.parametrize(("name", "kept"), [("mx.sender.test", "mx.sender.test"), ("[192.0.2.7]", None),
                                            ("unknown", None), ("evil\r\nX-Injected: 1", None),
                                            ("bad name.test", None)])
async def test_only_a_real_hostname_from_the_mta_becomes_the_clients(
    milter: Factory, name: str, kept: str | None
) -> None:
    recorder = Recorder()
    mta = await FakeMTA.open(await milter(recorder))
    await mta.negotiate()
    await mta.passes(codec.Connect(name, "4", 40000, "192.0.2.7"))
    await mta.close()
    assert [s.client.hostname for s in recorder.sessions] == [kept]


async def test_several_messages_and_abort_on_one_connection(milter: Factory) -> None:
    recorder = Recorder()
    mta = await FakeMTA.open(await milter(recorder))
    await mta.start()
    await mta.envelope()
    assert await mta.content(HEADERS[:1], b"first\r\n") == [codec.Accept()]
    # Second transaction aborted after the envelope (the client sent RSET).
    await mta.passes(codec.Mail(("<carol@sender.test>",)))
    mta.send(codec.Abort())
    await mta.passes(codec.Mail(("<>",)))
    await mta.passes(codec.Rcpt(("<bob@dest.test>",)))
    assert await mta.content(HEADERS[:1], b"third\r\n") == [codec.Accept()]
    assert [m.split(b"\r\n\r\n")[1] for m in recorder.messages] == [b"first\r\n", b"third\r\n"]
    assert len(recorder.decisions) == 2  # no after_message for the aborted one
    await mta.close()


async def test_quit_new_connection_starts_a_new_session(milter: Factory) -> None:
    recorder = Recorder()
    mta = await FakeMTA.open(await milter(recorder))
    await mta.start(client="192.0.2.1")
    mta.send(codec.QuitNewConnection())
    await mta.passes(codec.Connect("[192.0.2.2]", "4", 1, "192.0.2.2"))
    assert [s.client.ip for s in recorder.sessions] == ["192.0.2.1", "192.0.2.2"]
    assert recorder.sessions[0].id != recorder.sessions[1].id
    assert recorder.disconnects == 1
    await mta.close()


# -- verdicts ------------------------------------------------------------------


def Refuse(phase: str, verdict: Verdict) -> object:
    """A plugin that answers ``verdict`` in ``phase``."""

    def hook(self: object) -> Verdict:
        return verdict

    return type(f"Refuse_{phase}", (), {phase: hookimpl(hook)})()


async def test_reject_at_rcpt_is_a_reply_code_with_escaped_percent(milter: Factory) -> None:
    mta = await FakeMTA.open(await milter(Refuse("rcpt_to", Verdict.reject("100% unknown\nsecond line"))))
    await mta.start()
    await mta.passes(codec.Helo("client.test"))
    await mta.passes(codec.Mail(("<a@b.test>",)))
    assert await mta.event(codec.Rcpt(("<bob@dest.test>",))) == [
        codec.ReplyCode("550-5.7.1 100%% unknown\r\n550 5.7.1 second line")
    ]
    await mta.close()


@pytest.mark.parametrize(
    ("verdict", "expected"),
    [
        (Verdict.reject("Go away"), "554 5.7.1 Go away"),
        (Verdict.tempfail("Later", enhanced="4.7.0"), "421 4.7.0 Later"),
    ],
)
async def test_connect_refusal_uses_session_codes(milter: Factory, verdict: Verdict, expected: str) -> None:
    mta = await FakeMTA.open(await milter(Refuse("connect", verdict)))
    assert await mta.start() == [codec.ReplyCode(expected)]
    await mta.close()


async def test_reject_at_data_and_accept_is_not_a_message_accept(milter: Factory) -> None:
    class AcceptAtMail:
        @hookimpl
        def mail_from(self) -> Verdict:
            return Verdict.accept()

    recorder = Recorder()
    mta = await FakeMTA.open(await milter(AcceptAtMail(), Refuse("data", Verdict.tempfail("Scanner busy")),
                                          recorder))
    await mta.start()
    await mta.envelope()  # ACCEPT at MAIL is SMFIR_CONTINUE: the message still comes to us
    assert await mta.content(HEADERS, BODY) == [codec.ReplyCode("451 4.7.1 Scanner busy")]
    assert recorder.messages == []  # the data chain stopped at the refusal...
    assert [d.disposition for d in recorder.decisions] == ["tempfailed"]  # ...after_message did not
    await mta.close()


async def test_discard_at_rcpt_applies_at_end_of_message(milter: Factory) -> None:
    recorder = Recorder()
    mta = await FakeMTA.open(await milter(Refuse("rcpt_to", Verdict.discard("spam trap")), recorder))
    await mta.start()
    await mta.envelope()
    assert await mta.content(HEADERS, BODY) == [codec.Discard()]
    assert recorder.messages == []  # the data chain does not run for a discarded message
    assert [d.disposition for d in recorder.decisions] == ["discarded"]
    await mta.close()


async def test_quarantine_holds_the_message_with_the_reason(milter: Factory) -> None:
    mta = await FakeMTA.open(await milter(Refuse("data", Verdict.quarantine("looks phishy"))))
    await mta.start()
    await mta.envelope()
    assert await mta.content(HEADERS, BODY) == [codec.Quarantine("looks phishy"), codec.Accept()]
    await mta.close()


# -- modifications -------------------------------------------------------------


class Edit:
    def __init__(self, edit: Callable[[Message, Transaction], None]) -> None:
        self.edit = edit

    @hookimpl
    def data(self, message: Message, transaction: Transaction) -> None:
        self.edit(message, transaction)


async def edits_for(milter: Factory, edit: Callable[[Message, Transaction], None],
                    headers: list[tuple[str, str]] = HEADERS) -> list[codec.Response]:
    mta = await FakeMTA.open(await milter(Edit(edit)))
    await mta.start()
    await mta.envelope("<alice@sender.test>", "<bob@dest.test>", "<carol@dest.test>")
    responses = await mta.content(headers, BODY)
    await mta.close()
    return responses


async def test_added_headers_go_to_the_top_and_the_end(milter: Factory) -> None:
    def edit(message: Message, _: Transaction) -> None:
        message.add_header("X-First", "1")
        message.add_header("X-Top", "2")  # prepended: above X-First
        message.add_header("X-Last", "3", prepend=False)

    assert await edits_for(milter, edit) == [
        codec.InsertHeader(0, "X-Top", " 2"),
        codec.InsertHeader(1, "X-First", " 1"),
        codec.AddHeader("X-Last", " 3"),
        codec.Accept(),
    ]


async def test_replace_and_remove_use_per_name_indexes(milter: Factory) -> None:
    def edit(message: Message, _: Transaction) -> None:
        message.replace_header("Subject", "new subject")
        message.remove_header("Received", matching=lambda v: v.startswith("from c"))
        message.remove_header("To")

    assert await edits_for(milter, edit) == [
        codec.ChangeHeader(1, "Subject", " new subject"),
        codec.ChangeHeader(2, "Received", ""),
        codec.ChangeHeader(1, "To", ""),
        codec.Accept(),
    ]


async def test_removing_every_occurrence_goes_last_first(milter: Factory) -> None:
    def edit(message: Message, _: Transaction) -> None:
        message.remove_header("Received")

    assert await edits_for(milter, edit) == [
        codec.ChangeHeader(2, "Received", ""), codec.ChangeHeader(1, "Received", ""), codec.Accept(),
    ]


async def test_body_and_envelope_changes(milter: Factory) -> None:
    big = b"x" * 100 + b"\r\n"
    new_body = big * 1000  # 102 000 bytes: two SMFIR_REPLBODY chunks

    def edit(message: Message, transaction: Transaction) -> None:
        message.replace_body(new_body)
        transaction.envelope.set_sender(parse_mailbox("bounces@sender.test", allow_utf8=False))
        transaction.envelope.remove_recipient(parse_mailbox("carol@dest.test", allow_utf8=False))
        transaction.envelope.add_recipient(parse_mailbox("archive@dest.test", allow_utf8=False),
                                           {"NOTIFY": "NEVER"})

    responses = await edits_for(milter, edit)
    chunks = [r for r in responses if isinstance(r, codec.ReplaceBody)]
    assert b"".join(c.chunk for c in chunks) == new_body
    assert [len(c.chunk) for c in chunks] == [codec.MAX_BODY_CHUNK, len(new_body) - codec.MAX_BODY_CHUNK]
    assert [r for r in responses if not isinstance(r, codec.ReplaceBody)] == [
        codec.ChangeFrom("<bounces@sender.test>"),
        codec.DeleteRecipient("<carol@dest.test>"),
        codec.AddRecipient("<archive@dest.test>", "NOTIFY=NEVER"),
        codec.Accept(),
    ]


def _every_edit(message: Message, transaction: Transaction) -> None:
    message.add_header("X-Tag", "yes")
    message.replace_header("Subject", "new subject")
    message.replace_body(b"new body\r\n")
    transaction.envelope.add_recipient(parse_mailbox("archive@dest.test", allow_utf8=False))


class EditAndQuarantine(Edit):
    @hookimpl
    def data(self, message: Message, transaction: Transaction) -> Verdict:
        self.edit(message, transaction)
        return Verdict.quarantine("looks phishy")


@pytest.mark.parametrize(("settings", "final"), [
    ({}, codec.ReplyCode("451 4.3.0 Temporary local problem, please try again later")),
    ({"default_action": "reject"}, codec.ReplyCode("550 5.3.0 Message refused because of a local problem")),
    ({"default_action": "accept", "not_granted_action": "tempfail"},
     codec.ReplyCode("451 4.3.0 Temporary local problem, please try again later")),
    ({"not_granted_action": "accept"}, codec.Accept()),
])
async def test_actions_the_mta_did_not_grant_are_never_sent(
    milter: Factory, caplog: pytest.LogCaptureFixture, settings: dict[str, str], final: codec.Response
) -> None:
    """The MTA grants only SMFIF_ADDHDRS; the plugins changed a header, the body and the
    recipients and quarantined the message. None of those is sent (a libmilter filter cannot,
    and Sendmail calls it a liar): the message gets milter.not_granted_action (by default
    milter.default_action), never a plain accept with the edits dropped unless so configured."""
    recorder = Recorder()
    mta = await FakeMTA.open(await milter(recorder, EditAndQuarantine(_every_edit), **settings))
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        reply = await mta.negotiate(actions=codec.SMFIF_ADDHDRS)
        assert reply.actions == codec.SMFIF_ADDHDRS
        await mta.event(codec.Connect("[192.0.2.7]", "4", 1, "192.0.2.7"))
        await mta.envelope()
        assert await mta.content(HEADERS, BODY) == [final]
    await mta.close()
    fields = {r.msg: r.smtpproxy_fields for r in caplog.records  # type: ignore[attr-defined]
              if r.msg in ("milter_negotiated", "milter_not_granted")}
    assert fields["milter_negotiated"]["granted"] == ["ADDHDRS"]
    assert "QUARANTINE" in fields["milter_negotiated"]["not_granted"]
    assert fields["milter_not_granted"]["missing"] == ["CHGBODY", "ADDRCPT", "CHGHDRS", "QUARANTINE"]
    [decision] = recorder.decisions
    assert decision.disposition == ("delivered" if final == codec.Accept() else
                                    "tempfailed" if "451" in str(final) else "rejected")
    assert "did not grant CHGBODY, ADDRCPT, CHGHDRS, QUARANTINE" in decision.reason


async def test_granted_edits_are_sent_when_only_those_are_granted(milter: Factory) -> None:
    def edit(message: Message, _: Transaction) -> None:
        message.add_header("X-Tag", "yes", prepend=False)

    mta = await FakeMTA.open(await milter(Edit(edit)))
    await mta.negotiate(actions=codec.SMFIF_ADDHDRS)
    await mta.event(codec.Connect("[192.0.2.7]", "4", 1, "192.0.2.7"))
    await mta.envelope()
    assert await mta.content(HEADERS, BODY) == [codec.AddHeader("X-Tag", " yes"), codec.Accept()]
    await mta.close()


async def test_the_authenticated_user_does_not_carry_into_the_next_transaction(milter: Factory) -> None:
    users: list[str | None] = []

    class Inspect:
        @hookimpl
        def mail_from(self, session: Session) -> None:
            users.append(session.auth_user)

    mta = await FakeMTA.open(await milter(Inspect()))
    await mta.start()
    await mta.passes(codec.Helo("client.test"))
    for macros in ({"{auth_authen}": "alice", "{auth_type}": "PLAIN"}, {}, {"{auth_authen}": "bob"}):
        await mta.passes(codec.Mail(("<a@sender.test>",)), i="4ABC", **macros)
        await mta.passes(codec.Rcpt(("<bob@dest.test>",)))
        assert await mta.content(HEADERS[:1], b"x\r\n") == [codec.Accept()]
    await mta.passes(codec.Mail(("<a@sender.test>",)), **{"{auth_authen}": "carol"})
    mta.send(codec.Abort())  # an aborted one too
    await mta.passes(codec.Mail(("<a@sender.test>",)))
    await mta.passes(codec.Rcpt(("<bob@dest.test>",)))  # MAIL has no reply: RCPT's says all was read
    await mta.close()
    assert users == ["alice", None, "bob", "carol", None]


async def test_without_leading_space_extension_values_are_bare(milter: Factory) -> None:
    recorder = Recorder()

    def edit(message: Message, _: Transaction) -> None:
        message.add_header("X-Tag", "yes")

    mta = await FakeMTA.open(await milter(recorder, Edit(edit)))
    offer = POSTFIX_PROTOCOL & ~codec.SMFIP_HDR_LEADSPC & ~codec.SMFIP_NR_HDR
    await mta.negotiate(protocol=offer)
    await mta.event(codec.Connect("[192.0.2.7]", "4", 1, "192.0.2.7"))
    await mta.envelope()
    await mta.passes(codec.Header("Subject", "hi"))  # replies per header
    await mta.passes(codec.EndOfHeaders())
    assert await mta.event(codec.EndOfBody()) == [codec.InsertHeader(0, "X-Tag", "yes"), codec.Accept()]
    assert recorder.messages == [b"Subject: hi\r\n\r\n"]
    await mta.close()


# -- limits and failures -------------------------------------------------------


TOO_BIG = codec.ReplyCode("552 5.3.4 Message size exceeds fixed maximum message size")


async def test_message_over_the_size_limit_is_refused_with_552(milter: Factory) -> None:
    """Body chunks get no reply (SMFIP_NR_BODY): the end of the message refuses it."""
    recorder = Recorder()
    mta = await FakeMTA.open(await milter(recorder, limits={"max_message_size": 1000}))
    await mta.start()
    assert mta.protocol & codec.SMFIP_NR_BODY
    await mta.envelope()
    await mta.passes(codec.EndOfHeaders())
    assert await mta.event(codec.Body(b"y" * 2000)) == []
    assert await mta.event(codec.Body(b"y" * 2000)) == []
    assert await mta.event(codec.EndOfBody()) == [TOO_BIG]
    assert recorder.messages == []
    await mta.close()


async def test_without_no_reply_for_the_body_the_chunk_over_the_limit_gets_552(milter: Factory) -> None:
    recorder = Recorder()
    mta = await FakeMTA.open(await milter(recorder, limits={"max_message_size": 1000}))
    await mta.negotiate(protocol=POSTFIX_PROTOCOL & ~codec.SMFIP_NR_BODY)
    await mta.passes(codec.Connect("[192.0.2.7]", "4", 1, "192.0.2.7"))
    await mta.envelope()
    await mta.passes(codec.EndOfHeaders())
    assert await mta.event(codec.Body(b"y" * 2000)) == [TOO_BIG]
    assert recorder.messages == []
    await mta.close()


class Broken:
    name = "broken"

    @hookimpl
    def rcpt_to(self) -> None:
        raise RuntimeError("database down")


class BrokenAtMail:
    name = "broken_at_mail"

    @hookimpl
    def mail_from(self) -> None:
        raise RuntimeError("database down")


async def test_a_plugins_refusal_at_mail_comes_with_every_rcpt_answer(
    milter: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """MAIL has no reply even with a mail_from plugin (one round trip less a message): its
    refusal is the answer to each RCPT, as Postfix gives its own MAIL restrictions'
    (smtpd_delay_reject). One line for the event, the mail_from line with the verdict: no
    milter_refusal_deferred warning, which is for disagreements with the MTA."""
    caplog.set_level(logging.INFO)
    judge = Refuse("mail_from", Verdict.reject("SPF fail", code=550, enhanced="5.7.23"))
    mta = await FakeMTA.open(await milter(judge))
    reply = await mta.negotiate()
    assert reply.protocol & codec.SMFIP_NR_MAIL
    await mta.event(codec.Connect("[192.0.2.7]", "4", 40000, "192.0.2.7"))
    await mta.passes(codec.Helo("client.test"))
    assert await mta.event(codec.Mail(("<a@sender.test>",))) == []
    for rcpt in ("<bob@dest.test>", "<carol@dest.test>"):
        assert await mta.event(codec.Rcpt((rcpt,))) == [codec.ReplyCode("550 5.7.23 SPF fail")]
    [line] = [r.smtpproxy_fields for r in caplog.records if r.getMessage() == "mail_from"]  # type: ignore[attr-defined]
    assert (line["verdict"], line["reply"]) == ("reject", 550)
    assert not [r for r in caplog.records if r.getMessage() == "milter_refusal_deferred"]
    mta.send(codec.Abort())  # the client gives up: RSET
    await mta.close()


async def test_an_address_our_parser_refuses_at_mail_is_a_warning_and_every_rcpts_answer(
    milter: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """The MTA took a sender our parser refuses (a disagreement worth a warning): MAIL has no
    reply, so the 501 is the answer to each RCPT, and milter_refusal_deferred says so."""
    caplog.set_level(logging.INFO)
    mta = await FakeMTA.open(await milter())
    await mta.start()
    await mta.passes(codec.Helo("client.test"))
    assert await mta.event(codec.Mail(("<a@-b.test>",))) == []
    answer = codec.ReplyCode("501 5.1.7 Bad sender address syntax: domain label starts with a hyphen")
    assert await mta.event(codec.Rcpt(("<bob@dest.test>",))) == [answer]
    assert await mta.event(codec.Rcpt(("<carol@dest.test>",))) == [answer]
    [line] = [r for r in caplog.records if r.getMessage() == "milter_refusal_deferred"]
    assert line.levelno == logging.WARNING
    assert line.smtpproxy_fields["reply"] == 501  # type: ignore[attr-defined]
    await mta.close()


TEMPFAIL_REPLY = codec.ReplyCode("451 4.3.0 Temporary local problem, please try again later")
REJECT_REPLY = codec.ReplyCode("550 5.3.0 Message refused because of a local problem")


@pytest.mark.parametrize(
    ("plugin", "action", "expected"),
    [
        (Broken, "tempfail", TEMPFAIL_REPLY),
        (Broken, "reject", REJECT_REPLY),
        (Broken, "accept", codec.Accept()),
        # failing at MAIL, which has no reply: the default action comes with RCPT's answer
        (BrokenAtMail, "tempfail", TEMPFAIL_REPLY),
        (BrokenAtMail, "reject", REJECT_REPLY),
    ],
)
async def test_plugin_error_becomes_the_default_action(
    milter: Factory, caplog: pytest.LogCaptureFixture, plugin: type, action: str, expected: codec.Response
) -> None:
    caplog.set_level(logging.INFO)
    mta = await FakeMTA.open(await milter(plugin(), default_action=action))
    await mta.start()
    await mta.passes(codec.Helo("client.test"))
    assert await mta.event(codec.Mail(("<a@b.test>",))) == []
    assert await mta.event(codec.Rcpt(("<bob@dest.test>",))) == [expected]
    assert any(r.getMessage() == "milter_default_action" for r in caplog.records)
    await mta.close()


async def test_mail_keeps_its_reply_when_a_failing_plugin_passes_the_message(milter: Factory) -> None:
    """With milter.default_action accept a mail_from plugin's failure answers SMFIR_ACCEPT,
    which only MAIL's own reply can say: MAIL keeps it."""
    mta = await FakeMTA.open(await milter(BrokenAtMail(), default_action="accept"))
    reply = await mta.negotiate()
    assert not reply.protocol & codec.SMFIP_NR_MAIL
    await mta.event(codec.Connect("[192.0.2.7]", "4", 40000, "192.0.2.7"))
    await mta.passes(codec.Helo("client.test"))
    assert await mta.event(codec.Mail(("<a@b.test>",))) == [codec.Accept()]
    await mta.close()


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\0\0\0\0", "length 0"),
        (struct.pack(">I", 10_000_000) + b"O", "exceeds the limit"),
        (codec.encode_packet(b"Z", b"junk"), "unknown command"),
        (codec.encode_packet(b"H", b"no terminator"), "NUL"),
        (codec.encode_packet(b"E"), "without MAIL"),
        (codec.encode_packet(b"H", b"x\0")[:-1], "truncated packet"),
    ],
)
async def test_protocol_errors_close_cleanly_with_a_log_line(
    milter: Factory, caplog: pytest.LogCaptureFixture, raw: bytes, problem: str
) -> None:
    caplog.set_level(logging.INFO)
    mta = await FakeMTA.open(await milter())
    await mta.start()
    mta.send_raw(raw)
    if problem == "truncated packet":
        mta.writer.write_eof()
    assert await mta.closed()
    errors = [r for r in caplog.records if r.getMessage() == "milter_protocol_error"]
    assert len(errors) == 1
    assert problem in errors[0].smtpproxy_fields["error"]  # type: ignore[attr-defined]


async def test_unix_socket_listener(tmp_path: Path) -> None:
    path = tmp_path / "milter.sock"
    config = make_config(tmp_path, milter={"listen": f"unix:{path}", "socket_mode": "0600"})
    server = MilterServer(config, chain=chain_of())
    await server.start()
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        mta = await FakeMTA.open(server)
        assert await mta.start() == mta.passed(codec.Connect("", "U"))
        await mta.close()
    finally:
        await server.stop(grace=1)
    assert not path.exists()


async def test_the_listening_line_carries_the_version_and_the_log_format(
    milter: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    import smtpproxy
    from smtpproxy.versions import LOG_FORMAT_VERSION

    caplog.set_level(logging.INFO)
    await milter(Broken())
    [listening] = [r for r in caplog.records if r.getMessage() == "listening"]
    fields = listening.smtpproxy_fields  # type: ignore[attr-defined]
    assert (fields["version"], fields["log_format"]) == (smtpproxy.__version__, LOG_FORMAT_VERSION)


# -- a peer that stalls ---------------------------------------------------------------
# The server reads the socket in blocks, with one deadline (milter.timeout) for each whole
# packet however it is split: these check that the hang protection stayed.


def _timeouts(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "milter_timeout"]


async def test_an_mta_silent_between_packets_is_dropped_after_the_timeout(
    milter: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    mta = await FakeMTA.open(await milter(timeout=0.3))
    await mta.start()
    assert await mta.closed()
    assert len(_timeouts(caplog)) == 1


async def test_an_mta_that_stops_inside_a_packet_is_dropped_after_the_timeout(
    milter: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    mta = await FakeMTA.open(await milter(timeout=0.3))
    await mta.start()
    mta.send_raw(milter_mta.encode_command(codec.Helo("client.test"))[:7])  # header and 2 bytes
    assert await mta.closed()
    assert len(_timeouts(caplog)) == 1


async def test_a_packet_trickling_in_is_bounded_by_one_timeout_not_one_per_read(
    milter: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """Each byte comes well within milter.timeout of the one before, but the packet as a
    whole does not: the connection is dropped (a per-read deadline would wait forever)."""
    caplog.set_level(logging.INFO)
    mta = await FakeMTA.open(await milter(timeout=0.5))
    await mta.start()
    packet = milter_mta.encode_command(codec.Helo("a-long-hostname.client.test"))
    closed = asyncio.ensure_future(mta.closed())
    for byte in packet[:-1]:
        if closed.done():
            break
        mta.send_raw(bytes([byte]))
        await asyncio.sleep(0.1)
    assert await closed
    assert len(_timeouts(caplog)) == 1


class SlowData:
    name = "slow_data"

    @hookimpl
    async def data(self) -> None:
        await asyncio.sleep(0.5)


async def accepted_after_progress(mta: FakeMTA) -> None:
    """The headers and the end of the message; a slow data plugin (SlowData at a progress
    interval of 0.1 s) must keep the MTA waiting: SMFIR_PROGRESS at least twice, then ACCEPT."""
    for name, value in HEADERS:
        await mta.passes(codec.Header(name, value))
    await mta.passes(codec.EndOfHeaders())
    mta.send(codec.EndOfBody())
    responses = [await mta.recv()]
    while isinstance(responses[-1], codec.Progress):
        responses.append(await mta.recv())
    assert responses[-1] == codec.Accept()
    assert len(responses) >= 3 and set(responses[:-1]) == {codec.Progress()}


async def test_a_slow_data_plugin_keeps_the_mta_waiting_with_progress(milter: Factory) -> None:
    mta = await FakeMTA.open(await milter(SlowData(), progress_interval=0.1))
    await mta.start()
    await mta.envelope()
    await accepted_after_progress(mta)
    await mta.close()


class SlowRcpt:
    name = "slow_rcpt"

    @hookimpl
    async def rcpt_to(self) -> None:
        await asyncio.sleep(0.5)


async def test_a_slow_rcpt_plugin_keeps_the_mta_waiting_with_progress(milter: Factory) -> None:
    mta = await FakeMTA.open(await milter(SlowRcpt(), progress_interval=0.1))
    await mta.start()
    await mta.passes(codec.Helo("client.test"))
    await mta.passes(codec.Mail(("<alice@sender.test>",)), i="4ABC")
    mta.send(codec.Rcpt(("<bob@dest.test>",)))
    responses = [await mta.recv()]
    while isinstance(responses[-1], codec.Progress):
        responses.append(await mta.recv())
    assert responses[-1] == codec.Continue()
    assert len(responses) >= 3 and set(responses[:-1]) == {codec.Progress()}
    await mta.close()


@pytest.mark.parametrize("version", ["8.17.1.9", None])
async def test_sendmail_gets_progress_only_at_the_end_of_the_message(
        milter: Factory, version: str | None) -> None:
    """Sendmail reads SMFIR_PROGRESS at the end of the message only; at RCPT it would be
    that step's (bogus) reply: the recipient passed unanswered and the filter failed
    (tests/postfix/test_milter_sendmail.py shows it with the real Sendmail). An MTA that does
    not say it is Postfix (its ``v`` macro: Sendmail's version, or none) waits without one."""
    mta = await FakeMTA.open(await milter(SlowRcpt(), SlowData(), progress_interval=0.1))
    await mta.start(v=version)
    await mta.passes(codec.Helo("client.test"))
    await mta.passes(codec.Mail(("<alice@sender.test>",)), i="4ABC")
    mta.send(codec.Rcpt(("<bob@dest.test>",)))
    assert await mta.recv() == codec.Continue()  # after the plugin's 0.5 s, with nothing before
    await accepted_after_progress(mta)
    await mta.close()


def test_progress_only_where_something_can_keep_the_mta_waiting(tmp_path: Path) -> None:
    """A task and a timer per RCPT cost the milter ~5 % of its CPU (issue 31): a step gets
    SMFIR_PROGRESS only when a plugin, a table lookup or a group's chain works there."""
    policy = MilterPolicy()
    assert slow_steps(chain_of(), policy) == 0
    assert slow_steps(chain_of(SlowRcpt()), policy) == codec.SMFIP_NR_RCPT
    assert slow_steps(chain_of(SlowData()), policy) == 0
    login = MilterPolicy(sender_login=object())  # type: ignore[arg-type]
    assert slow_steps(chain_of(), login) == codec.SMFIP_NR_MAIL
