"""The milter behind a real Sendmail (Debian's 8.17, tests/sendmail_instance.py), as
docs/deploy-milter.md configures it: ``INPUT_MAIL_FILTER`` with ``F=T``.

The same checks as with Postfix (tests/postfix/test_milter_postfix.py) where the two MTAs
differ: Sendmail hides its own fields (Received, and the Date and Message-Id it adds) from
milters, sends no ``v`` macro by default, and reads SMFIR_PROGRESS only at the end of the
message, where Postfix reads it at any step. Every assertion is about what Sendmail did: its
SMTP replies and the queue file it wrote.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from smtpproxy import Message, Recipient, Session, Verdict, hookimpl
from smtpproxy.milter.server import MilterServer
from tests.conftest import chain_of, make_config
from tests.postfix.test_milter_postfix import send
from tests.sendmail_instance import SendmailInstance
from tests.sendmail_instance import sendmail_factory as sendmail_factory  # noqa: PLC0414 - the fixture

MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: via sendmail\r\n"
           b"Received: from earlier.test by relay.test; Mon, 7 Dec 2026 00:00:00 +0000\r\n"
           b"\r\nOriginal body.\r\n")

Start = Callable[..., Any]


@pytest.fixture
async def sendmail_with_milter(
    tmp_path: Path, sendmail_factory: Callable[..., SendmailInstance],
) -> AsyncIterator[Start]:
    servers: list[MilterServer] = []

    async def start(*plugins: object, progress_interval: float = 10.0, **options: str) -> SendmailInstance:
        config = make_config(tmp_path, milter={"listen": "inet:127.0.0.1:0",
                                               "progress_interval": progress_interval})
        server = MilterServer(config, chain=chain_of(*plugins, timeout=5.0))
        await server.start()
        servers.append(server)
        address = server.address
        assert isinstance(address, tuple)
        return await asyncio.to_thread(sendmail_factory, address[1], **options)

    yield start
    for server in servers:
        await server.stop(grace=1)


class Edit:
    name = "edit"

    @hookimpl
    def data(self, message: Message) -> None:
        message.add_header("X-Milter-Checked", "yes")
        message.add_header("X-Appended", "last", prepend=False)
        message.replace_header("Subject", "[checked] via sendmail")
        message.remove_header("Received", matching=lambda value: "earlier.test" in value)


async def test_header_edits_land_in_sendmails_queue_file(sendmail_with_milter: Start) -> None:
    sendmail = await sendmail_with_milter(Edit())
    replies = await send(sendmail, ["bob@dest.test"], MESSAGE)
    assert [code for code, _ in replies] == [250, 250, 250], replies
    [queued] = sendmail.queued()
    fields = [(name, value) for name, value in queued.headers if name != "Return-Path"]  # delivery's
    names = [name for name, _ in fields]
    # The added field is the topmost, above Sendmail's own Received as above Postfix's
    # (tests/postfix/test_milter_postfix.py); Sendmail's own fields, which we never saw, stay
    # where Sendmail put them.
    # The client's Received went; Sendmail's own, which it counts apart (a milter's index
    # counts the fields it was shown), stays.
    assert names == ["X-Milter-Checked", "Received", "Date", "Message-Id", "From", "To", "Subject",
                     "X-Appended"]
    assert dict(fields)["Subject"] == "[checked] via sendmail"
    assert fields[1][1].startswith("from client.test (localhost [127.0.0.1]) by mx.sendmail.test")
    assert queued.body == b"Original body.\n"


class SlowJudge:
    """Takes 1.5 s over a recipient called slow-*, then refuses it."""

    name = "slow_judge"

    @hookimpl
    async def rcpt_to(self, recipient: Recipient) -> Verdict | None:
        if str(recipient.address).startswith("slow-"):
            await asyncio.sleep(1.5)
            return Verdict.reject("slow-* is refused here")
        return None


async def test_a_slow_recipient_gets_the_plugins_answer_not_a_progress_packet(
        sendmail_with_milter: Start) -> None:
    """Before, the progress packet at 0.5 s was RCPT's reply to Sendmail: the recipient got
    250 without the plugin's refusal, and the filter failed (451 for what followed)."""
    sendmail = await sendmail_with_milter(SlowJudge(), progress_interval=0.5,
                                          milter_options="F=T, T=S:10s;R:10s;E:5m")
    started = time.monotonic()
    replies = await send(sendmail, ["slow-bob@dest.test", "carol@dest.test"], MESSAGE)
    # Sendmail names the recipient in a 550 at RCPT, before the text.
    assert replies[1] == (550, "5.7.1 <slow-bob@dest.test>... slow-* is refused here"), replies
    assert time.monotonic() - started >= 1.5
    assert replies[2][0] == 250 and replies[3][0] == 250, replies  # the filter still answers
    [queued] = sendmail.queued()
    assert queued.recipients == ["<carol@dest.test>"]


