"""Milter mode end to end: SMTP client → a real Postfix → smtpproxy milter → Maildir.

Postfix runs with ``smtpd_milters = inet:127.0.0.1:PORT`` and ``milter_protocol = 6``
(the settings docs/deploy-milter.md gives). The client only ever talks to Postfix, so
every assertion is about what Postfix did with our replies and modification actions:
its SMTP replies, and the message it delivered.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

from smtpproxy import Message, Transaction, Verdict, hookimpl
from smtpproxy.addresses import parse_mailbox
from smtpproxy.milter.server import MilterServer
from tests.conftest import Talk, chain_of, make_config
from tests.postfix_instance import PostfixFactory, PostfixInstance

MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: via milter\r\n"
           b"Received: from earlier.test by relay.test\r\n"
           b"Message-ID: <milter-1@sender.test>\r\n\r\nOriginal body.\r\n")

Start = Callable[..., Any]


@pytest.fixture
async def postfix_with_milter(tmp_path: Path, postfix_factory: PostfixFactory) -> AsyncIterator[Start]:
    servers: list[MilterServer] = []

    async def start(*plugins: object, default_action: str = "tempfail") -> PostfixInstance:
        config = make_config(tmp_path, milter={"listen": "inet:127.0.0.1:0",
                                               "default_action": default_action})
        server = MilterServer(config, chain=chain_of(*plugins, timeout=5.0))
        await server.start()
        servers.append(server)
        address = server.address
        assert isinstance(address, tuple)
        # In a thread: its readiness probe gets a banner only once smtpd has talked to this
        # milter, which needs this event loop free.
        return await asyncio.to_thread(postfix_factory, main_cf={
            "smtpd_milters": f"inet:127.0.0.1:{address[1]}",
            "milter_protocol": "6",
            "milter_default_action": "tempfail",  # if the milter itself is unreachable
            "milter_command_timeout": "10s",
        })

    yield start
    for server in servers:
        await server.stop(grace=1)


class MTA(Protocol):
    """An MTA listening on loopback: Postfix here, Sendmail in tests/wire/test_milter_sendmail.py."""

    port: int


async def send(postfix: MTA, rcpts: list[str], body: bytes = MESSAGE,
               sender: str = "alice@sender.test") -> list[tuple[int, str]]:
    """One SMTP transaction through the MTA; every reply from MAIL to the end of DATA."""
    talk = await Talk.open(postfix.port)
    code, text = await talk.hello()
    assert code == 250, text
    replies = [await talk.cmd(f"MAIL FROM:<{sender}>")]
    replies += [await talk.cmd(f"RCPT TO:<{rcpt}>") for rcpt in rcpts]
    if any(code == 250 for code, _ in replies[1:]):
        code, text = await talk.cmd("DATA")
        assert code == 354, text
        talk.send(body + b".\r\n")
        replies.append(await talk.reply())
    await talk.cmd("QUIT")
    await talk.close()
    return replies


def parsed(stored: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(stored, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


class Edit:
    name = "edit"

    def __init__(self, edit: Callable[[Message, Transaction], None]) -> None:
        self.edit = edit

    @hookimpl
    def data(self, message: Message, transaction: Transaction) -> None:
        self.edit(message, transaction)


async def test_headers_added_and_replaced_by_plugins_are_delivered(postfix_with_milter: Start) -> None:
    def edit(message: Message, _: Transaction) -> None:
        message.add_header("X-Milter-Checked", "yes; by=smtpproxy")
        message.add_header("X-Appended", "last", prepend=False)
        message.replace_header("Subject", "[checked] via milter")
        message.remove_header("Received", matching=lambda v: "earlier.test" in v)

    postfix = await postfix_with_milter(Edit(edit))
    replies = await send(postfix, ["bob@dest.test"])
    assert replies[-1][0] == 250, replies
    (stored,) = postfix.wait_for_messages("bob", 1)
    delivered = parsed(stored)
    assert delivered["X-Milter-Checked"] == "yes; by=smtpproxy"
    assert delivered["Subject"] == "[checked] via milter"
    assert delivered.get_all("Subject") == ["[checked] via milter"]
    received = delivered.get_all("Received")
    assert received is not None
    assert not any("earlier.test" in r for r in received)  # deleted by index
    assert any("postfix.test" in r for r in received)  # Postfix's own is untouched
    names = [name for name, _ in delivered.items()]
    # Prepended trace-style at the top, appended after the last original field.
    assert names.index("X-Milter-Checked") < names.index("Received")
    assert names.index("X-Appended") > names.index("Message-ID")
    assert delivered.get_content().strip() == "Original body."


async def test_body_replacement_lands(postfix_with_milter: Start) -> None:
    new_body = b"".join(b"Replaced line %d, long enough to span chunks.\r\n" % i for i in range(3000))

    def edit(message: Message, _: Transaction) -> None:
        message.replace_body(new_body)

    postfix = await postfix_with_milter(Edit(edit))
    assert (await send(postfix, ["bob@dest.test"]))[-1][0] == 250
    (stored,) = postfix.wait_for_messages("bob", 1)
    assert stored.split(b"\n\n", 1)[1] == new_body.replace(b"\r\n", b"\n")
    assert len(new_body) > 65535  # it took more than one SMFIR_REPLBODY


async def test_sender_and_recipient_changes_land(postfix_with_milter: Start) -> None:
    def edit(_: Message, transaction: Transaction) -> None:
        envelope = transaction.envelope
        envelope.set_sender(parse_mailbox("bounces@sender.test", allow_utf8=False))
        envelope.remove_recipient(parse_mailbox("carol@dest.test", allow_utf8=False))
        envelope.add_recipient(parse_mailbox("alice@dest.test", allow_utf8=False))

    postfix = await postfix_with_milter(Edit(edit))
    assert (await send(postfix, ["bob@dest.test", "carol@dest.test"]))[-1][0] == 250
    (to_bob,) = postfix.wait_for_messages("bob", 1)
    (to_alice,) = postfix.wait_for_messages("alice", 1)
    assert parsed(to_bob)["Return-Path"] == "<bounces@sender.test>"
    assert parsed(to_alice)["Return-Path"] == "<bounces@sender.test>"
    postfix.wait_for_log(r"to=<alice@dest\.test>.*status=sent")
    assert postfix.queue_is_empty() or postfix.wait_for_log(r"removed")
    assert postfix.messages("carol") == []


class RejectCarol:
    name = "reject-carol"

    @hookimpl
    def rcpt_to(self, recipient: Any) -> Verdict | None:
        if recipient.address.local == "carol":
            return Verdict.reject("Carol does not take mail from milters", enhanced="5.7.1")
        return None


async def test_reject_at_rcpt_reaches_the_client_as_postfix_reply(postfix_with_milter: Start) -> None:
    postfix = await postfix_with_milter(RejectCarol())
    replies = await send(postfix, ["carol@dest.test", "bob@dest.test"])
    assert replies[1] == (550, "5.7.1 Carol does not take mail from milters")
    assert replies[2][0] == 250  # bob is unaffected
    assert replies[-1][0] == 250
    assert len(postfix.wait_for_messages("bob", 1)) == 1
    postfix.wait_for_log(r"milter-reject: RCPT from .*Carol does not take mail")


async def test_reject_at_data_reaches_the_client(postfix_with_milter: Start) -> None:
    class NoSubjects:
        @hookimpl
        def data(self, message: Message) -> Verdict | None:
            if "via milter" in (message.get("Subject") or ""):
                return Verdict.reject("Subjects like that are 100% spam", code=554, enhanced="5.7.1")
            return None

    postfix = await postfix_with_milter(NoSubjects())
    replies = await send(postfix, ["bob@dest.test"])
    assert replies[-1] == (554, "5.7.1 Subjects like that are 100% spam")
    postfix.wait_for_log(r"milter-reject: END-OF-MESSAGE")
    assert postfix.messages("bob") == []


class Broken:
    name = "broken"

    @hookimpl
    def rcpt_to(self) -> None:
        raise RuntimeError("policy database unreachable")


async def test_plugin_error_tempfails_by_default(postfix_with_milter: Start) -> None:
    postfix = await postfix_with_milter(Broken())
    replies = await send(postfix, ["bob@dest.test"])
    assert replies[1][0] == 451
    assert replies[1][1].startswith("4.3.0 ")


async def test_plugin_error_with_default_action_accept_delivers(postfix_with_milter: Start) -> None:
    postfix = await postfix_with_milter(Broken(), default_action="accept")
    replies = await send(postfix, ["bob@dest.test"])
    assert [code for code, _ in replies] == [250, 250, 250]
    assert len(postfix.wait_for_messages("bob", 1)) == 1


@pytest.mark.parametrize("chrooted", [False, True], ids=["smtpd", "chrooted-smtpd"])
async def test_a_unix_socket_as_deploy_milter_md_makes_it(
    tmp_path: Path, postfix_factory: PostfixFactory, chrooted: bool,
) -> None:
    """docs/deploy-milter.md: the socket in a directory of Postfix's queue directory that
    Postfix's group may enter (``install -d -o smtpproxy -g postfix -m 2750``; root here), and
    ``smtpd_milters = unix:smtpproxy/milter.sock``, which Postfix's smtpd (its own user)
    resolves against its queue directory, chrooted there (Debian's stock master.cf) or not."""
    import grp
    import os

    postfix = await asyncio.to_thread(postfix_factory, start=False, chroot_smtpd=chrooted, main_cf={
        "smtpd_milters": "unix:smtpproxy/milter.sock", "milter_protocol": "6",
        "milter_default_action": "tempfail", "milter_command_timeout": "10s"})
    directory = postfix.queue_dir / "smtpproxy"
    directory.mkdir(parents=True)
    os.chown(directory, 0, grp.getgrnam("postfix").gr_gid)
    directory.chmod(0o2750)
    config = make_config(tmp_path, milter={"listen": f"unix:{directory}/milter.sock"})
    server = MilterServer(config, chain=chain_of(Edit(lambda m, _: m.add_header("X-Via", "unix socket")),
                                                 timeout=5.0))
    await server.start()
    try:
        status = (directory / "milter.sock").stat()
        assert status.st_gid == grp.getgrnam("postfix").gr_gid and status.st_mode & 0o777 == 0o660
        await asyncio.to_thread(postfix.start)
        replies = await send(postfix, ["bob@dest.test"])
        assert replies[-1][0] == 250, replies
        (stored,) = postfix.wait_for_messages("bob", 1)
        assert parsed(stored)["X-Via"] == "unix socket"
        assert postfix.roots("smtpd") == {postfix.queue_dir if chrooted else Path("/")}
    finally:
        await server.stop(grace=1)
