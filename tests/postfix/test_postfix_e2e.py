"""End to end with the real thing: client → smtpproxy → Postfix (a private instance) → Maildir.

These are the settings docs/deploy-postfix.md tells admins to use: Postfix on a loopback
port, XCLIENT trusted from the proxy, STARTTLS verified against the CA that signed Postfix's
certificate. The client identity is made distinct from the proxy's own address with a
PROXY protocol header (as a load balancer in front would send), so the Postfix log can show
that the *original* client's address arrived.
"""

from __future__ import annotations

import asyncio
import email
import re
from pathlib import Path
from typing import Any

import pytest
import trustme

from smtpproxy import Message, Session, hookimpl
from tests.conftest import ProxyFactory, Talk, port_of
from tests.postfix_instance import PostfixFactory, PostfixInstance

RELAY = {"domains": ["dest.test"], "networks": []}
BODY = (b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: through postfix\r\n"
        b"Message-ID: <e2e-1@sender.test>\r\n\r\nLine one.\r\n..Line with a leading dot.\r\n"
        b"\xc3\xa9t\xc3\xa9 in 8 bits.\r\n")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def postfix_tls(ca: trustme.CA, tmp_path: Path, postfix_factory: PostfixFactory) -> PostfixInstance:
    pem = tmp_path / "postfix.pem"
    ca.issue_cert("postfix.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    return postfix_factory(tls_cert=pem)


def upstream(instance: PostfixInstance, **extra: Any) -> dict[str, Any]:
    return {"type": "smtp", "host": "127.0.0.1", "port": instance.port, "tls": "none",
            "connect_timeout": 5, "command_timeout": 10, "data_timeout": 30, **extra}


class Stamp:
    name = "stamp"

    @hookimpl
    def data(self, session: Session, message: Message) -> None:
        message.add_header("X-Smtpproxy-Checked", f"yes; client={session.client.ip}")


def body_of(stored: bytes) -> bytes:
    """Postfix stores Maildir files with LF line ends; compare bodies in wire form."""
    return stored.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")


async def send(port: int, rcpts: list[str], body: bytes = BODY, *, proxy_header: bytes = b"") -> tuple[int, str]:
    client = await Talk.open(port)
    if proxy_header:
        client.send(proxy_header)
    await client.hello("mail.client.example")
    reply = await client.send_message("alice@sender.test", rcpts, body)
    await client.close()
    return reply


async def test_message_arrives_intact_with_client_identity_over_verified_tls(
    proxy_factory: ProxyFactory, postfix_tls: PostfixInstance, ca: trustme.CA, tmp_path: Path
) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    proxy = await proxy_factory(
        Stamp(), relay=RELAY,
        listeners=[{"address": "127.0.0.1", "port": 0, "proxy_protocol": True,
                    "proxy_protocol_from": ["127.0.0.0/8"]}],
        delivery=upstream(postfix_tls, tls="starttls", ca_file=str(tmp_path / "ca.pem"),
                          tls_hostname="postfix.test", client_identity="xclient"),
    )
    header = b"PROXY TCP4 192.0.2.7 192.0.2.25 40001 25\r\n"
    code, text = await send(port_of(proxy), ["bob@dest.test"], proxy_header=header)
    assert code == 250 and "queued as" in text  # Postfix's own words reach the client
    [stored] = await asyncio.to_thread(postfix_tls.wait_for_messages, "bob", 1)
    sent_body = BODY.split(b"\r\n\r\n", 1)[1].replace(b"\r\n..", b"\r\n.")  # unstuffed
    assert body_of(stored) == sent_body  # byte for byte, 8-bit and the dot line
    parsed = email.message_from_bytes(stored)
    assert parsed["X-Smtpproxy-Checked"] == "yes; client=192.0.2.7"
    assert parsed["Message-ID"] == "<e2e-1@sender.test>"
    received = parsed.get_all("Received")[0]
    assert "192.0.2.7" in received and "mail.client.example" in received  # XCLIENT ADDR and HELO
    assert "with ESMTPS" in received  # TLS to Postfix
    await asyncio.to_thread(postfix_tls.wait_for_log, r"client=unknown\[192\.0\.2\.7\]")
    await asyncio.to_thread(postfix_tls.wait_for_log, r"TLS connection established")


async def test_unknown_user_is_refused_at_rcpt_with_postfix_text(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix, rcpt_mode="relay"))
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<alice@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@dest.test>"))[0] == 250
    assert await client.cmd("RCPT TO:<dave@dest.test>") == (
        550, "5.1.1 <dave@dest.test>: Recipient address rejected: User unknown in virtual mailbox table")
    assert (await client.cmd("DATA"))[0] == 354
    client.send(BODY + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    assert len(await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)) == 1


async def test_unknown_user_at_data_time_is_never_half_delivered(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix, rcpt_mode="at_data"))
    # (what the client hears when it sends again: tests/postfix/test_postfix_hardening.py)
    code, text = await send(port_of(proxy), ["bob@dest.test", "dave@dest.test"])
    assert code == 451 and "dave@dest.test" in text
    assert postfix.messages("bob") == []


