"""The SPF plugin against a real DNS server on loopback: MAIL-time replies end to end, the rest unit-level.

End-to-end tests speak SMTP to a running proxy whose listener takes a PROXY protocol header, so
the client IP the plugin checks can be any address (192.0.2.7 unless a test says otherwise).
Unit-level tests call ``SPF.check_host`` (what the hook uses) and the hook itself.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pydantic
import pytest
import spf as pyspf
import trustme
from smtpproxy_plugins.spf import SPF, SPFOutcome

import smtpproxy.dns
from smtpproxy import Address, Client, Envelope, Session, Transaction, Verdict, hookimpl
from smtpproxy.authresults import AuthCheck, checks
from smtpproxy.dns import Resolver
from smtpproxy.verdicts import Action
from tests.conftest import ProxyFactory, Sink, Talk, port_of
from tests.dns_server import ZoneServer

CLIENT = "192.0.2.7"
OK = (250, "2.1.0 Sender OK")
BODY = b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: spf\r\n\r\nhello\r\n"

ZONE = """
pass-ip4.test.       300 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
pass-a.test.         300 IN TXT "v=spf1 a -all"
pass-a.test.         300 IN A   192.0.2.7
pass-mx.test.        300 IN TXT "v=spf1 mx -all"
pass-mx.test.        300 IN MX  10 mx1.pass-mx.test.
mx1.pass-mx.test.    300 IN A   192.0.2.7
pass-include.test.   300 IN TXT "v=spf1 include:pass-ip4.test -all"
pass-redirect.test.  300 IN TXT "v=spf1 redirect=pass-ip4.test"
fail.test.           300 IN TXT "v=spf1 ip4:198.51.100.1 -all"
fail-exp.test.       300 IN TXT "v=spf1 -all exp=why.fail-exp.test"
why.fail-exp.test.   300 IN TXT "%{i} is not one of %{d}'s designated mail servers."
redirect-fail.test.  300 IN TXT "v=spf1 redirect=fail.test"
include-fail.test.   300 IN TXT "v=spf1 include:fail.test -all"
softfail.test.       300 IN TXT "v=spf1 ip4:198.51.100.1 ~all"
neutral.test.        300 IN TXT "v=spf1 ?all"
norecord.test.       300 IN TXT "some other text record"
norecord.test.       300 IN A   192.0.2.1
macro.test.          300 IN TXT "v=spf1 exists:%{i}._spf.%{d} -all"
192.0.2.7._spf.macro.test. 300 IN A 127.0.0.2
syntax.test.         300 IN TXT "v=spf1 ip4:192.0.2.0/24 moo -all"
badip.test.          300 IN TXT "v=spf1 ip4:192.0.2.300 -all"
two-records.test.    300 IN TXT "v=spf1 +all"
two-records.test.    300 IN TXT "v=spf1 -all"
void.test.           300 IN TXT "v=spf1 a:v1.void.test a:v2.void.test a:v3.void.test ip4:192.0.2.7 -all"
six.test.            300 IN TXT "v=spf1 ip6:2001:db8::/32 -all"
helo.test.           300 IN TXT "v=spf1 ip4:192.0.2.7 -all"
helo-fail.test.      300 IN TXT "v=spf1 -all"
helo-soft.test.      300 IN TXT "v=spf1 ~all"
local.test.          300 IN TXT "v=spf1 ip4:127.0.0.1 -all"
xn--bcher-kva.test.  300 IN TXT "v=spf1 ip4:192.0.2.7 -all"
alias.test.          300 IN CNAME pass-ip4.test.
loop.test.           300 IN TXT "v=spf1 a:self.loop.test ip4:192.0.2.7 -all"
self.loop.test.      300 IN CNAME self.loop.test.
nullmx.test.         300 IN TXT "v=spf1 mx ip4:192.0.2.7 -all"
nullmx.test.         300 IN MX  0 .
"""


def publish(server: ZoneServer) -> None:
    server.add(ZONE)
    # 11 DNS-querying terms: one over RFC 7208 4.6.4's limit of 10
    server.txt("toomany.test", "v=spf1 " + " ".join(f"a:h{i}.toomany.test" for i in range(11)) + " -all")
    for i in range(11):
        server.add(f"h{i}.toomany.test. 300 IN A 198.51.100.{i + 1}")
    # exactly 10 is allowed
    server.txt("ten.test", "v=spf1 " + " ".join(f"a:h{i}.toomany.test" for i in range(9)) + " ip4:192.0.2.7 a:h9.toomany.test -all")
    server.timeout_names.add("slow.test")
    server.timeout_names.add("slow-include.test")
    server.txt("include-slow.test", "v=spf1 include:slow-include.test -all")
    server.servfail_names.add("broken.test")


@pytest.fixture
def zone(dns_server: ZoneServer) -> ZoneServer:
    publish(dns_server)
    return dns_server


@pytest.fixture
def shared_resolver(zone: ZoneServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Resolver]:
    """Point the process-wide resolver at the test server (restored afterwards)."""
    monkeypatch.setattr(smtpproxy.dns, "_resolver", smtpproxy.dns._resolver)
    resolver = Resolver(["127.0.0.1"], port=zone.port, timeout=1)
    smtpproxy.dns.configure(resolver)
    yield resolver


def dns_section(server: ZoneServer, timeout: float = 1) -> dict[str, Any]:
    return {"nameservers": ["127.0.0.1"], "port": server.port, "timeout": timeout}


PROXIED = {"address": "127.0.0.1", "port": 0, "proxy_protocol": True, "proxy_protocol_from": ["127.0.0.0/8"]}


class Probe:
    """Runs after the SPF plugin: what it recorded, as later plugins (DMARC, scoring) see it."""

    name = "probe"

    def __init__(self) -> None:
        self.auth: list[list[AuthCheck]] = []
        self.scores: list[float] = []
        self.tags: list[set[str]] = []

    @hookimpl
    def mail_from(self, transaction: Transaction) -> None:
        self.auth.append(checks(transaction, "spf"))
        self.scores.append(transaction.results.score)
        self.tags.append(transaction.results.tags)


def plugin(**settings: Any) -> SPF:
    spf = SPF(SPF.Settings(**settings))
    spf.name = "spf"  # type: ignore[attr-defined]  # the name the test chain registers it under
    return spf


async def start(proxy_factory: ProxyFactory, zone: ZoneServer, *plugins: object, sink: Sink | None = None,
                dns_timeout: float = 1, **sections: Any) -> int:
    proxy = await proxy_factory(*plugins, dns=dns_section(zone, dns_timeout), listeners=[PROXIED],
                                upstream=sink.port if sink else None, **sections)
    return port_of(proxy)


async def session(port: int, ip: str = CLIENT, helo: str = "mail.client.test") -> Talk:
    client = await Talk.open(port)
    family = "TCP6" if ":" in ip else "TCP4"
    client.send(f"PROXY {family} {ip} {'2001:db8::25' if ':' in ip else '192.0.2.25'} 40001 25\r\n")
    code, _ = await client.hello(helo)
    assert code == 250
    return client


async def mail_from(port: int, sender: str, ip: str = CLIENT, helo: str = "mail.client.test") -> tuple[int, str]:
    client = await session(port, ip, helo)
    reply = await client.cmd(f"MAIL FROM:<{sender}>")
    await client.close()
    return reply


# -- end to end: the reply at MAIL FROM ------------------------------------------------------


@pytest.mark.parametrize("domain", ["pass-ip4.test", "pass-a.test", "pass-mx.test", "pass-include.test",
                                    "pass-redirect.test", "macro.test"])
async def test_pass_is_accepted_and_recorded(proxy_factory: ProxyFactory, zone: ZoneServer, domain: str) -> None:
    probe = Probe()
    port = await start(proxy_factory, zone, plugin(), probe)
    assert await mail_from(port, f"alice@{domain}") == OK
    assert probe.auth == [[AuthCheck("spf", "pass", "sender SPF authorized", {"smtp.mailfrom": f"alice@{domain}"})]]
    assert probe.tags == [{"spf:pass"}] and probe.scores == [0.0]


async def test_fail_is_rejected_at_mail_with_rfc7372_code(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    port = await start(proxy_factory, zone, plugin())
    assert await mail_from(port, "alice@fail.test") == (550, "5.7.23 SPF check failed: SPF fail - not authorized")
    assert await mail_from(port, "bob@include-fail.test") == (550, "5.7.23 SPF check failed: SPF fail - not authorized")
    assert await mail_from(port, "carol@redirect-fail.test") == (550, "5.7.23 SPF check failed: SPF fail - not authorized")


async def test_fail_reply_carries_the_domains_explanation(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    port = await start(proxy_factory, zone, plugin())
    assert await mail_from(port, "alice@fail-exp.test") == (
        550, "5.7.23 SPF check failed: 192.0.2.7 is not one of fail-exp.test's designated mail servers.")


async def test_the_session_goes_on_after_a_rejected_sender(proxy_factory: ProxyFactory, zone: ZoneServer, sink: Sink) -> None:
    port = await start(proxy_factory, zone, plugin(), sink=sink)
    client = await session(port)
    assert (await client.cmd("MAIL FROM:<alice@fail.test>"))[0] == 550
    assert (await client.send_message("alice@pass-ip4.test", ["b@dest.test"], BODY))[0] == 250
    await client.close()
    assert [m.sender for m in sink.messages] == ["alice@pass-ip4.test"]


async def test_softfail_is_scored_and_the_message_delivered(proxy_factory: ProxyFactory, zone: ZoneServer, sink: Sink) -> None:
    probe = Probe()
    port = await start(proxy_factory, zone, plugin(), probe, sink=sink)
    client = await session(port)
    assert (await client.send_message("alice@softfail.test", ["b@dest.test"], BODY))[0] == 250
    await client.close()
    assert probe.scores == [2.0]  # the Verdict's score, in transaction.results
    assert probe.tags == [{"spf:softfail"}]
    assert [c.result for c in probe.auth[0]] == ["softfail"]
    assert len(sink.messages) == 1


async def test_neutral_and_none_continue(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    probe = Probe()
    port = await start(proxy_factory, zone, plugin(), probe)
    assert await mail_from(port, "alice@neutral.test") == OK
    assert await mail_from(port, "alice@norecord.test") == OK
    assert await mail_from(port, "alice@nxdomain.test") == OK
    assert [[c.result for c in found] for found in probe.auth] == [["neutral"], ["none"], ["none"]]
    assert probe.tags == [{"spf:neutral"}, {"spf:none"}, {"spf:none"}]


async def test_dns_timeout_on_the_spf_record_is_a_tempfail(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    port = await start(proxy_factory, zone, plugin(), dns_timeout=0.5)
    started = time.monotonic()
    assert await mail_from(port, "alice@slow.test") == (
        451, "4.7.24 SPF check failed temporarily: SPF Temporary Error: DNS timeout looking up TXT slow.test")
    assert time.monotonic() - started < 1.9  # the resolver's timeout, well inside the chain's 2 s
    assert await mail_from(port, "alice@broken.test") == (
        451, "4.7.24 SPF check failed temporarily: SPF Temporary Error: DNS server failure looking up TXT broken.test")
    assert await mail_from(port, "alice@include-slow.test") == (
        451, "4.7.24 SPF check failed temporarily: SPF Temporary Error: DNS timeout looking up TXT slow-include.test")


async def test_permerror_continues_by_default_and_can_be_rejected(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    probe = Probe()
    port = await start(proxy_factory, zone, plugin(), probe)
    assert await mail_from(port, "alice@syntax.test") == OK
    assert probe.auth[0][0].result == "permerror" and probe.tags == [{"spf:permerror"}]
    strict = await start(proxy_factory, zone, plugin(actions={"permerror": "reject"}))
    assert await mail_from(strict, "alice@syntax.test") == (
        550, "5.7.24 SPF check failed: SPF Permanent Error: Unknown mechanism found: moo")


async def test_null_sender_is_checked_by_its_helo_name(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    probe = Probe()
    port = await start(proxy_factory, zone, plugin(), probe)
    assert await mail_from(port, "", helo="helo.test") == OK
    assert probe.auth == [[AuthCheck("spf", "pass", "sender SPF authorized", {"smtp.helo": "helo.test"})]]
    assert await mail_from(port, "", helo="helo-fail.test") == (550, "5.7.23 SPF check failed: SPF fail - not authorized")
    assert await mail_from(port, "", helo="[192.0.2.7]") == OK  # an address literal: none
    assert probe.auth[1][0].result == "none"


async def test_check_helo_adds_a_helo_check(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    probe = Probe()
    port = await start(proxy_factory, zone, plugin(check_helo=True), probe)
    assert await mail_from(port, "alice@pass-ip4.test", helo="helo-soft.test") == OK
    assert probe.auth == [[
        AuthCheck("spf", "pass", "sender SPF authorized", {"smtp.mailfrom": "alice@pass-ip4.test"}),
        AuthCheck("spf", "softfail", "domain owner discourages use of this host", {"smtp.helo": "helo-soft.test"}),
    ]]
    assert probe.tags == [{"spf:pass", "spf:helo:softfail"}] and probe.scores == [2.0]
    # a HELO fail is rejected like a MAIL FROM fail
    assert await mail_from(port, "alice@pass-ip4.test", helo="helo-fail.test") == (
        550, "5.7.23 SPF check failed: SPF fail - not authorized")


async def test_client_seen_on_loopback_without_proxy_header(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    probe = Probe()
    proxy = await proxy_factory(plugin(), probe, dns=dns_section(zone))
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert await client.cmd("MAIL FROM:<alice@local.test>") == OK
    assert await client.cmd("RSET") == (250, "2.0.0 OK")
    assert (await client.cmd("MAIL FROM:<alice@pass-ip4.test>"))[0] == 550
    await client.close()
    assert [c.result for found in probe.auth for c in found] == ["pass"]


async def test_ipv6_client(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    port = await start(proxy_factory, zone, plugin())
    assert await mail_from(port, "alice@six.test", ip="2001:db8::7") == OK
    assert (await mail_from(port, "alice@six.test", ip="192.0.2.7"))[0] == 550


async def test_skip_networks_are_not_checked(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    probe = Probe()
    port = await start(proxy_factory, zone, plugin(skip_networks=["192.0.2.0/28"]), probe)
    assert await mail_from(port, "alice@fail.test") == OK
    assert probe.auth == [[]]  # no check recorded for the skipped client
    assert zone.queries == []  # and no DNS asked
    assert (await mail_from(port, "alice@fail.test", ip="192.0.2.77"))[0] == 550


PASSWORD = "correct horse battery staple"


async def test_authenticated_clients_are_not_checked(
    proxy_factory: ProxyFactory, zone: ZoneServer, tmp_path: Path
) -> None:
    ca = trustme.CA()
    pem = tmp_path / "proxy.pem"
    ca.issue_cert("proxy.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    users = tmp_path / "users"
    users.write_text(f"alice:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    submission = {"address": "127.0.0.1", "port": 0, "tls": {"cert": str(pem), "key": str(pem)},
                  "auth": {"users_file": str(users)}}
    probe = Probe()
    proxy = await proxy_factory(plugin(), probe, dns=dns_section(zone), listeners=[submission])
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("STARTTLS"))[0] == 220
    await client.writer.start_tls(ctx, server_hostname="proxy.test")
    assert (await client.cmd("EHLO client.test"))[0] == 250
    token = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    assert (await client.cmd(f"AUTH PLAIN {token}"))[0] == 235
    assert await client.cmd("MAIL FROM:<alice@fail.test>") == OK  # 127.0.0.1 would fail
    await client.close()
    assert probe.auth == [[]]
    assert ("fail.test", "TXT") not in zone.queries


# -- unit level: check_host and the hook -----------------------------------------------------


async def check(spf: SPF, sender: str, ip: str = CLIENT, helo: str = "mail.client.test") -> SPFOutcome:
    return await spf.check_host(ip, sender, helo)


CHECK_HOST_CASES = [
    ("a@pass-ip4.test", CLIENT, "pass"),
    ("a@pass-a.test", CLIENT, "pass"),
    ("a@pass-a.test", "192.0.2.8", "fail"),
    ("a@pass-mx.test", CLIENT, "pass"),
    ("a@pass-include.test", CLIENT, "pass"),
    ("a@include-fail.test", CLIENT, "fail"),
    ("a@pass-redirect.test", CLIENT, "pass"),
    ("a@redirect-fail.test", CLIENT, "fail"),
    ("a@macro.test", CLIENT, "pass"),  # exists:%{i}._spf.%{d} -> 192.0.2.7._spf.macro.test
    ("a@macro.test", "192.0.2.8", "fail"),
    ("a@softfail.test", CLIENT, "softfail"),
    ("a@neutral.test", CLIENT, "neutral"),
    ("a@norecord.test", CLIENT, "none"),
    ("a@nxdomain.test", CLIENT, "none"),
    ("a@ten.test", CLIENT, "pass"),  # 10 lookups are allowed
    ("a@toomany.test", CLIENT, "permerror"),  # 11 are not (RFC 7208 4.6.4)
    ("a@void.test", CLIENT, "permerror"),  # 3 lookups with no answer: over the void limit of 2
    ("a@syntax.test", CLIENT, "permerror"),
    ("a@badip.test", CLIENT, "permerror"),
    ("a@two-records.test", CLIENT, "permerror"),
    ("a@slow.test", CLIENT, "temperror"),
    ("a@broken.test", CLIENT, "temperror"),
    ("a@include-slow.test", CLIENT, "temperror"),
    ("a@six.test", "2001:db8::1", "pass"),
    ("a@six.test", CLIENT, "fail"),
    ("a@pass-ip4.test", "::ffff:192.0.2.7", "pass"),  # IPv4-mapped: checked as IPv4
    ("a@bücher.test", CLIENT, "pass"),  # the domain is looked up as A-labels
    ("a@alias.test", CLIENT, "pass"),  # a CNAME the server does not chase: pyspf follows it
    ("a@loop.test", CLIENT, "pass"),  # a CNAME loop is no records, not a DNS failure
    ("a@nullmx.test", CLIENT, "pass"),  # a null MX (RFC 7505) has no hosts
    ("", CLIENT, "pass"),  # the null sender: the HELO identity (helo.test) is checked
]


@pytest.mark.usefixtures("shared_resolver")
async def test_check_host() -> None:
    spf = plugin()
    outcomes = await asyncio.gather(*(check(spf, sender, ip, helo="helo.test") for sender, ip, _ in CHECK_HOST_CASES))
    wrong = [(sender, ip, expected, outcome) for (sender, ip, expected), outcome in zip(CHECK_HOST_CASES, outcomes, strict=True)
             if outcome.result != expected]
    assert wrong == []


@pytest.mark.usefixtures("shared_resolver")
async def test_limits_are_named_in_the_explanation() -> None:
    spf = plugin()
    assert (await check(spf, "a@toomany.test")).explanation == "SPF Permanent Error: Too many DNS lookups"
    assert (await check(spf, "a@void.test")).explanation == "SPF Permanent Error: Void lookup limit of 2 exceeded"
    assert (await check(spf, "a@badip.test")).explanation == (
        "SPF Permanent Error: Invalid IP4 address: ip4:192.0.2.300")


async def test_dns_goes_through_the_shared_resolver(shared_resolver: Resolver, zone: ZoneServer) -> None:
    spf = plugin()
    assert (await check(spf, "a@pass-include.test")).result == "pass"
    assert ("pass-include.test", "TXT") in zone.queries and ("pass-ip4.test", "TXT") in zone.queries
    # answered from the shared cache the second time, across worker threads
    assert (await check(spf, "a@pass-include.test")).result == "pass"
    assert zone.queries.count(("pass-include.test", "TXT")) == 1
    assert zone.queries.count(("pass-ip4.test", "TXT")) == 1
    # the async side of the same resolver sees the cached answer too
    assert await shared_resolver.txt("pass-ip4.test") == [b"v=spf1 ip4:192.0.2.0/24 -all"]
    assert zone.queries.count(("pass-ip4.test", "TXT")) == 1


@pytest.mark.usefixtures("shared_resolver")
async def test_the_overall_time_limit_gives_temperror() -> None:
    spf = plugin(timeout=0.3)  # below the resolver's 1 s per lookup
    started = time.monotonic()
    outcome = await check(spf, "a@slow.test")
    assert outcome.result == "temperror"
    assert time.monotonic() - started < 0.9


@pytest.mark.usefixtures("shared_resolver")
async def test_a_slow_check_does_not_block_the_event_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    outcomes = await asyncio.gather(*(check(plugin(), "a@slow.test") for _ in range(4)))
    task.cancel()
    assert [o.result for o in outcomes] == ["temperror"] * 4
    assert ticks > 30  # the loop kept running during ~1 s of DNS timeouts


def hook_args(sender: str, ip: str = CLIENT, helo: str = "mail.client.test",
              auth_user: str | None = None) -> tuple[Session, Transaction, Address]:
    local, _, domain = sender.rpartition("@")
    address = Address(sender, local, domain)
    session = Session(Client(ip, 40001))
    session.helo = helo
    session.auth_user = auth_user
    return session, session.begin_transaction(Envelope(address)), address


@pytest.mark.usefixtures("shared_resolver")
async def test_hook_verdicts_carry_tags_scores_and_codes() -> None:
    spf = plugin(actions={"softfail": "quarantine", "neutral": -1.5, "none": "reject", "fail": "tempfail"})
    verdict = await spf.mail_from(*hook_args("a@softfail.test"))
    assert verdict is not None and verdict.action is Action.QUARANTINE and verdict.tags == ("spf:softfail",)
    verdict = await spf.mail_from(*hook_args("a@neutral.test"))
    assert verdict == Verdict.cont(score=-1.5, reason="SPF neutral for a@neutral.test from 192.0.2.7: "
                                   "access neither permitted nor denied", tags=("spf:neutral",))
    verdict = await spf.mail_from(*hook_args("a@norecord.test"))
    assert verdict is not None and verdict.reply is not None
    assert str(verdict.reply) == "550 5.7.23 SPF check failed: SPF none"
    assert verdict.tags == ("spf:none",)
    verdict = await spf.mail_from(*hook_args("a@fail.test"))
    assert verdict is not None and str(verdict.reply) == "451 4.7.23 SPF check failed temporarily: SPF fail - not authorized"
    # defaults for the results not configured
    verdict = await spf.mail_from(*hook_args("a@slow.test"))
    assert verdict is not None and verdict.action is Action.TEMPFAIL and verdict.tags == ("spf:temperror",)
    verdict = await spf.mail_from(*hook_args("a@pass-ip4.test"))
    assert verdict == Verdict.cont(reason="SPF pass for a@pass-ip4.test from 192.0.2.7: sender SPF authorized",
                                   tags=("spf:pass",))


@pytest.mark.usefixtures("shared_resolver")
async def test_custom_reply_text() -> None:
    spf = plugin(reject_text="Not authorized to send for {domain} from {ip} ({result}); see https://example.test/spf")
    verdict = await spf.mail_from(*hook_args("a@fail.test"))
    assert verdict is not None and str(verdict.reply) == (
        "550 5.7.23 Not authorized to send for fail.test from 192.0.2.7 (fail); see https://example.test/spf")


@pytest.mark.usefixtures("shared_resolver")
async def test_skips_in_the_hook() -> None:
    session, transaction, sender = hook_args("a@fail.test", auth_user="alice")
    assert await plugin().mail_from(session, transaction, sender) == Verdict.cont(
        reason="SPF not checked: authenticated client")
    assert checks(transaction) == []
    verdict = await plugin(skip_authenticated=False).mail_from(session, transaction, sender)
    assert verdict is not None and verdict.action is Action.REJECT
    assert [c.result for c in checks(transaction)] == ["fail"]
    session, transaction, sender = hook_args("a@fail.test", ip="::ffff:10.1.2.3")
    assert await plugin(skip_networks=["10.0.0.0/8"]).mail_from(session, transaction, sender) == Verdict.cont(
        reason="SPF not checked: client ::ffff:10.1.2.3 is in skip_networks")
    session, transaction, sender = hook_args("a@fail.test", ip="unknown")
    verdict = await plugin().mail_from(session, transaction, sender)
    assert verdict is not None and verdict.action is Action.CONTINUE and "not an IP address" in verdict.reason


@pytest.mark.usefixtures("shared_resolver")
async def test_explanations_from_dns_are_made_safe_for_the_reply(zone: ZoneServer) -> None:
    zone.txt("longexp.test", "v=spf1 -all exp=why.longexp.test")
    zone.txt("why.longexp.test", "x" * 400)
    verdict = await plugin().mail_from(*hook_args("a@longexp.test"))
    assert verdict is not None and verdict.reply is not None
    assert verdict.reply.text == "SPF check failed: " + "x" * 197 + "..."


def test_settings_defaults_merge_and_validation() -> None:
    settings = SPF.Settings.model_validate({"actions": {"softfail": "reject", "neutral": 1}})
    assert settings.actions == {"fail": "reject", "softfail": "reject", "neutral": 1.0, "none": "continue",
                                "pass": "continue", "temperror": "tempfail", "permerror": "continue"}
    from smtpproxy.config import PluginSpec

    # SPF's own limit stays below the chain's default time-box, so SPF reports temperror itself
    assert SPF.Settings().timeout == 8 < PluginSpec(name="spf").timeout
    assert SPF.Settings().skip_authenticated is True
    assert SPF.Settings().check_helo is False
    bad: list[dict[str, Any]] = [
        {"actions": {"softfial": "reject"}},
        {"actions": {"fail": "bounce"}},
        {"actions": {"fail": float("nan")}},
        {"reject_text": "SPF {explantion}"},
        {"reject_text": "SPF {explanation"},
        {"tempfail_text": "line\r\ninjected"},
        {"skip_networks": ["10.0.0.1/8"]},
        {"timeout": 0},
        {"check_helo": "yes"},
        {"unknown": 1},
    ]
    for data in bad:
        with pytest.raises(pydantic.ValidationError):
            SPF.Settings.model_validate(data)
    with pytest.raises(pydantic.ValidationError, match="unknown placeholder"):
        SPF.Settings.model_validate({"reject_text": "SPF {explantion}"})


def test_entry_point_and_configuration_file(tmp_path: Path) -> None:
    from smtpproxy.config import load_config
    from smtpproxy.registry import build_chain, resolve

    assert resolve("spf") is SPF
    (tmp_path / "smtpproxy.yaml").write_text(
        "listeners: [{port: 2525}]\n"
        "delivery: {type: maildir, path: mail}\n"
        "plugins:\n"
        "  - name: spf\n"
        "    timeout: 25\n"
        "    settings:\n"
        "      actions: {softfail: 3.5, permerror: reject}\n"
        "      skip_networks: [10.0.0.0/8, 2001:db8::/32]\n"
        "      check_helo: true\n"
    )
    config, source = load_config(tmp_path / "smtpproxy.yaml")
    chain = build_chain(config.plugins, source)
    [step] = chain.steps
    assert isinstance(step.plugin, SPF) and step.timeout == 25
    assert step.plugin.settings.actions["softfail"] == 3.5
    assert chain.implementers("mail_from") == ["spf"]


# -- the async evaluation: pyspf replayed on the loop against the shared resolver -------------


async def test_pyspf_runs_on_the_event_loop_thread(shared_resolver: Resolver, monkeypatch: pytest.MonkeyPatch) -> None:
    """No worker thread: every pyspf evaluation (one per DNS round) runs on the loop's thread."""
    import threading

    threads: list[int] = []
    real_check2 = pyspf.check2

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return real_check2(*args, **kwargs)

    monkeypatch.setattr(pyspf, "check2", spy)
    assert (await check(plugin(), "a@pass-include.test")).result == "pass"
    # pass-include.test TXT, then pass-ip4.test TXT: three evaluations, the last one complete
    assert threads == [threading.get_ident()] * 3
    threads.clear()
    assert (await check(plugin(), "b@pass-include.test")).result == "pass"
    assert len(threads) == 1  # both answers at hand: one evaluation, no DNS round


