"""Protocol hardening against the real Postfix behind the proxy (issue 13).

Each test drives the hole the hostile way through a real socket into the proxy and a private
Postfix behind it, and checks what Postfix itself saw, logged or delivered.
"""

from __future__ import annotations

import asyncio
import email
import logging
import re
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import ProxyFactory, Talk, maildir_messages, port_of
from tests.postfix_instance import PostfixFactory, PostfixInstance
from tests.wire.test_metrics import health_port, http, scrape, value

RELAY = {"domains": ["dest.test", "postfix.test"], "networks": []}
BODY = b"From: a@sender.test\r\nTo: bob@dest.test\r\nSubject: hardening\r\n\r\nHello.\r\n"
METRICS = {"enabled": True, "port": 0, "ready_cache": 0.01}

# A Postfix that trusts the proxy by address (it is in mynetworks), is told nothing about the
# client (no XCLIENT for the proxy), and delivers its own hostname locally: the percent hack,
# bang paths and quoted @ then route a postfix.test recipient to another host. Mail for other
# hosts is discarded (logged as sent) instead of leaving the machine.
TRUSTING = {
    "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
    "mydestination": "$myhostname",
    "default_transport": "discard:would have left for another host",
}
ROUTING = [
    "u%evil.test@postfix.test",
    "evil.test!u@postfix.test",
    '"u@evil.test"@postfix.test',
    '"u%evil.test"@postfix.test',
    "u%evil.test%postfix.test@postfix.test",
]


def upstream(instance: PostfixInstance, **extra: Any) -> dict[str, Any]:
    return {"type": "smtp", "host": "127.0.0.1", "port": instance.port, "tls": "none",
            "connect_timeout": 5, "command_timeout": 10, "data_timeout": 30, **extra}


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[int, dict[str, Any]]]:
    return [(r.levelno, r.smtpproxy_fields) for r in caplog.records  # type: ignore[attr-defined]
            if r.msg == name and hasattr(r, "smtpproxy_fields")]


# -- item 2: relaying through an upstream that trusts the proxy ------------------------------


async def test_routing_local_parts_never_reach_a_trusting_postfix(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory, caplog: pytest.LogCaptureFixture
) -> None:
    postfix = postfix_factory(xclient_hosts="", main_cf=TRUSTING)
    proxy = await proxy_factory(relay=RELAY, metrics=METRICS,
                                delivery=upstream(postfix, rcpt_mode="relay"))
    caplog.set_level(logging.INFO)
    client = await Talk.open(port_of(proxy))
    await client.hello("mail.client.example")
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@dest.test>"))[0] == 250  # asked of Postfix: 250
    for rcpt in ROUTING:
        assert await client.cmd(f"RCPT TO:<{rcpt}>") == (
            554, f"5.7.1 <{rcpt}>: Relay access denied (the local part routes elsewhere)"), rcpt
    assert (await client.cmd("DATA"))[0] == 354
    client.send(BODY + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)
    assert "evil.test" not in postfix.log()
    # auto found neither XCLIENT nor XFORWARD: a warning, /readyz and a metric say so
    [(level, fields)] = events(caplog, "upstream_identity_missing")
    assert level == logging.WARNING
    assert fields == {"upstream": f"127.0.0.1:{postfix.port}", "mode": "auto",
                      "reason": "upstream offers neither XCLIENT nor XFORWARD"}
    status, _, body = await http(health_port(proxy), "/readyz")
    assert status == 200
    assert (f"upstream 127.0.0.1:{postfix.port}: ok; client identity: none "
            "(upstream offers neither XCLIENT nor XFORWARD)") in body.decode()
    samples = await scrape(proxy)
    labels = {"upstream": f"127.0.0.1:{postfix.port}"}
    assert value(samples, "smtpproxy_upstream_client_identity", mechanism="none", **labels) == 1
    assert value(samples, "smtpproxy_upstream_client_identity", mechanism="xclient", **labels) == 0