async def test_postfix_down_gives_4xx_and_the_retry_is_delivered(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix, down_backoff=0.01, rcpt_mode="at_data"))
    assert (await send(port_of(proxy), ["bob@dest.test"]))[0] == 250
    await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)
    await asyncio.to_thread(postfix.stop)
    code, text = await send(port_of(proxy), ["carol@dest.test"])
    assert code == 451 and text.startswith("4.4.")
    await asyncio.to_thread(postfix.start)
    assert (await send(port_of(proxy), ["carol@dest.test"]))[0] == 250  # the client's retry
    assert len(await asyncio.to_thread(postfix.wait_for_messages, "carol", 1)) == 1
    assert len(postfix.messages("bob")) == 1


async def test_failover_to_a_second_postfix(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    primary, secondary = postfix_factory(), postfix_factory()
    proxy = await proxy_factory(relay=RELAY, delivery={
        **upstream(primary), "host": None, "down_backoff": 60,
        "upstreams": [{"host": "127.0.0.1", "port": primary.port, "priority": 1},
                      {"host": "127.0.0.1", "port": secondary.port, "priority": 2}]})
    assert (await send(port_of(proxy), ["bob@dest.test"]))[0] == 250
    assert len(await asyncio.to_thread(primary.wait_for_messages, "bob", 1)) == 1
    await asyncio.to_thread(primary.stop)
    assert (await send(port_of(proxy), ["alice@dest.test"]))[0] == 250
    assert (await send(port_of(proxy), ["carol@dest.test"]))[0] == 250
    assert len(await asyncio.to_thread(secondary.wait_for_messages, "alice", 1)) == 1
    assert len(await asyncio.to_thread(secondary.wait_for_messages, "carol", 1)) == 1


SMUGGLING = {
    "lf-dot-lf": b"Hello\n.\n",
    "crlf-dot-lf": b"Hello\r\n.\n",
    "lf-dot-crlf": b"Hello\n.\r\n",
    "cr-dot-cr": b"Hello\r.\r",
}
SMUGGLED = b"MAIL FROM:<admin@dest.test>\r\nRCPT TO:<carol@dest.test>\r\nDATA\r\nSpoofed!\r\n"


@pytest.mark.parametrize("mode", ["reject", "normalize"])
async def test_smuggling_through_the_whole_chain(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory, mode: str
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix),
                                smtp={"bare_newlines": mode})
    head = b"From: a@sender.test\r\nSubject: smuggle\r\n\r\n"
    for name, payload in SMUGGLING.items():
        client = await Talk.open(port_of(proxy))
        await client.hello()
        await client.cmd("MAIL FROM:<alice@sender.test>")
        await client.cmd("RCPT TO:<bob@dest.test>")
        await client.cmd("DATA")
        client.send(head + payload + SMUGGLED + b"\r\n.\r\n")
        code, _ = await client.reply()
        assert code == (550 if mode == "reject" else 250), name
        await client.close()
    if mode == "normalize":
        delivered = await asyncio.to_thread(postfix.wait_for_messages, "bob", len(SMUGGLING))
        assert len(delivered) == len(SMUGGLING)
        for stored in delivered:
            assert re.search(rb"\nSpoofed!\n", stored)  # just body text inside the one message
    assert postfix.messages("carol") == []  # no second message was ever created
    if mode == "reject":
        assert postfix.messages("bob") == []


async def test_pooled_connection_carries_each_clients_own_identity(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(
        relay=RELAY,
        listeners=[{"address": "127.0.0.1", "port": 0, "proxy_protocol": True,
                    "proxy_protocol_from": ["127.0.0.0/8"]}],
        delivery=upstream(postfix, client_identity="xclient"),
    )
    for ip, user in (("192.0.2.10", "bob"), ("198.51.100.20", "alice")):
        header = f"PROXY TCP4 {ip} 192.0.2.25 40001 25\r\n".encode()
        assert (await send(port_of(proxy), [f"{user}@dest.test"], proxy_header=header))[0] == 250
    [first] = await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)
    [second] = await asyncio.to_thread(postfix.wait_for_messages, "alice", 1)
    assert b"[192.0.2.10]" in first.split(b"\n\n")[0]
    assert b"[198.51.100.20]" in second.split(b"\n\n")[0]
    log = postfix.log()
    # Postfix takes XCLIENT once per connection, so another client means another connection
    # (the fixture's readiness probe is the first "connect from")...
    assert len(re.findall(r"smtpd\[\d+\]: connect from", log)) == 3
    # ...which speaks for that client alone: no doomed second XCLIENT is ever attempted on
    # one, and each is closed when its client's session ends
    await asyncio.to_thread(postfix.wait_for_log, r"(?s)(disconnect from unknown\[[\d.]+\].*){3}")
    assert re.findall(r"xclient=\d+/(\d+)", postfix.log()) == ["1", "1"]
    # a client's second message goes on the connection that speaks for it
    header = b"PROXY TCP4 198.51.100.20 192.0.2.25 40001 25\r\n"
    client = await Talk.open(port_of(proxy))
    client.send(header)
    await client.hello("mail.client.example")
    for _ in range(2):
        assert (await client.send_message("alice@sender.test", ["carol@dest.test"], BODY))[0] == 250
    await client.close()
    assert len(await asyncio.to_thread(postfix.wait_for_messages, "carol", 2)) == 2
    last = await asyncio.to_thread(
        postfix.wait_for_log, r"disconnect from unknown\[198\.51\.100\.20\][^\n]* mail=2 [^\n]*")
    assert "xclient=0/1" in last[0], last[0]  # one XCLIENT, on the one connection for both
    assert len(re.findall(r"smtpd\[\d+\]: connect from", postfix.log())) == 4


