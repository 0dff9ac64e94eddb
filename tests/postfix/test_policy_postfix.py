"""Policy mode end to end: SMTP client → a real Postfix → check_policy_service → smtpproxy policy.

Postfix runs with ``check_policy_service inet:127.0.0.1:PORT`` in
``smtpd_recipient_restrictions`` and ``smtpd_end_of_data_restrictions`` (the lines
docs/deploy-policy.md gives). The first-party plugins are loaded by name, through their
entry points, as a site's configuration does. The client talks only to Postfix (with
XCLIENT, so Postfix sees the client address the test chooses), and every assertion is
about what Postfix answered and delivered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from smtpproxy.config import load_config
from smtpproxy.policy.server import PolicyServer
from tests.conftest import Talk
from tests.dns_server import ZoneServer
from tests.postfix_instance import PostfixFactory, PostfixInstance
from tests.redis_server import RedisServer

BODY = (b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: via policy\r\n"
        b"Message-ID: <policy-1@sender.test>\r\n\r\nHello.\r\n")

ZONE = """
7.2.0.192.bl.test.   300 IN A 127.0.0.2
7.2.0.192.bl.test.   300 IN TXT "listed, see https://bl.test/192.0.2.7"
spf-fail.test.       300 IN TXT "v=spf1 ip4:198.51.100.1 -all"
sender.test.         300 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
"""

Start = Callable[..., Any]


@pytest.fixture
async def postfix_with_policy(
    tmp_path: Path, postfix_factory: PostfixFactory, dns_server: ZoneServer,
) -> AsyncIterator[Start]:
    dns_server.add(ZONE)
    servers: list[PolicyServer] = []

    async def start(plugins_yaml: str, policy: str = "", **main_cf: str) -> PostfixInstance:
        path = tmp_path / f"policy{len(servers)}.yaml"
        path.write_text(
            "listeners: [{port: 2525}]\n"
            "delivery: {type: maildir, path: mail}\n"
            f"dns: {{nameservers: [127.0.0.1], port: {dns_server.port}, timeout: 1}}\n"
            f"policy: {{listen: 'inet:127.0.0.1:0'{policy}}}\n"
            f"plugin_paths: ['{tmp_path}']\n"
            "plugins:\n" + plugins_yaml
        )
        config, source = load_config(path)
        server = PolicyServer(config, source)
        await server.start()
        servers.append(server)
        address = server.address
        assert isinstance(address, tuple)
        service = f"check_policy_service inet:127.0.0.1:{address[1]}"
        return await asyncio.to_thread(postfix_factory, main_cf={
            "smtpd_recipient_restrictions": service,
            "smtpd_end_of_data_restrictions": service,
            "smtpd_policy_service_timeout": "100s",
            "smtpd_policy_service_max_idle": "300s",
            "smtpd_policy_service_default_action": "451 4.3.5 Server configuration problem",
            "smtpd_policy_service_try_limit": "2",
        } | main_cf)

    yield start
    for server in servers:
        await server.stop(grace=1)


async def session(postfix: PostfixInstance, ip: str = "192.0.2.7",
                  helo: str = "mail.client.test") -> Talk:
    """An SMTP session with Postfix as if from *ip* (XCLIENT), after EHLO."""
    talk = await Talk.open(postfix.port)
    code, text = await talk.hello("proxy.test")
    assert code == 250, text
    code, text = await talk.cmd(f"XCLIENT ADDR={ip} NAME=[UNAVAILABLE] HELO={helo}")
    assert code == 220, text
    code, text = await talk.cmd(f"EHLO {helo}")
    assert code == 250, text
    return talk


async def transaction(postfix: PostfixInstance, rcpts: list[str], sender: str = "alice@sender.test",
                      ip: str = "192.0.2.7") -> list[tuple[int, str]]:
    """MAIL, each RCPT and (when one was accepted) DATA: every reply from RCPT on."""
    talk = await session(postfix, ip)
    code, text = await talk.cmd(f"MAIL FROM:<{sender}>")
    assert code == 250, text
    replies = [await talk.cmd(f"RCPT TO:<{rcpt}>") for rcpt in rcpts]
    if any(code == 250 for code, _ in replies):
        code, text = await talk.cmd("DATA")
        assert code == 354, text
        talk.send(BODY + b".\r\n")
        replies.append(await talk.reply())
    await talk.cmd("QUIT")
    await talk.close()
    return replies


async def test_an_access_rule_rejects_the_recipient(postfix_with_policy: Start) -> None:
    postfix = await postfix_with_policy(
        "  - name: access\n"
        "    settings:\n"
        "      sender: {deny: {rules: ['*@spammer.test']}, reply: 'Sender blocked here'}\n"
    )
    assert await transaction(postfix, ["bob@dest.test"], sender="x@spammer.test") == [
        (550, "5.7.1 <bob@dest.test>: Recipient address rejected: Sender blocked here")]
    replies = await transaction(postfix, ["bob@dest.test"])
    assert replies[0] == (250, "2.1.5 Ok") and replies[-1][0] == 250
    postfix.wait_for_messages("bob", 1)


async def test_a_dnsbl_listing_rejects(postfix_with_policy: Start) -> None:
    postfix = await postfix_with_policy(
        "  - name: dnsbl\n"
        "    settings:\n"
        "      lists: [{zone: bl.test}]\n"
    )
    (code, text), = await transaction(postfix, ["bob@dest.test"])
    assert code == 554 and text.startswith("5.7.1 <bob@dest.test>: Recipient address rejected: ")
    assert "bl.test" in text
    replies = await transaction(postfix, ["bob@dest.test"], ip="192.0.2.8")  # not listed
    assert replies[-1][0] == 250


async def test_spf_fail_rejects_and_pass_delivers(postfix_with_policy: Start) -> None:
    postfix = await postfix_with_policy("  - name: spf\n")
    (code, text), = await transaction(postfix, ["bob@dest.test"], sender="a@spf-fail.test")
    assert code == 550 and "Recipient address rejected" in text and "SPF" in text
    replies = await transaction(postfix, ["bob@dest.test"])
    assert replies[-1][0] == 250
    postfix.wait_for_messages("bob", 1)


async def test_a_rate_limit_defers_the_recipient_over_the_limit(postfix_with_policy: Start) -> None:
    postfix = await postfix_with_policy(
        "  - name: ratelimit\n"
        "    settings:\n"
        "      rules: [{name: rcpt-per-sender, key: sender, what: recipients, limit: 2, window: 60}]\n"
    )
    replies = await transaction(postfix, ["bob@dest.test", "alice@dest.test", "carol@dest.test"])
    assert [code for code, _ in replies[:3]] == [250, 250, 452]
    assert replies[2][1] == ("4.7.1 <carol@dest.test>: Recipient address rejected: "
                             "Rate limit exceeded for alice@sender.test, try again later")
    assert replies[3][0] == 250  # the two accepted recipients get the message
    postfix.wait_for_messages("bob", 1)
    postfix.wait_for_messages("alice", 1)


async def test_greylisting_shared_through_redis(
    postfix_with_policy: Start, redis_server: RedisServer,
) -> None:
    greylist = (
        "  - name: greylist\n"
        "    settings:\n"
        f"      backend: redis\n      redis_url: '{redis_server.url}'\n      delay: 0.2\n"
    )
    postfix = await postfix_with_policy(greylist)
    (code, text), = await transaction(postfix, ["bob@dest.test"])
    assert code == 451 and text.startswith("4.7.1 <bob@dest.test>: Recipient address rejected: Greylisted")
    await asyncio.sleep(0.3)
    # A second policy service (another host of the cluster) shares the triplet through Redis.
    other = await postfix_with_policy(greylist)
    replies = await transaction(other, ["bob@dest.test"])
    assert replies[0][0] == 250 and replies[-1][0] == 250
    other.wait_for_messages("bob", 1)


async def test_several_recipients_keep_one_state_per_instance(
    postfix_with_policy: Start, caplog: pytest.LogCaptureFixture,
) -> None:
    postfix = await postfix_with_policy(
        "  - name: access\n"
        "    settings:\n"
        "      recipient: {deny: {rules: ['carol@dest.test']}}\n"
    )
    with caplog.at_level(logging.INFO, logger="smtpproxy.session"):
        replies = await transaction(postfix, ["bob@dest.test", "carol@dest.test", "alice@dest.test"])
        assert [code for code, _ in replies] == [250, 550, 250, 250]
        postfix.wait_for_messages("bob", 1)
        postfix.wait_for_messages("alice", 1)
    names = [r.getMessage() for r in caplog.records]
    fields = [dict(getattr(r, "smtpproxy_fields", {})) for r in caplog.records]
    # One instance: connect, HELO and MAIL once; RCPT per recipient; one message line at the end.
    assert names.count("connect") == 1 and names.count("helo") == 1 and names.count("mail_from") == 1
    assert names.count("rcpt_to") == 3
    (message,) = [f for n, f in zip(names, fields, strict=True) if n == "message"]
    assert message["recipients"] == ["bob@dest.test", "alice@dest.test"]
    assert message["decision"] == "delivered" and message["action"] == "DUNNO"


DISCARDER = """
from smtpproxy import Recipient, Verdict, hookimpl