def count_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sender of every pyspf evaluation from now on."""
    senders: list[str] = []
    real_check2 = pyspf.check2

    def spy(*args: Any, **kwargs: Any) -> Any:
        senders.append(kwargs["s"])
        return real_check2(*args, **kwargs)

    monkeypatch.setattr(pyspf, "check2", spy)
    return senders


async def test_a_result_is_kept_for_the_same_ip_sender_and_helo(
    shared_resolver: Resolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same (IP, sender, HELO) again: the same outcome, no evaluation; any of the three
    different: evaluated (its result may differ: %{l}, %{i}, %{h} macros, the IP's mechanisms)."""
    evaluations = count_evaluations(monkeypatch)
    first = await check(plugin(), "a@pass-include.test")
    assert first.result == "pass" and len(evaluations) == 3
    for _ in range(2):
        assert await check(plugin(), "a@pass-include.test") == first
    assert len(evaluations) == 3
    assert (await check(plugin(), "a@pass-include.test", ip="203.0.113.9")).result == "fail"
    assert (await check(plugin(), "a@pass-include.test", helo="other.client.test")) == first
    assert (await check(plugin(), "A@pass-include.test")) == first
    assert len(evaluations) == 6


@pytest.mark.parametrize(("sender", "result"), [
    ("a@fail.test", "fail"),  # exp= may expand %{t}: a fail is evaluated each time
    ("a@nxdomain.test", "none"),  # the name does not exist: its TTL is the resolver's secret
    ("a@ttl0.test", "pass"),  # an answer with TTL 0 is not kept, nor anything derived from it
])
async def test_results_that_are_not_kept(
    shared_resolver: Resolver, zone: ZoneServer, monkeypatch: pytest.MonkeyPatch, sender: str, result: str
) -> None:
    zone.txt("ttl0.test", f"v=spf1 ip4:{CLIENT} -all", ttl=0)
    evaluations = count_evaluations(monkeypatch)
    outcomes = [await check(plugin(), sender) for _ in range(2)]
    assert outcomes[0] == outcomes[1] and outcomes[0].result == result
    assert evaluations.count(sender) >= 2 and evaluations[-1] == sender