class SlowData:
    name = "slow_data"

    @hookimpl
    async def data(self, message: Message) -> None:
        await asyncio.sleep(4.5)
        message.add_header("X-Judged", "slowly")


async def test_a_slow_message_keeps_sendmail_waiting_with_progress(sendmail_with_milter: Start) -> None:
    """At the end of the message Sendmail reads SMFIR_PROGRESS: with its read timeout at 3 s
    (counted in whole seconds, so 2 s at least), a 4.5 s data plugin still gets its edit in
    because a packet comes every 0.5 s."""
    sendmail = await sendmail_with_milter(SlowData(), progress_interval=0.5,
                                          milter_options="F=T, T=S:10s;R:3s;E:5m")
    replies = await send(sendmail, ["bob@dest.test"], MESSAGE)
    assert replies[-1][0] == 250, replies
    [queued] = sendmail.queued()
    assert ("X-Judged", "slowly") in queued.headers


class Refuse:
    name = "refuse"

    @hookimpl
    def data(self) -> Verdict:
        return Verdict.reject("not this one, thanks", code=554)


async def test_a_refusal_at_the_end_of_the_message_reaches_the_client(sendmail_with_milter: Start) -> None:
    sendmail = await sendmail_with_milter(Refuse())
    replies = await send(sendmail, ["bob@dest.test"], MESSAGE)
    assert replies[-1] == (554, "5.7.1 not this one, thanks"), replies
    assert sendmail.queued() == []


class Hold:
    name = "hold"

    @hookimpl
    def data(self) -> Verdict:
        return Verdict.quarantine("score 12 >= 10")


async def test_a_quarantine_is_held_in_sendmails_queue(sendmail_with_milter: Start) -> None:
    """SMFIR_QUARANTINE: the client gets 250, and Sendmail keeps the message in its queue as
    quarantined (an hf file with the reason, which its queue runs leave alone)."""
    sendmail = await sendmail_with_milter(Hold())
    replies = await send(sendmail, ["bob@dest.test"], MESSAGE)
    assert replies[-1][0] == 250, replies
    assert sendmail.queued() == []
    [(reason, held)] = sendmail.quarantined()
    assert "score 12 >= 10" in reason
    assert held.recipients == ["<bob@dest.test>"]
    # What docs/deploy-milter.md tells an admin: mailq -qQ lists it, sendmail -Q -qQ releases
    # what is quarantined, -qI<queue id> one message.
    [hf] = (sendmail.root / "queue").glob("hf*")
    assert "score 12 >= 10" in sendmail.command("-bp", "-qQ")
    sendmail.command("-Q", "-qQ", "-qIno-such-id")
    assert len(sendmail.quarantined()) == 1
    sendmail.command("-Q", "-qQ", f"-qI{hf.name[2:]}")
    assert sendmail.quarantined() == [] and len(sendmail.queued()) == 1


class Where:
    name = "where"
    seen: ClassVar[list[tuple[str, int]]] = []

    @hookimpl
    def connect(self, session: Session) -> None:
        Where.seen.append((session.local_ip, session.local_port))


async def test_the_connect_macros_deploy_milter_gives_send_the_address_and_port(
        sendmail_with_milter: Start) -> None:
    """Sendmail's default connect macros have no {daemon_port}, which a policy group's
    ``listeners`` needs; the line in docs/deploy-milter.md adds it."""
    Where.seen.clear()
    plain = await sendmail_with_milter(Where())
    await send(plain, ["bob@dest.test"], MESSAGE)
    macros = ("define(`confMILTER_MACROS_CONNECT', "
              "`j, _, {daemon_name}, {daemon_addr}, {daemon_port}, {if_name}, {if_addr}')dnl\n")
    told = await sendmail_with_milter(Where(), mc=macros)
    await send(told, ["bob@dest.test"], MESSAGE)
    assert Where.seen == [("", 0), ("127.0.0.1", told.port)]