async def test_routing_local_parts_when_allowed_really_route_elsewhere(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    """Why the default is to refuse: with the option on, Postfix takes them for evil.test."""
    postfix = postfix_factory(xclient_hosts="", main_cf=TRUSTING)
    proxy = await proxy_factory(relay={**RELAY, "allow_routing_local_parts": True},
                                delivery=upstream(postfix, rcpt_mode="relay"))
    client = await Talk.open(port_of(proxy))
    await client.hello("mail.client.example")
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd(f"RCPT TO:<{ROUTING[0]}>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.send(BODY + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    await asyncio.to_thread(
        postfix.wait_for_log, r"to=<u@evil\.test>.*status=sent \(would have left for another host\)")


async def test_trusted_clients_may_still_use_routing_local_parts(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(relay={"domains": ["dest.test"], "networks": ["127.0.0.0/8"]})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<u%elsewhere.test@dest.test>"))[0] == 250
    await client.close()


async def test_explicit_xclient_refused_says_why_in_a_warning(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory, caplog: pytest.LogCaptureFixture
) -> None:
    postfix = postfix_factory(xclient_hosts="")
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix, rcpt_mode="relay",
                                                               client_identity="xclient"))
    caplog.set_level(logging.INFO)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    code, text = await client.cmd("RCPT TO:<bob@dest.test>")
    assert (code, text) == (451, "4.7.0 Upstream mail server does not accept the client identity")
    await client.close()
    [(level, fields)] = events(caplog, "upstream_identity_refused")
    assert level == logging.WARNING
    assert fields["mode"] == "xclient" and fields["reply"] == 451
    assert fields["reason"].startswith("XCLIENT required by configuration but not offered")


# -- item 6: odd HELO arguments reach Postfix encoded, never a 451 per message -----------------

# The command, and the HELO in Postfix's Received: header with XCLIENT (Postfix shows odd
# octets and spaces as '?'); longer than Postfix accepts: [UNAVAILABLE], then the proxy's EHLO.
ODD_HELOS = {
    "utf8": ("EHLO héllo.test".encode(), "héllo.test"),
    "invalid-utf8": (b"EHLO \xff\xfe.test", "??.test"),
    "words": (b"EHLO a b c", "a?b?c"),
    "long": (b"EHLO " + b"h" * 300, "proxy.test"),
}


@pytest.mark.parametrize("name", sorted(ODD_HELOS))
@pytest.mark.parametrize("identity", ["xclient", "xforward"])
async def test_odd_helo_reaches_postfix_and_the_mail_is_delivered(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory, name: str, identity: str
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(relay=RELAY, limits={"max_command_line": 1000},
                                delivery=upstream(postfix, client_identity=identity))
    command, expected = ODD_HELOS[name]
    client = await Talk.open(port_of(proxy))
    assert (await client.greeting())[0] == 220
    assert (await client.cmd(command))[0] == 250
    for _ in range(2):  # every message, not just the first
        code, text = await client.send_message("a@sender.test", ["bob@dest.test"], BODY)
        assert code == 250, text
    await client.close()
    stored = await asyncio.to_thread(postfix.wait_for_messages, "bob", 2)
    received = stored[0].split(b"\n\n", 1)[0].decode("utf-8", "replace")
    if identity == "xclient":  # XCLIENT HELO= (and the EHLO after it) become Received: from
        assert f"Received: from {expected} (" in received, received


# -- item 7: rcpt_mode at_data and a partial refusal by the upstream ---------------------------

UNKNOWN_DAVE = (550, "5.1.1 <dave@dest.test>: Recipient address rejected: "
                "User unknown in virtual mailbox table")


async def test_at_data_partial_refusal_is_not_deferred_forever(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix, rcpt_mode="at_data"))
    client = await Talk.open(port_of(proxy))
    await client.hello()
    # first attempt: Postfix refuses dave at delivery time; nothing is delivered, 451 for all
    code, text = await client.send_message("a@sender.test", ["bob@dest.test", "dave@dest.test"], BODY)
    assert code == 451 and text.startswith("4.5.0 Upstream refused recipient dave@dest.test: 550")
    assert postfix.messages("bob") == []
    # the client's retry: dave hears Postfix's own refusal at RCPT, bob gets the message
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@dest.test>"))[0] == 250
    assert await client.cmd("RCPT TO:<dave@dest.test>") == UNKNOWN_DAVE
    assert (await client.cmd("DATA"))[0] == 354
    client.send(BODY + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    assert len(await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)) == 1