async def test_a_kept_result_expires_with_the_first_answer_it_read(
    shared_resolver: Resolver, zone: ZoneServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An include's record with a shorter TTL than the domain's own bounds the result."""
    import smtpproxy_plugins.spf as spf_module

    import smtpproxy.dns as dns_module

    zone.txt("short.test", f"v=spf1 ip4:{CLIENT} -all", ttl=30)
    zone.txt("outer.test", "v=spf1 include:short.test -all", ttl=3000)
    evaluations = count_evaluations(monkeypatch)
    clock = [1000.0]
    monkeypatch.setattr(dns_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(spf_module.time, "monotonic", lambda: clock[0])
    assert (await check(plugin(), "a@outer.test")).result == "pass"
    rounds = len(evaluations)
    clock[0] += 29
    assert (await check(plugin(), "a@outer.test")).result == "pass"
    assert len(evaluations) == rounds  # kept
    clock[0] += 2  # short.test's answer is gone, and the result with it
    assert (await check(plugin(), "a@outer.test")).result == "pass"
    assert len(evaluations) > rounds


async def test_answers_are_cached_for_their_ttl_only(shared_resolver: Resolver, zone: ZoneServer) -> None:
    zone.txt("ttl0.test", "v=spf1 ip4:192.0.2.7 -all", ttl=0)
    for _ in range(2):
        assert (await check(plugin(), "a@ttl0.test")).result == "pass"
    assert zone.queries.count(("ttl0.test", "TXT")) == 2  # TTL 0: never served from a cache
    zone.txt("ttl300.test", "v=spf1 ip4:192.0.2.7 -all", ttl=300)
    for _ in range(2):
        assert (await check(plugin(), "a@ttl300.test")).result == "pass"
    assert zone.queries.count(("ttl300.test", "TXT")) == 1


async def test_temporary_failures_are_not_cached(shared_resolver: Resolver, zone: ZoneServer) -> None:
    for _ in range(2):
        assert (await check(plugin(), "a@broken.test")).result == "temperror"
    first = zone.queries.count(("broken.test", "TXT"))
    assert (await check(plugin(), "a@broken.test")).result == "temperror"
    assert zone.queries.count(("broken.test", "TXT")) > first  # asked again, not remembered
    zone.servfail_names.discard("broken.test")
    zone.txt("broken.test", "v=spf1 ip4:192.0.2.7 -all")
    assert (await check(plugin(), "a@broken.test")).result == "pass"  # recovered at once


async def test_a_miss_swallowed_by_pyspf_is_still_looked_up(shared_resolver: Resolver, zone: ZoneServer) -> None:
    """pyspf fetches the exp= text inside a bare ``except:``; the replay must still fetch it."""
    zone.txt("explained.test", "v=spf1 -all exp=why.explained.test")
    zone.txt("why.explained.test", "You are not %{d}'s server")
    outcome = await check(plugin(), "a@explained.test")
    assert outcome.result == "fail"
    assert outcome.explanation == "You are not explained.test's server"


async def test_rounds_are_bounded(shared_resolver: Resolver, monkeypatch: pytest.MonkeyPatch) -> None:
    from smtpproxy_plugins import spf as spf_module

    monkeypatch.setattr(spf_module, "MAX_ROUNDS", 1)  # pass-include.test needs three
    outcome = await check(plugin(), "a@pass-include.test")
    assert outcome.result == "temperror" and "rounds of DNS lookups" in outcome.explanation