async def test_each_new_client_is_told_to_postfix_before_any_ehlo_with_its_own_port(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    """From the second upstream connection on, XCLIENT goes right after Postfix's greeting
    (Postfix takes it outside a transaction, HELO or not); each message is still Postfix's
    from its own client: address in Received, address and port in its log."""
    postfix = postfix_factory(main_cf={"smtpd_client_port_logging": "yes"})
    proxy = await proxy_factory(
        relay=RELAY,
        listeners=[{"address": "127.0.0.1", "port": 0, "proxy_protocol": True,
                    "proxy_protocol_from": ["127.0.0.0/8"]}],
        delivery=upstream(postfix, client_identity="xclient"),
    )
    clients = [("192.0.2.10", 40001, "bob"), ("192.0.2.10", 40002, "alice"),
               ("198.51.100.20", 40003, "carol")]
    for ip, port, user in clients:
        header = f"PROXY TCP4 {ip} 192.0.2.25 {port} 25\r\n".encode()
        assert (await send(port_of(proxy), [f"{user}@dest.test"], proxy_header=header))[0] == 250
    for ip, _port, user in clients:
        [stored] = await asyncio.to_thread(postfix.wait_for_messages, user, 1)
        assert f"[{ip}]".encode() in stored.split(b"\n\n")[0]
    log = postfix.log()
    # each queued message names its own client, port included (the queue file, policy
    # servers and milters get the same)
    assert re.findall(r": client=[^\s,]*\[([\d.]+)\]:(\d+)", log) == [
        (ip, str(port)) for ip, port, _user in clients]
    # a connection per client (after the readiness probe), each closed when its client left.
    # Postfix counts its XCLIENT as 0/1 (it restarts the session), and greeted the second and
    # third only after it: one EHLO, as the client. Postfix offers CHUNKING: each message went
    # as one BDAT (no DATA and its 354).
    assert len(re.findall(r"smtpd\[\d+\]: connect from", log)) == 4
    for _ in range(100):  # the QUITs go in the background
        disconnects = re.findall(r"disconnect from \S+ (.*)", postfix.log())[1:]
        if len(disconnects) >= 3:
            break
        await asyncio.sleep(0.05)
    assert disconnects == ["ehlo=2 xclient=0/1 mail=1 rcpt=1 bdat=1 quit=1 commands=6/7",
                           "ehlo=1 xclient=0/1 mail=1 rcpt=1 bdat=1 quit=1 commands=5/6",
                           "ehlo=1 xclient=0/1 mail=1 rcpt=1 bdat=1 quit=1 commands=5/6"], disconnects
    assert "lost connection" not in postfix.log()


@pytest.mark.parametrize("rcpt_mode", ["at_data", "relay"])
async def test_pipelined_commands_follow_postfixs_rules(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory, rcpt_mode: str
) -> None:
    """The proxy pipelines to Postfix (it offers PIPELINING): the reuse probe or XFORWARD, MAIL,
    the RCPTs and, in at_data, DATA in one write. A Postfix that drops clients breaking the
    pipelining rules (smtpd_forbid_unauth_pipelining) takes every message over one pooled
    connection, with an unknown recipient among them, and logs no improper pipelining."""
    postfix = postfix_factory(main_cf={"smtpd_forbid_unauth_pipelining": "yes"})
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix, rcpt_mode=rcpt_mode))
    client = await Talk.open(port_of(proxy))
    await client.hello("mail.client.example")
    for _ in range(3):
        assert (await client.send_message("alice@sender.test", ["bob@dest.test", "carol@dest.test"], BODY))[0] == 250
    if rcpt_mode == "relay":  # the upstream's refusal comes at RCPT, the others go
        assert (await client.cmd("MAIL FROM:<alice@sender.test>"))[0] == 250
        assert (await client.cmd("RCPT TO:<dave@dest.test>"))[0] == 550
        assert (await client.cmd("RCPT TO:<bob@dest.test>"))[0] == 250
        assert (await client.cmd("DATA"))[0] == 354
        client.send(BODY + b".\r\n")
        assert (await client.reply())[0] == 250
    await client.close()
    bobs = 4 if rcpt_mode == "relay" else 3
    assert len(await asyncio.to_thread(postfix.wait_for_messages, "bob", bobs)) == bobs
    assert len(await asyncio.to_thread(postfix.wait_for_messages, "carol", 3)) == 3
    log = postfix.log()
    assert "improper command pipelining" not in log
    # the readiness probe, then one pooled connection (XCLIENT: one per client session)
    assert len(re.findall(r"smtpd\[\d+\]: connect from", log)) == 2