async def test_relay_is_the_default_rcpt_mode(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix))
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert await client.cmd("RCPT TO:<dave@dest.test>") == UNKNOWN_DAVE  # asked of Postfix at RCPT
    await client.close()


# -- item 8: DSN passes through to an upstream that offers it ---------------------------------


async def test_dsn_notify_success_yields_postfixs_success_dsn(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix))
    client = await Talk.open(port_of(proxy))
    code, ehlo = await client.hello()
    assert code == 250 and "DSN" in ehlo.split("\n")
    assert (await client.cmd("MAIL FROM:<alice@dest.test> RET=HDRS ENVID=env+2B42"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@dest.test> NOTIFY=SUCCESS ORCPT=rfc822;bob+40dest.test"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.send(BODY + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    assert len(await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)) == 1
    [report] = await asyncio.to_thread(postfix.wait_for_messages, "alice", 1)  # to the sender
    text = report.decode("utf-8", "replace")
    assert "report-type=delivery-status" in text
    assert "Original-Envelope-Id: env+42" in text  # xtext decoded by Postfix
    assert "Original-Recipient: rfc822;bob@dest.test" in text
    assert "Action: delivered" in text
    assert "Subject: hardening" in text and "Hello." not in text  # RET=HDRS: headers only


@pytest.mark.parametrize("command", [
    "MAIL FROM:<alice@dest.test> RET=BODY",
    "MAIL FROM:<alice@dest.test> ENVID=a=b",
    "MAIL FROM:<alice@dest.test> ENVID=" + "x" * 101,
    "RCPT TO:<bob@dest.test> NOTIFY=NEVER,SUCCESS",
    "RCPT TO:<bob@dest.test> NOTIFY=SOMETIMES",
    "RCPT TO:<bob@dest.test> ORCPT=bob@dest.test",
    "RCPT TO:<bob@dest.test> ORCPT=rfc822;bob+4",
])
async def test_bad_dsn_parameters_are_refused_before_postfix(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory, command: str
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix))
    client = await Talk.open(port_of(proxy))
    await client.hello()
    if command.startswith("RCPT"):
        assert (await client.cmd("MAIL FROM:<alice@dest.test>"))[0] == 250
    code, text = await client.cmd(command)
    assert code == 501 and text.startswith("5.5.4 "), text
    await client.close()
    assert "RET=BODY" not in postfix.log() and "SOMETIMES" not in postfix.log()


# -- item 9: the proxy's own Received: field ---------------------------------------------------


async def _one_message(port: int, helo: str = "mail.client.example") -> None:
    client = await Talk.open(port)
    await client.hello(helo)
    code, text = await client.send_message("a@sender.test", ["bob@dest.test"], BODY)
    assert code == 250, text
    await client.close()


def _received_fields(stored: bytes) -> list[str]:
    head = stored.split(b"\n\n", 1)[0].decode("utf-8", "replace")
    return [" ".join(f.split()) for f in re.split(r"\n(?=\S)", head) if f.startswith("Received:")]


@pytest.mark.parametrize(("identity", "mode", "ours"), [
    ("none", "auto", True),      # Postfix is told nothing: the proxy records the client
    ("xclient", "auto", False),  # Postfix's own Received: already names the client
    ("xclient", "always", True),
    ("none", "never", False),
])
async def test_received_field_reaches_postfix_when_it_is_not_told_the_client(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory, identity: str, mode: str,
    ours: bool,
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(relay=RELAY, received_header=mode,
                                delivery=upstream(postfix, client_identity=identity))
    await _one_message(port_of(proxy))
    [stored] = await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)
    fields = _received_fields(stored)
    mine = [f for f in fields if "(smtpproxy)" in f]
    if not ours:
        assert mine == [], fields
        return
    assert len(fields) == 2 and fields[1] == mine[0], fields  # below Postfix's own
    assert re.fullmatch(
        r"Received: from mail\.client\.example \(unknown \[127\.0\.0\.1\]\) by proxy\.test "
        r"\(smtpproxy\) with ESMTP id [0-9a-f]{12}\.1 for <bob@dest\.test>; .+", mine[0]), mine[0]


@pytest.mark.parametrize(("helo", "written"), [
    ("[127.0.0.1]", "[127.0.0.1]"),                      # an address literal stays one
    ("[IPv6:2001:DB8::1]", "[IPv6:2001:db8::1]"),
    ("[999.0.0.1]", "?999.0.0.1?"),                      # not an address: just text
])
async def test_received_field_writes_a_helo_address_literal_as_one(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory, helo: str, written: str
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(relay=RELAY, received_header="auto",
                                delivery=upstream(postfix, client_identity="none"))
    await _one_message(port_of(proxy), helo)
    [stored] = await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)
    [mine] = [f for f in _received_fields(stored) if "(smtpproxy)" in f]
    assert mine.startswith(f"Received: from {written} (unknown [127.0.0.1]) by proxy.test "), mine
    assert email.message_from_bytes(stored)["Received"] is not None  # and Postfix parsed it as a field


async def test_received_field_names_tls_and_a_hostile_helo_safely(
    proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    ca.issue_cert("proxy.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "p.pem"))
    proxy = await proxy_factory(relay=RELAY, received_header="auto", listeners=[
        {"address": "127.0.0.1", "port": 0,
         "tls": {"cert": str(tmp_path / "p.pem"), "key": str(tmp_path / "p.pem")}}])
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("STARTTLS"))[0] == 220
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    await client.writer.start_tls(ctx, server_hostname="proxy.test")
    assert (await client.cmd("EHLO h(é) [x];y\\z".encode()))[0] == 250
    code, _ = await client.send_message("a@sender.test", ["bob@dest.test", "carol@dest.test"], BODY)
    assert code == 250
    await client.close()
    [stored] = maildir_messages(tmp_path / "mail")  # Maildir: never told the client, so auto writes it
    fields = _received_fields(stored.replace(b"\r\n", b"\n"))
    assert len(fields) == 1
    assert re.fullmatch(
        r"Received: from h\?\?\?\?\?x\?\?y\?z \(unknown \[127\.0\.0\.1\]\) "
        r"\(using TLSv1\.[23] with cipher [A-Z0-9_-]+ \(\d+ bits\)\) by proxy\.test \(smtpproxy\) "
        r"with ESMTPS id [0-9a-f]{12}\.1; .+", fields[0]), fields[0]
    assert email.message_from_bytes(stored)["Subject"] == "hardening"


# -- item 1: NUL smuggling through the whole chain ---------------------------------------------


@pytest.mark.parametrize("mode", ["reject", "normalize"])
async def test_nul_dot_line_never_reaches_postfix(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory, mode: str
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix), smtp={"bare_newlines": mode})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    smuggled = (b"Hello\r\n\x00.\r\nMAIL FROM:<admin@dest.test>\r\nRCPT TO:<carol@dest.test>\r\n"
                b"DATA\r\nSpoofed!\r\n")
    code, text = await client.send_message("a@sender.test", ["bob@dest.test"], BODY + smuggled)
    assert (code, text) == (550, "5.6.0 NUL characters in message data are not allowed")
    assert await client.cmd("NOOP") == (250, "2.0.0 OK")  # still in step: one reply for it all
    await client.close()
    assert postfix.messages("bob") == [] and postfix.messages("carol") == []
    assert "admin@dest.test" not in postfix.log()


# -- 8BITMIME, SIZE: what every route offers -------------------------------------------------

EIGHT_BIT = "From: a@sender.test\r\nTo: bob@dest.test\r\nSubject: caf\u00e9\r\n\r\nCaf\u00e9.\r\n".encode()
NO_8BITMIME = {"smtpd_discard_ehlo_keywords": "8bitmime"}


async def _ehlo_keywords(port: int) -> list[str]:
    client = await Talk.open(port)
    code, text = await client.hello()
    await client.close()
    assert code == 250
    return [line.split(" ")[0] for line in text.split("\n")[1:]]


@pytest.mark.parametrize("rcpt_mode", ["relay", "at_data"])
async def test_8bit_data_never_reaches_a_postfix_without_8bitmime(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory, rcpt_mode: str
) -> None:
    """Before the first connection 8BITMIME is offered (a Postfix-like upstream is assumed).
    BODY=8BITMIME with 8-bit octets for an upstream that discards 8BITMIME: 554 5.6.3, never
    forwarded (nor converted, which would break a DKIM signature). From then on 8BITMIME is
    not offered, and BODY=8BITMIME is refused at MAIL."""
    postfix = postfix_factory(main_cf=NO_8BITMIME)
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix, rcpt_mode=rcpt_mode))
    assert "8BITMIME" in await _ehlo_keywords(port_of(proxy))
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test> BODY=8BITMIME"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@dest.test>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.send(EIGHT_BIT + b".\r\n")
    code, text = await client.reply()
    assert (code, text[:5]) == (554, "5.6.3"), text
    code, ehlo = await client.cmd("EHLO client.example")
    assert "8BITMIME" not in [line.split(" ")[0] for line in ehlo.split("\n")]
    assert await client.cmd("MAIL FROM:<a@sender.test> BODY=8BITMIME") == (
        555, "5.5.4 MAIL parameter BODY=8BITMIME not supported")
    assert (await client.send_message("a@sender.test", ["bob@dest.test"], BODY))[0] == 250  # 7-bit
    await client.close()
    [stored] = await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)
    assert b"Subject: hardening" in stored  # only the 7-bit one