class Discarder:
    @hookimpl
    def rcpt_to(self, recipient: Recipient):
        if recipient.address.local == "trap":
            return Verdict.discard("spam trap")
        return None
"""


async def test_a_discard_drops_the_whole_message(postfix_with_policy: Start, tmp_path: Path) -> None:
    (tmp_path / "discarder.py").write_text(DISCARDER)
    postfix = await postfix_with_policy("  - name: discarder\n    use: discarder:Discarder\n")
    replies = await transaction(postfix, ["bob@dest.test", "trap@dest.test"])
    assert [code for code, _ in replies] == [250, 250, 250]  # the client cannot tell
    await asyncio.to_thread(postfix.wait_for_log,
                            r"discard: RCPT from .*<trap@dest.test>: Recipient address spam trap")
    for _ in range(100):
        if postfix.queue_is_empty():
            break
        await asyncio.sleep(0.05)
    assert postfix.queue_is_empty()
    assert postfix.messages("bob") == []  # DISCARD is the whole message's, bob's copy too


async def test_quarantine_as_postfix_hold_only_where_asked(postfix_with_policy: Start) -> None:
    access = ("  - name: access\n    settings:\n"
              "      sender: {deny: {rules: ['*@odd.test']}, action: quarantine}\n")
    postfix = await postfix_with_policy(access)
    (code, text), = await transaction(postfix, ["bob@dest.test"], sender="x@odd.test")
    assert (code, text) == (451, "4.7.1 <bob@dest.test>: Recipient address rejected: "
                                 "Message held for review, try again later")
    held = await postfix_with_policy(access, policy=", quarantine_action: hold")
    replies = await transaction(held, ["bob@dest.test"], sender="x@odd.test")
    assert [code for code, _ in replies] == [250, 250]
    await asyncio.to_thread(held.wait_for_log, r"hold: RCPT from .*<bob@dest.test>")
    assert any((held.queue_dir / "hold").rglob("*"))  # Postfix's hold queue: postsuper -H releases it


@pytest.mark.parametrize("chrooted", [False, True], ids=["smtpd", "chrooted-smtpd"])
async def test_a_unix_socket_as_deploy_policy_md_makes_it(
    tmp_path: Path, postfix_factory: PostfixFactory, dns_server: ZoneServer, chrooted: bool,
) -> None:
    """docs/deploy-policy.md: the socket in a directory of Postfix's queue directory that
    Postfix's group may enter (``install -d -o smtpproxy -g postfix -m 2750``; root here), and
    ``check_policy_service unix:smtpproxy/policy.sock``, which Postfix's smtpd (its own user)
    resolves against its queue directory, chrooted there (Debian's stock master.cf) or not."""
    import grp
    import os

    service = "check_policy_service unix:smtpproxy/policy.sock"
    postfix = await asyncio.to_thread(postfix_factory, chroot_smtpd=chrooted, main_cf={
        "smtpd_recipient_restrictions": service, "smtpd_end_of_data_restrictions": service})
    directory = postfix.queue_dir / "smtpproxy"
    directory.mkdir()
    os.chown(directory, 0, grp.getgrnam("postfix").gr_gid)
    directory.chmod(0o2750)
    path = tmp_path / "policy.yaml"
    path.write_text(
        "delivery: {type: maildir, path: mail}\n"
        f"dns: {{nameservers: [127.0.0.1], port: {dns_server.port}, timeout: 1}}\n"
        f"policy: {{listen: 'unix:{directory}/policy.sock'}}\n"
        "plugins:\n  - name: access\n    settings:\n"
        "      sender: {deny: {rules: ['*@spammer.test']}, reply: 'Sender blocked here'}\n")
    config, source = load_config(path)
    server = PolicyServer(config, source)
    await server.start()
    try:
        status = (directory / "policy.sock").stat()
        assert status.st_gid == grp.getgrnam("postfix").gr_gid and status.st_mode & 0o777 == 0o660
        assert await transaction(postfix, ["bob@dest.test"], sender="x@spammer.test") == [
            (550, "5.7.1 <bob@dest.test>: Recipient address rejected: Sender blocked here")]
        replies = await transaction(postfix, ["bob@dest.test"])
        assert replies[0] == (250, "2.1.5 Ok") and replies[-1][0] == 250
        assert postfix.roots("smtpd") == {postfix.queue_dir if chrooted else Path("/")}
    finally:
        await server.stop(grace=1)
