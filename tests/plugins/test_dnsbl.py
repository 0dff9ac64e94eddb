"""The DNSBL plugin against a real DNS server on loopback, end to end through the proxy.

The listener takes a PROXY protocol header, so each test picks the client address the
plugin looks up (192.0.2.x, or an IPv6 address).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pydantic
import pytest
from smtpproxy_plugins.dnsbl import DNSBL, query_name

from smtpproxy import Session, Transaction, hookimpl
from smtpproxy.config import ConfigError, load_config
from smtpproxy.registry import build_chain, resolve
from tests.conftest import ProxyFactory, Sink, Talk, port_of
from tests.dns_server import ZoneServer

RELAY = {"domains": ["dest.test"], "networks": []}
PROXIED = {"address": "127.0.0.1", "port": 0, "proxy_protocol": True, "proxy_protocol_from": ["127.0.0.0/8"]}
BODY = b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nhello\r\n"

ZONE = """
7.2.0.192.bl.test.      300 IN A 127.0.0.2
7.2.0.192.other.test.   300 IN A 127.0.0.3
8.2.0.192.zen.test.     300 IN A 127.0.0.4
9.2.0.192.zen.test.     300 IN A 127.0.0.10
12.2.0.192.bl.test.     300 IN A 127.255.255.254
13.2.0.192.bl.test.     300 IN A 192.0.2.1
7.2.0.192.wl.test.      300 IN A 127.0.10.3
bad.test.dbl.test.      300 IN A 127.0.1.2
spam.example.uri.test.  300 IN A 127.0.0.2
7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test. 300 IN A 127.0.0.2
"""


@pytest.fixture
def zone(dns_server: ZoneServer) -> ZoneServer:
    dns_server.add(ZONE)
    dns_server.timeout_names.add("10.2.0.192.bl.test")
    dns_server.servfail_names.add("11.2.0.192.bl.test")
    return dns_server


def plugin(**settings: Any) -> DNSBL:
    p = DNSBL(DNSBL.Settings.model_validate(settings))
    p.name = "dnsbl"  # type: ignore[attr-defined]
    p.timeout = 5  # type: ignore[attr-defined]
    return p


async def start(proxy_factory: ProxyFactory, zone: ZoneServer, *plugins: object,
                sink: Sink | None = None) -> int:
    proxy = await proxy_factory(
        *plugins, listeners=[PROXIED], relay=RELAY, upstream=sink.port if sink else None,
        dns={"nameservers": ["127.0.0.1"], "port": zone.port, "timeout": 0.5},
    )
    return port_of(proxy)


async def connect(port: int, ip: str) -> tuple[Talk, tuple[int, str]]:
    client = await Talk.open(port)
    family = "TCP6" if ":" in ip else "TCP4"
    client.send(f"PROXY {family} {ip} {'2001:db8::25' if ':' in ip else '192.0.2.25'} 40001 25\r\n")
    return client, await client.greeting()


class Probe:
    """Runs after dnsbl: the tags and score it left on the session and transaction."""

    name = "probe"

    def __init__(self) -> None:
        self.tags: list[set[str]] = []
        self.scores: list[float] = []

    @hookimpl
    def mail_from(self, session: Session, transaction: Transaction) -> None:
        self.tags.append(session.results.tags | transaction.results.tags)
        self.scores.append(session.results.score + transaction.results.score)


# -- IP lists at connect -------------------------------------------------------------------


def test_query_names() -> None:
    assert query_name("192.0.2.7", "zen.test") == "7.2.0.192.zen.test"
    assert query_name("::ffff:192.0.2.7", "zen.test") == "7.2.0.192.zen.test"
    assert query_name("2001:db8::7", "bl.test") == (
        "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test"
    )


async def test_listed_ip_is_refused_at_connect(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    port = await start(proxy_factory, zone, plugin(lists=[{"zone": "bl.test"}]))
    client, reply = await connect(port, "192.0.2.7")
    assert reply == (554, "5.7.1 Service unavailable; client [192.0.2.7] blocked using bl.test")
    assert await client.closed()
    assert ("7.2.0.192.bl.test", "A") in zone.queries


async def test_listed_ipv6_is_refused(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    port = await start(proxy_factory, zone, plugin(lists=[{"zone": "bl.test"}]))
    client, reply = await connect(port, "2001:db8::7")
    assert reply == (554, "5.7.1 Service unavailable; client [2001:db8::7] blocked using bl.test")
    await client.close()


async def test_unlisted_ip_gets_the_banner_and_mail_goes_through(
    proxy_factory: ProxyFactory, zone: ZoneServer, sink: Sink
) -> None:
    port = await start(proxy_factory, zone, plugin(lists=[{"zone": "bl.test"}, {"zone": "other.test"}]),
                       sink=sink)
    client, reply = await connect(port, "192.0.2.99")
    assert reply[0] == 220
    assert (await client.cmd("EHLO c.test"))[0] == 250
    assert (await client.send_message("a@sender.test", ["b@dest.test"], BODY))[0] == 250
    await client.close()
    assert len(sink.messages) == 1


async def test_lists_are_queried_concurrently(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    # two lists time out (0.5 s each): queried one after the other it would take 1 s or more
    zone.timeout_names.add("99.2.0.192.other.test")
    zone.timeout_names.add("99.2.0.192.bl.test")
    port = await start(proxy_factory, zone, plugin(lists=[{"zone": "bl.test"}, {"zone": "other.test"}]))
    started = time.monotonic()
    client, reply = await connect(port, "192.0.2.99")
    assert reply[0] == 220
    assert time.monotonic() - started < 0.95
    await client.close()


async def test_return_codes_map_to_names_actions_and_texts(
    proxy_factory: ProxyFactory, zone: ZoneServer
) -> None:
    zen = {
        "zone": "zen.test",
        "returns": {
            "127.0.0.2": "SBL",
            "127.0.0.4/30": {"name": "XBL", "text": "{ip} is an infected host ({name}, {code}), see {zone}"},
            "127.0.0.10/31": {"name": "PBL", "action": 3.0},
        },
    }
    probe = Probe()
    port = await start(proxy_factory, zone, plugin(lists=[zen]), probe)
    client, reply = await connect(port, "192.0.2.8")
    assert reply == (554, "5.7.1 192.0.2.8 is an infected host (XBL, 127.0.0.4), see zen.test")
    await client.close()

    client, reply = await connect(port, "192.0.2.9")  # PBL: scored only
    assert reply[0] == 220
    assert (await client.cmd("EHLO c.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    await client.close()
    # connect-phase results live on the session; the transaction's score includes them
    assert probe.scores == [3.0]
    assert {"dnsbl:zen.test", "dnsbl:zen.test:PBL"} <= probe.tags[0]


async def test_allow_list_hit_short_circuits(proxy_factory: ProxyFactory, zone: ZoneServer, sink: Sink) -> None:
    # 192.0.2.7 is on bl.test and on wl.test: the allow-list wins, and the RHSBL is skipped
    dnsbl = plugin(lists=[{"zone": "bl.test"}], allow_lists=[{"zone": "wl.test"}],
                   domain_lists=[{"zone": "dbl.test"}])
    port = await start(proxy_factory, zone, dnsbl, sink=sink)
    client, reply = await connect(port, "192.0.2.7")
    assert reply[0] == 220
    assert (await client.cmd("EHLO c.test"))[0] == 250
    assert (await client.send_message("x@bad.test", ["b@dest.test"], BODY))[0] == 250
    await client.close()
    assert ("bad.test.dbl.test", "A") not in zone.queries


@pytest.mark.parametrize("ip", ["192.0.2.10", "192.0.2.11", "192.0.2.12"], ids=["timeout", "servfail", "refused"])
async def test_dns_trouble_continues_by_default(proxy_factory: ProxyFactory, zone: ZoneServer, ip: str) -> None:
    port = await start(proxy_factory, zone, plugin(lists=[{"zone": "bl.test"}]))
    client, reply = await connect(port, ip)
    assert reply[0] == 220
    await client.close()


async def test_dns_timeout_tempfails_when_configured(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    port = await start(proxy_factory, zone, plugin(lists=[{"zone": "bl.test"}], temperror="tempfail"))
    client, reply = await connect(port, "192.0.2.10")
    assert reply == (421, "4.7.1 Service temporarily unavailable; blocklist bl.test did not answer")
    assert await client.closed()


async def test_answers_outside_127_8_are_not_listings(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    port = await start(proxy_factory, zone, plugin(lists=[{"zone": "bl.test"}]))
    client, reply = await connect(port, "192.0.2.13")
    assert reply[0] == 220
    await client.close()


async def test_local_clients_are_not_looked_up(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    port = await start(proxy_factory, zone, plugin(lists=[{"zone": "bl.test"}]))
    client, reply = await connect(port, "10.1.2.3")
    assert reply[0] == 220
    await client.close()
    assert not [q for q in zone.queries if q[0].endswith("bl.test")]


# -- IP lists at RCPT ------------------------------------------------------------------------


async def test_check_at_rcpt_lets_postmaster_through(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    port = await start(proxy_factory, zone, plugin(lists=[{"zone": "bl.test"}], check_at="rcpt"))
    client, reply = await connect(port, "192.0.2.7")
    assert reply[0] == 220
    assert (await client.cmd("EHLO c.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert await client.cmd("RCPT TO:<b@dest.test>") == (
        550, "5.7.1 Service unavailable; client [192.0.2.7] blocked using bl.test"
    )
    assert (await client.cmd("RCPT TO:<Postmaster@dest.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<c@dest.test>"))[0] == 550
    await client.close()
    assert zone.queries.count(("7.2.0.192.bl.test", "A")) == 1  # looked up once per session


# -- domain lists ----------------------------------------------------------------------------


async def test_rhsbl_refuses_a_listed_sender_domain(proxy_factory: ProxyFactory, zone: ZoneServer) -> None:
    dnsbl = plugin(domain_lists=[{"zone": "dbl.test", "returns": {"127.0.1.2": "spam-domain"}}])
    port = await start(proxy_factory, zone, dnsbl)
    client, reply = await connect(port, "192.0.2.99")
    assert reply[0] == 220
    assert (await client.cmd("EHLO c.test"))[0] == 250
    assert await client.cmd("MAIL FROM:<x@BAD.test>") == (550, "5.7.1 Domain bad.test is listed in dbl.test")
    assert (await client.cmd("MAIL FROM:<x@good.test>"))[0] == 250
    assert (await client.cmd("RSET"))[0] == 250
    assert (await client.cmd("MAIL FROM:<>"))[0] == 250
    await client.close()


async def test_uribl_refuses_a_message_with_a_listed_url(
    proxy_factory: ProxyFactory, zone: ZoneServer, sink: Sink
) -> None:
    port = await start(proxy_factory, zone, plugin(uri_lists=[{"zone": "uri.test"}]), sink=sink)
    client, reply = await connect(port, "192.0.2.99")
    assert reply[0] == 220
    assert (await client.cmd("EHLO c.test"))[0] == 250
    clean = BODY + b"see https://www.fine.example/page and http://192.0.2.1/x\r\n"
    assert (await client.send_message("a@sender.test", ["b@dest.test"], clean))[0] == 250
    spam = (b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: offer\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(b"Buy now: <https://Spam.Example/buy?x=1>\n").replace(b"\n", b"\r\n"))
    assert await client.send_message("a@sender.test", ["b@dest.test"], spam) == (
        550, "5.7.1 Domain spam.example is listed in uri.test"
    )
    await client.close()
    assert len(sink.messages) == 1
    assert ("www.fine.example.uri.test", "A") in zone.queries


# -- configuration ---------------------------------------------------------------------------


def test_entry_point_and_configuration_file(tmp_path: Path) -> None:
    assert resolve("dnsbl") is DNSBL
    (tmp_path / "smtpproxy.yaml").write_text(
        "listeners: [{port: 2525}]\n"
        "delivery: {type: maildir, path: mail}\n"
        "plugins:\n"
        "  - name: dnsbl\n"
        "    settings:\n"
        "      lists:\n"
        "        - zone: zen.spamhaus.org\n"
        "          returns: {127.0.0.2: SBL, 127.0.0.10/31: {name: PBL, action: 2.5}}\n"
        "      allow_lists: [{zone: list.dnswl.org}]\n"
        "      check_at: rcpt\n"
    )
    config, source = load_config(tmp_path / "smtpproxy.yaml")
    [step] = build_chain(config.plugins, source).steps
    assert isinstance(step.plugin, DNSBL) and step.plugin.settings.check_at == "rcpt"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lists": [{"zone": "bl.test", "action": "bounce"}]}, "action"),
        ({"lists": [{"zone": "not a zone"}]}, "is not a DNS zone name"),
        ({"lists": [{"zone": "bl.test", "returns": {"10.0.0.2": "X"}}]}, "outside 127.0.0.0/8"),
        ({"lists": [{"zone": "bl.test", "text": "listed {why}"}]}, "unknown placeholder {why}"),
        ({"lists": [{"zone": "bl.test"}], "check_at": "helo"}, "check_at"),
        ({}, "give at least one of lists"),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        DNSBL.Settings.model_validate(settings)


def test_bad_settings_in_a_configuration_file_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "smtpproxy.yaml").write_text(
        "listeners: [{port: 2525}]\n"
        "delivery: {type: maildir, path: mail}\n"
        "plugins:\n"
        "  - name: dnsbl\n"
        "    settings:\n"
        "      lists: [{zone: bl.test, acton: reject}]\n"
    )
    with pytest.raises(ConfigError, match="acton"):
        config, source = load_config(tmp_path / "smtpproxy.yaml")
        build_chain(config.plugins, source)