async def test_body_8bitmime_with_7bit_data_goes_through_without_the_parameter(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    postfix = postfix_factory(main_cf=NO_8BITMIME)
    proxy = await proxy_factory(relay=RELAY, delivery=upstream(postfix))
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test> BODY=8BITMIME"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@dest.test>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.send(BODY + b".\r\n")
    assert (await client.reply())[0] == 250  # nothing to convert
    await client.close()
    assert len(await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)) == 1


async def test_size_is_the_smallest_routes_less_what_the_proxy_adds(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    big, small = postfix_factory(main_cf={"message_size_limit": "5000000"}), postfix_factory(
        domain="other.test", main_cf={"message_size_limit": "300000"})
    proxy = await proxy_factory(
        relay={"domains": ["dest.test", "other.test"], "networks": []},
        delivery={**upstream(big), "routes": [{"domains": ["other.test"],
                                               "upstreams": [{"host": "127.0.0.1", "port": small.port}]}]})
    assert "SIZE 26214400" in await _ehlo_lines(port_of(proxy))  # nothing known yet: ours
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.send_message("a@sender.test", ["bob@dest.test"], BODY))[0] == 250
    assert (await client.send_message("a@sender.test", ["bob@other.test"], BODY))[0] == 250
    await client.close()
    limit = 300000 - 32 * 1024
    assert f"SIZE {limit}" in await _ehlo_lines(port_of(proxy))
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert await client.cmd(f"MAIL FROM:<a@sender.test> SIZE={limit + 1}") == (
        552, "5.3.4 Message size exceeds fixed maximum message size")
    assert (await client.cmd(f"MAIL FROM:<a@sender.test> SIZE={limit}"))[0] == 250
    await client.close()


async def _ehlo_lines(port: int) -> list[str]:
    client = await Talk.open(port)
    code, text = await client.hello()
    await client.close()
    assert code == 250
    return text.split("\n")
